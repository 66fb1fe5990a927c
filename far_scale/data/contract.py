"""The shard format shared by data preparation (writer) and training (reader); docs/concepts.md, data.

One sample per image: ``__key__`` (global image index, zero-padded), ``cls`` (class index
as text) and ``latents.npy``: float16 ``[2, K, L, D]`` = (image, horizontal flip) x
(posterior mean, log-variance | deterministic code) x tokens x token dims.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SHARD_PREFIX = "shard"
LABEL_FIELD = "cls"
LATENT_FIELD = "latents.npy"
KEY_DIGITS = 9
LATENT_DTYPE = np.float16
NUM_VIEWS = 2  # image, horizontal flip
# Fixed tar metadata so that the same input always gives byte-identical shards.
TAR_MTIME = 0.0
TAR_OWNER = "far-scale"
TAR_MODE = 0o444


def shard_name(index: int, prefix: str = SHARD_PREFIX) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_name(index: int, prefix: str = SHARD_PREFIX) -> str:
    """Sidecar with the shard's count, checksum and latent sums; written after the shard itself."""
    return f"{prefix}-{index:06d}.stats.json"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def encode_sample(index: int, label: int, latents: np.ndarray) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(latents.astype(LATENT_DTYPE)), allow_pickle=False)
    return {"__key__": sample_key(index), LABEL_FIELD: str(label).encode(), LATENT_FIELD: buffer.getvalue()}


@dataclass(frozen=True)
class LatentSample:
    key: str
    label: int
    latents: np.ndarray  # [2, K, L, D]


def decode_sample(sample: dict) -> LatentSample:
    """Inverse of ``encode_sample`` for a dict of raw bytes (as webdataset yields)."""
    latents = np.load(io.BytesIO(sample[LATENT_FIELD]), allow_pickle=False)
    if latents.ndim != 4 or latents.shape[0] != NUM_VIEWS:
        raise ValueError(f"sample {sample.get('__key__')}: latents have shape {latents.shape}, expected [2, K, L, D]")
    return LatentSample(sample["__key__"], int(sample[LABEL_FIELD]), latents)
