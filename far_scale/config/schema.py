"""Typed, frozen configuration sections of one far-scale run.

Every default of a run lives here and nowhere else. Recipes (YAML) override these
defaults; the loader (``far_scale.config.loader``) builds these models strictly:
unknown keys and wrong types are errors naming the dotted path.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every section: immutable, no unknown keys, no silent type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class HeadConfig(Section):
    """The per-token head that turns a backbone output z into a token (docs/concepts.md, heads)."""

    kind: Literal["auto", "shortcut", "diffusion"] = "auto"
    """``auto`` picks from ``model.arch``: far/far_causal -> shortcut, mar -> diffusion."""
    depth: Optional[int] = Field(default=None, ge=1)
    """Residual blocks of the adaLN MLP; None takes the size preset's value."""
    width: Optional[int] = Field(default=None, ge=1)
    """Hidden width of the adaLN MLP; None takes the size preset's value."""
    num_repeats: int = Field(default=4, ge=1)
    """Each target token is repeated this many times with independent noise/time draws."""
    # Diffusion head
    num_train_timesteps: int = Field(default=1000, ge=2)
    noise_schedule: Literal["cosine", "linear"] = "cosine"
    # Shortcut head
    num_levels: int = Field(default=128, ge=2)
    """Finest step size is 1/num_levels (a power of two)."""
    self_consistency_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    consistency_target: Literal["ema", "live", "eval_ema"] = "ema"
    """Which weights produce the stop-gradient self-consistency targets: ``ema`` an EMA of the head of its own
    (``target_ema_decay``, as the reference shortcut-model code), ``live`` the current weights, ``eval_ema``
    the evaluation EMA (``optim.ema_decay``; slow: its targets lag the head by ~1/(1 - decay) steps)."""
    target_ema_decay: float = Field(default=0.999, ge=0.0, lt=1.0)
    """Decay of the target EMA (``consistency_target: ema``), independent of ``optim.ema_decay``."""
    target_ema_warmup_steps: int = Field(default=0, ge=0)
    """Ramp the target EMA's decay linearly from 0 over this many steps, so early targets follow the head."""
    guidance_distillation_scale: float = Field(default=1.0, ge=1.0)
    """Guidance distillation: the self-consistency targets built from finest-level half steps use
    v_u + w (v_c - v_u) (an extra no-gradient backbone pass under the null class per step), so the
    coarse levels learn the guided flow; sample them with ``eval.cfg_scale=1``. 1 turns it off."""
    clip_value: float = Field(default=4.0, gt=0.0)


class ModelConfig(Section):
    """Backbone architecture and head (docs/concepts.md). Sizes come from ``far_scale.models.registry``."""

    arch: Literal["far", "far_causal", "mar"] = "far"
    size: Literal["tiny", "base", "large", "huge", "custom"] = "base"
    encoder_depth: Optional[int] = Field(default=None, ge=1)
    decoder_depth: Optional[int] = Field(default=None, ge=1)
    width: Optional[int] = Field(default=None, ge=1)
    num_heads: Optional[int] = Field(default=None, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0.0)
    num_buffer_tokens: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Attention and projection dropout in the transformer blocks."""
    class_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Probability of replacing the class embedding by the learned null embedding (CFG)."""
    mask_ratio_min: float = Field(default=0.7, gt=0.0, le=1.0)
    mask_ratio_mean: float = Field(default=1.0, gt=0.0, le=1.0)
    mask_ratio_std: float = Field(default=0.25, gt=0.0)
    head: HeadConfig = HeadConfig()


class DataExpectation(Section):
    """What the recipe expects of the data; checked against the manifest when it is read.

    The shapes a model is built with always come from the manifest; these values let
    ``check-config`` size a model before any data exists and catch a recipe pointed at
    the wrong shards.
    """

    seq_len: Optional[int] = Field(default=None, ge=1)
    token_dim: Optional[int] = Field(default=None, ge=1)
    num_classes: Optional[int] = Field(default=None, ge=1)
    num_images: Optional[int] = Field(default=None, ge=1)


class DataConfig(Section):
    url: str = ""
    """Directory or fsspec URL (``/path``, ``file://``, ``s3://bucket/prefix``) holding manifest.json and shards."""
    num_workers: int = Field(default=2, ge=0)
    shuffle: bool = True
    split: Literal["shards", "samples"] = "shards"
    """shards: each rank reads its own shards (scales); samples: every rank reads all shards and keeps its
    slice of each global batch, so a step's data is the same at any world size (small data, exact tests)."""
    read_retry_s: float = Field(default=300.0, ge=0.0)
    """How long a shard that cannot be read (object store down, network) is retried, with exponential backoff,
    before the run stops with an error naming the shard's URL. Damaged shards are never retried."""
    expect: DataExpectation = DataExpectation()


class OptimConfig(Section):
    """AdamW (docs/concepts.md, training defaults). ``lr`` None derives it as base_lr * global_batch_size / 256."""

    lr: Optional[float] = Field(default=None, gt=0.0)
    base_lr: float = Field(default=1e-4, gt=0.0)
    lr_reference_batch: int = Field(default=256, ge=1)
    betas: tuple[float, float] = Field(default=(0.9, 0.95), strict=False)
    """YAML has no tuples: a two-element list is accepted."""
    eps: float = Field(default=1e-8, gt=0.0)
    weight_decay: float = Field(default=0.02, ge=0.0)
    grad_clip: float = Field(default=3.0, ge=0.0)
    """Global gradient-norm clip; 0 disables clipping."""
    ema_decay: float = Field(default=0.9999, ge=0.0, lt=1.0)


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine"] = "constant"
    warmup_epochs: Optional[float] = Field(default=None, ge=0.0)
    warmup_steps: Optional[int] = Field(default=None, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Cosine decays to lr * min_lr_ratio at the last step."""


class ParallelConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    activation_checkpointing: bool = False
    global_batch_size: int = Field(default=256, ge=1)
    micro_batch_size_per_gpu: int = Field(default=64, ge=1)
    offload_optimizer: Literal["none", "cpu"] = "none"
    overlap_comm: bool = True
    reduce_bucket_size: int = Field(default=500_000_000, ge=1)
    allgather_bucket_size: int = Field(default=500_000_000, ge=1)
    stage3_prefetch_bucket_size: int = Field(default=50_000_000, ge=1)
    stage3_param_persistence_threshold: int = Field(default=100_000, ge=0)


class CheckpointConfig(Section):
    url: str = ""
    """Where checkpoints go: empty means ``<run.output_dir>/<run.name>/checkpoints``; a path or ``file://`` URL is
    used in place; ``s3://bucket/prefix`` stages each checkpoint locally (in the default place) and uploads it,
    moving the store's ``latest.json`` only once every file is up (docs/operations.md)."""
    interval_steps: int = Field(default=5000, ge=1)
    keep_last: int = Field(default=3, ge=1)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = ""
    """MLflow tracking URI; empty means an embedded sqlite store under the run directory."""
    experiment: str = "far-scale"
    run_name: str = ""
    system_metrics: bool = True
    """One MLflow system-metrics monitor per node (local rank 0), restarted after a server outage."""
    system_metrics_interval_s: float = Field(default=10.0, gt=0.0)
    final_flush_timeout_s: float = Field(default=120.0, ge=0.0)
    """At the end of a run, how long an unreachable tracking server is waited for (retrying with backoff)
    before the metrics it never received are written to ``mlflow_unsent.jsonl`` in the run directory."""


class EvalConfig(Section):
    num_iter: int = Field(default=64, ge=1)
    """K: autoregressive iterations of masked generation."""
    head_steps: Optional[int] = Field(default=None, ge=1)
    """O: sampling steps of the head; None means 8 (shortcut) or 100 (diffusion)."""
    cfg_scale: float = Field(default=1.0, ge=0.0)
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = Field(default=1.0, gt=0.0)
    head_steps_end: Optional[int] = Field(default=None, ge=1)
    """Head-step schedule: anneal O (or DDPM steps) from ``head_steps`` to this as tokens become known
    (after DiSA); None keeps ``head_steps`` for every token."""
    mask_schedule_power: float = Field(default=1.0, gt=0.0)
    """Masked share after iteration k is cos(pi/2 (k/K)^p); 1 is MAR's cosine, > 1 generates the first
    (structure) tokens over more iterations and the last (detail) ones over fewer (after GtR)."""
    backbone_refresh_every: int = Field(default=1, ge=1)
    """Token caching (after LazyMAR): a full backbone pass every R iterations, lazy passes in between;
    1 turns it off."""
    guidance_refresh_every: int = Field(default=1, ge=1)
    """Guidance caching (after LazyMAR): the unconditional backbone pass every G iterations, the cached
    conditional-unconditional difference in between; 1 turns it off."""
    fast_ddpm: bool = False
    """Diffusion head: the DDPM chain's coefficients as host scalars (tuned MAR sampler)."""
    num_images: int = Field(default=50_000, ge=1)
    """Images sampled (class-balanced, over all ranks) at each evaluation when a quality metric is set."""
    batch_size: int = Field(default=64, ge=1)
    """Images per sampling batch and rank during evaluation."""
    interval_steps: int = Field(default=10_000, ge=1)
    grid_images: int = Field(default=16, ge=0)
    """Images in the sample grid logged at eval intervals and at the end; 0 turns the grid off."""
    benchmark: str = ""
    """Offline benchmark file (``far-scale eval offline-setup``): class accuracy, Fréchet distance and
    precision/recall of ``num_images`` samples at each evaluation."""
    inception_weights: str = ""
    """Local FID Inception-v3 weights; with ``reference_stats``, FID and IS at each evaluation."""
    reference_stats: str = ""
    """Reference statistics ``.npz`` (mu, sigma) for FID, e.g. ADM's ImageNet-256 reference batch."""


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    max_steps: Optional[int] = Field(default=None, ge=1)
    epochs: Optional[float] = Field(default=None, gt=0.0)
    log_interval: int = Field(default=50, ge=1)
    max_nonfinite_steps: int = Field(default=10, ge=0)
    """Micro-batches with a NaN/inf loss are skipped (on every rank) and counted; the run stops after this many."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    record_sample_keys: bool = False
    """Audit trail: each rank appends the sample keys of every step to <run_dir>/sample_keys.rank<r>.jsonl."""


class Config(Section):
    """A whole run: one recipe, fully resolved."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
