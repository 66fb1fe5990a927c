"""``far-scale export``: a checkpoint -> plain safetensors (EMA and raw weights) + config + data info."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from far_scale.train import checkpoint as ckpt

EXPORT_EMA = "ema.safetensors"
EXPORT_RAW = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_META = "meta.json"


def resolve_checkpoint(path: str | Path) -> ckpt.CheckpointRef:
    """A run directory, a checkpoints directory (its latest.json) or one step_* directory."""
    path = Path(path)
    for directory in (path / "checkpoints", path):
        ref = ckpt.read_latest(directory)
        if ref is not None:
            return ref
    meta = path / ckpt.META_FILE
    if meta.is_file():
        data = json.loads(meta.read_text())
        return ckpt.CheckpointRef(path.parent, path.name, int(data["step"]), int(data["world_size"]))
    raise FileNotFoundError(f"no checkpoint at {path}: expected a run directory, a checkpoints directory with "
                            f"{ckpt.LATEST}, or a step_* directory")


def export_checkpoint(source: str | Path, out: str | Path, include_raw: bool = True) -> Path:
    ref = resolve_checkpoint(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ref.path / ckpt.EMA_FILE, out / EXPORT_EMA)
    shutil.copyfile(ref.path / ckpt.CONFIG_FILE, out / EXPORT_CONFIG)
    shutil.copyfile(ref.path / ckpt.META_FILE, out / EXPORT_META)
    if include_raw:
        from far_scale.distributed.engine import consolidated_fp32_state_dict

        state = consolidated_fp32_state_dict(str(ref.directory), ref.tag)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / EXPORT_RAW))
    return out
