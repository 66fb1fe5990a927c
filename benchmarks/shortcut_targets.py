"""Where the shortcut head's self-consistency targets come from, decided on the offline benchmark.

Trains the tiny FAR recipe for the same budget with each target network (live weights, a target EMA
of its own at several decays, with and without a decay warm-up, guidance distillation) on the data and
offline benchmark of ``quality_speed.py`` (its work directory is reused), then samples every run at
O in {1, 2, 4, 8} and scores it. An EMA's lag is about 1 / (1 - decay) steps: what matters is that lag
relative to how fast the head moves, so each row also states the lag as a share of the run.
Writes benchmarks/results/shortcut_targets__*.json and a section of docs/benchmarks.md.
Run ``python -m benchmarks.shortcut_targets --help``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.experiment import (
    Budget,
    Workspace,
    add_training_arguments,
    data_label,
    load_generator,
    recipe_for,
    score,
    train,
)
from benchmarks.report import (
    DocSection,
    command_line,
    describe_machine,
    markdown_table,
    result_heading,
    save_result,
)

BENCHMARK = "shortcut_targets"
DISTILLED_CFG = 2.0
VARIANTS = {
    "live": ["model.head.consistency_target=live"],
    "ema 0.9": ["model.head.consistency_target=ema", "model.head.target_ema_decay=0.9"],
    "ema 0.99": ["model.head.consistency_target=ema", "model.head.target_ema_decay=0.99"],
    "ema 0.99 + warm-up 100": [
        "model.head.consistency_target=ema",
        "model.head.target_ema_decay=0.99",
        "model.head.target_ema_warmup_steps=100",
    ],
    "ema 0.999 + warm-up 300": [
        "model.head.consistency_target=ema",
        "model.head.target_ema_decay=0.999",
        "model.head.target_ema_warmup_steps=300",
    ],
    f"live + guidance distilled w={DISTILLED_CFG:g}": [
        "model.head.consistency_target=live",
        f"model.head.guidance_distillation_scale={DISTILLED_CFG}",
    ],
}


def decay_of(overrides: list[str]) -> float | None:
    for item in overrides:
        if item.startswith("model.head.target_ema_decay="):
            return float(item.split("=", 1)[1])
    return None


def evaluate(run_dir: Path, bench, args, distilled: bool) -> list[dict]:
    generator = load_generator(run_dir)
    rows = []
    # A distilled head learned the guided flow at its coarse levels: sampled without CFG there, and also with
    # sampling-time CFG for comparison.
    cfgs = [1.0, args.cfg] if distilled else [args.cfg]
    for cfg in cfgs:
        for steps in args.head_steps:
            options = replace(generator.options, num_iter=args.num_iter, head_steps=steps, cfg_scale=cfg)
            metrics = score(generator, bench, options, [0], args.num_images, args.batch)
            rows.append({"O": steps, "cfg": cfg, **metrics})
            print(f"  O={steps} CFG {cfg:g}: accuracy {metrics['accuracy']:.3f}, FD {metrics['fd']:.2f}", flush=True)
    return rows


def _entry(result: dict) -> list[str]:
    parts: list[str] = []
    parts += result_heading(
        f"tiny FAR on {data_label(result)}, {result['steps']} steps each,",
        result,
        f"K={result['num_iter']}, {result['num_images']} images per point",
    )
    parts += [
        markdown_table(
            [
                "targets",
                "EMA lag (steps, share of run)",
                "CFG at sampling",
                "O",
                "class accuracy",
                "Fréchet distance",
            ],
            [
                [v["name"], v["lag"], r["cfg"], r["O"], f"{r['accuracy']:.3f}", f"{r['fd']:.2f}"]
                for v in result["variants"]
                for r in v["rows"]
            ],
        ),
        "",
    ]
    return parts


SECTION = DocSection(
    BENCHMARK,
    "Self-consistency targets (`benchmarks/shortcut_targets.py`)",
    _entry,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    add_training_arguments(parser, work="runs/bench-quality", steps=600, eval_interval=600)
    parser.set_defaults(num_images=500)
    parser.add_argument("--num-iter", type=int, default=16, help="K of every point")
    parser.add_argument("--head-steps", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace.prepare(args.work, args.data, args.images_per_class)
    result = {
        "machine": describe_machine(torch.device("cpu")),
        "steps": args.steps,
        "num_iter": args.num_iter,
        "num_images": args.num_images,
        "variants": [],
        "data": args.data,
        "command": command_line("shortcut_targets.py", argv),
    }
    args.eval_interval = max(args.eval_interval, args.steps)
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        slug = "targets-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
        print(f"{name}: training {slug}", flush=True)
        trained = train(ws, recipe_for("far", args.data), slug, Budget.from_args(args), overrides)
        run_dir, seconds = trained.run_dir, trained.seconds
        decay = decay_of(overrides)
        lag = "0 (live)" if decay is None else f"{1 / (1 - decay):.0f}, {100 / (1 - decay) / args.steps:.0f}%"
        rows = evaluate(run_dir, ws.bench, args, distilled="guidance_distillation_scale" in " ".join(overrides))
        result["variants"].append(
            {"name": name, "overrides": overrides, "lag": lag, "train_seconds": seconds, "rows": rows}
        )
    if not args.no_docs:
        key = f"cpu_tiny_{args.steps}steps" if args.data == "synth" else f"cpu_tiny_{args.data}_{args.steps}steps"
        save_result(BENCHMARK, key, result)
        SECTION.render()
        print("results: docs/benchmarks.md")


if __name__ == "__main__":
    main()
