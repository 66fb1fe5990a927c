"""Activation memory of one training image, estimated (what ``micro_batch_size_per_gpu: auto`` sizes with).

Per transformer block over s tokens of width h with a heads and MLP ratio r, the stored activations in a
16-bit forward are about (15 + 4r)·s·h + 5·a·s² bytes (Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models", 2022: 34·s·h + 5·a·s² at r = 4, dropout masks included); fp32 doubles it. With
activation checkpointing a block keeps only its 16-bit input (2·s·h) and one block at a time is recomputed.
The head's rows (the masked tokens, ``num_repeats`` times) keep about 12 values of its width per block.
An estimate: ``benchmarks/train_throughput.py --fit`` measures the largest micro batch on a card.
"""

from __future__ import annotations

from far_scale.config.schema import ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.registry import ModelDims

HEAD_VALUES_PER_BLOCK = 12  # norm, modulation, fc1, SiLU, fc2, residual: stored per row per head block
BYTES_16 = 2


def _block_bytes(tokens: float, width: int, heads: int, mlp_ratio: float) -> float:
    return (15 + 4 * mlp_ratio) * tokens * width + 5 * heads * tokens * tokens


def _stack_bytes(tokens: float, width: int, heads: int, mlp_ratio: float, depth: int, checkpointing: bool) -> float:
    if depth == 0:
        return 0.0
    one = _block_bytes(tokens, width, heads, mlp_ratio)
    return BYTES_16 * tokens * width * depth + one if checkpointing else depth * one


def activation_bytes_per_image(
    model: ModelConfig,
    dims: ModelDims,
    data: DataSpec,
    expected_mask_ratio: float,
    precision: str,
    checkpointing: bool,
) -> float:
    L, W, heads, r = data.seq_len, dims.width, dims.num_heads, model.mlp_ratio
    if dims.backbone == "masked":
        visible = model.num_buffer_tokens + L * (1 - expected_mask_ratio)
        full = model.num_buffer_tokens + L
        backbone = _stack_bytes(visible, W, heads, r, dims.encoder_depth, checkpointing) + _stack_bytes(
            full, W, heads, r, dims.decoder_depth, checkpointing
        )
    else:
        backbone = _stack_bytes(L + 1, W, heads, r, dims.total_depth, checkpointing)
    rows = L * expected_mask_ratio * model.head.num_repeats
    head = rows * dims.head_width * HEAD_VALUES_PER_BLOCK * BYTES_16 * (dims.head_depth + 1)
    return (backbone + head) * (2 if precision == "fp32" else 1)
