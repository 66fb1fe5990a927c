"""Image sources in ImageNet layout and ADM/MAR preprocessing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")
TRAIN_DIR = "train"
HELDOUT_DIR = "val"
"""A folder may hold a seeded held-out split beside ``train/`` (``far-scale data digits`` writes one)."""
DATASET_CARD = "DATASET.json"
"""What a built-in dataset says about itself: source, checksum, licence, split, whether flips keep the class."""


@dataclass(frozen=True)
class ImageList:
    """All images of a source in their deterministic global order (class, then file name)."""

    root: Path
    classes: list[str]
    paths: list[str]  # relative to root
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def _image_root(root: Path) -> Path:
    return root / TRAIN_DIR if (root / TRAIN_DIR).is_dir() else root


def list_images(root: str | Path, class_map: Optional[str | Path] = None) -> ImageList:
    """``root/train/<class>/*`` (or ``root/<class>/*``); class index = position in the sorted class
    list, or in ``class_map`` (a JSON list of class directory names, or one name per line)."""
    root = Path(root)
    base = _image_root(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = sorted(p.name for p in base.iterdir() if p.is_dir())
    if class_map:
        text = Path(class_map).read_text()
        classes = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [line.strip() for line in text.splitlines() if line.strip()]
        )
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"class folders not in {class_map}: {', '.join(unknown[:5])}")
    else:
        classes = found
    if not classes:
        raise ValueError(f"no class folders under {base}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = base / name
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(file.relative_to(root)))
                labels.append(label)
    if not paths:
        raise ValueError(f"no images under {base}")
    return ImageList(root, classes, paths, labels)


def read_dataset_card(root: str | Path) -> Optional[dict]:
    """The folder's ``DATASET.json`` (None for a plain image folder such as ImageNet's)."""
    path = Path(root) / DATASET_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable dataset card ({exc}): rewrite the folder with the far-scale "
            "data command that made it"
        ) from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return card


def hflip_invariant(card: Optional[dict]) -> bool:
    """Whether a horizontal flip keeps an image's class, by a dataset card (ImageNet: yes; digits: no). A folder
    without a card, or a card that does not say, counts as yes."""
    return bool((card or {}).get("hflip_invariant", True))


def heldout_images(root: str | Path, classes: list[str]) -> Optional[ImageList]:
    """``root/val/<class>/*`` with the training split's class indices, or None when there is no held-out split."""
    base = Path(root) / HELDOUT_DIR
    if not base.is_dir():
        return None
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = base / name
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(file.relative_to(root)))
                labels.append(label)
    if not paths:
        raise ValueError(f"{base} holds no images of the classes {', '.join(classes[:5])}...")
    return ImageList(Path(root), classes, paths, labels)


def shuffled(images: ImageList, seed: int) -> ImageList:
    """The same images in a seeded, deterministic permutation.

    Shards are written in this order, so each shard mixes classes (ImageNet sorted by class
    would put one class per shard, which a streaming shuffle buffer cannot undo).
    """
    order = np.random.default_rng(seed).permutation(len(images))
    return ImageList(images.root, images.classes, [images.paths[i] for i in order], [images.labels[i] for i in order])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: box-halve while >= 2x the target, bicubic resize of the short side, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 ``[3, size, size]``."""
    with Image.open(path) as image:
        return np.asarray(center_crop(image.convert("RGB"), size)).transpose(2, 0, 1).copy()


def to_unit_range(images_uint8):
    """uint8 tensor -> float in [-1, 1] (MAR's normalisation)."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float [-1, 1] ``[B, 3, H, W]`` tensor -> uint8 ``[B, H, W, 3]`` array."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
