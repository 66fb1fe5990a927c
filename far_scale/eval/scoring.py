"""One interface for every quality yardstick: per-image features first (on any rank), one score at the end.

Splitting the two lets distributed evaluation compute features where the images are and
gather only the (small) features on rank 0.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from far_scale.eval.image_sets import ImageBatch


class Scorer(Protocol):
    name: str

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per-image arrays (first axis = image) for uint8 ``[N, H, W, 3]`` images."""

    def score(self, features: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        """Metrics of a whole image set from its concatenated features and class labels."""


def concat_features(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = list(parts)
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def score_batches(scorer: Scorer, batches: Iterable[ImageBatch]) -> tuple[dict[str, float], int]:
    """Metrics of all images in ``batches`` and how many there were."""
    features, labels = [], []
    for batch in batches:
        features.append(scorer.features(batch.images))
        labels.append(batch.labels)
    if not labels:
        raise ValueError("no images to score")
    all_labels = np.concatenate(labels)
    return scorer.score(concat_features(features), all_labels), len(all_labels)
