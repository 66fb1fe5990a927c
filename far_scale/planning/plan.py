"""The training plan: every number derived from a recipe, a world size and the data, computed once.

``far-scale check-config``, the trainer, the DeepSpeed config, MLflow's ``derived`` params and the
evaluation all read one ``TrainingPlan``; none of them re-derives a number of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from far_scale.config.loader import ConfigError
from far_scale.config.schema import Config
from far_scale.data.loader import micro_batches_per_epoch
from far_scale.data.manifest import Manifest, find_manifest
from far_scale.data.normalization import LatentNormalization, NormalizationError
from far_scale.data.spec import DataSpec
from far_scale.distributed.deepspeed_config import (
    GradientDtypes,
    ModelStateMemory,
    build_deepspeed_config,
    builds_partitioned,
    estimate_construction_memory,
    estimate_model_state_memory,
    resolve_buckets,
    resolve_gradient_dtypes,
)
from far_scale.models.model import count_parameters, largest_layer_parameters
from far_scale.models.registry import ModelDims
from far_scale.planning.activations import activation_bytes_per_image
from far_scale.planning.builder import build_meta_model, resolve_clip_value, resolve_dims
from far_scale.planning.checks import validate
from far_scale.planning.flops import train_flops_per_image

# Sampling steps of each head kind when the recipe leaves eval.head_steps unset: O for the shortcut
# head (the paper's 8), DDPM steps for the diffusion head (MAR's 100).
DEFAULT_HEAD_STEPS = {"shortcut": 8, "diffusion": 100}


GIB = 1024**3


def resolve_head_steps(head_steps: Optional[int], head_kind: str) -> int:
    """O (shortcut) or DDPM steps (diffusion) of sampling: the given value, else the head kind's default."""
    return head_steps or DEFAULT_HEAD_STEPS[head_kind]


@dataclass(frozen=True)
class DataSource:
    """The data a plan is made for: its shape, where that came from, and the manifest when there is one (with the
    normalization the recipe's ``data.normalize`` gives its latents)."""

    spec: DataSpec
    description: str
    manifest: Optional[Manifest] = None
    normalization: Optional[LatentNormalization] = None

    @classmethod
    def from_manifest(cls, manifest: Manifest, description: str, normalize: str) -> "DataSource":
        """``description`` names the manifest (its URL); a normalization its statistics cannot give is a
        ``ConfigError`` naming ``data.normalize`` and the file."""
        try:
            normalization = manifest.normalization(normalize, description)
        except NormalizationError as exc:
            raise ConfigError([f"data.normalize={normalize}: {exc}"], "data") from None
        return cls(replace(manifest.spec, latent_bound=normalization.bound), description, manifest, normalization)


def resolve_data(cfg: Config) -> DataSource:
    """The manifest at ``data.url`` when there is one, else the recipe's ``data.expect`` (check-config
    on a machine without the data)."""
    if cfg.data.url:
        try:
            manifest = find_manifest(cfg.data.url)
        except Exception as exc:  # any failure to read it (missing credentials, network, a damaged file)
            raise ConfigError(
                [f"data.url={cfg.data.url}: cannot read its manifest ({type(exc).__name__}: {exc})"], "data"
            ) from None
        if manifest is not None:
            return DataSource.from_manifest(manifest, f"{cfg.data.url.rstrip('/')}/manifest.json", cfg.data.normalize)
    try:
        return DataSource(DataSpec.from_expectation(cfg.data.expect), "recipe data.expect (no manifest read)")
    except ValueError as exc:
        raise ConfigError([str(exc)], "data") from None


@dataclass(frozen=True)
class TrainingPlan:
    """Numbers derived from a valid config, a world size, a precision and the data."""

    world_size: int
    precision: str
    dims: ModelDims
    micro_batch: int
    """Images per forward/backward on one rank: the recipe's, or what ``auto`` resolved to."""
    micro_batch_reason: str
    """Why (``auto``: the estimate that chose it)."""
    activation_bytes_per_image: float
    """Estimated activation memory of one training image (``planning.activations``)."""
    grad_accum_steps: int
    samples_per_step: int
    latent_tokens_per_step: int
    lr: float
    head_steps: int
    clip_value: Optional[float]
    """The shortcut head's clamp (``model.head.clip_value`` resolved for the data; None: ``auto`` without known
    extremes, or a diffusion head)."""
    steps_per_epoch: Optional[int]
    steps_per_epoch_exact: bool
    """True when counted from the manifest's shards exactly as the loader counts them; False for the
    ceil(images / global batch) estimate made without a manifest."""
    total_steps: Optional[int]
    warmup_steps: Optional[int]
    parameters: dict[str, int]
    expected_mask_ratio: float
    flops_per_image: float
    whole_target_network: bool
    """The shortcut head's target network is an EMA kept whole on every rank."""
    memory: ModelStateMemory
    built_partitioned: bool
    """ZeRO-3: the model is built partitioned over the ranks (``zero.Init``), never whole on one rank."""
    construction_bytes: float
    """The most fp32 weight bytes one rank holds while the model is built."""
    gradient_dtypes: GradientDtypes
    """The types gradients are accumulated and reduced in (the recipe's ``auto`` resolved)."""
    deepspeed_config: dict[str, Any]

    def as_dict(self) -> dict:
        """The scalar numbers, as printed by check-config and logged to MLflow."""
        return {
            "world_size": self.world_size,
            "precision": self.precision,
            "micro_batch_size_per_gpu": self.micro_batch,
            "grad_accum_steps": self.grad_accum_steps,
            "grad_accum_dtype": self.gradient_dtypes.accumulate,
            "grad_reduce_dtype": self.gradient_dtypes.reduce,
            "samples_per_step": self.samples_per_step,
            "latent_tokens_per_step": self.latent_tokens_per_step,
            "lr": self.lr,
            "head_steps": self.head_steps,
            "head_clip_value": self.clip_value
            if self.clip_value is not None or self.dims.head_kind != "shortcut"
            else "auto (the data's bound + 5, from the manifest)",
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "expected_mask_ratio": round(self.expected_mask_ratio, 4),
            "train_gflops_per_image": round(self.flops_per_image / 1e9, 3),
        }


def resolve_micro_batch(
    par, world_size: int, activation_bytes: float, states_bytes: Callable[[int], float]
) -> tuple[int, str]:
    """The recipe's micro batch, or for ``auto`` the largest divisor of the per-rank batch whose model states
    (``states_bytes(micro)``: accumulation changes the gradients' type) plus activations fit the budget."""
    if par.micro_batch_size_per_gpu != "auto":
        return par.micro_batch_size_per_gpu, "set in the recipe"
    per_rank = par.global_batch_size // world_size
    budget = par.auto_memory_fraction * par.device_memory_gib * GIB
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        need = states_bytes(micro) + micro * activation_bytes
        if need <= budget:
            return micro, (
                f"auto: the largest divisor of {per_rank} images per rank whose estimate fits "
                f"{par.auto_memory_fraction:g} x {par.device_memory_gib:g} GiB: {need / GIB:.3g} GiB = model states "
                f"{states_bytes(micro) / GIB:.3g} + {micro} x {activation_bytes / GIB:.3g} GiB of activations"
            )
    raise ConfigError(
        [
            f"parallel.micro_batch_size_per_gpu=auto: not even 1 image per rank fits {par.auto_memory_fraction:g} x "
            f"parallel.device_memory_gib={par.device_memory_gib:g} (model states {states_bytes(1) / GIB:.3g} GiB + "
            f"{activation_bytes / GIB:.3g} GiB of activations per image); raise parallel.zero_stage, turn on "
            "parallel.activation_checkpointing, or use more GPUs"
        ]
    )


def _steps_per_epoch(
    cfg: Config, world_size: int, micro_batch: int, accum: int, data: DataSpec, shard_sizes: Optional[Sequence[int]]
) -> tuple[Optional[int], bool]:
    par = cfg.parallel
    if shard_sizes is not None:
        micro = micro_batches_per_epoch(
            list(shard_sizes),
            cfg.data.split,
            cfg.run.seed,
            0,
            world_size,
            cfg.data.num_workers,
            micro_batch,
            accum,
        )
        return micro // accum, True
    if data.num_images:
        return math.ceil(data.num_images / par.global_batch_size), False
    return None, False


def derive_plan(
    cfg: Config,
    world_size: int,
    data: DataSpec,
    shard_sizes: Optional[Sequence[int]] = None,
    precision: Optional[str] = None,
) -> TrainingPlan:
    """Validate and derive; raises ``ConfigError`` with every problem at once.

    ``shard_sizes`` (the manifest's) make the step counts exact; ``precision`` overrides the recipe's
    (the trainer runs fp32 on CPU).
    """
    validate(cfg, world_size, data)
    par = cfg.parallel
    precision = precision or par.precision
    dims = resolve_dims(cfg.model)
    model = build_meta_model(cfg.model, data, dims)
    parameters = count_parameters(model)
    whole_target = dims.head_kind == "shortcut" and cfg.model.head.consistency_target != "live"
    activations = activation_bytes_per_image(
        cfg.model, dims, data, model.expected_mask_ratio, precision, par.activation_checkpointing
    )

    def states_for(micro: int) -> tuple[int, GradientDtypes, ModelStateMemory]:
        accum = par.global_batch_size // (micro * world_size)
        dtypes = resolve_gradient_dtypes(par, accum, precision)
        memory = estimate_model_state_memory(
            parameters["total"],
            par.zero_stage,
            world_size,
            precision,
            whole_ema_params=parameters["head"] if whole_target else 0,
            grad_dtype=dtypes.accumulate,
        )
        return accum, dtypes, memory

    micro, micro_reason = resolve_micro_batch(par, world_size, activations, lambda m: states_for(m)[2].total)
    accum, gradient_dtypes, memory = states_for(micro)
    lr = (
        cfg.optim.lr
        if cfg.optim.lr is not None
        else cfg.optim.base_lr * par.global_batch_size / cfg.optim.lr_reference_batch
    )
    steps_per_epoch, exact = _steps_per_epoch(cfg, world_size, micro, accum, data, shard_sizes)
    if cfg.run.max_steps is not None:
        total = cfg.run.max_steps
    else:
        total = math.ceil(cfg.run.epochs * steps_per_epoch) if steps_per_epoch else None
    if cfg.schedule.warmup_steps is not None:
        warmup = cfg.schedule.warmup_steps
    elif cfg.schedule.warmup_epochs is not None:
        warmup = math.ceil(cfg.schedule.warmup_epochs * steps_per_epoch) if steps_per_epoch else None
    else:
        warmup = 0
    return TrainingPlan(
        world_size=world_size,
        precision=precision,
        dims=dims,
        micro_batch=micro,
        micro_batch_reason=micro_reason,
        activation_bytes_per_image=activations,
        grad_accum_steps=accum,
        samples_per_step=par.global_batch_size,
        latent_tokens_per_step=par.global_batch_size * data.seq_len,
        lr=lr,
        head_steps=resolve_head_steps(cfg.eval.head_steps, dims.head_kind),
        clip_value=resolve_clip_value(cfg.model.head, data) if dims.head_kind == "shortcut" else None,
        steps_per_epoch=steps_per_epoch,
        steps_per_epoch_exact=exact,
        total_steps=total,
        warmup_steps=warmup,
        parameters=parameters,
        expected_mask_ratio=model.expected_mask_ratio,
        flops_per_image=train_flops_per_image(cfg.model, dims, data, model.expected_mask_ratio),
        whole_target_network=whole_target,
        memory=memory,
        built_partitioned=builds_partitioned(par.zero_stage),
        construction_bytes=estimate_construction_memory(
            parameters["total"], largest_layer_parameters(model), par.zero_stage, world_size
        ),
        gradient_dtypes=gradient_dtypes,
        deepspeed_config=build_deepspeed_config(
            par, cfg.optim.grad_clip, micro, accum, precision, resolve_buckets(par, parameters["total"], dims.width)
        ),
    )


def plan_for(cfg: Config, world_size: int, source: DataSource, precision: Optional[str] = None) -> TrainingPlan:
    """``derive_plan`` for a resolved data source (exact step counts when it has a manifest). A shortcut head
    with ``clip_value: auto`` on a manifest without per-dimension extremes is refused, naming the fix."""
    shard_sizes = source.manifest.shard_sizes if source.manifest is not None else None
    plan = derive_plan(cfg, world_size, source.spec, shard_sizes, precision)
    if source.manifest is not None and plan.dims.head_kind == "shortcut" and plan.clip_value is None:
        url = cfg.data.url.rstrip("/")
        raise ConfigError(
            [
                f"model.head.clip_value=auto: {source.description} records no per-dimension extremes (stats.dim_min "
                f"/ dim_max; written before far-scale kept them): run `far-scale data restat {url}` to add them "
                "from the shards, or set model.head.clip_value to a number"
            ]
        )
    return plan
