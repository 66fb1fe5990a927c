"""The one registry of model sizes (SPEC §2 table) and how a ``model`` config resolves to dimensions."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from far_scale.config.schema import ModelConfig


@dataclass(frozen=True)
class SizePreset:
    encoder_depth: int
    decoder_depth: int
    width: int
    num_heads: int
    head_depth: int
    head_width: int


SIZE_PRESETS = MappingProxyType(
    {
        # Small enough to train on two CPU cores in minutes (tests, demo).
        "tiny": SizePreset(encoder_depth=2, decoder_depth=2, width=128, num_heads=4, head_depth=2, head_width=128),
        "base": SizePreset(encoder_depth=12, decoder_depth=12, width=768, num_heads=12, head_depth=6, head_width=1024),
        "large": SizePreset(encoder_depth=16, decoder_depth=16, width=1024, num_heads=16, head_depth=8, head_width=1280),
        "huge": SizePreset(encoder_depth=20, decoder_depth=20, width=1280, num_heads=16, head_depth=12, head_width=1536),
    }
)

HEAD_FOR_ARCH = MappingProxyType({"far": "shortcut", "far_causal": "shortcut", "mar": "diffusion"})
BACKBONE_FOR_ARCH = MappingProxyType({"far": "masked", "far_causal": "causal", "mar": "masked"})


@dataclass(frozen=True)
class ModelDims(SizePreset):
    """Fully resolved architecture of one model: a preset's dimensions plus backbone and head kinds."""

    backbone: str
    head_kind: str

    @property
    def total_depth(self) -> int:
        return self.encoder_depth + self.decoder_depth


_DIM_FIELDS = ("encoder_depth", "decoder_depth", "width", "num_heads")
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
