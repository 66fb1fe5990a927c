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
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from benchmarks.report import (
    REPO_ROOT,
    command_line,
    describe_machine,
    interval_cell,
    load_results,
    markdown_table,
    result_heading,
    save_result,
    write_doc_section,
)
from far_scale.eval.metrics import repeat_interval
from far_scale.eval.offline import (
    CALIBRATION_RANDOM,
    CALIBRATION_REAL,
    CALIBRATION_RECON,
)

BENCHMARK = "quality_speed"
IMG_DIR = REPO_ROOT / "docs" / "img"
PAPER_SPEEDUP = 2.3  # FAR paper: up to 2.3x faster than MAR at competitive quality
ACCURACY_TOLERANCE = 0.02  # "the same quality": accuracy within this and Fréchet distance no worse
# data -> (recipe data tag, image size, token size in px, images per shard)
DATASETS = {
    "digits": ("digits32", 32, 8, 250),
    "synth": ("synth64", 64, 8, 100),
    "synth-shape": ("synth64", 64, 8, 100),
}
# Synthetic images per class by default. Shapes in random colours need more than class colours: at 100 per class
# the benchmark's detail-free control kept accuracy 0.453 against an allowed 0.450 (INVALID); at 300 its
# classifier reached 0.969 on held-out images and the control 0.533 against an allowed 0.535 (VALID, narrowly).
IMAGES_PER_CLASS = {"synth": 100, "synth-shape": 300}
SHARES = ("accuracy", "precision", "recall")  # metrics in [0, 1]


DATA_LABELS = {
    "digits": "real digits (32 px)",
    "synth": "synthetic shapes, class colours (benchmark INVALID by its verdict)",
    "synth-shape": "synthetic shapes, random colours",
}


def data_label(result: dict) -> str:
    """What a stored result was measured on (results from before ``--data`` existed are synthetic)."""
    return DATA_LABELS[result.get("data", "synth")]


def recipes_for(data: str) -> dict[str, str]:
    tag = DATASETS[data][0]
    return {label: f"recipes/{label.lower()}_tiny_{tag}.yaml" for label in ("FAR", "MAR")}


def prepare_data(work: Path, images_per_class: Optional[int], data: str = "synth") -> tuple[Path, Path]:
    from data_prep.digits import write_digits
    from data_prep.pca_latents import encode_with_pca
    from data_prep.synth import SynthSpec, write_dataset

    _, size, token_px, per_shard = DATASETS[data]
    images, shards = work / "images", work / "shards"
    if not (shards / "manifest.json").is_file():
        if data == "digits":
            write_digits(images, progress=False)
        else:
            colors = "random" if data == "synth-shape" else "class"
            per_class = images_per_class or IMAGES_PER_CLASS[data]
            write_dataset(images, SynthSpec(10, per_class, size, seed=0, colors=colors), progress=False)
        encode_with_pca(
            images, work, size, token_px, 16, images_per_shard=per_shard, max_images=512, max_patches=200_000
        )
    return images, shards


def prepare_work(work: Path, images_per_class: Optional[int], data: str = "synth"):
    """Data, codec, shards and the offline benchmark under ``work`` (each reused when present):
    (images, shards, benchmark path, benchmark)."""
    from far_scale.eval.offline import BenchmarkSettings, build_benchmark

    images, shards = prepare_data(work, images_per_class, data)
    bench_path, bench, _ = build_benchmark(
        str(images), work / "cache", str(shards), BenchmarkSettings.for_folder(images)
    )
    print(bench.verdict.line(), flush=True)
    return images, shards, bench_path, bench


def mean_interval(values: list[float], low: float = 0.0, high: float = float("inf")) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t-interval of the mean over sampling seeds (``repeat_interval``), clipped to the
    metric's range; one seed has no interval."""
    if len(values) < 2:
        return float(values[0]), float("nan"), float("nan")
    return repeat_interval(values, low, high)


def train(label: str, work: Path, shards: Path, bench: Path, args) -> tuple[Path, float]:
    """Train one recipe with the real trainer (unless done); returns (run directory, seconds in training steps)."""
    return train_recipe(recipes_for(args.data)[label], label.lower(), work, shards, bench, args)


def train_recipe(
    recipe: str, name: str, work: Path, shards: Path, bench: Path, args, extra: tuple[str, ...] = ()
) -> tuple[Path, float]:
    """``far-scale train recipe`` as run ``name`` under ``work/runs`` with the benchmark's settings, ``extra`` and
    ``--override`` overrides (unless a finished run is there); returns (run directory, seconds in training steps)."""
    run_dir = work / "runs" / name
    overrides = [
        f"data.url={shards}",
        f"run.output_dir={work / 'runs'}",
        f"run.name={name}",
        f"run.max_steps={args.steps}",
        f"eval.interval_steps={args.eval_interval}",
        f"eval.num_images={args.num_images}",
        "eval.batch_size=50",
        f"eval.benchmark={bench}",
        f"checkpoint.interval_steps={args.steps}",
        "run.log_interval=50",
        *extra,
        *args.override,
    ]
    if not (run_dir / "checkpoints" / "latest.json").is_file() or args.retrain:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(
            [sys.executable, "-m", "far_scale.cli", "train", recipe, *overrides], check=True, cwd=REPO_ROOT, env=env
        )
    # The trainer's per-step record: step time without start-up and evaluation.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return run_dir, sum(json.loads(line)["step_time_s"] for line in lines)


def learning_curve(run_dir: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("far-scale").experiment_id])[0]
    points = {}
    for name in ("accuracy", "fd"):
        for metric in client.get_metric_history(run.info.run_id, f"eval/{name}"):
            points.setdefault(metric.step, {"step": metric.step})[name] = metric.value
    return [points[s] for s in sorted(points)]


def sweep(label: str, run_dir: Path, bench, args, device: torch.device) -> list[dict]:
    """The same points as `far-scale eval sweep` evaluates (without logging child runs)."""
    from far_scale.eval.sample_job import load_sampling_model
    from far_scale.eval.sweep import SweepPoint, evaluate_point

    loaded = load_sampling_model(run_dir, device=device)
    steps = args.far_steps if label == "FAR" else args.mar_steps
    # Every (K, steps) at every CFG scale: the answer compares each setting at its own best scale.
    points = [SweepPoint(k, o, w) for k in args.num_iter for o in steps for w in args.cfg]
    rows = []
    for point in points:
        per_seed = [
            evaluate_point(loaded, point, bench, args.num_images, args.batch, seed, device)
            for seed in range(args.seeds)
        ]
        row = {
            "model": label,
            "K": point.num_iter,
            "head_steps": point.head_steps,
            "cfg": point.cfg_scale,
            "seeds": args.seeds,
        }
        for name in ("images_per_s", "accuracy", "fd", "class_fd", "precision", "recall"):
            ceiling = 1.0 if name in SHARES else float("inf")
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval([m[name] for m in per_seed], 0.0, ceiling)
        rows.append(row)
        print(
            f"{label} {point.key}: {row['images_per_s']:.2f} img/s, accuracy {interval_cell(row, 'accuracy', 3)}, "
            f"FD {interval_cell(row, 'fd', 2)}",
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
    from far_scale.tracking.plots import new_axes, save_figure

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
    machine = result["machine"]
    fig.suptitle(
        f"tiny FAR vs MAR after {result['steps']} steps on {result.get('data', 'synth')} data: "
        f"{machine['name']}, "
        f"{machine['torch_threads']} threads, {result['date']}  (labels: K / head steps)",
        fontsize=9,
    )
    save_figure(fig, path)


def render_docs() -> None:
    parts = ["## Quality vs speed: FAR vs MAR on the offline benchmark (`benchmarks/quality_speed.py`)", ""]
    for result in load_results(BENCHMARK):
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
    write_doc_section(BENCHMARK, "\n".join(parts))


def add_training_arguments(parser: argparse.ArgumentParser, *, eval_interval: int, num_images: int) -> None:
    """Work directory, training budget, evaluation and output options shared by the training benchmarks."""
    parser.add_argument("--work", default="runs/bench-quality", help="data, runs and cache (reused when present)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of each model")
    parser.add_argument("--eval-interval", type=int, default=eval_interval)
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=None,
        help=f"synthetic data only (default {', '.join(f'{k}: {v}' for k, v in IMAGES_PER_CLASS.items())})",
    )
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--num-images", type=int, default=num_images, help="images per point (and per eval)")
    parser.add_argument("--batch", type=int, default=100, help="sampling batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="print only; write nothing into docs/ or results/")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for both trainings (repeatable), e.g. model.size=custom model.width=192",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    add_training_arguments(parser, eval_interval=200, num_images=200)
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
    work = Path(args.work).resolve()
    _, shards, bench_path, bench = prepare_work(work, args.images_per_class, args.data)
    device = torch.device("cpu")
    result = {
        "machine": describe_machine(device),
        "steps": args.steps,
        "num_images": args.num_images,
        "data": args.data,
        "seeds": args.seeds,
        "verdict": bench.verdict.line(),
        "command": command_line("quality_speed.py", argv),
        "calibration": [r.as_dict() for r in bench.calibration],
        "training": {},
        "rows": [],
    }
    for label in ("FAR", "MAR"):
        run_dir, seconds = train(label, work, shards, bench_path, args)
        result["training"][label] = {"seconds": seconds, "curve": learning_curve(run_dir)}
        result["rows"] += sweep(label, run_dir, bench, args, device)
    result["answer"] = answer(result["rows"])
    print(result["answer"])
    if args.no_docs:
        return
    key = f"cpu_tiny_{args.data}_{args.steps}steps" + (f"_{args.tag}" if args.tag else "")
    result["plot"] = f"{BENCHMARK}_{key}.png"
    saved = save_result(BENCHMARK, key, result)
    plot(saved, IMG_DIR / result["plot"])
    render_docs()
    (work / "result.json").write_text(json.dumps(saved, indent=2))
    print("results: docs/benchmarks.md")


if __name__ == "__main__":
    main()
