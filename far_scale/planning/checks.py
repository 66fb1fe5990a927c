"""Cross-section validation of a resolved recipe at a world size (and, when known, the data shape).

Every problem is collected and raised once (``ConfigError``), each message naming its fields.
"""

from __future__ import annotations

from typing import Optional

from fsspec.registry import known_implementations

from far_scale.config.loader import ConfigError
from far_scale.config.schema import Config
from far_scale.data.spec import DataSpec
from far_scale.models.generation import num_iter_problem
from far_scale.planning.builder import resolve_dims
from far_scale.posthoc_ema import gamma_to_sigma_rel


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


TRACKING_SCHEMES = ("http", "https", "sqlite", "file")


def _url_problems(cfg: Config) -> list[str]:
    """Storage URLs with a protocol fsspec does not know, and tracking URIs MLflow cannot open."""
    problems = []
    for name, url in (("data.url", cfg.data.url), ("checkpoint.url", cfg.checkpoint.url)):
        scheme = url.split("://", 1)[0] if "://" in url else None
        if scheme is not None and scheme not in known_implementations and scheme != "file":
            problems.append(
                f"{name}={url}: unknown protocol {scheme!r}; use a local path, file:// or s3://bucket/prefix"
            )
    uri = cfg.tracking.uri
    if uri and uri.split(":", 1)[0] not in TRACKING_SCHEMES:
        problems.append(
            f"tracking.uri={uri}: use http(s)://host:port (an mlflow server), sqlite:///path.db or "
            "file:///path, or leave it empty for the run's own sqlite store"
        )
    return problems


def check_config(cfg: Config, world_size: int, data: Optional[DataSpec] = None) -> list[str]:
    """Every cross-section problem of ``cfg`` at ``world_size``, as messages naming the fields."""
    problems: list[str] = _url_problems(cfg)
    if world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
        world_size = 1
    par = cfg.parallel
    per_step = (1 if par.micro_batch_size_per_gpu == "auto" else par.micro_batch_size_per_gpu) * world_size
    if par.global_batch_size % per_step:
        problems.append(
            f"parallel.global_batch_size={par.global_batch_size} is not divisible by "
            f"parallel.micro_batch_size_per_gpu={par.micro_batch_size_per_gpu} x world_size={world_size} (= {per_step})"
        )
    if (cfg.run.max_steps is None) == (cfg.run.epochs is None):
        problems.append("set exactly one of run.max_steps and run.epochs")
    if cfg.schedule.warmup_epochs is not None and cfg.schedule.warmup_steps is not None:
        problems.append("set at most one of schedule.warmup_epochs and schedule.warmup_steps")
    try:
        dims = resolve_dims(cfg.model)
    except ValueError as exc:
        problems.append(str(exc))
        dims = None
    if dims is not None:
        if dims.width % dims.num_heads:
            problems.append(f"model.width={dims.width} is not divisible by model.num_heads={dims.num_heads}")
        head = cfg.model.head
        if dims.head_kind == "shortcut" and not _is_power_of_two(head.num_levels):
            problems.append(f"model.head.num_levels={head.num_levels} must be a power of two")
        for name in ("head_steps", "head_steps_end"):
            steps = getattr(cfg.eval, name)
            if steps is None:
                continue
            if dims.head_kind == "shortcut" and not (_is_power_of_two(steps) and steps <= head.num_levels):
                problems.append(
                    f"eval.{name}={steps} must be a power of two <= model.head.num_levels={head.num_levels} "
                    "for the shortcut head"
                )
            elif dims.head_kind == "diffusion" and steps > head.num_train_timesteps:
                problems.append(
                    f"eval.{name}={steps} exceeds model.head.num_train_timesteps={head.num_train_timesteps}"
                )
    if cfg.model.head.guidance_distillation_scale != 1.0:
        if dims is not None and dims.head_kind != "shortcut":
            problems.append(
                "model.head.guidance_distillation_scale applies to the shortcut head (arch far or "
                f"far_causal), not to model.arch={cfg.model.arch}"
            )
        if cfg.model.class_dropout <= 0:
            problems.append(
                "model.head.guidance_distillation_scale needs model.class_dropout > 0: the null class "
                "that gives the unconditional velocity is otherwise never trained"
            )
    if bool(cfg.eval.inception_weights) != bool(cfg.eval.reference_stats):
        problems.append(
            "eval.inception_weights and eval.reference_stats go together: set both for FID during training, or neither"
        )
    if cfg.eval.benchmark and cfg.eval.inception_weights:
        problems.append(
            "set one quality metric for training-time evaluation: eval.benchmark (offline) or "
            "eval.inception_weights + eval.reference_stats (FID), not both"
        )
    if cfg.parallel.offload_optimizer != "none":
        problems.append(
            f"parallel.offload_optimizer={cfg.parallel.offload_optimizer}: DeepSpeed offloads only its own "
            "CPU Adam (zero_force_ds_cpu_optimizer), and far-scale trains with a client torch AdamW (no "
            "JIT-compiled op): set parallel.offload_optimizer=none and lower the memory with "
            "parallel.zero_stage=3 or parallel.activation_checkpointing=true"
        )
    if cfg.parallel.zero_stage == 0 and cfg.parallel.precision == "bf16" and cfg.parallel.grad_accum_dtype == "fp32":
        problems.append(
            "parallel.grad_accum_dtype=fp32 with parallel.zero_stage=0 and bf16: DeepSpeed 0.19 accumulates bf16 "
            "gradients in fp32 only at ZeRO-1-3; set parallel.zero_stage=1 (or grad_accum_dtype=auto)"
        )
    if cfg.parallel.compile and cfg.parallel.zero_stage == 3:
        problems.append(
            "parallel.compile=true with parallel.zero_stage=3: ZeRO-3 gathers each parameter in module hooks that "
            "torch.compile'd blocks break on; compile at ZeRO-0-2 (set parallel.zero_stage=2), or set "
            "parallel.compile=false"
        )
    if cfg.ema.posthoc.enabled:
        widest = gamma_to_sigma_rel(0.0)
        for sigma in cfg.ema.posthoc.sigma_rels:
            if not 0 < sigma < widest:
                problems.append(
                    f"ema.posthoc.sigma_rels: {sigma} is outside (0, {widest:.4f}) (the widest power-function profile "
                    "is the plain average of all steps); EDM2 tracks 0.05 and 0.10"
                )
    if cfg.model.mask_ratio_min > cfg.model.mask_ratio_mean:
        problems.append(
            f"model.mask_ratio_min={cfg.model.mask_ratio_min} is above model.mask_ratio_mean={cfg.model.mask_ratio_mean}"
        )
    if data is not None:
        problems.extend(data.mismatches(cfg.data.expect))
        if cfg.data.hflip and not data.hflip_invariant:
            problems.append(
                "data.hflip is true but the dataset's card (manifest source.dataset) says a horizontal "
                "flip changes the class (a mirrored digit is another glyph): set data.hflip=false"
            )
        problem = num_iter_problem(cfg.eval.num_iter, data.seq_len)
        if problem:
            problems.append(problem)
        needs_images = cfg.run.epochs is not None or cfg.schedule.warmup_epochs is not None
        if needs_images and data.num_images is None:
            problems.append(
                "run.epochs / schedule.warmup_epochs need the dataset size: read from the manifest, "
                "or set data.expect.num_images"
            )
    return problems


def validate(cfg: Config, world_size: int, data: Optional[DataSpec] = None) -> None:
    """Raise one ``ConfigError`` listing every cross-section problem."""
    problems = check_config(cfg, world_size, data)
    if problems:
        raise ConfigError(problems, f"world size {world_size}")
