"""The sampling accelerations measured by ``sampling_speed.py --techniques`` and ``--pareto``.

Each technique is a set of ``SamplingOptions`` fields applied on top of a base point (K, head steps,
CFG); every one of them is off by default in far-scale. MAR is measured faithful (the reference DDPM
chain) and tuned (host-scalar chain, plus the same caches LazyMAR applies to MAR).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


CACHES = {"backbone_refresh_every": 2, "guidance_refresh_every": 2}

FAR_TECHNIQUES = [
    Technique("FAR O=8", "FAR", 8),
    Technique("FAR O=1", "FAR", 1),
    Technique("FAR O=8, head steps 8->1", "FAR", 8, {"head_steps_end": 1}),
    Technique("FAR O=8, structure-first p=2", "FAR", 8, {"mask_schedule_power": 2.0}),
    Technique("FAR O=8, token cache R=2", "FAR", 8, {"backbone_refresh_every": 2}),
    Technique("FAR O=8, token cache R=4", "FAR", 8, {"backbone_refresh_every": 4}),
    Technique("FAR O=8, guidance cache G=2", "FAR", 8, {"guidance_refresh_every": 2}),
    Technique("FAR O=8, guidance cache G=4", "FAR", 8, {"guidance_refresh_every": 4}),
    Technique("FAR O=8, R=2 + G=2", "FAR", 8, CACHES),
    Technique("FAR O=8, 8->1 + R=2 + G=2", "FAR", 8, {**CACHES, "head_steps_end": 1}),
    Technique("FAR O=8, 8->1 + R=2 + G=2 + p=2", "FAR", 8, {**CACHES, "head_steps_end": 1, "mask_schedule_power": 2.0}),
    Technique("FAR O=8, R=4 + G=4", "FAR", 8, {"backbone_refresh_every": 4, "guidance_refresh_every": 4}),
    Technique(
        "FAR O=8, R=4 + G=4 + p=2",
        "FAR",
        8,
        {"backbone_refresh_every": 4, "guidance_refresh_every": 4, "mask_schedule_power": 2.0},
    ),
    Technique(
        "FAR O=4, 4->1 + R=4 + G=4",
        "FAR",
        4,
        {"backbone_refresh_every": 4, "guidance_refresh_every": 4, "head_steps_end": 1},
    ),
]
MAR_TECHNIQUES = [
    *[Technique(f"MAR {s} steps (faithful)", "MAR", s) for s in (100, 50, 25)],
    *[Technique(f"MAR {s} steps (tuned)", "MAR", s, {"fast_ddpm": True}) for s in (100, 50, 25)],
    Technique("MAR 100 steps (tuned), R=2 + G=2", "MAR", 100, {"fast_ddpm": True, **CACHES}),
    Technique("MAR 100->25 steps (tuned), R=2 + G=2", "MAR", 100, {"fast_ddpm": True, "head_steps_end": 25, **CACHES}),
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


def far_speedup_answer(rows: list[dict], metric: str = "accuracy", tolerance: float = 0.02) -> str:
    """Per MAR 100-step reference (faithful, tuned): the fastest FAR point within ``tolerance`` of its
    ``metric`` and no worse on the Fréchet distance by more than 10%, and the ratio of images/s."""
    lines = []
    for reference_name in (MAR_FAITHFUL, MAR_TUNED):
        for ref in [r for r in rows if r["technique"] == reference_name]:
            what = (
                f"{reference_name} K={ref['K']} (accuracy {ref['accuracy']:.3f}, FD {ref['fd']:.2f}, "
                f"{ref['images_per_s']:.2f} img/s)"
            )
            matching = [
                r
                for r in rows
                if r["model"] == "FAR" and r[metric] >= ref[metric] - tolerance and r["fd"] <= 1.1 * ref["fd"]
            ]
            if not matching:
                best = max((r for r in rows if r["model"] == "FAR"), key=lambda r: r[metric])
                lines.append(
                    f"- {what}: no FAR point reaches it; FAR's best is {best['technique']} K={best['K']} "
                    f"(accuracy {best['accuracy']:.3f}, FD {best['fd']:.2f}, "
                    f"{best['images_per_s'] / ref['images_per_s']:.1f}x its speed)."
                )
                continue
            best = max(matching, key=lambda r: r["images_per_s"])
            lines.append(
                f"- {what}: fastest FAR at that quality is {best['technique']} K={best['K']} "
                f"(accuracy {best['accuracy']:.3f}, FD {best['fd']:.2f}, {best['images_per_s']:.2f} img/s) "
                f"= **{best['images_per_s'] / ref['images_per_s']:.1f}x**"
            )
    return "\n".join(lines)
