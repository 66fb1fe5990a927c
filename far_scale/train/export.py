"""``far-scale export``: a checkpoint -> plain safetensors (EMA and raw weights) + config + data info.

The export folder has the checkpoint folder's layout (``far_scale.artifacts``) plus the raw weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from safetensors.torch import save, save_file

from far_scale.artifacts import CONFIG_FILE, EMA_FILE, META_FILE, RAW_FILE, resolve_checkpoint
from far_scale.data.storage import write_atomic
from far_scale.posthoc_ema import POSTHOC_DIR, decay_to_sigma_rel, list_snapshots, reconstruct

POSTHOC_INFO_FILE = "posthoc.json"  # how the exported EMA was reconstructed (with --ema-sigma-rel)


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    include_raw: bool = True,
    ema_sigma_rel: Optional[float] = None,
    ema_decay: Optional[float] = None,
) -> Path:
    """Copy a checkpoint's EMA, config and metadata (and consolidate its raw weights); with ``ema_sigma_rel``
    (or the classic ``ema_decay`` it corresponds to at the checkpoint's step) the EMA is instead reconstructed
    from the run's post-hoc snapshots up to that step."""
    ref = resolve_checkpoint(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, META_FILE):
        shutil.copyfile(ref.path / name, out / name)
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
    return out
