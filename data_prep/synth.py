"""A synthetic class-conditional image dataset in ImageNet layout (``train/<class>/*.JPEG``).

Two modes (``SynthSpec.colors``):
- ``class``: each class is a shape kind and a colour palette (10 kinds x 10 palettes = up to 100
  classes). The class is visible at a glance, but a classifier can tell the classes apart by colour
  alone, so this data cannot show whether a model draws shapes (the offline benchmark's verdict calls
  a benchmark on it invalid).
- ``random``: the class is the shape alone (up to 10 classes); each image's shape and background
  colours are drawn at random, independently of the class. Use it wherever synthetic data stands for
  "can the model draw".
Each shape is drawn at a random position, size and rotation over a dim gradient. Deterministic from
the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from far_scale.data.storage import local_atomic_writer

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hstripes", "vstripes", "checker", "dots")
PALETTES = (
    ("red", (220, 40, 40)),
    ("green", (40, 180, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (230, 200, 40)),
    ("magenta", (200, 50, 200)),
    ("cyan", (40, 200, 210)),
    ("orange", (240, 130, 30)),
    ("white", (235, 235, 235)),
    ("purple", (110, 40, 170)),
    ("brown", (130, 80, 40)),
)
MAX_CLASSES = len(SHAPES) * len(PALETTES)
COLOR_MODES = ("class", "random")
MIN_RANDOM_BRIGHTNESS = 120  # a random shape colour's brightest channel, so it stands out of the dim background
JPEG_QUALITY = 95
COLOR_JITTER = 25


@dataclass(frozen=True)
class SynthSpec:
    num_classes: int = 10
    images_per_class: int = 32
    resolution: int = 64
    seed: int = 0
    colors: str = "class"
    """class: colour and shape make the class; random: the shape alone (colours drawn per image)."""

    def max_classes(self) -> int:
        return MAX_CLASSES if self.colors == "class" else len(SHAPES)


def class_name(label: int, colors: str = "class") -> str:
    shape = SHAPES[label % len(SHAPES)]
    if colors == "random":
        return f"c{label:03d}_{shape}"
    palette = PALETTES[(label // len(SHAPES) + label) % len(PALETTES)][0]
    return f"c{label:03d}_{shape}_{palette}"


def _random_color(rng: np.random.Generator) -> tuple[int, ...]:
    color = rng.integers(0, 256, 3)
    color[rng.integers(0, 3)] = rng.integers(MIN_RANDOM_BRIGHTNESS, 256)
    return tuple(int(c) for c in color)


def _color(rng: np.random.Generator, base: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for c in base)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A dim two-colour gradient with mild noise: varied, but never competing with the shape."""
    start, end = rng.integers(0, 90, 3), rng.integers(0, 90, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.cos(angle) * xs + np.sin(angle) * ys
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    pixels = start[None, None] * (1 - t[..., None]) + end[None, None] * t[..., None]
    pixels += rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    color: tuple[int, ...],
    size: int,
) -> None:
    def rotated(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.polygon(rotated([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=color)
    elif shape == "diamond":
        draw.polygon(rotated([(0, -r * 1.3), (r, 0), (0, r * 1.3), (-r, 0)]), fill=color)
    elif shape == "triangle":
        draw.polygon(rotated([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]), fill=color)
    elif shape == "cross":
        w = r / 3
        draw.polygon(rotated([(-r, -w), (r, -w), (r, w), (-r, w)]), fill=color)
        draw.polygon(rotated([(-w, -r), (w, -r), (w, r), (-w, r)]), fill=color)
    elif shape in ("hstripes", "vstripes"):
        period = max(4, int(r / 2))
        for offset in range(0, size, period * 2):
            box = [0, offset, size, offset + period] if shape == "hstripes" else [offset, 0, offset + period, size]
            draw.rectangle(box, fill=color)
    elif shape == "checker":
        cell = max(4, int(r / 2))
        for y in range(0, size, cell):
            for x in range(0, size, cell):
                if (x // cell + y // cell) % 2 == 0:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
    elif shape == "dots":
        step = max(6, int(r / 1.5))
        dot = max(1.5, step / 4)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_image(label: int, index: int, resolution: int, seed: int, colors: str = "class") -> Image.Image:
    """Image ``index`` of class ``label`` (independent of every other image's draw)."""
    rng = np.random.default_rng([seed, label, index])
    shape = SHAPES[label % len(SHAPES)]
    image = _background(rng, resolution)
    r = rng.uniform(0.18, 0.32) * resolution
    cx, cy = rng.uniform(r, resolution - r), rng.uniform(r, resolution - r)
    angle = rng.uniform(0, math.pi)
    if colors == "random":
        color = _random_color(rng)
    else:
        color = _color(rng, PALETTES[(label // len(SHAPES) + label) % len(PALETTES)][1])
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, angle, color, resolution)
    return image


def write_dataset(out: str | Path, spec: SynthSpec, progress: bool = True) -> Path:
    """Write ``out/train/<class>/<class>_<i>.JPEG``; existing files are rewritten identically."""
    if spec.colors not in COLOR_MODES:
        raise ValueError(f"colors must be one of {', '.join(COLOR_MODES)}, got {spec.colors!r}")
    if not 1 <= spec.num_classes <= spec.max_classes():
        raise ValueError(
            f"num_classes must be in [1, {spec.max_classes()}] with colors={spec.colors}, got {spec.num_classes}"
        )
    root = Path(out)
    total = spec.num_classes * spec.images_per_class
    with tqdm(total=total, unit="img", desc="synth", disable=not progress) as bar:
        for label in range(spec.num_classes):
            name = class_name(label, spec.colors)
            folder = root / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(spec.images_per_class):
                path = folder / f"{name}_{index:05d}.JPEG"
                with local_atomic_writer(path) as handle:
                    draw_image(label, index, spec.resolution, spec.seed, spec.colors).save(
                        handle, format="JPEG", quality=JPEG_QUALITY
                    )
                bar.update()
    return root
