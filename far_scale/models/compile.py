"""``torch.compile`` of the parts that do the work: every transformer block and the head's MLP body.

Compiled with dynamic shapes: the number of visible and masked tokens changes every training step (a random mask
ratio) and every sampling iteration, and one graph with symbolic lengths serves them all (no recompilation after
the first steps; ``tests/unit/test_compile.py`` counts). The weights are untouched (names, state dicts, EMAs).
"""

from __future__ import annotations

import torch
from torch import nn

from far_scale.models.heads import AdaLNMLP
from far_scale.models.transformer import Block


def compile_model(model: nn.Module) -> int:
    """Compile each ``Block`` in place and the ``apply_condition`` of each head body; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(dynamic=True)
            count += 1
        elif isinstance(module, AdaLNMLP):
            # The heads call the body through apply_condition (the condition is summed once per token outside).
            module.apply_condition = torch.compile(module.apply_condition, dynamic=True)
            count += 1
    return count
