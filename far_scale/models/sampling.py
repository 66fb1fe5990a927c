"""Image-token generation (SPEC §4): masked generation in K iterations and causal decoding.

Every random draw of a generation (each image's token order and the head's noise for each
token) is taken up front into ``SamplingNoise``: from one ``torch.Generator`` for a batch, or
from one seed per image, so that an image depends on its own seed only, whatever batch it is
sampled in. Batched over images; classifier-free guidance by batch doubling with a constant or
linear (in generated tokens) scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from far_scale.models.backbones import random_orders
from far_scale.models.model import ARModel


@dataclass(frozen=True)
class SamplingOptions:
    num_iter: int = 64
    """K: backbone passes of masked generation (ignored by causal models: one per token)."""
    head_steps: int = 8
    cfg_scale: float = 1.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = 1.0
    use_cfg: Optional[bool] = None
    """Double the batch for guidance; None means ``cfg_scale != 1``."""
    use_kv_cache: bool = True

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0 if self.use_cfg is None else self.use_cfg


@dataclass(frozen=True)
class SamplingNoise:
    """All randomness of one generation: token orders [B, L] and head noise [B, L, draws, D]."""

    orders: torch.Tensor
    tokens: torch.Tensor

    @staticmethod
    def shape_for(model: ARModel, options: SamplingOptions) -> tuple[int, int, int]:
        """(tokens, draws per token, token dim) of one image."""
        return model.seq_len, model.head.num_noise_draws(options.head_steps), model.token_dim

    @classmethod
    def from_generator(cls, model: ARModel, options: SamplingOptions, batch: int,
                       generator: Optional[torch.Generator], device: torch.device | str) -> "SamplingNoise":
        """A batch's draws from one generator (on ``device``)."""
        seq_len, draws, dim = cls.shape_for(model, options)
        orders = random_orders(batch, seq_len, device, generator)
        tokens = torch.randn(batch, seq_len, draws, dim, device=device, generator=generator)
        return cls(orders, tokens)

    @classmethod
    def per_image(cls, model: ARModel, options: SamplingOptions, seeds: Sequence[int],
                  device: torch.device | str) -> "SamplingNoise":
        """Each image's draws from its own seed, on the CPU, then moved: the same image for a seed on any
        device, batch size or number of ranks."""
        parts = [cls.from_generator(model, options, 1, torch.Generator().manual_seed(seed), "cpu") for seed in seeds]
        return cls(torch.cat([p.orders for p in parts]).to(device), torch.cat([p.tokens for p in parts]).to(device))


NoiseSource = Union[SamplingNoise, torch.Generator, None]


def guidance_scale(options: SamplingOptions, num_generated: int, seq_len: int) -> Optional[float]:
    """w_k = 1 + (w - 1) * generated / L for the linear schedule; None without guidance."""
    if not options.guided:
        return None
    if options.cfg_schedule == "constant":
        return options.cfg_scale
    return 1.0 + (options.cfg_scale - 1.0) * num_generated / seq_len


def num_masked_after(step: int, num_iter: int, seq_len: int, num_masked_now: int) -> int:
    """Tokens still masked after iteration ``step``: cosine schedule, >= 1 and fewer than now."""
    target = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
    return max(1, min(num_masked_now - 1, target))


def _conditions(model: ARModel, labels: torch.Tensor, guided: bool) -> torch.Tensor:
    cond = model.backbone.condition.embedding(labels)
    if guided:
        cond = torch.cat([cond, model.backbone.condition.unconditional(labels.shape[0]).to(cond.dtype)])
    return cond


@torch.no_grad()
def sample_masked(model: ARModel, labels: torch.Tensor, options: SamplingOptions,
                  noise: SamplingNoise) -> torch.Tensor:
    """MAR/FAR generation: K iterations, each one backbone pass and a head pass on new tokens."""
    backbone = model.backbone
    batch, seq_len, device = labels.shape[0], backbone.seq_len, labels.device
    dtype = backbone.head_pos.dtype
    tokens = torch.zeros(batch, seq_len, backbone.token_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    orders = noise.orders
    cond = _conditions(model, labels, options.guided)
    num_masked = seq_len
    for step in range(options.num_iter):
        if num_masked == 0:
            break
        if options.guided:
            z = backbone.predict(torch.cat([tokens, tokens]), torch.cat([mask, mask]), cond)
        else:
            z = backbone.predict(tokens, mask, cond)
        last = step == options.num_iter - 1
        remaining = 0 if last else num_masked_after(step, options.num_iter, seq_len, num_masked)
        # Tokens are revealed in each image's random order; the last `remaining` stay masked.
        next_mask = torch.zeros_like(mask)
        if remaining:
            next_mask.scatter_(1, orders[:, seq_len - remaining :], True)
        chosen = mask & ~next_mask
        z_rows = torch.cat([z[:batch][chosen], z[batch:][chosen]]) if options.guided else z[chosen]
        scale = guidance_scale(options, seq_len - remaining, seq_len)
        tokens[chosen] = model.head.sample(z_rows, options.head_steps, options.temperature, noise.tokens[chosen],
                                           scale).to(dtype)
        mask, num_masked = next_mask, remaining
    return tokens


@torch.no_grad()
def sample_causal(model: ARModel, labels: torch.Tensor, options: SamplingOptions,
                  noise: SamplingNoise) -> torch.Tensor:
    """FAR-Causal generation, one token per step, with the KV cache or by full recomputation."""
    backbone = model.backbone
    batch, seq_len, device = labels.shape[0], backbone.seq_len, labels.device
    dtype = backbone.head_pos.dtype
    cond = _conditions(model, labels, options.guided)
    rows = cond.shape[0]
    tokens = torch.zeros(rows, seq_len, backbone.token_dim, device=device, dtype=dtype)
    cache = backbone.new_cache(rows, device=device, dtype=dtype) if options.use_kv_cache else None
    for i in range(seq_len):
        if cache is not None:
            new_input = cond[:, None, :].to(dtype) if i == 0 else backbone.token_proj(tokens[:, i - 1 : i])
            z = backbone.hidden(new_input, start=i, cache=cache)[:, -1]
        else:
            z = backbone.hidden(backbone.embed_inputs(cond, tokens[:, :i]))[:, -1]
        scale = guidance_scale(options, i + 1, seq_len)
        new_token = model.head.sample(z, options.head_steps, options.temperature, noise.tokens[:, i], scale).to(dtype)
        tokens[:, i] = torch.cat([new_token, new_token]) if options.guided else new_token
    return tokens[:batch]


def generate(model: ARModel, labels: torch.Tensor, options: SamplingOptions, noise: NoiseSource = None) -> torch.Tensor:
    """Latent tokens [B, L, D] (in the model's scaled space) for class ``labels``.

    ``noise``: prepared ``SamplingNoise``, or a generator (None: the global one) to draw it from.
    """
    if not isinstance(noise, SamplingNoise):
        noise = SamplingNoise.from_generator(model, options, labels.shape[0], noise, labels.device)
    sampler = sample_causal if model.backbone.kind == "causal" else sample_masked
    return sampler(model, labels, options, noise)
