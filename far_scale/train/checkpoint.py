"""Checkpoint directory layout, the atomic ``latest.json`` pointer, retention and RNG capture."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save

from far_scale.data.storage import write_atomic
from far_scale.errors import ActionableError

LATEST = "latest.json"
EMA_FILE = "ema.safetensors"
TARGET_EMA_FILE = "target_ema.safetensors"
CONFIG_FILE = "config.yaml"
FILES_FILE = "files.json"  # size and sha256 of every file of the checkpoint, checked before loading
HASH_BLOCK_BYTES = 8 << 20
META_FILE = "meta.json"
UNIVERSAL_DIR = "universal"


TAG_PATTERN = re.compile(r"step_\d{8}")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    directory: Path
    tag: str
    step: int
    world_size: int

    @property
    def path(self) -> Path:
        return self.directory / self.tag


class CheckpointError(ActionableError, RuntimeError):
    """An unreadable pointer or a checkpoint file that differs from what was written; says what to do."""


def _restore_hint(directory: Path, bad_tag: Optional[str] = None) -> str:
    tags = [t for t in checkpoint_tags(p.name for p in directory.iterdir() if p.is_dir()) if t != bad_tag]
    if not tags:
        return "no other checkpoint is here: delete the directory to start the run from scratch"
    newest = directory / tags[-1]
    pointer = {"tag": tags[-1], "step": int(tags[-1].removeprefix("step_")), "world_size": "N"}
    try:
        pointer["world_size"] = json.loads((newest / META_FILE).read_text())["world_size"]
    except (OSError, ValueError, KeyError):
        pass  # the user fills in the world size that wrote it
    return (f"checkpoints here: {', '.join(tags)}; to resume from the newest of them, write {directory / LATEST} "
            f"as {json.dumps(pointer)} (make sure that checkpoint is complete: `far-scale train` checks its files)")


def parse_latest(text: str, where: str, directory: Path) -> tuple[str, int, int]:
    """(tag, step, world size) of a ``latest.json``; ``CheckpointError`` names ``where`` if it is damaged."""
    try:
        data = json.loads(text)
        tag, step, world_size = str(data["tag"]), int(data["step"]), int(data["world_size"])
        if not TAG_PATTERN.fullmatch(tag):
            raise ValueError(f"tag {tag!r} is not a checkpoint tag")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where} is damaged ({type(exc).__name__}: {exc}); "
                              f"{_restore_hint(directory) if directory.is_dir() else ''}") from None
    return tag, step, world_size


def read_latest(directory: Path) -> Optional[CheckpointRef]:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    tag, step, world_size = parse_latest(pointer.read_text(errors="replace"), str(pointer), directory)
    return CheckpointRef(directory, tag, step, world_size)


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file, so that a run fails at start, not at its first checkpoint."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(probe, "ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"the checkpoint directory {directory} is not writable ({exc.strerror or exc}): "
                              "fix its permissions or mount, or set checkpoint.url to a writable path or an "
                              "s3:// URL") from None


def file_digests(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file under a checkpoint directory (relative names), except the list itself."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != FILES_FILE):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_BLOCK_BYTES):
                digest.update(chunk)
        digests[path.relative_to(directory).as_posix()] = {"num_bytes": path.stat().st_size,
                                                           "sha256": digest.hexdigest()}
    return digests


def write_file_list(ref: CheckpointRef, digests: dict[str, dict]) -> None:
    write_atomic(ref.path / FILES_FILE, json.dumps(digests, indent=1, sort_keys=True))


def verify_checkpoint(ref: CheckpointRef) -> None:
    """Check every file of ``ref`` against its ``files.json`` (written at save time); checkpoints written
    before far-scale recorded one are accepted as they are."""
    listing = ref.path / FILES_FILE
    if not listing.is_file():
        return
    expected = json.loads(listing.read_text())
    actual = file_digests(ref.path)
    problems = [f"{name} is missing" for name in expected if name not in actual]
    problems += [f"{name} has {actual[name]['num_bytes']} bytes and sha256 {actual[name]['sha256'][:12]}..., "
                 f"written as {want['num_bytes']} bytes, {want['sha256'][:12]}..."
                 for name, want in expected.items() if name in actual and actual[name] != want]
    if problems:
        raise CheckpointError(f"checkpoint {ref.path} is damaged: {'; '.join(problems)}. Nothing was loaded; "
                              + _restore_hint(ref.directory, ref.tag))


def latest_text(ref: CheckpointRef) -> str:
    """The content of a ``latest.json`` naming ``ref`` (what ``parse_latest`` reads)."""
    return json.dumps({"tag": ref.tag, "step": ref.step, "world_size": ref.world_size})


def write_latest(ref: CheckpointRef) -> None:
    """Point ``latest.json`` at a checkpoint that is complete on every rank (call after a barrier)."""
    write_atomic(ref.directory / LATEST, latest_text(ref))


def write_sidecars(ref: CheckpointRef, config_yaml: str, meta: dict, ema_state: dict[str, torch.Tensor],
                   target_ema_state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Files read without unpickling: resolved config, metadata, full EMA weights (and the target EMA's)."""
    ref.path.mkdir(parents=True, exist_ok=True)
    write_atomic(ref.path / CONFIG_FILE, config_yaml)
    write_atomic(ref.path / META_FILE, json.dumps(meta, indent=2))
    states = {EMA_FILE: ema_state, TARGET_EMA_FILE: target_ema_state}
    for name, state in states.items():
        if state is None:
            continue
        write_atomic(ref.path / name, save({k: v.contiguous() for k, v in state.items()}))


def load_ema(path: Path, name: str = EMA_FILE) -> dict[str, torch.Tensor]:
    """The evaluation EMA (or, with ``name=TARGET_EMA_FILE``, the target EMA) of a checkpoint."""
    if not (path / name).is_file():
        raise FileNotFoundError(f"{path / name} is missing: the checkpoint was written without it (e.g. by a run "
                                "with another model.head.consistency_target)")
    return load_file(str(path / name))


def checkpoint_tags(names: Iterable[str]) -> list[str]:
    """The checkpoint tags among directory entry names, oldest first."""
    return sorted(name for name in names if TAG_PATTERN.fullmatch(name))


def tags_to_prune(tags: Iterable[str], keep_last: int, current: str) -> list[str]:
    """Tags to delete after ``current`` was completed: all but the newest ``keep_last`` up to it, and every
    tag after it (left by a run killed before its pointer moved: never complete, never resumed)."""
    ordered = checkpoint_tags(tags)  # once: ``tags`` may be a one-shot iterator (a directory listing)
    older = [t for t in ordered if t <= current]
    return older[:-keep_last] + [t for t in ordered if t > current]


def prune(directory: Path, keep_last: int, protect: str) -> list[str]:
    """Delete all but the newest ``keep_last`` step_* checkpoints up to ``protect`` (and any after it)."""
    removed = tags_to_prune((p.name for p in directory.iterdir() if p.is_dir()), keep_last, protect)
    for tag in removed:
        shutil.rmtree(directory / tag, ignore_errors=True)
        shutil.rmtree(directory / UNIVERSAL_DIR / tag, ignore_errors=True)
    return removed


def full_rng_state() -> dict:
    """Every generator's complete state (restorable)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
