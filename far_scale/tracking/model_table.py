"""The logged checkpoints of compared runs, as ``far-scale compare`` shows them and ``export --best`` picks from.

Every checkpoint is an MLflow logged model (``logged_models``) with the evaluation metrics measured on it. The table
lists them across the runs (step, metric with its 95% interval, where the weights are) and marks the best by one
metric under ``compare``'s rules: only among runs where the metric means the same (the same yardstick), and only
where the best one's interval is apart from every other's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from far_scale.errors import ActionableError
from far_scale.tracking.compare import (
    INTERVAL_SUFFIXES,
    NO_DIFFERENCE,
    RunRecord,
    _client,
    higher_is_better,
    incomparable_reason,
    intervals_apart,
    markdown,
    value_cell,
)
from far_scale.tracking.logged_models import CheckpointModel, checkpoint_models

PREFERRED_METRICS = ("eval/fid", "eval/fd", "eval/accuracy")
"""``--best-by``'s default: the first of these the checkpoints carry."""


def interval_of(model: CheckpointModel, metric: str) -> Optional[tuple[float, float]]:
    low, high = (model.metrics.get(f"{metric}{suffix}") for suffix in INTERVAL_SUFFIXES)
    return None if low is None or high is None else (low, high)


def logged_checkpoints(records: Sequence[RunRecord], order_by: Optional[str] = None) -> list[CheckpointModel]:
    """The logged checkpoints of ``records``' runs (each store asked once)."""
    by_uri: dict[str, dict[str, str]] = defaultdict(dict)
    for record in records:
        by_uri[record.uri][record.run_id] = record.name
    models = []
    for uri, runs in by_uri.items():
        client = _client(uri)
        experiments = sorted({client.get_run(run_id).info.experiment_id for run_id in runs})
        models += checkpoint_models(client, experiments, runs, order_by)
    return models


@dataclass(frozen=True)
class BestCheckpoint:
    model: Optional[CheckpointModel]
    reason: str = ""
    """Why none is marked (the metric means different things, or the best one's interval overlaps another's)."""


def best_checkpoint(models: Sequence[CheckpointModel], records: Sequence[RunRecord], metric: str) -> BestCheckpoint:
    scored = [m for m in models if metric in m.metrics]
    if not scored:
        return BestCheckpoint(None, f"no checkpoint carries {metric}")
    runs = [r for r in records if r.run_id in {m.run_id for m in scored}]
    reason = incomparable_reason([_as_having(r, metric) for r in runs], metric) if len(runs) > 1 else ""
    if reason:
        return BestCheckpoint(None, reason)
    pick = max if higher_is_better(metric) else min
    best = pick(scored, key=lambda m: m.metrics[metric])
    own, others = interval_of(best, metric), [interval_of(m, metric) for m in scored if m is not best]
    if own is not None and others and None not in others and not intervals_apart(own, others):
        return BestCheckpoint(None, NO_DIFFERENCE)
    return BestCheckpoint(best)


def _as_having(record: RunRecord, metric: str) -> RunRecord:
    """``record`` counted as having ``metric`` (checkpoints carry it even where the run's history was not read)."""
    if metric in record.history:
        return record
    return RunRecord(record.name, record.run_id, record.uri, record.params, record.start_ms, {metric: [(0, 0, 0.0)]})


def default_metric(models: Sequence[CheckpointModel]) -> Optional[str]:
    return next((m for m in PREFERRED_METRICS if any(m in c.metrics for c in models)), None)


def checkpoints_section(records: Sequence[RunRecord], metric: Optional[str]) -> str:
    """The markdown section of ``comparison.md``: every logged checkpoint of the runs, the best by ``metric``."""
    models = logged_checkpoints(records)
    if not models:
        return ""
    metric = metric or default_metric(models)
    shown = [m for m in (metric, *PREFERRED_METRICS) if m and any(m in c.metrics for c in models)]
    shown = list(dict.fromkeys(shown))
    best = best_checkpoint(models, records, metric) if metric else BestCheckpoint(None, "no evaluation metric")
    header = ["run", "step", *shown, "weights"]
    rows = [
        [
            model.run_name,
            str(model.step),
            *[
                value_cell(
                    model.metrics.get(m), interval_of(model, m), " *" if best.model is model and m == metric else ""
                )
                for m in shown
            ],
            ("pruned: " if model.pruned else "") + model.location,
        ]
        for model in models
    ]
    note = (
        f"* best by {metric} among checkpoints where it means the same and the 95% intervals are apart"
        if best.model is not None
        else f"no best checkpoint marked by {metric}: {best.reason}"
    )
    return "\n".join(["## Logged checkpoints (MLflow models)", "", markdown(header, rows), "", note])


class BestCheckpointError(ActionableError, ValueError):
    """No logged checkpoint of a run can be exported by the metric asked for; says why."""


def best_logged_checkpoint(run_dir: str | Path, metric: str, tracking_uri: Optional[str] = None) -> CheckpointModel:
    """The best checkpoint of the run in ``run_dir`` by ``metric`` among those still on disk (a pruned best one is
    named and skipped), with its location resolved to a local checkpoint folder."""
    from far_scale.artifacts import CONFIG_FILE, RunMeta, resolve_checkpoint
    from far_scale.config.loader import load_config
    from far_scale.tracking.mlflow_tracker import default_tracking_uri

    run_dir = Path(run_dir)
    ref = resolve_checkpoint(run_dir)
    run_id = RunMeta.read(ref.path / "meta.json").mlflow_run_id
    cfg = load_config(ref.path / CONFIG_FILE)
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(run_dir)
    client = _client(uri)
    run = client.get_run(run_id)
    models = checkpoint_models(client, [run.info.experiment_id], {run_id: run.info.run_name}, order_by=metric)
    scored = [m for m in models if metric in m.metrics]
    if not scored:
        raise BestCheckpointError(f"no logged checkpoint of {run_dir} (MLflow run {run_id} at {uri}) carries {metric}")
    for model in scored:
        local = _local_folder(model, run_dir)
        if not model.pruned and local is not None:
            if model is not scored[0]:
                print(f"note: the best by {metric} (step {scored[0].step}) was pruned; exporting step {model.step}")
            return CheckpointModel(**{**model.__dict__, "location": str(local)})
    raise BestCheckpointError(
        f"every checkpoint of {run_dir} that carries {metric} was pruned (checkpoint.keep_last): none to export"
    )


def _local_folder(model: CheckpointModel, run_dir: Path) -> Optional[Path]:
    """The checkpoint's folder on this machine: its location, or (for an object store) the run's staging copy."""
    from far_scale.artifacts import META_FILE, tag_for

    for folder in (Path(model.location), run_dir / "checkpoints" / tag_for(model.step)):
        if "://" not in str(folder) and (folder / META_FILE).is_file():
            return folder
    return None
