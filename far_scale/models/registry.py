"""The one registry of model sizes (docs/concepts.md, model sizes) and the resolved dimensions of a model.

Plain data: how a recipe's ``model`` section resolves to these is ``far_scale.planning.builder``'s concern.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


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
        "large": SizePreset(
            encoder_depth=16, decoder_depth=16, width=1024, num_heads=16, head_depth=8, head_width=1280
        ),
        "huge": SizePreset(
            encoder_depth=20, decoder_depth=20, width=1280, num_heads=16, head_depth=12, head_width=1536
        ),
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
