"""``far-scale export``: a checkpoint -> plain safetensors (EMA and raw weights) + config + data info.

The export folder has the checkpoint folder's layout (``far_scale.artifacts``) plus the raw weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from far_scale.artifacts import CONFIG_FILE, EMA_FILE, META_FILE, RAW_FILE, resolve_checkpoint


def export_checkpoint(source: str | Path, out: str | Path, include_raw: bool = True) -> Path:
    ref = resolve_checkpoint(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (EMA_FILE, CONFIG_FILE, META_FILE):
        shutil.copyfile(ref.path / name, out / name)
    if include_raw:
        from far_scale.distributed.engine import consolidated_fp32_state_dict

        state = consolidated_fp32_state_dict(str(ref.directory), ref.tag)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / RAW_FILE))
    return out
