"""Checkpoint files (the layout is ``far_scale.artifacts``): the atomic ``latest.json`` pointer, digests,
sidecars, retention and RNG capture."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save

from far_scale.artifacts import (  # noqa: F401  (the layout's names, used as ckpt.* by the train package)
    CONFIG_FILE,
    EMA_FILE,
    FILES_FILE,
    LATEST,
    META_FILE,
    POSTHOC_EMA_FILE,
    TAG_PATTERN,
    TARGET_EMA_FILE,
    UNIVERSAL_DIR,
    CheckpointError,
    CheckpointRef,
    _restore_hint,
    checkpoint_tags,
    parse_latest,
    read_latest,
    tag_for,
)
from far_scale.data.storage import write_atomic

HASH_BLOCK_BYTES = 8 << 20


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file, so that a run fails at start, not at its first checkpoint."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(probe, "ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"the checkpoint directory {directory} is not writable ({exc.strerror or exc}): "
            "fix its permissions or mount, or set checkpoint.url to a writable path or an "
            "s3:// URL"
        ) from None


def file_digests(directory: Path, only: Optional[list[str]] = None) -> dict[str, dict]:
    """Size and sha256 of every file under a checkpoint directory (relative names), except the list itself;
    ``only``: just these (relative names)."""
    digests = {}
    paths = [directory / name for name in only] if only is not None else directory.rglob("*")
    for path in sorted(p for p in paths if p.is_file() and p.name != FILES_FILE):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_BLOCK_BYTES):
                digest.update(chunk)
        digests[path.relative_to(directory).as_posix()] = {
            "num_bytes": path.stat().st_size,
            "sha256": digest.hexdigest(),
        }
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
    problems += [
        f"{name} has {actual[name]['num_bytes']} bytes and sha256 {actual[name]['sha256'][:12]}..., "
        f"written as {want['num_bytes']} bytes, {want['sha256'][:12]}..."
        for name, want in expected.items()
        if name in actual and actual[name] != want
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {ref.path} is damaged: {'; '.join(problems)}. Nothing was loaded; "
            + _restore_hint(ref.directory, ref.tag)
        )


def latest_text(ref: CheckpointRef) -> str:
    """The content of a ``latest.json`` naming ``ref`` (what ``parse_latest`` reads)."""
    return json.dumps({"tag": ref.tag, "step": ref.step, "world_size": ref.world_size})


def write_latest(ref: CheckpointRef) -> None:
    """Point ``latest.json`` at a checkpoint that is complete on every rank (call after a barrier)."""
    write_atomic(ref.directory / LATEST, latest_text(ref))


def write_sidecars(
    ref: CheckpointRef,
    config_yaml: str,
    meta: dict,
    ema_state: dict[str, torch.Tensor],
    target_ema_state: Optional[dict[str, torch.Tensor]] = None,
    posthoc_state: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Files read without unpickling: resolved config, metadata, full EMA weights (and the target EMA's, and
    the tracked post-hoc EMAs')."""
    ref.path.mkdir(parents=True, exist_ok=True)
    write_atomic(ref.path / CONFIG_FILE, config_yaml)
    write_atomic(ref.path / META_FILE, json.dumps(meta, indent=2))
    states = {EMA_FILE: ema_state, TARGET_EMA_FILE: target_ema_state, POSTHOC_EMA_FILE: posthoc_state}
    for name, state in states.items():
        if state is None:
            continue
        write_atomic(ref.path / name, save({k: v.contiguous() for k, v in state.items()}))


def load_ema(path: Path, name: str = EMA_FILE) -> dict[str, torch.Tensor]:
    """The evaluation EMA (or, with ``name=TARGET_EMA_FILE``, the target EMA) of a checkpoint."""
    if not (path / name).is_file():
        raise FileNotFoundError(
            f"{path / name} is missing: the checkpoint was written without it (e.g. by a run "
            "with another model.head.consistency_target)"
        )
    return load_file(str(path / name))


def tags_to_prune(tags: Iterable[str], keep_last: int, current: str) -> list[str]:
    """Tags to delete after ``current`` was completed: all but the newest ``keep_last`` up to it, and every
    tag after it (left by a run killed before its pointer moved: never complete, never resumed)."""
    ordered = checkpoint_tags(tags)  # once: ``tags`` may be a one-shot iterator (a directory listing)
    older = [t for t in ordered if t <= current]
    return older[:-keep_last] + [t for t in ordered if t > current]


def list_digest(ref: CheckpointRef) -> str:
    """sha256 of a checkpoint's ``files.json`` (which holds every file's sha256): one digest of the whole checkpoint."""
    listing = ref.path / FILES_FILE
    return hashlib.sha256(listing.read_bytes()).hexdigest() if listing.is_file() else ""


def tag_step(tag: str) -> int:
    return int(tag.removeprefix("step_"))


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
