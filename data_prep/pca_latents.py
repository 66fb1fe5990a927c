"""Images -> the offline PCA codec -> latent shards, in one call (the tests', benchmarks' and examples'
shortcut for `far-scale data fit-codec` followed by `far-scale data encode`, in this process)."""

from __future__ import annotations

from pathlib import Path

from data_prep.encode import EncodeJob, run_encode
from data_prep.fit_codec import fit_pca_codec

FIT_SEED = 0


def encode_with_pca(
    images: str | Path,
    out: str | Path,
    image_size: int,
    patch_size: int,
    dim: int,
    *,
    images_per_shard: int,
    max_images: int,
    max_patches: int,
    batch_size: int = 64,
    loader_workers: int = 0,
) -> tuple[Path, Path]:
    """Fit the codec on ``images`` into ``out/pca.safetensors`` and encode them into ``out/shards``; returns
    (codec weights, shards directory)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codec, shards = out / "pca.safetensors", out / "shards"
    fit_pca_codec(
        str(images),
        str(codec),
        image_size,
        patch_size,
        dim,
        max_images=max_images,
        max_patches=max_patches,
        seed=FIT_SEED,
    )
    encode_with_codec(images, codec, shards, image_size, images_per_shard, batch_size, loader_workers)
    return codec, shards


def encode_with_codec(
    images: str | Path,
    codec: str | Path,
    shards: str | Path,
    image_size: int,
    images_per_shard: int,
    batch_size: int = 64,
    loader_workers: int = 0,
) -> Path:
    """Encode ``images`` with an existing PCA codec into ``shards`` (quietly); returns ``shards``."""
    run_encode(
        EncodeJob(
            src=str(images),
            dst=str(shards),
            codec="pca",
            codec_weights=str(codec),
            image_size=image_size,
            images_per_shard=images_per_shard,
            batch_size=batch_size,
            loader_workers=loader_workers,
            progress=False,
        )
    )
    return Path(shards)
