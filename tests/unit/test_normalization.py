"""Latent normalization (data.normalize) and the shortcut head's data-following clamp (clip_value: auto)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from far_scale.codecs import load_manifest_codec
from far_scale.config.loader import ConfigError, load_config
from far_scale.data.images import list_images, load_image
from far_scale.data.loader import LatentLoader
from far_scale.data.manifest import read_manifest
from far_scale.data.normalization import LatentNormalization, NormalizationError
from far_scale.data.spec import DataSpec
from far_scale.models.heads import ShortcutHead
from far_scale.planning.builder import NOISE_REACH, resolve_clip_value
from far_scale.planning.plan import resolve_data


def _stored_means(shards) -> np.ndarray:
    """Every stored mean moment (image view) of the dataset, [N, L, D] float32."""
    from far_scale.data.shards import iter_tar_bytes

    manifest = read_manifest(str(shards))
    samples = [s for e in manifest.shards for s in iter_tar_bytes((shards / e.name).read_bytes(), e.name)]
    return np.stack([s.latents[0, 0] for s in samples]).astype(np.float32)


@pytest.mark.parametrize("mode", ["global", "channel"])
def test_encode_normalize_denormalize_decode_is_the_codecs_reconstruction(latent_dataset, mode):
    manifest = read_manifest(str(latent_dataset))
    codec = load_manifest_codec(manifest.codec)
    images = list_images(latent_dataset.parent / "images")
    pixels = np.stack([load_image(images.root / p, 32) for p in images.paths[:8]])
    x = torch.from_numpy(pixels).float() / 127.5 - 1.0
    latents = codec.encode(x)[:, 0]
    normalization = manifest.normalization(mode, "test")
    tokens = normalization.normalize(latents)
    torch.testing.assert_close(
        codec.decode(normalization.denormalize(tokens)), codec.decode(latents), rtol=0, atol=1e-5
    )
    # numpy (loader workers) and torch (sampler) agree
    np.testing.assert_allclose(normalization.normalize_array(latents.numpy()), tokens.numpy(), rtol=0, atol=1e-6)


def test_channel_mode_gives_each_dimension_unit_spread_and_global_keeps_the_old_scale(latent_dataset):
    manifest = read_manifest(str(latent_dataset))
    stored = _stored_means(latent_dataset).reshape(-1, manifest.codec["token_dim"])
    channel = manifest.normalization("channel", "test").normalize_array(stored)
    np.testing.assert_allclose(channel.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(channel.std(0), 1.0, rtol=0.02)
    # global: the single scale of every earlier version, bit for bit
    old = stored * manifest.scale
    assert np.array_equal(manifest.normalization("global", "test").normalize_array(stored), old)
    # spread differs by dimension under global (the PCA codec's first component dominates)
    assert old.std(0).max() > 2 * old.std(0).min()


@pytest.mark.parametrize("mode", ["global", "channel"])
def test_bound_is_the_largest_normalized_token_in_the_data(latent_dataset, mode):
    manifest = read_manifest(str(latent_dataset))
    normalization = manifest.normalization(mode, "test")
    stored = _stored_means(latent_dataset)
    # both views are in the statistics; the image views alone cannot exceed the bound and nearly reach it
    largest = float(np.abs(normalization.normalize_array(stored)).max())
    assert largest <= normalization.bound * (1 + 1e-6)
    assert largest >= 0.8 * normalization.bound


def test_loader_yields_channel_normalized_tokens(latent_dataset):
    loader = LatentLoader(
        str(latent_dataset), rank=0, world_size=1, num_workers=0, batch_size=16, seed=0, normalize="channel"
    )
    batch = next(iter(loader.epoch_batches()))
    tokens = batch.latents.reshape(-1, batch.latents.shape[-1])
    assert float(tokens.abs().max()) <= loader.normalization.bound * (1 + 1e-6)
    assert loader.spec.latent_bound == loader.normalization.bound


def test_meta_record_round_trips_and_old_metas_decode_with_the_global_scale(latent_dataset):
    manifest = read_manifest(str(latent_dataset))
    channel = manifest.normalization("channel", "test")
    assert LatentNormalization.from_record(json.loads(json.dumps(channel.as_dict())), 9.9, 8, "m") == channel
    old = LatentNormalization.from_record(None, manifest.scale, 8, "m")
    tokens = torch.randn(2, 16, 8)
    assert torch.equal(old.denormalize(tokens), tokens / manifest.scale)  # what every earlier sampler did
    with pytest.raises(NormalizationError, match="meta.json"):
        LatentNormalization.from_record({"mode": "channel"}, 1.0, 8, "run/meta.json")


def _without_extremes(latent_dataset, tmp_path):
    """A copy of the dataset whose manifest predates per-dimension extremes."""
    old = tmp_path / "old-shards"
    shutil.copytree(latent_dataset, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("dim_min", "dim_max"):
        manifest["stats"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    for sidecar in old.glob("*.stats.json"):
        record = json.loads(sidecar.read_text())
        record.pop("min"), record.pop("max")
        sidecar.write_text(json.dumps(record))
    return old


def test_auto_clamp_on_an_old_manifest_is_refused_naming_the_file_and_restat_fixes_it(
    latent_dataset, tmp_path, repo_root
):
    from data_prep.restat import restat_dataset
    from far_scale.planning.plan import plan_for

    old = _without_extremes(latent_dataset, tmp_path)
    recipe = repo_root / "recipes" / "far_tiny_synth64.yaml"
    data = (f"data.url={old}", "data.expect.seq_len=16", "data.expect.token_dim=8", "data.expect.num_classes=4")
    cfg = load_config(recipe, (*data, "model.head.clip_value=auto"))

    with pytest.raises(ConfigError, match=rf"{old}/manifest.json records no per-dimension extremes.*data restat {old}"):
        plan_for(cfg, 1, resolve_data(cfg))
    # the old constant still trains on it as before
    constant = load_config(recipe, (*data, "model.head.clip_value=4"))
    assert plan_for(constant, 1, resolve_data(constant)).clip_value == 4.0
    restat_dataset(str(old), progress=False)
    plan = plan_for(cfg, 1, resolve_data(cfg))
    original = read_manifest(str(latent_dataset))
    assert plan.clip_value == pytest.approx(original.normalization("global", "x").bound + NOISE_REACH)
    assert read_manifest(str(old)).stats == original.stats  # the same statistics as the encoder wrote


def test_clip_value_resolution():
    from far_scale.config.schema import HeadConfig

    assert resolve_clip_value(HeadConfig(clip_value=4.0), DataSpec(16, 8, 4, latent_bound=12.0)) == 4.0
    assert resolve_clip_value(HeadConfig(clip_value="auto"), DataSpec(16, 8, 4, latent_bound=12.0)) == 17.0
    assert resolve_clip_value(HeadConfig(clip_value="auto"), DataSpec(16, 8, 4)) is None


def _head(clip_value):
    torch.manual_seed(0)
    return ShortcutHead(
        2, 8, 16, 1, num_levels=8, self_consistency_fraction=0.5, clip_value=clip_value, guidance_distillation_scale=1
    )


def test_clamp_lets_the_midpoint_and_target_reach_a_token_the_data_holds(monkeypatch):
    """A real token at (10, -9), beyond the old bound of 4, and a head that has learned the straight path to it
    (velocity (x1 - x) / (1 - t)). From noise at t = 0 with d = 1, the two half steps pass the midpoint (5, -4.5)
    and their mean is the full velocity x1 - x0. With the data's bound both are reached; with the old constant 4
    the midpoint is cut to (4, -4) and the target to (4, -4)."""
    x1 = torch.tensor([[10.0, -9.0]])
    x0 = torch.zeros(1, 2)
    bound = float(x1.abs().max())
    z = torch.zeros(1, 8)
    level = torch.tensor([0])  # d = 1: two half steps of 1/2 from t = 0
    t = torch.zeros(1, dtype=torch.float64)
    for clip, midpoint, target in (
        (bound + NOISE_REACH, (x0 + x1) / 2, x1 - x0),
        (4.0, torch.tensor([[4.0, -4.0]]), torch.tensor([[4.0, -4.0]])),
    ):
        head = _head(clip)
        seen = []

        def straight(x, tt, lvl, zz, net=None):
            seen.append(x.clone())
            return (x1 - x) / (1 - tt.to(x.dtype)[:, None])

        monkeypatch.setattr(head, "velocity", straight)
        torch.testing.assert_close(head.consistency_target(x0, t, level, z), target)
        torch.testing.assert_close(seen[1], midpoint)


def test_a_model_built_without_the_datas_reach_clamps_nothing():
    """auto on a data shape with no extremes (synthetic tokens): no clamp, like MAR; a far target is kept whole."""
    head = _head(None)
    with torch.no_grad():
        head.net.final.linear.bias.copy_(torch.tensor([30.0, -30.0]))
    target = head.consistency_target(
        torch.zeros(1, 2), torch.zeros(1, dtype=torch.float64), torch.tensor([0]), torch.zeros(1, 8)
    )
    torch.testing.assert_close(target, torch.tensor([[30.0, -30.0]]))
