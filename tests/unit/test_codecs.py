"""Codecs load real architectures from local files and fail clearly on missing or wrong weights."""

from __future__ import annotations

import pytest
import torch

from far_scale.codecs import CodecError, load_codec
from far_scale.codecs.base import patchify, sha256_file, unpatchify
from far_scale.codecs.kl16 import KL16Codec, KLAutoencoder
from far_scale.codecs.pca import PCACodec


def test_patchify_round_trip_and_layout():
    grid = torch.randn(2, 4, 8, 8)
    tokens = patchify(grid, 2)
    assert tokens.shape == (2, 16, 16)
    torch.testing.assert_close(unpatchify(tokens, 2, 4, 8, 8), grid)
    # Token 0 holds the top-left 2x2 patch of every channel, channel-major.
    torch.testing.assert_close(tokens[0, 0, :4], grid[0, 0, :2, :2].reshape(-1))


def test_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "kl16.ckpt"
    for name in ("pca", "kl16", "sd-vae"):
        with pytest.raises(CodecError, match=str(missing.parent)):
            load_codec(name, str(missing), 256)
    with pytest.raises(CodecError, match="unknown codec"):
        load_codec("vqgan", str(missing), 256)


def test_pca_checksum_mismatch_is_reported(tmp_path):
    codec = PCACodec.fit(
        [torch.rand(4, 3, 16, 16) * 2 - 1], patch_size=4, dim=8, image_size=16, max_patches=1000, seed=0
    )
    path = tmp_path / "pca.safetensors"
    digest = codec.save(path)
    assert load_codec("pca", str(path), 16, expected_sha256=digest).info.weights_sha256 == digest
    with pytest.raises(CodecError, match="expected 0000"):
        load_codec("pca", str(path), 16, expected_sha256="0000")
    with pytest.raises(CodecError, match="fitted for 16 px"):
        load_codec("pca", str(path), 32)


def test_kl16_architecture_round_trips_through_a_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = KLAutoencoder()
    # ~66M parameters: MAR's KL-16 VAE (LDM KL-f16, ch 128, ch_mult 1,1,2,2,4).
    assert 60e6 < sum(p.numel() for p in model.parameters()) < 70e6
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": model.state_dict()}, path)
    codec = load_codec("kl16", str(path), image_size=64, expected_sha256=sha256_file(path))
    assert isinstance(codec, KL16Codec) and codec.info.latent_shape == (16, 4, 4) and codec.info.posterior
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    moments = codec.encode(images)
    assert moments.shape == (2, 2, 16, 16)  # (mean, logvar) x 16 tokens x 16 dims
    with torch.no_grad():
        mean, _ = model.encode_moments(images)
    torch.testing.assert_close(moments[:, 0], patchify(mean, 1))
    assert codec.decode(moments[:, 0]).shape == (2, 3, 64, 64)


def test_kl16_wrong_file_is_explained(tmp_path):
    bad = tmp_path / "other.ckpt"
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, bad)
    with pytest.raises(CodecError, match="does not match the KL-16 architecture"):
        load_codec("kl16", str(bad), 256)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CodecError, match="cannot read"):
        load_codec("kl16", str(garbage), 256)


def test_sd_vae_loads_from_a_local_directory(tmp_path):
    import diffusers  # in the dev extra: a missing install must fail, not skip

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    vae.save_pretrained(tmp_path / "vae")
    codec = load_codec("sd-vae", str(tmp_path / "vae"), image_size=64)
    assert codec.info.latent_shape == (4, 8, 8) and codec.info.seq_len == 16 and codec.info.token_dim == 16
    moments = codec.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert moments.shape == (1, 2, 16, 16)
    assert codec.decode(moments[:, 0]).shape == (1, 3, 64, 64)
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(CodecError, match="config.json"):
        load_codec("sd-vae", str(tmp_path / "vae"), image_size=64)
