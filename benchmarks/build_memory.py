"""Memory of building a model: whole on every rank (ZeRO-0/1/2) vs partitioned over the ranks (ZeRO-3, zero.Init).

Each rank (2 on CPU; one per GPU on a GPU machine) builds every model (FAR beside MAR at each size) twice with
the same seed, whole and partitioned, and reports how far each build raised its resident set (the kernel's high-water mark, reset before each build; glibc's mmap threshold
fixed so that freed tensors leave the resident set and the number counts live memory) and, on a GPU, its
allocated GPU memory, beside check-config's estimate (``estimate_construction_memory``).
Results: benchmarks/results/build_memory__*.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.report import (
    command_line,
    describe_machine,
    load_results,
    markdown_table,
    result_heading,
    save_result,
    write_doc_section,
)
from far_scale.config.schema import ModelConfig, ParallelConfig
from far_scale.data.spec import DataSpec
from far_scale.distributed import engine as ds
from far_scale.distributed.deepspeed_config import (
    build_deepspeed_config,
    estimate_construction_memory,
)
from far_scale.distributed.runtime import free_port, init_distributed
from far_scale.models.model import largest_layer_parameters
from far_scale.planning.builder import build_meta_model, build_model
from far_scale.train.memory import GIB, host_peak_of, peak_growth, set_mmap_threshold

BENCHMARK = "build_memory"
DATA = DataSpec(seq_len=256, token_dim=16, num_classes=1000)  # ImageNet 256 through KL-16
MMAP_THRESHOLD_BYTES = 64 * 1024
MICRO_BATCH = 1


def _measure(build, device: torch.device) -> dict:
    with peak_growth(device) as growth:
        model, host = host_peak_of(build)
    del model
    return {"host_gib": host / GIB, "device_gib": None if growth.device_bytes is None else growth.device_bytes / GIB}


def _model_config(spec: str) -> ModelConfig:
    arch, size = spec.split(":")
    return ModelConfig(arch=arch, size=size)


def _worker(rank: int, world_size: int, port: int, models: list[str], out_dir: str) -> None:
    set_mmap_threshold(MMAP_THRESHOLD_BYTES)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    env = init_distributed("auto")
    precision = "bf16" if env.device.type == "cuda" else "fp32"
    par = ParallelConfig(
        zero_stage=3,
        precision=precision,
        global_batch_size=MICRO_BATCH * world_size,
        micro_batch_size_per_gpu=MICRO_BATCH,
    )
    ds_config = build_deepspeed_config(par, 1.0, MICRO_BATCH, grad_accum_steps=1, precision=precision)
    ds.configure_deepspeed(env.device)
    try:
        rows = []
        # A first small build so that one-time set-up (DeepSpeed's communicator, zero.Init) is not measured.
        ds.build_partitioned(lambda: build_model(ModelConfig(arch="far", size="tiny"), DATA), ds_config, env.device)
        for spec in models:
            cfg = _model_config(spec)
            torch.manual_seed(0)
            whole = _measure(lambda: build_model(cfg, DATA), env.device)
            torch.manual_seed(0)
            partitioned = _measure(
                lambda: ds.build_partitioned(lambda: build_model(cfg, DATA), ds_config, env.device), env.device
            )
            rows.append({"model": spec, "whole": whole, "partitioned": partitioned})
            dist.barrier()
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _estimates(spec: str, world_size: int) -> dict:
    meta = build_meta_model(_model_config(spec), DATA)
    total, layer = sum(p.numel() for p in meta.parameters()), largest_layer_parameters(meta)
    return {
        "parameters": total,
        "whole_estimate_gib": estimate_construction_memory(total, layer, 0, world_size) / GIB,
        "partitioned_estimate_gib": estimate_construction_memory(total, layer, 3, world_size) / GIB,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default="far:base,mar:base,far:large,mar:large",
        help="arch:size, comma-separated (FAR beside MAR: same backbone, another head)",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=torch.cuda.device_count() or 2,
        help="ranks to partition over (default: one per GPU, else 2 CPU ranks)",
    )
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.ranks, free_port(), models, out), nprocs=args.ranks, join=True)
        per_rank = [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(args.ranks)]
    rows = []
    for index, spec in enumerate(models):
        ranks = [ranked[index] for ranked in per_rank]
        device_gib = [r["partitioned"]["device_gib"] for r in ranks]
        rows.append(
            {
                "model": spec,
                **_estimates(spec, args.ranks),
                "whole_host_gib": max(r["whole"]["host_gib"] for r in ranks),
                "partitioned_host_gib": max(r["partitioned"]["host_gib"] for r in ranks),
                "partitioned_device_gib": None if None in device_gib else max(device_gib),
            }
        )
        print(rows[-1], flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.no_docs:
        return
    save_result(
        BENCHMARK,
        device.type,
        {
            "machine": describe_machine(device),
            "rows": rows,
            "ranks": args.ranks,
            "command": command_line("build_memory.py", argv),
        },
    )
    parts = ["## Memory of building the model (`benchmarks/build_memory.py`)", ""]
    for res in load_results(BENCHMARK):
        parts += result_heading(f"{res['ranks']} ranks", res, "ImageNet-256 shapes, fp32 weights while building")
        parts += [
            markdown_table(
                [
                    "model",
                    "parameters",
                    "whole: host (GiB)",
                    "estimate",
                    "partitioned: host (GiB)",
                    "partitioned: GPU (GiB)",
                    "estimate",
                ],
                [
                    [
                        r["model"],
                        f"{r['parameters'] / 1e6:.0f}M",
                        f"{r['whole_host_gib']:.2f}",
                        f"{r['whole_estimate_gib']:.2f}",
                        f"{r['partitioned_host_gib']:.2f}",
                        "-" if r["partitioned_device_gib"] is None else f"{r['partitioned_device_gib']:.2f}",
                        f"{r['partitioned_estimate_gib']:.2f}",
                    ]
                    for r in res["rows"]
                ],
            ),
            "",
            "The largest over the ranks of how far one build raised a rank's memory. Whole: every rank builds the "
            "fp32 model (ZeRO-0/1/2). Partitioned: ZeRO-3's zero.Init; the estimate is the rank's share plus the "
            "largest layer; gathering and initialising that layer briefly takes about two more copies of it.",
            "",
        ]
    write_doc_section(BENCHMARK, "\n".join(parts))


if __name__ == "__main__":
    main()
