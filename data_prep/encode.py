"""The encoding job: images -> codec moments (image + flip) -> webdataset shards + manifest.

Work is split by global image index: shard s holds images [s * N, (s + 1) * N) and belongs
to worker s mod W, so any number of workers write disjoint shards with no coordination.
A shard appears under its final name only when complete, then its stats sidecar, which also records what made
it: the codec's checksum and a digest of exactly the images it holds (relative path, class, size and modification
time of each). A re-run reuses a shard only when both match this job; a shard made by another codec or from
other images is refused, naming the folder and the mismatch, unless ``overwrite`` (every shard of the worker
rewritten, atomically one by one; the old manifest removed first, the new one written last). Whoever finds every
sidecar present and matching at the end writes manifest.json (idempotent).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    MANIFEST_NAME,
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
    ImageFolderError,
    ImageList,
    SkippedFile,
    UnreadableImageError,
    list_images,
    load_image,
    read_dataset_card,
    report_lines,
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
from far_scale.errors import ActionableError


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
    overwrite: bool = False
    """Rewrite every shard of this worker even where one exists (another codec, other images)."""
    skip_unreadable: bool = False
    """Go on without images that cannot be decoded (recorded in the sidecars and the manifest) instead of stopping."""


class EncodeConflictError(ActionableError, ValueError):
    """The output folder holds shards this job did not make (another codec, other images); names it and the fix."""


class _ImageDataset(Dataset):
    """Decoded images by global index; one that cannot be decoded comes back as its reason instead of pixels (the
    encoding loop stops on it, naming the file, or skips it with ``--skip-unreadable``)."""

    def __init__(self, images: ImageList, indices: list[int], size: int):
        self.images, self.indices, self.size = images, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            return (
                index,
                self.images.labels[index],
                torch.from_numpy(load_image(self.images.root / self.images.paths[index], self.size)),
            )
        except UnreadableImageError as exc:
            return index, self.images.labels[index], exc.reason


def _collate(items: list) -> tuple[list[int], list[int], Optional[torch.Tensor], list[tuple[int, str]]]:
    """(indices, labels, pixels) of the decoded images of a batch, and (index, reason) of the others."""
    decoded = [item for item in items if isinstance(item[2], torch.Tensor)]
    failed = [(index, reason) for index, _, reason in items if not isinstance(reason, torch.Tensor)]
    pixels = torch.stack([item[2] for item in decoded]) if decoded else None
    return [item[0] for item in decoded], [item[1] for item in decoded], pixels, failed


def images_digest(images: ImageList, indices: range) -> str:
    """sha256 over exactly the images of ``indices``: relative path, class, byte size and modification time of each
    (an image added, removed, renamed, relabelled or edited since changes it)."""
    digest = hashlib.sha256()
    for index in indices:
        stat = (images.root / images.paths[index]).stat()
        digest.update(f"{images.paths[index]}\0{images.labels[index]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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
    fs,
    root: str,
    job: EncodeJob,
    shard: int,
    samples: list[tuple[int, int, np.ndarray]],
    token_dim: int,
    identity: dict,
    unreadable: list[dict],
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
        **identity,
        "unreadable": unreadable,
        **stats.as_dict(),
    }
    write_bytes_atomic(fs, join(root, stats_name(shard, job.prefix)), json.dumps(record).encode())
    return record


def _load_stats(fs, root: str, shard: int, prefix: str) -> Optional[dict]:
    path = join(root, stats_name(shard, prefix))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _report(images: ImageList, records: list[dict]) -> dict:
    """The input report (``ImageList.report``) with the images that could not be decoded added as skipped."""
    unreadable = [
        SkippedFile(item["path"], f"unreadable ({item['reason']})") for r in records for item in r["unreadable"]
    ]
    unread = {item.path for item in unreadable}
    kept = [i for i, path in enumerate(images.paths) if path not in unread]
    encoded = ImageList(
        images.root,
        images.classes,
        [images.paths[i] for i in kept],
        [images.labels[i] for i in kept],
        images.skipped + tuple(unreadable),
    )
    return encoded.report()


def build_manifest(job: EncodeJob, images: ImageList, codec: Codec, records: list[dict]) -> Manifest:
    info = codec.info
    stats = combine_stats(records, info.token_dim, info.latent_shape[0])
    report = _report(images, records)
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
                "root": str(images.root.resolve()),
                "num_images": report["images"],
                "classes": images.classes,
                "image_size": job.image_size,
                "order_seed": job.order_seed,
                "report": report,
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


def shard_identity(images: ImageList, indices: range, codec: Codec) -> dict:
    """What a shard of ``indices`` made by ``codec`` records about its making (compared on every re-run)."""
    return {"codec_sha256": codec.info.weights_sha256, "images_digest": images_digest(images, indices)}


def identity_mismatch(record: dict, identity: dict) -> Optional[str]:
    """Why an existing shard's sidecar is not this job's shard, or None when it is."""
    if "codec_sha256" not in record or "images_digest" not in record:
        return "written before far-scale recorded what made a shard (codec and image digest)"
    if record["codec_sha256"] != identity["codec_sha256"]:
        return (
            f"made by another codec (weights sha256 {record['codec_sha256'][:12]}..., this job's "
            f"{identity['codec_sha256'][:12]}...)"
        )
    if record["images_digest"] != identity["images_digest"]:
        return "made from other images (images added, removed, renamed or changed since, or another --order-seed)"
    return None


def _conflicts(fs, root: str, job: EncodeJob, shards: list[int], identities: dict[int, dict]) -> list[str]:
    """The existing shards among ``shards`` that this job did not make, one line each."""
    lines = []
    for shard in shards:
        record = _load_stats(fs, root, shard, job.prefix)
        if record is not None:
            reason = identity_mismatch(record, identities[shard])
            if reason:
                lines.append(f"{stats_name(shard, job.prefix)}: {reason}")
    return lines


def _stray_shards(fs, root: str, job: EncodeJob, num_shards: int) -> list[int]:
    """Indices of this worker's sidecars beyond the job's shards (left by a run over more images)."""
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(join(root, f"{job.prefix}-*.stats.json"))]
    indices = sorted(int(n[len(job.prefix) + 1 :].split(".")[0]) for n in names)
    return [i for i in indices if i >= num_shards and i % job.slot.num_workers == job.slot.worker_id]


def refuse(job: EncodeJob, problems: list[str]) -> None:
    """Raise ``EncodeConflictError`` naming the folder, the first problems and the fix."""
    shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    raise EncodeConflictError(
        f"{job.dst} holds shards this job did not make: {shown}. Nothing was written. Re-run with --overwrite to "
        "rewrite every shard (and the manifest) for these images and this codec, or encode into a new folder"
    )


def try_write_manifest(job: EncodeJob, images: ImageList, codec: Codec) -> Optional[Manifest]:
    """Write manifest.json if every shard's sidecar exists and is this job's (codec and images); returns it, or
    None if shards are missing. A sidecar another job made is refused (``EncodeConflictError``): the manifest never
    describes shards this job did not check."""
    fs, root = filesystem(job.dst)
    records, problems = [], []
    for shard, indices in enumerate(shard_ranges(len(images), job.images_per_shard)):
        record = _load_stats(fs, root, shard, job.prefix)
        if record is None:
            return None
        reason = identity_mismatch(record, shard_identity(images, indices, codec))
        if reason:
            problems.append(f"{stats_name(shard, job.prefix)}: {reason}")
        records.append(record)
    if problems:
        refuse(job, problems)
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
    unreadable: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.images_encoded / self.seconds if self.seconds > 0 else 0.0
        skipped = (
            f"; {len(self.unreadable)} unreadable image(s) skipped and recorded: {', '.join(self.unreadable[:5])}"
            if self.unreadable
            else ""
        )
        return (
            f"{self.shards_written} shards written, {self.shards_skipped} already complete "
            f"({self.shards_mine} of {self.shards_total} are this worker's); {self.images_encoded} images in "
            f"{self.seconds:.1f} s ({rate:.1f} images/s){skipped}; manifest "
            f"{'written' if self.manifest_written else 'not yet (other workers still running)'}"
        )


def job_codec(job: EncodeJob) -> Codec:
    """The job's codec, its weights named by absolute path: the manifest's record then works from any directory."""
    weights = str(Path(job.codec_weights).resolve()) if "://" not in job.codec_weights else job.codec_weights
    return load_codec(job.codec, weights, job.image_size, job.patch_size)


def run_encode(job: EncodeJob) -> EncodeSummary:
    start = time.perf_counter()
    images = job_images(job)
    if job.progress:
        print("\n".join(report_lines(images.report())), flush=True)
    codec = job_codec(job)
    device = torch.device(job.device)
    codec.to(device)
    autocast_dtype = torch.bfloat16 if job.precision == "bf16" else None
    fs, root = filesystem(job.dst)
    fs.makedirs(root, exist_ok=True)
    ranges = shard_ranges(len(images), job.images_per_shard)
    mine = [s for s in range(len(ranges)) if s % job.slot.num_workers == job.slot.worker_id]
    identities = {s: shard_identity(images, ranges[s], codec) for s in mine}
    stray = _stray_shards(fs, root, job, len(ranges))
    if job.overwrite:
        # Nothing may describe the old shards while they are replaced: the manifest goes first, it comes back last.
        fs.rm(join(root, MANIFEST_NAME)) if fs.exists(join(root, MANIFEST_NAME)) else None
        for shard in stray:
            for name in (stats_name(shard, job.prefix), shard_name(shard, job.prefix)):
                if fs.exists(join(root, name)):
                    fs.rm(join(root, name))
        todo = mine
    else:
        problems = _conflicts(fs, root, job, mine, identities)
        problems += [
            f"{stats_name(s, job.prefix)}: beyond this job's {len(ranges)} shards (fewer images now)" for s in stray
        ]
        if problems:
            refuse(job, problems)
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
        collate_fn=_collate,
    )
    pending: dict[int, list] = {}
    unreadable: dict[int, list[dict]] = {}
    written = 0
    with tqdm(
        total=len(indices),
        unit="img",
        desc=f"encode w{job.slot.worker_id}",
        disable=not job.progress,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        for batch_indices, batch_labels, pixels, failed in loader:
            for index, reason in failed:
                path = images.root / images.paths[index]
                if not job.skip_unreadable:
                    raise UnreadableImageError(path, reason)
                unreadable.setdefault(shard_of[index], []).append({"path": images.paths[index], "reason": reason})
            moments = _encode_batch(codec, pixels, device, autocast_dtype) if pixels is not None else []
            for index, label, latents in zip(batch_indices, batch_labels, moments):
                pending.setdefault(shard_of[index], []).append((index, label, latents))
            for shard in {shard_of[i] for i in [*batch_indices, *(i for i, _ in failed)]}:
                done = len(pending.get(shard, [])) + len(unreadable.get(shard, []))
                if done == len(ranges[shard]):
                    samples, lost = pending.pop(shard, []), unreadable.get(shard, [])
                    if not samples:
                        raise ImageFolderError(
                            f"every image of shard {shard} is unreadable ({', '.join(x['path'] for x in lost[:5])}): "
                            "check the folder"
                        )
                    _write_shard(fs, root, job, shard, samples, codec.info.token_dim, identities[shard], lost)
                    written += 1
            bar.update(len(batch_indices) + len(failed))
    manifest = try_write_manifest(job, images, codec)
    return EncodeSummary(
        len(ranges),
        len(mine),
        written,
        len(mine) - len(todo),
        len(indices),
        time.perf_counter() - start,
        manifest is not None,
        [x["path"] for lost in unreadable.values() for x in lost],
    )
