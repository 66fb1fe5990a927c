"""AdamW parameter groups (docs/concepts.md, training defaults) and the learning-rate schedule as pure functions of the step."""

from __future__ import annotations

import math

from torch import nn

from far_scale.config.schema import Config
from far_scale.distributed.engine import full_shape


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on >= 2-D weights only: none on biases, norms, 1-D embeddings, or what the model exempts
    (``no_weight_decay()``: the head)."""
    decay, no_decay = [], []
    model_exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = len(full_shape(param)) < 2 or name.endswith(".bias") or name in model_exempt
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float
) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to ``peak_lr``, then constant or cosine."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_for(cfg: Config, peak_lr: float, warmup_steps: int, total_steps: int):
    """``step -> lr`` for this run."""

    def lr_at(step: int) -> float:
        return learning_rate(
            step,
            peak_lr=peak_lr,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            kind=cfg.schedule.kind,
            min_lr_ratio=cfg.schedule.min_lr_ratio,
        )

    return lr_at
