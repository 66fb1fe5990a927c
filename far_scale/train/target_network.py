"""The shortcut head's target network: what the self-consistency targets run on, and the EMA it follows.

``model.head.consistency_target`` chooses it: ``live`` (the training head itself, no copy), ``eval_ema`` (the
evaluation EMA's head weights) or ``ema`` (an EMA of the head's MLP with a decay of its own, warmed up over
``target_ema_warmup_steps``). A MAR (diffusion) head has no targets: ``live``, nothing is built.
The network is the head's MLP, unpartitioned even under ZeRO-3, built on the meta device and allocated
empty (no generator draws, no values copied): its weights are bound to the chosen EMA.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from far_scale.config.schema import ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.model import TARGET_NET_PREFIX
from far_scale.planning.builder import build_meta_model
from far_scale.train.ema import EMA, ramped_decay


def target_kind(model_cfg: ModelConfig, head_kind: str) -> str:
    """``live``, ``eval_ema`` or ``ema``: what the bootstrap targets run on."""
    return model_cfg.head.consistency_target if head_kind == "shortcut" else "live"


class TargetNetwork:
    """Build with ``prepare`` before the engine (the template), then ``attach`` to the engine's module."""

    def __init__(self, model_cfg: ModelConfig, kind: str, template: Optional[nn.Module]):
        self.head_cfg, self.kind, self.template = model_cfg.head, kind, template
        self.ema: Optional[EMA] = None
        self.net: Optional[nn.Module] = None

    @classmethod
    def prepare(cls, model_cfg: ModelConfig, data: DataSpec, head_kind: str, device: torch.device) -> "TargetNetwork":
        kind = target_kind(model_cfg, head_kind)
        template = build_meta_model(model_cfg, data).head.net.to_empty(device=device) if kind != "live" else None
        return cls(model_cfg, kind, template)

    @property
    def eval_ema_whole_prefix(self) -> Optional[str]:
        """The evaluation EMA is sharded over the ranks, except where this network runs on it."""
        return TARGET_NET_PREFIX if self.kind == "eval_ema" else None

    def attach(self, module: nn.Module, eval_ema: EMA) -> None:
        """Create the target EMA (``ema``) and bind the network's weights to the EMA it follows."""
        if self.kind == "ema":
            self.ema = EMA(
                module, self.head_cfg.target_ema_decay, prefix=TARGET_NET_PREFIX, whole_prefix=TARGET_NET_PREFIX
            )
        source = self.ema if self.kind == "ema" else eval_ema
        if self.template is not None:
            self.net = source.bind(self.template, TARGET_NET_PREFIX)

    def update(self, completed_steps: int) -> None:
        """After an optimizer step; ``completed_steps`` counts the steps before it (the ramp starts at 0)."""
        if self.ema is not None:
            head = self.head_cfg
            self.ema.update(ramped_decay(head.target_ema_decay, completed_steps, head.target_ema_warmup_steps))

    def num_bytes(self) -> int:
        return self.ema.num_bytes() if self.ema is not None else 0

    def full_state_dict(self) -> Optional[dict]:
        return self.ema.full_state_dict() if self.ema is not None else None

    def load_full_state_dict(self, state: dict) -> None:
        self.ema.load_full_state_dict(state)
