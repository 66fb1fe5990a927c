"""Sample grids: uint8 images tiled into one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image


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
