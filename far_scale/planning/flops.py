"""Analytic training FLOPs per image, for throughput and MFU (matmuls only; 2 FLOPs per MAC)."""

from __future__ import annotations

from far_scale.config.schema import ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.registry import ModelDims

BACKWARD_FACTOR = 3  # forward + backward ~ 3x forward
# Peak dense bf16 FLOP/s by card (no sparsity); MFU is reported only for a card found here.
# Dense bf16 peaks from NVIDIA's datasheets, the most specific name first: a PCIe or NVL card is not an SXM one
# (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3" is SXM, "NVIDIA H100 PCIe", "NVIDIA H100 NVL", ...).
PEAK_BF16_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H200", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
)


def _transformer_flops(tokens: float, attended: float, width: int, depth: int, mlp_ratio: float) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * mlp_ratio * width * width) + 4 * tokens * attended * width
    return depth * per_layer


def _head_flops(rows: float, width: int, depth: int, z_width: int, token_dim: int, out_dim: int) -> float:
    per_row = 2 * (
        token_dim * width
        + z_width * width
        + depth * (2 * width * width + 3 * width * width)
        + 2 * width * width
        + width * out_dim
    )
    return rows * per_row


def train_flops_per_image(model: ModelConfig, dims: ModelDims, data: DataSpec, expected_mask_ratio: float) -> float:
    """Forward + backward FLOPs of one training image (self-consistency targets counted as extra forwards)."""
    L, W = data.seq_len, dims.width
    if dims.backbone == "masked":
        visible = model.num_buffer_tokens + L * (1 - expected_mask_ratio)
        full = model.num_buffer_tokens + L
        backbone = _transformer_flops(visible, visible, W, dims.encoder_depth, model.mlp_ratio) + _transformer_flops(
            full, full, W, dims.decoder_depth, model.mlp_ratio
        )
    else:
        backbone = _transformer_flops(L, L / 2, W, dims.total_depth, model.mlp_ratio)
    # The head runs on the predicted (masked) rows only, each repeated num_repeats times.
    rows = L * expected_mask_ratio * model.head.num_repeats
    out_dim = data.token_dim * (2 if dims.head_kind == "diffusion" else 1)
    head = _head_flops(rows, dims.head_width, dims.head_depth, W, data.token_dim, out_dim)
    total = BACKWARD_FACTOR * (backbone + head)
    if dims.head_kind == "shortcut":
        # Two target forwards on the self-consistency rows, no backward.
        total += 2 * model.head.self_consistency_fraction * head
    return total


def peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak (the MFU denominator), or None for a card not in the table."""
    for words, value in PEAK_BF16_FLOPS:
        if all(word in device_name for word in words):
            return value
    return None
