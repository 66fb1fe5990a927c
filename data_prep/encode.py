"""The encoding job: images -> codec moments (image + flip) -> webdataset shards + manifest.

Work is split by global image index: shard s holds images [s * N, (s + 1) * N) and belongs
to worker s mod W, so any number of workers write disjoint shards with no coordination.
A shard appears under its final name only when complete, then its stats sidecar; a re-run
skips shards whose sidecar exists and redoes the rest. Whoever finds every sidecar present
at the end writes manifest.json (idempotent).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from far_scale.codecs import Codec, load_codec
from far_scale.data.contract import (
    FORMAT_VERSION,
    LATENT_DTYPE,
    NUM_VIEWS,
    SHARD_PREFIX,
    TAR_MODE,
    TAR_MTIME,
    TAR_OWNER,
    encode_sample,
    shard_name,
    stats_name,
)
from far_scale.data.images import (
    ImageList,
    list_images,
    load_image,
    read_dataset_card,
    shuffled,
    to_unit_range,
)
from far_scale.data.manifest import Manifest, combine_stats, write_manifest
from far_scale.data.storage import (
    atomic_writer,
    filesystem,
    join,
    redact_command,
    write_bytes_atomic,
)


@dataclass(frozen=True)
class WorkerSlot:
    worker_id: int = 0
    num_workers: int = 1

    @classmethod
    def from_env(cls, worker_id: Optional[int], num_workers: Optional[int]) -> "WorkerSlot":
        """Explicit values, else a SLURM array task, else torchrun's rank, else a single worker."""
        env = os.environ
        if worker_id is None and num_workers is None:
            if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
                worker_id = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                num_workers = int(env["SLURM_ARRAY_TASK_COUNT"])
            elif "RANK" in env and "WORLD_SIZE" in env:
                worker_id, num_workers = int(env["RANK"]), int(env["WORLD_SIZE"])
        slot = cls(worker_id or 0, num_workers or 1)
        if not 0 <= slot.worker_id < slot.num_workers:
            raise ValueError(f"worker id {slot.worker_id} is outside [0, {slot.num_workers})")
        return slot


@dataclass(frozen=True)
class EncodeJob:
    src: str
    dst: str
    codec: str
    codec_weights: str
    image_size: int
    patch_size: Optional[int] = None
    images_per_shard: int = 1000
    batch_size: int = 64
    loader_workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    class_map: Optional[str] = None
    order_seed: int = 0
    """Seed of the global image order (a permutation of the sorted file list)."""
    slot: WorkerSlot = field(default_factory=WorkerSlot)
    prefix: str = SHARD_PREFIX
    progress: bool = True


class _ImageDataset(Dataset):
    def __init__(self, images: ImageList, indices: list[int], size: int):
        self.images, self.indices, self.size = images, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        path = self.images.root / self.images.paths[index]
        try:
            pixels = load_image(path, self.size)
        except OSError as exc:
            raise OSError(f"cannot decode image {path}: {exc}") from None
        return index, self.images.labels[index], torch.from_numpy(pixels)


class ShardStats:
    """Count, float64 latent sums and per-dimension extremes of the mean moment of one shard, and its labels."""

    def __init__(self, token_dim: int):
        self.count = 0
        self.sum = np.zeros(token_dim, dtype=np.float64)
        self.sumsq = np.zeros(token_dim, dtype=np.float64)
        self.min = np.full(token_dim, np.inf)
        self.max = np.full(token_dim, -np.inf)
        self.labels: dict[int, int] = {}

    def add(self, label: int, latents: np.ndarray) -> None:
        values = latents[:, 0].astype(np.float64).reshape(-1, latents.shape[-1])
        self.count += values.shape[0]
        self.sum += values.sum(0)
        self.sumsq += (values**2).sum(0)
        self.min = np.minimum(self.min, values.min(0))
        self.max = np.maximum(self.max, values.max(0))
        self.labels[label] = self.labels.get(label, 0) + 1

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sumsq": self.sumsq.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
        }


class _HashingWriter:
    """File wrapper that hashes and counts what passes through it."""

    def __init__(self, inner):
        self.inner, self.digest, self.size = inner, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def shard_ranges(num_images: int, images_per_shard: int) -> list[range]:
    return [
        range(s * images_per_shard, min((s + 1) * images_per_shard, num_images))
        for s in range(math.ceil(num_images / images_per_shard))
    ]


def _encode_batch(codec: Codec, images: torch.Tensor, device: torch.device, autocast_dtype) -> np.ndarray:
    """[B, 2 views, K, L, D] float moments of each image and its horizontal flip."""
    x = to_unit_range(images.to(device, non_blocking=True))
    both = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        moments = codec.encode(both).float()
    image, flip = moments.chunk(NUM_VIEWS)
    # Stored as float16: stats below are computed on exactly the stored values.
    return torch.stack([image, flip], dim=1).cpu().numpy().astype(LATENT_DTYPE)


def _write_shard(
    fs, root: str, job: EncodeJob, shard: int, samples: list[tuple[int, int, np.ndarray]], token_dim: int
) -> dict:
    stats = ShardStats(token_dim)
    path = join(root, shard_name(shard, job.prefix))
    with atomic_writer(fs, path) as raw:
        hashed = _HashingWriter(raw)
        with wds.TarWriter(
            hashed, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False
        ) as tar:
            for index, label, latents in samples:
                tar.write(encode_sample(index, label, latents))
                stats.add(label, latents)
    record = {
        "name": shard_name(shard, job.prefix),
        "index": shard,
        "num_samples": len(samples),
        "num_bytes": hashed.size,
        "sha256": hashed.digest.hexdigest(),
        **stats.as_dict(),
    }
    write_bytes_atomic(fs, join(root, stats_name(shard, job.prefix)), json.dumps(record).encode())
    return record


def _load_stats(fs, root: str, shard: int, prefix: str) -> Optional[dict]:
    path = join(root, stats_name(shard, prefix))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def build_manifest(job: EncodeJob, images: ImageList, codec: Codec, records: list[dict]) -> Manifest:
    info = codec.info
    stats = combine_stats(records, info.token_dim, info.latent_shape[0])
    return Manifest.from_dict(
        {
            "format_version": FORMAT_VERSION,
            "codec": {
                **info.as_dict(),
                "scale": stats["scale"],
                "dtype": "float16",
                "moments": 2 if info.posterior else 1,
            },
            "source": {
                "root": str(images.root),
                "num_images": len(images),
                "classes": images.classes,
                "image_size": job.image_size,
                "order_seed": job.order_seed,
                **({"dataset": card} if (card := read_dataset_card(job.src)) else {}),
            },
            "images_per_shard": job.images_per_shard,
            "shards": [{k: r[k] for k in ("name", "num_samples", "num_bytes", "sha256")} for r in records],
            "stats": stats,
            "created": {
                "command": " ".join(redact_command(sys.argv)),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        },
        f"the manifest built for {job.dst}",
    )


def job_images(job: EncodeJob) -> ImageList:
    """The job's images in their global order (global index i = position i)."""
    return shuffled(list_images(job.src, job.class_map), job.order_seed)


def try_write_manifest(job: EncodeJob, images: ImageList, codec: Codec) -> Optional[Manifest]:
    """Write manifest.json if every shard's sidecar exists; returns it, or None if shards are missing."""
    fs, root = filesystem(job.dst)
    records = []
    for shard in range(len(shard_ranges(len(images), job.images_per_shard))):
        record = _load_stats(fs, root, shard, job.prefix)
        if record is None:
            return None
        records.append(record)
    manifest = build_manifest(job, images, codec, records)
    write_manifest(job.dst, manifest)
    return manifest


@dataclass
class EncodeSummary:
    shards_total: int
    shards_mine: int
    shards_written: int
    shards_skipped: int
    images_encoded: int
    seconds: float
    manifest_written: bool

    def __str__(self) -> str:
        rate = self.images_encoded / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.shards_written} shards written, {self.shards_skipped} already complete "
            f"({self.shards_mine} of {self.shards_total} are this worker's); {self.images_encoded} images in "
            f"{self.seconds:.1f} s ({rate:.1f} images/s); manifest "
            f"{'written' if self.manifest_written else 'not yet (other workers still running)'}"
        )


def run_encode(job: EncodeJob) -> EncodeSummary:
    start = time.perf_counter()
    images = job_images(job)
    codec = load_codec(job.codec, job.codec_weights, job.image_size, job.patch_size)
    device = torch.device(job.device)
    codec.to(device)
    autocast_dtype = torch.bfloat16 if job.precision == "bf16" else None
    fs, root = filesystem(job.dst)
    fs.makedirs(root, exist_ok=True)
    ranges = shard_ranges(len(images), job.images_per_shard)
    mine = [s for s in range(len(ranges)) if s % job.slot.num_workers == job.slot.worker_id]
    todo = [s for s in mine if not fs.exists(join(root, stats_name(s, job.prefix)))]
    indices = [i for s in todo for i in ranges[s]]
    shard_of = {i: s for s in todo for i in ranges[s]}
    # Batches never cross a shard boundary and start at the shard's first image, so every image
    # is encoded in the same batch whatever the number of workers: identical bytes either way.
    positions = {index: position for position, index in enumerate(indices)}
    batches = [
        [positions[i] for i in ranges[s][b : b + job.batch_size]]
        for s in todo
        for b in range(0, len(ranges[s]), job.batch_size)
    ]
    loader = DataLoader(
        _ImageDataset(images, indices, job.image_size),
        batch_sampler=batches,
        num_workers=job.loader_workers,
        pin_memory=device.type == "cuda",
    )
    pending: dict[int, list] = {}
    written = 0
    with tqdm(
        total=len(indices),
        unit="img",
        desc=f"encode w{job.slot.worker_id}",
        disable=not job.progress,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        for batch_indices, batch_labels, pixels in loader:
            moments = _encode_batch(codec, pixels, device, autocast_dtype)
            for index, label, latents in zip(batch_indices.tolist(), batch_labels.tolist(), moments):
                shard = shard_of[index]
                pending.setdefault(shard, []).append((index, label, latents))
                if len(pending[shard]) == len(ranges[shard]):
                    _write_shard(fs, root, job, shard, pending.pop(shard), codec.info.token_dim)
                    written += 1
            bar.update(len(batch_indices))
    manifest = try_write_manifest(job, images, codec)
    return EncodeSummary(
        len(ranges),
        len(mine),
        written,
        len(mine) - len(todo),
        len(indices),
        time.perf_counter() - start,
        manifest is not None,
    )
