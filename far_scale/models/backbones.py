"""Backbones: MAR's masked encoder-decoder and a causal (GPT-style) transformer (SPEC §2).

Both map latent tokens ``[B, L, D]`` and class labels to one conditioning vector per
token, ``z`` of shape ``[B, L, W]``, that a head (``far_scale.models.heads``) turns into
tokens. Shapes come from the caller (``DataSpec``), never from constants here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from far_scale.models.transformer import LAYER_NORM_EPS, BlockStack, KVCache, init_backbone_weights

EMBED_INIT_STD = 0.02



def random_orders(batch: int, seq_len: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One random permutation of ``seq_len`` token positions per image (training masks and sampling)."""
    return torch.argsort(torch.rand(batch, seq_len, device=device, generator=generator), dim=1)

class ClassCondition(nn.Module):
    """Class embedding with a learned null embedding for classifier-free guidance."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, width)
        self.null = nn.Parameter(torch.zeros(1, width))
        self.dropout = dropout
        nn.init.normal_(self.embedding.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.null, std=EMBED_INIT_STD)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``labels``; in training each is replaced by the null one with p = dropout."""
        cond = self.embedding(labels)
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            cond = torch.where(drop[:, None], self.null.to(cond.dtype), cond)
        return cond

    def unconditional(self, batch: int) -> torch.Tensor:
        return self.null.expand(batch, -1)


def _learned_positions(length: int, width: int) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(1, length, width))
    nn.init.normal_(param, std=EMBED_INIT_STD)
    return param


def sample_mask_ratio(minimum: float, mean: float, std: float) -> float:
    """A mask ratio from N(mean, std) truncated to [minimum, 1] (inverse-CDF sampling).

    Drawn from the CPU generator so that no device sync happens in the training step.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    low = normal.cdf(torch.tensor((minimum - mean) / std))
    high = normal.cdf(torch.tensor((1.0 - mean) / std))
    u = low + (high - low) * torch.rand(())
    ratio = mean + std * torch.special.ndtri(u)
    return float(ratio.clamp(minimum, 1.0))


class TokenBackbone(nn.Module):
    """What every backbone has: the data's shape, class conditioning and the token projection."""

    def __init__(self, *, seq_len: int, token_dim: int, num_classes: int, width: int, class_dropout: float):
        super().__init__()
        self.seq_len = seq_len
        self.token_dim = token_dim
        self.width = width
        self.condition = ClassCondition(num_classes, width, class_dropout)
        self.token_proj = nn.Linear(token_dim, width)


class MaskedBackbone(TokenBackbone):
    """MAR's encoder-decoder: the encoder sees the buffer and the visible tokens only."""

    kind = "masked"

    def __init__(
        self,
        *,
        seq_len: int,
        token_dim: int,
        num_classes: int,
        width: int,
        encoder_depth: int,
        decoder_depth: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        class_dropout: float,
        num_buffer_tokens: int,
        mask_ratio_min: float,
        mask_ratio_mean: float,
        mask_ratio_std: float,
    ):
        super().__init__(seq_len=seq_len, token_dim=token_dim, num_classes=num_classes, width=width,
                         class_dropout=class_dropout)
        self.num_buffer_tokens = num_buffer_tokens
        self.mask_ratio = (mask_ratio_min, mask_ratio_mean, mask_ratio_std)
        total = num_buffer_tokens + seq_len
        self.token_proj_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.encoder_pos = _learned_positions(total, width)
        self.encoder = BlockStack(encoder_depth, width, num_heads, mlp_ratio, dropout)
        self.encoder_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = _learned_positions(1, width)
        self.decoder_pos = _learned_positions(total, width)
        self.decoder = BlockStack(decoder_depth, width, num_heads, mlp_ratio, dropout)
        self.decoder_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.head_pos = _learned_positions(seq_len, width)
        for module in (self.token_proj, self.token_proj_norm, self.encoder, self.encoder_norm,
                       self.decoder_embed, self.decoder, self.decoder_norm):
            module.apply(init_backbone_weights)

    def random_orders(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One random permutation of token positions per image."""
        return random_orders(batch, self.seq_len, device, generator)

    def _with_buffer(self, mask: torch.Tensor) -> torch.Tensor:
        buffer = torch.zeros(mask.shape[0], self.num_buffer_tokens, dtype=torch.bool, device=mask.device)
        return torch.cat([buffer, mask], dim=1)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Encoder over the buffer (all slots hold ``cond``) and the unmasked tokens.

        ``mask`` is ``[B, L]`` bool, True where a token is masked; every row must mask the same count.
        """
        batch = tokens.shape[0]
        x = self.token_proj(tokens)
        buffer = cond[:, None, :].to(x.dtype).expand(batch, self.num_buffer_tokens, self.width)
        x = self.token_proj_norm(torch.cat([buffer, x], dim=1) + self.encoder_pos)
        visible = ~self._with_buffer(mask)
        x = x[visible].reshape(batch, -1, self.width)
        return self.encoder_norm(self.encoder(x))

    def decode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder over all positions, mask tokens where the encoder saw nothing; returns ``z``."""
        x = self.decoder_embed(x)
        batch = x.shape[0]
        visible = ~self._with_buffer(mask)
        padded = self.mask_token.to(x.dtype).expand(batch, visible.shape[1], self.width)
        x = padded.masked_scatter(visible[..., None], x)
        x = self.decoder_norm(self.decoder(x + self.decoder_pos))
        return x[:, self.num_buffer_tokens :] + self.head_pos

    def predict(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(tokens, mask, cond), mask)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: returns ``z`` and the loss mask (True on masked tokens)."""
        batch = tokens.shape[0]
        ratio = sample_mask_ratio(*self.mask_ratio)
        num_masked = math.ceil(self.seq_len * ratio)
        orders = self.random_orders(batch, tokens.device)
        mask = torch.zeros(batch, self.seq_len, dtype=torch.bool, device=tokens.device)
        mask.scatter_(1, orders[:, :num_masked], True)
        return self.predict(tokens, mask, self.condition(labels)), mask


class CausalBackbone(TokenBackbone):
    """Decoder-only transformer over tokens in raster order; position i predicts token i."""

    kind = "causal"

    def __init__(
        self,
        *,
        seq_len: int,
        token_dim: int,
        num_classes: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        class_dropout: float,
    ):
        super().__init__(seq_len=seq_len, token_dim=token_dim, num_classes=num_classes, width=width,
                         class_dropout=class_dropout)
        self.num_heads = num_heads
        # Input position 0 holds the class token, position i > 0 token i - 1.
        self.pos = _learned_positions(seq_len, width)
        self.blocks = BlockStack(depth, width, num_heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.head_pos = _learned_positions(seq_len, width)
        for module in (self.token_proj, self.blocks, self.norm):
            module.apply(init_backbone_weights)

    def new_cache(self, batch: int, *, device, dtype) -> KVCache:
        return KVCache(
            len(self.blocks.blocks), batch, self.num_heads, self.seq_len, self.width // self.num_heads,
            device=device, dtype=dtype,
        )

    def embed_inputs(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Input sequence ``[cond, tokens...]`` (no positions yet)."""
        return torch.cat([cond[:, None, :].to(tokens.dtype), self.token_proj(tokens)], dim=1)

    def hidden(self, inputs: torch.Tensor, start: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        """``z`` for input positions ``start .. start + n``; with a cache, appends to it."""
        end = start + inputs.shape[1]
        x = self.blocks(inputs + self.pos[:, start:end], causal=True, cache=cache)
        return self.norm(x) + self.head_pos[:, start:end]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced training pass: ``z`` for every position and an all-True loss mask."""
        z = self.hidden(self.embed_inputs(self.condition(labels), tokens[:, :-1]))
        return z, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
