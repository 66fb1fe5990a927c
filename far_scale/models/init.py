"""Weight initialisation (MAR's), written so that a model can be built partitioned.

Two rules, both kept by every initialiser of the models:

1. **A parent initialises a child's parameters only through ``child.apply(fn)``.** Under DeepSpeed's
   ``zero.Init`` (ZeRO-3 partitioned construction) a module's parameters are partitioned over the ranks as
   soon as its own ``__init__`` returns; ``Module.apply`` is where zero.Init gathers one module's
   parameters for writing and re-partitions them afterwards, so at no point does a rank hold more than
   its share plus the module being initialised. A module may write its *own* parameters directly in its
   ``__init__`` (they are partitioned only when it returns).
2. **Random values are drawn on the host generator** (``_fill_from_host``), wherever the parameter lives.
   A partitioned build gathers parameters onto the accelerator; drawing there would use the accelerator's
   generator. So one seed gives the same initial weights on CPU, on a GPU, unpartitioned or partitioned
   over any number of ranks.

Note that ``Module.apply`` visits children before their parent and leaves in registration order, so it
consumes the generator in the same order as iterating ``module.modules()`` over leaf layers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

EMBED_INIT_STD = 0.02


def _fill_from_host(param: torch.Tensor, draw: Callable[[torch.Tensor], object]) -> None:
    """``param`` <- ``draw`` applied to a host tensor of its shape (meta parameters: drawn on meta, no values)."""
    host = torch.empty(param.shape, dtype=param.dtype, device="meta" if param.is_meta else "cpu")
    draw(host)
    with torch.no_grad():
        param.copy_(host)


def xavier_uniform(param: torch.Tensor) -> None:
    _fill_from_host(param, nn.init.xavier_uniform_)


def embedding_normal(param: torch.Tensor) -> None:
    """N(0, 0.02): class and position embeddings, the scalar embedders' MLPs."""
    _fill_from_host(param, lambda host: nn.init.normal_(host, std=EMBED_INIT_STD))


def init_backbone_weights(module: nn.Module) -> None:
    """For ``apply``: Xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        xavier_uniform(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_linear_xavier(module: nn.Module) -> None:
    """For ``apply``: Xavier-uniform weights and zero biases of linear layers (the heads' MLP)."""
    if isinstance(module, nn.Linear):
        xavier_uniform(module.weight)
        nn.init.zeros_(module.bias)


def init_embedding_normal(module: nn.Module) -> None:
    """For ``apply``: N(0, 0.02) weights of embedding and linear layers (biases untouched)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        embedding_normal(module.weight)


def init_zero(module: nn.Module) -> None:
    """For ``apply``: zero weights and biases of linear layers (adaLN modulations, output layers)."""
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
