"""Image sources in ImageNet layout and ADM/MAR preprocessing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from far_scale.errors import ActionableError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""What an image folder may hold (any case); GIFs give their first frame. Every other file is skipped and reported."""
TRAIN_DIR = "train"
HELDOUT_DIR = "val"
"""A folder may hold a seeded held-out split beside ``train/`` (``far-scale data digits`` writes one)."""
DATASET_CARD = "DATASET.json"
"""What a built-in dataset says about itself: source, checksum, licence, split, whether flips keep the class."""
REPORT_EXAMPLES = 5
"""Skipped files named per class and reason in a report (the counts are complete)."""


class ImageFolderError(ActionableError, ValueError):
    """An image folder that cannot be used as it is (no classes, an empty class); names the folder."""


class UnreadableImageError(ActionableError, OSError):
    """One image that cannot be decoded; names the file and what to do."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(
            f"cannot read image {path}: {reason}. Fix or remove the file, or pass --skip-unreadable to go on "
            "without it (it is recorded in the manifest)"
        )
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class SkippedFile:
    path: str
    """Relative to the folder's root."""
    reason: str


@dataclass(frozen=True)
class ImageList:
    """All images of a source in their deterministic global order (class, then file name), and the files of the
    folder that were not taken, with the reason (``skipped``)."""

    root: Path
    classes: list[str]
    paths: list[str]  # relative to root
    labels: list[int]
    skipped: tuple[SkippedFile, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def report(self) -> dict:
        """Per class: images used and files skipped by reason (with up to ``REPORT_EXAMPLES`` names each); files
        outside any class folder under ``(folder)``. Stored in the manifest, printed by ``report_lines``."""
        classes: dict[str, dict] = {name: {"images": 0, "skipped": {}} for name in self.classes}
        for label in self.labels:
            classes[self.classes[label]]["images"] += 1
        for item in self.skipped:
            parts = Path(item.path).parts
            owner = parts[-2] if len(parts) >= 2 and parts[-2] in classes else "(folder)"
            entry = classes.setdefault(owner, {"images": 0, "skipped": {}})["skipped"].setdefault(
                item.reason, {"count": 0, "examples": []}
            )
            entry["count"] += 1
            if len(entry["examples"]) < REPORT_EXAMPLES:
                entry["examples"].append(item.path)
        return {"images": len(self.paths), "skipped": len(self.skipped), "classes": classes}


def report_lines(report: dict) -> list[str]:
    """The input report, one line per class (and per skip reason)."""
    lines = [f"{report['images']} images used, {report['skipped']} files skipped"]
    for name, entry in report["classes"].items():
        skipped = entry["skipped"]
        line = f"  {name}: {entry['images']} images"
        if skipped:
            line += "; skipped " + "; ".join(
                f"{item['count']} {reason} ({', '.join(item['examples'])}{', ...' if item['count'] > len(item['examples']) else ''})"
                for reason, item in skipped.items()
            )
        lines.append(line)
    return lines


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _files_of(folder: Path, root: Path, skipped: list[SkippedFile]) -> list[Path]:
    """The image files directly in ``folder`` (sorted); every other entry is recorded in ``skipped``."""
    images = []
    for entry in sorted(folder.iterdir()):
        rel = str(entry.relative_to(root))
        if _hidden(entry):
            skipped.append(SkippedFile(rel, "hidden"))
        elif entry.is_dir():
            skipped.append(SkippedFile(rel, "a folder inside a class folder (not read)"))
        elif entry.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(rel, f"unsupported format ({entry.suffix or 'no extension'})"))
        else:
            images.append(entry)
    return images


def _image_root(root: Path) -> Path:
    return root / TRAIN_DIR if (root / TRAIN_DIR).is_dir() else root


def list_images(root: str | Path, class_map: Optional[str | Path] = None) -> ImageList:
    """``root/train/<class>/*`` (or ``root/<class>/*``); class index = position in the sorted class
    list, or in ``class_map`` (a JSON list of class directory names, or one name per line).

    Hidden folders (``.ipynb_checkpoints``, ``.git``) are never classes and hidden files never images; files of
    other formats are skipped; all of them are recorded in ``skipped``. A class folder without an image is an
    error naming it."""
    root = Path(root)
    base = _image_root(root)
    if not base.is_dir():
        raise ImageFolderError(f"image folder not found: {root}")
    skipped: list[SkippedFile] = []
    found = []
    for entry in sorted(base.iterdir()):
        if _hidden(entry):
            skipped.append(SkippedFile(str(entry.relative_to(root)), "hidden"))
        elif entry.is_dir():
            found.append(entry.name)
        else:
            skipped.append(SkippedFile(str(entry.relative_to(root)), "a file outside the class folders"))
    if class_map:
        text = Path(class_map).read_text()
        classes = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [line.strip() for line in text.splitlines() if line.strip()]
        )
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ImageFolderError(f"class folders not in {class_map}: {', '.join(unknown[:5])}")
    else:
        classes = found
    if not classes:
        raise ImageFolderError(f"no class folders under {base}: expected {base}/<class>/<image files>")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        folder = base / name
        files = _files_of(folder, root, skipped) if folder.is_dir() else []
        if not files and (folder.is_dir() or not class_map):  # a class map may name classes this folder lacks
            empty.append(name)
        for file in files:
            paths.append(str(file.relative_to(root)))
            labels.append(label)
    if empty:
        raise ImageFolderError(
            f"class folder(s) without a readable image file under {base}: {', '.join(empty[:REPORT_EXAMPLES])}"
            f"{' ...' if len(empty) > REPORT_EXAMPLES else ''}: add images (formats: "
            f"{', '.join(IMAGE_EXTENSIONS)}) or remove the folder(s)"
        )
    if not paths:
        raise ImageFolderError(f"no images under {base}")
    return ImageList(root, classes, paths, labels, tuple(skipped))


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
    paths, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        folder = base / name
        for file in _files_of(folder, Path(root), skipped) if folder.is_dir() else []:
            paths.append(str(file.relative_to(root)))
            labels.append(label)
    if not paths:
        raise ImageFolderError(f"{base} holds no images of the classes {', '.join(classes[:5])}...")
    return ImageList(Path(root), classes, paths, labels, tuple(skipped))


def shuffled(images: ImageList, seed: int) -> ImageList:
    """The same images in a seeded, deterministic permutation.

    Shards are written in this order, so each shard mixes classes (ImageNet sorted by class
    would put one class per shard, which a streaming shuffle buffer cannot undo).
    """
    order = np.random.default_rng(seed).permutation(len(images))
    return ImageList(
        images.root,
        images.classes,
        [images.paths[i] for i in order],
        [images.labels[i] for i in order],
        images.skipped,
    )


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: box-halve while >= 2x the target, bicubic resize of the short side, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
"""PIL modes of more than 8 bits per sample (16-bit PNG/TIFF, 32-bit integer or float TIFF)."""


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, by its real range: 16-bit samples divided by 65535 (``convert`` would clip them
    at 255: a 16-bit gradient turns white); 32-bit integers likewise when they fit 16 bits, floats in [0, 1] as
    fractions, anything else by the image's own minimum and maximum."""
    if image.mode not in HIGH_DEPTH_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        unit = values / 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        unit = values
    else:
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 ``[3, size, size]``: EXIF orientation applied, any bit depth to 8 bits (``to_rgb8``), a GIF's
    first frame. ``UnreadableImageError`` (naming the file) when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            return np.asarray(center_crop(to_rgb8(upright), size)).transpose(2, 0, 1).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from None


def to_unit_range(images_uint8):
    """uint8 tensor -> float in [-1, 1] (MAR's normalisation)."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float [-1, 1] ``[B, 3, H, W]`` tensor -> uint8 ``[B, H, W, 3]`` array."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
