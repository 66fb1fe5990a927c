"""Flow-matching and shortcut self-consistency arithmetic (Frans et al. 2024; docs/concepts.md, heads).

Convention: t = 0 is noise, t = 1 is data, x_t = (1 - t) x0 + t x1, velocity x1 - x0.
Step sizes are d = 2^-level with level in {0, ..., log2(num_levels)}; the finest level is
plain flow matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def num_level_bits(num_levels: int) -> int:
    """log2(num_levels): the level index of the finest step size 1/num_levels."""
    bits = int(math.log2(num_levels))
    if 2**bits != num_levels:
        raise ValueError(f"num_levels={num_levels} must be a power of two")
    return bits


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(x1.dtype)[:, None]
    return (1 - t) * x0 + t * x1


@dataclass(frozen=True)
class ShortcutDraws:
    """Random draws for one batch of rows: the first ``num_flow`` rows are flow matching."""

    noise: torch.Tensor  # x0, [N, C]
    t: torch.Tensor  # [N], on each row's step grid
    level: torch.Tensor  # [N] long, d = 2^-level
    num_flow: int


def draw_shortcut_rows(x1: torch.Tensor, num_levels: int, self_consistency_fraction: float) -> ShortcutDraws:
    """Noise, times and step levels for a batch (global RNG, in this order: noise, flow t, level, consistency t)."""
    rows = x1.shape[0]
    num_consistency = int(rows * self_consistency_fraction)
    num_flow = rows - num_consistency
    finest = num_level_bits(num_levels)
    device = x1.device
    noise = torch.randn_like(x1)
    t_flow = torch.randint(0, num_levels, (num_flow,), device=device).double() / num_levels
    # Self-consistency: d in {1, 1/2, ..., 2/num_levels}; t on d's grid {0, d, ..., 1 - d}.
    level_sc = torch.randint(0, finest, (num_consistency,), device=device)
    cells = torch.pow(2.0, level_sc.double())
    t_sc = torch.floor(torch.rand(num_consistency, device=device, dtype=torch.float64) * cells) / cells
    level = torch.cat([torch.full((num_flow,), finest, device=device, dtype=torch.long), level_sc])
    return ShortcutDraws(noise=noise, t=torch.cat([t_flow, t_sc]), level=level, num_flow=num_flow)


def step_size(level: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, -level.double())
