"""The sampling accelerations measured by ``sampling_speed.py --techniques`` and ``--pareto``.

Each technique is a set of ``SamplingOptions`` fields applied on top of a base point (K, head steps,
CFG); every one of them is off by default in far-scale. MAR is measured faithful (the reference DDPM
chain) and tuned (host-scalar chain, plus the same caches LazyMAR applies to MAR).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from benchmarks.experiment import within
from far_scale.models.generation import SamplingOptions


@dataclass(frozen=True)
class Technique:
    name: str
    model: str
    """FAR or MAR: which trained model / head it applies to."""
    head_steps: int
    options: dict = field(default_factory=dict)

    def sampling_options(self, num_iter: int, cfg_scale: float, base: SamplingOptions | None = None) -> SamplingOptions:
        base = base or SamplingOptions()
        return replace(base, num_iter=num_iter, head_steps=self.head_steps, cfg_scale=cfg_scale, **self.options)


# Both caches refresh by the share of tokens revealed since the last refresh (a quarter of the image), and the
# guidance cache never reuses a difference from a pass that knew no token (far_scale.models.generation).
CACHE_SHARE = 0.25
TOKEN_CACHE = {"backbone_refresh_share": CACHE_SHARE}
GUIDANCE_CACHE = {"guidance_refresh_share": CACHE_SHARE}
CACHES = {**TOKEN_CACHE, **GUIDANCE_CACHE}
TUNED = {"fast_ddpm": True}

# Symmetric: every backbone-side acceleration (caches, step anneal) is given to MAR as well as to FAR.
FAR_TECHNIQUES = [
    Technique("FAR O=8", "FAR", 8),
    Technique("FAR O=4", "FAR", 4),
    Technique("FAR O=2", "FAR", 2),
    Technique("FAR O=1", "FAR", 1),
    Technique("FAR O=8->1", "FAR", 8, {"head_steps_end": 1}),
    Technique("FAR O=8 + token cache", "FAR", 8, TOKEN_CACHE),
    Technique("FAR O=8 + guidance cache", "FAR", 8, GUIDANCE_CACHE),
    Technique("FAR O=8 + both caches", "FAR", 8, CACHES),
    Technique("FAR O=4->1 + both caches", "FAR", 4, {**CACHES, "head_steps_end": 1}),
]
MAR_TECHNIQUES = [
    Technique("MAR 100 steps (faithful)", "MAR", 100),
    *[Technique(f"MAR {s} steps (tuned)", "MAR", s, TUNED) for s in (100, 50, 25)],
    Technique("MAR 100->25 steps (tuned)", "MAR", 100, {**TUNED, "head_steps_end": 25}),
    Technique("MAR 100 steps (tuned) + token cache", "MAR", 100, {**TUNED, **TOKEN_CACHE}),
    Technique("MAR 100 steps (tuned) + guidance cache", "MAR", 100, {**TUNED, **GUIDANCE_CACHE}),
    Technique("MAR 100 steps (tuned) + both caches", "MAR", 100, {**TUNED, **CACHES}),
    Technique("MAR 50->10 steps (tuned) + both caches", "MAR", 50, {**TUNED, **CACHES, "head_steps_end": 10}),
]
TECHNIQUES = FAR_TECHNIQUES + MAR_TECHNIQUES
MAR_FAITHFUL = "MAR 100 steps (faithful)"
MAR_TUNED = "MAR 100 steps (tuned)"


def speedups(rows: list[dict], key: str = "images_per_s") -> dict[str, dict[str, float]]:
    """Each row's speed relative to MAR 100 steps, faithful and tuned, at the same K (rows carry ``K``)."""
    out = {}
    for row in rows:
        refs = {
            r["technique"]: r[key] for r in rows if r["K"] == row["K"] and r["technique"] in (MAR_FAITHFUL, MAR_TUNED)
        }
        out[f"{row['technique']}@K{row['K']}"] = {name: row[key] / value for name, value in refs.items()}
    return out


@dataclass(frozen=True)
class Headline:
    """One comparison of a CFG-matched study: a MAR reference and the fastest FAR setting within its interval."""

    name: str
    reference: dict
    far: Optional[dict]
    """None when no FAR setting reaches the reference's interval."""


def headlines(rows: list[dict]) -> list[Headline]:
    """Against MAR-100 (faithful, at its best K) and against MAR's fastest setting within MAR-100's interval
    (the fair rival): the fastest FAR setting within that reference's interval (``within``: in every feature space
    the rows were scored in). Empty without MAR-100."""
    faithful = [r for r in rows if r["technique"] == MAR_FAITHFUL]
    if not faithful:
        return []
    reference = max(faithful, key=lambda r: r["accuracy"] - r["class_fd"])  # its best K
    rival = max((r for r in rows if r["model"] == "MAR" and within(r, reference)), key=lambda r: r["images_per_s"])
    out = []
    for name, ref in (("MAR-100 (faithful)", reference), ("MAR's fastest setting at MAR-100's quality", rival)):
        matching = [r for r in rows if r["model"] == "FAR" and within(r, ref)]
        out.append(Headline(name, ref, max(matching, key=lambda r: r["images_per_s"]) if matching else None))
    return out


def best_far(rows: list[dict]) -> dict:
    """FAR's best-quality setting (accuracy minus per-class FD), for a reference no FAR setting reaches."""
    return max((r for r in rows if r["model"] == "FAR"), key=lambda r: r["accuracy"] - r["class_fd"])


def far_speedup_answer(rows: list[dict]) -> str:
    """The headline from a CFG-matched study, one line per ``headlines`` comparison."""
    comparisons = headlines(rows)
    if not comparisons:
        return "no MAR 100-step reference among the rows"
    lines = []
    for headline in comparisons:
        ref = headline.reference
        what = (
            f"{headline.name}: {ref['technique']} K={ref['K']} at CFG {ref['cfg']:g} ({ref['cfg_schedule']}), "
            f"accuracy {ref['accuracy']:.3f} [{ref['accuracy_lo']:.3f}, {ref['accuracy_hi']:.3f}], class FD "
            f"{ref['class_fd']:.1f} [{ref['class_fd_lo']:.1f}, {ref['class_fd_hi']:.1f}], {ref['images_per_s']:.1f} img/s"
        )
        if headline.far is None:
            best = best_far(rows)
            lines.append(
                f"- {what}: no FAR setting reaches its interval; FAR's best is {best['technique']} K={best['K']} "
                f"(accuracy {best['accuracy']:.3f}, class FD {best['class_fd']:.1f}, "
                f"{best['images_per_s'] / ref['images_per_s']:.1f}x its speed)"
            )
            continue
        best = headline.far
        lines.append(
            f"- {what}: fastest FAR within its interval is {best['technique']} K={best['K']} at CFG "
            f"{best['cfg']:g} ({best['cfg_schedule']}), accuracy {best['accuracy']:.3f}, class FD "
            f"{best['class_fd']:.1f}, {best['images_per_s']:.1f} img/s = "
            f"**{best['images_per_s'] / ref['images_per_s']:.1f}x**"
        )
    return "\n".join(lines)
