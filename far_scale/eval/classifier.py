"""The offline benchmark's feature network: a small CNN classifier trained on the real images.

It plays the role Inception-v3 plays for FID where no pretrained network exists (the built-in
synthetic dataset): its class predictions give class accuracy, its penultimate features
the Fréchet distance and precision/recall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 256


@dataclass(frozen=True)
class ClassifierSettings:
    image_size: int = 64
    """Images are resized (bilinear, antialiased) to this size before the network."""
    width: int = 32
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    hflip: bool = True
    """Random horizontal flips in training: right for ImageNet-like data, wrong where a flip changes the class."""
    max_shift_px: int = 0
    """Random translations of up to this many pixels in training (empty border), for small centred data."""

    def as_dict(self) -> dict:
        return asdict(self)


class ConvClassifier(nn.Module):
    """Four stride-2 conv stages, global average pool, a feature layer and the class logits."""

    def __init__(self, num_classes: int, width: int, feature_dim: int):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        stages = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            stages += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
        self.stages = nn.Sequential(*stages)
        self.features = nn.Sequential(nn.Linear(channels[-1], feature_dim), nn.ReLU())
        self.logits = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.stages(x).mean(dim=(2, 3)))
        return features, self.logits(features)


def to_input(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, S, S]`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def augment(x: torch.Tensor, settings: ClassifierSettings, generator: torch.Generator) -> torch.Tensor:
    """Random flips and shifts of a batch in [-1, 1] (a shift fills the border with -1, black)."""
    if settings.hflip:
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = settings.max_shift_px
    if shift:
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator).tolist()
        size = x.shape[-1]
        x = torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])
    return x


def seeded_build(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the global RNG seeded (deterministic initial weights); the caller's RNG is restored."""
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(torch_state)


def fit(model: nn.Module, count: int, settings, batch_loss: Callable, generator: torch.Generator, progress=None):
    """Train ``model`` for ``settings.epochs`` epochs of shuffled batches of ``settings.batch_size`` of ``count``
    examples (``batch_loss(indices)`` -> loss), AdamW with a one-cycle schedule peaking at ``settings.lr``;
    returns it in eval mode. The loop of the offline benchmark's two feature networks."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, count // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(count, generator=generator)
        for step in range(steps_per_epoch):
            loss = batch_loss(order[step * settings.batch_size : (step + 1) * settings.batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress is not None:
            progress(epoch + 1, settings.epochs, loss.item())
    return model.eval()


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, settings: ClassifierSettings, progress=None
) -> ConvClassifier:
    """Train on uint8 images with the settings' augmentation (flips, shifts); deterministic."""
    generator = torch.Generator().manual_seed(settings.seed)
    model = seeded_build(lambda: ConvClassifier(num_classes, settings.width, settings.feature_dim), settings.seed)
    inputs = to_input(images, settings.image_size)
    targets = torch.from_numpy(labels).long()

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(augment(inputs[index], settings, generator))[1], targets[index])

    return fit(model, len(inputs), settings, batch_loss, generator, progress)


@torch.no_grad()
def classify(model: ConvClassifier, images: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, F]`` (float64) and predicted classes ``[N]`` of uint8 images."""
    features, predicted = [], []
    for start in range(0, len(images), EVAL_BATCH):
        f, logits = model(to_input(images[start : start + EVAL_BATCH], image_size))
        features.append(f.double().numpy())
        predicted.append(logits.argmax(dim=1).numpy())
    if not features:
        return np.zeros((0, model.logits.in_features)), np.zeros(0, dtype=np.int64)
    return np.concatenate(features), np.concatenate(predicted)
