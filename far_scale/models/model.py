"""A backbone plus a head: the trainable model of every arch (far, far_causal, mar)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from far_scale.config.schema import ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.backbones import CausalBackbone, MaskedBackbone, gather_positions
from far_scale.models.heads import DiffusionHead, ShortcutHead
from far_scale.models.registry import ModelDims, resolve_dims

# Parameter-name prefix of the network that produces the shortcut head's self-consistency targets
# (a copy of ``head.net`` running on EMA weights).
TARGET_NET_PREFIX = "head.net."

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

    def forward(self, latents: torch.Tensor, labels: torch.Tensor,
                target_net: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """``latents`` [B, L, D] (scaled), ``labels`` [B]; ``target_net`` feeds shortcut targets (EMA head net)."""
        out = self.backbone(latents, labels, unconditional=self.head.needs_unconditional)
        return self.head_loss(latents, out.z, out.positions, target_net, out.z_unconditional)

    def head_loss(self, target: torch.Tensor, z: torch.Tensor, positions: torch.Tensor,
                  target_net: Optional[nn.Module] = None,
                  z_unconditional: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The head's loss on tokens ``target`` [B, L, D] given ``z`` [B, L, W], at ``positions`` [B, n] only.

        The rows are gathered before the head, so no head work is spent on visible tokens.
        """
        def rows(x: torch.Tensor) -> torch.Tensor:
            # Each token is repeated num_repeats times with independent noise/time draws (SPEC §3).
            return gather_positions(x, positions).flatten(0, 1).repeat(self.num_repeats, 1)

        loss, parts = self.head.loss(rows(target), rows(z), target_net=target_net,
                                     z_unconditional=None if z_unconditional is None else rows(z_unconditional))
        return {"loss": loss, **parts}


def build_model(model: ModelConfig, data: DataSpec, dims: Optional[ModelDims] = None) -> ARModel:
    """Build the model a ``model`` config describes, shaped by the data (``DataSpec``)."""
    dims = dims or resolve_dims(model)
    shape = dict(seq_len=data.seq_len, token_dim=data.token_dim, num_classes=data.num_classes)
    common = dict(width=dims.width, num_heads=dims.num_heads, mlp_ratio=model.mlp_ratio,
                  dropout=model.dropout, class_dropout=model.class_dropout)
    if dims.backbone == "masked":
        backbone: Backbone = MaskedBackbone(
            **shape, **common, encoder_depth=dims.encoder_depth, decoder_depth=dims.decoder_depth,
            num_buffer_tokens=model.num_buffer_tokens, mask_ratio_min=model.mask_ratio_min,
            mask_ratio_mean=model.mask_ratio_mean, mask_ratio_std=model.mask_ratio_std,
        )
    else:
        backbone = CausalBackbone(**shape, **common, depth=dims.total_depth)
    head_cfg = model.head
    if dims.head_kind == "shortcut":
        head: Head = ShortcutHead(
            data.token_dim, dims.width, dims.head_width, dims.head_depth, num_levels=head_cfg.num_levels,
            self_consistency_fraction=head_cfg.self_consistency_fraction, clip_value=head_cfg.clip_value,
            guidance_distillation_scale=head_cfg.guidance_distillation_scale,
        )
    else:
        head = DiffusionHead(
            data.token_dim, dims.width, dims.head_width, dims.head_depth,
            num_train_timesteps=head_cfg.num_train_timesteps, noise_schedule=head_cfg.noise_schedule,
        )
    return ARModel(backbone, head, head_cfg.num_repeats)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of the backbone, the head and in total."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def count_parameters_for(model: ModelConfig, data: DataSpec) -> dict[str, int]:
    """Parameter counts without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build_model(model, data))
