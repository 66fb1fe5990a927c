"""The shape of a latent dataset as a model needs it, taken from the manifest (or a recipe's expectation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from far_scale.config.schema import DataExpectation


@dataclass(frozen=True)
class DataSpec:
    seq_len: int
    token_dim: int
    num_classes: int
    num_images: Optional[int] = None
    hflip_invariant: bool = True
    """False where the dataset card says a horizontal flip changes the class (digits)."""
    latent_bound: Optional[float] = None
    """Largest |token| of the data after normalization (``LatentNormalization.bound``); None where unknown (no
    manifest read, or one without per-dimension extremes)."""

    @classmethod
    def from_expectation(cls, expect: DataExpectation) -> "DataSpec":
        """Build from ``data.expect``; ValueError names each field that is missing."""
        missing = [f"data.expect.{n}" for n in ("seq_len", "token_dim", "num_classes") if getattr(expect, n) is None]
        if missing:
            raise ValueError(
                "the data shape is unknown: no manifest was found at data.url and the recipe does not set "
                + ", ".join(missing)
            )
        return cls(expect.seq_len, expect.token_dim, expect.num_classes, expect.num_images)  # type: ignore[arg-type]

    def mismatches(self, expect: DataExpectation) -> list[str]:
        """Fields where the recipe's expectation disagrees with this (manifest) spec."""
        return [
            f"data.expect.{name} is {getattr(expect, name)} but the manifest says {getattr(self, name)}"
            for name in ("seq_len", "token_dim", "num_classes", "num_images")
            if getattr(expect, name) is not None and getattr(expect, name) != getattr(self, name)
        ]
