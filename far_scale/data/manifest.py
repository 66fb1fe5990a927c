"""``manifest.json``: what a latent dataset holds (docs/concepts.md, data), shared by data prep and training."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from far_scale.data.contract import FORMAT_VERSION, MANIFEST_NAME
from far_scale.data.images import hflip_invariant
from far_scale.data.normalization import LatentNormalization
from far_scale.data.spec import DataSpec
from far_scale.data.storage import filesystem, join, write_bytes_atomic

CODEC_KEYS = {
    "name": str,
    "seq_len": int,
    "token_dim": int,
    "scale": float,
    "image_size": int,
    "weights_sha256": str,
    "weights_path": str,
    "moments": int,
}
SOURCE_KEYS = {"num_images": int, "classes": list}
SHARD_KEYS = {"name": str, "num_samples": int, "num_bytes": int, "sha256": str}


class ManifestError(ValueError):
    """A missing, unreadable or inconsistent manifest; the message names the URL and the field."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, validated: the one reader of a dataset's description.

    ``codec`` is the codec's own record (name, weights and checksum, shape, scale); ``source``
    where the images came from (``classes``, ``num_images``); ``stats`` the latent statistics.
    """

    codec: Mapping[str, Any]
    source: Mapping[str, Any]
    shards: tuple[ShardEntry, ...]
    stats: Mapping[str, Any]
    images_per_shard: int
    created: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def scale(self) -> float:
        """Latent scale factor: training multiplies the codec's latents by it."""
        return float(self.codec["scale"])

    def normalization(self, mode: str, where: str) -> LatentNormalization:
        """How this data's latents become tokens under ``data.normalize`` = ``mode`` (``where``: its URL)."""
        return LatentNormalization.from_stats(mode, self.stats, self.scale, int(self.codec["token_dim"]), where)

    @property
    def classes(self) -> list[str]:
        return list(self.source["classes"])

    @property
    def num_images(self) -> int:
        return int(self.source["num_images"])

    @property
    def content_digest(self) -> str:
        """sha256 of the shards' names, sizes and checksums in order: equal digests, the same samples in the same
        shards (wherever they are stored)."""
        listing = [[entry.name, entry.num_samples, entry.sha256] for entry in self.shards]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @property
    def shard_sizes(self) -> list[int]:
        return [entry.num_samples for entry in self.shards]

    @property
    def spec(self) -> DataSpec:
        """The data shape a model and the plan need."""
        card = self.source.get("dataset")
        return DataSpec(
            seq_len=int(self.codec["seq_len"]),
            token_dim=int(self.codec["token_dim"]),
            num_classes=len(self.classes),
            num_images=self.num_images,
            hflip_invariant=hflip_invariant(card),
        )

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Manifest":
        """Validate a parsed manifest; ``ManifestError`` names ``where`` and every bad field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a JSON object")
        problems = [
            f"lacks {key}"
            for key in ("format_version", "codec", "source", "shards", "stats", "images_per_shard")
            if key not in data
        ]
        if problems:
            raise ManifestError(f"{where} {', '.join(problems)}")
        if data["format_version"] != FORMAT_VERSION:
            raise ManifestError(
                f"{where} has format_version {data['format_version']}; this far-scale reads "
                f"{FORMAT_VERSION}: re-encode the dataset with this version"
            )
        problems += _typed_problems(data["codec"], CODEC_KEYS, "codec")
        problems += _typed_problems(data["source"], SOURCE_KEYS, "source")
        if not isinstance(data["shards"], list) or not data["shards"]:
            problems.append("shards: expected a non-empty list")
        else:
            for i, entry in enumerate(data["shards"]):
                problems += _typed_problems(entry, SHARD_KEYS, f"shards[{i}]")
        if problems:
            raise ManifestError(f"{where} is invalid: {'; '.join(problems)}")
        shards = tuple(ShardEntry(**{key: entry[key] for key in SHARD_KEYS}) for entry in data["shards"])
        if sum(entry.num_samples for entry in shards) != data["source"]["num_images"]:
            raise ManifestError(
                f"{where}: the shards hold {sum(e.num_samples for e in shards)} samples but "
                f"source.num_images is {data['source']['num_images']}"
            )
        return cls(
            codec=data["codec"],
            source=data["source"],
            shards=shards,
            stats=data["stats"],
            images_per_shard=int(data["images_per_shard"]),
            created=data.get("created", {}),
            format_version=data["format_version"],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "codec": dict(self.codec),
            "source": dict(self.source),
            "images_per_shard": self.images_per_shard,
            "shards": [asdict(entry) for entry in self.shards],
            "stats": dict(self.stats),
            "created": dict(self.created),
        }


def _typed_problems(section: Any, keys: Mapping[str, type], name: str) -> list[str]:
    if not isinstance(section, dict):
        return [f"{name}: expected an object"]
    problems = []
    for key, kind in keys.items():
        if key not in section:
            problems.append(f"{name}.{key} is missing")
        elif not isinstance(section[key], kind) or isinstance(section[key], bool):
            if not (kind is float and isinstance(section[key], int)):
                problems.append(f"{name}.{key} should be {kind.__name__}, got {section[key]!r}")
    return problems


def read_manifest(data_url: str) -> Manifest:
    """The validated manifest of the dataset at ``data_url`` (local path or URL)."""
    fs, root = filesystem(data_url)
    path = join(root, MANIFEST_NAME)
    where = f"{data_url}/{MANIFEST_NAME}"
    if not fs.exists(path):
        raise ManifestError(
            f"no {MANIFEST_NAME} at {data_url}: run `far-scale data encode` (or "
            "`far-scale data manifest`) for this URL first"
        )
    try:
        data = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"{where} is not valid JSON ({exc}): re-run `far-scale data manifest` for this URL "
            "to rewrite it from the shards' sidecars"
        ) from None
    return Manifest.from_dict(data, where)


def write_manifest(data_url: str, manifest: Manifest) -> None:
    fs, root = filesystem(data_url)
    text = json.dumps(manifest.as_dict(), indent=2, sort_keys=False) + "\n"
    write_bytes_atomic(fs, join(root, MANIFEST_NAME), text.encode())


def combine_stats(per_shard: list[dict], token_dim: int, channels: int) -> dict[str, Any]:
    """Per-channel mean/std, the global scale (1 / std) and, where every shard recorded them, the per-dimension
    extremes (``dim_min``, ``dim_max``) from per-shard sums over token dims."""
    count = sum(s["count"] for s in per_shard)
    sums = [sum(s["sum"][d] for s in per_shard) for d in range(token_dim)]
    sumsqs = [sum(s["sumsq"][d] for s in per_shard) for d in range(token_dim)]
    per_channel = token_dim // channels  # token dims are (channel, patch row, patch col)
    channel_mean, channel_std = [], []
    for c in range(channels):
        dims = range(c * per_channel, (c + 1) * per_channel)
        n = count * per_channel
        mean = sum(sums[d] for d in dims) / n
        channel_mean.append(mean)
        channel_std.append(math.sqrt(max(sum(sumsqs[d] for d in dims) / n - mean**2, 0.0)))
    n_all = count * token_dim
    mean_all = sum(sums) / n_all
    std_all = math.sqrt(max(sum(sumsqs) / n_all - mean_all**2, 0.0))
    stats = {
        "num_values_per_dim": count,
        "channel_mean": channel_mean,
        "channel_std": channel_std,
        "mean": mean_all,
        "std": std_all,
        "scale": 1.0 / std_all if std_all > 0 else 1.0,
    }
    if all("min" in s and "max" in s for s in per_shard):
        stats["dim_min"] = [min(s["min"][d] for s in per_shard) for d in range(token_dim)]
        stats["dim_max"] = [max(s["max"][d] for s in per_shard) for d in range(token_dim)]
    return stats


def find_manifest(data_url: str) -> Optional[Manifest]:
    """The manifest at ``data_url``, or None when there is none (an invalid one raises)."""
    fs, root = filesystem(data_url)
    if not fs.exists(join(root, MANIFEST_NAME)):
        return None
    return read_manifest(data_url)
