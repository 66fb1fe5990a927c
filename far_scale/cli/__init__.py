"""``far-scale <command>``: parse arguments, call the library, report errors. No logic of its own.

One module per command group, each with its parsers beside its handlers: ``data``, ``train`` (check-config,
train, export, launch), ``evaluate`` (sample, eval), ``compare``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from far_scale.cli import compare, data, evaluate, train
from far_scale.cli.common import Handler
from far_scale.codecs.base import CodecError
from far_scale.config.loader import ConfigError
from far_scale.data.manifest import ManifestError
from far_scale.errors import ActionableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="far-scale",
        description="Train FAR / FAR-Causal / MAR image generators over continuous VAE latents.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order of `far-scale --help`.
    train.add_check_config(commands)
    data.add_commands(commands)
    train.add_train_and_export(commands)
    evaluate.add_sample(commands)
    evaluate.add_commands(commands)
    compare.add_commands(commands)
    train.add_launch_commands(commands)
    return parser


def parse_command(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """A command line as ``far-scale`` reads it (argparse's exit on a bad one)."""
    parser = build_parser()
    # Overrides may come after options (`check-config R --world-size 8 optim.lr=1e-4`):
    # argparse stops filling a positional list at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    passthrough = getattr(args, "passthrough", None)
    if passthrough:
        setattr(args, passthrough, extra)
    else:
        unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_command(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ActionableError, CodecError, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
