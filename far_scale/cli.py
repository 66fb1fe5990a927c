"""``far-scale <command>``: parse arguments, call the library, report errors. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from far_scale.config.loader import ConfigError

Handler = Callable[[argparse.Namespace], int]


def _check_config(args: argparse.Namespace) -> int:
    from far_scale.config.loader import load_config
    from far_scale.config.report import render_report
    from far_scale.data.spec import resolve_data_spec

    cfg = load_config(args.recipe, args.overrides)
    data, source = resolve_data_spec(cfg)
    print(render_report(cfg, args.world_size, data, source, precision=args.precision))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="far-scale",
        description="Train FAR / FAR-Causal / MAR image generators over continuous VAE latents.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-config",
        help="validate a recipe without a GPU and print every derived value",
        description="Validate RECIPE (+ overrides) for a world size and print the resolved YAML, derived "
        "values, parameter counts, model-state memory per GPU and the generated DeepSpeed config.",
    )
    check.add_argument("recipe", help="recipe YAML (see recipes/)")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4")
    check.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs) in the run")
    check.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                       help="override parallel.precision for the memory estimate and DeepSpeed config")
    check.set_defaults(handler=_check_config)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`check-config R --world-size 8 optim.lr=1e-4`):
    # argparse stops filling a positional list at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
