"""The one sampling path of far-scale: class-balanced image sets, split over ranks by fixed batches.

Image ``i`` has class ``i mod num_classes`` and its own seed (from the run seed and ``i``), so it
is the same image whatever the world size; batches are fixed ranges of image indices and batch
``j`` belongs to rank ``j mod world_size``, so each batch is computed identically (same shapes) on
1 or N ranks. ``far-scale sample``, the trainer's periodic evaluation and its sample grids all
go through ``ImageGenerator`` and ``SamplingJob``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from far_scale.codecs.base import Codec
from far_scale.config.schema import EvalConfig
from far_scale.data.images import to_uint8
from far_scale.data.normalization import LatentNormalization
from far_scale.eval.image_sets import ImageBatch
from far_scale.models.generation import GraphReplay, SamplingNoise, SamplingOptions, generate
from far_scale.models.model import ARModel
from far_scale.planning.plan import resolve_head_steps


@dataclass(frozen=True)
class SamplingJob:
    """Which images: ``num_images`` of ``num_classes`` balanced classes, in batches of ``batch_size``."""

    num_images: int
    num_classes: int
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        for name in ("num_images", "num_classes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def indices(self, batch_id: int) -> np.ndarray:
        start = batch_id * self.batch_size
        return np.arange(start, min(start + self.batch_size, self.num_images), dtype=np.int64)

    def labels(self, indices: np.ndarray) -> np.ndarray:
        return indices % self.num_classes

    def batches_of_rank(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_batches, world_size))

    def image_seeds(self, indices: np.ndarray) -> list[int]:
        return [int(np.random.SeedSequence([self.seed, int(i)]).generate_state(1, np.uint64)[0] >> 1) for i in indices]


def sampling_options(ev: EvalConfig, head_kind: str) -> SamplingOptions:
    """The ``eval`` settings as sampler options: every ``SamplingOptions`` field that ``EvalConfig`` has, taken
    by name (a new setting touches the schema and the sampler, nothing in between); ``head_steps`` None is
    the head's default. Command-line shorthands (``--num-iter``...) arrive as ``eval.*`` overrides."""
    shared = {
        f.name: getattr(ev, f.name) for f in dataclasses.fields(SamplingOptions) if f.name in type(ev).model_fields
    }
    shared["head_steps"] = resolve_head_steps(ev.head_steps, head_kind)
    return SamplingOptions(**shared)


class ImageGenerator:
    """A model, the codec that decodes its tokens and the sampling settings: image indices -> uint8 images."""

    def __init__(
        self,
        model: ARModel,
        codec: Codec,
        normalization: LatentNormalization,
        options: SamplingOptions,
        device: torch.device,
        precision: str = "fp32",
        replay: Optional[GraphReplay] = None,
    ):
        self.model, self.codec, self.normalization, self.options = model, codec, normalization, options
        self.device, self.precision = device, precision
        self.replay = replay
        """A CUDA-graph compiled model's step marker and cache buffers (``compile_for_sampling``)."""
        codec.to(device)

    def with_options(self, options: SamplingOptions) -> "ImageGenerator":
        """The same model and codec sampling with other settings."""
        return ImageGenerator(
            self.model, self.codec, self.normalization, options, self.device, self.precision, self.replay
        )

    def images(self, job: SamplingJob, indices: np.ndarray) -> ImageBatch:
        return self.images_for(job.labels(indices), job.image_seeds(indices))

    def images_for(self, labels: np.ndarray, seeds: list[int]) -> ImageBatch:
        """Images of classes ``labels``, one per image seed (the same image whatever else is in the batch)."""
        noise = SamplingNoise.per_image(self.model, self.options, seeds, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            tokens = generate(
                self.model, torch.from_numpy(labels).to(self.device), self.options, noise, self.replay
            ).float()
        with torch.no_grad():
            pixels = to_uint8(self.codec.decode(self.normalization.denormalize(tokens)))
        return ImageBatch(pixels, labels)

    def timed_images(self, job: SamplingJob, indices: np.ndarray) -> tuple[ImageBatch, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        batch = self.images(job, indices)  # returns host arrays: the device work is done
        return batch, time.perf_counter() - start


def iter_rank_batches(
    generator: ImageGenerator, job: SamplingJob, rank: int, world_size: int, skip: frozenset[int] = frozenset()
) -> Iterator[tuple[int, ImageBatch, float]]:
    """(batch id, images, seconds) of this rank's batches that are not in ``skip``."""
    for batch_id in job.batches_of_rank(rank, world_size):
        if batch_id in skip:
            continue
        batch, seconds = generator.timed_images(job, job.indices(batch_id))
        yield batch_id, batch, seconds
