"""Fit the offline PCA codec on a deterministic subset of an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from far_scale.codecs.pca import PCACodec
from far_scale.data.images import UnreadableImageError, list_images, load_image, report_lines, to_unit_range

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
    skip_unreadable: bool = False,
    report: bool = False,
) -> tuple[PCACodec, str]:
    """Fit on up to ``max_images`` images evenly spread over the dataset; save to ``out``; return codec and sha256.

    ``report`` prints the folder's input report (images used and files skipped per class). An image that cannot be
    decoded stops the fit naming the file (``UnreadableImageError``), or with ``skip_unreadable`` is left out and
    named."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
    images = list_images(src, class_map)
    if report:
        print("\n".join(report_lines(images.report())), flush=True)
    chosen = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int))
    pixels = []
    for i in chosen:
        try:
            pixels.append(load_image(images.root / images.paths[i], image_size))
        except UnreadableImageError as exc:
            if not skip_unreadable:
                raise
            print(f"skipped unreadable image {exc.path}: {exc.reason}", flush=True)
    if not pixels:
        raise UnreadableImageError(src, "none of the chosen images could be decoded")
    batches = [
        to_unit_range(torch.from_numpy(np.stack(pixels[start : start + FIT_BATCH])))
        for start in range(0, len(pixels), FIT_BATCH)
    ]
    codec = PCACodec.fit(batches, patch_size, dim, image_size, max_patches, seed)
    digest = codec.save(Path(out))
    return PCACodec.load(out, digest), digest
