"""``far-scale launch local``: the same run on one machine, N processes under torchrun."""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

from far_scale.config.loader import load_config
from far_scale.config.plan import validate


def torchrun_command(recipe: str, overrides: Sequence[str], nproc: int) -> list[str]:
    # --standalone: a local c10d rendezvous on a free port, no MASTER_ADDR/PORT to pick.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "far_scale.cli", "train", recipe, *overrides]


def launch_local(recipe: str, overrides: Sequence[str], nproc: int) -> int:
    """Validate for ``nproc`` ranks, then run torchrun; returns its exit code."""
    validate(load_config(recipe, overrides), nproc)
    return subprocess.call(torchrun_command(recipe, overrides, nproc))
