"""``far-scale export``: a checkpoint -> plain safetensors (EMA and raw weights) + config + data info + the codec.

The export folder has the checkpoint folder's layout (``far_scale.artifacts``) plus the raw weights and a copy of
the codec's weights (``codec/``), so that it samples anywhere on its own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from safetensors.torch import save, save_file

from far_scale.artifacts import (
    CODEC_DIR,
    CONFIG_FILE,
    EMA_FILE,
    META_FILE,
    RAW_FILE,
    codec_weights_path,
    resolve_checkpoint,
)
from far_scale.data.storage import write_atomic
from far_scale.errors import ActionableError
from far_scale.posthoc_ema import POSTHOC_DIR, decay_to_sigma_rel, list_snapshots, reconstruct

POSTHOC_INFO_FILE = "posthoc.json"  # how the exported EMA was reconstructed (with --ema-sigma-rel)


class ExportError(ActionableError, ValueError):
    """An export that would overwrite or merge into an existing folder; names it and the fix."""


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    include_raw: bool = True,
    ema_sigma_rel: Optional[float] = None,
    ema_decay: Optional[float] = None,
    overwrite: bool = False,
) -> Path:
    """Copy a checkpoint's EMA, config and metadata (and consolidate its raw weights) into ``out``, with the codec's
    weights (``codec/``, checksum-checked): sampling and evaluation then need nothing but the folder. With
    ``ema_sigma_rel`` (or the classic ``ema_decay`` it corresponds to at the checkpoint's step) the EMA is instead
    reconstructed from the run's post-hoc snapshots up to that step.

    An existing non-empty ``out`` is refused unless ``overwrite``; the export is written into a temporary folder
    beside ``out`` and renamed into place, so ``out`` is never half written."""
    ref = resolve_checkpoint(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        kind = "an export" if (out / EMA_FILE).is_file() else "a non-empty folder that is not an export"
        raise ExportError(
            f"{out} exists and is {kind}: nothing was written. Pass --overwrite to replace it, or export to a new "
            "folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_export(ref, staging, include_raw, ema_sigma_rel, ema_decay)
        if out.exists():
            old = out.parent / f"{staging.name}.old"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_export(ref, out: Path, include_raw: bool, ema_sigma_rel: Optional[float], ema_decay: Optional[float]):
    shutil.copyfile(ref.path / CONFIG_FILE, out / CONFIG_FILE)
    meta = json.loads((ref.path / META_FILE).read_text())
    meta["data"]["codec"] = _copy_codec(meta["data"]["codec"], ref.path, out)
    write_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    if ema_sigma_rel is None and ema_decay is None:
        shutil.copyfile(ref.path / EMA_FILE, out / EMA_FILE)
    else:
        if ema_sigma_rel is None:
            ema_sigma_rel = decay_to_sigma_rel(ema_decay, ref.step)
        result = reconstruct(list_snapshots(ref.directory / POSTHOC_DIR, ref.step), ema_sigma_rel, ref.step)
        write_atomic(out / EMA_FILE, save({k: v.contiguous() for k, v in result.state.items()}))
        info = {
            "sigma_rel": ema_sigma_rel,
            "ema_decay": ema_decay,
            "step": result.step,
            "residual": result.residual,
            "snapshots": result.snapshots,
        }
        write_atomic(out / POSTHOC_INFO_FILE, json.dumps(info, indent=2) + "\n")
        print(
            f"EMA reconstructed at sigma_rel {ema_sigma_rel:.4g} (step {result.step}) from {result.snapshots} "
            f"snapshot(s); profile residual {result.residual:.4f}",
            flush=True,
        )
    if include_raw:
        from far_scale.distributed.engine import consolidated_fp32_state_dict

        state = consolidated_fp32_state_dict(str(ref.directory), ref.tag)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / RAW_FILE))


def _copy_codec(codec: dict, folder: Path, out: Path) -> dict:
    """The codec's weights copied into ``out/codec/`` after checking their checksum; the record names the copy
    relative to the export. Weights that are not here are a clear error (the export would not sample)."""
    from far_scale.codecs import load_manifest_codec

    source = codec_weights_path(codec, folder)
    load_manifest_codec({**codec, "weights_path": str(source)})  # checks the checksum and that the weights load
    target = out / CODEC_DIR / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
    return {**codec, "weights_path": str(target.relative_to(out)), "source_weights_path": str(source.resolve())}
