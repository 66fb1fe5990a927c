"""Sample grids: uint8 images tiled into one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image


def tile(pixels, columns: int) -> Image.Image:
    """``pixels`` uint8 [N, H, W, 3] -> one image with ``columns`` tiles per row."""
    count, height, width, _ = pixels.shape
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(pixels):
        grid.paste(Image.fromarray(image), ((i % columns) * width, (i // columns) * height))
    return grid


def save_image_atomic(image: Image.Image, path: Path) -> Path:
    """Write a PNG via a hidden partial file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_grid(pixels, path: Path, columns: int) -> Path:
    """``pixels`` uint8 [N, H, W, 3] -> one PNG with ``columns`` tiles per row (atomic write)."""
    return save_image_atomic(tile(pixels, columns), path)
