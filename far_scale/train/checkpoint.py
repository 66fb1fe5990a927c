"""Checkpoint directory layout, the atomic ``latest.json`` pointer, retention and RNG capture."""

from __future__ import annotations

import json
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

LATEST = "latest.json"
EMA_FILE = "ema.safetensors"
TARGET_EMA_FILE = "target_ema.safetensors"
CONFIG_FILE = "config.yaml"
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


def read_latest(directory: Path) -> Optional[CheckpointRef]:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text())
    return CheckpointRef(directory, data["tag"], int(data["step"]), int(data["world_size"]))


def write_latest(ref: CheckpointRef) -> None:
    """Point ``latest.json`` at a checkpoint that is complete on every rank (call after a barrier)."""
    write_atomic(ref.directory / LATEST, json.dumps({"tag": ref.tag, "step": ref.step, "world_size": ref.world_size}))


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
    older = [t for t in checkpoint_tags(tags) if t <= current]
    newer = [t for t in checkpoint_tags(tags) if t > current]
    return older[:-keep_last] + newer


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
