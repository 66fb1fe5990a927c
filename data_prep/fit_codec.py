"""Fit the offline PCA codec on a deterministic subset of an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from far_scale.codecs.pca import PCACodec
from far_scale.data.images import list_images, load_image, to_unit_range

FIT_BATCH = 64


def fit_pca_codec(
    src: str,
    out: str,
    image_size: int,
    patch_size: int,
    dim: int,
    max_images: int,
    max_patches: int,
    seed: int,
    class_map: str | None = None,
) -> tuple[PCACodec, str]:
    """Fit on up to ``max_images`` images evenly spread over the dataset; save to ``out``; return codec and sha256."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
    images = list_images(src, class_map)
    chosen = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int))
    batches = []
    for start in range(0, len(chosen), FIT_BATCH):
        pixels = np.stack(
            [load_image(images.root / images.paths[i], image_size) for i in chosen[start : start + FIT_BATCH]]
        )
        batches.append(to_unit_range(torch.from_numpy(pixels)))
    codec = PCACodec.fit(batches, patch_size, dim, image_size, max_patches, seed)
    digest = codec.save(Path(out))
    return PCACodec.load(out, digest), digest
