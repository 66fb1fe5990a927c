"""``manifest.json``: what a latent dataset holds (SPEC §7), shared by data prep and training."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from far_scale.data.contract import FORMAT_VERSION, MANIFEST_NAME
from far_scale.data.spec import DataSpec
from far_scale.data.storage import filesystem, join, write_bytes_atomic

REQUIRED_KEYS = ("format_version", "codec", "source", "shards", "stats", "images_per_shard")


class ManifestError(ValueError):
    """A missing, unreadable or inconsistent manifest; the message names the URL."""


def manifest_url(data_url: str) -> str:
    fs, root = filesystem(data_url)
    return fs.unstrip_protocol(join(root, MANIFEST_NAME))


def read_manifest(data_url: str) -> dict[str, Any]:
    fs, root = filesystem(data_url)
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        raise ManifestError(f"no {MANIFEST_NAME} at {data_url}: run `far-scale data encode` (or "
                            "`far-scale data manifest`) for this URL first")
    try:
        manifest = json.loads(fs.cat_file(path))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{data_url}/{MANIFEST_NAME} is not valid JSON: {exc}") from None
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"{data_url}/{MANIFEST_NAME} lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{data_url}/{MANIFEST_NAME} has format_version {manifest['format_version']}; "
                            f"this far-scale reads {FORMAT_VERSION}")
    return manifest


def write_manifest(data_url: str, manifest: dict[str, Any]) -> None:
    fs, root = filesystem(data_url)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    write_bytes_atomic(fs, join(root, MANIFEST_NAME), text.encode())


def data_spec(manifest: dict[str, Any]) -> DataSpec:
    codec = manifest["codec"]
    return DataSpec(seq_len=codec["seq_len"], token_dim=codec["token_dim"],
                    num_classes=len(manifest["source"]["classes"]), num_images=manifest["source"]["num_images"])


def combine_stats(per_shard: list[dict], token_dim: int, channels: int) -> dict[str, Any]:
    """Per-channel mean/std and the global scale (1 / std) from per-shard sums over token dims."""
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
    return {"num_values_per_dim": count, "channel_mean": channel_mean, "channel_std": channel_std,
            "mean": mean_all, "std": std_all, "scale": 1.0 / std_all if std_all > 0 else 1.0}


def resolve_manifest_spec(data_url: str) -> Optional[tuple[DataSpec, str]]:
    """The data spec from the manifest at ``data_url``, or None when there is none (other problems raise)."""
    fs, root = filesystem(data_url)
    if not fs.exists(join(root, MANIFEST_NAME)):
        return None
    return data_spec(read_manifest(data_url)), manifest_url(data_url)
