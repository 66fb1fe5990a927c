"""Exponential moving average of the weights, sharded over the data-parallel ranks at every ZeRO stage.

Each rank keeps and updates only its share of the fp32 EMA:

- a ZeRO-3 parameter (``param.ds_tensor``): the EMA of this rank's partition, no gather per step;
- a parameter every rank holds whole (ZeRO-0/1/2): the EMA of this rank's flat slice of it
  (``ceil(numel / world)`` elements, the last slice padded);
- parameters under ``whole_prefix`` are kept whole on every rank instead (gathered from ZeRO-3
  partitions each step), because a network runs on them: the shortcut head's target network.

Full tensors are assembled (collectively) only to save, export or sample. An EMA may cover a subset of
the weights (``prefix``): the target network is an EMA of ``head.net.`` with a decay of its own.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable, ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from far_scale.distributed.engine import gathered, is_partitioned


class Layout(Enum):
    PARTITION = "partition"  # this rank's ZeRO-3 partition
    SLICE = "slice"  # this rank's flat slice of a replicated parameter
    WHOLE = "whole"  # the full tensor on every rank


def ramped_decay(decay: float, step: int, warmup_steps: int) -> float:
    """``decay`` after ``warmup_steps`` optimizer steps, ramped linearly from 0 before (0 steps: constant)."""
    if warmup_steps <= 0:
        return decay
    return decay * min(1.0, step / warmup_steps)


def _partition_of(full: torch.Tensor, param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of a full tensor, laid out as DeepSpeed partitions ``param`` (padded flat chunks)."""
    size = param.ds_tensor.numel()
    flat = torch.zeros(size * world_size, dtype=full.dtype, device=full.device)
    flat[: full.numel()] = full.reshape(-1)
    return flat[rank * size : (rank + 1) * size].clone()


class EMA:
    def __init__(
        self,
        model: nn.Module,
        decay: float,
        *,
        prefix: str = "",
        whole_prefix: Optional[str] = None,
        gather: Callable[[Iterable], ContextManager] = gathered,
    ):
        self.decay = decay
        self.gather = gather
        self.params = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.layout = {name: self._layout_of(name, param, whole_prefix) for name, param in self.params.items()}
        self.shadow: dict[str, torch.Tensor] = {}
        with self.gather(self._gathered_each_step()):
            for name, param in self.params.items():
                self.shadow[name] = self._own_share(name, param).detach().float().clone()

    def _layout_of(self, name: str, param: torch.Tensor, whole_prefix: Optional[str]) -> Layout:
        if whole_prefix is not None and name.startswith(whole_prefix):
            return Layout.WHOLE
        if is_partitioned(param):
            return Layout.PARTITION
        return Layout.SLICE if self.world_size > 1 else Layout.WHOLE

    def _slice_bounds(self, numel: int) -> tuple[int, int, int]:
        """(start, valid length, padded length) of this rank's flat slice of a ``numel``-element tensor."""
        padded = math.ceil(numel / self.world_size)
        start = min(self.rank * padded, numel)
        return start, min(padded, numel - start), padded

    def _gathered_each_step(self) -> list[torch.Tensor]:
        return [p for n, p in self.params.items() if self.layout[n] is Layout.WHOLE and is_partitioned(p)]

    def _own_share(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """This rank's part of the live weights, shaped like its shadow (padding zero-filled)."""
        layout = self.layout[name]
        if layout is Layout.PARTITION:
            return param.ds_tensor
        if layout is Layout.WHOLE:
            return param.data
        start, valid, padded = self._slice_bounds(param.numel())
        share = torch.zeros(padded, dtype=param.dtype, device=param.device)
        share[:valid] = param.data.reshape(-1)[start : start + valid]
        return share

    def _own_source(self, name: str, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shadow view, live weights view) to average: the valid part of a slice, else the whole shadow."""
        if self.layout[name] is not Layout.SLICE:
            source = param.ds_tensor if self.layout[name] is Layout.PARTITION else param.data
            return self.shadow[name], source.float()
        start, valid, _ = self._slice_bounds(param.numel())
        return self.shadow[name][:valid], param.data.reshape(-1)[start : start + valid].float()

    def num_bytes(self) -> int:
        """Bytes of EMA tensors this rank holds."""
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    def full_num_bytes(self) -> int:
        """Bytes of the whole EMA (what one rank would hold unsharded)."""
        return sum(self._full_numel(p) * 4 for p in self.params.values())

    @staticmethod
    def _full_numel(param: torch.Tensor) -> int:
        return param.ds_numel if is_partitioned(param) else param.numel()

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (``decay`` defaults to the EMA's own), in a few
        multi-tensor kernels instead of one per parameter."""
        weight = 1.0 - (self.decay if decay is None else decay)
        with self.gather(self._gathered_each_step()):
            pairs = [self._own_source(n, p) for n, p in self.params.items()]
            pairs = [(s, x) for s, x in pairs if s.numel()]
            if pairs:
                torch._foreach_lerp_([s for s, _ in pairs], [x for _, x in pairs], weight)

    def bind(self, module: nn.Module, prefix: str) -> nn.Module:
        """Make ``module`` (an unpartitioned copy, e.g. of the head taken before the engine was built)
        run on the EMA weights under ``prefix`` (kept whole: ``whole_prefix``); it follows every ``update``."""
        for name, param in module.named_parameters():
            key = f"{prefix}{name}"
            if self.layout[key] is not Layout.WHOLE:
                raise ValueError(
                    f"{key}: the EMA keeps only a share of it on this rank; build the EMA with "
                    f"whole_prefix={prefix!r} to run a network on it"
                )
            shadow = self.shadow[key]
            if shadow.shape != param.shape:
                raise ValueError(f"{key}: EMA holds {tuple(shadow.shape)}, module {tuple(param.shape)}")
            param.requires_grad_(False)
            param.data = shadow
        return module

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on CPU (collective when sharded: every rank must call it)."""
        result = {}
        for name, param in self.params.items():
            shadow = self.shadow[name]
            if self.layout[name] is Layout.WHOLE:
                result[name] = shadow.detach().cpu().clone()
                continue
            parts = [torch.empty_like(shadow) for _ in range(self.world_size)]
            dist.all_gather(parts, shadow)
            shape = param.ds_shape if is_partitioned(param) else param.shape
            result[name] = torch.cat(parts)[: self._full_numel(param)].view(shape).cpu()
        return result

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``full_state_dict`` at any world size."""
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, param in self.params.items():
            full = state[name].to(self.shadow[name].device, torch.float32)
            layout = self.layout[name]
            if layout is Layout.WHOLE:
                self.shadow[name].copy_(full.view_as(self.shadow[name]))
            elif layout is Layout.PARTITION:
                self.shadow[name].copy_(_partition_of(full, param, self.rank, self.world_size))
            else:
                start, valid, _ = self._slice_bounds(full.numel())
                self.shadow[name].zero_()
                self.shadow[name][:valid].copy_(full.reshape(-1)[start : start + valid])
