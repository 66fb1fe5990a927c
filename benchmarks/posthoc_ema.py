"""Post-hoc EMA: quality against the EMA length, FAR and MAR after the same budget, one machine, one run.

1. The digits (or another ``--data``) and their offline benchmark, as ``quality_speed.py`` prepares them.
2. Train the tiny FAR and MAR recipes for ``--steps`` with ``ema.posthoc`` on (two power-function EMAs,
   sigma_rel 0.05 and 0.10, a snapshot every ``--snapshot-interval`` steps), beside their fixed-decay EMA
   (``optim.ema_decay``).
3. For each ``--sigma-rels`` width: the EMA reconstructed from the snapshots at the last step (residual
   recorded; widths the snapshots cannot represent are reported as refused), sampled with the recipe's
   settings (``--seeds`` sampling seeds x ``--num-images``), scored: means with 95% t-intervals. The fixed-decay
   EMA is scored the same way, at the width it corresponds to.
Writes benchmarks/results/posthoc_ema__*.json, a plot and a table into docs/benchmarks.md.
Run ``python -m benchmarks.posthoc_ema --help``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.experiment import Budget, Workspace, add_training_arguments, recipe_for, score, train
from benchmarks.report import (
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

BENCHMARK = "posthoc_ema"
FIXED = "fixed decay"
MODELS = {"FAR": "far", "MAR": "mar"}


def score_weights(loaded, state, bench, args, device) -> dict:
    """The recipe's sampling settings with ``state`` as the weights: each metric's mean and interval over seeds."""
    from far_scale.eval.sample_job import build_generator

    loaded.model.load_state_dict(state)
    generator = build_generator(loaded, device)
    return score(generator, bench, generator.options, range(args.seeds), args.num_images, args.batch)


def lengths(label: str, run_dir: Path, bench, args, device) -> list[dict]:
    from far_scale.eval.sample_job import load_sampling_model
    from far_scale.posthoc_ema import POSTHOC_DIR, decay_to_sigma_rel, list_snapshots, reconstruct

    loaded = load_sampling_model(run_dir, device=device)
    own = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    step = loaded.meta.step
    snapshots = list_snapshots(run_dir / "checkpoints" / POSTHOC_DIR, step)
    decay = loaded.cfg.optim.ema_decay
    rows = [
        {
            "model": label,
            "ema": FIXED,
            "sigma_rel": decay_to_sigma_rel(decay, step),
            "decay": decay,
            "residual": None,
            **score_weights(loaded, own, bench, args, device),
        }
    ]
    for sigma in args.sigma_rels:
        try:
            result = reconstruct(snapshots, sigma, step)
        except ValueError as exc:
            rows.append({"model": label, "ema": "post-hoc", "sigma_rel": sigma, "refused": str(exc)})
            print(f"{label} sigma_rel {sigma}: refused ({exc})", flush=True)
            continue
        row = {"model": label, "ema": "post-hoc", "sigma_rel": sigma, "residual": result.residual}
        row.update(score_weights(loaded, result.state, bench, args, device))
        rows.append(row)
        print(
            f"{label} sigma_rel {sigma}: accuracy {row['accuracy']:.3f} [{row['accuracy_lo']:.3f}, "
            f"{row['accuracy_hi']:.3f}], class FD {row['class_fd']:.1f} (residual {result.residual:.4f})",
            flush=True,
        )
    return rows


def plot(result: dict, path: Path) -> None:
    from far_scale.tracking.plots import new_axes

    fig, axes = new_axes(2, figsize=(12, 4.8))
    for ax, metric, label in ((axes[0], "accuracy", "class accuracy"), (axes[1], "class_fd", "per-class FD")):
        for model, color in (("FAR", "tab:blue"), ("MAR", "tab:orange")):
            rows = sorted(
                (r for r in result["rows"] if r["model"] == model and r["ema"] == "post-hoc" and metric in r),
                key=lambda r: r["sigma_rel"],
            )
            ax.errorbar(
                [r["sigma_rel"] for r in rows],
                [r[metric] for r in rows],
                yerr=[[r[metric] - r[f"{metric}_lo"] for r in rows], [r[f"{metric}_hi"] - r[metric] for r in rows]],
                marker="o",
                color=color,
                capsize=2,
                label=f"{model} post-hoc",
            )
            fixed = next(r for r in result["rows"] if r["model"] == model and r["ema"] == FIXED)
            ax.errorbar(
                [fixed["sigma_rel"]],
                [fixed[metric]],
                yerr=[[fixed[metric] - fixed[f"{metric}_lo"]], [fixed[f"{metric}_hi"] - fixed[metric]]],
                marker="*",
                markersize=12,
                color=color,
                linestyle="none",
                label=f"{model} fixed decay {fixed['decay']}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("EMA relative width sigma_rel (log scale)")
        ax.set_ylabel(f"{label} ({'higher' if metric == 'accuracy' else 'lower'} is better)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_result_figure(
        fig,
        path,
        f"Post-hoc EMA on {result['steps']}-step tiny FAR and MAR ({result['seeds']} seeds x {result['num_images']} "
        "images, 95% intervals)",
        result,
    )


def _entry(result: dict) -> list[str]:
    parts: list[str] = []
    parts += result_heading(
        "tiny FAR and MAR",
        result,
        f"{result['steps']} steps, a snapshot every {result['snapshot_interval']} steps, {result['seeds']} seeds x "
        f"{result['num_images']} images, the recipes' sampling settings",
    )
    table = []
    for r in result["rows"]:
        if "refused" in r:
            table.append([r["model"], r["ema"], f"{r['sigma_rel']:.3g}", "refused: residual above 0.05", "", "", ""])
            return []
        name = f"{r['ema']} {r['decay']}" if r["ema"] == FIXED else r["ema"]
        residual = "-" if r["residual"] is None else f"{r['residual']:.4f}"
        table.append(
            [
                r["model"],
                name,
                f"{r['sigma_rel']:.3g}",
                residual,
                interval_cell(r, "accuracy", 3),
                interval_cell(r, "class_fd", 1),
                interval_cell(r, "fd", 2),
            ]
        )
    parts += [
        markdown_table(["model", "EMA", "sigma_rel", "residual", "class accuracy", "per-class FD", "FD"], table),
        "",
        result["answer"],
        "",
        f"![post-hoc EMA](img/{result['plot']})",
        "",
    ]
    return parts


SECTION = DocSection(
    BENCHMARK,
    "Post-hoc EMA: quality against the EMA length (`benchmarks/posthoc_ema.py`)",
    _entry,
)


def answer(rows: list[dict]) -> str:
    lines = []
    for model in ("FAR", "MAR"):
        scored = [r for r in rows if r["model"] == model and "class_fd" in r]
        best = min((r for r in scored if r["ema"] == "post-hoc"), key=lambda r: r["class_fd"])
        fixed = next(r for r in scored if r["ema"] == FIXED)
        apart = best["class_fd_hi"] < fixed["class_fd_lo"]
        lines.append(
            f"- {model}: best post-hoc width sigma_rel {best['sigma_rel']:g} (per-class FD {best['class_fd']:.1f}, "
            f"accuracy {best['accuracy']:.3f}) against the fixed decay {fixed['decay']} (sigma_rel "
            f"{fixed['sigma_rel']:.3g}: {fixed['class_fd']:.1f}, {fixed['accuracy']:.3f}): "
            + ("better, intervals apart" if apart else "not distinguishable at these intervals")
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, work="runs/bench-posthoc", steps=1500, eval_interval=750)
    parser.add_argument("--snapshot-interval", type=int, default=50, help="steps between snapshots")
    parser.add_argument(
        "--sigma-rels",
        type=lambda t: [float(v) for v in t.split(",")],
        default=[0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20],
    )
    parser.add_argument("--seeds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace.prepare(args.work, args.data, args.images_per_class)
    device = torch.device("cpu")
    posthoc = ("ema.posthoc.enabled=true", f"ema.posthoc.snapshot_interval_steps={args.snapshot_interval}")
    rows = []
    for label, arch in MODELS.items():
        trained = train(ws, recipe_for(arch, args.data), label.lower(), Budget.from_args(args), posthoc)
        rows += lengths(label, trained.run_dir, ws.bench, args, device)
    result = {
        "machine": describe_machine(device),
        "steps": args.steps,
        "snapshot_interval": args.snapshot_interval,
        "num_images": args.num_images,
        "seeds": args.seeds,
        "data": args.data,
        "rows": rows,
        "answer": answer(rows),
        "command": command_line("posthoc_ema.py", argv),
    }
    print(result["answer"])
    if args.no_docs:
        return
    key = f"cpu_tiny_{args.data}_{args.steps}steps"
    result["plot"] = f"{BENCHMARK}_{key}.png"
    saved = save_result(BENCHMARK, key, result)
    plot(saved, img_dir() / result["plot"])
    SECTION.render()


if __name__ == "__main__":
    main()
