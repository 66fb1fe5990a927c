"""The offline quality benchmark: FID's idea with a classifier trained on the dataset itself.

``build_benchmark`` trains ``ConvClassifier`` on the folder's training images, and beside it an autoencoder
(``autoencoder.py``: no labels, a second feature space that keeps what redraws the image), and keeps the
features of half the held-out images in both spaces as the reference set (a folder with a ``val/`` split, such as the digits', is
held out as written; otherwise a seeded share of each class is). It calibrates the scale on what is
known: the other held-out half (real images the classifier never saw), their reconstructions through the
dataset's codec (the best any generator can reach through that codec), images decoded from random latent
tokens, and three negative controls made from the same real images: token-sized patches shuffled (no
global shape), each token replaced by its mean colour (no detail inside tokens) and pixels shuffled.
The **verdict** says whether the benchmark can rank generators at all: only if real images and codec
reconstructions score clearly better than the shape-free and detail-free controls on accuracy *and*
Fréchet distance in both feature spaces (data whose classes are colours fails it). Every number carries a 95% bootstrap
interval over images. Everything is stored in one safetensors file named by a checksum of the data and
the settings, so a second call with the same inputs reuses it. Limits: docs/evaluation.md.
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
from far_scale.data.images import (
    ImageList,
    heldout_images,
    hflip_invariant,
    list_images,
    load_image,
    read_dataset_card,
    to_uint8,
)
from far_scale.data.storage import local_atomic_writer
from far_scale.eval.autoencoder import (
    AutoencoderSettings,
    ConvAutoencoder,
    encode_images,
    reconstruction_error,
    train_autoencoder,
)
from far_scale.eval.classifier import ClassifierSettings, ConvClassifier, classify, train_classifier
from far_scale.eval.metrics import (
    BOOTSTRAP_RESAMPLES,
    FeatureStats,
    bootstrap_interval,
    class_frechet_distance,
    frechet_distance,
    precision_recall,
)

log = logging.getLogger("far_scale.eval")

BENCHMARK_FORMAT = 3  # 3: the autoencoder feature space
MODEL_PREFIX = "classifier."
AUTOENCODER_PREFIX = "autoencoder."
AE_REFERENCE_KEY = "autoencoder_reference_features"
REFERENCE_KEY = "reference_features"
REFERENCE_LABELS_KEY = "reference_labels"
CALIBRATION_REAL = "real held-out"
CALIBRATION_RECON = "codec reconstructions"
CALIBRATION_RANDOM = "random latent tokens"
CONTROL_TOKENS_SHUFFLED = "control: token patches shuffled"
CONTROL_TOKEN_MEANS = "control: each token its mean colour"
CONTROL_PIXELS_SHUFFLED = "control: pixels shuffled"
SHAPE_CONTROLS = (CONTROL_TOKENS_SHUFFLED, CONTROL_TOKEN_MEANS)
"""What the verdict requires real images and reconstructions to beat clearly."""
CENTRED_DATA_SHIFT_PX = 2
"""Classifier shift augmentation for data whose class a flip changes (small centred glyphs such as digits)."""
DEFAULT_TOKEN_GRID = 8
"""Token grid side assumed for the controls when no codec is given (the tiny recipes' 8 x 8 tokens)."""


@dataclass(frozen=True)
class BenchmarkSettings:
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    autoencoder: AutoencoderSettings = field(default_factory=AutoencoderSettings)
    holdout_fraction: float = 0.3
    """Share of each class held out of classifier training; half of it is the reference set."""
    split_seed: int = 0

    def as_dict(self) -> dict:
        return {
            "classifier": self.classifier.as_dict(),
            "autoencoder": self.autoencoder.as_dict(),
            "holdout_fraction": self.holdout_fraction,
            "split_seed": self.split_seed,
        }

    @classmethod
    def for_folder(cls, images_root: str | Path, image_size: Optional[int] = None, **classifier) -> "BenchmarkSettings":
        """Settings that fit the folder: no flips (and small shifts instead) where its dataset card says a
        flip changes the class; the classifier input at the folder's resolution when the card states one."""
        card = read_dataset_card(images_root) or {}
        flips = hflip_invariant(card)
        size = image_size or card.get("resolution") or ClassifierSettings().image_size
        return cls(
            ClassifierSettings(
                image_size=int(size), hflip=flips, max_shift_px=0 if flips else CENTRED_DATA_SHIFT_PX, **classifier
            )
        )


NAN_INTERVAL = (float("nan"), float("nan"))
SCORED = ("accuracy", "fd", "class_fd", "ae_fd", "ae_class_fd")
"""The metrics with a 95% interval: class accuracy and Fréchet distances in the classifier's and the
autoencoder's (``ae_``) feature spaces."""
INTERVAL_FIELDS = tuple(f"{name}_ci" for name in SCORED)


@dataclass(frozen=True)
class QualityRow:
    """One image set's scores with 95% bootstrap intervals over its images; ``name`` says what was scored."""

    name: str
    num_images: int
    accuracy: float
    fd: float
    precision: float
    recall: float
    class_fd: float = float("nan")
    """Mean over classes of the Fréchet distance to that class's reference images."""
    accuracy_ci: tuple[float, float] = NAN_INTERVAL
    fd_ci: tuple[float, float] = NAN_INTERVAL
    class_fd_ci: tuple[float, float] = NAN_INTERVAL
    ae_fd: float = float("nan")
    """Fréchet distance in the autoencoder's feature space."""
    ae_class_fd: float = float("nan")
    ae_fd_ci: tuple[float, float] = NAN_INTERVAL
    ae_class_fd_ci: tuple[float, float] = NAN_INTERVAL

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QualityRow":
        fields = {**data}
        for key in INTERVAL_FIELDS:
            fields[key] = tuple(fields.get(key, NAN_INTERVAL))
        return cls(**fields)

    def worse_than(self, other: "QualityRow") -> bool:
        """Intervals apart on every metric: lower accuracy and higher Fréchet distance than ``other`` in both
        feature spaces."""
        return (
            self.accuracy_ci[1] < other.accuracy_ci[0]
            and self.fd_ci[0] > other.fd_ci[1]
            and self.ae_fd_ci[0] > other.ae_fd_ci[1]
        )


def _with_interval(value: float, interval: tuple[float, float], digits: int) -> str:
    if not np.isfinite(interval[0]):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def format_rows(rows: list[QualityRow]) -> str:
    lines = [
        "| images | n | class accuracy [95% CI] | Fréchet distance [95% CI] | per-class FD [95% CI] | FD, autoencoder "
        "[95% CI] | per-class FD, autoencoder [95% CI] | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.num_images} | {_with_interval(row.accuracy, row.accuracy_ci, 3)} | "
            f"{_with_interval(row.fd, row.fd_ci, 2)} | {_with_interval(row.class_fd, row.class_fd_ci, 2)} | "
            f"{_with_interval(row.ae_fd, row.ae_fd_ci, 2)} | {_with_interval(row.ae_class_fd, row.ae_class_fd_ci, 2)} | "
            f"{row.precision:.3f} | {row.recall:.3f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    """Whether the benchmark can rank generators, and why, in one line."""

    valid: bool
    reason: str

    def line(self) -> str:
        return f"offline benchmark {'VALID' if self.valid else 'INVALID'}: {self.reason}"


def judge(rows: list[QualityRow], num_classes: int) -> Verdict:
    """Valid only if real held-out images and codec reconstructions score clearly better than the shape-free
    and detail-free controls on accuracy and Fréchet distance.

    Clearly: the 95% intervals are apart on both metrics, *and* the control keeps at most half of the real
    images' accuracy margin above chance. The second condition is what data whose classes are colours fails:
    its shape-free controls are still classified well above chance (0.87 against 1.00), so the classifier
    decides by colour and cannot tell a model that draws shapes from one that paints blobs.
    """
    by_name = {row.name: row for row in rows}
    missing = [name for name in (CALIBRATION_REAL, *SHAPE_CONTROLS) if name not in by_name]
    if missing:
        return Verdict(False, f"no {', '.join(missing)} row to judge by (build it with a codec: --data SHARDS)")
    chance = 1.0 / num_classes
    problems = []
    for good in (by_name[CALIBRATION_REAL], by_name.get(CALIBRATION_RECON)):
        if good is None:
            continue
        for name in SHAPE_CONTROLS:
            control = by_name[name]
            allowed = chance + 0.5 * (good.accuracy - chance)
            if not control.worse_than(good):
                problems.append(
                    f"'{name}' is not clearly worse than '{good.name}' (accuracy {control.accuracy:.3f} "
                    f"vs {good.accuracy:.3f}, FD {control.fd:.2f} vs {good.fd:.2f}, autoencoder FD "
                    f"{control.ae_fd:.2f} vs {good.ae_fd:.2f}: 95% intervals overlap)"
                )
            elif control.accuracy > allowed:
                problems.append(
                    f"'{name}' keeps accuracy {control.accuracy:.3f}, above {allowed:.3f} (chance plus "
                    f"half the margin of '{good.name}'): the classes are told apart without shape"
                )
    if problems:
        return Verdict(False, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    worst = max((by_name[name] for name in SHAPE_CONTROLS), key=lambda r: r.accuracy)
    real = by_name[CALIBRATION_REAL]
    return Verdict(
        True,
        f"real images beat the shape-free and detail-free controls clearly in both feature spaces (best control "
        f"'{worst.name}': accuracy {worst.accuracy:.3f}, FD {worst.fd:.2f}, autoencoder FD {worst.ae_fd:.2f} vs real "
        f"{real.accuracy:.3f}, {real.fd:.2f}, {real.ae_fd:.2f})",
    )


def _reference_stats(reference: np.ndarray, labels: np.ndarray) -> tuple[FeatureStats, dict[int, FeatureStats]]:
    """The reference set's feature statistics, overall and per class (classes with at least 2 images)."""
    by_class = {int(c): FeatureStats.of(reference[labels == c]) for c in np.unique(labels) if (labels == c).sum() >= 2}
    return FeatureStats.of(reference), by_class


class OfflineBenchmark:
    """A trained classifier and autoencoder, the reference features in both spaces and the calibration rows (the
    scorer of ``scoring``)."""

    name = "offline"

    def __init__(
        self,
        model: ConvClassifier,
        reference: np.ndarray,
        reference_labels: np.ndarray,
        meta: dict,
        autoencoder: ConvAutoencoder,
        ae_reference: np.ndarray,
    ):
        self.model, self.reference, self.reference_labels, self.meta = model, reference, reference_labels, meta
        self.autoencoder, self.ae_reference = autoencoder, ae_reference
        self.resamples = BOOTSTRAP_RESAMPLES
        """Bootstrap resamples per interval; 0 scores point estimates only (the ``*_lo``/``*_hi`` are NaN): for
        sweeps that put intervals on their repeats instead, at a fraction of the cost."""
        self.reference_stats, self.reference_by_class = _reference_stats(reference, reference_labels)
        self.ae_reference_stats, self.ae_reference_by_class = _reference_stats(ae_reference, reference_labels)

    @property
    def image_size(self) -> int:
        return self.meta["settings"]["classifier"]["image_size"]

    @property
    def calibration(self) -> list[QualityRow]:
        return [QualityRow.from_dict(row) for row in self.meta["calibration"]]

    @property
    def verdict(self) -> Verdict:
        return Verdict(**self.meta["verdict"])

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        features, predicted = classify(self.model, images, self.image_size)
        return {
            "features": features,
            "predicted": predicted,
            "ae_features": encode_images(self.autoencoder, images, self.image_size),
        }

    def score(self, features: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        """Accuracy, Fréchet distances (classifier and autoencoder, ``ae_*``) and precision/recall, each point
        estimate with its 95% bootstrap interval (``*_lo``, ``*_hi``), and ``benchmark_valid`` (1 or 0: the verdict,
        so it reaches MLflow)."""
        feats, predicted, ae_feats = features["features"], features["predicted"], features["ae_features"]
        correct = np.where(labels >= 0, predicted == labels, np.nan)

        def accuracy(rows):
            values = correct[rows]
            return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

        def fd(rows):
            return frechet_distance(FeatureStats.of(feats[rows]), self.reference_stats)

        def class_fd(rows):
            return class_frechet_distance(feats[rows], labels[rows], self.reference_by_class)

        def ae_fd(rows):
            return frechet_distance(FeatureStats.of(ae_feats[rows]), self.ae_reference_stats)

        def ae_class_fd(rows):
            return class_frechet_distance(ae_feats[rows], labels[rows], self.ae_reference_by_class)

        everything = np.arange(len(labels))
        precision, recall = precision_recall(self.reference, feats)
        scores = {"precision": precision, "recall": recall}
        statistics = {"accuracy": accuracy, "fd": fd, "class_fd": class_fd, "ae_fd": ae_fd, "ae_class_fd": ae_class_fd}
        for name, statistic in statistics.items():
            scores[name] = statistic(everything)
            scores[f"{name}_lo"], scores[f"{name}_hi"] = (
                bootstrap_interval(statistic, len(labels), scores[name], resamples=self.resamples)
                if self.resamples
                else (float("nan"), float("nan"))
            )
        if "verdict" in self.meta:
            scores["benchmark_valid"] = float(self.verdict.valid)
        return scores

    def row(self, name: str, images: np.ndarray, labels: np.ndarray) -> QualityRow:
        scores = self.score(self.features(images), labels)
        return QualityRow(
            name,
            len(images),
            **{k: scores[k] for k in ("accuracy", "fd", "precision", "recall", "class_fd", "ae_fd", "ae_class_fd")},
            **{f"{k}_ci": (scores[f"{k}_lo"], scores[f"{k}_hi"]) for k in SCORED},
        )

    # ---- storage ------------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        tensors = {f"{MODEL_PREFIX}{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"{AUTOENCODER_PREFIX}{k}": v.contiguous() for k, v in self.autoencoder.state_dict().items()})
        tensors[REFERENCE_KEY] = torch.from_numpy(np.ascontiguousarray(self.reference, dtype=np.float32))
        tensors[AE_REFERENCE_KEY] = torch.from_numpy(np.ascontiguousarray(self.ae_reference, dtype=np.float32))
        tensors[REFERENCE_LABELS_KEY] = torch.from_numpy(np.ascontiguousarray(self.reference_labels, dtype=np.int64))
        with local_atomic_writer(path) as handle:
            handle.write(save(tensors, metadata={"far_scale_offline_benchmark": json.dumps(self.meta)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OfflineBenchmark":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"offline benchmark not found: {path}. Create it with `far-scale eval "
                "offline-setup IMAGE_FOLDER --data SHARDS_URL` (it prints the path)."
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            text = (handle.metadata() or {}).get("far_scale_offline_benchmark")
        if text is None:
            raise ValueError(f"{path} is not an offline benchmark file (no far_scale_offline_benchmark metadata)")
        meta = json.loads(text)
        if meta.get("format") != BENCHMARK_FORMAT:
            raise ValueError(
                f"{path} has benchmark format {meta.get('format')}; this far-scale reads "
                f"{BENCHMARK_FORMAT}: re-run `far-scale eval offline-setup`"
            )
        tensors = load_file(str(path))
        settings = meta["settings"]["classifier"]
        model = ConvClassifier(meta["num_classes"], settings["width"], settings["feature_dim"])
        model.load_state_dict(_prefixed(tensors, MODEL_PREFIX))
        ae = meta["settings"]["autoencoder"]
        autoencoder = ConvAutoencoder(settings["image_size"], ae["width"], ae["feature_dim"])
        autoencoder.load_state_dict(_prefixed(tensors, AUTOENCODER_PREFIX))
        return cls(
            model.eval(),
            tensors[REFERENCE_KEY].double().numpy(),
            tensors[REFERENCE_LABELS_KEY].numpy(),
            meta,
            autoencoder.eval(),
            tensors[AE_REFERENCE_KEY].double().numpy(),
        )


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


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


def _blocks(images: np.ndarray, token_px: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> ``[N, H/t, W/t, t, t, 3]`` token-sized blocks (a view)."""
    n, h, w, c = images.shape
    if h % token_px or w % token_px:
        raise ValueError(f"images of {h} x {w} px do not split into tokens of {token_px} px")
    return images.reshape(n, h // token_px, token_px, w // token_px, token_px, c).transpose(0, 1, 3, 2, 4, 5)


def _unblocks(blocks: np.ndarray) -> np.ndarray:
    n, gh, gw, t, _, c = blocks.shape
    return np.ascontiguousarray(blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * t, gw * t, c))


def shuffle_tokens(images: np.ndarray, token_px: int, seed: int) -> np.ndarray:
    """Each image's token-sized patches in a random order: every patch intact, no global shape left."""
    rng = np.random.default_rng(seed)
    blocks = _blocks(images, token_px)
    n, gh, gw = blocks.shape[:3]
    flat = blocks.reshape(n, gh * gw, *blocks.shape[3:])
    shuffled = np.stack([flat[i, rng.permutation(gh * gw)] for i in range(n)])
    return _unblocks(shuffled.reshape(blocks.shape))


def token_means(images: np.ndarray, token_px: int) -> np.ndarray:
    """Each token-sized patch replaced by its mean colour: the layout kept, no edge inside a token."""
    blocks = _blocks(images, token_px).astype(np.float64)
    means = blocks.mean(axis=(3, 4), keepdims=True)
    return _unblocks(np.broadcast_to(means, blocks.shape).round().astype(np.uint8))


def shuffle_pixels(images: np.ndarray, seed: int) -> np.ndarray:
    """Each image's pixels (all channels together) in a random order: colour histogram only."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    flat = images.reshape(n, h * w, c)
    return np.stack([flat[i, rng.permutation(h * w)] for i in range(n)]).reshape(images.shape)


def token_pixels(codec, image_size: int) -> int:
    """Side in pixels of the image area one latent token covers."""
    if codec is None:
        return image_size // DEFAULT_TOKEN_GRID
    info = codec.info
    return info.image_size * info.patch_size // info.latent_shape[-1]


def _splits(images_root: str, settings: BenchmarkSettings) -> tuple[ImageList, list[int], list[int], list[int]]:
    """(all images, train, reference, calibration indices). A folder with a held-out ``val/`` split is used
    as written: the classifier learns on ``train/``, ``val/`` is halved into reference and calibration (per
    class, alternately). Otherwise a seeded ``holdout_fraction`` of each class is held out."""
    images = list_images(images_root)
    heldout = heldout_images(images_root, images.classes)
    if heldout is None:
        return (images, *split_holdout(images.labels, settings.holdout_fraction, settings.split_seed))
    train_paths = [str(Path(images.root, p).relative_to(images_root)) for p in images.paths]
    both = ImageList(Path(images_root), images.classes, train_paths + heldout.paths, images.labels + heldout.labels)
    offset = len(train_paths)
    reference, calibration, seen = [], [], {}
    for index, label in enumerate(heldout.labels):
        (reference if seen.get(label, 0) % 2 == 0 else calibration).append(offset + index)
        seen[label] = seen.get(label, 0) + 1
    return both, list(range(offset)), reference, calibration


def benchmark_key(fingerprint: str, settings: BenchmarkSettings, codec_sha256: Optional[str]) -> str:
    text = json.dumps(
        {"format": BENCHMARK_FORMAT, "data": fingerprint, "settings": settings.as_dict(), "codec": codec_sha256},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def build_benchmark(
    images_root: str,
    cache_dir: str | Path,
    data_url: Optional[str] = None,
    settings: BenchmarkSettings = BenchmarkSettings(),
    codec_weights: Optional[str] = None,
    verbose: bool = True,
) -> tuple[Path, OfflineBenchmark, bool]:
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
    images, train, reference, calibration = _splits(images_root, settings)
    load_size = codec.info.image_size if codec else settings.classifier.image_size
    say(
        f"offline benchmark: loading {len(images)} images of {len(images.classes)} classes at {load_size} px "
        f"({len(train)} train the classifier, {len(reference)} reference, {len(calibration)} calibrate)"
    )
    pixels = np.stack([load_image(images.root / p, load_size) for p in images.paths]).transpose(0, 2, 3, 1)
    labels = np.asarray(images.labels, dtype=np.int64)

    def report(epoch, epochs, loss):
        say(f"  classifier epoch {epoch}/{epochs}: loss {loss:.4f}")

    model = train_classifier(pixels[train], labels[train], len(images.classes), settings.classifier, report)
    reference_features, _ = classify(model, pixels[reference], settings.classifier.image_size)

    def report_autoencoder(epoch, epochs, loss):
        say(f"  autoencoder epoch {epoch}/{epochs}: reconstruction MSE {loss:.4f}")

    size = settings.classifier.image_size
    autoencoder = train_autoencoder(pixels[train], size, settings.autoencoder, report_autoencoder)
    meta = {
        "format": BENCHMARK_FORMAT,
        "key": key,
        "data_fingerprint": fingerprint,
        "images_root": str(images_root),
        "classes": images.classes,
        "num_classes": len(images.classes),
        "settings": settings.as_dict(),
        "num_train": len(train),
        "num_reference": len(reference),
        "codec": codec.info.as_dict() if codec else None,
        "calibration": [],
    }
    bench = OfflineBenchmark(
        model,
        reference_features,
        labels[reference],
        meta,
        autoencoder,
        encode_images(autoencoder, pixels[reference], size),
    )
    _, train_predicted = classify(model, pixels[train], settings.classifier.image_size)
    meta["train_accuracy"] = float((train_predicted == labels[train]).mean())
    meta["autoencoder_heldout_mse"] = reconstruction_error(autoencoder, pixels[calibration], size)
    rows = [bench.row(CALIBRATION_REAL, pixels[calibration], labels[calibration])]
    if codec is not None:
        rows.append(bench.row(CALIBRATION_RECON, _reconstructions(codec, pixels[calibration]), labels[calibration]))
        count = len(calibration)
        random_labels = np.arange(count, dtype=np.int64) % len(images.classes)
        rows.append(
            bench.row(
                CALIBRATION_RANDOM, _random_latent_images(manifest, codec, count, settings.split_seed), random_labels
            )
        )
    real, real_labels = pixels[calibration], labels[calibration]
    token_px = token_pixels(codec, load_size)
    for name, corrupted in (
        (CONTROL_TOKENS_SHUFFLED, shuffle_tokens(real, token_px, settings.split_seed)),
        (CONTROL_TOKEN_MEANS, token_means(real, token_px)),
        (CONTROL_PIXELS_SHUFFLED, shuffle_pixels(real, settings.split_seed)),
    ):
        rows.append(bench.row(name, corrupted, real_labels))
    meta["calibration"] = [row.as_dict() for row in rows]
    meta["control_token_px"] = token_px
    meta["holdout_accuracy"] = rows[0].accuracy
    meta["verdict"] = asdict(judge(rows, len(images.classes)))
    bench.save(path)
    return path, bench, False
