"""Exponential moving average of the weights, correct under ZeRO-3.

Under ZeRO-3 each rank owns a flat partition of every parameter (``param.ds_tensor``);
the EMA of the backbone is kept as the EMA of those partitions (sharded, fp32, no
gather per step). The head's EMA is kept whole on every rank, read from gathered
parameters each step, because the shortcut head's self-consistency targets run it.
Full tensors are assembled only to save, export or sample. An EMA may cover a subset of the weights
(``prefix``): the shortcut head's target network is an EMA of ``head.net.`` with a decay of its own.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn

from far_scale.distributed.engine import gathered, is_partitioned

REPLICATED_PREFIX = "head."


def _partition_of(full: torch.Tensor, param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of a full tensor, laid out as DeepSpeed partitions ``param`` (padded flat chunks)."""
    size = param.ds_tensor.numel()
    flat = torch.zeros(size * world_size, dtype=full.dtype, device=full.device)
    flat[: full.numel()] = full.reshape(-1)
    return flat[rank * size : (rank + 1) * size].clone()


def ramped_decay(decay: float, step: int, warmup_steps: int) -> float:
    """``decay`` after ``warmup_steps`` optimizer steps, ramped linearly from 0 before (0 steps: constant)."""
    if warmup_steps <= 0:
        return decay
    return decay * min(1.0, step / warmup_steps)


class EMA:
    def __init__(self, model: nn.Module, decay: float, *, prefix: str = "",
                 gather: Callable[[Iterable], ContextManager] = gathered):
        self.decay = decay
        self.gather = gather
        self.params = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.shadow: dict[str, torch.Tensor] = {}
        replicated = [p for n, p in self.params.items() if self._replicated(n, p)]
        with self.gather(replicated):
            for name, param in self.params.items():
                source = param.ds_tensor if not self._replicated(name, param) and is_partitioned(param) else param.data
                self.shadow[name] = source.detach().float().clone()

    @staticmethod
    def _replicated(name: str, param: torch.Tensor) -> bool:
        return not is_partitioned(param) or name.startswith(REPLICATED_PREFIX)

    def _sharded_names(self) -> list[str]:
        return [n for n, p in self.params.items() if not self._replicated(n, p)]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (``decay`` defaults to the EMA's own), in a few
        multi-tensor kernels instead of one per parameter."""
        weight = 1.0 - (self.decay if decay is None else decay)
        sharded = set(self._sharded_names())
        if sharded:
            names = sorted(sharded)
            torch._foreach_lerp_([self.shadow[n] for n in names],
                                 [self.params[n].ds_tensor.float() for n in names], weight)
        replicated = [n for n in self.params if n not in sharded]
        with self.gather([self.params[n] for n in replicated if is_partitioned(self.params[n])]):
            if replicated:
                torch._foreach_lerp_([self.shadow[n] for n in replicated],
                                     [self.params[n].data.float() for n in replicated], weight)

    def bind(self, module: nn.Module, prefix: str) -> nn.Module:
        """Make ``module`` (an unpartitioned copy, e.g. of the head taken before the engine was built)
        run on the EMA weights under ``prefix``; it follows every later ``update``."""
        for name, param in module.named_parameters():
            shadow = self.shadow[f"{prefix}{name}"]
            if shadow.shape != param.shape:
                raise ValueError(f"{prefix}{name}: EMA holds {tuple(shadow.shape)}, module {tuple(param.shape)}")
            param.requires_grad_(False)
            param.data = shadow
        return module

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on CPU (collective under ZeRO-3: every rank must call it)."""
        result = {}
        for name, param in self.params.items():
            shadow = self.shadow[name]
            if self._replicated(name, param):
                result[name] = shadow.detach().cpu().clone()
                continue
            parts = [torch.empty_like(shadow) for _ in range(self.world_size)]
            dist.all_gather(parts, shadow)
            result[name] = torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()
        return result

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``full_state_dict`` at any world size."""
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, param in self.params.items():
            full = state[name].to(self.shadow[name].device, torch.float32)
            if self._replicated(name, param):
                self.shadow[name].copy_(full.view_as(self.shadow[name]))
            else:
                self.shadow[name].copy_(_partition_of(full, param, self.rank, self.world_size))

