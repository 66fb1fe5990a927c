"""The sampling-acceleration study behind ``sampling_speed.py --techniques`` and ``--pareto``.

``--techniques``: images/s of each technique (benchmarks/techniques.py), FAR and MAR sharing one
backbone's (random) weights, one process; speed-ups against MAR 100 steps faithful and tuned.
``--pareto``: the same techniques on trained tiny FAR and MAR (the runs of quality_speed.py), every
point sampled, timed and scored on the offline benchmark; quality vs images/s with the Pareto front.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.bench_models import build_pair
from benchmarks.report import (
    REPO_ROOT,
    load_results,
    markdown_table,
    median_seconds,
    result_heading,
    save_result,
    write_doc_section,
)
from benchmarks.techniques import (
    MAR_FAITHFUL,
    MAR_TUNED,
    TECHNIQUES,
    far_speedup_answer,
    speedups,
)
from far_scale.data.spec import DataSpec
from far_scale.eval.sweep import pareto_front
from far_scale.models.generation import SamplingOptions, generate

SPEED_BENCHMARK = "sampling_techniques"
PARETO_BENCHMARK = "sampling_pareto"
IMG_DIR = REPO_ROOT / "docs" / "img"
CAUSAL = "FAR-Causal O=8 (KV cache)"


def run_speed(args, size: str, batch: int, device: torch.device) -> dict:
    """Every technique's images/s at each K (tokens only, no decoding), same backbone weights."""
    data = DataSpec(seq_len=args.seq_len, token_dim=args.token_dim, num_classes=1000)
    mar, far, causal = build_pair(size, data, device)
    models = {"FAR": far, "MAR": mar}
    labels = torch.arange(batch, device=device) % data.num_classes
    bf16 = device.type == "cuda" and args.dtype == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext

    def timed(model, options: SamplingOptions) -> float:
        def run():
            with autocast():
                generate(model, labels, options, torch.Generator(device=device).manual_seed(0))

        with autocast():  # warm-up on one image and two iterations: allocator and kernels, not the timing
            generate(
                model,
                labels[:1],
                SamplingOptions(num_iter=2, head_steps=options.head_steps, cfg_scale=options.cfg_scale),
                None,
            )
        return median_seconds(run, device, args.repeats, warmup=0)

    rows = []
    for k in args.num_iter:
        for technique in TECHNIQUES:
            seconds = timed(models[technique.model], technique.sampling_options(k, args.cfg))
            rows.append(
                {
                    "technique": technique.name,
                    "model": technique.model,
                    "K": k,
                    "seconds": seconds,
                    "images_per_s": batch / seconds,
                }
            )
            print(f"[{size} b{batch}] {technique.name} K={k}: {batch / seconds:.3f} img/s", flush=True)
        seconds = timed(causal, SamplingOptions(head_steps=8, cfg_scale=args.cfg))
        rows.append(
            {"technique": CAUSAL, "model": "FAR-Causal", "K": k, "seconds": seconds, "images_per_s": batch / seconds}
        )
        print(f"[{size} b{batch}] {CAUSAL}: {batch / seconds:.3f} img/s", flush=True)
    return {
        "size": size,
        "batch": batch,
        "seq_len": data.seq_len,
        "dtype": "bf16" if bf16 else "fp32",
        "cfg": args.cfg,
        "rows": rows,
        "speedups": speedups(rows),
    }


def _ratio(result: dict, row: dict, reference: str) -> float:
    return result["speedups"][f"{row['technique']}@K{row['K']}"].get(reference, float("nan"))


def render_speed_docs() -> None:
    parts = [
        "## Sampling accelerations: speed (`benchmarks/sampling_speed.py --techniques`)",
        "",
        "Tokens only (no decoding), FAR and MAR sharing one backbone's random weights, one process. "
        "Speed-ups are against MAR with 100 DDPM steps at the same K: *faithful* is MAR's reference "
        "chain, *tuned* the host-scalar chain (`fast_ddpm`). Quality of each technique: next section.",
        "",
    ]
    for result in load_results(SPEED_BENCHMARK):
        parts += result_heading(
            result["size"],
            result,
            f"{result['dtype']}, batch {result['batch']}, {result['seq_len']} tokens, CFG {result['cfg']}",
        )
        parts += [
            markdown_table(
                ["technique", "K", "s / batch", "images/s", "vs MAR-100 faithful", "vs MAR-100 tuned"],
                [
                    [
                        r["technique"],
                        r["K"],
                        f"{r['seconds']:.3f}",
                        f"{r['images_per_s']:.3f}",
                        *[f"{_ratio(result, r, ref):.2f}x" for ref in (MAR_FAITHFUL, MAR_TUNED)],
                    ]
                    for r in result["rows"]
                ],
            ),
            "",
        ]
    write_doc_section(SPEED_BENCHMARK, "\n".join(parts))


def save_speed(result: dict, key: str) -> None:
    save_result(SPEED_BENCHMARK, key, result)
    render_speed_docs()


def run_pareto(args, device: torch.device) -> dict:
    """Each technique on the trained tiny models, scored on the offline benchmark."""
    from far_scale.eval.offline import build_benchmark
    from far_scale.eval.sample_job import build_generator, load_sampling_model
    from far_scale.eval.sweep import score_generator

    work = Path(args.runs).resolve()
    _, bench, _ = build_benchmark(str(work / "images"), work / "cache", str(work / "shards"))
    rows, training_steps = [], {}
    for label in ("FAR", "MAR"):
        run_dir = work / "runs" / label.lower()
        if not (run_dir / "checkpoints" / "latest.json").is_file():
            raise FileNotFoundError(
                f"no trained {label} run at {run_dir}: run benchmarks/quality_speed.py first "
                f"(it trains both into {work})"
            )
        loaded = load_sampling_model(run_dir, device=device)
        training_steps[label] = loaded.meta.step
        generator = build_generator(loaded, device)
        techniques = [t for t in TECHNIQUES if t.model == label]
        for k in args.pareto_far_k if label == "FAR" else args.pareto_mar_k:
            for technique in techniques:
                options = technique.sampling_options(k, args.pareto_cfg, generator.options)
                metrics = score_generator(
                    generator.with_options(options), bench, args.pareto_images, args.pareto_batch, seed=0
                )
                rows.append({"technique": technique.name, "model": label, "K": k, **metrics})
                print(
                    f"{technique.name} K={k}: {metrics['images_per_s']:.2f} img/s, accuracy "
                    f"{metrics['accuracy']:.3f}, FD {metrics['fd']:.2f}",
                    flush=True,
                )
    calibration = [r.as_dict() for r in bench.calibration]
    return {
        "rows": rows,
        "calibration": calibration,
        "num_images": args.pareto_images,
        "cfg": args.pareto_cfg,
        "training_steps": training_steps,
        "answer": far_speedup_answer(rows),
    }


def plot_pareto(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, metric, better, label in (
        (axes[0], "accuracy", True, "class accuracy (higher is better)"),
        (axes[1], "fd", False, "Fréchet distance (lower is better, log scale)"),
    ):
        for model, marker in (("FAR", "o"), ("MAR", "s")):
            for k in sorted({r["K"] for r in result["rows"] if r["model"] == model}):
                sub = [r for r in result["rows"] if r["model"] == model and r["K"] == k]
                ax.scatter(
                    [r["images_per_s"] for r in sub],
                    [r[metric] for r in sub],
                    marker=marker,
                    label=f"{model} K={k}",
                    alpha=0.75,
                )
        front = pareto_front(result["rows"], metric)  # higher_is_better(metric) agrees with `better`
        ax.plot(
            [r["images_per_s"] for r in front], [r[metric] for r in front], "k--", linewidth=1, label="Pareto front"
        )
        for i, r in enumerate(front):
            ax.annotate(
                f"{r['technique']} K{r['K']}",
                (r["images_per_s"], r[metric]),
                fontsize=6,
                xytext=(-150, 12 + 9 * i if better else -14 - 9 * i),
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "linewidth": 0.4},
            )
        for cal in result["calibration"]:
            if metric == "fd" and cal["fd"] > 10 * max(r["fd"] for r in result["rows"]):
                continue  # random tokens: off the scale
            ax.axhline(cal[metric], linewidth=0.8, linestyle=":", color="grey")
            ax.annotate(
                cal["name"], (min(r["images_per_s"] for r in result["rows"]), cal[metric]), fontsize=6, color="grey"
            )
        ax.set_xscale("log")
        if metric == "fd":
            ax.set_yscale("log")
        ax.set_xlabel("images / s (sampling + decoding, log scale)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="lower right" if not better else "lower left")
    machine = result["machine"]
    fig.suptitle(
        f"Sampling accelerations on trained tiny FAR and MAR (offline benchmark, {result['num_images']} "
        f"images per point, CFG {result['cfg']}): {machine['name']}, {machine['torch_threads']} threads, "
        f"{result['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_pareto_docs() -> None:
    parts = ["## Sampling accelerations: quality vs speed (`benchmarks/sampling_speed.py --pareto`)", ""]
    for result in load_results(PARETO_BENCHMARK):
        steps = ", ".join(f"{k} {v} steps" for k, v in result["training_steps"].items())
        parts += result_heading(
            f"tiny ({steps})", result, f"{result['num_images']} images per point, CFG {result['cfg']}"
        )
        parts += [
            markdown_table(
                ["technique", "K", "images/s", "class accuracy", "Fréchet distance", "precision", "recall"],
                [
                    [
                        r["technique"],
                        r["K"],
                        f"{r['images_per_s']:.2f}",
                        f"{r['accuracy']:.3f}",
                        f"{r['fd']:.2f}",
                        f"{r['precision']:.3f}",
                        f"{r['recall']:.3f}",
                    ]
                    for r in result["rows"]
                ],
            ),
            "",
            "Calibration: "
            + "; ".join(f"{c['name']} accuracy {c['accuracy']:.3f}, FD {c['fd']:.2f}" for c in result["calibration"]),
            "",
            "FAR at MAR's quality (accuracy within 0.02, FD at most 10% worse):",
            "",
            result["answer"],
            "",
            f"![sampling accelerations](img/{result['plot']})",
            "",
        ]
    write_doc_section(PARETO_BENCHMARK, "\n".join(parts))


def save_pareto(result: dict, key: str) -> None:
    result["plot"] = f"{PARETO_BENCHMARK}_{key}.png"
    save_result(PARETO_BENCHMARK, key, result)
    saved = next(r for r in load_results(PARETO_BENCHMARK) if r["plot"] == result["plot"])
    plot_pareto(saved, IMG_DIR / result["plot"])
    render_pareto_docs()
