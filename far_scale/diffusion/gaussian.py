"""Gaussian diffusion (improved DDPM) as used by MAR's diffusion head.

Cosine or linear beta schedule, epsilon prediction with a learned interpolated variance,
the hybrid loss (MSE + variational bound with a frozen mean), and respaced ancestral
sampling with a temperature on the noise. Schedules are float64 and computed once.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s, keeps beta_0 from vanishing
MAX_BETA = 0.999
LINEAR_BETA_RANGE = (1e-4, 2e-2)  # for 1000 steps, scaled to other lengths
# MAR's t = 0 decoder term treats latents like 8-bit data on [-1, 1]: bins of width 2/255.
DECODER_BIN_HALF_WIDTH = 1.0 / 255.0
DECODER_EDGE = 0.999  # beyond this the first/last bin extends to infinity


def make_betas(kind: str, num_timesteps: int) -> np.ndarray:
    if kind == "cosine":

        def alpha_bar(frac: float) -> float:
            return math.cos((frac + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), MAX_BETA)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    if kind == "linear":
        scale = 1000 / num_timesteps
        low, high = LINEAR_BETA_RANGE
        return np.linspace(scale * low, scale * high, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {kind!r}; expected 'cosine' or 'linear'")


def spaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` timesteps evenly spread over ``[0, num_timesteps - 1]`` (both ends kept)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {num_timesteps}]")
    if num_steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + DECODER_BIN_HALF_WIDTH))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - DECODER_BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -DECODER_EDGE, log_cdf_plus, torch.where(x > DECODER_EDGE, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Schedule arithmetic for one (possibly respaced) chain of timesteps."""

    def __init__(self, betas: np.ndarray, timestep_map: Optional[Sequence[int]] = None):
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip the log to the next value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}  # _take's copies, per device

    @classmethod
    def create(cls, kind: str, num_timesteps: int) -> "GaussianDiffusion":
        return cls(make_betas(kind, num_timesteps))

    def respaced(self, num_steps: int) -> "GaussianDiffusion":
        """The chain restricted to ``num_steps`` timesteps, with betas recomputed from alpha-bar."""
        kept = spaced_timesteps(self.num_timesteps, num_steps)
        betas, last = [], 1.0
        for index in kept:
            betas.append(1.0 - self.alphas_cumprod[index] / last)
            last = self.alphas_cumprod[index]
        return GaussianDiffusion(np.array(betas), [self.timestep_map[i] for i in kept])

    def _take(self, array: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # The float64 table is copied to t's device once, not on every call (~11 host-to-device copies per
        # training micro-step and per sampling step otherwise: on a GPU each one is a synchronising copy).
        key = (id(array), t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = torch.from_numpy(array).to(device=t.device)
        return table[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._take(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = self._take(self.posterior_mean_coef1, t, xt) * x0 + self._take(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._take(self.posterior_log_variance_clipped, t, xt)

    def p_mean_variance(self, eps: torch.Tensor, var_values: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and log-variance of p(x_{t-1} | x_t) from predicted eps and variance interpolation."""
        min_log = self._take(self.posterior_log_variance_clipped, t, xt)
        max_log = self._take(self.log_betas, t, xt)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = (
            self._take(self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - self._take(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        )
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_variance

    def training_losses(self, model: Callable, x0: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row MSE on eps and the variational bound (bits/dim) with the mean frozen."""
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        eps, var_values = model(xt, t).chunk(2, dim=-1)
        true_mean, true_log_variance = self.q_posterior(x0, xt, t)
        mean, log_variance = self.p_mean_variance(eps.detach(), var_values, xt, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).mean(-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = (eps - noise).pow(2).mean(-1)
        return {"mse": mse, "vb": vb}

    def p_mean_variance_at(self, eps: torch.Tensor, var_values: torch.Tensor, xt: torch.Tensor, index: int):
        """``p_mean_variance`` when every row is at timestep ``index``: the schedule as host scalars."""
        min_log, max_log = float(self.posterior_log_variance_clipped[index]), float(self.log_betas[index])
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = float(self.sqrt_recip_alphas_cumprod[index]) * xt - float(self.sqrt_recipm1_alphas_cumprod[index]) * eps
        mean = float(self.posterior_mean_coef1[index]) * x0 + float(self.posterior_mean_coef2[index]) * xt
        return mean, log_variance

    def sample(
        self, model: Callable, noise: torch.Tensor, temperature: float, step_noise: torch.Tensor, fast: bool = False
    ) -> torch.Tensor:
        """Ancestral sampling over this chain from ``noise`` [N, D]; ``model(x, t_original)`` returns eps and
        variance values. ``step_noise`` [N, num_timesteps - 1, D] holds the standard-normal draw of each step
        but the last (which returns the mean), in sampling order. ``fast`` uses ``p_mean_variance_at``
        (no per-step host-to-device schedule copies or gathers)."""
        if step_noise.shape[1] != self.num_timesteps - 1:
            raise ValueError(
                f"step_noise has {step_noise.shape[1]} draws per row; this {self.num_timesteps}-step "
                f"chain needs {self.num_timesteps - 1}"
            )
        x = noise
        for draw, index in enumerate(reversed(range(self.num_timesteps))):
            original_t = torch.full((x.shape[0],), self.timestep_map[index], device=x.device, dtype=torch.long)
            eps, var_values = model(x, original_t).chunk(2, dim=-1)
            if fast:
                mean, log_variance = self.p_mean_variance_at(eps, var_values, x, index)
            else:
                t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
                mean, log_variance = self.p_mean_variance(eps, var_values, x, t)
            if index == 0:
                x = mean
            else:
                x = mean + torch.exp(0.5 * log_variance) * step_noise[:, draw] * temperature
        return x
