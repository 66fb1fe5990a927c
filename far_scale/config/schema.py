"""Typed, frozen configuration sections of one far-scale run.

Every default of a run lives here and nowhere else. Recipes (YAML) override these
defaults; the loader (``far_scale.config.loader``) builds these models strictly:
unknown keys and wrong types are errors naming the dotted path.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every section: immutable, no unknown keys, no silent type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)


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
    num_train_timesteps: int = Field(default=1000, ge=2)
    """Diffusion head: DDPM training timesteps."""
    noise_schedule: Literal["cosine", "linear"] = "cosine"
    """Diffusion head: the DDPM noise schedule (MAR: cosine)."""
    num_levels: int = Field(default=128, ge=2)
    """Finest step size is 1/num_levels (a power of two)."""
    self_consistency_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    """Shortcut head: share of each batch's rows trained on the self-consistency target (the rest on flow matching
    at the finest step)."""
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
    clip_value: Union[Annotated[float, Field(gt=0.0)], Literal["auto"]] = "auto"
    """Shortcut head: the self-consistency midpoint and target are clipped to [-clip_value, clip_value] (a guard
    against bootstrap blow-ups). ``auto`` follows the data: the largest |token| after ``data.normalize`` (the
    manifest's per-dimension extremes) plus 5 (a standard-normal draw's reach), so that every real token and every
    velocity from noise to it stays reachable. The reference code's constant 4 cut the digits' ink-heavy tokens
    (largest |token| 12.9): measured, it put FAR outside MAR-100's interval where ``auto`` put it inside
    (docs/benchmarks.md, scaling study; docs/concepts.md, the clamp)."""


class ModelConfig(Section):
    """Backbone architecture and head (docs/concepts.md). Sizes come from ``far_scale.models.registry``."""

    arch: Literal["far", "far_causal", "mar"] = "far"
    """far: masked backbone + shortcut head; far_causal: causal backbone + shortcut head; mar: masked backbone +
    diffusion head (the baseline)."""
    size: Literal["tiny", "base", "large", "huge", "custom"] = "base"
    """A preset of ``far_scale.models.registry`` (tiny, base, large, huge) or custom (set every dimension)."""
    encoder_depth: Optional[int] = Field(default=None, ge=1)
    """Encoder blocks (masked backbone); None takes the size preset's value."""
    decoder_depth: Optional[int] = Field(default=None, ge=1)
    """Decoder blocks (masked backbone); None takes the size preset's value. The causal backbone has encoder +
    decoder depth blocks."""
    width: Optional[int] = Field(default=None, ge=1)
    """Transformer width; None takes the size preset's value."""
    num_heads: Optional[int] = Field(default=None, ge=1)
    """Attention heads (must divide the width); None takes the size preset's value."""
    mlp_ratio: float = Field(default=4.0, gt=0.0)
    """Hidden width of each block's MLP as a multiple of the width."""
    num_buffer_tokens: int = Field(default=64, ge=1)
    """Buffer slots holding the class embedding before the tokens (masked backbone; MAR uses 64)."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Attention and projection dropout in the transformer blocks."""
    class_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Probability of replacing the class embedding by the learned null embedding (CFG)."""
    mask_ratio_min: float = Field(default=0.7, gt=0.0, le=1.0)
    """Training mask ratio r ~ N(mask_ratio_mean, mask_ratio_std) truncated to [mask_ratio_min, 1]."""
    mask_ratio_mean: float = Field(default=1.0, gt=0.0, le=1.0)
    """Mean of the (untruncated) mask-ratio normal."""
    mask_ratio_std: float = Field(default=0.25, gt=0.0)
    """Standard deviation of the (untruncated) mask-ratio normal."""
    head: HeadConfig = HeadConfig()


class DataExpectation(Section):
    """What the recipe expects of the data; checked against the manifest when it is read.

    The shapes a model is built with always come from the manifest; these values let
    ``check-config`` size a model before any data exists and catch a recipe pointed at
    the wrong shards.
    """

    seq_len: Optional[int] = Field(default=None, ge=1)
    """Tokens per image (256 for 256 px with KL-16)."""
    token_dim: Optional[int] = Field(default=None, ge=1)
    """Channels per token (16 for KL-16)."""
    num_classes: Optional[int] = Field(default=None, ge=1)
    """Classes of the dataset."""
    num_images: Optional[int] = Field(default=None, ge=1)
    """Images in the dataset (needed for run.epochs / warm-up epochs without a manifest)."""


class DataConfig(Section):
    url: str = ""
    """Directory or fsspec URL (``/path``, ``file://``, ``s3://bucket/prefix``) holding manifest.json and shards."""
    num_workers: int = Field(default=2, ge=0)
    """DataLoader worker processes per rank, each reading its own shards; 0 reads in the training process."""
    shuffle: bool = True
    """Shuffle the shard order and the samples within each shard, per epoch (deterministic in run.seed)."""
    split: Literal["shards", "samples"] = "shards"
    """shards: each rank reads its own shards (scales); samples: every rank reads all shards and keeps its
    slice of each global batch, so a step's data is the same at any world size (small data, exact tests)."""
    normalize: Literal["global", "channel"] = "global"
    """How latents become tokens (docs/concepts.md, latents): ``global`` multiplies every dimension by the
    manifest's one scale (MAR's 1 / std); ``channel`` standardizes each latent channel by its own mean and std
    (the manifest's ``channel_mean`` / ``channel_std``). Sampling decodes with what training used (meta.json)."""
    hflip: bool = True
    """Train on the stored horizontal flip half the time (MAR's only augmentation). Off for data whose class a
    flip changes (digits: the dataset card says ``hflip_invariant: false``; train refuses the flip there)."""
    read_retry_s: float = Field(default=300.0, ge=0.0)
    """How long a shard that cannot be read (object store down, network) is retried, with exponential backoff,
    before the run stops with an error naming the shard's URL. Damaged shards are never retried."""
    expect: DataExpectation = DataExpectation()


class OptimConfig(Section):
    """AdamW (docs/concepts.md, training defaults). ``lr`` None derives it as base_lr * global_batch_size / 256."""

    lr: Optional[float] = Field(default=None, gt=0.0)
    """Peak learning rate; None derives base_lr * global_batch_size / lr_reference_batch."""
    base_lr: float = Field(default=1e-4, gt=0.0)
    """Learning rate per lr_reference_batch images (MAR: 1e-4 per 256)."""
    lr_reference_batch: int = Field(default=256, ge=1)
    """The batch size base_lr is stated for."""
    betas: tuple[float, float] = Field(default=(0.9, 0.95), strict=False)
    """YAML has no tuples: a two-element list is accepted."""
    eps: float = Field(default=1e-8, gt=0.0)
    """AdamW epsilon."""
    weight_decay: float = Field(default=0.02, ge=0.0)
    """AdamW weight decay on >= 2-D backbone weights (none on biases, norms, 1-D parameters and the head)."""
    grad_clip: float = Field(default=3.0, ge=0.0)
    """Global gradient-norm clip; 0 disables clipping."""
    ema_decay: float = Field(default=0.9999, ge=0.0, lt=1.0)
    """Decay of the evaluation EMA, updated every step; sampling and evaluation use it."""


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine"] = "constant"
    """Learning rate after the warm-up: constant (MAR) or cosine to lr * min_lr_ratio."""
    warmup_epochs: Optional[float] = Field(default=None, ge=0.0)
    """Linear warm-up length in epochs (MAR: 100); exclusive with warmup_steps."""
    warmup_steps: Optional[int] = Field(default=None, ge=0)
    """Linear warm-up length in optimizer steps; exclusive with warmup_epochs."""
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Cosine decays to lr * min_lr_ratio at the last step."""


class ParallelConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters sharded over the ranks."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """bf16 autocast on GPU; CPU runs always use fp32."""
    tf32: bool = True
    """On GPUs: fp32 matmuls in TF32 (torch's default is full fp32); no effect on CPU."""
    compile: bool = False
    """torch.compile every transformer block and the head's body, with dynamic shapes (the masked-token count
    changes every step: one graph serves all). ZeRO-0-2 (ZeRO-3's parameter hooks break the graphs)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (less memory, ~1/3 more compute)."""
    global_batch_size: int = Field(default=256, ge=1)
    """Images per optimizer step over all ranks; gradient accumulation is derived from it."""
    micro_batch_size_per_gpu: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = 64
    """Images per forward/backward on one rank; global_batch_size must be a multiple of it x world size. ``auto``:
    the largest divisor of global_batch_size / world size whose estimated memory (model states + activations,
    check-config prints both) fits ``auto_memory_fraction`` of ``device_memory_gib``."""
    device_memory_gib: float = Field(default=80.0, gt=0.0)
    """Memory of one GPU that ``micro_batch_size_per_gpu: auto`` plans for (an 80 GB H100; 141 for an H200)."""
    auto_memory_fraction: float = Field(default=0.85, gt=0.0, le=1.0)
    """Share of ``device_memory_gib`` the estimate may fill (the rest: allocator fragmentation, NCCL buffers,
    the error of the estimate)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO-Offload of the optimizer states to host memory (stage >= 1). Refused by check-config for now:
    DeepSpeed offloads only its own CPU Adam (a JIT-compiled op), not the client torch AdamW far-scale uses."""
    process_group_timeout_min: float = Field(default=60.0, ge=1.0)
    """How long a collective may wait for the slowest rank before the job fails (NCCL's default is 10 min:
    too short for rank 0's universal-checkpoint conversion or one node's upload of a multi-GB checkpoint)."""
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Gradients are summed over the micro-batches of a step in this type (DeepSpeed ``data_types``); bf16 runs
    only. auto: fp32 where a step accumulates more than one micro-batch at ZeRO-1-3 (bf16 sums of many
    micro-gradients lose their low bits), else bf16. DeepSpeed 0.19 has no fp32 accumulation at ZeRO-0 with bf16.
    Costs one fp32 gradient buffer per rank (its ZeRO share at stage 2-3)."""
    reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Gradients are reduced over the ranks in this type (DeepSpeed ``communication_data_type``); bf16 runs only.
    auto: fp32 (torchtitan's default reduce dtype): twice the bytes of bf16 on the wire, exact sums."""
    overlap_comm: bool = True
    """DeepSpeed: overlap gradient reduction with the backward pass."""
    reduce_bucket_size: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    """DeepSpeed: elements per gradient-reduction bucket. auto: a quarter of the parameters (at least 1M, at most
    DeepSpeed's 5e8), so that backward overlaps the reduction of earlier buckets (one bucket larger than the model
    overlaps nothing)."""
    allgather_bucket_size: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    """DeepSpeed ZeRO-1/2: elements per parameter all-gather bucket; auto: as ``reduce_bucket_size``."""
    stage3_prefetch_bucket_size: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    """DeepSpeed ZeRO-3: elements of parameters prefetched ahead of use; auto: 0.9 x width^2 (about one block's
    attention weights, the rule of Hugging Face's DeepSpeed integration)."""
    stage3_param_persistence_threshold: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = "auto"
    """DeepSpeed ZeRO-3: parameters smaller than this stay whole on every rank; auto: 10 x width (biases and
    norms stay, matrices are partitioned)."""


class CheckpointConfig(Section):
    enabled: bool = True
    """false: never write a checkpoint, not even at the end or on a stop request (memory and throughput probes,
    such as the micro-batch fit search, that must not fill the disk); such a run cannot resume."""
    url: str = ""
    """Where checkpoints go: empty means ``<run.output_dir>/<run.name>/checkpoints``; a path or ``file://`` URL is
    used in place; ``s3://bucket/prefix`` stages each checkpoint locally (in the default place) and uploads it,
    moving the store's ``latest.json`` only once every file is up (docs/operations.md)."""
    interval_steps: int = Field(default=5000, ge=1)
    """A checkpoint every this many steps (and always at the end and on a stop request)."""
    keep_last: int = Field(default=3, ge=1)
    """Checkpoints kept (locally and on the store); older ones are deleted after a new one is complete."""


class TrackingConfig(Section):
    enabled: bool = True
    """Log to MLflow from rank 0."""
    uri: str = ""
    """MLflow tracking URI; empty means an embedded sqlite store under the run directory."""
    experiment: str = "far-scale"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty means run.name. A resumed run logs into the same MLflow run."""
    system_metrics: bool = True
    """One MLflow system-metrics monitor per node (local rank 0), restarted after a server outage."""
    system_metrics_interval_s: float = Field(default=10.0, gt=0.0)
    """Seconds between system-metric samples (CPU, memory, GPU, network)."""
    final_flush_timeout_s: float = Field(default=120.0, ge=0.0)
    """At the end of a run, how long an unreachable tracking server is waited for (retrying with backoff)
    before the metrics it never received are written to ``mlflow_unsent.jsonl`` in the run directory."""


class EvalConfig(Section):
    num_iter: int = Field(default=64, ge=1)
    """K: autoregressive iterations of masked generation."""
    head_steps: Optional[int] = Field(default=None, ge=1)
    """O: sampling steps of the head; None means 8 (shortcut) or 100 (diffusion)."""
    cfg_scale: float = Field(default=1.0, ge=0.0)
    """Classifier-free guidance scale w; 1 means no guidance (MAR-B uses 2.9)."""
    cfg_schedule: Literal["linear", "constant"] = "linear"
    """linear: w_k = 1 + (w - 1) x generated share (MAR); constant: w at every iteration."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Scales the head's starting (shortcut) or sampling (DDPM) noise."""
    head_steps_end: Optional[int] = Field(default=None, ge=1)
    """Head-step schedule: anneal O (or DDPM steps) from ``head_steps`` to this as tokens become known
    (after DiSA); None keeps ``head_steps`` for every token."""
    mask_schedule_power: float = Field(default=1.0, gt=0.0)
    """Masked share after iteration k is cos(pi/2 (k/K)^p); 1 is MAR's cosine, > 1 generates the first
    (structure) tokens over more iterations and the last (detail) ones over fewer (after GtR)."""
    backbone_refresh_every: int = Field(default=1, ge=1)
    """Token caching (after LazyMAR): a full backbone pass every R iterations, lazy passes in between (they
    recompute the buffer and the tokens revealed since); 1 turns it off."""
    backbone_refresh_share: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    """Token caching by revealed share instead of iteration count: a full pass once this share of the tokens
    was revealed since the last one, lazy passes in between; None uses ``backbone_refresh_every``."""
    guidance_refresh_every: int = Field(default=1, ge=1)
    """Guidance caching (after LazyMAR): the unconditional backbone pass every G iterations, the cached
    conditional-unconditional difference in between; 1 turns it off. A difference from a pass that knew no
    tokens (a context-free class prototype) is never reused: the next iteration computes both halves."""
    guidance_refresh_share: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    """Guidance caching by revealed share instead of iteration count: both halves once this share of the tokens
    was revealed since the cached difference was computed; None uses ``guidance_refresh_every``."""
    fast_ddpm: bool = False
    """Diffusion head: the DDPM chain's coefficients as host scalars (tuned MAR sampler)."""
    static_kv_cache: bool = False
    """FAR-Causal: decode against the whole preallocated KV cache under a position mask, so every step has the
    same shapes (on whenever ``compile`` is); equal to the growing cache within float rounding."""
    compile: Literal["off", "default", "cudagraphs"] = "off"
    """Sampling (``far-scale sample``, ``eval sweep``): torch.compile the blocks and the head's body
    (``default``), or also replay them as CUDA graphs (``cudagraphs``, CUDA only: each iteration's shapes are
    recorded once). Not used by the trainer's periodic evaluation (``parallel.compile`` is training's)."""
    num_images: int = Field(default=50_000, ge=1)
    """Images sampled (class-balanced, over all ranks) at each evaluation when a quality metric is set."""
    batch_size: int = Field(default=64, ge=1)
    """Images per sampling batch and rank during evaluation."""
    interval_steps: int = Field(default=10_000, ge=1)
    """Sample, score and log a grid every this many steps (and at the end)."""
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
    """Run name: the run directory is <output_dir>/<name>."""
    seed: int = 0
    """Seeds weights, data order and every random draw (per step and micro-batch, so resumes are exact)."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    max_steps: Optional[int] = Field(default=None, ge=1)
    """Optimizer steps to train; exclusive with epochs."""
    epochs: Optional[float] = Field(default=None, gt=0.0)
    """Epochs to train (steps counted from the manifest's shards as the loader reads them); exclusive with
    max_steps."""
    log_interval: int = Field(default=50, ge=1)
    """A console line (loss, speed, data wait, memory, ETA) and MLflow metrics every this many steps."""
    max_nonfinite_steps: int = Field(default=10, ge=0)
    """A step with a NaN/inf loss on any rank is skipped on every rank (no update of weights, optimizer states or
    EMAs; its data is consumed) and counted; the run stops after this many."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    record_sample_keys: bool = False
    """Audit trail: each rank appends the sample keys of every step to <run_dir>/sample_keys.rank<r>.jsonl."""


class PosthocEMAConfig(Section):
    enabled: bool = False
    """Track power-function EMAs and store their snapshots, to choose the EMA length after training
    (``far-scale export --ema-sigma-rel``, ``eval sweep --ema-sigma-rel``; docs/operations.md)."""
    sigma_rels: tuple[float, ...] = Field(default=(0.05, 0.10), strict=False, min_length=1)
    """Relative widths of the tracked profiles (EDM2's); lengths between and near them can be reconstructed."""
    snapshot_interval_steps: int = Field(default=1000, ge=1)
    """A snapshot of every tracked EMA each this many steps (and at the end); more snapshots match more profiles."""
    snapshot_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Storage type of the snapshots (the tracked EMAs themselves stay fp32, sharded over the ranks)."""


class EMAConfig(Section):
    posthoc: PosthocEMAConfig = PosthocEMAConfig()
    """Post-hoc EMA (EDM2); the evaluation EMA of ``optim.ema_decay`` stays as it is."""


class Config(Section):
    """A whole run: one recipe, fully resolved."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
