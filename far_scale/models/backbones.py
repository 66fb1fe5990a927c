"""Backbones: MAR's masked encoder-decoder and a causal (GPT-style) transformer (docs/concepts.md, backbones).

Both map latent tokens ``[B, L, D]`` and class labels to one conditioning vector per
token, ``z`` of shape ``[B, L, W]``, that a head (``far_scale.models.heads``) turns into
tokens. Shapes come from the caller (``DataSpec``), never from constants here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from far_scale.models.init import embedding_normal, init_backbone_weights, init_embedding_normal
from far_scale.models.transformer import LAYER_NORM_EPS, BlockStack, KVCache, StaticKVCache, TokenCache


class TrainingPass(NamedTuple):
    """A backbone's training output: ``z`` [B, L, W], the positions [B, n] that carry a loss and, when
    asked for (guidance distillation), ``z`` of the same inputs under the null class."""

    z: torch.Tensor
    positions: torch.Tensor
    z_unconditional: Optional[torch.Tensor] = None


def random_orders(batch: int, seq_len: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One random permutation of ``seq_len`` token positions per image (training masks and sampling)."""
    return torch.argsort(torch.rand(batch, seq_len, device=device, generator=generator), dim=1)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x`` [B, L, ...] and ``index`` [B, n]: a gather, so no sync and no
    data-dependent shape (the backbones, the head's loss rows and the sampler select tokens with it)."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


class ClassCondition(nn.Module):
    """Class embedding with a learned null embedding for classifier-free guidance."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, width)
        self.null = nn.Parameter(torch.zeros(1, width))
        self.dropout = dropout
        self.embedding.apply(init_embedding_normal)  # a child's weights: through apply (models/init.py)
        embedding_normal(self.null)

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
    embedding_normal(param)
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


def expected_mask_ratio(minimum: float, mean: float, std: float) -> float:
    """The mean of N(mean, std) truncated to [minimum, 1]: the share of tokens a training pass predicts.

    Plain floats (no tensors), so that it also holds for a model built on the meta device.
    """

    def density(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    low, high = (minimum - mean) / std, (1.0 - mean) / std
    return mean + std * (density(low) - density(high)) / (cdf(high) - cdf(low))


class TokenBackbone(nn.Module):
    """What every backbone has: the data's shape, class conditioning and the token projection."""

    def __init__(self, *, seq_len: int, token_dim: int, num_classes: int, width: int, class_dropout: float):
        super().__init__()
        self.seq_len = seq_len
        self.token_dim = token_dim
        self.num_classes = num_classes
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
        super().__init__(
            seq_len=seq_len, token_dim=token_dim, num_classes=num_classes, width=width, class_dropout=class_dropout
        )
        self.num_buffer_tokens = num_buffer_tokens
        self.mask_ratio = (mask_ratio_min, mask_ratio_mean, mask_ratio_std)
        self.expected_mask_ratio = expected_mask_ratio(*self.mask_ratio)
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
        for module in (
            self.token_proj,
            self.token_proj_norm,
            self.encoder,
            self.encoder_norm,
            self.decoder_embed,
            self.decoder,
            self.decoder_norm,
        ):
            module.apply(init_backbone_weights)

    def random_orders(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One random permutation of token positions per image."""
        return random_orders(batch, self.seq_len, device, generator)

    def sequence_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Encoder/decoder sequence positions of the buffer followed by token ``positions`` [B, n]."""
        buffer = torch.arange(self.num_buffer_tokens, device=positions.device).expand(positions.shape[0], -1)
        return torch.cat([buffer, positions + self.num_buffer_tokens], dim=1)

    def encode(
        self, tokens: torch.Tensor, visible: torch.Tensor, cond: torch.Tensor, cache: Optional[TokenCache] = None
    ) -> torch.Tensor:
        """Encoder over the buffer (all slots hold ``cond``) and the visible tokens.

        ``visible`` [B, n] holds the visible token positions in ascending order (the same count in every
        row); selecting them by gather keeps shapes known on the host (no boolean indexing, no sync).
        """
        batch = tokens.shape[0]
        x = self.token_proj(tokens)
        buffer = cond[:, None, :].to(x.dtype).expand(batch, self.num_buffer_tokens, self.width)
        x = self.token_proj_norm(torch.cat([buffer, x], dim=1) + self.encoder_pos)
        index = self.sequence_positions(visible)
        if cache is not None:
            cache.set_pass(index, lazy=False)
        return self.encoder_norm(self.encoder(gather_positions(x, index), cache=cache))

    def decode(self, x: torch.Tensor, visible: torch.Tensor, cache: Optional[TokenCache] = None) -> torch.Tensor:
        """Decoder over all positions, mask tokens where the encoder saw nothing; returns ``z`` [B, L, W]."""
        x = self.decoder_embed(x)
        batch, total = x.shape[0], self.num_buffer_tokens + self.seq_len
        index = self.sequence_positions(visible)
        padded = self.mask_token.to(x.dtype).expand(batch, total, self.width)
        x = padded.scatter(1, index[..., None].expand(-1, -1, self.width), x)
        if cache is not None:
            cache.set_pass(torch.arange(total, device=x.device).expand(batch, -1), lazy=False)
        x = self.decoder_norm(self.decoder(x + self.decoder_pos, cache=cache))
        return x[:, self.num_buffer_tokens :] + self.head_pos

    def predict(
        self,
        tokens: torch.Tensor,
        visible: torch.Tensor,
        cond: torch.Tensor,
        caches: Optional[tuple[TokenCache, TokenCache]] = None,
    ) -> torch.Tensor:
        """``z`` at every position; with ``caches`` (encoder, decoder) also records their keys and values."""
        encoder_cache, decoder_cache = caches if caches is not None else (None, None)
        return self.decode(self.encode(tokens, visible, cond, encoder_cache), visible, decoder_cache)

    def new_token_caches(self, batch: int, *, device, dtype) -> tuple[TokenCache, TokenCache]:
        """Encoder and decoder ``TokenCache`` for lazy passes (``predict_lazy``)."""
        total = self.num_buffer_tokens + self.seq_len
        return tuple(
            TokenCache(
                len(stack.blocks),
                batch,
                stack.blocks[0].attn.num_heads,
                total,
                self.width // stack.blocks[0].attn.num_heads,
                device=device,
                dtype=dtype,
            )
            for stack in (self.encoder, self.decoder)
        )

    def predict_lazy(
        self,
        tokens: torch.Tensor,
        new: torch.Tensor,
        query: torch.Tensor,
        visible_keys: torch.Tensor,
        cond: torch.Tensor,
        caches: tuple[TokenCache, TokenCache],
    ) -> torch.Tensor:
        """``z`` [B, n, W] at positions ``query`` [B, n], reusing cached keys and values (token caching).

        The buffer (class condition ``cond`` [B, W]) and the tokens revealed since the last pass (``new``
        [B, m]) go through the encoder, attending to the cached encoder keys where ``visible_keys``
        [B, buffer + L]; the decoder recomputes those positions (the buffer's encoding changed with the context,
        the new tokens' input changed from the mask token) and the queried ones, attending to every cached
        decoder position. Every other position keeps its features from an earlier pass (after LazyMAR, which
        also recomputes the buffer).
        """
        encoder_cache, decoder_cache = caches
        nb = self.num_buffer_tokens
        batch = tokens.shape[0]
        x = self.token_proj(gather_positions(tokens, new))
        buffer = cond[:, None, :].to(x.dtype).expand(batch, nb, self.width)
        rows = self.sequence_positions(new)  # the buffer, then the new tokens
        x = self.token_proj_norm(torch.cat([buffer, x], dim=1) + self.encoder_pos[0, rows])
        encoder_cache.set_pass(rows, lazy=True, key_mask=visible_keys)
        x = self.decoder_embed(self.encoder_norm(self.encoder(x, cache=encoder_cache)))
        x = torch.cat(
            [x + self.decoder_pos[0, rows], self.mask_token.to(x.dtype) + self.decoder_pos[0, query + nb]], dim=1
        )
        decoder_cache.set_pass(torch.cat([rows, query + nb], dim=1), lazy=True)
        x = self.decoder_norm(self.decoder(x, cache=decoder_cache))
        return x[:, rows.shape[1] :] + self.head_pos[0, query]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, unconditional: bool = False) -> TrainingPass:
        """Training pass: ``z`` and the masked positions [B, n] (ascending) the loss is computed on; with
        ``unconditional`` also ``z`` of the same inputs under the null class (no gradient)."""
        batch = tokens.shape[0]
        ratio = sample_mask_ratio(*self.mask_ratio)
        num_masked = math.ceil(self.seq_len * ratio)
        orders = self.random_orders(batch, tokens.device)
        masked = orders[:, :num_masked].sort(dim=1).values
        visible = orders[:, num_masked:].sort(dim=1).values
        z = self.predict(tokens, visible, self.condition(labels))
        z_null = None
        if unconditional:
            with torch.no_grad():
                z_null = self.predict(tokens, visible, self.condition.unconditional(batch))
        return TrainingPass(z, masked, z_null)


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
        super().__init__(
            seq_len=seq_len, token_dim=token_dim, num_classes=num_classes, width=width, class_dropout=class_dropout
        )
        self.num_heads = num_heads
        self.expected_mask_ratio = 1.0  # every token is predicted in a training pass
        # Input position 0 holds the class token, position i > 0 token i - 1.
        self.pos = _learned_positions(seq_len, width)
        self.blocks = BlockStack(depth, width, num_heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.head_pos = _learned_positions(seq_len, width)
        for module in (self.token_proj, self.blocks, self.norm):
            module.apply(init_backbone_weights)

    def new_cache(self, batch: int, *, device, dtype, static: bool = False) -> Union[KVCache, StaticKVCache]:
        """The decoding KV cache: growing (``KVCache``) or of fixed length with a position mask (``static``)."""
        return (StaticKVCache if static else KVCache)(
            len(self.blocks.blocks),
            batch,
            self.num_heads,
            self.seq_len,
            self.width // self.num_heads,
            device=device,
            dtype=dtype,
        )

    def embed_inputs(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Input sequence ``[cond, tokens...]`` (no positions yet)."""
        return torch.cat([cond[:, None, :].to(tokens.dtype), self.token_proj(tokens)], dim=1)

    def hidden(
        self, inputs: torch.Tensor, start: int = 0, cache: Optional[Union[KVCache, StaticKVCache]] = None
    ) -> torch.Tensor:
        """``z`` for input positions ``start .. start + n``; with a cache, appends to it."""
        end = start + inputs.shape[1]
        x = self.blocks(inputs + self.pos[:, start:end], causal=True, cache=cache)
        return self.norm(x) + self.head_pos[:, start:end]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, unconditional: bool = False) -> TrainingPass:
        """Teacher-forced training pass: ``z`` and the loss positions (all of them) [B, L]; with
        ``unconditional`` also ``z`` under the null class (no gradient)."""
        z = self.hidden(self.embed_inputs(self.condition(labels), tokens[:, :-1]))
        z_null = None
        if unconditional:
            with torch.no_grad():
                z_null = self.hidden(self.embed_inputs(self.condition.unconditional(tokens.shape[0]), tokens[:, :-1]))
        return TrainingPass(z, torch.arange(self.seq_len, device=tokens.device).expand(tokens.shape[0], -1), z_null)
