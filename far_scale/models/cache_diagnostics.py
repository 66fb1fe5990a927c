"""What the sampler's caches cost in accuracy, measured beside the true passes (a diagnostic: slow, and it never
changes a sample).

At every iteration that reuses a cache, the true backbone pass over the same known tokens runs as well:
- token cache: ``z_error`` = |z_lazy - z_full| / |z_full| on the conditional rows;
- guidance cache: ``difference_ratio`` = |d_cached| / |d_true| with d = z_cond - z_uncond, and the effective
  guidance scale ``effective_cfg`` = 1 + (w - 1) <d_cached, d_true> / |d_true|^2, the scale the head applies
  in effect to the true difference (to first order in the head), against the nominal w of the iteration.
A cache that over-guides shows as effective_cfg well above cfg.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from far_scale.models.backbones import gather_positions
from far_scale.models.generation import (
    Iteration,
    SamplingNoise,
    SamplingOptions,
    doubled_batch,
    guidance_conditions,
    plan_generation,
    sample_masked,
)
from far_scale.models.model import ARModel


@dataclass(frozen=True)
class CachedIteration:
    iteration: int
    known: int
    """Tokens known before the iteration."""
    generated: int
    lazy: bool
    cached_guidance: bool
    z_error: float
    cfg: Optional[float]
    difference_ratio: Optional[float]
    effective_cfg: Optional[float]

    def as_dict(self) -> dict:
        return asdict(self)


def _norm(x: torch.Tensor) -> float:
    return float(x.float().norm())


def diagnose_caches(
    model: ARModel, labels: torch.Tensor, options: SamplingOptions, noise: SamplingNoise
) -> tuple[torch.Tensor, list[CachedIteration]]:
    """One generation with ``options``: its tokens (as without the diagnostic) and a record per iteration
    that reused a cache."""
    backbone, batch, guided = model.backbone, labels.shape[0], options.guided
    cond = guidance_conditions(model, labels, guided)
    records: list[CachedIteration] = []
    plan = plan_generation(options, backbone.seq_len, backbone.kind, model.head.anneal_steps)
    index = {it.start: i for i, it in enumerate(plan)}

    def probe(it: Iteration, tokens, orders, chosen, z) -> None:
        visible = orders[:, : it.start].sort(dim=1).values
        if guided:
            true = backbone.predict(doubled_batch(tokens), doubled_batch(visible), cond)
            true = gather_positions(true, doubled_batch(chosen))
        else:
            true = gather_positions(backbone.predict(tokens, visible, cond), chosen)
        used_c, true_c = z[:batch], true[:batch]
        record = dict(z_error=_norm(used_c - true_c) / max(_norm(true_c), 1e-12))
        cached_guidance = guided and not it.both_halves
        ratio = effective = None
        if guided:
            d_used, d_true = (z[:batch] - z[batch:]).float(), (true[:batch] - true[batch:]).float()
            true_sq = float((d_true * d_true).sum())
            ratio = _norm(d_used) / max(true_sq**0.5, 1e-12)
            effective = 1.0 + (it.cfg - 1.0) * float((d_used * d_true).sum()) / max(true_sq, 1e-24)
        records.append(
            CachedIteration(
                iteration=index[it.start],
                known=it.start,
                generated=it.end - it.start,
                lazy=not it.full_backbone,
                cached_guidance=cached_guidance,
                cfg=it.cfg,
                difference_ratio=ratio,
                effective_cfg=effective,
                **record,
            )
        )

    with torch.no_grad():
        tokens = sample_masked(model, labels, options, noise, probe=probe)
    return tokens, records


def summarize(records: list[CachedIteration], num_tokens: int) -> dict:
    """Token-weighted means over a generation: the share of tokens generated from a cache, their z error, and
    the effective against the nominal guidance scale on the guidance-cached ones."""
    cached = sum(r.generated for r in records)
    guided = [r for r in records if r.cached_guidance]
    weight = sum(r.generated for r in guided)
    return {
        "cached_token_share": cached / num_tokens,
        "z_error": sum(r.z_error * r.generated for r in records) / cached if cached else 0.0,
        "nominal_cfg": sum(r.cfg * r.generated for r in guided) / weight if weight else None,
        "effective_cfg": sum(r.effective_cfg * r.generated for r in guided) / weight if weight else None,
    }
