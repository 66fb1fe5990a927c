"""The lines rank 0 prints when a run starts: what runs where, the EMA's share, the partitioned build."""

from __future__ import annotations

from typing import Optional

from torch import nn

from far_scale.config.schema import Config
from far_scale.data.normalization import LatentNormalization
from far_scale.data.spec import DataSpec
from far_scale.distributed.engine import partition_bytes
from far_scale.planning.plan import TrainingPlan

MIB = 2**20


def run_banner(
    cfg: Config,
    plan: TrainingPlan,
    device_type: str,
    data: DataSpec,
    normalization: LatentNormalization,
    resumed_step: Optional[int],
    ema,
    targets,
    partitioned_module: Optional[nn.Module],
) -> list[str]:
    """``ema`` the evaluation EMA, ``targets`` the TargetNetwork, ``partitioned_module`` the engine's module
    when it was built partitioned (ZeRO-3)."""
    par = cfg.parallel
    lines = [
        f"far-scale train: {cfg.model.arch} ({cfg.model.size}) on {plan.world_size} x {device_type}, "
        f"{plan.precision}, ZeRO-{par.zero_stage}; {plan.samples_per_step} images/step = "
        f"{plan.micro_batch} x {plan.world_size} ranks x {plan.grad_accum_steps} accumulation; "
        f"{plan.total_steps} steps; peak lr {plan.lr:g}; data {cfg.data.url} ({data.seq_len} x {data.token_dim} "
        f"tokens)" + (f"; resumed at step {resumed_step}" if resumed_step is not None else ""),
        f"latents -> tokens: {normalization.describe()}"
        + (f"; shortcut head clamp ±{plan.clip_value:.3g}" if plan.clip_value is not None else ""),
    ]
    held, whole = ema.num_bytes() + targets.num_bytes(), ema.full_num_bytes()
    lines.append(
        f"EMA on rank 0: {held / MIB:.2f} MiB of {whole / MIB:.2f} MiB (sharded over {plan.world_size} rank(s)"
        + (f"; target network {targets.ema.num_bytes() / MIB:.2f} MiB, whole" if targets.ema is not None else "")
        + ")"
    )
    if partitioned_module is not None:
        partitioned_bytes = partition_bytes(partitioned_module)
        lines.append(
            f"model built partitioned (ZeRO-3 zero.Init): rank 0 holds {partitioned_bytes / MIB:.2f} MiB of "
            f"weights; at most {plan.construction_bytes / MIB:.2f} MiB of fp32 weights while building"
        )
    return lines
