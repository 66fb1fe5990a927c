"""The one experiment runner behind the quality benchmarks: train a recipe, sweep sampling settings, score with
intervals.

Every quality study (``quality_speed``, ``posthoc_ema``, ``shortcut_targets``, ``sampling_speed --pareto``,
``scaling_study``) is a few lines on top of it:

1. ``Workspace.prepare``: the data (the built-in digits by default, or synthetic shapes), the offline PCA codec,
   the shards and the offline benchmark (classifier + autoencoder feature spaces, negative controls, verdict),
   each reused when present in the work directory.
2. ``train``: ``far-scale train RECIPE`` with the study's budget and overrides, as its own process (the real
   trainer, 1 rank); a finished run is reused.
3. ``score``: a class-balanced image set per sampling seed, timed and scored; every metric the mean over the
   seeds with a 95% t-interval across them (``far_scale.eval.metrics.repeat_interval``).
4. ``tune`` / ``evaluate_tuned``: the CFG-matched protocol: a sweep over CFG scale, CFG schedule and temperature
   on a selection seed (best per-class Fréchet distance), then held-out seeds at that setting, so that no setting
   wins or loses by its guidance strength or temperature.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks.report import REPO_ROOT, interval_cell

SELECT_SEED = 0
"""The tuning sweep's images; the reported repeats use seeds 1..n (no selection on them)."""
METRICS = ("images_per_s", "accuracy", "fd", "class_fd", "ae_fd", "ae_class_fd", "precision", "recall")
"""What ``score`` reports (the offline benchmark's metrics in both feature spaces, and speed)."""
SHARES = ("accuracy", "precision", "recall")
"""Metrics in [0, 1] (their intervals are clipped there)."""
# data -> (recipe data tag, image size, token size in px, images per shard)
DATASETS = {
    "digits": ("digits32", 32, 8, 250),
    "synth": ("synth64", 64, 8, 100),
    "synth-shape": ("synth64", 64, 8, 100),
}
# Synthetic images per class by default. Shapes in random colours need more than class colours: at 100 per class
# the benchmark's detail-free control kept accuracy 0.453 against an allowed 0.450 (INVALID); at 300 its
# classifier reached 0.969 on held-out images and the control 0.533 against an allowed 0.535 (VALID, narrowly).
IMAGES_PER_CLASS = {"synth": 100, "synth-shape": 300}
DATA_LABELS = {
    "digits": "real digits (32 px)",
    "synth": "synthetic shapes, class colours (benchmark INVALID by its verdict)",
    "synth-shape": "synthetic shapes, random colours",
}


def data_label(result: dict) -> str:
    """What a stored result was measured on (results from before ``--data`` existed are synthetic)."""
    return DATA_LABELS[result.get("data", "synth")]


def recipe_for(arch: str, data: str) -> str:
    """The tiny recipe of ``arch`` (far, mar, far_causal) on ``data``."""
    return f"recipes/{arch}_tiny_{DATASETS[data][0]}.yaml"


@dataclass(frozen=True)
class Workspace:
    """A work directory's data, shards and offline benchmark."""

    work: Path
    data: str
    images: Path
    shards: Path
    bench_path: Path
    bench: object  # OfflineBenchmark

    @classmethod
    def prepare(cls, work: str | Path, data: str = "digits", images_per_class: Optional[int] = None) -> "Workspace":
        """Everything under ``work``, each part reused when present."""
        from data_prep.digits import write_digits
        from data_prep.pca_latents import encode_with_pca
        from data_prep.synth import SynthSpec, write_dataset
        from far_scale.eval.offline import BenchmarkSettings, build_benchmark

        work = Path(work).resolve()
        _, size, token_px, per_shard = DATASETS[data]
        images, shards = work / "images", work / "shards"
        if not (shards / "manifest.json").is_file():
            if data == "digits":
                write_digits(images, progress=False)
            else:
                colors = "random" if data == "synth-shape" else "class"
                per_class = images_per_class or IMAGES_PER_CLASS[data]
                write_dataset(images, SynthSpec(10, per_class, size, seed=0, colors=colors), progress=False)
            encode_with_pca(
                images, work, size, token_px, 16, images_per_shard=per_shard, max_images=512, max_patches=200_000
            )
        bench_path, bench, _ = build_benchmark(
            str(images), work / "cache", str(shards), BenchmarkSettings.for_folder(images)
        )
        print(bench.verdict.line(), flush=True)
        return cls(work, data, images, shards, bench_path, bench)


@dataclass(frozen=True)
class Budget:
    """How every model of a study is trained (the same for all of them)."""

    steps: int
    eval_interval: int
    num_images: int
    threads: int = 1
    retrain: bool = False
    overrides: tuple[str, ...] = ()
    """Recipe overrides for every training of the study (e.g. a custom size)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Budget":
        return cls(args.steps, args.eval_interval, args.num_images, args.threads, args.retrain, tuple(args.override))


@dataclass(frozen=True)
class TrainedRun:
    name: str
    run_dir: Path
    seconds: float
    """Time in training steps (start-up and evaluations excluded)."""


def train(ws: Workspace, recipe: str, name: str, budget: Budget, extra: Sequence[str] = ()) -> TrainedRun:
    """``far-scale train recipe`` as run ``name`` under ``ws.work/runs`` with the budget, ``extra`` and the
    budget's overrides (a finished run is reused unless ``budget.retrain``)."""
    run_dir = ws.work / "runs" / name
    overrides = [
        f"data.url={ws.shards}",
        f"run.output_dir={ws.work / 'runs'}",
        f"run.name={name}",
        f"run.max_steps={budget.steps}",
        f"eval.interval_steps={budget.eval_interval}",
        f"eval.num_images={budget.num_images}",
        "eval.batch_size=50",
        f"eval.benchmark={ws.bench_path}",
        f"checkpoint.interval_steps={budget.steps}",
        "run.log_interval=50",
        *extra,
        *budget.overrides,
    ]
    if budget.retrain or not _finished(run_dir, budget.steps):
        env = {**os.environ, "OMP_NUM_THREADS": str(budget.threads)}
        subprocess.run(
            [sys.executable, "-m", "far_scale.cli", "train", recipe, *overrides], check=True, cwd=REPO_ROOT, env=env
        )
    # The trainer's per-step record: step time without start-up and evaluation.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return TrainedRun(name, run_dir, sum(json.loads(line)["step_time_s"] for line in lines))


def _finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest.json"
    return latest.is_file() and json.loads(latest.read_text())["step"] >= steps


def learning_curve(run_dir: Path) -> list[dict]:
    """The quality the trainer measured at each evaluation (MLflow metrics of the run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("far-scale").experiment_id])[0]
    points = {}
    for name in ("accuracy", "fd", "ae_fd"):
        for metric in client.get_metric_history(run.info.run_id, f"eval/{name}"):
            points.setdefault(metric.step, {"step": metric.step})[name] = metric.value
    return [points[s] for s in sorted(points)]


def mean_interval(values: Sequence[float], low: float = 0.0, high: float = float("inf")) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t-interval of the mean over sampling seeds, clipped to the metric's range; one seed
    has no interval (NaN bounds)."""
    from far_scale.eval.metrics import repeat_interval

    if len(values) < 2:
        return float(values[0]), float("nan"), float("nan")
    return repeat_interval(list(values), low, high)


def load_generator(run_dir: Path, device: torch.device = torch.device("cpu")):
    """The run's latest checkpoint (EMA weights) as an ``ImageGenerator`` with the recipe's sampling settings."""
    from far_scale.eval.sample_job import build_generator, load_sampling_model

    return build_generator(load_sampling_model(run_dir, device=device), device)


@contextmanager
def point_estimates(bench):
    """Score without the benchmark's bootstrap intervals (where the intervals come from repeated seeds)."""
    saved, bench.resamples = bench.resamples, 0
    try:
        yield bench
    finally:
        bench.resamples = saved


def score(generator, bench, options, seeds: Sequence[int], num_images: int, batch: int) -> dict:
    """``num_images`` class-balanced images per seed at ``options`` (``SamplingOptions``), timed and scored: each
    of ``METRICS`` as the mean over the seeds with its 95% t-interval (``*_lo``, ``*_hi``); with one seed, the
    benchmark's bootstrap interval over the images (none for images/s)."""
    from far_scale.eval.sweep import score_generator

    seeds = list(seeds)
    sampler = generator.with_options(options)
    if len(seeds) == 1:
        metrics = score_generator(sampler, bench, num_images, batch, seeds[0])
        return {
            "seeds": 1,
            **{k: v for k, v in metrics.items() if k.removesuffix("_lo").removesuffix("_hi") in METRICS},
        }
    with point_estimates(bench):
        per_seed = [score_generator(sampler, bench, num_images, batch, seed) for seed in seeds]
    row: dict = {"seeds": len(per_seed), "images": len(per_seed) * num_images}
    for name in METRICS:
        if name in per_seed[0]:
            ceiling = 1.0 if name in SHARES else float("inf")
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval([m[name] for m in per_seed], 0.0, ceiling)
    widen_shares(row)
    return row


def widen_shares(row: dict) -> dict:
    """A share's interval (accuracy, precision, recall) is at least the Wilson interval over the row's pooled images:
    a t-interval over a few seeds collapses to a point where every seed scores 1.0, and nothing could be "within"
    it."""
    from far_scale.eval.metrics import share_interval

    for name in SHARES:
        if name in row:
            low, high = share_interval(row[name], row["images"])
            row[f"{name}_lo"], row[f"{name}_hi"] = min(row[f"{name}_lo"], low), max(row[f"{name}_hi"], high)
    return row


def time_images(generator, options, seeds: Sequence[int], num_images: int, batch: int) -> dict:
    """images/s of sampling and decoding ``num_images`` class-balanced images at ``options``, once per seed (after
    one warm-up batch), as the mean with its 95% t-interval. For speed measured apart from the quality sweeps,
    one setting at a time with nothing else running in this process."""
    from far_scale.eval.image_generator import SamplingJob

    sampler = generator.with_options(options)
    rates = []
    for seed in seeds:
        job = SamplingJob(num_images, generator.model.num_classes, batch, seed)
        sampler.images(job, job.indices(0)[:1])  # warm-up (allocator, kernels), not timed
        seconds = sum(sampler.timed_images(job, job.indices(b))[1] for b in range(job.num_batches))
        rates.append(num_images / seconds)
    mean, low, high = mean_interval(rates)
    return {"images_per_s": mean, "images_per_s_lo": low, "images_per_s_hi": high}


@dataclass(frozen=True)
class Tuning:
    """The selection sweep of the CFG-matched protocol."""

    cfgs: tuple[float, ...] = (1.5, 2.5, 4.0, 6.0, 9.0)
    schedules: tuple[str, ...] = ("linear", "constant")
    temperatures: tuple[float, ...] = (1.0,)
    select_images: int = 100

    def grid(self) -> list[dict]:
        return [
            {"cfg": cfg, "cfg_schedule": schedule, "temperature": temperature}
            for cfg, schedule, temperature in itertools.product(self.cfgs, self.schedules, self.temperatures)
        ]

    def as_dict(self) -> dict:
        return {
            "cfgs": list(self.cfgs),
            "schedules": list(self.schedules),
            "temperatures": list(self.temperatures),
            "select_images": self.select_images,
        }


def at(options, point: dict):
    """``options`` at a tuning point (CFG scale, schedule, temperature)."""
    return replace(
        options, cfg_scale=point["cfg"], cfg_schedule=point["cfg_schedule"], temperature=point["temperature"]
    )


POINT_KEYS = ("cfg", "cfg_schedule", "temperature")
"""What names a point of the tuning sweep."""


def _point(row: dict) -> tuple:
    return tuple(row[k] for k in POINT_KEYS)


SELECTION_METRICS = ("class_fd", "ae_class_fd")
"""What the tuning sweep judges a point by: per-class Fréchet distance in both feature spaces (it penalises wrong
classes and lost diversity alike; one space alone picks what its blind spots favour: the classifier's FD favoured
temperatures that thin out diversity the autoencoder sees)."""


def _selection_score(point: dict, sweep: Sequence[dict]) -> float:
    """The point's per-class FD in each space relative to the sweep's best in that space, summed (1 + 1 = 2 for a
    point best in both)."""
    return sum(point[m] / min(p[m] for p in sweep) for m in SELECTION_METRICS if m in point)


def tune(generator, bench, options, tuning: Tuning, batch: int, known: Sequence[dict] = ()) -> tuple[dict, list[dict]]:
    """(best point, the sweep): every point of ``tuning``'s grid on the selection seed, the best by
    ``_selection_score`` over ``SELECTION_METRICS``. ``known``: points scored before on the same selection images (a
    sweep that is extended); they are kept, not scored again, where they hold every selection metric."""
    from far_scale.eval.sweep import score_generator

    done = {_point(p): p for p in known if all(m in p for m in SELECTION_METRICS)}
    with point_estimates(bench):  # intervals come from the held-out seeds
        scored = []
        for point in tuning.grid():
            if _point(point) in done:
                scored.append(done[_point(point)])
                continue
            metrics = score_generator(
                generator.with_options(at(options, point)), bench, tuning.select_images, batch, SELECT_SEED
            )
            scored.append({**point, **{m: metrics[m] for m in SELECTION_METRICS if m in metrics}})
    sweep = scored + [p for p in done.values() if p not in scored]
    best = min(sweep, key=lambda p: _selection_score(p, sweep))
    return {k: best[k] for k in POINT_KEYS}, sweep


def covers(row: dict, tuning: Tuning) -> bool:
    """Whether a row's sweep already holds every point of ``tuning``'s grid, scored in every selection metric."""
    swept = {_point(p) for p in row.get("sweep", ()) if all(m in p for m in SELECTION_METRICS)}
    return {_point(p) for p in tuning.grid()} <= swept


def evaluate_tuned(
    generator, bench, options, tuning: Tuning, seeds: int, num_images: int, batch: int, previous: Optional[dict] = None
) -> dict:
    """The CFG-matched protocol for one setting: ``tune`` on the selection seed, then seeds 1..``seeds`` at the
    best point (``score``). The row holds the point, the sweep and every metric with its interval. ``previous``: the
    row of a smaller sweep of the same setting (same selection images, seeds and images): its points are not
    scored again, and where the best point stays, neither are the held-out seeds."""
    best, sweep = tune(generator, bench, options, tuning, batch, previous["sweep"] if previous else ())
    if previous is not None and _point(previous) == _point(best):
        row = {k: v for k, v in previous.items() if k not in ("sweep", *POINT_KEYS)}
    else:
        row = score(generator, bench, at(options, best), range(1, seeds + 1), num_images, batch)
    return {**best, **row, "sweep": sweep}


def within(row: dict, reference: dict, metrics: Sequence[str] = ("class_fd", "ae_class_fd")) -> bool:
    """Quality within the reference's 95% interval or better in every feature space: class accuracy at least its
    lower bound and each Fréchet distance of ``metrics`` at most its upper bound (seed means)."""
    return row["accuracy"] >= reference["accuracy_lo"] and all(
        row[metric] <= reference[f"{metric}_hi"] for metric in metrics if f"{metric}_hi" in reference
    )


def quality_cells(row: dict) -> list[str]:
    """A row's quality as table cells: accuracy, per-class FD in both spaces, FD (each with its interval)."""
    return [
        interval_cell(row, "accuracy", 3),
        interval_cell(row, "class_fd", 1),
        interval_cell(row, "ae_class_fd", 0) if "ae_class_fd" in row else "-",
        interval_cell(row, "fd", 2),
    ]


QUALITY_HEADER = ["class accuracy", "per-class FD (classifier)", "per-class FD (autoencoder)", "FD"]


def add_training_arguments(parser: argparse.ArgumentParser, *, work: str, steps: int, eval_interval: int) -> None:
    """Work directory, training budget, data and output options shared by the training benchmarks."""
    parser.add_argument("--work", default=work, help="data, runs and cache (reused when present)")
    parser.add_argument("--steps", type=int, default=steps, help="training steps of each model")
    parser.add_argument("--eval-interval", type=int, default=eval_interval)
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=None,
        help=f"synthetic data only (default {', '.join(f'{k}: {v}' for k, v in IMAGES_PER_CLASS.items())})",
    )
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--num-images", type=int, default=200, help="images per point (and per evaluation)")
    parser.add_argument("--batch", type=int, default=100, help="sampling batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="print only; write nothing into docs/ or results/")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every training (repeatable), e.g. model.size=custom model.width=192",
    )
