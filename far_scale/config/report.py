"""The ``check-config`` report: resolved YAML, derived numbers, model size, memory, DeepSpeed config."""

from __future__ import annotations

import json
from typing import Optional

from far_scale.config.loader import config_to_yaml
from far_scale.config.plan import derive_plan
from far_scale.config.schema import Config
from far_scale.data.spec import DataSpec
from far_scale.distributed.deepspeed_config import build_deepspeed_config, estimate_model_state_memory
from far_scale.models.model import count_parameters_for

GIB = 1024**3


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M ({count:,})"


def render_report(cfg: Config, world_size: int, data: DataSpec, data_source: str, precision: Optional[str] = None) -> str:
    """Validate ``cfg`` and return the full human-readable report; raises ``ConfigError``."""
    plan = derive_plan(cfg, world_size, data)
    ds_config = build_deepspeed_config(cfg, world_size, precision)
    params = count_parameters_for(cfg.model, data)
    precision = precision or cfg.parallel.precision
    # The target network (an EMA of the shortcut head kept whole on every GPU) runs on the head's weights.
    shortcut_targets = plan.dims.head_kind == "shortcut" and cfg.model.head.consistency_target != "live"
    memory = estimate_model_state_memory(params["total"], cfg.parallel.zero_stage, world_size, precision,
                                         whole_ema_params=params["head"] if shortcut_targets else 0)
    dims = plan.dims
    lines = [
        "# resolved config",
        config_to_yaml(cfg).rstrip(),
        "",
        f"# data ({data_source})",
        f"seq_len={data.seq_len} token_dim={data.token_dim} num_classes={data.num_classes} "
        f"num_images={data.num_images if data.num_images is not None else 'unknown'}",
        "",
        f"# derived (world size {world_size})",
        *(f"{key}: {value}" for key, value in plan.as_dict().items()),
        f"architecture: {cfg.model.arch} = {dims.backbone} backbone "
        f"({dims.encoder_depth}+{dims.decoder_depth} blocks, width {dims.width}, {dims.num_heads} heads) "
        f"+ {dims.head_kind} head ({dims.head_depth} x {dims.head_width})",
        "",
        "# parameters",
        *(f"{name}: {_millions(count)}" for name, count in params.items()),
        "",
        f"# model-state memory per GPU (ZeRO-{cfg.parallel.zero_stage}, {precision}, world size {world_size}; "
        "activations not included)",
        f"params: {memory.params / GIB:.2f} GiB, grads: {memory.grads / GIB:.2f} GiB, "
        f"optimizer: {memory.optimizer / GIB:.2f} GiB, ema: {memory.ema / GIB:.2f} GiB "
        f"({'sharded evaluation EMA + whole target network' if shortcut_targets else 'sharded'}), "
        f"total: {memory.total / GIB:.2f} GiB",
        "",
        "# deepspeed config (optimizer: client torch.optim.AdamW; LR schedule: client-side)",
        json.dumps(ds_config, indent=2),
    ]
    return "\n".join(lines)
