"""``far-scale eval sweep``: quality and speed over sampling settings, one MLflow child run per point.

Each point (K, head steps, CFG scale) samples the same class-balanced image set with the EMA weights,
times it (images/s of sampling and decoding) and scores it (the offline benchmark, or FID/IS). Points
are logged as child runs of the evaluated training run (``mlflow.parentRunId``) with their settings as
params; a re-run finds the points already logged and skips them. Plots: quality vs CFG per K and head
steps (the shape of the FAR paper's Figure 5) and quality vs images/s with the Pareto front marked.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from far_scale.eval.evaluation import SPEED, evaluate_on_ranks
from far_scale.eval.image_generator import ImageGenerator, SamplingJob
from far_scale.eval.scoring import Scorer
from far_scale.posthoc_ema import POSTHOC_DIR, list_snapshots, reconstruct
from far_scale.tracking.compare import higher_is_better
from far_scale.tracking.plots import new_axes, save_axes

POINT_TAG = "far_scale.sweep_point"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class SweepPoint:
    num_iter: int
    head_steps: int
    cfg_scale: float
    ema_sigma_rel: Optional[float] = None
    """The EMA length (post-hoc reconstruction from the run's snapshots); None: the checkpoint's own EMA."""

    @property
    def key(self) -> str:
        key = f"K{self.num_iter}-steps{self.head_steps}-cfg{self.cfg_scale:g}"
        return key if self.ema_sigma_rel is None else f"{key}-ema{self.ema_sigma_rel:g}"


def sweep_points(
    num_iter: Sequence[int],
    head_steps: Sequence[int],
    cfg_scale: Sequence[float],
    ema_sigma_rel: Sequence[Optional[float]] = (None,),
) -> list[SweepPoint]:
    return [SweepPoint(k, o, w, e) for k, o, w, e in itertools.product(num_iter, head_steps, cfg_scale, ema_sigma_rel)]


class PosthocWeights:
    """The weights a point samples with: the checkpoint's EMA, or an EMA length reconstructed from the run's
    post-hoc snapshots up to the checkpoint's step (each once)."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.own = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        self.residuals: dict[float, float] = {}
        self._current: Optional[float] = None

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.loaded.weights).parent.parent / POSTHOC_DIR  # <run>/checkpoints/<step>/ema.safetensors

    def use(self, sigma_rel: Optional[float]) -> Optional[float]:
        """Load the weights of ``sigma_rel`` into the model; returns the reconstruction's residual (or None)."""
        if sigma_rel == self._current:
            return self.residuals.get(sigma_rel)
        if sigma_rel is None:
            self.loaded.model.load_state_dict(self.own)
        else:
            snapshots = list_snapshots(self.snapshot_dir, self.loaded.meta.step)
            if not snapshots:
                raise ValueError(
                    f"--ema-sigma-rel needs post-hoc EMA snapshots in {self.snapshot_dir} (train with "
                    "ema.posthoc.enabled=true; export folders carry none: sweep the run directory)"
                )
            result = reconstruct(snapshots, sigma_rel, self.loaded.meta.step)
            self.loaded.model.load_state_dict(result.state)
            self.residuals[sigma_rel] = result.residual
        self._current = sigma_rel
        return self.residuals.get(sigma_rel)


def evaluate_point(
    loaded,
    point: SweepPoint,
    scorer: Scorer,
    num_images: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Sample ``num_images`` class-balanced images at ``point``; their scores and images/s (sampling + decoding)."""
    from far_scale.eval.sample_job import build_generator

    ev = loaded.cfg.eval.model_copy(
        update={"num_iter": point.num_iter, "head_steps": point.head_steps, "cfg_scale": point.cfg_scale}
    )
    return score_generator(build_generator(loaded, device, precision, ev), scorer, num_images, batch_size, seed)


def score_generator(
    generator: ImageGenerator, scorer: Scorer, num_images: int, batch_size: int, seed: int
) -> dict[str, float]:
    """Scores of ``num_images`` class-balanced images from ``generator`` and their images/s (one rank)."""
    job = SamplingJob(num_images, generator.model.num_classes, batch_size, seed)
    generator.images(job, job.indices(0)[:1])  # warm-up (allocator, kernels), not timed
    return evaluate_on_ranks(generator, job, scorer).metrics


def pareto_front(rows: Sequence[dict], metric: str) -> list[dict]:
    """Points no other point beats on both ``metric`` and images/s."""
    sign = 1 if higher_is_better(metric) else -1
    front = []
    for row in rows:
        dominated = any(
            other is not row
            and sign * other[metric] >= sign * row[metric]
            and other[SPEED] >= row[SPEED]
            and (sign * other[metric] > sign * row[metric] or other[SPEED] > row[SPEED])
            for other in rows
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r[SPEED])


def plot_ema_lengths(rows: Sequence[dict], metric: str, out: Path, title: str) -> Path:
    """Quality vs the EMA's relative width, one line per sampling setting (post-hoc EMA)."""
    fig, ax = new_axes()
    for k, o, w in sorted({(r["num_iter"], r["head_steps"], r["cfg_scale"]) for r in rows}):
        line = sorted(
            (r["ema_sigma_rel"], r[metric])
            for r in rows
            if (r["num_iter"], r["head_steps"], r["cfg_scale"]) == (k, o, w)
        )
        ax.plot([s for s, _ in line], [v for _, v in line], marker="o", label=f"K={k}, steps={o}, CFG {w:g}")
    ylabel = f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)"
    return save_axes(
        fig,
        ax,
        out / f"sweep_{metric}_vs_ema_sigma_rel.png",
        f"{title}: {metric} vs EMA length (post-hoc)",
        "EMA relative width sigma_rel (log scale)",
        ylabel,
        log_x=True,
    )


def plot_sweep(rows: Sequence[dict], metric: str, out: Path, title: str) -> list[Path]:
    """Quality vs CFG, one line per (K, head steps); quality vs images/s with the Pareto front."""
    ylabel = f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)"
    fig, ax = new_axes()
    for k, o in sorted({(r["num_iter"], r["head_steps"]) for r in rows}):
        line = sorted((r["cfg_scale"], r[metric]) for r in rows if (r["num_iter"], r["head_steps"]) == (k, o))
        ax.plot([c for c, _ in line], [v for _, v in line], marker="o", label=f"K={k}, steps={o}")
    cfg_path = save_axes(
        fig, ax, out / f"sweep_{metric}_vs_cfg.png", f"{title}: {metric} vs CFG (cf. FAR Fig. 5)", "CFG scale", ylabel
    )
    fig, ax = new_axes()
    ax.scatter([r[SPEED] for r in rows], [r[metric] for r in rows], color="tab:blue", label="sweep points")
    for r in rows:
        ax.annotate(
            f"K{r['num_iter']}/{r['head_steps']}/w{r['cfg_scale']:g}",
            (r[SPEED], r[metric]),
            fontsize=6,
            xytext=(2, 2),
            textcoords="offset points",
        )
    front = pareto_front(rows, metric)
    ax.plot([r[SPEED] for r in front], [r[metric] for r in front], color="tab:red", marker="o", label="Pareto front")
    speed_path = save_axes(
        fig,
        ax,
        out / f"sweep_{metric}_vs_speed.png",
        f"{title}: quality vs speed",
        "images / s (sampling + decoding, log scale)",
        ylabel,
        log_x=True,
    )
    return [cfg_path, speed_path]


@dataclass(frozen=True)
class SweepResult:
    rows: list[dict]
    created: int
    reused: int
    plots: list[Path]


def run_sweep(
    source: str,
    points: Sequence[SweepPoint],
    scorer: Scorer,
    out: str | Path,
    *,
    num_images: int,
    batch_size: int,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    tracking_uri: Optional[str] = None,
    primary_metric: Optional[str] = None,
) -> SweepResult:
    """Evaluate every point not yet logged under the training run; log each as a child run; plot all."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from far_scale.eval.sample_job import load_sampling_model

    torch_device = torch.device(device)
    loaded = load_sampling_model(source, device=torch_device)
    parent_id = loaded.meta.mlflow_run_id
    uri = tracking_uri or loaded.cfg.tracking.uri or _run_store(Path(source))
    if not parent_id or not uri:
        raise ValueError(
            f"{source} names no MLflow run to attach the sweep to (meta.json has no mlflow_run_id, or "
            "its store is unknown): pass --tracking-uri"
        )
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    existing = {
        run.data.tags[POINT_TAG]: run
        for run in client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
        if POINT_TAG in run.data.tags
    }
    weights = PosthocWeights(loaded)
    rows, created = [], 0
    for point in points:
        if point.key in existing:
            metrics = dict(existing[point.key].data.metrics)
            print(f"{point.key}: already logged (run {existing[point.key].info.run_id[:8]}), skipped", flush=True)
        else:
            residual = weights.use(point.ema_sigma_rel)
            metrics = evaluate_point(loaded, point, scorer, num_images, batch_size, seed, torch_device, precision)
            if residual is not None:
                metrics["ema_residual"] = residual
            child = client.create_run(
                parent.info.experiment_id, run_name=point.key, tags={PARENT_TAG: parent_id, POINT_TAG: point.key}
            )
            params = {
                **asdict(point),
                "num_images": num_images,
                "seed": seed,
                "precision": precision,
                "arch": loaded.cfg.model.arch,
                "weights_step": loaded.meta.step,
            }
            client.log_batch(
                child.info.run_id,
                params=[Param(k, str(v)) for k, v in params.items()],
                metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
            )
            client.set_terminated(child.info.run_id)
            created += 1
            print(f"{point.key}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        rows.append({**asdict(point), **metrics})
    metric = primary_metric or next(m for m in ("fid", "fd", "accuracy") if m in rows[0])
    title = f"{loaded.cfg.model.arch} step {loaded.meta.step}"
    plots = plot_sweep([r for r in rows if r["ema_sigma_rel"] is None] or rows, metric, Path(out), title)
    if any(r["ema_sigma_rel"] is not None for r in rows):
        plots.append(plot_ema_lengths([r for r in rows if r["ema_sigma_rel"] is not None], metric, Path(out), title))
    for path in plots:
        client.log_artifact(parent_id, str(path), "sweep")
    return SweepResult(rows, created, len(points) - created, plots)


def _run_store(source: Path) -> Optional[str]:
    """The embedded store of the run a checkpoint or export directory belongs to, if it is on this disk."""
    for directory in (source, *source.parents):
        if (directory / "mlflow.db").is_file():
            return f"sqlite:///{(directory / 'mlflow.db').resolve()}"
    return None
