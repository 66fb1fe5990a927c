"""``far-scale compare``: which run is better, by how much, at what speed, from MLflow's own query API.

Runs come from a tracking URI (a server or a sqlite store, by id, name or ``--filter``) or from run
directories (each with its embedded store). The report lists the parameters that differ between the
runs (not the hundreds that agree), the last and best value of each metric with the best run marked,
overlay plots (loss vs step and vs wall-clock time, quality vs step, images/s vs quality), and is logged
as the artifacts of a comparison run.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from far_scale.data.storage import local_atomic_writer
from far_scale.tracking.plots import new_axes, save_axes

DEFAULT_EXPERIMENT = "far-scale"
COMPARE_EXPERIMENT = "far-scale-compare"
DEFAULT_METRICS = (
    "loss",
    "eval/accuracy",
    "eval/fd",
    "eval/precision",
    "eval/recall",
    "eval/fid",
    "eval/is",
    "eval/images_per_s",
    "images_per_s",
)
# Metrics where larger is better; every other metric (loss, Fréchet distance, FID, step time) is minimised.
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "is", "images_per_s", "latents_per_s", "mfu")
QUALITY_METRICS = ("eval/accuracy", "eval/fd", "eval/fid", "eval/is")
SPEED_METRIC = "eval/images_per_s"
# What a metric's value means depends on these parameters: a winner is marked only among runs that agree on
# them. A training loss is the run's own objective (MAR's diffusion loss and FAR's flow-matching loss are
# different quantities); an evaluation metric is only comparable on the same yardstick.
OBJECTIVE_PARAMS = ("config.model.arch", "config.model.head.noise_schedule")
YARDSTICK_PARAMS = ("config.eval.benchmark", "config.eval.inception_weights", "config.eval.reference_stats")
MAX_SHOWN_VALUE = 60  # characters of a parameter value in the table
INTERVAL_SUFFIXES = ("_lo", "_hi")  # a metric's 95% interval, logged beside it (eval/fd_lo, eval/fd_hi)
NO_DIFFERENCE = "no significant difference: the 95% intervals overlap"


@dataclass
class RunRecord:
    name: str
    run_id: str
    uri: str
    params: dict[str, str]
    start_ms: int
    history: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    """metric -> [(step, timestamp ms, value)] sorted by step."""
    intervals: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    """metric -> step -> its 95% interval (from the ``<metric>_lo`` / ``_hi`` metrics logged beside it)."""
    best_ema_length: Optional[str] = None
    """From its post-hoc EMA sweep (``eval sweep --ema-sigma-rel`` child runs): the best sigma_rel and score."""

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"

    def last_interval(self, metric: str) -> Optional[tuple[float, float]]:
        """The interval of ``metric``'s last value, if one was logged at that step."""
        if metric not in self.history:
            return None
        return self.intervals.get(metric, {}).get(self.history[metric][-1][0])


def higher_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _record(client, uri: str, run, metrics: Sequence[str]) -> RunRecord:
    record = RunRecord(
        run.info.run_name or run.info.run_id, run.info.run_id, uri, dict(run.data.params), run.info.start_time or 0
    )
    for metric in metrics:
        if metric in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, metric)
            record.history[metric] = sorted((m.step, m.timestamp, m.value) for m in points)
            bounds = [f"{metric}{INTERVAL_SUFFIXES[0]}", f"{metric}{INTERVAL_SUFFIXES[1]}"]
            if all(b in run.data.metrics for b in bounds):
                low, high = ({m.step: m.value for m in client.get_metric_history(run.info.run_id, b)} for b in bounds)
                record.intervals[metric] = {step: (low[step], high[step]) for step in low if step in high}
    return record


def intervals_apart(best: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    """Whether interval ``best`` overlaps none of ``others``."""
    return all(best[1] < low or best[0] > high for low, high in others)


EMA_SWEEP_PARAM = "ema_sigma_rel"  # far_scale.eval.sweep.SweepPoint's field, logged as a child-run param
EMA_SWEEP_METRICS = ("accuracy", "fid", "fd")  # the first a sweep logged decides the best length


def _best_ema_length(client, experiment_id: str, run_id: str) -> Optional[str]:
    children = [
        c
        for c in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
        if c.data.params.get(EMA_SWEEP_PARAM) not in (None, "None")
    ]
    metric = next((m for m in EMA_SWEEP_METRICS if any(m in c.data.metrics for c in children)), None)
    if metric is None:
        return None
    scored = [c for c in children if metric in c.data.metrics]
    pick = max if higher_is_better(metric) else min
    best = pick(scored, key=lambda c: c.data.metrics[metric])
    return f"{float(best.data.params[EMA_SWEEP_PARAM]):g} ({metric} {best.data.metrics[metric]:.4g}, of {len(scored)} points)"


def store_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def collect_runs(
    selectors: Sequence[str],
    tracking_uri: Optional[str],
    experiment: str = DEFAULT_EXPERIMENT,
    filter_string: str = "",
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> list[RunRecord]:
    """Runs named by ``selectors`` (run directories, run ids or run names) or, without selectors, every run of
    ``experiment`` at ``tracking_uri`` that matches ``filter_string``; oldest first."""
    records: list[RunRecord] = []
    by_store: dict[str, list[str]] = {}
    for selector in selectors:
        path = Path(selector)
        if (path / "mlflow.db").is_file():
            by_store.setdefault(store_uri(path), [])
        elif tracking_uri:
            by_store.setdefault(tracking_uri, []).append(selector)
        else:
            raise FileNotFoundError(
                f"{selector} is not a run directory (no mlflow.db in it); to name runs by id or "
                "name, pass --tracking-uri"
            )
    if not selectors:
        if not tracking_uri:
            raise ValueError("name runs or run directories, or pass --tracking-uri (with --experiment/--filter)")
        by_store[tracking_uri] = []
    for uri, names in by_store.items():
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no experiment {experiment!r} at {uri}")
        runs = client.search_runs([found.experiment_id], filter_string=filter_string, order_by=["start_time ASC"])
        if names:
            wanted = set(names)
            runs = [r for r in runs if r.info.run_id in wanted or r.info.run_name in wanted]
            missing = wanted - {r.info.run_id for r in runs} - {r.info.run_name for r in runs}
            if missing:
                raise ValueError(f"no run named {', '.join(sorted(missing))} in experiment {experiment!r} at {uri}")
        for run in runs:
            record = _record(client, uri, run, metrics)
            record.best_ema_length = _best_ema_length(client, found.experiment_id, run.info.run_id)
            records.append(record)
    if len(records) < 1:
        raise ValueError(
            f"no runs matched in experiment {experiment!r}"
            + (f" with filter {filter_string!r}" if filter_string else "")
        )
    return records


def differing_params(records: Sequence[RunRecord]) -> list[str]:
    """Parameter names whose values are not the same in every run (absent counts as a value)."""
    keys = sorted(set().union(*(r.params for r in records)))
    return [k for k in keys if len({r.params.get(k) for r in records}) > 1]


@dataclass(frozen=True)
class MetricSummary:
    metric: str
    last: dict[str, Optional[float]]  # run id -> last value
    best: dict[str, Optional[float]]  # run id -> best value over its history
    winner: Optional[str]  # run id with the best last value
    not_comparable: str = ""  # why no winner is marked although several runs have the metric
    interval: dict[str, Optional[tuple[float, float]]] = field(default_factory=dict)  # run id -> last value's interval


def meaning_params(metric: str) -> tuple[str, ...]:
    """The parameters a metric's meaning depends on (its yardstick, or the training objective)."""
    if metric.startswith("eval/"):
        return () if metric.endswith("images_per_s") else YARDSTICK_PARAMS
    if metric in ("images_per_s", "latents_per_s", "step_time_s", "lr") or metric.startswith(("system/", "memory/")):
        return ()
    return OBJECTIVE_PARAMS


def incomparable_reason(records: Sequence[RunRecord], metric: str) -> str:
    """Why ``metric`` means different things across ``records`` ('' when it means the same)."""
    having = [r for r in records if metric in r.history]
    differing = [p for p in meaning_params(metric) if len({r.params.get(p) for r in having}) > 1]
    if not differing:
        return ""
    values = ", ".join(
        sorted({str(having[0].params.get(differing[0]))} | {str(r.params.get(differing[0])) for r in having})
    )
    return f"{differing[0]} differs ({values}): not the same quantity"


def summarize(records: Sequence[RunRecord], metrics: Sequence[str]) -> list[MetricSummary]:
    summaries = []
    for metric in metrics:
        if not any(metric in r.history for r in records):
            continue
        pick = max if higher_is_better(metric) else min
        last = {r.run_id: r.history[metric][-1][2] if metric in r.history else None for r in records}
        best = {r.run_id: pick(v for _, _, v in r.history[metric]) if metric in r.history else None for r in records}
        candidates = {k: v for k, v in last.items() if v is not None}
        interval = {r.run_id: r.last_interval(metric) for r in records}
        reason = incomparable_reason(records, metric) if len(candidates) > 1 else ""
        winner = pick(candidates, key=candidates.get) if len(candidates) > 1 and not reason else None
        if winner is not None and interval[winner] is not None:
            others = [interval[k] for k in candidates if k != winner]
            if None not in others and not intervals_apart(interval[winner], others):
                winner, reason = None, NO_DIFFERENCE
        summaries.append(MetricSummary(metric, last, best, winner, reason, interval))
    return summaries


def value_cell(value: Optional[float], interval: Optional[tuple[float, float]] = None, mark: str = "") -> str:
    """A value with its 95% interval when it has one: ``7.62 [6.1, 9.4] *``."""
    if value is None:
        return "-"
    bounds = f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval is not None else ""
    return f"{value:.4g}{bounds}{mark}"


def _short(value: Optional[str]) -> str:
    if value is None:
        return "-"
    return value if len(value) <= MAX_SHOWN_VALUE else value[: MAX_SHOWN_VALUE - 3] + "..."


def comparison_rows(
    records: Sequence[RunRecord], summaries: Sequence[MetricSummary]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run; differing params, then each metric's last value (the best marked *)
    and its best value over the run."""
    params = differing_params(records)
    header = ["run", *[f"param {p}" for p in params]]
    for summary in summaries:
        direction = "max" if higher_is_better(summary.metric) else "min"
        header += [f"{summary.metric} last", f"{summary.metric} {direction}"]
    lengths = any(r.best_ema_length for r in records)
    if lengths:
        header.append("best EMA sigma_rel (post-hoc sweep)")
    rows = []
    for record in records:
        row = [record.label, *[_short(record.params.get(p)) for p in params]]
        for summary in summaries:
            value, best = summary.last[record.run_id], summary.best[record.run_id]
            mark = " *" if summary.winner == record.run_id else ""
            row += [value_cell(value, summary.interval.get(record.run_id), mark), value_cell(best)]
        if lengths:
            row.append(record.best_ema_length or "-")
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series, log_x: bool = False) -> Path:
    """One overlay plot; ``series`` = [(label, xs, ys)] or [(label, xs, ys, intervals)] with a (low, high) or None
    per point, drawn as error bars: the axis then spans at least the intervals, so a difference inside the noise
    never looks like a cliff. Returns the PNG path."""
    fig, ax = new_axes()
    for label, xs, ys, *rest in series:
        marker = "o" if len(xs) < 30 else None
        bounds = rest[0] if rest else None
        if bounds and any(b is not None for b in bounds):
            errors = [
                [y - b[0] if b else 0 for y, b in zip(ys, bounds)],
                [b[1] - y if b else 0 for y, b in zip(ys, bounds)],
            ]
            ax.errorbar(xs, ys, yerr=errors, marker=marker, markersize=3, capsize=3, label=f"{label} (95% intervals)")
        else:
            ax.plot(xs, ys, marker=marker, markersize=3, label=label)
    return save_axes(fig, ax, path, title, xlabel, ylabel, log_x)


def write_plots(records: Sequence[RunRecord], out: Path) -> list[Path]:
    """loss vs step and vs wall-clock minutes, each quality metric vs step, images/s vs each quality metric."""
    plots = []
    with_loss = [r for r in records if "loss" in r.history]
    if with_loss:
        plots.append(
            _plot(
                out / "loss_vs_step.png",
                "Training loss",
                "optimizer step",
                "loss",
                [
                    (r.label, [s for s, _, _ in r.history["loss"]], [v for _, _, v in r.history["loss"]])
                    for r in with_loss
                ],
            )
        )
        plots.append(
            _plot(
                out / "loss_vs_time.png",
                "Training loss over wall-clock time",
                "minutes since the run started",
                "loss",
                [
                    (
                        r.label,
                        [(t - r.start_ms) / 60_000 for _, t, _ in r.history["loss"]],
                        [v for _, _, v in r.history["loss"]],
                    )
                    for r in with_loss
                ],
            )
        )
    for metric in QUALITY_METRICS:
        runs = [r for r in records if metric in r.history]
        if not runs:
            continue
        name = metric.replace("/", "_")
        direction = "higher" if higher_is_better(metric) else "lower"
        plots.append(
            _plot(
                out / f"{name}_vs_step.png",
                f"{metric} during training ({direction} is better)",
                "optimizer step",
                metric,
                [
                    (
                        r.label,
                        [s for s, _, _ in r.history[metric]],
                        [v for _, _, v in r.history[metric]],
                        [r.intervals.get(metric, {}).get(s) for s, _, _ in r.history[metric]],
                    )
                    for r in runs
                ],
            )
        )
        paired = [r for r in runs if SPEED_METRIC in r.history]
        if paired:
            plots.append(
                _plot(
                    out / f"images_per_s_vs_{name}.png",
                    f"Sampling speed vs {metric} (last evaluation)",
                    "images / s (sampling + decoding)",
                    metric,
                    [
                        (
                            r.label,
                            [r.history[SPEED_METRIC][-1][2]],
                            [r.history[metric][-1][2]],
                            [r.last_interval(metric)],
                        )
                        for r in paired
                    ],
                    log_x=True,
                )
            )
    return plots


@dataclass(frozen=True)
class Comparison:
    table: str
    params: list[str]
    plots: list[Path]
    files: list[Path]
    run_id: Optional[str]


def compare(
    records: Sequence[RunRecord],
    out: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    log_to: Optional[str] = None,
    experiment: str = COMPARE_EXPERIMENT,
    sections: Sequence[str] = (),
) -> Comparison:
    """Write the table (markdown, CSV), further markdown ``sections`` (the runs' logged checkpoints) and plots under
    ``out``; log them as a comparison run at ``log_to``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(records, metrics)
    header, rows = comparison_rows(records, summaries)
    notes = [f"- {s.metric}: no best run marked: {s.not_comparable}" for s in summaries if s.not_comparable]
    table = markdown(header, rows) + (
        "\n\n* best last value among runs where the metric means the same and the 95% intervals (in brackets) are "
        "apart\n" + "\n".join(notes)
        if notes
        else ""
    )
    table += "".join(f"\n\n{section}" for section in sections if section)
    files = [out / "comparison.md", out / "comparison.csv"]
    for path, text in zip(files, (table + "\n", csv_text(header, rows))):
        with local_atomic_writer(path) as handle:
            handle.write(text.encode())
    plots = write_plots(records, out)
    run_id = _log_comparison(records, [*files, *plots], log_to, experiment) if log_to else None
    return Comparison(table, differing_params(records), plots, files, run_id)


def _log_comparison(records: Sequence[RunRecord], files: Sequence[Path], uri: str, experiment: str) -> str:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        # A sqlite store keeps its artifacts beside it (as the trainer's store does), not in ./mlruns of
        # whatever directory the command ran in; a server uses its own artifact root.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(
        experiment_id,
        run_name="compare " + " vs ".join(r.name for r in records)[:200],
        tags={"far_scale.compared_runs": ",".join(r.run_id for r in records)},
    )
    for path in files:
        client.log_artifact(run.info.run_id, str(path), "comparison")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
