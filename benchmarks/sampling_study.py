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

from benchmarks.bench_models import build_pair, speed_record
from benchmarks.experiment import DATA_LABELS, Tuning, at, evaluate_tuned
from benchmarks.report import (
    DocSection,
    img_dir,
    interval_cell,
    markdown_table,
    median_seconds,
    result_heading,
    save_result,
    save_result_figure,
)
from benchmarks.techniques import (
    MAR_FAITHFUL,
    MAR_TUNED,
    TECHNIQUES,
    best_far,
    far_speedup_answer,
    headlines,
    speedups,
)
from far_scale.data.spec import DataSpec
from far_scale.eval.grid import side_by_side, tile
from far_scale.eval.sweep import pareto_front
from far_scale.models.generation import SamplingOptions, generate

SPEED_BENCHMARK = "sampling_techniques"
PARETO_BENCHMARK = "sampling_pareto"
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
    return speed_record(size, batch, data, bf16, rows, cfg=args.cfg, speedups=speedups(rows))


def _ratio(result: dict, row: dict, reference: str) -> float:
    return result["speedups"][f"{row['technique']}@K{row['K']}"].get(reference, float("nan"))


def _speed_entry(result: dict) -> list[str]:
    return [
        *result_heading(
            result["size"],
            result,
            f"{result['dtype']}, batch {result['batch']}, {result['seq_len']} tokens, CFG {result['cfg']}",
        ),
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


SPEED_SECTION = DocSection(
    SPEED_BENCHMARK,
    "Sampling accelerations: speed (`benchmarks/sampling_speed.py --techniques`)",
    _speed_entry,
    (
        "Tokens only (no decoding), FAR and MAR sharing one backbone's random weights, one process. "
        "Speed-ups are against MAR with 100 DDPM steps at the same K: *faithful* is MAR's reference "
        "chain, *tuned* the host-scalar chain (`fast_ddpm`). Quality of each technique: next section.",
    ),
)


GRID_SEED = 1  # the grids show the first held-out seed's images
GRID_PER_CLASS = 4


def _pareto_sources(args, work: Path):
    """The offline benchmark and the two trained runs: quality_speed.py's work directory, or explicit paths."""
    from far_scale.eval.offline import OfflineBenchmark, build_benchmark

    if args.pareto_benchmark:
        bench = OfflineBenchmark.load(args.pareto_benchmark)
    else:
        _, bench, _ = build_benchmark(str(work / "images"), work / "cache", str(work / "shards"))
    runs = {"FAR": args.pareto_far_run or work / "runs" / "far", "MAR": args.pareto_mar_run or work / "runs" / "mar"}
    for label, run_dir in runs.items():
        if not (Path(run_dir) / "checkpoints" / "latest.json").is_file():
            raise FileNotFoundError(
                f"no trained {label} run at {run_dir}: run benchmarks/quality_speed.py first (it trains both into "
                f"{work}), or name runs with --pareto-far-run/--pareto-mar-run"
            )
    return bench, runs


def _cache_effect(generator, options: SamplingOptions, batch: int, device) -> dict:
    """Token-weighted z error of the cached passes and effective vs nominal guidance (one batch)."""
    from far_scale.models.cache_diagnostics import diagnose_caches, summarize
    from far_scale.models.generation import SamplingNoise

    model = generator.model
    labels = torch.arange(batch, device=device) % model.num_classes
    noise = SamplingNoise.from_generator(model, options, batch, torch.Generator(device=device).manual_seed(0), device)
    _, records = diagnose_caches(model, labels, options, noise)
    return summarize(records, model.backbone.seq_len)


def _options_at(technique, row: dict, base: SamplingOptions) -> SamplingOptions:
    """A technique's sampling options at a study row's K and tuned point (CFG scale, schedule and temperature; rows
    from before temperatures were tuned sampled at the run's own)."""
    return at(technique.sampling_options(row["K"], row["cfg"], base), {"temperature": base.temperature, **row})


def model_label(model) -> str:
    """A run's model size in one phrase: the preset, or a custom size's dimensions."""
    from far_scale.planning.builder import resolve_dims

    if model.size != "custom":
        return model.size
    dims = resolve_dims(model)
    return (
        f"custom ({dims.encoder_depth}+{dims.decoder_depth} blocks x {dims.width}, head {dims.head_depth} x "
        f"{dims.head_width})"
    )


def _size(result: dict) -> str:
    """The study's model sizes (results from before sizes were recorded are of tiny models)."""
    return " / ".join(sorted(set(result.get("models", {"": "tiny"}).values())))


def run_pareto(args, device: torch.device) -> dict:
    """The CFG-matched protocol (``benchmarks.experiment.evaluate_tuned``): every setting, FAR's and MAR's, at its
    own best guidance.

    For each technique and K: a sweep over CFG scales, both schedules and ``--pareto-temperatures`` on the selection
    seed, the best by per-class Fréchet distance in both feature spaces (``experiment.tune``), then ``--pareto-seeds`` held-out sampling seeds at that setting,
    reported as means with 95% t-intervals; and for settings that reuse a cache, its measured effect (z error,
    effective guidance against nominal).
    """
    from far_scale.eval.sample_job import build_generator, load_sampling_model

    bench, runs = _pareto_sources(args, Path(args.runs).resolve())
    tuning = Tuning(
        tuple(args.pareto_cfgs),
        tuple(args.pareto_schedules),
        tuple(args.pareto_temperatures),
        args.pareto_select_images,
    )
    rows, training_steps, models = [], {}, {}
    for label, run_dir in runs.items():
        loaded = load_sampling_model(run_dir, device=device)
        training_steps[label] = loaded.meta.step
        models[label] = model_label(loaded.cfg.model)
        generator = build_generator(loaded, device)
        for k in args.pareto_far_k if label == "FAR" else args.pareto_mar_k:
            for technique in [t for t in TECHNIQUES if t.model == label]:
                options = technique.sampling_options(k, generator.options.cfg_scale, generator.options)
                row = {"technique": technique.name, "model": label, "K": k}
                row.update(
                    evaluate_tuned(
                        generator, bench, options, tuning, args.pareto_seeds, args.pareto_images, args.pareto_batch
                    )
                )
                if options.caching_tokens or options.caching_guidance:
                    row["cache"] = _cache_effect(generator, at(options, row), args.pareto_batch, device)
                rows.append(row)
                print(
                    f"{technique.name} K={k} best CFG {row['cfg']:g} ({row['cfg_schedule']}), temperature "
                    f"{row['temperature']:g}: {row['images_per_s']:.1f} img/s, accuracy "
                    f"{interval_cell(row, 'accuracy', 3)}, class FD {interval_cell(row, 'class_fd', 1)}"
                    + (
                        f", effective CFG {row['cache']['effective_cfg']:.2f} vs {row['cache']['nominal_cfg']:.2f}"
                        if row.get("cache", {}).get("effective_cfg") is not None
                        else ""
                    ),
                    flush=True,
                )
    return {
        "protocol": "cfg-matched",
        "rows": rows,
        "calibration": [r.as_dict() for r in bench.calibration],
        "num_images": args.pareto_images,
        "select_images": args.pareto_select_images,
        "seeds": args.pareto_seeds,
        "cfgs": args.pareto_cfgs,
        "schedules": args.pareto_schedules,
        "temperatures": args.pareto_temperatures,
        "training_steps": training_steps,
        "models": models,
        "runs": {label: str(run_dir) for label, run_dir in runs.items()},
        "data": args.tag,
        "answer": far_speedup_answer(rows),
    }


def plot_pareto(result: dict, path: Path) -> None:
    from far_scale.tracking.plots import new_axes

    fig, axes = new_axes(2, figsize=(13, 5.5))
    for ax, metric, label in (
        (axes[0], "accuracy", "class accuracy (higher is better)"),
        (axes[1], "class_fd", "per-class Fréchet distance (lower is better)"),
    ):
        for model, marker in (("FAR", "o"), ("MAR", "s")):
            sub = [r for r in result["rows"] if r["model"] == model]
            ax.errorbar(
                [r["images_per_s"] for r in sub],
                [r[metric] for r in sub],
                yerr=[[r[metric] - r[f"{metric}_lo"] for r in sub], [r[f"{metric}_hi"] - r[metric] for r in sub]],
                fmt=marker,
                label=model,
                alpha=0.75,
                capsize=2,
            )
        front = pareto_front(result["rows"], metric)
        ax.plot(
            [r["images_per_s"] for r in front], [r[metric] for r in front], "k--", linewidth=1, label="Pareto front"
        )
        for i, r in enumerate(front):
            ax.annotate(
                f"{r['technique']} K{r['K']}",
                (r["images_per_s"], r[metric]),
                fontsize=6,
                xytext=(-160, 14 + 9 * i if metric == "accuracy" else -16 - 9 * i),
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "linewidth": 0.4},
            )
        ax.set_xscale("log")
        ax.set_xlabel("images / s (sampling + decoding, log scale)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    save_result_figure(
        fig,
        path,
        f"CFG-matched sampling settings on trained {_size(result)} FAR and MAR (each at its best CFG;\n"
        f"{result['seeds']} seeds x {result['num_images']} images, 95% intervals)",
        result,
    )


def _cache_cell(row: dict) -> str:
    cache = row.get("cache")
    if not cache:
        return "-"
    guidance = (
        f"; effective CFG {cache['effective_cfg']:.2f} (nominal {cache['nominal_cfg']:.2f})"
        if cache.get("effective_cfg") is not None
        else ""
    )
    return f"{100 * cache['cached_token_share']:.0f}% of tokens from a cache, z error {cache['z_error']:.3f}{guidance}"


def _pareto_entry(result: dict) -> list[str]:
    parts: list[str] = []
    if result.get("protocol") != "cfg-matched":
        return []  # the fixed-CFG study of 2026-11 compared settings at unequal effective guidance: withdrawn
    steps = ", ".join(f"{k} {v} steps" for k, v in result["training_steps"].items())
    data = DATA_LABELS.get(result.get("data", ""), result.get("data", ""))
    parts += result_heading(
        f"{_size(result)}{f', {data}' if data else ''} ({steps}),",
        result,
        f"{result['seeds']} seeds x {result['num_images']} images per setting; CFG swept over "
        f"{', '.join(f'{c:g}' for c in result['cfgs'])} ({' and '.join(result['schedules'])}) on "
        f"{result['select_images']} images",
    )
    parts += [
        markdown_table(
            ["technique", "K", "best CFG", "images/s", "class accuracy", "per-class FD", "FD", "caches"],
            [
                [
                    r["technique"],
                    r["K"],
                    f"{r['cfg']:g} ({r['cfg_schedule']})",
                    interval_cell(r, "images_per_s", 1),
                    interval_cell(r, "accuracy", 3),
                    interval_cell(r, "class_fd", 1),
                    interval_cell(r, "fd", 2),
                    _cache_cell(r),
                ]
                for r in result["rows"]
            ],
        ),
        "",
        "Calibration of the benchmark: "
        + "; ".join(f"{c['name']} accuracy {c['accuracy']:.3f}, FD {c['fd']:.2f}" for c in result["calibration"]),
        "",
        "The headline (quality within the reference's interval: accuracy at least its lower bound, per-class FD at "
        "most its upper bound):",
        "",
        result["answer"],
        "",
        f"![sampling accelerations at matched guidance](img/{result['plot']})",
        "",
    ]
    if result.get("grids"):
        parts += [
            f"Samples of the headline's settings ({GRID_PER_CLASS} per class, one column per class, held-out "
            f"seed {GRID_SEED}):",
            "",
            f"![the headline's settings side by side](img/{result['grids']})",
            "",
        ]
    return parts


PARETO_SECTION = DocSection(
    PARETO_BENCHMARK,
    "Sampling accelerations at matched guidance (`benchmarks/sampling_speed.py --pareto`)",
    _pareto_entry,
    (
        "Every setting, FAR's and MAR's, at its own best guidance: a sweep over CFG scales and both schedules on a selection seed (best per-class Fréchet distance), then held-out sampling seeds at that setting, reported as means with 95% t-intervals over the seeds. MAR gets every backbone-side acceleration FAR gets (token and guidance caches, refreshed by revealed share; step anneal) plus its host-scalar DDPM chain. The cache column is measured beside the true passes on one batch (`far_scale.models.cache_diagnostics`): a guidance cache that over-guides shows an effective CFG above the nominal one.",
    ),
)


def pareto_grids(result: dict, device: torch.device, path: Path) -> Path:
    """The headline's settings side by side (MAR-100, MAR's fastest at its quality, the fastest FAR within each
    one's interval, or FAR's best-quality setting where none is), each at its best CFG: ``GRID_PER_CLASS``
    images of every class, one column per class."""
    from far_scale.eval.image_generator import SamplingJob
    from far_scale.eval.sample_job import build_generator, load_sampling_model

    generators = {
        label: build_generator(load_sampling_model(Path(run_dir), device=device), device)
        for label, run_dir in result["runs"].items()
    }
    by_name = {t.name: t for t in TECHNIQUES}
    shown, drawn = {}, set()
    for headline in headlines(result["rows"]):
        # Without a FAR setting within the reference's interval, FAR's best-quality one (the answer names it).
        far, note = (headline.far, "") if headline.far else (best_far(result["rows"]), ", outside the interval")
        for row, suffix in ((headline.reference, ""), (far, note)):
            if (row["technique"], row["K"]) in drawn:
                continue
            drawn.add((row["technique"], row["K"]))
            title = f"{row['technique']} K={row['K']}, CFG {row['cfg']:g} ({row['images_per_s']:.0f} img/s{suffix})"
            generator = generators[row["model"]]
            options = _options_at(by_name[row["technique"]], row, generator.options)
            classes = generator.model.num_classes
            job = SamplingJob(GRID_PER_CLASS * classes, classes, GRID_PER_CLASS * classes, GRID_SEED)
            shown[title] = tile(generator.with_options(options).images(job, job.indices(0)).images, classes)
    return side_by_side(shown, path)


def save_pareto(result: dict, key: str, device: torch.device) -> None:
    """Save the study, its plot and its grids, and render docs/benchmarks.md."""
    result["plot"] = f"{PARETO_BENCHMARK}_{key}.png"
    result["grids"] = f"{PARETO_BENCHMARK}_grids_{key}.png"
    pareto_grids(result, device, img_dir() / result["grids"])
    plot_pareto(save_result(PARETO_BENCHMARK, key, result), img_dir() / result["plot"])
    PARETO_SECTION.render()
