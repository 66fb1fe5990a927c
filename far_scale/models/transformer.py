"""Pre-norm ViT blocks on ``scaled_dot_product_attention``, with an optional KV cache for decoding."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_NORM_EPS = 1e-6  # MAR / timm ViT value


class LayerKVCache:
    """Keys and values of one attention layer, preallocated for ``max_len`` positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.keys.shape[2]}")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class LayerStaticKVCache:
    """Keys and values of one attention layer at all ``max_len`` positions, written one token per step.

    The step's position is a device tensor (``position`` [1], shared by the layers and advanced by the caller)
    and attention runs over every position under the mask ``slots <= position``: each decoding step has the
    same shapes and no host-side length, so one compiled graph (or one CUDA graph) serves every step. The
    buffers start at zero, so the masked positions hold finite values.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, slots: torch.Tensor):
        self.keys, self.values, self.position, self.slots = keys, values, position, slots

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write one token's keys and values at ``position``; all keys, values and the [1, 1, 1, max_len] mask."""
        if k.shape[2] != 1:
            raise ValueError(f"a static KV cache takes one token per step, got {k.shape[2]}")
        self.keys.index_copy_(2, self.position, k.to(self.keys.dtype))
        self.values.index_copy_(2, self.position, v.to(self.values.dtype))
        return self.keys, self.values, (self.slots <= self.position)[None, None, None, :]


class LayerTokenCache:
    """Keys and values of one attention layer at every position of a fixed-length sequence.

    Used by masked generation with token caching: a full pass *records* the keys and values of the
    positions it computes (its own attention is unchanged); a lazy pass computes only some positions,
    writes their keys and values and lets them attend to every cached position allowed by ``key_mask``.
    ``positions`` [B, n] (the sequence positions of the pass's rows) and ``key_mask`` are set by the
    caller before each pass; the cache's batch may be the first rows of a recording pass (the
    conditional half of a guidance-doubled batch).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values
        self.positions: Optional[torch.Tensor] = None
        self.key_mask: Optional[torch.Tensor] = None
        self.lazy = False

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = self.keys.shape[0]
        index = self.positions[:rows, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.keys.scatter_(2, index, k[:rows].to(self.keys.dtype))
        self.values.scatter_(2, index, v[:rows].to(self.values.dtype))


class KVCache:
    """One ``LayerKVCache`` per block, created by the caller with the device/dtype it decodes in."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int, *, device, dtype):
        shape = (batch, num_heads, max_len, head_dim)
        self.layers = [
            LayerKVCache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
            for _ in range(num_layers)
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length


class StaticKVCache:
    """One ``LayerStaticKVCache`` per block and the shared step position; ``advance`` moves it on the device.

    The buffers are marked as static addresses for ``torch.compile``: a CUDA graph may write them in place
    (as Hugging Face's static cache does), and no recompilation follows from the position changing.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int, *, device, dtype):
        shape = (batch, num_heads, max_len, head_dim)
        self.position = torch.zeros(1, device=device, dtype=torch.long)
        self.slots = torch.arange(max_len, device=device)
        self.layers = [
            LayerStaticKVCache(
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
                self.position,
                self.slots,
            )
            for _ in range(num_layers)
        ]
        for tensor in (self.position, self.slots, *(t for layer in self.layers for t in (layer.keys, layer.values))):
            torch._dynamo.mark_static_address(tensor)

    def advance(self) -> None:
        self.position.add_(1)

    def restart(self) -> None:
        """Decode a new sequence in the same buffers (the old keys stay behind the mask until overwritten)."""
        self.position.zero_()


class TokenCache:
    """One ``LayerTokenCache`` per block (``[batch, heads, max_len, head_dim]`` keys and values)."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int, *, device, dtype):
        shape = (batch, num_heads, max_len, head_dim)
        self.layers = [
            LayerTokenCache(
                torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
            )
            for _ in range(num_layers)
        ]
        for layer in self.layers:  # written in place inside compiled blocks (see StaticKVCache)
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)

    def set_pass(self, positions: torch.Tensor, *, lazy: bool, key_mask: Optional[torch.Tensor] = None) -> None:
        """The next pass's row positions [B, n]; lazy passes attend to the cache (where ``key_mask`` [B, max_len])."""
        for layer in self.layers:
            layer.positions, layer.lazy, layer.key_mask = positions, lazy, key_mask


AnyLayerCache = Union[LayerKVCache, LayerStaticKVCache, LayerTokenCache]
AnyCache = Union[KVCache, StaticKVCache, TokenCache]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool = False, cache: Optional[AnyLayerCache] = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        is_causal, attn_mask = causal, None
        if isinstance(cache, LayerKVCache):
            if length > 1 and cache.length > 0:
                raise ValueError("a KV cache takes either a prefill from empty or one token at a time")
            k, v = cache.append(k, v)
            # A single new query may attend to every cached position.
            is_causal = causal and length > 1
        elif isinstance(cache, LayerStaticKVCache):
            k, v, attn_mask = cache.append(k, v)
            k, v, is_causal = k.to(q.dtype), v.to(q.dtype), False
        elif isinstance(cache, LayerTokenCache):
            cache.write(k, v)
            if cache.lazy:
                k, v = cache.keys.to(q.dtype), cache.values.to(q.dtype)
                if cache.key_mask is not None:
                    attn_mask = cache.key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, length, dim)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (MAR's timm ``Block`` with qkv bias)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, causal: bool = False, cache: Optional[AnyLayerCache] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, cache=cache)
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.Module):
    """A sequence of blocks; activation checkpointing is a switch set from outside the model."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, cache: Optional[AnyCache] = None) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            layer_cache = cache.layers[index] if cache is not None else None
            if self.activation_checkpointing and self.training and layer_cache is None:
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal, cache=layer_cache)
        return x
