"""Sample grids: uint8 images tiled into one PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

from PIL import Image

from far_scale.data.storage import local_atomic_writer


def tile(pixels, columns: int) -> Image.Image:
    """``pixels`` uint8 [N, H, W, 3] -> one image with ``columns`` tiles per row."""
    count, height, width, _ = pixels.shape
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(pixels):
        grid.paste(Image.fromarray(image), ((i % columns) * width, (i // columns) * height))
    return grid


def save_image_atomic(image: Image.Image, path: Path) -> Path:
    """Write a PNG so that it appears only complete."""
    with local_atomic_writer(path) as handle:
        image.save(handle, format="PNG")
    return path


def save_grid(pixels, path: Path, columns: int) -> Path:
    """``pixels`` uint8 [N, H, W, 3] -> one PNG with ``columns`` tiles per row (atomic write)."""
    return save_image_atomic(tile(pixels, columns), path)


def side_by_side(grids: dict[str, Union[Path, Image.Image]], target: Path) -> Path:
    """Grids (PNG paths or images) next to each other, each under its name, as one PNG (atomic write)."""
    from PIL import ImageDraw

    images = {
        name: (grid if isinstance(grid, Image.Image) else Image.open(grid)).convert("RGB")
        for name, grid in grids.items()
    }
    label_h, gap = 18, 12
    width = sum(i.width for i in images.values()) + gap * (len(images) - 1)
    height = max(i.height for i in images.values()) + label_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, image in images.items():
        draw.text((x + 4, 3), name, fill="black")
        canvas.paste(image, (x, label_h))
        x += image.width + gap
    return save_image_atomic(canvas, target)
