"""MAR's KL-16 autoencoder (LDM KL-VAE, 16 channels, downsampling 16), loaded from a local file.

The module names match MAR's released ``kl16.ckpt`` (``{"model": state_dict}``) so the
checkpoint loads strictly. Weights are loaded with ``weights_only=True``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from far_scale.codecs.base import Codec, CodecError, CodecInfo, check_weights_file, patchify, unpatchify

NAME = "kl16"
GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution
HOW_TO_GET = (
    "Download MAR's KL-16 VAE (kl16.ckpt, from the MAR repository's release) on a machine with "
    "internet access and pass its local path with --codec-weights."
)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as LDM


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: Sequence[nn.Module], attns: Sequence[nn.Module], resample: Optional[nn.Module], name: str):
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _run_middle(mid: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        resolution: int,
        attn_resolutions: Sequence[int],
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, resolution
        for index, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = index == len(ch_mult) - 1
            self.down.append(_level(blocks, attns, None if last else Downsample(block_in), "downsample"))
            res = res if last else res // 2
        self.mid = _middle(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for index, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[index](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_middle(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        levels = []
        for index in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[index]))
                block_in = ch * ch_mult[index]
            levels.insert(0, _level(blocks, [], Upsample(block_in) if index else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """LDM's AutoencoderKL as MAR configures it (ch 128, ch_mult 1,1,2,2,4; encoder attention at 16 px)."""

    def __init__(
        self,
        embed_dim: int = 16,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        resolution: int = 256,
        attn_resolutions: Sequence[int] = (16,),
    ):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, embed_dim, resolution, attn_resolutions)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.embed_dim = embed_dim
        self.downsample = 2 ** (len(ch_mult) - 1)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class KL16Codec(Codec):
    def __init__(self, model: KLAutoencoder, image_size: int, patch_size: int, weights_path: str, weights_sha256: str):
        if image_size % model.downsample or (image_size // model.downsample) % patch_size:
            raise CodecError(
                f"image size {image_size} is not divisible by the VAE's downsampling "
                f"{model.downsample} x token patch size {patch_size}"
            )
        self.model = model.eval().requires_grad_(False)
        grid = image_size // model.downsample
        self.info = CodecInfo(
            NAME, image_size, (model.embed_dim, grid, grid), patch_size, True, weights_sha256, weights_path
        )

    @classmethod
    def load(
        cls, path: str | Path, image_size: int = 256, patch_size: int = 1, expected_sha256: Optional[str] = None, **arch
    ) -> "KL16Codec":
        digest = check_weights_file(path, expected_sha256, HOW_TO_GET)
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with objects, a truncated file, not a checkpoint at all
            raise CodecError(f"cannot read {path} as a weights-only torch checkpoint: {exc}. {HOW_TO_GET}") from None
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise CodecError(f"{path} holds no state dict (expected {{'model': state_dict}}). {HOW_TO_GET}")
        # Training-only entries of the LDM checkpoint (the discriminator / LPIPS loss) are not ours.
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        model = KLAutoencoder(**arch)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CodecError(f"{path} does not match the KL-16 architecture: {str(exc)[:800]}") from None
        return cls(model, image_size, patch_size, str(path), digest)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        mean, logvar = self.model.encode_moments(images.to(param.dtype))
        p = self.info.patch_size
        return torch.stack([patchify(mean, p), patchify(logvar, p)], dim=1).float()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        c, h, w = self.info.latent_shape
        param = next(self.model.parameters())
        grid = unpatchify(tokens.to(param.dtype), self.info.patch_size, c, h, w)
        return self.model.decode(grid).float()

    def to(self, device, dtype=None) -> "KL16Codec":
        self.model.to(device=device, dtype=dtype)
        return self
