"""FID and Inception Score against reference statistics (torch-fidelity's protocol, far-scale's own Inception).

Reference statistics are an ``.npz`` with ``mu`` and ``sigma`` of the 2048-d pool features (ADM's
reference batches carry them; ``far-scale eval ref-stats`` writes them from a folder, an ``.npz``
or latent shards), optionally with the ``features`` themselves for precision/recall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from far_scale.eval.image_sets import IMAGES_KEY, iter_source, save_npz
from far_scale.eval.inception import WEIGHTS_SHA256_PREFIX, FIDInceptionV3, load_inception
from far_scale.eval.metrics import FeatureStats, frechet_distance, inception_score, precision_recall
from far_scale.eval.scoring import score_batches

DEFAULT_BATCH = 50


class InceptionScorer:
    """FID (and IS, and precision/recall when the reference keeps its features) as a ``Scorer``."""

    name = "fid"

    def __init__(
        self,
        network: FIDInceptionV3,
        reference: FeatureStats,
        reference_features: Optional[np.ndarray],
        device: torch.device | str = "cpu",
        batch_size: int = DEFAULT_BATCH,
    ):
        self.network, self.reference, self.reference_features = network, reference, reference_features
        self.device, self.batch_size = torch.device(device), batch_size

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            out = self.network(chunk.permute(0, 3, 1, 2).to(self.device))
            pools.append(out.pool.double().cpu().numpy())
            logits.append(out.logits.double().cpu().numpy())
        return {"pool": np.concatenate(pools), "logits": np.concatenate(logits)}

    def score(self, features: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        del labels  # FID and IS are class-blind
        metrics = {"fid": frechet_distance(FeatureStats.of(features["pool"]), self.reference)}
        metrics["is"], metrics["is_std"] = inception_score(features["logits"])
        if self.reference_features is not None:
            metrics["precision"], metrics["recall"] = precision_recall(self.reference_features, features["pool"])
        return metrics


def load_reference(path: str | Path) -> tuple[FeatureStats, Optional[np.ndarray]]:
    """``mu``/``sigma`` (and ``features`` if stored) of a reference statistics file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found: {path}. Use ADM's reference batch "
            "(VIRTUAL_imagenet256_labeled.npz, from openai/guided-diffusion's evaluations) or "
            "write your own with `far-scale eval ref-stats SOURCE --out STATS.npz --inception WEIGHTS`."
        )
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            hint = (
                " It holds images: compute statistics with `far-scale eval ref-stats` first."
                if IMAGES_KEY in data.files
                else ""
            )
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (found {', '.join(data.files)}).{hint}")
        count = int(data["count"]) if "count" in data.files else 0
        stats = FeatureStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), count)
        features = data["features"].astype(np.float64) if "features" in data.files else None
    return stats, features


def build_inception_scorer(
    weights: str,
    reference: str,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    expected_sha256: Optional[str] = WEIGHTS_SHA256_PREFIX,
) -> InceptionScorer:
    stats, features = load_reference(reference)
    return InceptionScorer(load_inception(weights, expected_sha256, device), stats, features, device, batch_size)


def write_reference_stats(
    source: str,
    out: str | Path,
    weights: str,
    image_size: int = 256,
    max_images: Optional[int] = None,
    keep_features: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    expected_sha256: Optional[str] = WEIGHTS_SHA256_PREFIX,
    codec_weights: Optional[str] = None,
) -> tuple[Path, int]:
    """Pool-feature statistics of ``source`` (folder, ``.npz`` or latent dataset URL) -> ``out`` (.npz)."""
    network = load_inception(weights, expected_sha256, device)
    scorer = InceptionScorer(network, FeatureStats(np.zeros(1), np.eye(1), 0), None, device, batch_size)
    pools = [
        scorer.features(batch.images)["pool"]
        for batch in iter_source(source, image_size, batch_size, max_images, codec_weights)
    ]
    if not pools:
        raise ValueError(f"no images in {source}")
    features = np.concatenate(pools)
    stats = FeatureStats.of(features)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "count": np.asarray(stats.count)}
    if keep_features:
        arrays["features"] = features.astype(np.float32)
    return save_npz(out, arrays), stats.count


def fid_of_source(
    source: str, scorer: InceptionScorer, batch_size: int = DEFAULT_BATCH, image_size: int = 256
) -> tuple[dict[str, float], int]:
    return score_batches(scorer, iter_source(source, image_size, batch_size))
