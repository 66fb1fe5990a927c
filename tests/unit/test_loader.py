"""The streaming loader: rank x worker split, epoch completeness, exact mid-epoch resume, loud errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from far_scale.data.loader import LatentLoader, LoaderPosition, sample_latent
from far_scale.data.manifest import read_manifest
from far_scale.data.normalization import LatentNormalization


def _epoch(loader: LatentLoader):
    return [(b.keys, b.latents, b.labels) for b in loader.epoch_batches()]


def _loader(url, **kwargs) -> LatentLoader:
    options = dict(rank=0, world_size=1, num_workers=0, batch_size=2, seed=7)
    options.update(kwargs)
    return LatentLoader(str(url), **options)


def test_rank_and_worker_split_is_disjoint_and_balanced(latent_dataset):
    all_keys = {f"{i:09d}" for i in range(128)}
    per_rank = []
    for rank in range(2):
        batches = _epoch(_loader(latent_dataset, rank=rank, world_size=2, num_workers=2))
        keys = [k for batch_keys, _, _ in batches for k in batch_keys]
        assert len(keys) == len(set(keys))
        per_rank.append((len(batches), set(keys)))
    assert per_rank[0][0] == per_rank[1][0]  # same number of steps on every rank
    assert not per_rank[0][1] & per_rank[1][1]
    assert per_rank[0][1] | per_rank[1][1] <= all_keys


def test_samples_split_covers_the_epoch_exactly_once_at_any_world_size(latent_dataset):
    def global_batches(world_size, accum):
        streams = [
            _epoch(
                _loader(latent_dataset, rank=r, world_size=world_size, batch_size=4, split="samples", grad_accum=accum)
            )
            for r in range(world_size)
        ]
        steps = len(streams[0]) // accum
        # Global micro-batch order: step-major, then rank, then accumulation index.
        return [streams[r][s * accum + m][0] for s in range(steps) for r in range(world_size) for m in range(accum)]

    one = global_batches(1, 2)
    two = global_batches(2, 1)
    assert one == two
    keys = [k for batch in two for k in batch]
    assert sorted(keys) == [f"{i:09d}" for i in range(128)]


def test_resume_mid_epoch_continues_exactly(latent_dataset):
    full = _epoch(_loader(latent_dataset, num_workers=2, batch_size=3))
    for consumed in (1, 4, 7):
        first = _loader(latent_dataset, num_workers=2, batch_size=3)
        head = list(itertools.islice(first.epoch_batches(), consumed))
        resumed = _loader(
            latent_dataset, num_workers=2, batch_size=3, position=LoaderPosition.from_dict(first.position.as_dict())
        )
        rest = _epoch(resumed)
        assert [b.keys for b in head] + [r[0] for r in rest] == [f[0] for f in full]
        for (_, a, _), (_, b, _) in zip(rest, full[consumed:]):
            assert np.array_equal(a.numpy(), b.numpy())  # same views and noise draws


def test_epochs_reshuffle_and_positions_advance(latent_dataset):
    loader = _loader(latent_dataset)
    first = [b.keys for b in loader.epoch_batches()]
    assert loader.position.epoch == 1
    second = [b.keys for b in loader.epoch_batches()]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))


def test_too_few_shards_is_explained(latent_dataset):
    with pytest.raises(ValueError, match=r"has 13 shards but 4 ranks x 4 loader workers need at least 16"):
        _loader(latent_dataset, world_size=4, num_workers=4)


def test_latents_are_scaled_views_of_the_stored_moments(latent_dataset):
    manifest = read_manifest(str(latent_dataset))
    batch = next(iter(_loader(latent_dataset, batch_size=16).epoch_batches()))
    scale = manifest.scale
    assert batch.latents.shape == (16, 16, 8)
    # Scaled by 1/std of the data: unit variance overall.
    assert 0.5 < float(batch.latents.std()) < 1.5
    stored = np.stack([np.ones((1, 2, 3)), 2 * np.ones((1, 2, 3))]).astype(np.float16)
    normalization = LatentNormalization.global_scale(scale, 3)
    views = {float(sample_latent(stored, np.random.default_rng(i), normalization)[0, 0]) for i in range(20)}
    assert views == {float(np.float32(scale)), float(np.float32(2 * np.float32(scale)))}
