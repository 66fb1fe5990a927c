"""Streaming latent batches from webdataset shards, split across ranks and loader workers, resumable.

Order of one epoch (all deterministic in ``(seed, epoch)``):
  1. the manifest's shards are permuted; rank r takes every world_size-th shard from r, and
     loader worker w of that rank every num_workers-th of those from w;
  2. each worker streams its shards (webdataset tar iteration over an fsspec stream, so
     ``s3://`` works without ``pipe:``), permutes the samples of each shard, and emits
     micro-batches of ``batch_size`` (a worker's last partial batch is dropped);
  3. every rank stops after the same number of micro-batches, ``steps_per_epoch``, the
     minimum over ranks, so collectives never wait on a rank that ran dry.
Each sample's view (image or flip, p = 1/2) and posterior noise are drawn from an RNG
seeded by (seed, epoch, key): the batch content does not depend on when it is read.

With ``split="samples"`` every rank reads every shard and keeps its slice of each global
batch instead (micro-batch j of the epoch's single sample stream goes to rank
(j mod W*A) // A): the data of a step is then the same at any world size, which makes
ZeRO parity tests and world-size changes exact, at the cost of W x the reading.

Resume guarantee: ``LoaderPosition`` records, per worker, how many of its batches the
trainer consumed. Restarting with the same world size and worker count continues with
exactly the batches not yet consumed in this epoch: none is repeated, none skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from far_scale.data.contract import MANIFEST_NAME, decode_sample
from far_scale.data.manifest import Manifest, read_manifest
from far_scale.data.normalization import LatentNormalization
from far_scale.data.spec import DataSpec
from far_scale.data.storage import filesystem, join
from far_scale.errors import ActionableError

# Streams are read in blocks of this size from object storage (fsspec readahead).
STREAM_BLOCK_BYTES = 8 << 20
RETRY_FIRST_WAIT_S = 1.0  # a failed shard read waits 1, 2, 4, ... s (at most RETRY_MAX_WAIT_S) between attempts
RETRY_MAX_WAIT_S = 30.0

log = logging.getLogger("far_scale.data")


@dataclass
class LatentBatch:
    latents: torch.Tensor  # [B, L, D] float32, scaled
    labels: torch.Tensor  # [B] long
    keys: list[str]
    worker: int
    worker_batch: int  # index of this batch within its worker's stream this epoch


@dataclass
class LoaderPosition:
    """Where a rank is in the data: the epoch and the batches consumed from each loader worker
    (``split="shards"``), or the global micro-batches consumed by all ranks (``split="samples"``)."""

    epoch: int = 0
    consumed: list[int] = field(default_factory=list)
    global_micro_batches: int = 0

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": list(self.consumed), "global_micro_batches": self.global_micro_batches}

    @classmethod
    def from_dict(cls, data: dict) -> "LoaderPosition":
        return cls(int(data["epoch"]), [int(c) for c in data["consumed"]], int(data.get("global_micro_batches", 0)))


def split_shards(
    num_shards: int, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
) -> list[int]:
    """Shard indices read by (rank, worker) in this epoch, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(s) for s in order[rank::world_size][worker::num_workers]]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int, url: str) -> None:
    needed = world_size * max(num_workers, 1)
    if num_shards < needed:
        raise ValueError(
            f"{url} has {num_shards} shards but {world_size} ranks x {max(num_workers, 1)} loader workers need "
            f"at least {needed}: re-encode with fewer --images-per-shard, or lower data.num_workers"
        )


def steps_per_epoch(
    shard_sizes: list[int], seed: int, epoch: int, world_size: int, num_workers: int, batch_size: int
) -> int:
    """Micro-batches every rank yields this epoch (the minimum over ranks)."""
    workers = max(num_workers, 1)
    per_rank = []
    for rank in range(world_size):
        per_rank.append(
            sum(
                sum(shard_sizes[s] for s in split_shards(len(shard_sizes), seed, epoch, rank, world_size, w, workers))
                // batch_size
                for w in range(workers)
            )
        )
    return min(per_rank)


def micro_batches_per_epoch(
    shard_sizes: list[int],
    split: str,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    grad_accum: int,
) -> int:
    """Micro-batches each rank consumes in ``epoch``: the loader's count, and the plan's (one formula)."""
    if split == "samples":
        global_batch = batch_size * world_size * grad_accum
        return sum(shard_sizes) // global_batch * grad_accum
    return steps_per_epoch(shard_sizes, seed, epoch, world_size, num_workers, batch_size)


def sample_latent(
    latents: np.ndarray, rng: np.random.Generator, normalization: LatentNormalization, hflip: bool = True
) -> np.ndarray:
    """One of the two views (p = 1/2; the image itself when ``hflip`` is off), as tokens (``normalization``); from
    the posterior when moments are (mean, logvar). The view is drawn either way, so the posterior noise does not
    depend on it."""
    drawn = rng.integers(0, 2)
    view = latents[drawn if hflip else 0].astype(np.float32)
    if view.shape[0] == 2:
        mean, logvar = view
        return normalization.normalize_array(
            mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)
        )
    return normalization.normalize_array(view[0])


class LatentShardDataset(IterableDataset):
    """Yields ``LatentBatch``es of one rank; see the module docstring for the order."""

    def __init__(
        self,
        url: str,
        manifest: Manifest,
        normalization: LatentNormalization,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        seed: int,
        position: LoaderPosition,
        shuffle: bool = True,
        worker_offset: int = 0,
        split: str = "shards",
        grad_accum: int = 1,
        read_retry_s: float = 0.0,
        hflip: bool = True,
    ):
        self.url = url
        self.read_retry_s, self.hflip = read_retry_s, hflip
        self.shards = manifest.shards
        self.normalization = normalization
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(num_workers, 1)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.position = position
        self.worker_offset = worker_offset
        self.split, self.grad_accum = split, grad_accum
        if split == "shards":
            check_enough_shards(len(self.shards), world_size, num_workers, url)

    def _samples(self, shard: int) -> list:
        """Every sample of one shard, checked against the manifest's size and sha256 before any is used.

        A read that fails for a reason other than the shard's content (the store or the network is down) is
        retried with exponential backoff for ``read_retry_s`` seconds, then raises naming the shard's URL.
        """
        deadline = time.monotonic() + self.read_retry_s
        wait_s = RETRY_FIRST_WAIT_S
        while True:
            url = f"{self.url}/{self.shards[shard].name}"
            try:
                return self._read_shard(shard)
            except FileNotFoundError:
                raise ShardError(f"{url} is missing; {self._repair_hint()}") from None
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if time.monotonic() + wait_s > deadline:
                    raise ShardError(
                        f"could not read {url} for {self.read_retry_s:.0f} s (data.read_retry_s): "
                        f"{type(exc).__name__}: {exc}. Check that the store is reachable, then restart: "
                        "the run resumes from its last checkpoint"
                    ) from None
                log.warning("reading %s failed (%s: %s); retrying in %.0f s", url, type(exc).__name__, exc, wait_s)
                time.sleep(wait_s)
                wait_s = min(2 * wait_s, RETRY_MAX_WAIT_S)

    def _repair_hint(self) -> str:
        return (
            f"run `far-scale data verify {self.url}` to list the bad shards, delete each with its .stats.json "
            "sidecar and re-run the same `far-scale data encode` command (only missing shards are redone)"
        )

    def _read_shard(self, shard: int) -> list:
        fs, root = filesystem(self.url)
        fs.invalidate_cache()  # a listing cached before an outage must not hide the object
        entry = self.shards[shard]
        name = entry.name
        how_to_fix = self._repair_hint()
        with fs.open(join(root, name), "rb", block_size=STREAM_BLOCK_BYTES) as raw:
            stream = HashingReader(raw, name)
            try:
                members = tar_file_expander([{"url": name, "stream": stream}])
                samples = [decode_sample(s) for s in group_by_keys(members)]
                stream.drain()
            except Exception as exc:
                if stream.error is not None:  # the store, not the shard: tarfile wrapped a read error
                    raise stream.error
                raise ShardError(
                    f"corrupt shard {self.url}/{name}: {type(exc).__name__}: {exc}; {how_to_fix}"
                ) from None
        if stream.num_bytes != entry.num_bytes or stream.hexdigest() != entry.sha256:
            raise ShardError(
                f"shard {self.url}/{name} does not match the manifest ({stream.num_bytes} bytes, sha256 "
                f"{stream.hexdigest()[:12]}...; the manifest says {entry.num_bytes} bytes, "
                f"{entry.sha256[:12]}...): it changed after encoding; {how_to_fix}"
            )
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.position.epoch, shard]).permutation(len(samples))
            samples = [samples[i] for i in order]
        return samples

    def __iter__(self) -> Iterator[LatentBatch]:
        info = get_worker_info()
        # DataLoader cycles its workers from 0; rotating roles lets a resumed run continue the cycle
        # exactly where the interrupted one stopped.
        worker = ((info.id if info is not None else 0) + self.worker_offset) % self.num_workers
        if self.split == "samples":
            yield from self._iter_global_slices(worker)
            return
        epoch = self.position.epoch
        skip = self.position.consumed[worker]
        shards = split_shards(len(self.shards), self.seed, epoch, self.rank, self.world_size, worker, self.num_workers)
        pending: list = []
        index = 0  # this worker's batch index for the next full batch
        for shard in shards:
            size = self.shards[shard].num_samples
            carried = len(pending) + size
            if index + math.ceil(carried / self.batch_size) <= skip:
                # Every batch this shard contributes to was consumed before the restart: no need to read it.
                index += carried // self.batch_size
                pending = [None] * (carried % self.batch_size)
                continue
            for sample in self._samples(shard):
                pending.append(sample)
                if len(pending) == self.batch_size:
                    if index >= skip:
                        yield self._collate(pending, epoch, worker, index)
                    pending, index = [], index + 1

    def _rank_micro_index(self, global_micro: int) -> int | None:
        """This rank's micro-batch index k for global micro-batch j, or None if j is another rank's."""
        span = self.world_size * self.grad_accum
        offset = global_micro % span - self.rank * self.grad_accum
        if not 0 <= offset < self.grad_accum:
            return None
        return (global_micro // span) * self.grad_accum + offset

    def _iter_global_slices(self, worker: int) -> Iterator[LatentBatch]:
        epoch = self.position.epoch
        span = self.world_size * self.grad_accum
        first_global = (self.position.global_micro_batches // span) * span  # start of the next step
        skip = (first_global // span) * self.grad_accum
        order = split_shards(len(self.shards), self.seed, epoch, 0, 1, 0, 1)
        position = 0  # global sample position in the epoch stream
        batches: dict[int, list] = {}
        for shard in order:
            size = self.shards[shard].num_samples
            if (position + size) // self.batch_size < first_global:
                position += size
                continue
            for sample in self._samples(shard):
                k = self._rank_micro_index(position // self.batch_size)
                position += 1
                if k is None or k < skip or k % self.num_workers != worker:
                    continue
                batches.setdefault(k, []).append(sample)
                if len(batches[k]) == self.batch_size:
                    yield self._collate(batches.pop(k), epoch, worker, k)

    def _collate(self, samples: list, epoch: int, worker: int, index: int) -> LatentBatch:
        latents = [
            sample_latent(
                s.latents, np.random.default_rng([self.seed, epoch, int(s.key)]), self.normalization, self.hflip
            )
            for s in samples
        ]
        return LatentBatch(
            torch.from_numpy(np.stack(latents)),
            torch.tensor([s.label for s in samples]),
            [s.key for s in samples],
            worker,
            index,
        )


class ShardError(ActionableError, ValueError):
    """A shard that cannot be read or differs from the manifest; the message names it and the fix."""


TRANSIENT_ERROR_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")


def _is_transient(exc: BaseException) -> bool:
    """A failure of the store or the network (worth retrying), not of the shard's content."""
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0] in TRANSIENT_ERROR_PACKAGES


class HashingReader:
    """A read-only stream wrapper that counts and hashes the bytes read through it."""

    def __init__(self, stream, name: str):
        self.stream, self.name = stream, name
        self.num_bytes = 0
        self.error: Optional[BaseException] = None  # what the underlying stream raised, if anything
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except Exception as exc:
            self.error = exc
            raise
        self.num_bytes += len(data)
        self._hash.update(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (end-of-archive padding) so the digest covers the whole object."""
        while self.read(STREAM_BLOCK_BYTES):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def __repr__(self) -> str:  # tarfile puts its stream into error messages
        return f"<stream of {self.name}>"


def _identity(batch):
    return batch


class LatentLoader:
    """Epoch iteration over one rank's micro-batches with an exact, resumable position."""

    def __init__(
        self,
        url: str,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        position: Optional[LoaderPosition] = None,
        split: str = "shards",
        grad_accum: int = 1,
        manifest: Optional[Manifest] = None,
        read_retry_s: float = 0.0,
        hflip: bool = True,
        normalize: str = "global",
    ):
        self.url = url
        self.read_retry_s, self.hflip = read_retry_s, hflip
        self.manifest = manifest or read_manifest(url)
        self.normalization = self.manifest.normalization(normalize, f"{url.rstrip('/')}/{MANIFEST_NAME}")
        """How the stored latents become tokens (``data.normalize``)."""
        self.spec: DataSpec = replace(self.manifest.spec, latent_bound=self.normalization.bound)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        if split not in ("shards", "samples"):
            raise ValueError(f"data split must be 'shards' or 'samples', got {split!r}")
        self.split, self.grad_accum = split, grad_accum
        if split == "shards":
            check_enough_shards(len(self.manifest.shards), world_size, num_workers, url)
        workers = max(num_workers, 1)
        self.position = position or LoaderPosition(0, [0] * workers)
        if len(self.position.consumed) != workers:
            raise ValueError(f"loader position has {len(self.position.consumed)} workers, this loader {workers}")
        self.shard_sizes = self.manifest.shard_sizes

    def restore(self, positions: list[dict], rank: int, resized: bool) -> Optional[str]:
        """Continue from the positions every rank saved in a checkpoint. At the same world size: exactly
        this rank's. At another one: with ``split=samples`` the same global position (world-size
        independent); with ``split=shards`` the start of the next epoch (returned as a warning)."""
        workers = max(self.num_workers, 1)
        if not resized:
            self.position = LoaderPosition.from_dict(positions[rank])
            return None
        saved = LoaderPosition.from_dict(positions[0])
        if self.split == "samples":
            self.position = LoaderPosition(saved.epoch, [0] * workers, saved.global_micro_batches)
            return None
        self.position = LoaderPosition(saved.epoch + 1, [0] * workers)
        return (
            f"world size changed with data.split=shards: the interrupted epoch's remaining samples cannot be "
            f"located exactly; continuing at the start of epoch {saved.epoch + 1}"
        )

    def steps_in_epoch(self, epoch: int) -> int:
        """Micro-batches this rank yields in ``epoch`` (the same on every rank)."""
        return micro_batches_per_epoch(
            self.shard_sizes,
            self.split,
            self.seed,
            epoch,
            self.world_size,
            self.num_workers,
            self.batch_size,
            self.grad_accum,
        )

    def worker_batches(self, epoch: int) -> list[int]:
        """Full batches each of this rank's loader workers can produce in ``epoch``."""
        workers = max(self.num_workers, 1)
        return [
            sum(
                self.shard_sizes[s]
                for s in split_shards(len(self.shard_sizes), self.seed, epoch, self.rank, self.world_size, w, workers)
            )
            // self.batch_size
            for w in range(workers)
        ]

    def next_worker(self) -> int:
        """The worker whose batch comes next in DataLoader's round robin (skipping exhausted workers)."""
        if self.split == "samples":
            return self._consumed_micro() % max(self.num_workers, 1)
        totals = self.worker_batches(self.position.epoch)
        active = [(c, w) for w, c in enumerate(self.position.consumed) if c < totals[w]]
        return min(active)[1] if active else 0

    def _consumed_micro(self) -> int:
        """Micro-batches this rank consumed in the current epoch."""
        if self.split == "samples":
            span = self.world_size * self.grad_accum
            return self.position.global_micro_batches // span * self.grad_accum
        return sum(self.position.consumed)

    def epoch_batches(self) -> Iterator[LatentBatch]:
        """The remaining micro-batches of the current epoch; advances the position as they are consumed."""
        epoch = self.position.epoch
        remaining = self.steps_in_epoch(epoch) - self._consumed_micro()
        start = LoaderPosition(epoch, list(self.position.consumed), self.position.global_micro_batches)
        dataset = LatentShardDataset(
            self.url,
            self.manifest,
            self.normalization,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            seed=self.seed,
            position=start,
            shuffle=self.shuffle,
            worker_offset=self.next_worker(),
            split=self.split,
            grad_accum=self.grad_accum,
            read_retry_s=self.read_retry_s,
            hflip=self.hflip,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
        )
        produced = 0
        for batch in loader:
            if produced >= remaining:
                break
            self.position.consumed[batch.worker] = batch.worker_batch + 1
            produced += 1
            if self.split == "samples" and produced % self.grad_accum == 0:
                # Counted per completed step, identically on every rank.
                self.position.global_micro_batches += self.world_size * self.grad_accum
            yield batch
        self.position = LoaderPosition(epoch + 1, [0] * max(self.num_workers, 1), 0)

    def batches(self) -> Iterator[LatentBatch]:
        """Micro-batches forever, epoch after epoch."""
        while True:
            yield from self.epoch_batches()
