"""Decode sampled latent tokens with the dataset's codec and write a PNG grid."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from PIL import Image

from far_scale.codecs import CodecError, load_manifest_codec
from far_scale.data.images import to_uint8

log = logging.getLogger("far_scale.eval")


def save_grid(pixels, path: Path, columns: int) -> Path:
    """``pixels`` uint8 [N, H, W, 3] -> one PNG with ``columns`` tiles per row (atomic write)."""
    count, height, width, _ = pixels.shape
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, tile in enumerate(pixels):
        grid.paste(Image.fromarray(tile), ((i % columns) * width, (i // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def decode_to_grid(tokens: torch.Tensor, manifest: dict, path: Path, columns: int) -> bool:
    """Decode unscaled tokens [N, L, D] with the manifest's codec; False (and a warning) if it is unavailable."""
    try:
        codec = load_manifest_codec(manifest)
    except CodecError as exc:
        log.warning("no sample grid: %s", exc)
        return False
    codec.to(tokens.device)
    with torch.no_grad():
        images = codec.decode(tokens)
    save_grid(to_uint8(images), path, columns)
    return True
