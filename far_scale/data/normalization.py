"""How codec latents become the tokens a model trains on, and back (docs/concepts.md, latents).

``token = (latent - shift) * scale`` per token dimension, ``latent = token / scale + shift``:

- ``global`` (MAR): one scale for every dimension, the manifest's 1 / std over all of them, no shift.
  Bit-identical to the scalar multiply of earlier versions.
- ``channel``: each latent channel standardized by its own mean and std (the manifest's ``channel_mean`` /
  ``channel_std``, repeated over the channel's patch positions in a token).

Under ``global`` a dimension with a large spread stays large: the patch-PCA codec's first component (the ink of a
patch) has 2.45x the overall std and reaches 12.7, far beyond the shortcut head's old clamp of 4. ``bound`` is the
largest |token| the data holds after normalization (from the manifest's per-dimension extremes); the head's
``clip_value: auto`` follows it.

The training loader, the sampler's decoding and the evaluation all apply one ``LatentNormalization``; checkpoints
and exports record it (``meta.json``) so that sampling anywhere decodes as training encoded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

NORMALIZATION_MODES = ("global", "channel")


class NormalizationError(ValueError):
    """The data's statistics cannot give the requested normalization; the message names the field and the fix."""


@dataclass(frozen=True)
class LatentNormalization:
    mode: str
    shift: tuple[float, ...]
    """Per token dimension, subtracted before scaling (all 0 for ``global``)."""
    scale: tuple[float, ...]
    """Per token dimension (one value repeated for ``global``)."""
    bound: Optional[float] = None
    """Largest |token| in the data after normalization; None where the statistics hold no extremes."""

    @classmethod
    def global_scale(cls, scale: float, token_dim: int, bound: Optional[float] = None) -> "LatentNormalization":
        """MAR's single scale factor (what every checkpoint written before normalization modes used)."""
        return cls("global", (0.0,) * token_dim, (float(scale),) * token_dim, bound)

    @classmethod
    def from_stats(
        cls, mode: str, stats: Mapping[str, Any], scale: float, token_dim: int, where: str
    ) -> "LatentNormalization":
        """The normalization ``mode`` of a dataset from its manifest ``stats`` and global ``scale``.

        ``where`` (the manifest's URL) goes into every error."""
        if mode not in NORMALIZATION_MODES:
            raise NormalizationError(f"data.normalize={mode!r}: expected one of {', '.join(NORMALIZATION_MODES)}")
        if mode == "global":
            shift, per_dim = np.zeros(token_dim), np.full(token_dim, float(scale))
        else:
            means, stds = stats.get("channel_mean"), stats.get("channel_std")
            if not means or not stds or len(means) != len(stds) or token_dim % len(means):
                raise NormalizationError(
                    f"{where}: stats.channel_mean / channel_std are missing or do not divide the token dimension "
                    f"{token_dim}: data.normalize=channel needs them; re-write the manifest with `far-scale data "
                    "restat URL`, or train with data.normalize=global"
                )
            if min(stds) <= 0:
                dead = [c for c, s in enumerate(stds) if s <= 0]
                raise NormalizationError(
                    f"{where}: latent channel(s) {dead} have std 0 (constant): data.normalize=channel would divide "
                    "by zero; train with data.normalize=global"
                )
            per_channel = token_dim // len(means)
            shift = np.repeat(np.asarray(means, dtype=np.float64), per_channel)
            per_dim = np.repeat(1.0 / np.asarray(stds, dtype=np.float64), per_channel)
        bound = None
        low, high = stats.get("dim_min"), stats.get("dim_max")
        if low is not None and high is not None and len(low) == len(high) == token_dim:
            extremes = np.maximum(np.abs(np.asarray(low) - shift), np.abs(np.asarray(high) - shift)) * per_dim
            bound = float(extremes.max())
        return cls(mode, tuple(float(v) for v in shift), tuple(float(v) for v in per_dim), bound)

    @property
    def token_dim(self) -> int:
        return len(self.scale)

    @property
    def is_global(self) -> bool:
        return self.mode == "global"

    def normalize_array(self, latents: np.ndarray) -> np.ndarray:
        """float32 latents ``[..., D]`` -> tokens (numpy: the data loader's workers)."""
        if self.is_global:
            return latents * self.scale[0]
        return (latents - np.asarray(self.shift, dtype=np.float32)) * np.asarray(self.scale, dtype=np.float32)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., D]`` -> tokens."""
        if self.is_global:
            return latents * self.scale[0]
        shift, scale = self._vectors(latents)
        return (latents - shift) * scale

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[..., D]`` -> latents the codec decodes."""
        if self.is_global:
            return tokens / self.scale[0]
        shift, scale = self._vectors(tokens)
        return tokens / scale + shift

    def _vectors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"device": like.device, "dtype": like.dtype}
        return torch.tensor(self.shift, **kwargs), torch.tensor(self.scale, **kwargs)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_record(
        cls, record: Optional[Mapping[str, Any]], scale: float, token_dim: int, where: str
    ) -> "LatentNormalization":
        """What a checkpoint's or export's ``meta.json`` says: its normalization record, or (written before
        normalization modes) the global ``scale``, as every such run trained."""
        return cls.global_scale(scale, token_dim) if record is None else cls.from_dict(record, where)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "LatentNormalization":
        try:
            mode, shift, scale = data["mode"], tuple(map(float, data["shift"])), tuple(map(float, data["scale"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise NormalizationError(f"{where}: malformed normalization record ({exc!r})") from None
        if mode not in NORMALIZATION_MODES or len(shift) != len(scale):
            raise NormalizationError(f"{where}: malformed normalization record {dict(data)!r}")
        bound = data.get("bound")
        return cls(mode, shift, scale, None if bound is None else float(bound))

    def describe(self) -> str:
        """One line for banners and check-config."""
        bound = "unknown (no per-dimension extremes in the manifest)" if self.bound is None else f"{self.bound:.3g}"
        if self.is_global:
            return f"global: tokens = latents x {self.scale[0]:.4g}; largest |token| {bound}"
        spread = f"{min(self.scale):.3g}-{max(self.scale):.3g}"
        return f"channel: each channel to mean 0, std 1 (scales {spread}); largest |token| {bound}"
