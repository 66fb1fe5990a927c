"""The offline quality benchmark: FID's idea with a classifier trained on the dataset itself.

``build_benchmark`` splits an image folder by class into a training part and a held-out part,
trains ``ConvClassifier`` on the first, keeps the features of half the held-out images as the
reference set, and calibrates the scale on what is known: the other held-out half (real images
the classifier never saw), their reconstructions through the dataset's codec (the best any
generator can reach through that codec) and images decoded from random latent tokens. Everything
is stored in one safetensors file named by a checksum of the data and the settings, so a second
call with the same inputs reuses it. Limits: docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save

from far_scale.codecs.base import sha256_file
from far_scale.data.images import list_images, load_image, to_uint8
from far_scale.data.storage import local_atomic_writer
from far_scale.eval.classifier import ClassifierSettings, ConvClassifier, classify, train_classifier
from far_scale.eval.metrics import FeatureStats, frechet_distance, precision_recall

log = logging.getLogger("far_scale.eval")

BENCHMARK_FORMAT = 1
MODEL_PREFIX = "classifier."
REFERENCE_KEY = "reference_features"
CALIBRATION_REAL = "real held-out"
CALIBRATION_RECON = "codec reconstructions"
CALIBRATION_RANDOM = "random latent tokens"


@dataclass(frozen=True)
class BenchmarkSettings:
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    holdout_fraction: float = 0.3
    """Share of each class held out of classifier training; half of it is the reference set."""
    split_seed: int = 0

    def as_dict(self) -> dict:
        return {"classifier": self.classifier.as_dict(), "holdout_fraction": self.holdout_fraction,
                "split_seed": self.split_seed}


@dataclass(frozen=True)
class QualityRow:
    """One image set's scores; ``name`` says what was scored."""

    name: str
    num_images: int
    accuracy: float
    fd: float
    precision: float
    recall: float

    def as_dict(self) -> dict:
        return asdict(self)


def format_rows(rows: list[QualityRow]) -> str:
    lines = ["| images | n | class accuracy | Fréchet distance | precision | recall |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.num_images} | {row.accuracy:.3f} | {row.fd:.3f} | {row.precision:.3f} | "
                     f"{row.recall:.3f} |")
    return "\n".join(lines)


class OfflineBenchmark:
    """A trained classifier, the reference features and the calibration rows (the scorer of ``scoring``)."""

    name = "offline"

    def __init__(self, model: ConvClassifier, reference: np.ndarray, meta: dict):
        self.model, self.reference, self.meta = model, reference, meta
        self.reference_stats = FeatureStats.of(reference)

    @property
    def image_size(self) -> int:
        return self.meta["settings"]["classifier"]["image_size"]

    @property
    def calibration(self) -> list[QualityRow]:
        return [QualityRow(**row) for row in self.meta["calibration"]]

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        features, predicted = classify(self.model, images, self.image_size)
        return {"features": features, "predicted": predicted}

    def score(self, features: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        known = labels >= 0
        accuracy = float((features["predicted"][known] == labels[known]).mean()) if known.any() else float("nan")
        fd = frechet_distance(FeatureStats.of(features["features"]), self.reference_stats)
        precision, recall = precision_recall(self.reference, features["features"])
        return {"accuracy": accuracy, "fd": fd, "precision": precision, "recall": recall}

    def row(self, name: str, images: np.ndarray, labels: np.ndarray) -> QualityRow:
        return QualityRow(name, len(images), **self.score(self.features(images), labels))

    # ---- storage ------------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        tensors = {f"{MODEL_PREFIX}{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors[REFERENCE_KEY] = torch.from_numpy(np.ascontiguousarray(self.reference, dtype=np.float32))
        with local_atomic_writer(path) as handle:
            handle.write(save(tensors, metadata={"far_scale_offline_benchmark": json.dumps(self.meta)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OfflineBenchmark":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"offline benchmark not found: {path}. Create it with `far-scale eval "
                                    "offline-setup IMAGE_FOLDER --data SHARDS_URL` (it prints the path).")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            text = (handle.metadata() or {}).get("far_scale_offline_benchmark")
        if text is None:
            raise ValueError(f"{path} is not an offline benchmark file (no far_scale_offline_benchmark metadata)")
        meta = json.loads(text)
        if meta.get("format") != BENCHMARK_FORMAT:
            raise ValueError(f"{path} has benchmark format {meta.get('format')}; this far-scale reads "
                             f"{BENCHMARK_FORMAT}: re-run `far-scale eval offline-setup`")
        tensors = load_file(str(path))
        settings = meta["settings"]["classifier"]
        model = ConvClassifier(meta["num_classes"], settings["width"], settings["feature_dim"])
        model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)})
        return cls(model.eval(), tensors[REFERENCE_KEY].double().numpy(), meta)


def folder_fingerprint(root: str | Path) -> str:
    """sha256 over every image's relative path and content, in the folder's fixed order."""
    images = list_images(root)
    digest = hashlib.sha256()
    for rel, label in zip(images.paths, images.labels):
        digest.update(f"{rel}\0{label}\0{sha256_file(images.root / rel)}\n".encode())
    return digest.hexdigest()


def split_holdout(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, reference, calibration): per class a seeded ``fraction`` is held out, alternately
    assigned to the reference and the calibration half."""
    rng = np.random.default_rng(seed)
    train, reference, calibration = [], [], []
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label in sorted(by_class):
        members = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        held = max(2, round(fraction * len(members)))
        if held >= len(members):
            raise ValueError(f"class {label} has {len(members)} images: too few to hold out {held} and train")
        reference += members[:held:2]
        calibration += members[1:held:2]
        train += members[held:]
    return sorted(train), sorted(reference), sorted(calibration)


def _random_latent_images(manifest, codec, count: int, seed: int) -> np.ndarray:
    """Tokens drawn from N(mean, std) per latent channel (the manifest's statistics), decoded."""
    info, stats = manifest.codec, manifest.stats
    per_channel = info["token_dim"] // len(stats["channel_mean"])
    mean = torch.tensor(stats["channel_mean"], dtype=torch.float32).repeat_interleave(per_channel)
    std = torch.tensor(stats["channel_std"], dtype=torch.float32).repeat_interleave(per_channel)
    generator = torch.Generator().manual_seed(seed)
    tokens = mean + std * torch.randn(count, info["seq_len"], info["token_dim"], generator=generator)
    with torch.no_grad():
        return to_uint8(codec.decode(tokens))


def _reconstructions(codec, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return to_uint8(codec.decode(codec.encode(x)[:, 0]))


def benchmark_key(fingerprint: str, settings: BenchmarkSettings, codec_sha256: Optional[str]) -> str:
    text = json.dumps({"format": BENCHMARK_FORMAT, "data": fingerprint, "settings": settings.as_dict(),
                       "codec": codec_sha256}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def build_benchmark(images_root: str, cache_dir: str | Path, data_url: Optional[str] = None,
                    settings: BenchmarkSettings = BenchmarkSettings(), codec_weights: Optional[str] = None,
                    verbose: bool = True) -> tuple[Path, OfflineBenchmark, bool]:
    """(path, benchmark, reused): build it, or reuse the cached file for the same data, codec and settings."""
    manifest = codec = None
    if data_url:
        from far_scale.codecs import load_manifest_codec
        from far_scale.data.manifest import read_manifest

        manifest = read_manifest(data_url)
        codec = load_manifest_codec(manifest.codec, codec_weights)
    fingerprint = folder_fingerprint(images_root)
    key = benchmark_key(fingerprint, settings, codec.info.weights_sha256 if codec else None)
    path = Path(cache_dir) / f"offline-{key[:16]}.safetensors"
    if path.is_file():
        return path, OfflineBenchmark.load(path), True

    say = print if verbose else log.info
    images = list_images(images_root)
    load_size = codec.info.image_size if codec else settings.classifier.image_size
    say(f"offline benchmark: loading {len(images)} images of {len(images.classes)} classes at {load_size} px")
    pixels = np.stack([load_image(images.root / p, load_size) for p in images.paths]).transpose(0, 2, 3, 1)
    labels = np.asarray(images.labels, dtype=np.int64)
    train, reference, calibration = split_holdout(images.labels, settings.holdout_fraction, settings.split_seed)

    def report(epoch, epochs, loss):
        say(f"  classifier epoch {epoch}/{epochs}: loss {loss:.4f}")

    model = train_classifier(pixels[train], labels[train], len(images.classes), settings.classifier, report)
    reference_features, _ = classify(model, pixels[reference], settings.classifier.image_size)
    meta = {"format": BENCHMARK_FORMAT, "key": key, "data_fingerprint": fingerprint, "images_root": str(images_root),
            "classes": images.classes, "num_classes": len(images.classes), "settings": settings.as_dict(),
            "num_train": len(train), "num_reference": len(reference), "codec": codec.info.as_dict() if codec else None,
            "calibration": []}
    bench = OfflineBenchmark(model, reference_features, meta)
    _, train_predicted = classify(model, pixels[train], settings.classifier.image_size)
    meta["train_accuracy"] = float((train_predicted == labels[train]).mean())
    rows = [bench.row(CALIBRATION_REAL, pixels[calibration], labels[calibration])]
    if codec is not None:
        rows.append(bench.row(CALIBRATION_RECON, _reconstructions(codec, pixels[calibration]), labels[calibration]))
        count = len(calibration)
        random_labels = np.arange(count, dtype=np.int64) % len(images.classes)
        rows.append(bench.row(CALIBRATION_RANDOM, _random_latent_images(manifest, codec, count, settings.split_seed),
                              random_labels))
    meta["calibration"] = [row.as_dict() for row in rows]
    meta["holdout_accuracy"] = rows[0].accuracy
    bench.save(path)
    return path, bench, False
