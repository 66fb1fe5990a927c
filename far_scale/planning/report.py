"""The ``check-config`` report: resolved YAML, derived numbers, model size, memory, DeepSpeed config."""

from __future__ import annotations

import json
from typing import Optional

from far_scale.config.loader import config_to_yaml
from far_scale.config.schema import Config
from far_scale.planning.plan import DataSource, plan_for
from far_scale.planning.scale import ScaleAssumptions, plan_scale, render_scale
from far_scale.posthoc_ema import storage_costs

GIB = 1024**3


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M ({count:,})"


def _posthoc_lines(cfg: Config, plan, world_size: int) -> list[str]:
    posthoc = cfg.ema.posthoc
    if not posthoc.enabled:
        return []
    storage, per_gpu = storage_costs(
        plan.parameters["total"],
        len(posthoc.sigma_rels),
        posthoc.snapshot_dtype,
        posthoc.snapshot_interval_steps,
        plan.total_steps,
        world_size,
    )
    total = f"{storage / GIB:,.2f} GiB" if storage is not None else "unknown (no step count)"
    return [
        f"# post-hoc EMA: {len(posthoc.sigma_rels)} tracked profile(s) (sigma_rel "
        f"{', '.join(f'{s:g}' for s in posthoc.sigma_rels)}), a {posthoc.snapshot_dtype} snapshot every "
        f"{posthoc.snapshot_interval_steps} steps: {total} of snapshots for the run (never pruned), "
        f"{per_gpu / GIB:.2f} GiB of fp32 EMAs per GPU",
        "",
    ]


def render_report(
    cfg: Config,
    world_size: int,
    source: DataSource,
    precision: Optional[str] = None,
    assumptions: ScaleAssumptions = ScaleAssumptions(),
) -> str:
    """Validate ``cfg``, plan it and return the full human-readable report; raises ``ConfigError``."""
    plan = plan_for(cfg, world_size, source, precision)
    data, memory, dims = source.spec, plan.memory, plan.dims
    manifest = source.manifest
    stored = (
        sum(e.num_bytes for e in manifest.shards) / max(1, sum(e.num_samples for e in manifest.shards))
        if manifest is not None
        else None
    )
    scale = plan_scale(
        plan.parameters["total"],
        plan.parameters["head"] if plan.whole_target_network else 0,
        cfg.parallel.zero_stage,
        world_size,
        plan.grad_accum_steps,
        plan.micro_batch,
        plan.precision,
        plan.gradient_dtypes.reduce,
        data.seq_len,
        data.token_dim,
        assumptions,
        stored,
    )
    lines = [
        "# resolved config",
        config_to_yaml(cfg).rstrip(),
        "",
        f"# data ({source.description})",
        f"seq_len={data.seq_len} token_dim={data.token_dim} num_classes={data.num_classes} "
        f"num_images={data.num_images if data.num_images is not None else 'unknown'}",
        f"latents -> tokens (data.normalize={cfg.data.normalize}): "
        + (source.normalization.describe() if source.normalization else "resolved when the manifest is read"),
        "",
        f"# derived (world size {world_size})",
        *(f"{key}: {value}" for key, value in plan.as_dict().items()),
        *(
            []
            if plan.steps_per_epoch_exact or plan.steps_per_epoch is None
            else [
                "(steps per epoch estimated as ceil(images / global batch): no manifest to count the loader's batches)"
            ]
        ),
        f"architecture: {cfg.model.arch} = {dims.backbone} backbone "
        f"({dims.encoder_depth}+{dims.decoder_depth} blocks, width {dims.width}, {dims.num_heads} heads) "
        f"+ {dims.head_kind} head ({dims.head_depth} x {dims.head_width})",
        "",
        "# parameters",
        *(f"{name}: {_millions(count)}" for name, count in plan.parameters.items()),
        "",
        f"# model-state memory per GPU (ZeRO-{cfg.parallel.zero_stage}, {plan.precision}, world size {world_size}; "
        "activations not included)",
        f"params: {memory.params / GIB:.2f} GiB, grads: {memory.grads / GIB:.2f} GiB, "
        f"optimizer: {memory.optimizer / GIB:.2f} GiB, ema: {memory.ema / GIB:.2f} GiB "
        f"({'sharded evaluation EMA + whole target network' if plan.whole_target_network else 'sharded'}), "
        f"total: {memory.total / GIB:.2f} GiB",
        f"activations (estimated): {plan.activation_bytes_per_image / GIB:.3f} GiB per image x micro batch "
        f"{plan.micro_batch} = {plan.micro_batch * plan.activation_bytes_per_image / GIB:.2f} GiB",
        f"micro batch {plan.micro_batch}: {plan.micro_batch_reason}",
        f"model construction: {plan.construction_bytes / GIB:.2f} GiB of fp32 weights per rank at most "
        + (
            "(built partitioned with zero.Init: its share plus the layer being built)"
            if plan.built_partitioned
            else "(built whole on every rank; ZeRO-3 builds it partitioned)"
        ),
        "",
        f"# gradients: accumulated in {plan.gradient_dtypes.accumulate} over {plan.grad_accum_steps} micro-batch(es), "
        f"reduced over the ranks in {plan.gradient_dtypes.reduce} (parallel.grad_accum_dtype, parallel.reduce_dtype)",
        "",
        *render_scale(scale, assumptions, world_size, cfg.parallel.zero_stage),
        "",
        *_posthoc_lines(cfg, plan, world_size),
        f"# collectives: a rank waits at most {cfg.parallel.process_group_timeout_min:g} min for the others "
        "(parallel.process_group_timeout_min; universal-checkpoint conversion and checkpoint uploads run inside it)",
        "",
        "# deepspeed config (optimizer: client torch.optim.AdamW; LR schedule: client-side)",
        json.dumps(plan.deepspeed_config, indent=2),
    ]
    return "\n".join(lines)
