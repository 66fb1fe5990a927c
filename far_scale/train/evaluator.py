"""The trainer's periodic evaluation: sample with the evaluation EMA's weights on every rank, score the images
where they are, and log the metrics and a grid from rank 0 (one owner; the job itself is
``far_scale.eval.evaluation.evaluate_on_ranks``, shared with ``eval sweep`` and the benchmarks)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from far_scale.artifacts import DataInfo
from far_scale.config.schema import Config
from far_scale.data.normalization import LatentNormalization
from far_scale.data.spec import DataSpec
from far_scale.distributed.runtime import DistEnv, all_gather_objects
from far_scale.eval.evaluation import build_scorer, evaluate_on_ranks
from far_scale.eval.grid import save_image_atomic, tile
from far_scale.eval.image_generator import ImageGenerator, SamplingJob, sampling_options
from far_scale.planning.builder import build_model
from far_scale.planning.plan import TrainingPlan
from far_scale.train.run_tracking import RunTracking

log = logging.getLogger("far_scale.train")

GRID_FILE = "samples_step{step:08d}.png"
GRID_KEY = "samples"  # MLflow image key: one image per evaluation step


def load_codec(codec_entry: dict, is_main: bool):
    """The dataset's codec for decoding samples, or None (and a warning) when its weights are not here."""
    from far_scale.codecs import CodecError, load_manifest_codec

    try:
        return load_manifest_codec(codec_entry)
    except CodecError as exc:
        if is_main:
            log.warning("no samples or quality metrics during training: %s", exc)
        return None


class TrainingEvaluator:
    """Built once in the trainer's set-up; called at every evaluation step with the EMA's full weights."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        plan: TrainingPlan,
        data: DataSpec,
        data_info: DataInfo,
        run_dir: Path,
        tracking: RunTracking,
    ):
        self.cfg, self.env, self.data = cfg, env, data
        self.normalization = LatentNormalization.from_record(
            data_info.normalization, data_info.scale, data_info.token_dim, f"{data_info.url} (the run's data)"
        )
        self.head_kind, self.precision = plan.dims.head_kind, plan.precision
        self.run_dir, self.tracking = run_dir, tracking
        self.codec = load_codec(data_info.codec, env.is_main)
        self.scorer = build_scorer(cfg.eval, env.device)

    @property
    def active(self) -> bool:
        """False when there is nothing to decode with, or neither a metric nor a grid to make."""
        return self.codec is not None and (self.scorer is not None or self.cfg.eval.grid_images > 0)

    def __call__(self, step: int, full_ema_state: Callable[[], dict]) -> Optional[dict]:
        """Sample and score at ``step``; ``full_ema_state`` is collective under ZeRO-3 (every rank calls it).

        With a quality metric (``eval.benchmark`` or Inception + reference statistics) ``eval.num_images``
        images are sampled, split over the ranks by batch; each rank scores its own images and only the
        features travel to rank 0. Without one, only the grid's images are sampled.
        """
        if not self.active:
            return None
        ev = self.cfg.eval
        model = build_model(self.cfg.model, self.data).to(self.env.device)
        model.load_state_dict(full_ema_state())
        model.eval()
        options = sampling_options(ev, self.head_kind)
        generator = ImageGenerator(model, self.codec, self.normalization, options, self.env.device, self.precision)
        job = SamplingJob(
            ev.num_images if self.scorer else ev.grid_images, self.data.num_classes, ev.batch_size, self.cfg.run.seed
        )
        result = evaluate_on_ranks(
            generator, job, self.scorer, self.env.rank, self.env.world_size, all_gather_objects, ev.grid_images
        )
        del model, generator
        if self.env.device.type == "cuda":
            torch.cuda.empty_cache()  # the sampling model's memory goes back before training resumes
        if result is None:
            return None
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        if metrics.get("eval/benchmark_valid") == 0.0:
            print(f"warning: {self.scorer.verdict.line()}: these scores cannot rank models", flush=True)
        self.tracking.log_metrics(metrics, step, flush=True, of_checkpoint=True)
        print(
            f"eval at step {step} ({job.num_images} images, K={options.num_iter}, head steps "
            f"{options.head_steps}, cfg {options.cfg_scale}): "
            + " ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items()),
            flush=True,
        )
        if result.grid:
            image = tile(np.stack(result.grid), self.data.num_classes)
            save_image_atomic(image, self.run_dir / GRID_FILE.format(step=step))
            self.tracking.log_image(np.asarray(image), GRID_KEY, step)
        return metrics
