"""The DeepSpeed config as a pure function of the recipe's ``parallel`` section and the plan's numbers.

No hand-written JSON anywhere: this dict (``TrainingPlan.deepspeed_config``) is what the engine
receives, what ``check-config`` prints and what is logged with a run. The optimizer (AdamW with
MAR's parameter groups, docs/concepts.md) and the LR schedule are client-side
(``far_scale.train``), so DeepSpeed needs none of its JIT-compiled optimizer ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from far_scale.config.schema import ParallelConfig

# DeepSpeed prints its own progress every `steps_per_print`; far-scale logs itself.
DS_STEPS_PER_PRINT = 1_000_000_000

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
DS_PREFETCH_DEFAULT, DS_PERSISTENCE_DEFAULT = 50_000_000, 100_000  # DeepSpeed's own ZeRO-3 defaults
FP32_BYTES = 4
ADAM_STATES = 2  # exp_avg, exp_avg_sq


@dataclass(frozen=True)
class GradientDtypes:
    """The types gradients are accumulated and reduced in: the recipe's ``auto`` resolved, in one place."""

    accumulate: str
    reduce: str


def resolve_gradient_dtypes(par: ParallelConfig, grad_accum_steps: int, precision: str) -> GradientDtypes:
    if precision == "fp32":
        return GradientDtypes("fp32", "fp32")
    accumulate = par.grad_accum_dtype
    if accumulate == "auto":
        accumulate = "fp32" if grad_accum_steps > 1 and par.zero_stage >= 1 else "bf16"
    return GradientDtypes(accumulate, "fp32" if par.reduce_dtype == "auto" else par.reduce_dtype)


BUCKET_SHARE = 4  # auto buckets: a quarter of the parameters each
MIN_BUCKET, MAX_BUCKET = 1_000_000, 500_000_000  # elements; the upper bound is DeepSpeed's default
PREFETCH_PER_WIDTH_SQUARED = 0.9
PERSISTENCE_PER_WIDTH = 10


@dataclass(frozen=True)
class Buckets:
    """DeepSpeed's bucket sizes (elements), the recipe's ``auto`` resolved for the model, in one place."""

    reduce: int
    allgather: int
    prefetch: int
    persistence: int


def resolve_buckets(par: ParallelConfig, num_params: Optional[int] = None, width: Optional[int] = None) -> Buckets:
    """``auto`` sized for a model of ``num_params`` and ``width``; without a model, DeepSpeed's own defaults."""
    if num_params is None or width is None:
        share, prefetch, persistence = MAX_BUCKET, DS_PREFETCH_DEFAULT, DS_PERSISTENCE_DEFAULT
    else:
        share = min(MAX_BUCKET, max(MIN_BUCKET, num_params // BUCKET_SHARE))
        prefetch, persistence = int(PREFETCH_PER_WIDTH_SQUARED * width * width), PERSISTENCE_PER_WIDTH * width

    def pick(value, auto: int) -> int:
        return auto if value == "auto" else value

    return Buckets(
        pick(par.reduce_bucket_size, share),
        pick(par.allgather_bucket_size, share),
        pick(par.stage3_prefetch_bucket_size, prefetch),
        pick(par.stage3_param_persistence_threshold, persistence),
    )


def build_deepspeed_config(
    par: ParallelConfig,
    grad_clip: float,
    micro_batch: int,
    grad_accum_steps: int,
    precision: str,
    buckets: Optional[Buckets] = None,
) -> dict[str, Any]:
    """DeepSpeed config for a validated ``parallel`` section; the plan supplies the micro batch (``auto``
    resolved), the accumulation, the precision it runs in (fp32 on CPU) and the bucket sizes (``auto``
    resolved for the model; without them, ``auto`` fields fall back to DeepSpeed's defaults)."""
    buckets = buckets or resolve_buckets(par)
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage >= 1:
        zero.update(reduce_bucket_size=buckets.reduce, overlap_comm=par.overlap_comm)
    if par.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=buckets.allgather)
    if par.zero_stage >= 2:
        zero.update(contiguous_gradients=True)
    if par.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=buckets.prefetch,
            stage3_param_persistence_threshold=buckets.persistence,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if par.offload_optimizer != "none" and par.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": par.offload_optimizer, "pin_memory": True}
    dtypes = resolve_gradient_dtypes(par, grad_accum_steps, precision)
    return {
        "train_batch_size": par.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "data_types": {"grad_accum_dtype": dtypes.accumulate},
        "communication_data_type": dtypes.reduce,
        # The optimizer is a client torch AdamW: ZeRO must be told that is intended.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": DS_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        # On by default, DeepSpeed's throughput timer synchronises the device at every forward and step; the
        # trainer measures its own step times (metrics.jsonl) and needs none of it.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


@dataclass(frozen=True)
class ModelStateMemory:
    """Bytes of model states per GPU (ZeRO paper accounting, activations excluded)."""

    params: float
    grads: float
    optimizer: float
    ema: float
    """The evaluation EMA's share on one GPU and any EMA kept whole (the shortcut head's target network)."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema


def estimate_model_state_memory(
    num_params: int,
    zero_stage: int,
    world_size: int,
    precision: str,
    whole_ema_params: int = 0,
    grad_dtype: Optional[str] = None,
) -> ModelStateMemory:
    """Per-GPU bytes for params, grads, AdamW states (+ fp32 master copy in bf16) and the fp32 EMAs.

    Stage 1 shards optimizer states, stage 2 also gradients, stage 3 also parameters. The evaluation
    EMA is sharded over the ranks at every stage (``far_scale.train.ema``); ``whole_ema_params``
    counts EMA weights kept whole on every GPU (the shortcut head's target network); gradients take
    ``grad_dtype`` bytes (the accumulation type; default: the model's).
    """
    width = BYTES_PER_PARAM[precision]
    optimizer_bytes = (ADAM_STATES + (1 if precision != "fp32" else 0)) * FP32_BYTES * num_params
    params, grads = width * num_params, BYTES_PER_PARAM[grad_dtype or precision] * num_params
    ema = FP32_BYTES * (num_params / world_size + whole_ema_params)
    if zero_stage >= 1:
        optimizer_bytes /= world_size
    if zero_stage >= 2:
        grads /= world_size
    if zero_stage >= 3:
        params /= world_size
    return ModelStateMemory(params=params, grads=grads, optimizer=optimizer_bytes, ema=ema)


def builds_partitioned(zero_stage: int) -> bool:
    """ZeRO-3 builds the model partitioned over the ranks (``zero.Init``); other stages build it whole."""
    return zero_stage == 3


def estimate_construction_memory(num_params: int, largest_layer_params: int, zero_stage: int, world_size: int) -> float:
    """The most fp32 weight bytes one rank holds while the model is built: its share plus the layer being
    built when built partitioned (communication and initialisation buffers of that layer come on top),
    else the whole model."""
    if builds_partitioned(zero_stage):
        return FP32_BYTES * (num_params / world_size + largest_layer_params)
    return FP32_BYTES * num_params
