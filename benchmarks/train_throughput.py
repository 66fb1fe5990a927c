"""Training throughput: step time, latents/s and data-wait share of `far-scale train`, and loader-only speed.

Three modes, results in benchmarks/results/*.json and docs/benchmarks.md:
- default: trains FAR or MAR (``--configs``) on the machine's CPUs or GPU for a few steps per configuration
  (ranks, ZeRO stage, micro batch) on a synthetic latent dataset it builds, large enough that no epoch ends
  inside the measured steps, and reads rank 0's per-step records (metrics.jsonl) after a warm-up and every
  rank's peak memory and model-build memory (the run's memory.json) beside check-config's estimates. Loader-only
  latents/s is measured from local disk and from S3 (moto on 127.0.0.1).
- ``--fit``: the largest micro batch per rank that trains without running out of memory.
- ``--step-only``: forward + backward of one training step, FAR against MAR on the same backbone weights, one
  process, no optimizer and no data (the GPU command: ``--step-only --device cuda --precision bf16
  --sizes base,large --batch 64``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.bench_models import build_pair, model_config
from benchmarks.report import (
    REPO_ROOT,
    DocSection,
    command_line,
    describe_machine,
    device_key,
    load_results,
    markdown_table,
    median_seconds,
    result_heading,
    save_result,
    write_doc_section,
)
from data_prep.pca_latents import encode_with_pca
from data_prep.synth import SynthSpec, write_dataset
from far_scale.data.loader import LatentLoader
from far_scale.data.spec import DataSpec
from far_scale.local_s3 import LocalS3
from far_scale.models.compile import compile_model
from far_scale.planning.builder import resolve_dims
from far_scale.planning.flops import peak_flops, train_flops_per_image
from far_scale.train.memory import GIB

BENCHMARK = "train_throughput"
FIT_BENCHMARK = "largest_micro_batch"
FIT_STEPS = 3  # steps per trial of --fit (the peak is reached in the first optimizer step)
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")
NO_SPACE_MARKERS = ("No space left on device", "could not write checkpoint")
LOG_TAIL_CHARS = 3000  # of a failed training's output, into the error (and the GPU session's record)
MIN_FREE_BYTES = 2 * GIB  # a fit trial writes logs only (no checkpoint); below this the search stops
RECIPE = REPO_ROOT / "recipes" / "{arch}_tiny_synth64.yaml"  # model.size replaces tiny


STEP_BENCHMARK = "train_step_far_vs_mar"
IMAGES_PER_SHARD = 50
NUM_CLASSES = 10


def images_needed(configs: list[dict], steps: int, requested: int) -> int:
    """Enough images that no configuration's run reaches the end of an epoch (the loader's restart would be
    measured as data wait): every config's global batch x steps, rounded up to whole shards of every class."""
    largest = max(c["micro"] * c["ranks"] for c in configs) * (steps + 1)
    unit = IMAGES_PER_SHARD * NUM_CLASSES
    return max(requested, -(-largest // unit) * unit)


def parse_configs(text: str) -> list[dict]:
    """``size:ranks:zero:micro[:arch]``, comma-separated (arch: far, the default, or mar)."""
    configs = []
    for spec in text.split(","):
        size, ranks, zero, micro, *arch = spec.split(":")
        configs.append(
            {"size": size, "ranks": int(ranks), "zero": int(zero), "micro": int(micro), "arch": (arch or ["far"])[0]}
        )
    return configs


def build_data(tmp: Path, images: int) -> Path:
    src = write_dataset(tmp / "images", SynthSpec(NUM_CLASSES, images // NUM_CLASSES, 64), progress=False)
    # 256 tokens x 16, as ImageNet-256 through KL-16.
    _, shards = encode_with_pca(
        src, tmp, 64, 4, 16, images_per_shard=IMAGES_PER_SHARD, max_images=256, max_patches=100_000, loader_workers=1
    )
    return shards


def train(
    data: Path,
    out: Path,
    size: str,
    nproc: int,
    zero: int,
    micro: int,
    steps: int,
    arch: str = "far",
    device: str = "auto",
    precision: str = "bf16",
) -> dict:
    name = f"{arch}_{size}_n{nproc}_z{zero}_m{micro}"  # a fresh run directory per trial (no resume)
    overrides = [
        f"run.device={device}",
        f"parallel.precision={precision}",  # CPU runs use fp32 whatever this says
        f"data.url={data}",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"model.size={size}",
        f"run.max_steps={steps}",
        f"parallel.zero_stage={zero}",
        f"parallel.micro_batch_size_per_gpu={micro}",
        f"parallel.global_batch_size={micro * nproc}",
        "data.expect.seq_len=256",
        "tracking.enabled=false",
        "eval.interval_steps=100000",
        "eval.grid_images=0",
        "checkpoint.enabled=false",  # a probe: no checkpoint on the disk, not even at the end
        "run.log_interval=1000",
        "data.num_workers=1",
        "model.num_buffer_tokens=64",
    ]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    result = subprocess.run(
        [*launcher, "-m", "far_scale.cli", "train", str(RECIPE).format(arch=arch), *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise TrialFailed.of(name, result)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    measured = rows[len(rows) // 3 :]  # skip warm-up steps
    step_s = statistics.median(r["step_time_s"] for r in measured)
    data_share = statistics.median(r["data_s"] / r["step_time_s"] for r in measured)
    images = micro * nproc
    # Written by the trainer when the run ends: every rank's peak and what building the model added, beside
    # the run's own plan (check-config's estimates for exactly this run).
    memory = json.loads((out / name / "memory.json").read_text())
    return {
        "arch": arch,
        "size": size,
        "ranks": nproc,
        "zero": zero,
        "batch": images,
        "precision": precision if device != "cpu" and torch.cuda.is_available() else "fp32",
        "step_s": step_s,
        "images_per_s": images / step_s,
        "latents_per_s": images * 256 / step_s,
        "data_wait": data_share,
        "peak_gib": max(r["peak_gib"] for r in memory["ranks"]),
        "estimate_gib": memory["model_state_estimate_gib"],
        "build_gib": max(r["build_host_gib"] for r in memory["ranks"]),
        "build_estimate_gib": memory["construction_estimate_gib"],
    }


class TrialFailed(RuntimeError):
    """A training run of the benchmark that failed: why (``kind``: oom, no_space, other) and its log's tail."""

    def __init__(self, name: str, kind: str, tail: str):
        super().__init__(f"training {name} failed ({kind}):\n{tail}")
        self.kind, self.tail = kind, tail

    @classmethod
    def of(cls, name: str, result: subprocess.CompletedProcess) -> "TrialFailed":
        text = (result.stdout or "") + (result.stderr or "")
        kind = (
            "oom"
            if any(marker in text for marker in OOM_MARKERS)
            else "no_space"
            if any(marker in text for marker in NO_SPACE_MARKERS)
            else "other"
        )
        return cls(name, kind, text[-LOG_TAIL_CHARS:])


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with ``fits(n)``, fitting being monotone in n (doubling, then bisection);
    0 when not even 1 fits."""
    low, high, probe = 0, limit + 1, 1
    while probe < high:
        if not fits(probe):
            high = probe
            break
        low, probe = probe, probe * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fit_micro_batch(data: Path, out: Path, size: str, nproc: int, zero: int, limit: int, budget_gib: float) -> dict:
    """The largest micro batch per rank that trains ``FIT_STEPS`` steps without running out of GPU memory and
    with every rank's peak within ``budget_gib``."""
    peaks: dict[int, float] = {}

    def fits(micro: int) -> bool:
        free = shutil.disk_usage(out.parent if not out.exists() else out).free
        if free < MIN_FREE_BYTES:
            raise TrialFailed(f"{size} micro {micro}", "no_space", f"{free / GIB:.1f} GiB free before the trial")
        try:
            row = train(data, out, size, nproc, zero, micro, FIT_STEPS)
        except TrialFailed as exc:
            if exc.kind == "oom":
                print(f"{size} ZeRO-{zero} x{nproc}: micro batch {micro} runs out of memory", flush=True)
                return False
            raise
        peaks[micro] = row["peak_gib"]
        print(f"{size} ZeRO-{zero} x{nproc}: micro batch {micro} peaks at {row['peak_gib']:.2f} GiB", flush=True)
        return row["peak_gib"] <= budget_gib

    largest = largest_fitting(fits, limit)
    return {
        "size": size,
        "ranks": nproc,
        "zero": zero,
        "largest_micro": largest,
        "limit": limit,
        "budget_gib": budget_gib,
        "peak_gib": peaks.get(largest),
    }


def _gib(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "not measured"


def _throughput_entry(res: dict) -> list[str]:
    parts: list[str] = []
    m = res["machine"]
    parts += [
        f"### {m['name']} ({m['device']}, {m['cpu_count']} cores), 256 tokens x 16, "
        f"{res['runs'][0].get('precision', 'fp32')}",
        f"Date: {res['date']}. Command: `{res['command']}`",
        "",
        markdown_table(
            [
                "model",
                "size",
                "ranks",
                "ZeRO",
                "images/step",
                "step (s)",
                "images/s",
                "latents/s",
                "data wait",
                "peak memory, fullest rank (GiB)",
                "model-state estimate (GiB)",
                "model build added, host (GiB)",
                "build estimate (GiB)",
            ],
            [
                [
                    r.get("arch", "far").upper(),
                    r["size"],
                    r["ranks"],
                    r["zero"],
                    r["batch"],
                    f"{r['step_s']:.3f}",
                    f"{r['images_per_s']:.2f}",
                    f"{r['latents_per_s']:.0f}",
                    f"{100 * r['data_wait']:.1f}%",
                    _gib(r, "peak_gib"),
                    _gib(r, "estimate_gib"),
                    _gib(r, "build_gib"),
                    _gib(r, "build_estimate_gib"),
                ]
                for r in res["runs"]
            ],
        ),
        "",
        "Peak memory: the largest over the ranks (the run's memory.json) of the process's peak RSS on CPU "
        "(Python, libraries and activations included) or torch.cuda.max_memory_allocated on a GPU; its "
        "estimate counts model states only. Model build: how far building the model raised a rank's peak "
        "host memory (the largest over the ranks; ZeRO-3 builds it partitioned), beside check-config's "
        "fp32-weights estimate.",
        "",
        "",
        "Loader only (1 worker, batch 64):",
        "",
        markdown_table(["source", "latents/s"], res["loader"]),
        "",
    ]
    return parts


THROUGHPUT_SECTION = DocSection(BENCHMARK, "Training throughput (`benchmarks/train_throughput.py`)", _throughput_entry)


def loader_only(url: str, batches: int) -> float:
    loader = LatentLoader(url, rank=0, world_size=1, num_workers=1, batch_size=64, seed=0)
    iterator = loader.batches()
    next(iterator)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += next(iterator).latents.numel() // 16
    return count / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default="tiny:1:0:32,tiny:2:2:16,tiny:2:3:16,base:1:0:2,base:2:2:1,base:2:3:1",
        help="size:ranks:zero:micro_batch[:arch], comma-separated (arch far or mar; default far)",
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--images", type=int, default=1000, help="at least this many (raised so that no epoch ends in a run)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="bf16", help="on a GPU (CPU runs are fp32 whatever this says)"
    )
    parser.add_argument(
        "--step-only",
        action="store_true",
        help="forward+backward time of FAR vs MAR training steps (same backbone weights, no optimizer, no data)",
    )
    parser.add_argument("--sizes", default="tiny,mid", help="--step-only: model sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="--step-only: images per step")
    parser.add_argument("--repeats", type=int, default=3, help="--step-only: timed steps (median)")
    parser.add_argument("--seq-len", type=int, default=256, help="--step-only: tokens per image")
    parser.add_argument("--token-dim", type=int, default=16, help="--step-only: channels per token")
    parser.add_argument("--compile", action="store_true", help="--step-only: also time torch.compile'd models")
    parser.add_argument("--no-docs", action="store_true", help="do not write results into docs/")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument(
        "--fit",
        action="store_true",
        help="instead of throughput: the largest micro batch per rank (up to each config's micro "
        "batch) that trains without running out of memory and within --memory-budget-gib",
    )
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        help="peak memory allowed per rank for --fit (default on a GPU: the card's memory)",
    )
    args = parser.parse_args(argv)
    enable_tf32()
    if args.fit:
        fit_main(args, argv)
        return
    if args.step_only:
        step_main(args, argv)
        return
    configs = parse_configs(args.configs)
    tmp = Path(tempfile.mkdtemp(prefix="far-scale-train-bench-"))
    results, loader_rows = [], []
    moto = None
    try:
        data = build_data(tmp, images_needed(configs, args.steps, args.images))
        for c in configs:
            row = train(
                data,
                tmp / "runs",
                c["size"],
                c["ranks"],
                c["zero"],
                c["micro"],
                args.steps,
                c["arch"],
                args.device,
                args.precision,
            )
            results.append(row)
            print(results[-1], flush=True)
        loader_rows.append(["local disk", f"{loader_only(str(data), 30):.0f}"])
        if not args.no_s3:
            moto = LocalS3("bench", "bench")
            env = moto.env
            os.environ.update(env)
            import fsspec

            fs = fsspec.filesystem("s3")
            fs.mkdir("bench")
            fs.put(str(data), "bench/shards", recursive=True)
            loader_rows.append(["s3 (moto, 127.0.0.1)", f"{loader_only('s3://bench/shards', 30):.0f}"])
        print(loader_rows, flush=True)
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    result = {
        "machine": describe_machine(device),
        "runs": results,
        "loader": loader_rows,
        "command": command_line("train_throughput.py", argv),
    }
    if args.no_docs:
        return
    THROUGHPUT_SECTION.save(device_key(result["machine"]), result)


def enable_tf32() -> None:
    """What the trainer does on a GPU (``far_scale.distributed.runtime.configure_math``): TF32 matmuls."""
    from far_scale.distributed.runtime import configure_math

    configure_math(tf32=True)


def run_step_only(args, size: str, batch: int, device: torch.device) -> dict:
    """Forward + backward time of one training step, FAR and MAR on the same backbone weights (no optimizer):
    seconds, images/s, MFU against the card's peak (GPU), peak memory; eager, and compiled with ``--compile``."""
    data = DataSpec(seq_len=args.seq_len, token_dim=args.token_dim, num_classes=1000)
    mar, far, _ = build_pair(size, data, device)
    latents = torch.randn(batch, data.seq_len, data.token_dim, device=device)
    labels = torch.arange(batch, device=device) % data.num_classes
    bf16 = device.type == "cuda" and args.precision == "bf16"
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows, details = {}, {}
    for label, arch, model in (("FAR", "far", far), ("MAR", "mar", mar)):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        cfg = model_config(arch, size)
        flops = train_flops_per_image(cfg, resolve_dims(cfg), data, model.expected_mask_ratio)
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            if mode == "compiled":
                # What training compiles (parallel.compile): every block and the head's body, dynamic shapes (the
                # masked count changes every step); the whole model would trace the random orders, which fails.
                compile_model(model)
            forward = model

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = forward(latents, labels)["loss"]
                torch.autograd.grad(loss, params)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = median_seconds(step, device, args.repeats, warmup=2 if mode == "compiled" else 1)
            name = label if mode == "eager" else f"{label} compiled"
            rows[name] = seconds
            images_per_s = batch / seconds
            details[name] = {
                "images_per_s": images_per_s,
                "mfu": images_per_s * flops / peak if peak else None,
                "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
            }
            print(f"[{size} b{batch}] {name} train step: {seconds:.4f} s, {images_per_s:.1f} img/s", flush=True)
    return {
        "size": size,
        "batch": batch,
        "seq_len": data.seq_len,
        "precision": "bf16" if bf16 else "fp32",
        "seconds": rows,
        "details": details,
        "ratio": rows["FAR"] / rows["MAR"],
    }


def _throughput(detail) -> str:
    if not detail:
        return "-"
    mfu = f", {100 * detail['mfu']:.1f}%" if detail.get("mfu") else ""
    return f"{detail['images_per_s']:.1f}{mfu}"


def render_step_docs() -> None:
    parts = [
        "## Training step: FAR vs MAR (`benchmarks/train_throughput.py --step-only`)",
        "",
        "Forward and backward of one step (no optimizer), same backbone weights, one process "
        "(rows before 2026-12-02 were measured with `benchmarks/sampling_speed.py --train-step`, the same code).",
        "",
    ]
    results = load_results(STEP_BENCHMARK)
    if results:
        parts += [
            markdown_table(
                [
                    "size",
                    "batch",
                    "precision",
                    "machine",
                    "FAR step (s)",
                    "MAR step (s)",
                    "FAR / MAR",
                    "FAR images/s, MFU, peak (GPU)",
                    "date",
                    "command",
                ],
                [
                    [
                        r["size"],
                        r["batch"],
                        r.get("precision", "fp32"),
                        f"{r['machine']['name']} ({r['machine']['torch_threads']} threads)",
                        f"{r['seconds']['FAR']:.4f}",
                        f"{r['seconds']['MAR']:.4f}",
                        f"{r['ratio']:.2f}",
                        _throughput(r.get("details", {}).get("FAR")),
                        r["date"],
                        f"`{r['command']}`",
                    ]
                    for r in results
                ],
            ),
            "",
        ]
    write_doc_section(STEP_BENCHMARK, "\n".join(parts))


def step_main(args, argv) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    machine = describe_machine(device)
    for size in args.sizes.split(","):
        result = run_step_only(args, size, args.batch, device)
        result.update(machine=machine, command=command_line("train_throughput.py", argv))
        if not args.no_docs:
            save_result(STEP_BENCHMARK, f"{device_key(machine)}_{size}_b{args.batch}_{result['precision']}", result)
    if not args.no_docs:
        render_step_docs()


def _fit_entry(res: dict) -> list[str]:
    parts: list[str] = []
    precision = "bf16" if res["machine"]["device"] == "cuda" else "fp32"
    parts += result_heading("FAR", res, f"256 tokens x 16, {precision}")
    parts += [
        markdown_table(
            ["size", "ranks", "ZeRO", "largest micro batch", "searched up to", "peak at it (GiB)", "budget (GiB)"],
            [
                [
                    r["size"],
                    r["ranks"],
                    r["zero"],
                    r["largest_micro"],
                    r["limit"],
                    _gib(r, "peak_gib") if r["peak_gib"] is not None else "-",
                    f"{r['budget_gib']:.1f}",
                ]
                for r in res["rows"]
            ],
        ),
        "",
        f"Each trial trains {FIT_STEPS} steps; a trial fits when no rank runs out of memory and every "
        "rank's peak (memory.json) stays within the budget.",
        "",
    ]
    return parts


FIT_SECTION = DocSection(
    FIT_BENCHMARK, "Largest micro batch per rank (`benchmarks/train_throughput.py --fit`)", _fit_entry
)


def fit_main(args, argv) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.memory_budget_gib
    if budget is None:
        if device.type != "cuda":
            raise SystemExit("--fit on CPU needs --memory-budget-gib (the host has no card size to fill)")
        budget = torch.cuda.get_device_properties(device).total_memory / GIB
    tmp = Path(tempfile.mkdtemp(prefix="far-scale-fit-bench-"))
    try:
        data = build_data(tmp, args.images)
        rows = []
        for spec in args.configs.split(","):
            size, nproc, zero, limit = spec.split(":")
            rows.append(fit_micro_batch(data, tmp / "runs", size, int(nproc), int(zero), int(limit), budget))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.no_docs:
        return
    FIT_SECTION.save(
        device_key(describe_machine(device)),
        {"machine": describe_machine(device), "rows": rows, "command": command_line("train_throughput.py", argv)},
    )


if __name__ == "__main__":
    main()
