"""``far-scale sample``: a class-balanced image set from an export or a run directory, split over ranks, resumable.

Writes ``OUT/samples.npz`` (ADM layout: ``arr_0`` uint8 NHWC images, ``arr_1`` labels), a PNG grid
and ``report.json`` (images/s without start-up, seconds per image at batch 1). Each batch is stored
under ``OUT/parts/`` when complete, so a re-run after a kill samples only the missing batches and
assembles the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

from far_scale.artifacts import META_FILE, RunMeta, codec_weights_path, open_weights
from far_scale.codecs import load_manifest_codec
from far_scale.codecs.base import sha256_file
from far_scale.config.loader import ConfigError, config_from_yaml
from far_scale.config.schema import EvalConfig
from far_scale.data.normalization import LatentNormalization
from far_scale.data.spec import DataSpec
from far_scale.data.storage import write_atomic
from far_scale.distributed.runtime import DistEnv, all_gather_objects, barrier, init_distributed
from far_scale.eval.grid import save_grid
from far_scale.eval.image_generator import ImageGenerator, SamplingJob, iter_rank_batches, sampling_options
from far_scale.eval.image_sets import IMAGES_KEY, LABELS_KEY, load_npz_images, save_npz
from far_scale.models.compile import compile_for_sampling
from far_scale.models.model import ARModel
from far_scale.planning.builder import build_model, resolve_dims
from far_scale.planning.checks import check_config

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
REPORT_FILE = "report.json"
SETTINGS_FILE = "settings.json"
PARTS_DIR = "parts"
REGISTRY_CACHE = "registered-model"  # a models:/ source's download, under OUT
EVAL_PREFIX = "eval."


@dataclass(frozen=True)
class SampleRequest:
    source: str
    """An export directory (``far-scale export``) or a run / checkpoints / step directory."""
    out: str
    num_images: int = 100
    batch_size: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    raw_weights: bool = False
    grid_images: int = 100
    latency: bool = True
    overrides: tuple[str, ...] = ()
    """Dotted ``eval.*`` overrides of the run's recipe, e.g. ``eval.num_iter=16 eval.backbone_refresh_every=4``:
    the only way sampling settings come in (``far-scale sample --num-iter 16`` is a shorthand for the first)."""
    tracking_uri: Optional[str] = None
    """Where a ``models:/NAME/VERSION`` source is registered (default: ``MLFLOW_TRACKING_URI``)."""


@dataclass(frozen=True)
class LoadedModel:
    model: ARModel
    meta: RunMeta
    cfg: object
    weights: Path


def is_registry_uri(source) -> bool:
    """A ``models:/NAME/VERSION`` source (``far_scale.tracking.registry``)."""
    return str(source).startswith("models:/")


def load_sampling_model(
    source: str | Path, raw_weights: bool = False, device: torch.device | str = "cpu", overrides: tuple[str, ...] = ()
) -> LoadedModel:
    """EMA (or raw) weights, config and data info of an export directory or of a run's latest checkpoint.

    ``overrides`` (dotted, ``eval.*`` only: the weights fix everything else) change how it samples.
    """
    foreign = [o for o in overrides if not o.startswith(EVAL_PREFIX)]
    if foreign:
        raise ValueError(
            f"sampling overrides must set eval.* fields (the model is fixed by its weights); got {', '.join(foreign)}"
        )
    found = open_weights(source, raw_weights)
    cfg = config_from_yaml(found.config_path.read_text(), str(found.config_path), overrides)
    data = found.meta.data
    spec = DataSpec(data.seq_len, data.token_dim, data.num_classes)
    problems = check_config(cfg, world_size=1, data=spec)
    if problems:
        raise ConfigError(problems, f"{found.config_path} with {' '.join(overrides)}")
    model = build_model(cfg.model, spec)
    model.load_state_dict(load_file(str(found.path)))
    meta, weights = found.meta, found.path
    return LoadedModel(model.to(device).eval(), meta, cfg, weights)


def build_generator(
    loaded: LoadedModel, device: torch.device, precision: str = "fp32", ev: Optional[EvalConfig] = None
) -> ImageGenerator:
    """The loaded model sampling with ``ev`` (default: its recipe's eval settings, overrides applied), compiled
    as ``ev.compile`` says (once per loaded model; a compiled FAR-Causal decodes with the static KV cache)."""
    ev = ev or loaded.cfg.eval
    options = sampling_options(ev, resolve_dims(loaded.cfg.model).head_kind)
    if ev.compile != "off" and loaded.model.backbone.kind == "causal":
        options = replace(options, static_kv_cache=True)  # one set of shapes for every decoding step
    replay = compile_for_sampling(loaded.model, ev.compile, device)
    data = loaded.meta.data
    precision = precision if device.type == "cuda" else "fp32"
    normalization = LatentNormalization.from_record(
        data.normalization, data.scale, data.token_dim, f"{loaded.weights.parent / META_FILE}"
    )
    codec = {**data.codec, "weights_path": str(codec_weights_path(data.codec, loaded.weights.parent))}
    return ImageGenerator(loaded.model, load_manifest_codec(codec), normalization, options, device, precision, replay)


class SampleStore:
    """``OUT``: the settings the samples belong to, one file per finished batch, the assembled result."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.parts = self.out / PARTS_DIR

    def claim(self, settings: dict) -> None:
        """Record ``settings``, or check that earlier parts were sampled with the same ones."""
        path = self.out / SETTINGS_FILE
        if path.is_file():
            before = json.loads(path.read_text())
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                details = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise ValueError(
                    f"{self.out} holds samples made with other settings ({details}); choose another --out or delete it"
                )
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(settings, indent=2, sort_keys=True))

    def part_path(self, batch_id: int) -> Path:
        return self.parts / f"batch_{batch_id:06d}.npz"

    def done(self, job: SamplingJob) -> frozenset[int]:
        return frozenset(b for b in range(job.num_batches) if self.part_path(b).is_file())

    def write_part(self, batch_id: int, images: np.ndarray, labels: np.ndarray) -> None:
        save_npz(self.part_path(batch_id), {IMAGES_KEY: images, LABELS_KEY: labels})

    def assemble(self, job: SamplingJob) -> tuple[Path, np.ndarray, np.ndarray]:
        missing = sorted(set(range(job.num_batches)) - self.done(job))
        if missing:
            raise FileNotFoundError(f"{self.parts} lacks batches {missing[:5]}: re-run the same command to finish them")
        parts = [load_npz_images(self.part_path(b)) for b in range(job.num_batches)]
        images = np.concatenate([p.images for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        return save_npz(self.out / SAMPLES_FILE, {IMAGES_KEY: images, LABELS_KEY: labels}), images, labels


def _env() -> DistEnv:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed("auto")
    return DistEnv(0, 1, 0, torch.device("cpu"))


def run_sampling(request: SampleRequest) -> dict:
    """Sample (this rank's share of) the request; rank 0 assembles and returns the report."""
    env = _env()
    if request.device == "auto":
        device = (
            env.device if env.device.type == "cuda" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    else:
        device = torch.device(request.device)
    source = request.source
    if is_registry_uri(source):
        import os

        from far_scale.tracking.registry import download_export

        uri = request.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        source = download_export(source, uri, Path(request.out) / REGISTRY_CACHE)
    loaded = load_sampling_model(source, request.raw_weights, device, request.overrides)
    generator = build_generator(loaded, device, request.precision)
    job = SamplingJob(request.num_images, loaded.meta.data.num_classes, request.batch_size, request.seed)
    store = SampleStore(request.out)
    settings = {
        "weights_sha256": sha256_file(loaded.weights),
        "job": asdict(job),
        "options": asdict(generator.options),
        "precision": generator.precision,
        "compile": loaded.cfg.eval.compile,
    }
    if env.is_main:
        store.claim(settings)
    barrier()
    store.claim(settings)
    done = store.done(job)
    sampled, seconds = 0, 0.0
    for batch_id, batch, spent in iter_rank_batches(generator, job, env.rank, env.world_size, done):
        store.write_part(batch_id, batch.images, batch.labels)
        sampled += len(batch.images)
        seconds += spent
        print(
            f"[rank {env.rank}] batch {batch_id + 1}/{job.num_batches}: {len(batch.images)} images in {spent:.1f} s",
            flush=True,
        )
    totals = all_gather_objects((sampled, seconds)) if env.world_size > 1 else [(sampled, seconds)]
    barrier()
    if not env.is_main:
        return {}
    path, images, labels = store.assemble(job)
    count = min(request.grid_images, len(images))
    grid = save_grid(images[:count], store.out / GRID_FILE, min(count, job.num_classes)) if count else None
    new_images = sum(n for n, _ in totals)
    wall = max(s for _, s in totals)
    report = {
        "samples": str(path),
        "grid": str(grid) if grid else None,
        "num_images": len(images),
        "sampled_now": new_images,
        "reused_batches": len(done),
        "world_size": env.world_size,
        "device": str(device),
        "images_per_s": new_images / wall if wall > 0 else None,
        "settings": settings,
    }
    if request.latency:
        _, spent = generator.timed_images(SamplingJob(1, job.num_classes, 1, job.seed), np.zeros(1, dtype=np.int64))
        report["seconds_per_image_batch1"] = spent
    write_atomic(store.out / REPORT_FILE, json.dumps(report, indent=2))
    return report
