"""Does it matter that under bf16 the evaluation EMA averages the bf16 module weights, not the fp32 master?

DeepSpeed's bf16 engines keep fp32 master weights in the optimizer and bf16 copies in the module; far-scale's
EMA reads the module. This simulates training trajectories with Adam-like per-step updates (step size
``lr`` times a unit-variance direction that stays correlated over ``--correlation-steps`` steps), keeps
the fp32 master, and compares after ``--time-constants`` EMA time constants:

- EMA(fp32 master) vs EMA(bf16 copy): the error the bf16 read introduces into the EMA;
- bf16(EMA(fp32 master)) vs EMA(fp32 master): the rounding every bf16 sampler applies to the weights anyway.

If the first stays below the second, averaging the bf16 copy changes the EMA by less than casting it for
bf16 sampling does. Writes benchmarks/results/ema_precision__*.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.report import (
    DocSection,
    command_line,
    describe_machine,
    markdown_table,
    save_result,
)

BENCHMARK = "ema_precision"
INIT_STD = 0.02  # the backbone's embedding init; Xavier weights of width 768-1280 are of the same order


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def simulate(lr: float, decay: float, steps: int, num_params: int, correlation_steps: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    master = torch.randn(num_params, generator=gen) * INIT_STD
    # Both start from the same fp32 weights: the difference measured is the updates' alone.
    ema_master, ema_bf16 = master.clone(), master.clone()
    direction = torch.randn(num_params, generator=gen)
    mix = 1.0 / correlation_steps
    weight = 1.0 - decay
    for _ in range(steps):
        direction = (1 - mix) * direction + mix**0.5 * torch.randn(num_params, generator=gen)
        master -= lr * direction
        ema_master.lerp_(master, weight)
        ema_bf16.lerp_(master.bfloat16().float(), weight)
    return {
        "lr": lr,
        "decay": decay,
        "steps": steps,
        "ema_of_bf16_vs_ema_of_fp32": relative(ema_bf16, ema_master),
        "bf16_cast_of_ema": relative(ema_master.bfloat16().float(), ema_master),
        "quantum_over_step": float(ema_master.abs().mean() * 2**-8 / lr),
    }


def _entry(result: dict) -> list[str]:
    parts: list[str] = []
    parts += [
        f"Date: {result['date']}. Machine: {result['machine']['name']}. Command: `{result['command']}`",
        "",
        markdown_table(
            [
                "lr (per-step move)",
                "EMA decay",
                "steps",
                "bf16 quantum / step",
                "EMA(bf16 copy) vs EMA(fp32)",
                "bf16 cast of EMA(fp32)",
            ],
            [
                [
                    r["lr"],
                    r["decay"],
                    r["steps"],
                    f"{r['quantum_over_step']:.2f}",
                    f"{r['ema_of_bf16_vs_ema_of_fp32']:.2e}",
                    f"{r['bf16_cast_of_ema']:.2e}",
                ]
                for r in result["rows"]
            ],
        ),
        "",
    ]
    return parts


SECTION = DocSection(
    BENCHMARK,
    "EMA of bf16 module weights vs of the fp32 master (`benchmarks/ema_precision.py`)",
    _entry,
    (
        "Simulated trajectories (see the script's docstring); relative L2 errors of the EMA after the given steps. `bf16 quantum / step` > 1 means a weight moves by less than one bf16 step per update.",
    ),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default="1e-4,1e-5,1e-6", help="per-step moves (Adam's step ~ lr)")
    parser.add_argument("--decays", default="0.999,0.9999")
    parser.add_argument(
        "--time-constants",
        type=float,
        default=5.0,
        help="steps = this x 1 / (1 - decay): the initial weights' share is e^-this",
    )
    parser.add_argument("--num-params", type=int, default=100_000)
    parser.add_argument("--correlation-steps", type=int, default=100)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for decay in (float(v) for v in args.decays.split(",")):
            steps = round(args.time_constants / (1 - decay))
            row = simulate(lr, decay, steps, args.num_params, args.correlation_steps, seed=0)
            rows.append(row)
            print(row, flush=True)
    if not args.no_docs:
        save_result(
            BENCHMARK,
            "sim",
            {
                "rows": rows,
                "machine": describe_machine(torch.device("cpu")),
                "command": command_line("ema_precision.py", argv),
            },
        )
        SECTION.render()


if __name__ == "__main__":
    main()
