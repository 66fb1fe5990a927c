"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024):
choose the averaging length after training.

During training two (or more) *power-function* EMAs are tracked: the EMA at step t averages the weights of steps
tau <= t with density proportional to tau^gamma, whose width relative to t is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))

and is updated with beta_t = (1 - 1/t)^(gamma + 1). Snapshots of them are stored every few steps. Any other
profile (gamma_r, t_r) is then approximated by a weighted sum of the snapshots: the weights solve the least-squares
problem  min_x | sum_i x_i p_i - p_r |^2  over the profiles' densities, whose inner products have a closed form;
the relative residual says how well the profile is matched. The averaged weights are the same weighted sum of the
snapshots' weights (linear in the weights).

This module is the math and the snapshot file format; training (``far_scale.train.posthoc``) writes snapshots,
``far-scale export --ema-sigma-rel`` and ``eval sweep --ema-sigma-rel`` read them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors import safe_open

POSTHOC_DIR = "posthoc"  # beside the step_* checkpoints; never pruned: the snapshots are the product
SNAPSHOT_FILE = "phema_step{step:08d}.safetensors"
SNAPSHOT_PATTERN = re.compile(r"phema_step(\d{8})\.safetensors$")
FILE_LIST = "files.json"
METADATA_KEY = "far_scale_posthoc_ema"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_RESIDUAL = 0.05
"""A reconstruction whose profile misses the asked one by more than this (relative L2) is refused."""


def storage_costs(
    num_params: int, num_profiles: int, dtype: str, interval: int, total_steps: int | None, world_size: int
) -> tuple[float | None, float]:
    """(bytes of every snapshot of a run, or None without a step count; fp32 bytes of the tracked EMAs per GPU,
    sharded over the ranks like the evaluation EMA)."""
    per_snapshot = num_params * num_profiles * DTYPES[dtype].itemsize
    count = None if total_steps is None else -(-total_steps // interval)
    return (per_snapshot * count if count is not None else None), 4.0 * num_params * num_profiles / world_size


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (the width formula solved for gamma)."""
    if not 0 < sigma_rel < gamma_to_sigma_rel(0.0):
        raise ValueError(
            f"sigma_rel={sigma_rel} is outside (0, {gamma_to_sigma_rel(0.0):.4f}): the widest power-function "
            "profile (gamma = 0) is the plain average of all steps"
        )
    inverse = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def decay_to_sigma_rel(decay: float, step: int) -> float:
    """The relative width at ``step`` of a classic EMA with per-step ``decay`` (its profile's standard deviation
    sqrt(decay) / (1 - decay) steps, over the step): how to ask for "the EMA 0.9999 would have given"."""
    return math.sqrt(decay) / (1.0 - decay) / step


def power_decay(step: int, gamma: float) -> float:
    """beta of the update that completes ``step`` (1-based): (1 - 1/step)^(gamma + 1); 0 at the first step."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """Integral of the product of two normalised power profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
    on [0, t]: (ga + 1)(gb + 1) min(t)^(ga + gb + 1) / ((ga + gb + 1) t_a^(ga + 1) t_b^(gb + 1))."""
    low = min(t_a, t_b)
    # In logs: t^gamma overflows for the narrow profiles (gamma ~ 7-30) at millions of steps.
    log = (
        math.log((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1))
        + (gamma_a + gamma_b + 1) * math.log(low)
        - (gamma_a + 1) * math.log(t_a)
        - (gamma_b + 1) * math.log(t_b)
    )
    return math.exp(log)


@dataclass(frozen=True)
class Solution:
    weights: np.ndarray
    """One per snapshot profile, summing to 1."""
    residual: float
    """|sum_i x_i p_i - p_r| / |p_r|: 0 when the asked profile is one of the snapshots'."""


def solve_weights(profiles: Sequence[tuple[float, float]], target: tuple[float, float]) -> Solution:
    """Least-squares weights of snapshot profiles (step, gamma) for the ``target`` (step, gamma)."""
    gram = np.array([[profile_inner(ta, ga, tb, gb) for tb, gb in profiles] for ta, ga in profiles])
    rhs = np.array([profile_inner(t, g, *target) for t, g in profiles])
    weights = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    weights = weights / weights.sum()
    own = profile_inner(*target, *target)
    error = own - 2 * weights @ rhs + weights @ gram @ weights
    return Solution(weights, math.sqrt(max(error, 0.0) / own))


# ---- snapshots -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rels: tuple[float, ...]

    @property
    def profiles(self) -> list[tuple[float, float]]:
        return [(float(self.step), sigma_rel_to_gamma(s)) for s in self.sigma_rels]

    def weights(self, index: int) -> dict[str, torch.Tensor]:
        """The ``index``-th tracked EMA's weights (fp32)."""
        prefix = f"{index}/"
        with safe_open(str(self.path), "pt") as handle:
            return {k[len(prefix) :]: handle.get_tensor(k).float() for k in handle.keys() if k.startswith(prefix)}


def snapshot_tensors(states: Sequence[dict[str, torch.Tensor]], dtype: str) -> dict[str, torch.Tensor]:
    return {
        f"{i}/{name}": t.to(DTYPES[dtype]).contiguous() for i, state in enumerate(states) for name, t in state.items()
    }


def snapshot_metadata(step: int, sigma_rels: Sequence[float]) -> dict[str, str]:
    return {METADATA_KEY: json.dumps({"step": step, "sigma_rels": list(sigma_rels)})}


def read_snapshot(path: Path) -> Snapshot:
    with safe_open(str(path), "pt") as handle:
        text = (handle.metadata() or {}).get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot (no {METADATA_KEY} metadata)")
    meta = json.loads(text)
    return Snapshot(path, int(meta["step"]), tuple(float(s) for s in meta["sigma_rels"]))


def list_snapshots(directory: Path, up_to_step: int | None = None) -> list[Snapshot]:
    """The snapshots in ``directory`` (a checkpoints directory's ``posthoc/``), by step."""
    if not directory.is_dir():
        return []
    found = [read_snapshot(p) for p in sorted(directory.iterdir()) if SNAPSHOT_PATTERN.search(p.name)]
    return [s for s in found if up_to_step is None or s.step <= up_to_step]


@dataclass(frozen=True)
class Reconstruction:
    state: dict[str, torch.Tensor]
    sigma_rel: float
    step: int
    residual: float
    snapshots: int


def reconstruct(snapshots: Iterable[Snapshot], sigma_rel: float, step: int | None = None) -> Reconstruction:
    """The EMA of relative width ``sigma_rel`` at ``step`` (default: the last snapshot's) from the snapshots up to
    it, streamed one snapshot at a time; refuses a profile the snapshots cannot represent."""
    snapshots = sorted(snapshots, key=lambda s: s.step)
    if step is not None:
        snapshots = [s for s in snapshots if s.step <= step]
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from (was ema.posthoc enabled in training?)")
    step = step or snapshots[-1].step
    profiles = [(s, i, p) for s in snapshots for i, p in enumerate(s.profiles)]
    solution = solve_weights([p for _, _, p in profiles], (float(step), sigma_rel_to_gamma(sigma_rel)))
    if solution.residual > MAX_RESIDUAL:
        tracked = sorted({x for s in snapshots for x in s.sigma_rels})
        raise ValueError(
            f"sigma_rel={sigma_rel} at step {step}: the snapshots (sigma_rel {tracked}, steps {snapshots[0].step}-"
            f"{snapshots[-1].step}) match that profile only to a relative residual of {solution.residual:.3f} (> "
            f"{MAX_RESIDUAL}); ask for a width between the tracked ones, or track it (ema.posthoc.sigma_rels)"
        )
    total: dict[str, torch.Tensor] = {}
    for (snapshot, index, _), weight in zip(profiles, solution.weights):
        for name, tensor in snapshot.weights(index).items():
            total[name] = total[name] + weight * tensor if name in total else weight * tensor
    return Reconstruction(total, sigma_rel, step, solution.residual, len(snapshots))
