"""Models for speed benchmarks: FAR and MAR sharing one backbone's weights, at preset or extra sizes."""

from __future__ import annotations

import torch

from far_scale.config.schema import ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.model import ARModel
from far_scale.planning.builder import build_model

# Sizes beyond the presets: "mid" is base with a quarter of its backbone work (6+6 blocks, width 384),
# the largest size a 2-core CPU samples in minutes.
EXTRA_SIZES = {"mid": dict(size="base", encoder_depth=6, decoder_depth=6, width=384, num_heads=6)}


def model_config(arch: str, size: str) -> ModelConfig:
    return ModelConfig(arch=arch, **EXTRA_SIZES.get(size, {"size": size}))


def build_pair(size: str, data: DataSpec, device: torch.device) -> tuple[ARModel, ARModel, ARModel]:
    """MAR and FAR sharing one backbone's weights, plus a FAR-Causal of the same size."""
    mar = build_model(model_config("mar", size), data).to(device).eval()
    far = build_model(model_config("far", size), data).to(device).eval()
    far.backbone.load_state_dict(mar.backbone.state_dict())
    causal = build_model(model_config("far_causal", size), data).to(device).eval()
    return mar, far, causal


def speed_record(size: str, batch: int, data: DataSpec, bf16: bool, rows: list[dict], **extra) -> dict:
    """A sampling-speed result: what was measured (size, batch, tokens, dtype) and its rows."""
    return {
        "size": size,
        "batch": batch,
        "seq_len": data.seq_len,
        "dtype": "bf16" if bf16 else "fp32",
        **extra,
        "rows": rows,
    }
