"""One evaluation job for every caller: sample on each rank, compute features where the images are, gather
only the features on rank 0 and score them there (the trainer's evaluation, `far-scale eval sweep` and the
benchmarks use it); and the factory of the quality yardsticks a config names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from far_scale.eval.image_generator import ImageGenerator, SamplingJob, iter_rank_batches
from far_scale.eval.scoring import Scorer, concat_features

SPEED = "images_per_s"  # sampling + decoding, on the slowest rank


@dataclass
class Evaluation:
    """Rank 0's result: the metrics (images/s, and the scorer's when there is one) and the grid's images."""

    metrics: dict[str, float]
    grid: list[np.ndarray] = field(default_factory=list)


def _single_rank(value):
    return [value]


def evaluate_on_ranks(
    generator: ImageGenerator,
    job: SamplingJob,
    scorer: Optional[Scorer],
    rank: int = 0,
    world_size: int = 1,
    gather: Callable = _single_rank,
    grid_images: int = 0,
) -> Optional[Evaluation]:
    """Sample this rank's batches of ``job``; ``gather`` (an all-gather of Python objects across the ranks)
    brings every rank's features, labels and seconds to rank 0, which scores them. None on other ranks."""
    features, labels, grid, seconds = [], [], [], 0.0
    for _, batch, spent in iter_rank_batches(generator, job, rank, world_size):
        seconds += spent
        if scorer is not None:
            features.append(scorer.features(batch.images))
            labels.append(batch.labels)
        if rank == 0:
            grid.extend(batch.images[: max(0, grid_images - len(grid))])
    gathered = gather((concat_features(features), labels, seconds))
    if rank != 0:
        return None
    metrics = {SPEED: job.num_images / max(s for _, _, s in gathered)}
    if scorer is not None:
        all_labels = np.concatenate([part for _, parts, _ in gathered for part in parts])
        metrics.update(scorer.score(concat_features(f for f, _, _ in gathered if f), all_labels))
    return Evaluation(metrics, grid)


def build_scorer(ev, device) -> Optional[Scorer]:
    """The quality metric an ``EvalConfig`` names: the offline benchmark, FID/IS, or None."""
    if ev.benchmark:
        from far_scale.eval.offline import OfflineBenchmark

        return OfflineBenchmark.load(ev.benchmark)
    if ev.inception_weights:
        from far_scale.eval.fid import build_inception_scorer

        return build_inception_scorer(ev.inception_weights, ev.reference_stats, device, ev.batch_size)
    return None
