"""An SD-style ``diffusers.AutoencoderKL`` (downsampling 8, 4 channels) from a local directory.

Tokens are 2 x 2 patches of the latent grid: 256 px -> 32 x 32 x 4 -> 256 tokens of 16.
Needs the optional ``diffusers`` package (``pip install -e '.[diffusers]'``); loads with
``local_files_only=True`` so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from far_scale.codecs.base import Codec, CodecError, CodecInfo, check_weights_file, patchify, unpatchify

NAME = "sd-vae"
DEFAULT_PATCH_SIZE = 2
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HOW_TO_GET = (
    "Save an AutoencoderKL with `save_pretrained(DIR)` (e.g. stabilityai/sd-vae-ft-ema) on a machine "
    "with internet access and pass DIR with --codec-weights."
)


class DiffusersVAECodec(Codec):
    def __init__(self, model, image_size: int, patch_size: int, weights_path: str, weights_sha256: str):
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        if image_size % (self.downsample * patch_size):
            raise CodecError(
                f"image size {image_size} is not divisible by downsampling {self.downsample} x patch size {patch_size}"
            )
        grid = image_size // self.downsample
        self.info = CodecInfo(
            NAME, image_size, (config.latent_channels, grid, grid), patch_size, True, weights_sha256, weights_path
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        image_size: int = 256,
        patch_size: int = DEFAULT_PATCH_SIZE,
        expected_sha256: str | None = None,
    ) -> "DiffusersVAECodec":
        directory = Path(directory)
        weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
        if not (directory / "config.json").is_file() or weights is None:
            raise CodecError(
                f"no AutoencoderKL at {directory}: expected config.json and one of "
                f"{', '.join(WEIGHT_FILES)}. {HOW_TO_GET}"
            )
        digest = check_weights_file(weights, expected_sha256, HOW_TO_GET)
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise CodecError("the sd-vae codec needs diffusers: pip install -e '.[diffusers]'") from None
        model = AutoencoderKL.from_pretrained(str(directory), local_files_only=True)
        return cls(model, image_size, patch_size, str(weights), digest)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        dist = self.model.encode(images.to(param.dtype)).latent_dist
        p = self.info.patch_size
        return torch.stack([patchify(dist.mean, p), patchify(dist.logvar, p)], dim=1).float()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        c, h, w = self.info.latent_shape
        param = next(self.model.parameters())
        grid = unpatchify(tokens.to(param.dtype), self.info.patch_size, c, h, w)
        return self.model.decode(grid).sample.float()

    def to(self, device, dtype=None) -> "DiffusersVAECodec":
        self.model.to(device=device, dtype=dtype)
        return self
