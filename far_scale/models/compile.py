"""``torch.compile`` of the parts that do the work: every transformer block and the head's MLP body.

Compiled with dynamic shapes: the number of visible and masked tokens changes every training step (a random mask
ratio) and every sampling iteration, and one graph with symbolic lengths serves them all (no recompilation after
the first steps; ``tests/unit/test_compile.py`` counts). The weights are untouched (names, state dicts, EMAs).

Sampling (``eval.compile``) uses the same compilation, or inductor's CUDA graphs (``cudagraphs``: torch's
``reduce-overhead`` mode, CUDA-graph trees): each distinct shape is recorded once and replayed; a masked
sampler's iterations have shapes fixed by its plan, and FAR-Causal's static KV cache gives every decoding step
the same shapes, so its steps replay one recording.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from far_scale.models.generation import GraphReplay
from far_scale.models.heads import AdaLNMLP
from far_scale.models.transformer import Block

SamplingCompile = Literal["off", "default", "cudagraphs"]
TORCH_MODES = {"default": "default", "cudagraphs": "reduce-overhead"}
COMPILED_FOR_SAMPLING = "compiled_for_sampling"  # set on a model compile_for_sampling compiled: how


def compile_model(model: nn.Module, mode: str = "default") -> int:
    """Compile each ``Block`` in place and the ``apply_condition`` of each head body; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(dynamic=True, mode=mode)
            count += 1
        elif isinstance(module, AdaLNMLP):
            # The heads call the body through apply_condition (the condition is summed once per token outside).
            module.apply_condition = torch.compile(module.apply_condition, dynamic=True, mode=mode)
            count += 1
    return count


def compile_for_sampling(model: nn.Module, how: SamplingCompile, device: torch.device) -> Optional[GraphReplay]:
    """Compile ``model`` in place for sampling as ``eval.compile`` says; returns what the sampler needs for CUDA
    graphs (``GraphReplay``: the step marker and fixed cache buffers; pass it to ``generate``), or None."""
    if how == "off":
        return None
    if how not in TORCH_MODES:
        raise ValueError(f"eval.compile={how!r}: use one of off, {', '.join(TORCH_MODES)}")
    if how == "cudagraphs" and device.type != "cuda":
        raise ValueError(
            f"eval.compile=cudagraphs needs a CUDA device (sampling on {device.type}); use eval.compile=default or off"
        )
    done = getattr(model, COMPILED_FOR_SAMPLING, None)
    if done is None:
        compile_model(model, TORCH_MODES[how])
        setattr(model, COMPILED_FOR_SAMPLING, how)
    elif done != how:
        raise ValueError(f"this model is already compiled with eval.compile={done}; load it again for {how}")
    return GraphReplay(torch.compiler.cudagraph_mark_step_begin) if how == "cudagraphs" else None
