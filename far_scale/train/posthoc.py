"""The power-function EMAs of a run (post-hoc EMA, ``far_scale.posthoc_ema``): tracked sharded over the ranks like
the evaluation EMA, snapshotted every ``ema.posthoc.snapshot_interval_steps`` and saved whole with each checkpoint
(so a resume, at any world size, continues them exactly)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from far_scale.config.schema import PosthocEMAConfig
from far_scale.posthoc_ema import power_decay, sigma_rel_to_gamma, snapshot_metadata, snapshot_tensors
from far_scale.train.ema import EMA


class PosthocEMAs:
    def __init__(self, module: nn.Module, cfg: PosthocEMAConfig):
        self.cfg = cfg
        self.gammas = [sigma_rel_to_gamma(s) for s in cfg.sigma_rels]
        self.emas = [EMA(module, 0.0) for _ in cfg.sigma_rels]

    @classmethod
    def build(cls, module: nn.Module, cfg: PosthocEMAConfig) -> Optional["PosthocEMAs"]:
        return cls(module, cfg) if cfg.enabled else None

    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): each EMA with its power-function beta."""
        for ema, gamma in zip(self.emas, self.gammas):
            ema.update(decay=power_decay(step, gamma))

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.snapshot_interval_steps == 0 or step == total_steps

    def num_bytes(self) -> int:
        return sum(ema.num_bytes() for ema in self.emas)

    def full_states(self) -> list[dict]:
        """Whole fp32 weights of every tracked EMA (collective under sharding: every rank calls it)."""
        return [ema.full_state_dict() for ema in self.emas]

    def snapshot(self, step: int) -> tuple[dict, dict]:
        """(tensors, metadata) of the snapshot at ``step`` in ``ema.posthoc.snapshot_dtype`` (collective)."""
        return snapshot_tensors(self.full_states(), self.cfg.snapshot_dtype), snapshot_metadata(
            step, self.cfg.sigma_rels
        )

    def checkpoint_state(self) -> dict:
        """fp32, for the checkpoint sidecar (collective)."""
        return snapshot_tensors(self.full_states(), "fp32")

    def load_checkpoint_state(self, tensors: dict) -> None:
        for index, ema in enumerate(self.emas):
            prefix = f"{index}/"
            ema.load_full_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
