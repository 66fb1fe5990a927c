"""The offline codec: patch-wise PCA fitted on the dataset itself (a stand-in, not a VAE).

It needs no pretrained weights, so tests, the demo and CPU benchmarks run anywhere. Each
``patch x patch x 3`` image patch becomes one token of its first ``dim`` principal
components. Deterministic: the fit uses a seeded subset of patches and a sign convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save

from far_scale.codecs.base import Codec, CodecError, CodecInfo, check_weights_file, patchify, unpatchify
from far_scale.data.storage import write_atomic

NAME = "pca"
HOW_TO_GET = "Create it with `far-scale data fit-codec SRC OUT`."


class PCACodec(Codec):
    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        patch_size: int,
        image_size: int,
        weights_path: str = "",
        weights_sha256: str = "",
    ):
        if basis.shape[0] != 3 * patch_size**2 or mean.shape != (basis.shape[0],):
            raise CodecError(
                f"PCA weights have basis {tuple(basis.shape)} and mean {tuple(mean.shape)}; "
                f"expected ({3 * patch_size**2}, dim) and ({3 * patch_size**2},)"
            )
        self.mean, self.basis = mean.float(), basis.float()
        grid = image_size // patch_size
        dim = basis.shape[1]
        # Token = one image patch: latent grid [dim, grid, grid] with latent patch size 1.
        self.info = CodecInfo(NAME, image_size, (dim, grid, grid), 1, False, weights_sha256, weights_path)
        self.patch_size = patch_size

    @classmethod
    def fit(
        cls, images: Iterable[torch.Tensor], patch_size: int, dim: int, image_size: int, max_patches: int, seed: int
    ) -> "PCACodec":
        """Fit on image batches ``[B, 3, S, S]`` in [-1, 1], using at most ``max_patches`` seeded patches."""
        patches = torch.cat([patchify(batch.double(), patch_size).reshape(-1, 3 * patch_size**2) for batch in images])
        if patches.shape[0] < dim:
            raise CodecError(f"PCA needs at least {dim} patches to fit, got {patches.shape[0]}")
        generator = torch.Generator().manual_seed(seed)
        if patches.shape[0] > max_patches:
            patches = patches[torch.randperm(patches.shape[0], generator=generator)[:max_patches]]
        mean = patches.mean(0)
        _, _, vh = torch.linalg.svd(patches - mean, full_matrices=False)
        basis = vh[:dim].T.contiguous()
        # Sign convention: each component's largest-magnitude entry is positive (SVD signs are arbitrary).
        signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        return cls(mean, basis * signs, patch_size, image_size)

    def save(self, path: str | Path) -> str:
        """Write weights (safetensors, atomically) and return their sha256."""
        path = Path(path)
        write_atomic(
            path,
            save(
                {"mean": self.mean.contiguous(), "basis": self.basis.contiguous()},
                metadata={"patch_size": str(self.patch_size), "image_size": str(self.info.image_size)},
            ),
        )
        return check_weights_file(path, None, HOW_TO_GET)

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> "PCACodec":
        digest = check_weights_file(path, expected_sha256, HOW_TO_GET)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        try:
            return cls(
                tensors["mean"], tensors["basis"], int(meta["patch_size"]), int(meta["image_size"]), str(path), digest
            )
        except KeyError as exc:
            raise CodecError(f"{path} is not a PCA codec file (missing {exc}). {HOW_TO_GET}") from None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        tokens = patchify(images.to(self.mean.dtype), self.patch_size) - self.mean
        return (tokens @ self.basis)[:, None]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens.to(self.basis.dtype) @ self.basis.T + self.mean
        size = self.info.image_size
        return unpatchify(patches, self.patch_size, 3, size, size)

    def to(self, device, dtype=None) -> "PCACodec":
        self.mean, self.basis = self.mean.to(device), self.basis.to(device)
        return self
