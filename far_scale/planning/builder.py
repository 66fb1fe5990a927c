"""Recipe ``model`` section + data shape -> the plain constructor arguments of ``far_scale.models``.

The models import neither config nor data: this is the one place that translates a ``ModelConfig``
(size preset, overrides, head settings) into dimensions and builds the network.
"""

from __future__ import annotations

from typing import Optional

import torch

from far_scale.config.schema import HeadConfig, ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.backbones import CausalBackbone, MaskedBackbone
from far_scale.models.heads import DiffusionHead, ShortcutHead
from far_scale.models.model import ARModel, Backbone, Head, count_parameters
from far_scale.models.registry import BACKBONE_FOR_ARCH, HEAD_FOR_ARCH, SIZE_PRESETS, ModelDims

_DIM_FIELDS = ("encoder_depth", "decoder_depth", "width", "num_heads")
NOISE_REACH = 5.0
"""How far a standard-normal coordinate reaches for ``clip_value: auto``: |x0| > 5 has probability 5.7e-7, so
the bound leaves every velocity x1 - x0 from a real token x1 reachable."""


def resolve_clip_value(head: HeadConfig, data: DataSpec) -> Optional[float]:
    """The shortcut head's clamp: the recipe's number, or for ``auto`` the data's largest |token| plus
    ``NOISE_REACH``; None (no clamp) where ``auto`` meets a data shape without known extremes (sampling builds,
    synthetic tokens in tests and benchmarks); training from a manifest without extremes is refused by the plan."""
    if head.clip_value != "auto":
        return float(head.clip_value)
    return None if data.latent_bound is None else data.latent_bound + NOISE_REACH


_HEAD_FIELDS = {"head_depth": "depth", "head_width": "width"}


def resolve_dims(model: ModelConfig) -> ModelDims:
    """Resolve a size preset plus explicit overrides into ``ModelDims``.

    Raises ValueError naming every missing field when ``size: custom`` leaves one unset.
    """
    preset = SIZE_PRESETS.get(model.size)
    values: dict[str, int | None] = {}
    for name in _DIM_FIELDS:
        explicit = getattr(model, name)
        values[name] = explicit if explicit is not None else (getattr(preset, name) if preset else None)
    for name, head_field in _HEAD_FIELDS.items():
        explicit = getattr(model.head, head_field)
        values[name] = explicit if explicit is not None else (getattr(preset, name) if preset else None)
    missing = [
        f"model.{n}" if n in _DIM_FIELDS else f"model.head.{_HEAD_FIELDS[n]}" for n, v in values.items() if v is None
    ]
    if missing:
        raise ValueError(f"model.size is 'custom': set {', '.join(missing)}")
    head_kind = model.head.kind if model.head.kind != "auto" else HEAD_FOR_ARCH[model.arch]
    return ModelDims(backbone=BACKBONE_FOR_ARCH[model.arch], head_kind=head_kind, **values)  # type: ignore[arg-type]


def build_model(model: ModelConfig, data: DataSpec, dims: Optional[ModelDims] = None) -> ARModel:
    """Build the model a ``model`` config describes, shaped by the data (``DataSpec``)."""
    dims = dims or resolve_dims(model)
    shape = dict(seq_len=data.seq_len, token_dim=data.token_dim, num_classes=data.num_classes)
    common = dict(
        width=dims.width,
        num_heads=dims.num_heads,
        mlp_ratio=model.mlp_ratio,
        dropout=model.dropout,
        class_dropout=model.class_dropout,
    )
    if dims.backbone == "masked":
        backbone: Backbone = MaskedBackbone(
            **shape,
            **common,
            encoder_depth=dims.encoder_depth,
            decoder_depth=dims.decoder_depth,
            num_buffer_tokens=model.num_buffer_tokens,
            mask_ratio_min=model.mask_ratio_min,
            mask_ratio_mean=model.mask_ratio_mean,
            mask_ratio_std=model.mask_ratio_std,
        )
    else:
        backbone = CausalBackbone(**shape, **common, depth=dims.total_depth)
    head_cfg = model.head
    if dims.head_kind == "shortcut":
        head: Head = ShortcutHead(
            data.token_dim,
            dims.width,
            dims.head_width,
            dims.head_depth,
            num_levels=head_cfg.num_levels,
            self_consistency_fraction=head_cfg.self_consistency_fraction,
            clip_value=resolve_clip_value(head_cfg, data),
            guidance_distillation_scale=head_cfg.guidance_distillation_scale,
        )
    else:
        head = DiffusionHead(
            data.token_dim,
            dims.width,
            dims.head_width,
            dims.head_depth,
            num_train_timesteps=head_cfg.num_train_timesteps,
            noise_schedule=head_cfg.noise_schedule,
        )
    return ARModel(backbone, head, head_cfg.num_repeats)


def build_meta_model(model: ModelConfig, data: DataSpec, dims: Optional[ModelDims] = None) -> ARModel:
    """The same model on the meta device: shapes and derived quantities, no weights allocated."""
    with torch.device("meta"):
        return build_model(model, data, dims)


def count_parameters_for(model: ModelConfig, data: DataSpec) -> dict[str, int]:
    """Parameter counts without allocating weights."""
    return count_parameters(build_meta_model(model, data))
