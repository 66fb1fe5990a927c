"""``far-scale launch local`` / ``local-sample``: training or sampling on one machine, N processes under torchrun."""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

from far_scale.config.loader import load_config
from far_scale.planning.checks import validate


def torchrun_command(command: str, arguments: Sequence[str], nproc: int) -> list[str]:
    """``far-scale COMMAND ARGUMENTS`` on ``nproc`` local ranks."""
    # --standalone: a local c10d rendezvous on a free port, no MASTER_ADDR/PORT to pick.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "far_scale.cli",
        command,
        *arguments,
    ]


def launch_local(recipe: str, overrides: Sequence[str], nproc: int) -> int:
    """Validate for ``nproc`` ranks, then run torchrun; returns its exit code."""
    validate(load_config(recipe, overrides), nproc)
    return subprocess.call(torchrun_command("train", [recipe, *overrides], nproc))


def launch_local_sample(arguments: Sequence[str], nproc: int) -> int:
    """``far-scale sample ARGUMENTS`` with its batches split over ``nproc`` local ranks."""
    return subprocess.call(torchrun_command("sample", arguments, nproc))
