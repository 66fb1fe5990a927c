"""The offline benchmark's second feature space: a small convolutional autoencoder trained on the real images.

The classifier (``classifier.py``) learns what tells the classes apart and may ignore the rest: a digit whose
stroke breaks into fragments can still read as that digit. An autoencoder is trained on no label at all: its
bottleneck has to keep whatever it needs to redraw the image (stroke continuity, thickness, stray specks), so
Fréchet distances in its space see what the classifier's may not (EDM2 reports FD in two feature spaces for the
same reason). A ranking stands only where both spaces agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from far_scale.eval.classifier import EVAL_BATCH, fit, seeded_build, to_input


@dataclass(frozen=True)
class AutoencoderSettings:
    width: int = 32
    feature_dim: int = 64
    """Bottleneck size: the feature vector Fréchet distances are computed on."""
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1
    """Different from the classifier's seed: the two networks share no initial draw."""

    def as_dict(self) -> dict:
        return asdict(self)


class ConvAutoencoder(nn.Module):
    """Three stride-2 conv stages to a ``feature_dim`` bottleneck and back (images of a multiple of 8 px)."""

    def __init__(self, image_size: int, width: int, feature_dim: int):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"the autoencoder needs an image size divisible by 8, got {image_size}")
        self.grid = image_size // 8
        channels = [3, width, 2 * width, 4 * width]
        down, up = [], []
        for cin, cout in zip(channels[:-1], channels[1:]):
            down += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.GELU()]
        for cin, cout in zip(channels[:0:-1], channels[-2::-1]):
            up += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.GELU()]
        up[-1] = nn.Tanh()  # images in [-1, 1]
        self.down, self.up = nn.Sequential(*down), nn.Sequential(*up)
        flat = channels[-1] * self.grid**2
        self.to_code = nn.Linear(flat, feature_dim)
        self.from_code = nn.Linear(feature_dim, flat)
        self.channels = channels[-1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_code(self.down(x).flatten(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(x)
        hidden = self.from_code(code).view(len(x), self.channels, self.grid, self.grid)
        return code, self.up(hidden)


def train_autoencoder(
    images: np.ndarray, image_size: int, settings: AutoencoderSettings, progress=None
) -> ConvAutoencoder:
    """Train on uint8 images (no labels, no augmentation) to reconstruct them; deterministic."""
    generator = torch.Generator().manual_seed(settings.seed)
    model = seeded_build(lambda: ConvAutoencoder(image_size, settings.width, settings.feature_dim), settings.seed)
    inputs = to_input(images, image_size)

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        x = inputs[index]
        return F.mse_loss(model(x)[1], x)

    return fit(model, len(inputs), settings, batch_loss, generator, progress)


@torch.no_grad()
def encode_images(model: ConvAutoencoder, images: np.ndarray, image_size: int) -> np.ndarray:
    """Bottleneck features ``[N, F]`` (float64) of uint8 images."""
    parts = [
        model.encode(to_input(images[start : start + EVAL_BATCH], image_size)).double().numpy()
        for start in range(0, len(images), EVAL_BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.to_code.out_features))


@torch.no_grad()
def reconstruction_error(model: ConvAutoencoder, images: np.ndarray, image_size: int) -> float:
    """Mean squared error in [-1, 1] units of the autoencoder's own reconstructions (how much it keeps)."""
    x = to_input(images, image_size)
    return float(F.mse_loss(model(x)[1], x))
