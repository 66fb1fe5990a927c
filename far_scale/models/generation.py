"""Image-token generation (docs/concepts.md, sampling an image): masked generation in K iterations and causal decoding.

Every random draw of a generation (each image's token order and the head's noise for each
token) is taken up front into ``SamplingNoise``: from one ``torch.Generator`` for a batch, or
from one seed per image, so that an image depends on its own seed only, whatever batch it is
sampled in. Batched over images; classifier-free guidance by batch doubling with a constant or
linear (in generated tokens) scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import torch

from far_scale.models.backbones import gather_positions, random_orders
from far_scale.models.model import ARModel


@dataclass(frozen=True)
class SamplingOptions:
    """How to generate. The acceleration options (from ``head_steps_end`` on) are off by default; each one
    is a no-op at its default, and with all of them off the sampler is the reference MAR/FAR sampler."""

    num_iter: int = 64
    """K: backbone passes of masked generation (ignored by causal models: one per token)."""
    head_steps: int = 8
    """O (shortcut head) or DDPM steps (diffusion head) per token; the first iteration's with ``head_steps_end``."""
    cfg_scale: float = 1.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = 1.0
    use_cfg: Optional[bool] = None
    """Double the batch for guidance; None means ``cfg_scale != 1``."""
    use_kv_cache: bool = True
    static_kv_cache: bool = False
    """FAR-Causal: attend over the whole preallocated KV cache under a position mask, so every decoding step has
    the same shapes (one compiled graph, capturable as a CUDA graph); equal to the growing cache within float
    rounding."""
    head_steps_end: Optional[int] = None
    """Head-step schedule (after DiSA): head steps annealed from ``head_steps`` to this value as the share
    of known tokens grows (geometric in powers of two for the shortcut head, linear for DDPM)."""
    mask_schedule_power: float = 1.0
    """Masked share after iteration k is cos(pi/2 * (k/K)^p): p = 1 is MAR's cosine; p > 1 spends more
    iterations on the first (structure) tokens and fewer on the last (detail) ones (after GtR)."""
    backbone_refresh_every: int = 1
    """Token caching (after LazyMAR): a full backbone pass every R iterations; in between only the buffer, the
    tokens revealed since the last pass and the ones generated now are recomputed, against cached keys/values."""
    backbone_refresh_share: Optional[float] = None
    """Token caching refreshed by the share of tokens revealed since the last full pass (instead of every R)."""
    guidance_refresh_every: int = 1
    """Guidance caching (after LazyMAR): the conditional and unconditional backbone passes every G
    iterations; in between one conditional pass, with the cached difference standing in for the other. A
    difference from a pass with no known token is never reused (the next iteration runs both halves)."""
    guidance_refresh_share: Optional[float] = None
    """Guidance caching refreshed by the share of tokens revealed since the cached difference (instead of every G)."""
    fast_ddpm: bool = False
    """Diffusion head: step coefficients as host scalars (no per-step schedule gathers or copies)."""

    def __post_init__(self):
        for name in ("num_iter", "head_steps", "backbone_refresh_every", "guidance_refresh_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling option {name} must be >= 1, got {getattr(self, name)}")
        if self.head_steps_end is not None and self.head_steps_end < 1:
            raise ValueError(f"sampling option head_steps_end must be >= 1, got {self.head_steps_end}")
        if not self.mask_schedule_power > 0:
            raise ValueError(f"sampling option mask_schedule_power must be > 0, got {self.mask_schedule_power}")
        for name in ("backbone_refresh_share", "guidance_refresh_share"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"sampling option {name} must be in (0, 1], got {value}")

    @property
    def caching_tokens(self) -> bool:
        return self.backbone_refresh_every > 1 or self.backbone_refresh_share is not None

    @property
    def caching_guidance(self) -> bool:
        return self.guided and (self.guidance_refresh_every > 1 or self.guidance_refresh_share is not None)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0 if self.use_cfg is None else self.use_cfg

    @property
    def max_head_steps(self) -> int:
        """The most head steps any token takes (sizes the pre-drawn noise)."""
        return max(self.head_steps, self.head_steps_end or self.head_steps)


@dataclass(frozen=True)
class SamplingNoise:
    """All randomness of one generation: token orders [B, L] and head noise [B, L, draws, D]."""

    orders: torch.Tensor
    tokens: torch.Tensor

    @staticmethod
    def shape_for(model: ARModel, options: SamplingOptions) -> tuple[int, int, int]:
        """(tokens, draws per token, token dim) of one image."""
        return model.seq_len, model.head.num_noise_draws(options.max_head_steps), model.token_dim

    @classmethod
    def from_generator(
        cls,
        model: ARModel,
        options: SamplingOptions,
        batch: int,
        generator: Optional[torch.Generator],
        device: torch.device | str,
    ) -> "SamplingNoise":
        """A batch's draws from one generator (on ``device``)."""
        seq_len, draws, dim = cls.shape_for(model, options)
        orders = random_orders(batch, seq_len, device, generator)
        tokens = torch.randn(batch, seq_len, draws, dim, device=device, generator=generator)
        return cls(orders, tokens)

    @classmethod
    def per_image(
        cls, model: ARModel, options: SamplingOptions, seeds: Sequence[int], device: torch.device | str
    ) -> "SamplingNoise":
        """Each image's draws from its own seed, on the CPU, then moved: the same image for a seed on any
        device, batch size or number of ranks."""
        parts = [cls.from_generator(model, options, 1, torch.Generator().manual_seed(seed), "cpu") for seed in seeds]
        return cls(torch.cat([p.orders for p in parts]).to(device), torch.cat([p.tokens for p in parts]).to(device))


NoiseSource = Union[SamplingNoise, torch.Generator, None]


class GraphReplay:
    """What a model compiled into CUDA graphs (``eval.compile=cudagraphs``, ``far_scale.models.compile``) needs
    from the sampler: the step marker before each iteration (the previous replay's outputs are dead), and the
    same cache buffers on every call, so a generation writes the addresses the graphs were recorded with and
    replays them instead of recording again."""

    def __init__(self, step_begin: Callable[[], None]):
        self.step_begin = step_begin
        self._caches: dict = {}

    def cache(self, key: tuple, make: Callable[[], object]):
        """The cache for ``key`` (its rows, dtype, device and kind), made once; a static KV cache restarts at 0."""
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = make()
        elif hasattr(cache, "restart"):
            cache.restart()
        return cache


def _make_cache(replay: Optional[GraphReplay], key: tuple, make: Callable[[], object]):
    return make() if replay is None else replay.cache(key, make)


def guidance_scale(options: SamplingOptions, num_generated: int, seq_len: int) -> Optional[float]:
    """w_k = 1 + (w - 1) * generated / L for the linear schedule; None without guidance."""
    if not options.guided:
        return None
    if options.cfg_schedule == "constant":
        return options.cfg_scale
    return 1.0 + (options.cfg_scale - 1.0) * num_generated / seq_len


def num_masked_after(step: int, num_iter: int, seq_len: int, num_masked_now: int, power: float = 1.0) -> int:
    """Tokens still masked after iteration ``step``: cos(pi/2 * ((step+1)/K)^power) of them, >= 1 and fewer than now."""
    target = math.floor(seq_len * math.cos(math.pi / 2 * ((step + 1) / num_iter) ** power))
    return max(1, min(num_masked_now - 1, target))


@dataclass(frozen=True)
class Iteration:
    """One step of generation, fixed on the host before sampling starts (so the loop never syncs)."""

    start: int
    """Tokens known before this iteration (they are ``orders[:, :start]``)."""
    end: int
    """Tokens known after it: this iteration generates ``orders[:, start:end]``."""
    head_steps: int
    cfg: Optional[float]
    full_backbone: bool
    """Masked models: a full backbone pass (else a lazy one against the token cache)."""
    both_halves: bool
    """With guidance: conditional and unconditional passes (else the cached difference stands in)."""


def num_iter_problem(num_iter: int, seq_len: int) -> Optional[str]:
    """The one rule for K: at most one iteration per token (check-config and the sampler both apply it)."""
    if num_iter > seq_len:
        return f"eval.num_iter={num_iter} exceeds the sequence length {seq_len} (at most one iteration per token)"
    return None


def plan_generation(options: SamplingOptions, seq_len: int, kind: str, anneal_steps) -> list[Iteration]:
    """Every iteration's tokens, head steps, guidance scale and caching decisions.

    ``kind`` is the backbone's (``masked``: K iterations on MAR's schedule; ``causal``: one per token);
    ``anneal_steps(first, last, progress)`` is the head's head-step schedule.
    """
    caching_guidance = options.caching_guidance
    plan, start = [], 0
    last_full, source = 0, None  # tokens known at the last full pass / at the cached difference's pass
    problem = num_iter_problem(options.num_iter, seq_len) if kind == "masked" else None
    if problem:
        raise ValueError(problem)
    num_iter = options.num_iter if kind == "masked" else seq_len
    for step in range(num_iter):
        if kind == "masked":
            last = step == num_iter - 1
            end = (
                seq_len
                if last
                else seq_len - num_masked_after(step, num_iter, seq_len, seq_len - start, options.mask_schedule_power)
            )
        else:
            end = start + 1
        # Progress over iterations, so the last one runs head_steps_end (by tokens known, "8 -> 1" at K=4
        # ran 8, 8, 4, 2: the end value was never reached).
        steps = (
            options.head_steps
            if options.head_steps_end is None
            else anneal_steps(options.head_steps, options.head_steps_end, step / max(num_iter - 1, 1))
        )
        # A difference computed with no known token is a context-free class prototype: never reused.
        both = options.guided and (
            not caching_guidance
            or source is None
            or _refresh_due(
                step, start - source, seq_len, options.guidance_refresh_every, options.guidance_refresh_share
            )
        )
        # Cached guidance differences need every position: a pass of both halves is a full one.
        full = (
            step == 0
            or _refresh_due(
                step, start - last_full, seq_len, options.backbone_refresh_every, options.backbone_refresh_share
            )
            or (caching_guidance and both)
        )
        plan.append(Iteration(start, end, steps, guidance_scale(options, end, seq_len), full, both))
        if full:
            last_full = start
        if both and start > 0:
            source = start
        start = end
    return plan


def _refresh_due(step: int, revealed: int, seq_len: int, every: int, share: Optional[float]) -> bool:
    """A cache refresh: by share of the tokens revealed since the last one when ``share`` is set, else every
    ``every`` iterations."""
    if share is not None:
        return revealed >= share * seq_len
    return step % every == 0


def guidance_conditions(model: ARModel, labels: torch.Tensor, guided: bool) -> torch.Tensor:
    """The class conditions of a batch, [B, W]; under guidance [2B, W]: conditional, then unconditional."""
    cond = model.backbone.condition.embedding(labels)
    if guided:
        cond = torch.cat([cond, model.backbone.condition.unconditional(labels.shape[0]).to(cond.dtype)])
    return cond


def _compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype activations have: autocast's where it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def doubled_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` for both halves of a guidance-doubled batch."""
    return torch.cat([x, x])


class _MaskedBackbonePasses:
    """The backbone side of masked generation: full or lazy passes, with or without guidance caching.

    Returns ``z`` at the positions generated in an iteration, [rows, n, W] with rows = 2B
    ([conditional; unconditional]) under guidance.
    """

    def __init__(
        self,
        model: ARModel,
        options: SamplingOptions,
        cond: torch.Tensor,
        batch: int,
        replay: Optional[GraphReplay] = None,
    ):
        self.backbone, self.options, self.cond, self.batch = model.backbone, options, cond, batch
        self.guided = options.guided
        self.caching_guidance = options.caching_guidance
        self.difference: Optional[torch.Tensor] = None  # z_cond - z_uncond at every position, last both-halves pass
        self.caches = None
        self.probe: Optional[Callable] = None
        """Diagnostics only: called on each iteration that reuses a cache, with what it reused (see
        ``far_scale.models.cache_diagnostics``); never changes a sample."""
        if options.caching_tokens:
            # The cache follows the conditional rows only when the unconditional ones are not computed every time.
            rows = batch if self.caching_guidance or not self.guided else 2 * batch
            dtype = _compute_dtype(cond.device, self.backbone.head_pos.dtype)
            self.caches = _make_cache(
                replay,
                ("tokens", rows, dtype, cond.device),
                lambda: self.backbone.new_token_caches(rows, device=cond.device, dtype=dtype),
            )

    def __call__(
        self,
        it: Iteration,
        previous: Optional[Iteration],
        tokens: torch.Tensor,
        orders: torch.Tensor,
        chosen: torch.Tensor,
    ) -> torch.Tensor:
        batch = self.batch
        doubled = self.guided and (it.both_halves or not self.caching_guidance)
        if it.full_backbone:
            visible = orders[:, : it.start].sort(dim=1).values
            if doubled:
                z = self.backbone.predict(doubled_batch(tokens), doubled_batch(visible), self.cond, self.caches)
            else:
                z = self.backbone.predict(tokens, visible, self.cond[:batch], self.caches)
            if self.caching_guidance and doubled:
                self.difference = z[:batch] - z[batch:]
            z = gather_positions(z, doubled_batch(chosen) if doubled else chosen)
        else:
            new = orders[:, previous.start : previous.end]
            visible_keys = torch.zeros(batch, self.backbone.seq_len, dtype=torch.bool, device=orders.device)
            visible_keys.scatter_(1, orders[:, : it.start], True)
            buffer = torch.ones(batch, self.backbone.num_buffer_tokens, dtype=torch.bool, device=orders.device)
            visible_keys = torch.cat([buffer, visible_keys], dim=1)
            if doubled:
                z = self.backbone.predict_lazy(
                    doubled_batch(tokens),
                    doubled_batch(new),
                    doubled_batch(chosen),
                    doubled_batch(visible_keys),
                    self.cond,
                    self.caches,
                )
            else:
                z = self.backbone.predict_lazy(tokens, new, chosen, visible_keys, self.cond[:batch], self.caches)
        if self.guided and not doubled:
            z = torch.cat([z, z - gather_positions(self.difference, chosen).to(z.dtype)])
        if self.probe is not None and not (it.full_backbone and (doubled or not self.guided)):
            self.probe(it, tokens, orders, chosen, z)
        return z


@torch.no_grad()
def sample_masked(
    model: ARModel,
    labels: torch.Tensor,
    options: SamplingOptions,
    noise: SamplingNoise,
    probe: Optional[Callable] = None,
    replay: Optional[GraphReplay] = None,
) -> torch.Tensor:
    """MAR/FAR generation: K iterations, each a backbone pass and a head pass on the tokens it reveals.

    Tokens are revealed in each image's random order (``noise.orders``); the counts per iteration
    are planned on the host, so the loop selects tokens by gather/scatter and never syncs. ``probe``
    (diagnostics: ``far_scale.models.cache_diagnostics``) sees every iteration that reuses a cache;
    ``replay``: a CUDA-graph compiled model's step marker and cache buffers.
    """
    backbone, head = model.backbone, model.head
    batch, seq_len = labels.shape[0], backbone.seq_len
    dtype = backbone.head_pos.dtype
    tokens = torch.zeros(batch, seq_len, backbone.token_dim, device=labels.device, dtype=dtype)
    orders = noise.orders
    passes = _MaskedBackbonePasses(model, options, guidance_conditions(model, labels, options.guided), batch, replay)
    passes.probe = probe
    previous = None
    for it in plan_generation(options, seq_len, backbone.kind, head.anneal_steps):
        if replay is not None:
            replay.step_begin()
        # Ascending positions: the rows reach the head in the order boolean-mask indexing gave them.
        chosen = orders[:, it.start : it.end].sort(dim=1).values
        z = passes(it, previous, tokens, orders, chosen)
        head_noise = gather_positions(noise.tokens, chosen).flatten(0, 1)[:, : head.num_noise_draws(it.head_steps)]
        new_tokens = head.sample(
            z.flatten(0, 1), it.head_steps, options.temperature, head_noise, it.cfg, fast=options.fast_ddpm
        )
        tokens.scatter_(
            1,
            chosen[..., None].expand(-1, -1, backbone.token_dim),
            new_tokens.view(batch, -1, backbone.token_dim).to(dtype),
        )
        previous = it
    return tokens


@torch.no_grad()
def sample_causal(
    model: ARModel,
    labels: torch.Tensor,
    options: SamplingOptions,
    noise: SamplingNoise,
    replay: Optional[GraphReplay] = None,
) -> torch.Tensor:
    """FAR-Causal generation, one token per step: with the KV cache (growing, or static: the same shapes at
    every step) or by full recomputation. ``replay``: a CUDA-graph compiled model's step marker and cache."""
    backbone, head = model.backbone, model.head
    batch, seq_len, device = labels.shape[0], backbone.seq_len, labels.device
    dtype = backbone.head_pos.dtype
    cond = guidance_conditions(model, labels, options.guided)
    rows = cond.shape[0]
    tokens = torch.zeros(rows, seq_len, backbone.token_dim, device=device, dtype=dtype)
    # The cache holds what attention computes in: bf16 under autocast, never re-cast per step.
    cache = None
    if options.use_kv_cache:
        cache_dtype, static = _compute_dtype(device, dtype), options.static_kv_cache
        cache = _make_cache(
            replay,
            ("kv", rows, cache_dtype, device, static),
            lambda: backbone.new_cache(rows, device=device, dtype=cache_dtype, static=static),
        )
    for i, it in enumerate(plan_generation(options, seq_len, backbone.kind, head.anneal_steps)):
        if replay is not None:
            replay.step_begin()
        if cache is not None:
            new_input = cond[:, None, :].to(dtype) if i == 0 else backbone.token_proj(tokens[:, i - 1 : i])
            z = backbone.hidden(new_input, start=i, cache=cache)[:, -1]
            if options.static_kv_cache:
                cache.advance()
        else:
            z = backbone.hidden(backbone.embed_inputs(cond, tokens[:, :i]))[:, -1]
        head_noise = noise.tokens[:, i, : head.num_noise_draws(it.head_steps)]
        new_token = head.sample(z, it.head_steps, options.temperature, head_noise, it.cfg, fast=options.fast_ddpm).to(
            dtype
        )
        tokens[:, i] = torch.cat([new_token, new_token]) if options.guided else new_token
    return tokens[:batch]


def check_head_steps(model: ARModel, options: SamplingOptions) -> None:
    """Refuse shortcut steps the head was not trained for (O above its finest level, or not a power of two)."""
    levels = getattr(model.head, "num_levels", None)
    if levels is None:
        return
    for name in ("head_steps", "head_steps_end"):
        steps = getattr(options, name)
        if steps is not None and (steps > levels or steps & (steps - 1)):
            raise ValueError(
                f"sampling option {name}={steps} (eval.{name}): the shortcut head has step sizes "
                f"1/1 ... 1/{levels} (model.head.num_levels={levels}); use a power of two <= {levels}"
            )


def generate(
    model: ARModel,
    labels: torch.Tensor,
    options: SamplingOptions,
    noise: NoiseSource = None,
    replay: Optional[GraphReplay] = None,
) -> torch.Tensor:
    """Latent tokens [B, L, D] (in the model's scaled space) for class ``labels``.

    ``noise``: prepared ``SamplingNoise``, or a generator (None: the global one) to draw it from;
    ``replay``: for a model compiled into CUDA graphs (``far_scale.models.compile.compile_for_sampling``).
    """
    check_head_steps(model, options)
    if not isinstance(noise, SamplingNoise):
        noise = SamplingNoise.from_generator(model, options, labels.shape[0], noise, labels.device)
    if model.backbone.kind == "causal":
        return sample_causal(model, labels, options, noise, replay)
    return sample_masked(model, labels, options, noise, replay=replay)
