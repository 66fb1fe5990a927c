"""Sampling eager, compiled and as CUDA graphs (``sampling_speed.py --graphs``; ``eval.compile``).

The fastest settings at matched quality (FAR O=4, MAR 100 tuned DDPM steps, FAR-Causal O=8 with the static KV
cache), each in every mode of ``--graph-modes``: ``eager``, ``default`` (torch.compile of the blocks and the
head's body) and ``cudagraphs`` (the same, replayed as CUDA graphs; CUDA only). Every mode builds the models
afresh from the same seed (so the same weights) and compiles them in place; the first generation (compilation,
CUDA-graph recording) is timed apart from the median of the repeats.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from benchmarks.bench_models import build_pair, speed_record
from benchmarks.report import (
    DocSection,
    markdown_table,
    median_seconds,
    result_heading,
)
from benchmarks.techniques import FAR_TECHNIQUES, MAR_TECHNIQUES
from far_scale.data.spec import DataSpec
from far_scale.models.compile import compile_for_sampling
from far_scale.models.generation import SamplingOptions, generate

BENCHMARK = "sampling_graphs"
FAR_SETTING = next(t for t in FAR_TECHNIQUES if t.name == "FAR O=4")
MAR_SETTING = next(t for t in MAR_TECHNIQUES if t.name == "MAR 100 steps (tuned)")
CAUSAL_SETTING = "FAR-Causal O=8 (static KV cache)"
CAUSAL_HEAD_STEPS = 8


def default_modes(device: torch.device) -> list[str]:
    return ["eager", "default", "cudagraphs"] if device.type == "cuda" else ["eager", "default"]


MODELS = ("MAR", "FAR", "FAR-Causal")  # build_pair's order


def _settings(args, k: int) -> list[tuple[str, str, SamplingOptions]]:
    """(name, model, options) of each setting measured."""
    return [
        (FAR_SETTING.name, "FAR", FAR_SETTING.sampling_options(k, args.cfg)),
        (MAR_SETTING.name, "MAR", MAR_SETTING.sampling_options(k, args.cfg)),
        (
            CAUSAL_SETTING,
            "FAR-Causal",
            SamplingOptions(head_steps=CAUSAL_HEAD_STEPS, cfg_scale=args.cfg, static_kv_cache=True),
        ),
    ]


def cudagraph_skips() -> int:
    """How often torch.compile's CUDA-graph trees fell back to eager in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def run_graphs(args, size: str, batch: int, device: torch.device) -> dict:
    data = DataSpec(seq_len=args.seq_len, token_dim=args.token_dim, num_classes=1000)
    labels = torch.arange(batch, device=device) % data.num_classes
    bf16 = device.type == "cuda" and args.dtype == "bf16"
    modes = args.graph_modes or default_modes(device)
    rows = []
    for mode in modes:
        torch.manual_seed(0)  # every mode samples with the same weights
        models = dict(zip(MODELS, build_pair(size, data, device)))
        # Compiled in place; the replays are what CUDA-graph sampling needs (None otherwise).
        replays = {
            name: None if mode == "eager" else compile_for_sampling(m, mode, device) for name, m in models.items()
        }
        for k in args.num_iter:
            for name, model, options in _settings(args, k):
                if name == CAUSAL_SETTING and k != args.num_iter[0]:
                    continue  # one token per step whatever K is

                def run(model=models[model], replay=replays[model], options=options):
                    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
                        generate(model, labels, options, torch.Generator(device=device).manual_seed(0), replay)

                skips_before = cudagraph_skips()
                first = median_seconds(run, device, 1, warmup=0)  # compiles and records on first use
                seconds = median_seconds(run, device, args.repeats, warmup=1)
                skips = cudagraph_skips() - skips_before
                row = {
                    "setting": name,
                    "mode": mode,
                    "K": None if name == CAUSAL_SETTING else k,
                    "first_s": first,
                    "seconds": seconds,
                    "images_per_s": batch / seconds,
                    "cudagraph_skips": skips,
                }
                if mode == "cudagraphs" and skips:
                    # Some recordings fell back to eager: the number would not be CUDA-graph speed. Refused.
                    row.update(refused=f"{skips} graph(s) fell back to eager (cudagraph_skips)", images_per_s=None)
                    print(f"[{size} b{batch} {mode}] {name}: REFUSED: {row['refused']}", flush=True)
                rows.append(row)
                if "refused" not in row:
                    print(
                        f"[{size} b{batch} {mode}] {name}{'' if row['K'] is None else f' K={k}'}: "
                        f"{batch / seconds:.2f} img/s (first {first:.1f} s)",
                        flush=True,
                    )
    eager = {(r["setting"], r["K"]): r["seconds"] for r in rows if r["mode"] == "eager"}
    for row in rows:
        reference = eager.get((row["setting"], row["K"]))
        row["vs_eager"] = reference / row["seconds"] if reference and "refused" not in row else float("nan")
    return speed_record(size, batch, data, bf16, rows)


def _entry(result: dict) -> list[str]:
    return [
        *result_heading(
            result["size"], result, f"{result['dtype']}, batch {result['batch']}, {result['seq_len']} tokens"
        ),
        markdown_table(
            ["setting", "K", "mode", "first (s)", "s / batch", "images/s", "vs eager"],
            [
                [
                    r["setting"],
                    "-" if r["K"] is None else r["K"],
                    r["mode"],
                    f"{r['first_s']:.1f}",
                    f"{r['seconds']:.3f}",
                    f"refused: {r['refused']}" if r.get("refused") else f"{r['images_per_s']:.2f}",
                    f"{r['vs_eager']:.2f}x",
                ]
                for r in result["rows"]
            ],
        ),
        "",
    ]


SECTION = DocSection(
    BENCHMARK,
    "Sampling eager, compiled and as CUDA graphs (`benchmarks/sampling_speed.py --graphs`)",
    _entry,
    (
        "Tokens only, random weights (FAR and MAR share the backbone's), one process; `default` is "
        "`eval.compile=default` (torch.compile of the blocks and the head's body), `cudagraphs` the same "
        "replayed as CUDA graphs. *first* is the first generation (compilation and recording included).",
    ),
)
