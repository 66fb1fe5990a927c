"""Sample-quality statistics on feature vectors: Fréchet distance, Inception Score, k-NN precision/recall.

Pure functions of arrays (float64 where it matters); the feature extractors live elsewhere
(``inception`` for FID/IS, ``classifier`` for the offline benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IS_SPLITS = 10  # the protocol of Salimans et al. and torch-fidelity
PR_NEIGHBOURS = 3  # k of Kynkäänniemi et al. (2019), torch-fidelity's default
DISTANCE_CHUNK = 1024  # rows per block of pairwise distances (memory ~ chunk x N)


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (what FID reference files store)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors [N, F] for statistics, got shape {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    tr (S_a S_b)^1/2 equals tr (S_a^1/2 S_b S_a^1/2)^1/2, whose argument is symmetric PSD: two
    eigendecompositions in float64 instead of a general (complex) matrix square root.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    root_a = _psd_sqrt(a.sigma)
    inner = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and std over ``splits`` consecutive splits of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.shape[0] < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {logits.shape[0]}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    radii = []
    for block in torch.split(features, DISTANCE_CHUNK):
        # k + 1: each point is its own nearest neighbour at distance 0.
        radii.append(torch.cdist(block, features).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    inside = []
    for block in torch.split(points, DISTANCE_CHUNK):
        inside.append((torch.cdist(block, centres) <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision (fake inside the real k-NN manifold) and recall (real inside the fake one)."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(real_t.shape[0], fake_t.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated images")
    precision = _inside_manifold(fake_t, real_t, _kth_neighbour_radii(real_t, k)).double().mean()
    recall = _inside_manifold(real_t, fake_t, _kth_neighbour_radii(fake_t, k)).double().mean()
    return float(precision), float(recall)
