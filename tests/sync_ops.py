"""A dispatch-level trace of the ops that make the host wait for the device (shared by the sampler's and the
training step's no-sync tests): ``.item()``/``.tolist()`` (``_local_scalar_dense``), data-dependent shapes,
boolean indexing. Each record keeps whether DeepSpeed's own code issued it."""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEEPSPEED_FRAME = "/deepspeed/"


class SyncOps(TorchDispatchMode):
    """Records every op that makes the host wait for the device or has a data-dependent output shape."""

    SYNCING = {
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.is_nonzero.default",
        "aten.equal.default",
        "aten.unique_consecutive.default",
    }

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.by_deepspeed: list[str] = []
        """The subset of ``found`` issued from DeepSpeed's own code (its collectives and checks)."""
        self.where: list[str] = []
        """For each of ``found``: the innermost far_scale frame that led to it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        )
        if name in self.SYNCING or boolean_index:
            self.found.append(name)
            stack = traceback.extract_stack()
            if any(DEEPSPEED_FRAME in frame.filename for frame in stack):
                self.by_deepspeed.append(name)
            ours = [f for f in stack if "/far_scale/" in f.filename]
            self.where.append(f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?")
        return func(*args, **(kwargs or {}))
