"""The codec interface: images <-> continuous latent tokens (docs/concepts.md, latents).

A codec encodes images in [-1, 1] (``[B, 3, H, W]``) to *moments* in token layout
``[B, K, L, D]`` (K = 2: posterior mean and log-variance; K = 1: a deterministic code) and
decodes tokens ``[B, L, D]`` back to images. Tokens are ``patch_size`` x ``patch_size``
patches of the latent grid ``[C, h, w]``, so L = (h / p) (w / p) and D = C p^2.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HASH_CHUNK_BYTES = 1 << 20


class CodecError(RuntimeError):
    """A codec cannot be built: missing or wrong weights, bad shapes. The message says what to do."""


@dataclass(frozen=True)
class CodecInfo:
    """What the manifest records about the codec."""

    name: str
    image_size: int
    latent_shape: tuple[int, int, int]
    patch_size: int
    posterior: bool
    weights_sha256: str
    weights_path: str

    @property
    def seq_len(self) -> int:
        return (self.latent_shape[1] // self.patch_size) * (self.latent_shape[2] // self.patch_size)

    @property
    def token_dim(self) -> int:
        return self.latent_shape[0] * self.patch_size**2

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "latent_shape": list(self.latent_shape),
            "seq_len": self.seq_len,
            "token_dim": self.token_dim,
        }


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_file(path: str | Path, expected_sha256: str | None, how_to_get: str) -> str:
    """The file's sha256; a ``CodecError`` naming the path (and the expected checksum) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CodecError(f"codec weights not found: {path}. {how_to_get} Nothing is downloaded at run time.")
    actual = sha256_file(path)
    if expected_sha256 and actual != expected_sha256:
        raise CodecError(
            f"codec weights {path} have sha256 {actual}, expected {expected_sha256}. "
            f"The file is corrupt or a different checkpoint. {how_to_get}"
        )
    return actual


def patchify(grid: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/p)(w/p), C p p]`` (MAR's token layout)."""
    b, c, h, w = grid.shape
    x = grid.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


class Codec(ABC):
    info: CodecInfo

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> moments ``[B, K, L, D]``."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, D]`` (unscaled) -> images ``[B, 3, H, W]`` in about [-1, 1]."""

    @abstractmethod
    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Codec":
        """Move weights; returns self."""
