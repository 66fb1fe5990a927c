"""Quality vs speed: FAR against MAR on the offline benchmark after the same training budget, one machine, one run.

1. Data (``--data``): the built-in real digits (default: 3,000 training MNIST digits at 32 px, 8 x 8 px PCA
   tokens, the demo's data), or the synthetic 64 px shapes (``synth``: class = colour and shape, a benchmark
   its verdict calls invalid; ``synth-shape``: colours drawn per image, the class is the shape alone).
2. The offline benchmark on those images (classifier, reference set, calibration, negative controls, verdict).
3. Train the tiny FAR and MAR recipes for the same number of steps (real trainer, 1 rank), with the
   quality metric logged during training.
4. Sweep sampling settings of each trained model (K; O for FAR, DDPM steps for MAR; CFG), sample the same
   class-balanced image set per point with each of ``--seeds`` sampling seeds, time it and score it: every
   number is the mean over the seeds with a 95% t-interval across them.
Writes benchmarks/results/quality_speed__*.json, a table, a quality-vs-speed plot and the answer to
"does FAR reach MAR's quality at >= 2.3x its speed here?" into docs/benchmarks.md.
Run ``python -m benchmarks.quality_speed --help``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.experiment import (
    Budget,
    Workspace,
    add_training_arguments,
    data_label,
    learning_curve,
    load_generator,
    recipe_for,
    score,
    train,
)
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
from far_scale.eval.offline import (
    CALIBRATION_RANDOM,
    CALIBRATION_REAL,
    CALIBRATION_RECON,
)

BENCHMARK = "quality_speed"
PAPER_SPEEDUP = 2.3  # FAR paper: up to 2.3x faster than MAR at competitive quality
ACCURACY_TOLERANCE = 0.02  # "the same quality": accuracy within this and Fréchet distance no worse
MODELS = {"FAR": "far", "MAR": "mar"}


def sweep(label: str, run_dir: Path, bench, args) -> list[dict]:
    """Every (K, steps) at every CFG scale, the same image set per sampling seed: the answer compares each
    setting at its own best scale."""
    generator = load_generator(run_dir)
    steps = args.far_steps if label == "FAR" else args.mar_steps
    rows = []
    for k, o, w in ((k, o, w) for k in args.num_iter for o in steps for w in args.cfg):
        options = replace(generator.options, num_iter=k, head_steps=o, cfg_scale=w)
        row = {"model": label, "K": k, "head_steps": o, "cfg": w}
        row.update(score(generator, bench, options, range(args.seeds), args.num_images, args.batch))
        rows.append(row)
        print(
            f"{label} K{k}-steps{o}-cfg{w:g}: {row['images_per_s']:.2f} img/s, accuracy "
            f"{interval_cell(row, 'accuracy', 3)}, FD {interval_cell(row, 'fd', 2)}",
            flush=True,
        )
    return rows


def _at_least_as_good(far: dict, mar: dict) -> bool:
    """FAR's quality is within MAR's interval or better, on accuracy and FD (older results without intervals:
    accuracy within ACCURACY_TOLERANCE and FD no worse)."""
    if "accuracy_lo" in mar and mar["accuracy_lo"] == mar["accuracy_lo"]:
        return far["accuracy"] >= mar["accuracy_lo"] and far["fd"] <= mar["fd_hi"]
    return far["accuracy"] >= mar["accuracy"] - ACCURACY_TOLERANCE and far["fd"] <= mar["fd"]


def best_cfg(rows: list[dict]) -> list[dict]:
    """Each (model, K, steps) setting at its best CFG scale (highest accuracy, then lowest FD), so that no
    setting wins or loses by its guidance strength."""
    best: dict = {}
    for row in rows:
        key = (row["model"], row["K"], row["head_steps"])
        if key not in best or (row["accuracy"], -row["fd"]) > (best[key]["accuracy"], -best[key]["fd"]):
            best[key] = row
    return list(best.values())


def answer(rows: list[dict]) -> str:
    """The fastest FAR setting at the quality of MAR's most-steps setting, per K; every setting at its best CFG."""
    rows = best_cfg(rows)
    mar_steps = max(r["head_steps"] for r in rows if r["model"] == "MAR")
    lines = []
    for mar in [r for r in rows if r["model"] == "MAR" and r["head_steps"] == mar_steps]:
        matching = [r for r in rows if r["model"] == "FAR" and _at_least_as_good(r, mar)]
        what = (
            f"MAR K={mar['K']} {mar_steps} steps CFG {mar['cfg']} (accuracy {mar['accuracy']:.3f}, FD {mar['fd']:.2f}, "
            f"{mar['images_per_s']:.2f} img/s)"
        )
        if not matching:
            lines.append(f"- {what}: no FAR point reaches it.")
            continue
        best = max(matching, key=lambda r: r["images_per_s"])
        ratio = best["images_per_s"] / mar["images_per_s"]
        verdict = "yes" if ratio >= PAPER_SPEEDUP else "no"
        lines.append(
            f"- {what}: fastest FAR at that quality is K={best['K']} O={best['head_steps']} CFG {best['cfg']} "
            f"(accuracy {best['accuracy']:.3f}, FD {best['fd']:.2f}) at {best['images_per_s']:.2f} img/s = "
            f"**{ratio:.1f}x** ({verdict} for >= {PAPER_SPEEDUP}x)"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from far_scale.tracking.plots import new_axes

    fig, axes = new_axes(2, figsize=(12, 4.5))
    calibration = {r["name"]: r for r in result["calibration"]}
    for ax, metric, label in (
        (axes[0], "accuracy", "class accuracy (higher is better)"),
        (axes[1], "fd", "Fréchet distance, classifier features (lower is better)"),
    ):
        for model, marker in (("FAR", "o"), ("MAR", "s")):
            rows = [r for r in result["rows"] if r["model"] == model]
            for cfg in sorted({r["cfg"] for r in rows}):
                sub = [r for r in rows if r["cfg"] == cfg]
                ax.scatter(
                    [r["images_per_s"] for r in sub],
                    [r[metric] for r in sub],
                    marker=marker,
                    label=f"{model} CFG {cfg:g}",
                )
                for r in sub:
                    ax.annotate(
                        f"K{r['K']}/{r['head_steps']}",
                        (r["images_per_s"], r[metric]),
                        fontsize=6,
                        xytext=(2, 2),
                        textcoords="offset points",
                    )
        for name, style in ((CALIBRATION_REAL, "g--"), (CALIBRATION_RECON, "b:"), (CALIBRATION_RANDOM, "r-.")):
            if name in calibration:
                ax.axhline(calibration[name][metric], color=style[0], linestyle=style[1:], linewidth=1, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("images / s (sampling + decoding, log scale)")
        ax.set_ylabel(label)
        if metric == "fd":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower left")
    save_result_figure(
        fig,
        path,
        f"tiny FAR vs MAR after {result['steps']} steps on {result.get('data', 'synth')} data (labels: K / head steps)",
        result,
    )


def _entry(result: dict) -> list[str]:
    parts: list[str] = []
    parts += result_heading(
        f"tiny on {data_label(result)}, {result['steps']} training steps each,",
        result,
        f"{result['num_images']} images per point, {result.get('seeds', 1)} sampling seeds",
    )
    if "verdict" in result:
        parts += [f"Benchmark verdict: {result['verdict']}", ""]
    parts += [
        "Training (same budget, 1 rank, batch 64; time in training steps): "
        + "; ".join(f"{label} {t['seconds'] / 60:.1f} min" for label, t in result["training"].items()),
        "",
        "Quality during training (EMA weights, recipe's sampling settings):",
        "",
        markdown_table(
            ["model", "step", "class accuracy", "Fréchet distance"],
            [
                [label, p["step"], f"{p.get('accuracy', float('nan')):.3f}", f"{p.get('fd', float('nan')):.2f}"]
                for label, t in result["training"].items()
                for p in t["curve"]
            ],
        ),
        "",
        "Calibration:",
        "",
        markdown_table(
            ["images", "n", "class accuracy", "Fréchet distance", "precision", "recall"],
            [
                [
                    r["name"],
                    r["num_images"],
                    f"{r['accuracy']:.3f}",
                    f"{r['fd']:.2f}",
                    f"{r['precision']:.3f}",
                    f"{r['recall']:.3f}",
                ]
                for r in result["calibration"]
            ],
        ),
        "",
        markdown_table(
            [
                "model",
                "K",
                "head steps",
                "CFG",
                "images/s",
                "class accuracy [95% CI]",
                "Fréchet distance [95% CI]",
                "precision",
                "recall",
            ],
            [
                [
                    r["model"],
                    r["K"],
                    r["head_steps"],
                    r["cfg"],
                    f"{r['images_per_s']:.2f}",
                    interval_cell(r, "accuracy", 3),
                    interval_cell(r, "fd", 2),
                    f"{r['precision']:.3f}",
                    f"{r['recall']:.3f}",
                ]
                for r in result["rows"]
            ],
        ),
        "",
        "Does FAR reach MAR's quality at >= 2.3x its speed here? (each setting at its best CFG; quality within "
        "MAR's 95% interval)",
        "",
        result["answer"],
        "",
        f"![quality vs speed](img/{result['plot']})",
        "",
    ]
    return parts


SECTION = DocSection(
    BENCHMARK,
    "Quality vs speed: FAR vs MAR on the offline benchmark (`benchmarks/quality_speed.py`)",
    _entry,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    add_training_arguments(parser, work="runs/bench-quality", steps=600, eval_interval=200)
    parser.add_argument(
        "--num-iter",
        type=ints,
        default=None,
        help="K values (default: 4,8,16 on the digits' 16 tokens, 16,32,64 on synthetic data)",
    )
    parser.add_argument("--far-steps", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--mar-steps", type=ints, default=[25, 50, 100])
    parser.add_argument("--cfg", type=floats, default=[2.0, 4.0], help="CFG scales (every setting at each)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per point (95%% t-interval over them)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.num_iter is None:
        args.num_iter = [4, 8, 16] if args.data == "digits" else [16, 32, 64]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace.prepare(args.work, args.data, args.images_per_class)
    result = {
        "machine": describe_machine(torch.device("cpu")),
        "steps": args.steps,
        "num_images": args.num_images,
        "data": args.data,
        "seeds": args.seeds,
        "verdict": ws.bench.verdict.line(),
        "command": command_line("quality_speed.py", argv),
        "calibration": [r.as_dict() for r in ws.bench.calibration],
        "training": {},
        "rows": [],
    }
    for label, arch in MODELS.items():
        trained = train(ws, recipe_for(arch, args.data), label.lower(), Budget.from_args(args))
        result["training"][label] = {"seconds": trained.seconds, "curve": learning_curve(trained.run_dir)}
        result["rows"] += sweep(label, trained.run_dir, ws.bench, args)
    result["answer"] = answer(result["rows"])
    print(result["answer"])
    if args.no_docs:
        return
    key = f"cpu_tiny_{args.data}_{args.steps}steps" + (f"_{args.tag}" if args.tag else "")
    result["plot"] = f"{BENCHMARK}_{key}.png"
    saved = save_result(BENCHMARK, key, result)
    plot(saved, img_dir() / result["plot"])
    SECTION.render()
    (ws.work / "result.json").write_text(json.dumps(saved, indent=2))
    print("results: docs/benchmarks.md")


if __name__ == "__main__":
    main()
