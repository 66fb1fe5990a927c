"""A backbone plus a head: the trainable model of every arch (far, far_causal, mar)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from far_scale.models.backbones import CausalBackbone, MaskedBackbone, gather_positions
from far_scale.models.heads import DiffusionHead, ShortcutHead

# Parameter-name prefix of the network that produces the shortcut head's self-consistency targets
# (a copy of ``head.net`` running on EMA weights).
TARGET_NET_PREFIX = "head.net."
# The head's weights are exempt from weight decay (MAR's recipe: only >= 2-D backbone weights decay).
NO_DECAY_PREFIX = "head."

Backbone = Union[MaskedBackbone, CausalBackbone]
Head = Union[ShortcutHead, DiffusionHead]


class ARModel(nn.Module):
    """``forward(latents, labels)`` returns the training loss and its parts."""

    def __init__(self, backbone: Backbone, head: Head, num_repeats: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_repeats = num_repeats

    @property
    def seq_len(self) -> int:
        return self.backbone.seq_len

    @property
    def token_dim(self) -> int:
        return self.backbone.token_dim

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def expected_mask_ratio(self) -> float:
        """The mean share of tokens a training pass predicts (the head's rows per token)."""
        return self.backbone.expected_mask_ratio

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that must not decay whatever their shape (timm's convention)."""
        return {name for name, _ in self.named_parameters() if name.startswith(NO_DECAY_PREFIX)}

    def forward(
        self, latents: torch.Tensor, labels: torch.Tensor, target_net: Optional[nn.Module] = None
    ) -> dict[str, torch.Tensor]:
        """``latents`` [B, L, D] (scaled), ``labels`` [B]; ``target_net`` feeds shortcut targets (EMA head net)."""
        out = self.backbone(latents, labels, unconditional=self.head.needs_unconditional)
        return self.head_loss(latents, out.z, out.positions, target_net, out.z_unconditional)

    def head_loss(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        positions: torch.Tensor,
        target_net: Optional[nn.Module] = None,
        z_unconditional: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """The head's loss on tokens ``target`` [B, L, D] given ``z`` [B, L, W], at ``positions`` [B, n] only.

        The rows are gathered before the head, so no head work is spent on visible tokens.
        """

        def rows(x: torch.Tensor) -> torch.Tensor:
            # Each token is repeated num_repeats times with independent noise/time draws (docs/concepts.md, heads).
            return gather_positions(x, positions).flatten(0, 1).repeat(self.num_repeats, 1)

        loss, parts = self.head.loss(
            rows(target),
            rows(z),
            target_net=target_net,
            z_unconditional=None if z_unconditional is None else rows(z_unconditional),
        )
        return {"loss": loss, **parts}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of the backbone, the head and in total."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def largest_layer_parameters(model: nn.Module) -> int:
    """The most parameters one module holds itself (not counting its children): the unit a partitioned
    build holds whole at a time."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
