"""Per-token heads behind one interface (docs/concepts.md, heads): ``loss(target, z)`` and ``sample(z, ...)``.

Both heads share the adaLN MLP body of MAR (``SimpleMLPAdaLN``). The diffusion head
(MAR baseline) denoises with a DDPM chain; the shortcut head (FAR) integrates a learned
velocity in 1-8 steps.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from far_scale.diffusion.gaussian import GaussianDiffusion
from far_scale.diffusion.shortcut import draw_shortcut_rows, interpolate, num_level_bits, step_size
from far_scale.models.init import init_embedding_normal, init_linear_xavier, init_zero
from far_scale.models.transformer import LAYER_NORM_EPS

FREQUENCY_EMBED_DIM = 256
MAX_PERIOD = 10_000
# Flow time t in [0, 1] is embedded as t * 1000 so that its sinusoidal features span the
# same frequencies as DDPM's integer timesteps in MAR.
FLOW_TIME_EMBED_SCALE = 1000.0

CfgScale = Union[float, torch.Tensor]


def sinusoidal_embedding(values: torch.Tensor, dim: int = FREQUENCY_EMBED_DIM) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar (time, step level) followed by a 2-layer MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBED_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(values).to(self.mlp[0].weight.dtype))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, activated_cond: torch.Tensor) -> torch.Tensor:
        """``activated_cond`` is SiLU(cond), computed once for every block (the modulation's first layer)."""
        shift, scale, gate = self.modulation[-1](activated_cond).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class AdaLNFinal(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, activated_cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation[-1](activated_cond).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class AdaLNMLP(nn.Module):
    """MAR's SimpleMLPAdaLN with any number of scalar conditions (time; time and step size)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int, num_scalars: int):
        super().__init__()
        self.input_proj = nn.Linear(in_channels, width)
        self.scalar_embedders = nn.ModuleList(ScalarEmbedder(width) for _ in range(num_scalars))
        self.cond_proj = nn.Linear(z_channels, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final = AdaLNFinal(width, out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """Through ``apply`` on the layers concerned (models/init.py: a partitioned build gathers them there)."""
        self.apply(init_linear_xavier)
        for embedder in self.scalar_embedders:
            embedder.apply(init_embedding_normal)
        # Zero-init modulations and output: each block starts as the identity, the output as 0.
        for layer in [block.modulation[-1] for block in self.blocks] + [self.final.modulation[-1], self.final.linear]:
            layer.apply(init_zero)

    def forward(self, x: torch.Tensor, scalars: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
        cond = self.cond_proj(z)
        for embedder, values in zip(self.scalar_embedders, scalars):
            cond = cond + embedder(values)
        return self.apply_condition(x, cond)

    def apply_condition(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The body given the summed condition (``cond_proj(z)`` plus the scalar embeddings)."""
        x = self.input_proj(x)
        # Every modulation starts with SiLU(cond) (kept as modulation[0], so the weights' names stay MAR's):
        # computed once here instead of once per block.
        activated = F.silu(cond)
        for block in self.blocks:
            x = block(x, activated)
        return self.final(x, activated)


def _guided(output: torch.Tensor, cfg_scale: Optional[CfgScale]) -> torch.Tensor:
    """Mix [cond; uncond] outputs as u + w (c - u); without CFG return as is."""
    if cfg_scale is None:
        return output
    cond, uncond = output.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


class ShortcutHead(nn.Module):
    """FAR's head: a velocity s(x_t, t, d | z) trained with flow matching + self-consistency."""

    kind = "shortcut"

    def __init__(
        self,
        token_dim: int,
        z_channels: int,
        width: int,
        depth: int,
        *,
        num_levels: int,
        self_consistency_fraction: float,
        clip_value: Optional[float],
        guidance_distillation_scale: float = 1.0,
    ):
        super().__init__()
        self.token_dim = token_dim
        self.num_levels = num_levels
        self.guidance_distillation_scale = guidance_distillation_scale
        self.self_consistency_fraction = self_consistency_fraction
        self.clip_value = clip_value
        self.net = AdaLNMLP(token_dim, width, token_dim, z_channels, depth, num_scalars=2)

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, level: torch.Tensor, z: torch.Tensor, net: Optional[nn.Module] = None
    ) -> torch.Tensor:
        """s(x_t, t, d | z) for rows whose t lie on the finest grid {k / num_levels} (every t training and
        sampling use does): t and the level are embedded once per distinct value and gathered per row."""
        net = net or self.net
        time_table, level_table = self.scalar_tables(net)
        time_index = torch.round(t * self.num_levels).long()
        cond = net.cond_proj(z) + time_table[time_index] + level_table[level]
        return net.apply_condition(x, cond)

    def scalar_tables(self, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of every flow time k / num_levels and every step level 0..log2(num_levels)."""
        time_embedder, level_embedder = net.scalar_embedders
        device = time_embedder.mlp[0].weight.device
        times = torch.arange(self.num_levels, device=device, dtype=torch.float64) / self.num_levels
        levels = torch.arange(num_level_bits(self.num_levels) + 1, device=device)
        return time_embedder(times * FLOW_TIME_EMBED_SCALE), level_embedder(levels)

    @property
    def needs_unconditional(self) -> bool:
        """Whether ``loss`` wants ``z`` under the null class too (guidance distillation)."""
        return self.guidance_distillation_scale != 1.0

    @torch.no_grad()
    def consistency_target(
        self, x_t, t, level, z, target_net: Optional[nn.Module] = None, z_unconditional: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """stop-grad[(s1 + s2) / 2] of two half steps at level + 1, clipped.

        With ``z_unconditional`` (guidance distillation), half steps at the finest level are guided:
        v_u + w (v_c - v_u); coarser half steps come from levels that already learned the guided flow.
        """
        half_level = level + 1
        half = step_size(half_level).to(x_t.dtype)[:, None]
        guided_rows = (half_level == num_level_bits(self.num_levels))[:, None]

        def half_step_velocity(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            conditional = self.velocity(x, tt, half_level, z, target_net)
            if z_unconditional is None:
                return conditional
            unconditional = self.velocity(x, tt, half_level, z_unconditional, target_net)
            guided = unconditional + self.guidance_distillation_scale * (conditional - unconditional)
            return torch.where(guided_rows, guided, conditional)

        s1 = half_step_velocity(x_t, t)
        x_mid = self._clip(x_t + half * s1)
        s2 = half_step_velocity(x_mid, t + half[:, 0].double())
        return self._clip((s1 + s2) / 2)

    def _clip(self, values: torch.Tensor) -> torch.Tensor:
        """The bootstrap guard; None (a model built without the data's reach, e.g. on synthetic tokens) clamps
        nothing, like MAR. Training from a manifest always resolves it (``planning.builder.resolve_clip_value``)."""
        return values if self.clip_value is None else values.clamp(-self.clip_value, self.clip_value)

    def loss(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        target_net: Optional[nn.Module] = None,
        z_unconditional: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over rows ``target`` [N, C] conditioned on ``z`` [N, W] (the caller gathers the rows to train).

        ``z_unconditional`` [N, W] (guidance distillation) guides the finest-level half steps of the targets.
        ``target_net`` (e.g. the EMA copy of ``self.net``) gives the self-consistency targets;
        None uses the live weights without gradient.
        """
        draws = draw_shortcut_rows(target, self.num_levels, self.self_consistency_fraction)
        x_t = interpolate(draws.noise, target, draws.t)
        k = draws.num_flow
        flow_target = target[:k] - draws.noise[:k]
        if k < target.shape[0]:
            sc_target = self.consistency_target(
                x_t[k:],
                draws.t[k:],
                draws.level[k:],
                z[k:].detach(),
                target_net,
                None if z_unconditional is None else z_unconditional[k:],
            )
            goal = torch.cat([flow_target, sc_target.to(flow_target.dtype)])
        else:
            goal = flow_target
        per_row = (self.velocity(x_t, draws.t, draws.level, z) - goal).float().pow(2).mean(-1)
        parts = {"flow_matching": per_row[:k].mean()}
        if k < target.shape[0]:
            parts["self_consistency"] = per_row[k:].mean()
        return per_row.mean(), parts

    @staticmethod
    def num_noise_draws(num_steps: int) -> int:
        """Standard-normal draws per token that ``sample`` consumes: the starting point only."""
        del num_steps
        return 1

    @staticmethod
    def anneal_steps(first: int, last: int, progress: float) -> int:
        """Head steps at ``progress`` in [0, 1] of a schedule from ``first`` to ``last``: geometric, powers of two."""
        low, high = num_level_bits(first), num_level_bits(last)
        return 2 ** round(low + (high - low) * progress)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        num_steps: int,
        temperature: float,
        noise: torch.Tensor,
        cfg_scale: Optional[CfgScale] = None,
        fast: bool = False,
    ) -> torch.Tensor:
        """O-step Euler integration from tau * N(0, I). With ``cfg_scale``, ``z`` is [cond; uncond].

        ``noise`` [rows, num_noise_draws, D] holds the standard-normal draws (one row per token);
        ``fast`` is accepted for a uniform interface (this head has one path).
        """
        del fast
        rows = z.shape[0]
        x = temperature * noise[:, 0].to(z.dtype)
        time_embedder, level_embedder = self.net.scalar_embedders
        # z and the step level are the same at every Euler step: projected and embedded once. The time is
        # embedded per row, as before: a one-row embedding broadcast differs in the last bits, and with every
        # acceleration off samples stay bit-identical to the reference sampler.
        z_cond = self.net.cond_proj(z)
        level_cond = level_embedder(torch.full((rows,), num_level_bits(num_steps), device=z.device, dtype=torch.long))
        for i in range(num_steps):
            t = torch.full((rows,), i / num_steps, device=z.device, dtype=torch.float64)
            cond = z_cond + time_embedder(t * FLOW_TIME_EMBED_SCALE) + level_cond
            x_in = torch.cat([x, x]) if cfg_scale is not None else x
            x = x + _guided(self.net.apply_condition(x_in, cond), cfg_scale) / num_steps
        return x


class DiffusionHead(nn.Module):
    """MAR's DiffLoss: eps-prediction with learned variance on a cosine DDPM chain."""

    kind = "diffusion"

    def __init__(
        self, token_dim: int, z_channels: int, width: int, depth: int, *, num_train_timesteps: int, noise_schedule: str
    ):
        super().__init__()
        self.token_dim = token_dim
        self.net = AdaLNMLP(token_dim, width, 2 * token_dim, z_channels, depth, num_scalars=1)
        self.diffusion = GaussianDiffusion.create(noise_schedule, num_train_timesteps)
        self._respaced = lru_cache(maxsize=8)(self.diffusion.respaced)

    needs_unconditional = False

    def loss(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        target_net: Optional[nn.Module] = None,
        z_unconditional: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean hybrid loss over rows ``target`` [N, C] conditioned on ``z`` [N, W]."""
        del target_net, z_unconditional  # the diffusion objective has no bootstrap target
        t = torch.randint(0, self.diffusion.num_timesteps, (target.shape[0],), device=target.device)
        terms = self.diffusion.training_losses(lambda x, tt: self.net(x, (tt,), z), target, t)
        parts = {name: value.float().mean() for name, value in terms.items()}
        return parts["mse"] + parts["vb"], parts

    def num_noise_draws(self, num_steps: int) -> int:
        """Standard-normal draws per token that ``sample`` consumes: the start and one per step but the last."""
        return self._respaced(num_steps).num_timesteps

    @staticmethod
    def anneal_steps(first: int, last: int, progress: float) -> int:
        """DDPM steps at ``progress`` in [0, 1] of a schedule from ``first`` to ``last``: linear."""
        return max(1, round(first + (last - first) * progress))

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        num_steps: int,
        temperature: float,
        noise: torch.Tensor,
        cfg_scale: Optional[CfgScale] = None,
        fast: bool = False,
    ) -> torch.Tensor:
        """Respaced ancestral sampling; CFG mixes eps, each half keeps its own variance.

        ``noise`` [rows, num_noise_draws, D]: the chain's start, then the noise of each step. ``fast``
        takes each step's schedule coefficients as host scalars instead of per-row gathers.
        """
        noise = noise.to(z.dtype)
        z_cond = self.net.cond_proj(z)  # once per chain, not once per step
        time_embedder = self.net.scalar_embedders[0]

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if cfg_scale is None:
                return self.net.apply_condition(x, z_cond + time_embedder(t))
            out = self.net.apply_condition(torch.cat([x, x]), z_cond + time_embedder(torch.cat([t, t])))
            eps, var_values = out.chunk(2, dim=-1)
            return torch.cat([_guided(eps, cfg_scale), var_values.chunk(2, dim=0)[0]], dim=-1)

        return self._respaced(num_steps).sample(model, noise[:, 0], temperature, noise[:, 1:], fast=fast)
