"""The evaluation sampler's bookkeeping: balanced classes, a disjoint and complete split, per-image seeds."""

from __future__ import annotations

import numpy as np
import pytest

from far_scale.config.schema import EvalConfig
from far_scale.eval.image_generator import SamplingJob, sampling_options


def test_classes_are_balanced_and_batches_split_disjointly_over_ranks():
    job = SamplingJob(num_images=103, num_classes=10, batch_size=8, seed=3)
    labels = job.labels(np.arange(100))
    assert np.bincount(labels).tolist() == [10] * 10
    for world_size in (1, 2, 3, 5):
        batches = [b for rank in range(world_size) for b in job.batches_of_rank(rank, world_size)]
        indices = np.concatenate([job.indices(b) for b in batches])
        assert sorted(indices.tolist()) == list(range(103)), world_size


def test_an_image_seed_depends_on_the_run_seed_and_its_index_only():
    small, large = SamplingJob(50, 10, 4, seed=7), SamplingJob(50, 10, 25, seed=7)
    indices = np.arange(50)
    assert small.image_seeds(indices) == large.image_seeds(indices)
    assert len(set(small.image_seeds(indices))) == 50
    assert SamplingJob(50, 10, 4, seed=8).image_seeds(indices[:5]) != small.image_seeds(indices[:5])


def test_sampling_options_are_the_recipes_eval_settings():
    ev = EvalConfig(num_iter=32, cfg_scale=2.0, temperature=0.9)
    options = sampling_options(ev, "shortcut")
    assert (options.num_iter, options.head_steps, options.cfg_scale, options.temperature) == (32, 8, 2.0, 0.9)
    options = sampling_options(ev.model_copy(update={"num_iter": 16, "cfg_scale": 1.0}), "diffusion")
    assert (options.num_iter, options.head_steps, options.cfg_scale) == (16, 100, 1.0)
    assert sampling_options(EvalConfig(head_steps=2), "shortcut").head_steps == 2


def test_every_shared_setting_reaches_the_sampler_by_name():
    """A new sampling setting needs a field in EvalConfig and in SamplingOptions, nothing in between."""
    import dataclasses

    from far_scale.models.generation import SamplingOptions

    shared = [f.name for f in dataclasses.fields(SamplingOptions) if f.name in EvalConfig.model_fields]
    assert {"num_iter", "cfg_scale", "temperature", "head_steps_end", "guidance_refresh_every"} <= set(shared)
    changed = {
        "num_iter": 7,
        "cfg_scale": 3.5,
        "cfg_schedule": "constant",
        "temperature": 0.5,
        "head_steps": 4,
        "head_steps_end": 2,
        "mask_schedule_power": 2.0,
        "backbone_refresh_every": 3,
        "guidance_refresh_every": 2,
        "fast_ddpm": True,
    }
    options = sampling_options(EvalConfig(**changed), "shortcut")
    assert {name: getattr(options, name) for name in changed} == changed


def test_more_iterations_than_tokens_are_refused_in_one_rule():
    from far_scale.models.generation import (
        SamplingOptions,
        num_iter_problem,
        plan_generation,
    )

    message = num_iter_problem(32, 16)
    assert message.startswith("eval.num_iter=32 exceeds the sequence length 16")
    with pytest.raises(ValueError, match="eval.num_iter=32 exceeds"):
        plan_generation(SamplingOptions(num_iter=32), 16, "masked", lambda first, last, progress: first)


def test_a_job_rejects_empty_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        SamplingJob(10, 10, 0)


def test_acceleration_options_come_from_the_recipe():
    ev = EvalConfig(
        head_steps_end=1, mask_schedule_power=2.0, backbone_refresh_every=4, guidance_refresh_every=2, fast_ddpm=True
    )
    options = sampling_options(ev.model_copy(update={"head_steps": 8}), "shortcut")
    assert (options.head_steps, options.head_steps_end, options.mask_schedule_power) == (8, 1, 2.0)
    assert (options.backbone_refresh_every, options.guidance_refresh_every, options.fast_ddpm) == (4, 2, True)
    plain = sampling_options(EvalConfig(), "shortcut")
    assert (plain.head_steps_end, plain.backbone_refresh_every, plain.guidance_refresh_every) == (None, 1, 1)


def test_sampling_overrides_may_change_only_how_it_samples(tmp_path):
    from far_scale.eval.sample_job import load_sampling_model

    with pytest.raises(ValueError, match="model.arch=mar"):
        load_sampling_model(tmp_path, overrides=("eval.num_iter=4", "model.arch=mar"))
