"""Post-hoc EMA reconstruction on synthetic weight trajectories (far_scale.posthoc_ema)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from far_scale.posthoc_ema import (
    decay_to_sigma_rel,
    gamma_to_sigma_rel,
    list_snapshots,
    power_decay,
    profile_inner,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_metadata,
    snapshot_tensors,
    solve_weights,
)

STEPS, INTERVAL, TRACKED = 2000, 100, (0.05, 0.10)


def test_width_and_exponent_are_inverse():
    for sigma in (0.01, 0.05, 0.10, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-9)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's stated pairs
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match="sigma_rel=0.5 is outside"):
        sigma_rel_to_gamma(0.5)


def test_inner_product_is_the_integral_of_the_profiles():
    ta, ga, tb, gb = 700.0, 6.9, 1000.0, 17.0
    grid = torch.linspace(0, 1000, 200_001, dtype=torch.float64)[1:]
    pa = torch.where(grid <= ta, (ga + 1) * grid**ga / ta ** (ga + 1), 0.0)
    pb = (gb + 1) * grid**gb / tb ** (gb + 1)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(float((pa * pb).sum() * (grid[1] - grid[0])), rel=1e-3)


def _trajectory(dim: int = 64) -> torch.Tensor:
    """A drifting random walk of weights, one row per step (step 1 first)."""
    generator = torch.Generator().manual_seed(0)
    steps = torch.randn(STEPS, dim, generator=generator, dtype=torch.float64) * 0.05 + 0.01
    return steps.cumsum(0)


def _power_ema(trajectory: torch.Tensor, sigma: float, upto: int) -> torch.Tensor:
    gamma, ema = sigma_rel_to_gamma(sigma), torch.zeros(trajectory.shape[1], dtype=torch.float64)
    for step in range(1, upto + 1):
        ema = torch.lerp(ema, trajectory[step - 1], 1 - power_decay(step, gamma))
    return ema


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """The tracked EMAs as training keeps them (fp32), a snapshot file every INTERVAL steps."""
    directory = tmp_path_factory.mktemp("posthoc")
    trajectory = _trajectory()
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED]
    emas = [torch.zeros(trajectory.shape[1], dtype=torch.float32) for _ in TRACKED]
    for step in range(1, STEPS + 1):
        for i, gamma in enumerate(gammas):
            emas[i] = torch.lerp(emas[i], trajectory[step - 1].float(), 1 - power_decay(step, gamma))
        if step % INTERVAL == 0:
            tensors = snapshot_tensors([{"w": e.clone()} for e in emas], "fp32")
            save_file(tensors, str(directory / f"phema_step{step:08d}.safetensors"), snapshot_metadata(step, TRACKED))
    return directory, trajectory, emas


def test_a_tracked_profile_reconstructs_the_tracked_ema(snapshots):
    directory, _, emas = snapshots
    found = list_snapshots(directory)
    assert [s.step for s in found] == list(range(INTERVAL, STEPS + 1, INTERVAL))
    for index, sigma in enumerate(TRACKED):
        result = reconstruct(found, sigma)
        assert result.residual < 1e-6
        torch.testing.assert_close(result.state["w"], emas[index], atol=1e-5, rtol=1e-5)


def test_an_intermediate_profile_matches_its_direct_power_ema_within_the_residual(snapshots):
    directory, trajectory, emas = snapshots
    sigma = 0.07
    result = reconstruct(list_snapshots(directory), sigma)
    direct = _power_ema(trajectory, sigma, STEPS).float()
    error = (result.state["w"] - direct).norm()
    # Cauchy-Schwarz over the steps: |sum (w_rec - w) theta| <= residual |p| |theta|, per coordinate and so in norm.
    gamma = sigma_rel_to_gamma(sigma)
    bound = result.residual * math.sqrt(profile_inner(STEPS, gamma, STEPS, gamma)) * trajectory.norm()
    assert 0 < result.residual < 0.05
    assert error <= 2 * bound  # 2: the discrete updates against the continuous profiles
    assert error < 0.05 * (emas[0] - emas[1]).norm()  # far closer than the two tracked EMAs are to each other


def test_a_profile_the_snapshots_cannot_represent_is_refused(snapshots):
    directory, _, _ = snapshots
    with pytest.raises(ValueError, match="residual"):
        reconstruct(list_snapshots(directory), 0.28)
    with pytest.raises(ValueError, match="no post-hoc EMA snapshots"):
        reconstruct([], 0.05)


def test_classic_decay_to_width():
    # a decay of 0.999 averages ~1000 steps; at step 10,000 that is a relative width of ~0.1
    assert decay_to_sigma_rel(0.999, 10_000) == pytest.approx(0.09995, rel=1e-3)


def test_weights_sum_to_one_and_pick_an_exact_match():
    profiles = [(1000.0, sigma_rel_to_gamma(0.05)), (1000.0, sigma_rel_to_gamma(0.10)), (500.0, 6.94)]
    solution = solve_weights(profiles, profiles[1])
    assert solution.weights.sum() == pytest.approx(1.0)
    assert solution.weights[1] == pytest.approx(1.0, abs=1e-6) and solution.residual < 1e-6
