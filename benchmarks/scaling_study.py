"""FAR, MAR and FAR-Causal at three sizes, the same training steps, every sampling setting at its own best CFG and
temperature; and the diagnosis of what held the shortcut head back (issue 32).

On the built-in real digits (``benchmarks.experiment``: data, codec, shards, the offline benchmark in two feature
spaces). For each ``--sizes`` entry:

1. Train FAR, MAR and FAR-Causal with the digit recipes for ``--steps`` (1 rank each; ``--jobs`` trainings at a
   time), and each ``--variants`` FAR variant (a knob of the diagnosis: the old clamp, the old normalization, the
   self-consistency share, guidance distillation).
2. Sample every setting (FAR at O in ``--far-steps`` and its finest level; MAR at ``--mar-steps`` DDPM steps with the
   host-scalar chain; FAR-Causal at O in ``--causal-steps`` with the static KV cache; masked models at K in
   ``--num-iter``), each at its best CFG scale, CFG schedule and temperature from a sweep on the selection seed,
   then ``--seeds`` held-out seeds x ``--num-images`` images: 95% t-intervals of every metric in both feature
   spaces (classifier and autoencoder), and images/s.
3. The answer per size: MAR-100's interval; the fastest FAR setting with O <= 8 inside it in both spaces and its
   speed-up over MAR-100 and over MAR's fastest setting at that quality; FAR's finest level; FAR-Causal beside.

Each evaluated arm is saved under ``WORK/scaling/`` as soon as it is done, so an interrupted study resumes.
Writes benchmarks/results/scaling_study__*.json, plots (quality against parameters per head, quality against
images/s), grids (FAR beside MAR and FAR-Causal, per size) and a section of docs/benchmarks.md.
Run ``python -m benchmarks.scaling_study --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from benchmarks.experiment import (
    QUALITY_HEADER,
    Budget,
    Tuning,
    Workspace,
    add_training_arguments,
    at,
    covers,
    evaluate_tuned,
    load_generator,
    quality_cells,
    recipe_for,
    time_images,
    train,
    widen_shares,
    within,
)
from benchmarks.report import (
    REPO_ROOT,
    DocSection,
    command_line,
    describe_machine,
    img_dir,
    interval_cell,
    markdown_table,
    result_heading,
    save_result,
    save_result_figure,
)
from far_scale.data.storage import write_atomic

BENCHMARK = "scaling_study"
ARCHS = {"FAR": "far", "MAR": "mar", "FAR-Causal": "far_causal"}
SPEED_GOAL = 10.0  # issue 32: FAR at >= 10x MAR-100's images/s ...
RIVAL_GOAL = 3.0  # ... and >= 3x MAR's fastest setting at MAR-100's quality
MAX_FAST_O = 8  # "FAR's fastest setting with O <= 8"
GRID_SEED = 1  # the grids show the first held-out seed's images
GRID_PER_CLASS = 3


def _custom(encoder: int, decoder: int, width: int, heads: int, head_depth: int, head_width: int) -> tuple[str, ...]:
    return (
        "model.size=custom",
        f"model.encoder_depth={encoder}",
        f"model.decoder_depth={decoder}",
        f"model.width={width}",
        f"model.num_heads={heads}",
        f"model.head.depth={head_depth}",
        f"model.head.width={head_width}",
    )


SIZES = {
    "tiny": (),  # the recipes' preset: 2+2 blocks x 128, head 2 x 128 (1.1M parameters)
    "small": _custom(3, 3, 192, 6, 3, 192),  # 3.6M (3.1x tiny)
    "medium": _custom(4, 4, 320, 8, 4, 320),  # 12.7M (3.6x small)
}
# The diagnosis's knobs, each a FAR variant trained beside the study's FAR (whose recipe holds the defaults).
VARIANTS = {
    "clamp 4 (before)": ("FAR", ("model.head.clip_value=4",)),
    "channel normalization": ("FAR", ("data.normalize=channel",)),
    "self-consistency 1/8": ("FAR", ("model.head.self_consistency_fraction=0.125",)),
    "guidance distilled w=3": ("FAR", ("model.head.guidance_distillation_scale=3.0",)),
    "MAR, channel normalization": ("MAR", ("data.normalize=channel",)),  # the baseline gets the knob too
}
VARIANT_CFGS = {"guidance distilled w=3": (1.0,)}
"""CFG scales a variant's sweep adds: distilled guidance is sampled at CFG 1 (its coarse levels learned the guided
flow), so the sweep must hold 1 beside the extra guidance of the others."""
EVERY_SIZE_VARIANTS = ("clamp 4 (before)",)
"""The main lead is checked at every size; the other knobs at ``--variant-sizes``."""


@dataclass(frozen=True)
class Setting:
    """One way of sampling a model: its label and the sampling options it changes."""

    label: str
    head_steps: int
    options: dict = field(default_factory=dict)
    num_iter: Optional[int] = None
    """K of masked models (None for FAR-Causal: one token per step)."""

    def sampling_options(self, base):
        k = {"num_iter": self.num_iter} if self.num_iter else {}
        return replace(base, head_steps=self.head_steps, **k, **self.options)


def settings_for(model: str, args, finest: int) -> list[Setting]:
    if model == "MAR":
        # The baseline gets the host-scalar DDPM chain (same samples, less overhead).
        return [Setting(f"MAR {s} steps", s, {"fast_ddpm": True}, k) for k in args.num_iter for s in args.mar_steps]
    if model == "FAR-Causal":
        return [Setting(f"FAR-Causal O={o}", o, {"static_kv_cache": True}) for o in args.causal_steps]
    steps = [*args.far_steps, *([finest] if args.finest else [])]
    return [
        Setting(f"FAR O={o}" + (" (finest level)" if o == finest else ""), o, {}, k)
        for k in args.num_iter
        for o in steps
    ]


@dataclass(frozen=True)
class Arm:
    """A model of the study: which architecture, which variant, trained as ``name``."""

    size: str
    model: str
    variant: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in self.variant.lower()).strip("-")
        return f"{self.size}-{ARCHS[self.model]}" + (f"-{slug}" if slug else "")

    @property
    def label(self) -> str:
        return self.model + (f" ({self.variant})" if self.variant else "")


def arms_for(args) -> list[Arm]:
    arms = []
    for size in args.sizes:
        arms += [Arm(size, model) for model in args.models]
        arms += [
            Arm(size, VARIANTS[name][0], name, VARIANTS[name][1])
            for name in args.variants
            if size in args.variant_sizes or (name in EVERY_SIZE_VARIANTS and size in args.lead_sizes)
        ]
    return arms


def train_arm(ws: Workspace, arm: Arm, budget: Budget):
    return train(ws, recipe_for(ARCHS[arm.model], ws.data), arm.name, budget, (*SIZES[arm.size], *arm.overrides))


def arm_tuning(arm: Arm, tuning: Tuning) -> Tuning:
    """The study's sweep, with the CFG scales the arm's variant adds."""
    return replace(tuning, cfgs=tuple(sorted({*tuning.cfgs, *VARIANT_CFGS.get(arm.variant, ())})))


def _record_path(ws: Workspace, arm: Arm) -> Path:
    return ws.work / "scaling" / f"{arm.name}.json"


def _load_record(ws: Workspace, arm: Arm, args) -> Optional[dict]:
    """The arm's saved evaluation (``WORK/scaling``) as the current code reads rows, or None (missing, or
    ``--rescore``)."""
    path = _record_path(ws, arm)
    if args.rescore or not path.is_file():
        return None
    record = json.loads(path.read_text())
    for row in record["rows"]:  # saved before rows counted their images: the same pooled count
        row.setdefault("images", row["seeds"] * args.num_images)
        widen_shares(row)
    return record


def _same_selection(record: dict, args) -> bool:
    return record.get("select_images", args.select_images) == args.select_images


def _complete(record: dict, arm: Arm, args, tuning: Tuning) -> bool:
    """Swept on the same selection images over every point ``tuning`` holds."""
    return _same_selection(record, args) and all(covers(row, arm_tuning(arm, tuning)) for row in record["rows"])


def saved_record(ws: Workspace, arm: Arm, args, tuning: Tuning) -> Optional[dict]:
    """The arm's saved evaluation, or None where it is missing or was swept over fewer points than ``tuning``
    holds (then ``evaluate_arm`` extends it)."""
    record = _load_record(ws, arm, args)
    return record if record is not None and _complete(record, arm, args, tuning) else None


def evaluate_arm(ws: Workspace, arm: Arm, trained, args, tuning: Tuning) -> dict:
    """Every setting of the arm at its own best CFG and temperature (saved in ``WORK/scaling``; a saved evaluation
    over a smaller sweep is extended: only the new points are scored, and the held-out seeds only where the best
    point moved)."""
    earlier = _load_record(ws, arm, args)
    if earlier is not None and _complete(earlier, arm, args, tuning):
        return earlier
    extendable = earlier is not None and _same_selection(earlier, args)
    previous = {(r["setting"], r["K"]): r for r in earlier["rows"]} if extendable else {}
    from far_scale.eval.sample_job import load_sampling_model
    from far_scale.models.model import count_parameters

    loaded = load_sampling_model(trained.run_dir)
    generator = load_generator(trained.run_dir)
    finest = loaded.cfg.model.head.num_levels
    settings = settings_for(arm.model, args, finest)
    if arm.variant:  # a diagnosis knob: the fast settings only (MAR: its reference, 100 steps)
        keep = args.variant_steps if arm.model != "MAR" else [max(args.mar_steps)]
        settings = [s for s in settings if s.head_steps in keep]
    tuning = arm_tuning(arm, tuning)
    rows = []
    for setting in settings:
        options = setting.sampling_options(generator.options)
        row = {
            "setting": setting.label,
            "K": setting.num_iter,
            "head_steps": setting.head_steps,
            "options": setting.options,
        }
        before = previous.get((setting.label, setting.num_iter))
        row.update(
            evaluate_tuned(generator, ws.bench, options, tuning, args.seeds, args.num_images, args.batch, before)
        )
        rows.append(row)
        print(
            f"[{arm.name}] {setting.label}"
            + (f" K={setting.num_iter}" if setting.num_iter else "")
            + f": CFG {row['cfg']:g} ({row['cfg_schedule']}), temperature {row['temperature']:g}: "
            f"{row['images_per_s']:.1f} img/s, accuracy {interval_cell(row, 'accuracy', 3)}, class FD "
            f"{interval_cell(row, 'class_fd', 1)}, autoencoder class FD {interval_cell(row, 'ae_class_fd', 0)}",
            flush=True,
        )
    record = {
        "arm": arm.name,
        "size": arm.size,
        "model": arm.model,
        "variant": arm.variant,
        "overrides": list(arm.overrides),
        "parameters": count_parameters(loaded.model),
        "train_seconds": trained.seconds,
        "steps": loaded.meta.step,
        "clip_value": loaded.cfg.model.head.clip_value,
        "normalize": loaded.cfg.data.normalize,
        "select_images": args.select_images,
        "rows": rows,
    }
    write_atomic(_record_path(ws, arm), json.dumps(record, indent=2))
    return record


# ---- the answer ------------------------------------------------------------------------------------------------
def _base(records: list[dict], size: str, model: str) -> Optional[dict]:
    return next((r for r in records if r["size"] == size and r["model"] == model and not r["variant"]), None)


def answer_size(records: list[dict], size: str) -> list[str]:
    """The goal's test at one size; every comparison needs quality within the reference's interval in both
    feature spaces (``within``)."""
    mar, far, causal = (_base(records, size, m) for m in ("MAR", "FAR", "FAR-Causal"))
    if not mar or not far:
        return [f"- {size}: FAR or MAR missing"]
    mar100 = [r for r in mar["rows"] if r["head_steps"] == max(x["head_steps"] for x in mar["rows"])]
    reference = min(mar100, key=lambda r: r["class_fd"])
    name = f"{reference['setting']} K={reference['K']}"
    lines = [
        f"- **{size}** ({_millions(mar['parameters']['total'])} MAR / {_millions(far['parameters']['total'])} FAR "
        f"parameters): reference {name}, accuracy {interval_cell(reference, 'accuracy', 3)}, per-class FD "
        f"{interval_cell(reference, 'class_fd', 1)} (classifier), {interval_cell(reference, 'ae_class_fd', 0)} "
        f"(autoencoder), {reference['images_per_s']:.1f} img/s."
    ]
    rival = max((r for r in mar["rows"] if within(r, reference)), key=lambda r: r["images_per_s"])
    fast = [r for r in far["rows"] if r["head_steps"] <= MAX_FAST_O and within(r, reference)]
    if fast:
        best = max(fast, key=lambda r: r["images_per_s"])
        speedup, over_rival = (
            best["images_per_s"] / reference["images_per_s"],
            best["images_per_s"] / rival["images_per_s"],
        )
        held = speedup >= SPEED_GOAL and over_rival >= RIVAL_GOAL
        lines.append(
            f"  - fastest FAR with O <= {MAX_FAST_O} inside MAR-100's interval in both spaces: {best['setting']} "
            f"K={best['K']} (CFG {best['cfg']:g} {best['cfg_schedule']}, temperature {best['temperature']:g}), "
            f"{best['images_per_s']:.1f} img/s = **{speedup:.1f}x MAR-100** and **{over_rival:.1f}x** MAR's fastest "
            f"setting at that quality ({rival['setting']} K={rival['K']}, {rival['images_per_s']:.1f} img/s): goal "
            f"(>= {SPEED_GOAL:g}x and >= {RIVAL_GOAL:g}x) {'holds' if held else 'does not hold'}"
        )
    else:
        closest = min(
            (r for r in far["rows"] if r["head_steps"] <= MAX_FAST_O), key=lambda r: r["class_fd"] + r["ae_class_fd"]
        )
        lines.append(
            f"  - no FAR setting with O <= {MAX_FAST_O} inside MAR-100's interval in both spaces; the closest: "
            f"{closest['setting']} K={closest['K']}, accuracy {closest['accuracy']:.3f}, per-class FD "
            f"{closest['class_fd']:.1f} / {closest['ae_class_fd']:.0f}, {closest['images_per_s']:.1f} img/s"
        )
    finest = [r for r in far["rows"] if "finest" in r["setting"]]
    if finest:
        best = min(finest, key=lambda r: r["class_fd"])
        lines.append(
            f"  - FAR's finest level ({best['setting']}, plain flow): accuracy {best['accuracy']:.3f}, per-class FD "
            f"{interval_cell(best, 'class_fd', 1)} / {interval_cell(best, 'ae_class_fd', 0)}: "
            + ("inside" if within(best, reference) else "outside")
            + " MAR-100's interval"
        )
    if causal:
        inside = [r for r in causal["rows"] if within(r, reference)]
        best = (
            max(inside, key=lambda r: r["images_per_s"]) if inside else min(causal["rows"], key=lambda r: r["class_fd"])
        )
        lines.append(
            f"  - FAR-Causal ({_millions(causal['parameters']['total'])}): "
            + ("fastest inside MAR-100's interval: " if inside else "none inside MAR-100's interval; its best: ")
            + f"{best['setting']}, accuracy {best['accuracy']:.3f}, per-class FD {interval_cell(best, 'class_fd', 1)} / "
            f"{interval_cell(best, 'ae_class_fd', 0)}, {best['images_per_s']:.1f} img/s"
        )
    return lines


def diagnosis_rows(records: list[dict]) -> list[list[str]]:
    """Each variant beside the study's model at the same size and settings."""
    out = []
    varied = {r["model"] for r in records if r["variant"]}
    for record in sorted(
        (r for r in records if r["model"] in varied),
        key=lambda r: (list(SIZES).index(r["size"]), r["model"], r["variant"]),
    ):
        for row in record["rows"]:
            if row["head_steps"] > MAX_FAST_O and record["model"] == "FAR":
                continue
            out.append(
                [
                    record["size"],
                    record["model"] + (f" ({record['variant']})" if record["variant"] else " (defaults)"),
                    f"{row['setting']} K={row['K']}",
                    f"{row['cfg']:g} ({row['cfg_schedule']}), {row['temperature']:g}",
                    *quality_cells(row),
                ]
            )
    return out


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


# ---- plots and grids ------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    from far_scale.tracking.plots import new_axes

    fig, axes = new_axes(4, figsize=(22, 5))
    base = [r for r in result["records"] if not r["variant"]]
    colors = {"FAR": "tab:blue", "MAR": "tab:orange", "FAR-Causal": "tab:green"}
    for ax, metric, label in (
        (axes[0], "class_fd", "per-class FD, classifier (lower is better)"),
        (axes[1], "ae_class_fd", "per-class FD, autoencoder (lower is better)"),
    ):
        # quality against parameters, per head: each model's best setting and its fastest O <= 8 (FAR) setting
        for model, color in colors.items():
            points = sorted((r for r in base if r["model"] == model), key=lambda r: r["parameters"]["total"])
            if not points:
                continue
            best = [min(r["rows"], key=lambda x: x[metric]) for r in points]
            xs = [r["parameters"]["total"] for r in points]
            ax.errorbar(
                xs,
                [b[metric] for b in best],
                yerr=[[b[metric] - b[f"{metric}_lo"] for b in best], [b[f"{metric}_hi"] - b[metric] for b in best]],
                marker="o",
                color=color,
                capsize=3,
                label=f"{model}, best setting",
            )
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax, metric, label in (
        (axes[2], "class_fd", "per-class FD, classifier"),
        (axes[3], "ae_class_fd", "per-class FD, autoencoder"),
    ):
        for record in base:
            marker = {"tiny": "o", "small": "s", "medium": "D"}.get(record["size"], "x")
            rows = record["rows"]
            ax.errorbar(
                [r["images_per_s"] for r in rows],
                [r[metric] for r in rows],
                yerr=[[r[metric] - r[f"{metric}_lo"] for r in rows], [r[f"{metric}_hi"] - r[metric] for r in rows]],
                fmt=marker,
                color=colors[record["model"]],
                alpha=0.75,
                capsize=2,
                label=f"{record['model']} {record['size']}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("images / s (sampling + decoding, log scale)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    save_result_figure(
        fig,
        path,
        f"FAR, MAR, FAR-Causal after {result['steps']} steps on real digits, every setting at its best CFG and "
        f"temperature ({result['seeds']} seeds x {result['num_images']} images, 95% intervals)",
        result,
    )


def grids(result: dict, ws: Workspace, size: str, path: Path) -> Path:
    """MAR-100 beside FAR's fastest setting inside its interval (or FAR's best) and FAR-Causal's best, at ``size``:
    ``GRID_PER_CLASS`` images of every class, one column per class, held-out seed ``GRID_SEED``."""
    from far_scale.eval.grid import side_by_side, tile
    from far_scale.eval.image_generator import SamplingJob

    shown = {}
    records = [r for r in result["records"] if r["size"] == size and not r["variant"]]
    mar = next(r for r in records if r["model"] == "MAR")
    reference = min(
        (r for r in mar["rows"] if r["head_steps"] == max(x["head_steps"] for x in mar["rows"])),
        key=lambda r: r["class_fd"],
    )
    chosen = [("MAR", reference)]
    for model in ("FAR", "FAR-Causal"):
        record = next((r for r in records if r["model"] == model), None)
        if record is None:
            continue
        fast = [r for r in record["rows"] if r["head_steps"] <= MAX_FAST_O]
        inside = [r for r in fast if within(r, reference)]
        chosen.append(
            (model, max(inside, key=lambda r: r["images_per_s"]) if inside else min(fast, key=lambda r: r["class_fd"]))
        )
    for model, row in chosen:
        generator = load_generator(ws.work / "runs" / Arm(size, model).name)
        setting = Setting(row["setting"], row["head_steps"], row["options"], row["K"])
        options = at(setting.sampling_options(generator.options), row)
        classes = generator.model.num_classes
        job = SamplingJob(GRID_PER_CLASS * classes, classes, GRID_PER_CLASS * classes, GRID_SEED)
        title = (
            f"{size} {row['setting']}" + (f" K={row['K']}" if row["K"] else "") + f" ({row['images_per_s']:.0f} img/s)"
        )
        shown[title] = tile(generator.with_options(options).images(job, job.indices(0)).images, classes)
    return side_by_side(shown, path)


# ---- docs ------------------------------------------------------------------------------------------------------
def _entry(result: dict) -> list[str]:
    parts: list[str] = []
    parts += result_heading(
        f"digits, {result['steps']} steps each,",
        result,
        f"{result['seeds']} seeds x {result['num_images']} images per setting; tuning over CFG "
        f"{', '.join(f'{c:g}' for c in result['tuning']['cfgs'])} ({' and '.join(result['tuning']['schedules'])}) x "
        f"temperature {', '.join(f'{t:g}' for t in result['tuning']['temperatures'])} on "
        f"{result['tuning']['select_images']} images",
    )
    parts += ["The answer, per size:", "", *result["answer"], ""]
    parts += [
        markdown_table(
            [
                "size",
                "model",
                "parameters",
                "training (min)",
                "setting",
                "best CFG, temperature",
                "images/s",
                *QUALITY_HEADER,
            ],
            [
                [
                    r["size"],
                    r["model"],
                    _millions(r["parameters"]["total"]),
                    f"{r['train_seconds'] / 60:.1f}",
                    f"{row['setting']}" + (f" K={row['K']}" if row["K"] else ""),
                    f"{row['cfg']:g} ({row['cfg_schedule']}), {row['temperature']:g}",
                    interval_cell(row, "images_per_s", 1),
                    *quality_cells(row),
                ]
                for r in result["records"]
                if not r["variant"]
                for row in r["rows"]
            ],
        ),
        "",
        f"![scaling study](img/{result['plot']})",
        "",
    ]
    for size, image in result.get("grids", {}).items():
        parts += [
            f"Samples at {size} (MAR-100 | FAR | FAR-Causal; {GRID_PER_CLASS} per class, seed {GRID_SEED}):",
            "",
            f"![{size}](img/{image})",
            "",
        ]
    if any(r["variant"] for r in result["records"]):
        parts += [
            "### Diagnosis: FAR's knobs at the same budget",
            "",
            markdown_table(
                ["size", "FAR variant", "setting", "best CFG, temperature", *QUALITY_HEADER],
                diagnosis_rows(result["records"]),
            ),
            "",
        ]
    return parts


SECTION = DocSection(
    BENCHMARK,
    "Scaling study: FAR, MAR and FAR-Causal at three sizes (`benchmarks/scaling_study.py`)",
    _entry,
    (
        "Every model trained with the same steps on the real digits (1 rank, batch 64); every sampling setting at its own best CFG scale, schedule and temperature from a sweep on a selection seed (best: the smallest sum of per-class FD relative to the sweep's best, in both feature spaces), then held-out seeds: means with 95% t-intervals (a share's interval at least the Wilson interval of its pooled images, so that one at 1.0 does not collapse to a point; the guidance-distilled variant's sweep also holds CFG 1). Quality in two feature spaces: the benchmark's classifier and an autoencoder trained on the same digits without labels (both pass the negative controls). Within an interval means accuracy at least its lower bound and per-class FD at most its upper bound in both spaces.",
    ),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    add_training_arguments(parser, work="runs/bench-scaling", steps=1500, eval_interval=1500)
    parser.set_defaults(threads=1)
    parser.add_argument("--sizes", type=names, default=list(SIZES), help=f"of {', '.join(SIZES)}")
    parser.add_argument("--models", type=names, default=list(ARCHS), help=f"of {', '.join(ARCHS)}")
    parser.add_argument(
        "--variants", type=names, default=list(VARIANTS), help=f"FAR variants, of: {'; '.join(VARIANTS)}"
    )
    parser.add_argument("--variant-sizes", type=names, default=["tiny"], help="sizes the variants train at")
    parser.add_argument(
        "--lead-sizes", type=names, default=list(SIZES), help="sizes the main lead's variant trains at (all)"
    )
    parser.add_argument("--variant-steps", type=ints, default=[2, 8], help="O of the variants' settings")
    parser.add_argument("--num-iter", type=ints, default=[4], help="K of the masked models (16 tokens)")
    parser.add_argument("--far-steps", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--no-finest", dest="finest", action="store_false", help="skip FAR at its finest level")
    parser.add_argument("--mar-steps", type=ints, default=[25, 50, 100])
    parser.add_argument("--causal-steps", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--cfgs", type=floats, default=[1.5, 2.5, 4.0, 6.0])
    parser.add_argument("--schedules", type=names, default=["linear", "constant"])
    parser.add_argument("--temperatures", type=floats, default=[0.5, 0.7, 1.0])
    parser.add_argument("--select-images", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="held-out sampling seeds (2-11)")
    parser.add_argument("--time-seeds", type=int, default=2, help="seeds of the speed timing (2-11)")
    parser.add_argument("--time-images", type=int, default=100, help="images per timing seed")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (each --threads threads)")
    parser.add_argument("--rescore", action="store_true", help="evaluate again even where a saved arm exists")
    parser.add_argument("--tag", default="")
    parser.add_argument("--only-arm", default="", help=argparse.SUPPRESS)  # one arm's quality sweep (a child)
    return parser.parse_args(argv)


def _evaluate_in_process(arm: Arm, argv: list[str]) -> None:
    """One arm's quality sweep as its own process (``--only-arm``): its images/s are not used (speed is timed apart,
    one setting at a time, by ``time_rows``)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "benchmarks.scaling_study", *argv, "--only-arm", arm.name]
    subprocess.run(command, check=True, cwd=REPO_ROOT)


def time_rows(ws: Workspace, record: dict, args) -> None:
    """Replace each row's images/s by a measurement of its own, in this process, one setting at a time."""
    generator = load_generator(ws.work / "runs" / record["arm"])
    for row in record["rows"]:
        setting = Setting(row["setting"], row["head_steps"], row["options"], row["K"])
        options = at(setting.sampling_options(generator.options), row)
        row.update(time_images(generator, options, range(1, args.time_seeds + 1), args.time_images, args.batch))
        print(f"[{record['arm']}] {row['setting']}: {row['images_per_s']:.1f} img/s", flush=True)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace.prepare(args.work, args.data, args.images_per_class)
    budget = Budget.from_args(args)
    arms = arms_for(args)
    tuning = Tuning(tuple(args.cfgs), tuple(args.schedules), tuple(args.temperatures), args.select_images)
    if args.only_arm:
        arm = next(a for a in arms if a.name == args.only_arm)
        evaluate_arm(ws, arm, train_arm(ws, arm, budget), args, tuning)
        return

    def prepare(arm: Arm):
        """Train the arm (its own process), then sweep its sampling settings (another), unless saved."""
        trained = train_arm(ws, arm, budget)
        if saved_record(ws, arm, args, tuning) is None:
            _evaluate_in_process(arm, argv)
        return trained

    # ``jobs`` arms at a time, the largest first (the longest work starts first).
    order = sorted(arms, key=lambda arm: -list(SIZES).index(arm.size))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trained = dict(zip(order, pool.map(prepare, order)))
    reading = argparse.Namespace(**{**vars(args), "rescore": False})  # the children rescored: read what they saved
    records = [evaluate_arm(ws, arm, trained[arm], reading, tuning) for arm in arms]
    for record in records:
        time_rows(ws, record, args)
    answer = [line for size in args.sizes for line in answer_size(records, size)]
    print("\n".join(answer))
    if args.no_docs:
        return
    result = {
        "machine": describe_machine(torch.device("cpu")),
        "command": command_line("scaling_study.py", argv),
        "steps": args.steps,
        "seeds": args.seeds,
        "num_images": args.num_images,
        "tuning": tuning.as_dict(),
        "records": records,
        "answer": answer,
    }
    key = f"cpu_digits_{args.steps}steps" + (f"_{args.tag}" if args.tag else "")
    result["plot"] = f"{BENCHMARK}_{key}.png"
    result["grids"] = {size: f"{BENCHMARK}_grids_{size}_{key}.png" for size in args.sizes}
    for size, image in result["grids"].items():
        grids(result, ws, size, img_dir() / image)
    saved = save_result(BENCHMARK, key, result)
    plot(saved, img_dir() / result["plot"])
    SECTION.render()
    print("results: docs/benchmarks.md")


if __name__ == "__main__":
    main()
