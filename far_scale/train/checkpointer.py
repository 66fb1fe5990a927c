"""The checkpoint protocol of a run, with one owner: locate, verify, convert, load, save, upload, prune.

``far_scale.train.checkpoint`` holds the file layout and its pure helpers (the pointer, digests, retention,
RNG capture); this module runs the protocol across the ranks:
- **locate**: the local ``latest.json``, or the store's (each node's local rank 0 downloads it into the
  staging directory), verified against its ``files.json`` before DeepSpeed unpickles anything;
- **convert**: a checkpoint written by another world size goes through DeepSpeed's universal format (ZeRO-1-3;
  ZeRO-0 states are whole and load directly);
- **save**: DeepSpeed's files and the sidecars (config, meta, EMA weights), then every node's digests into
  ``files.json``, then the upload (each node its own files), and only then the pointers, then retention.
A failing disk during a save leaves no pointer at the partial checkpoint and says what to do.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safetensors.torch import save

from far_scale.data.storage import write_atomic
from far_scale.distributed import engine as ds
from far_scale.distributed.runtime import DistEnv, all_gather_objects, barrier
from far_scale.posthoc_ema import POSTHOC_DIR, SNAPSHOT_FILE
from far_scale.train import checkpoint as ckpt
from far_scale.train.remote_checkpoints import RemoteCheckpoints, is_remote, local_directory

log = logging.getLogger("far_scale.train")

MIB = 2**20


@dataclass(frozen=True)
class Saved:
    """A checkpoint just written: where it is, its digest (sha256 of its file list) and the steps pruned for it."""

    step: int
    location: str
    digest: str
    pruned_steps: tuple[int, ...]


@dataclass(frozen=True)
class Resume:
    """A located checkpoint and how this run loads it."""

    ref: ckpt.CheckpointRef
    resized: bool
    """Written by another world size."""
    universal: bool
    """Loaded through DeepSpeed's universal format (resized and sharded)."""


class Checkpointer:
    def __init__(self, url: str, run_dir: Path, env: DistEnv, keep_last: int):
        self.env, self.keep_last = env, keep_last
        # On an object store, DeepSpeed writes to a local staging directory that is mirrored to the store.
        self.remote = RemoteCheckpoints(url, run_dir / "checkpoints") if is_remote(url) else None
        self.directory = local_directory(url) if url and self.remote is None else run_dir / "checkpoints"

    def check_writable(self) -> None:
        ckpt.check_writable(self.directory)

    def locate(self, zero_stage: int) -> Optional[Resume]:
        """Collective: the checkpoint to resume from (verified, downloaded and converted as needed), or None."""
        ref = ckpt.read_latest(self.directory) if self.remote is None else self.remote.latest()
        if ref is not None and self.env.local_rank == 0:
            # Verified before DeepSpeed unpickles anything (fetch verifies what it keeps or downloads).
            if self.remote is not None:
                self.remote.fetch(ref)
            else:
                ckpt.verify_checkpoint(ref)
        barrier()
        if ref is None:
            return None
        resized = ref.world_size != self.env.world_size
        # ZeRO-0 checkpoints hold whole model and optimizer states (DeepSpeed's universal format does not
        # support them, and they need no conversion); sharded stages go through the universal format.
        resume = Resume(ref, resized, resized and zero_stage > 0)
        if resume.universal:
            self._convert_to_universal(ref)
        elif resized and self.env.is_main:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: ZeRO-0 states are whole, "
                "loading them directly",
                ref.tag,
                ref.world_size,
                self.env.world_size,
            )
        return resume

    def stored(self) -> list[Saved]:
        """Rank 0: every complete checkpoint of the run (on the store, or in the local directory), as ``Saved``
        records: a resumed run records them all again in MLflow (found, not duplicated), so that a kill between a
        save and its record, or a tracking server down until the kill, loses no logged model."""
        import hashlib

        found = []
        if self.remote is not None:
            for tag in self.remote.tags():
                listing = self.remote.read_file(f"{tag}/{ckpt.FILES_FILE}")
                if listing is not None:
                    digest = hashlib.sha256(listing).hexdigest()
                    found.append(Saved(ckpt.tag_step(tag), f"{self.remote.url}/{tag}", digest, ()))
            return found
        for tag in ckpt.checkpoint_tags(p.name for p in self.directory.iterdir() if p.is_dir()):
            ref = ckpt.CheckpointRef(self.directory, tag, ckpt.tag_step(tag), self.env.world_size)
            if (ref.path / ckpt.FILES_FILE).is_file():
                found.append(Saved(ref.step, str(ref.path.resolve()), ckpt.list_digest(ref), ()))
        return found

    def _convert_to_universal(self, ref: ckpt.CheckpointRef) -> None:
        if self.env.is_main:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: converting it to DeepSpeed's universal format",
                ref.tag,
                ref.world_size,
                self.env.world_size,
            )
            ds.convert_to_universal(str(ref.directory), ref.tag, str(ref.directory / ckpt.UNIVERSAL_DIR))
        barrier()

    def load(self, engine, resume: Resume, group_settings: list[dict]) -> dict:
        """Load engine and optimizer states; returns the client state saved with them."""
        ref = resume.ref
        directory = ref.directory / ckpt.UNIVERSAL_DIR if resume.universal else ref.directory
        client = ds.load_checkpoint(engine, str(directory), ref.tag)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ref.path}")
        if resume.universal:
            ds.restore_group_settings(engine, group_settings)
        return client

    def restore(self, engine, resume: Resume, group_settings: list[dict], loader, ema, targets, posthoc=None):
        """Engine and optimizer states, this rank's data position and RNGs, and the EMAs (the post-hoc ones too)
        from ``resume``; returns (completed steps, non-finite steps so far, the MLflow run id)."""
        client = self.load(engine, resume, group_settings)
        warning = loader.restore(client["loader_positions"], self.env.rank, resume.resized)
        if not resume.resized:
            ckpt.restore_rng_state(client["rng_states"][self.env.rank])
        if warning and self.env.is_main:
            log.warning(warning)
        ema.load_full_state_dict(ckpt.load_ema(resume.ref.path))
        if targets.ema is not None:
            targets.load_full_state_dict(ckpt.load_ema(resume.ref.path, ckpt.TARGET_EMA_FILE))
        if posthoc is not None:
            if not (resume.ref.path / ckpt.POSTHOC_EMA_FILE).is_file():
                raise ckpt.CheckpointError(
                    f"{resume.ref.path} has no {ckpt.POSTHOC_EMA_FILE}: it was written with ema.posthoc.enabled=false; "
                    "resume with ema.posthoc.enabled=false, or start a new run to track post-hoc EMAs"
                )
            posthoc.load_checkpoint_state(ckpt.load_ema(resume.ref.path, ckpt.POSTHOC_EMA_FILE))
        step = int(client["step"])
        if self.env.is_main:
            log.warning("resumed from %s at step %d", resume.ref.path, step)
        return step, int(client.get("nonfinite", 0)), client.get("mlflow_run_id")

    def client_state(
        self, step: int, config_yaml: str, loader_position: dict, run_id: Optional[str], nonfinite: int
    ) -> dict:
        """Collective: what DeepSpeed saves beside its own states, with every rank's data position and RNGs."""
        return {
            "step": step,
            "config_yaml": config_yaml,
            "loader_positions": all_gather_objects(loader_position),
            "rng_states": all_gather_objects(ckpt.full_rng_state()),
            "mlflow_run_id": all_gather_objects(run_id)[0],
            "world_size": self.env.world_size,
            "nonfinite": nonfinite,
        }

    def save(
        self,
        engine,
        step: int,
        client: dict,
        config_yaml: str,
        meta: dict,
        ema_state: dict,
        target_ema_state: Optional[dict],
        posthoc_state: Optional[dict] = None,
    ) -> Saved:
        """Collective: write, digest, upload and point at checkpoint ``step``; returns where it is (rank 0 knows the
        pruned steps)."""
        ref = ckpt.CheckpointRef(self.directory, ckpt.tag_for(step), step, self.env.world_size)
        try:
            ds.save_checkpoint(engine, str(self.directory), ref.tag, client)
            if self.env.is_main:
                ckpt.write_sidecars(ref, config_yaml, meta, ema_state, target_ema_state, posthoc_state)
        except (OSError, RuntimeError) as exc:
            # A full or failing disk: nothing points at this checkpoint; remove what was written of it.
            shutil.rmtree(ref.path, ignore_errors=True)
            previous = ckpt.read_latest(self.directory)
            free_mib = shutil.disk_usage(self.directory).free / MIB
            raise ckpt.CheckpointError(
                f"could not write checkpoint {ref.path} ({free_mib:.0f} MiB free there): {type(exc).__name__}: {exc}. "
                + (f"{ckpt.LATEST} still names {previous.tag}, which is complete; " if previous else "")
                + "free space there (or set checkpoint.url to a larger filesystem) and restart: the run resumes "
                "from the last complete checkpoint"
            ) from exc
        barrier()
        # Each node hashes the files its ranks wrote; rank 0 records them all before anything points here.
        digests = all_gather_objects(ckpt.file_digests(ref.path) if self.env.local_rank == 0 else {})
        if self.env.is_main:
            ckpt.write_file_list(ref, {name: d for node in digests for name, d in node.items()})
        barrier()
        location = str(ref.path.resolve())
        if self.remote is not None:
            # Each node uploads what its ranks wrote; the store's pointer moves only once every file is up.
            if self.env.local_rank == 0:
                self.remote.upload(ref.tag)
            barrier()
            location = f"{self.remote.url}/{ref.tag}"
        removed: list[str] = []
        if self.env.is_main:
            ckpt.write_latest(ref)
            if self.remote is not None:
                self.remote.write_latest(ref)
                removed += self.remote.prune(self.keep_last, ref.tag)
            removed += ckpt.prune(self.directory, self.keep_last, ref.tag)
            print(f"checkpoint {location} (removed {len(set(removed))} old)", flush=True)
        return Saved(step, location, ckpt.list_digest(ref), tuple(sorted({ckpt.tag_step(t) for t in removed})))

    def save_snapshot(self, step: int, tensors: dict, metadata: dict) -> None:
        """Rank 0: a post-hoc EMA snapshot into ``posthoc/`` beside the checkpoints (atomic; its size and sha256
        into ``posthoc/files.json``; on an object store uploaded with the list). Never pruned."""
        if not self.env.is_main:
            return
        directory = self.directory / POSTHOC_DIR
        directory.mkdir(parents=True, exist_ok=True)
        name = SNAPSHOT_FILE.format(step=step)
        write_atomic(directory / name, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
        listing = directory / ckpt.FILES_FILE
        if listing.is_file():
            files = json.loads(listing.read_text())
        else:  # a resumed run on a new machine: the store's list holds the earlier snapshots
            remote = self.remote.read_file(f"{POSTHOC_DIR}/{ckpt.FILES_FILE}") if self.remote else None
            files = json.loads(remote) if remote else {}
        files.update(ckpt.file_digests(directory, only=[name]))
        write_atomic(listing, json.dumps(files, indent=1, sort_keys=True))
        if self.remote is not None:
            self.remote.upload_files([f"{POSTHOC_DIR}/{name}", f"{POSTHOC_DIR}/{ckpt.FILES_FILE}"])
