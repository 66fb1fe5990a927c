"""Sampling speed: FAR (shortcut head, O steps) vs MAR (diffusion head, DDPM steps) on the same backbone.

Three modes, one process each, results in benchmarks/results/*.json, docs/benchmarks.md and docs/img/:

- default: for each K (backbone passes of masked generation) and head setting, images/s and the head's
  share of inference time (the shape of FAR's Figure 4); FAR-Causal with and without the KV cache.
- ``--techniques``: images/s of every sampling acceleration (benchmarks/techniques.py) against MAR 100
  steps, faithful and tuned, same backbone weights (random), any size; the GPU command is
  ``--techniques --device cuda --dtype bf16 --sizes base,large --batch 64,256``.
- ``--graphs``: FAR O=4, MAR 100 tuned and FAR-Causal eager, compiled and as CUDA graphs (``eval.compile``);
  the GPU command is ``--graphs --device cuda --dtype bf16 --sizes base,large --batch 64,256``.
- ``--pareto``: the same techniques on trained tiny FAR and MAR models (``benchmarks/quality_speed.py``
  trains them), each point scored on the offline benchmark: quality vs images/s with the Pareto front.

Run ``python -m benchmarks.sampling_speed --help``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks import sampling_graphs, sampling_study
from benchmarks.bench_models import build_pair, speed_record
from benchmarks.report import (
    DocSection,
    command_line,
    describe_machine,
    device_key,
    img_dir,
    load_result,
    markdown_table,
    median_seconds,
    result_heading,
    save_result,
    save_result_figure,
    synchronize,
)
from far_scale.data.spec import DataSpec
from far_scale.models.generation import SamplingOptions, generate
from far_scale.models.model import ARModel

BENCHMARK = "sampling_speed"


class HeadTimer:
    """Accumulates wall time spent in ``model.head.sample`` (wraps this instance only) while ``enabled``: its
    device synchronisations would slow the run it times, so speed is measured with it off and the head's
    share in one more run with it on."""

    def __init__(self, model: ARModel, device: torch.device):
        self.seconds = 0.0
        self.enabled = False
        inner = model.head.sample

        def timed(*args, **kwargs):
            if not self.enabled:
                return inner(*args, **kwargs)
            synchronize(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            synchronize(device)
            self.seconds += time.perf_counter() - start
            return out

        model.head.sample = timed  # type: ignore[method-assign]


def measure(
    model: ARModel,
    timer: HeadTimer,
    labels: torch.Tensor,
    options: SamplingOptions,
    device: torch.device,
    repeats: int,
    autocast,
) -> dict:
    def run():
        with autocast():
            generate(model, labels, options, torch.Generator(device=device).manual_seed(0))

    run()  # warm-up
    seconds = median_seconds(run, device, repeats, warmup=0)
    timer.seconds, timer.enabled = 0.0, True
    instrumented = median_seconds(run, device, 1, warmup=0)
    timer.enabled = False
    return {
        "seconds": seconds,
        "images_per_s": labels.shape[0] / seconds,
        "head_share": min(1.0, timer.seconds / instrumented),
    }


def run_size(args, size: str, batch: int, device: torch.device) -> dict:
    data = DataSpec(seq_len=args.seq_len, token_dim=args.token_dim, num_classes=1000)
    mar, far, causal = build_pair(size, data, device)
    timers = {id(m): HeadTimer(m, device) for m in (mar, far, causal)}
    labels = torch.arange(batch, device=device) % data.num_classes
    bf16 = device.type == "cuda" and args.dtype == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    rows = []
    for k in args.num_iter:
        for label, model, steps in [
            *[("FAR", far, o) for o in args.far_steps],
            *[("MAR", mar, s) for s in args.mar_steps],
        ]:
            options = SamplingOptions(num_iter=k, head_steps=steps, cfg_scale=args.cfg)
            result = measure(model, timers[id(model)], labels, options, device, args.repeats, autocast)
            rows.append({"model": label, "K": k, "head_steps": steps, **result})
            print(
                f"[{size}] {label} K={k} steps={steps}: {result['images_per_s']:.3f} img/s, "
                f"head {100 * result['head_share']:.0f}%",
                flush=True,
            )
    for use_cache in [True, False] if args.causal_no_cache else [True]:
        for o in args.causal_steps:
            options = SamplingOptions(head_steps=o, cfg_scale=args.cfg, use_kv_cache=use_cache)
            result = measure(causal, timers[id(causal)], labels, options, device, args.repeats, autocast)
            rows.append(
                {
                    "model": f"FAR-Causal ({'KV cache' if use_cache else 'no cache'})",
                    "K": data.seq_len,
                    "head_steps": o,
                    **result,
                }
            )
            print(f"[{size}] FAR-Causal cache={use_cache} O={o}: {result['images_per_s']:.3f} img/s", flush=True)
    return speed_record(size, batch, data, bf16, rows, cfg=args.cfg)


def plot(result: dict, path: Path) -> None:
    from far_scale.tracking.plots import new_axes

    fig, (share_ax, speed_ax) = new_axes(2, figsize=(11, 4))
    masked = [r for r in result["rows"] if r["model"] in ("FAR", "MAR")]
    for k in sorted({r["K"] for r in masked}):
        points = sorted((r["head_steps"], r["head_share"], r["model"]) for r in masked if r["K"] == k)
        share_ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=f"K={k}")
        for model in ("FAR", "MAR"):
            sub = sorted((r["head_steps"], r["images_per_s"]) for r in masked if r["K"] == k and r["model"] == model)
            speed_ax.plot(
                [s[0] for s in sub], [s[1] for s in sub], marker="o" if model == "FAR" else "s", label=f"{model} K={k}"
            )
    share_ax.set_xscale("log", base=2)
    share_ax.set_xlabel("head steps (FAR: O <= 8, MAR: DDPM steps >= 25)")
    share_ax.set_ylabel("head share of inference time (%)")
    share_ax.set_ylim(0, 100)
    share_ax.legend()
    share_ax.set_title("Head share (cf. FAR Fig. 4)")
    speed_ax.set_xscale("log", base=2)
    speed_ax.set_xlabel("head steps")
    speed_ax.set_ylabel("images / s")
    speed_ax.legend(fontsize=7)
    speed_ax.set_title("Throughput, same backbone weights")
    save_result_figure(fig, path, f"{result['size']}, {result['dtype']}, batch {result['batch']}", result)


def _entry(result: dict) -> list[str]:
    speedups = _speedups(result)
    return [
        *result_heading(
            result["size"],
            result,
            f"{result['dtype']}, batch {result['batch']}, {result['seq_len']} tokens, cfg {result['cfg']}",
        ),
        markdown_table(
            ["model", "K", "head steps", "s / batch", "images/s", "head share"],
            [
                [
                    r["model"],
                    r["K"],
                    r["head_steps"],
                    f"{r['seconds']:.3f}",
                    f"{r['images_per_s']:.3f}",
                    f"{100 * r['head_share']:.0f}%",
                ]
                for r in result["rows"]
            ],
        ),
        "",
        *([speedups, ""] if speedups else []),
        f"![{result['size']}](img/{result['plot']})",
        "",
    ]


SECTION = DocSection(BENCHMARK, "Sampling speed: FAR vs MAR (`benchmarks/sampling_speed.py`)", lambda r: _entry(r))


def _speedups(result: dict) -> str:
    """FAR (largest O measured) vs MAR (100 steps, or the most measured) at each K."""
    lines = []
    for k in sorted({r["K"] for r in result["rows"] if r["model"] == "FAR"}):
        far = [r for r in result["rows"] if r["model"] == "FAR" and r["K"] == k]
        mar = [r for r in result["rows"] if r["model"] == "MAR" and r["K"] == k]
        if far and mar:
            f = max(far, key=lambda r: r["head_steps"])
            m = max(mar, key=lambda r: r["head_steps"])
            lines.append(
                f"K={k}: FAR O={f['head_steps']} is {f['images_per_s'] / m['images_per_s']:.2f}x "
                f"MAR {m['head_steps']} steps"
            )
    return "Speed-up: " + "; ".join(lines) if lines else ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--sizes", default="tiny", help="comma-separated presets, e.g. tiny,base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on GPU (CPU: fp32)")
    parser.add_argument("--batch", type=ints, default=[16], help="batch sizes, e.g. 64,256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--token-dim", type=int, default=16)
    parser.add_argument(
        "--num-iter", type=ints, default=None, help="K values (default 32,64,256; with --techniques 64)"
    )
    parser.add_argument("--far-steps", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--mar-steps", type=ints, default=[25, 50, 100])
    parser.add_argument("--causal-steps", type=ints, default=[8])
    parser.add_argument(
        "--no-causal-no-cache",
        dest="causal_no_cache",
        action="store_false",
        help="skip FAR-Causal without KV cache (O(L^2) backbone work)",
    )
    parser.add_argument("--cfg", type=float, default=2.9, help="CFG scale (batch doubling, as in evaluation)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="K=32 and O/steps 8/25 only (the demo's smoke run)")
    parser.add_argument("--out", default=None, help="also write the plot here (the demo); results still go to docs")
    parser.add_argument("--no-docs", action="store_true", help="do not write results into docs/")
    parser.add_argument("--tag", default="", help="suffix of the result key, to keep several runs of one size")
    parser.add_argument(
        "--techniques",
        action="store_true",
        help="speed of every sampling acceleration against MAR 100 steps (faithful, tuned)",
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="FAR O=4, MAR 100 tuned and FAR-Causal (static KV cache) eager, compiled and as CUDA graphs",
    )
    parser.add_argument(
        "--graph-modes",
        type=lambda t: t.split(","),
        default=None,
        help="--graphs: modes among eager,default,cudagraphs (default: all three on CUDA, eager,default on CPU)",
    )
    parser.add_argument(
        "--pareto",
        action="store_true",
        help="quality and speed of every acceleration on the trained tiny models in --runs",
    )
    parser.add_argument(
        "--runs",
        default="runs/bench-quality",
        help="--pareto: quality_speed.py's work directory (data, offline benchmark, trained runs)",
    )
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--pareto-far-k", type=ints, default=[4, 8, 16], help="--pareto: K values of FAR")
    parser.add_argument("--pareto-mar-k", type=ints, default=[4, 8, 16], help="--pareto: K values of MAR")
    parser.add_argument("--pareto-cfgs", type=floats, default=[1.5, 2.5, 4.0, 6.0], help="--pareto: CFG sweep")
    parser.add_argument(
        "--pareto-schedules",
        type=lambda t: t.split(","),
        default=["linear", "constant"],
        help="--pareto: CFG schedules",
    )
    parser.add_argument(
        "--pareto-temperatures", type=floats, default=[0.7], help="--pareto: temperatures swept with the CFG scales"
    )
    parser.add_argument("--pareto-select-images", type=int, default=100, help="--pareto: images per sweep point")
    parser.add_argument("--pareto-images", type=int, default=200, help="--pareto: images per seed at the best CFG")
    parser.add_argument("--pareto-seeds", type=int, default=3, help="--pareto: held-out sampling seeds (2-11)")
    parser.add_argument("--pareto-batch", type=int, default=100, help="--pareto: sampling batch")
    parser.add_argument("--pareto-benchmark", default=None, help="--pareto: an offline benchmark file to score with")
    parser.add_argument("--pareto-far-run", default=None, help="--pareto: a trained FAR run directory")
    parser.add_argument("--pareto-mar-run", default=None, help="--pareto: a trained MAR run directory")
    parser.add_argument(
        "--pareto-grids",
        action="store_true",
        help="draw the grids of a saved --pareto study (same --tag) again, from its runs (or --pareto-*-run)",
    )
    args = parser.parse_args(argv)
    if args.num_iter is None:
        args.num_iter = [64] if args.techniques or args.graphs else [32, 64, 256]
    if args.quick:
        args.num_iter, args.far_steps, args.mar_steps, args.causal_steps = [32], [8], [25], [8]
        args.causal_no_cache = False
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    machine = describe_machine(device)
    command = command_line("sampling_speed.py", argv)
    tag = f"_{args.tag}" if args.tag else ""
    if args.pareto or args.pareto_grids:
        key = f"{device_key(machine)}_tiny{tag}"
        if args.pareto_grids:  # a saved study, its grids drawn again from its runs
            result = load_result(sampling_study.PARETO_BENCHMARK, key)
            given = {"FAR": args.pareto_far_run, "MAR": args.pareto_mar_run}
            result["runs"] = {**result.get("runs", {}), **{k: v for k, v in given.items() if v}}
            result.setdefault("data", args.tag)
        else:
            result = {**sampling_study.run_pareto(args, device), "machine": machine, "command": command}
        print(result["answer"])
        if not args.no_docs:
            sampling_study.save_pareto(result, key, device)
        return
    # Modes measured per size and batch: (selected, run, docs section).
    grid_modes = [
        (args.techniques, sampling_study.run_speed, sampling_study.SPEED_SECTION),
        (args.graphs, sampling_graphs.run_graphs, sampling_graphs.SECTION),
    ]
    for selected, run, section in grid_modes:
        if not selected:
            continue
        for size in args.sizes.split(","):
            for batch in args.batch:
                result = {**run(args, size, batch, device), "machine": machine, "command": command}
                if not args.no_docs:
                    section.save(
                        f"{device_key(machine)}_{result['size']}_{result['dtype']}_b{result['batch']}{tag}", result
                    )
        return
    for size in args.sizes.split(","):
        result = {**run_size(args, size, args.batch[0], device), "machine": machine, "command": command}
        key = f"{device_key(machine)}_{size}_{result['dtype']}" + tag
        result["plot"] = f"{BENCHMARK}_{key}.png"
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            plot(result, out / result["plot"])
            print(f"plot: {out / result['plot']}")
        if not args.no_docs:
            plot(save_result(BENCHMARK, key, result), img_dir() / result["plot"])
    if not args.no_docs:
        SECTION.render()
        print("results: docs/benchmarks.md")


if __name__ == "__main__":
    main()
