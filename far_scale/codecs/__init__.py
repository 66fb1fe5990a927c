"""Codecs (VAEs and the offline PCA stand-in) behind one interface; ``load_codec`` picks one by name."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from far_scale.codecs.base import Codec, CodecError, CodecInfo

CODEC_NAMES = ("pca", "kl16", "sd-vae")


def load_codec(
    name: str,
    weights: Optional[str],
    image_size: int,
    patch_size: Optional[int] = None,
    expected_sha256: Optional[str] = None,
) -> Codec:
    """Load codec ``name`` from local ``weights`` (a file, or a directory for sd-vae)."""
    if name not in CODEC_NAMES:
        raise CodecError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_NAMES)}")
    if not weights:
        raise CodecError(f"codec {name!r} needs local weights: pass --codec-weights PATH")
    if name == "pca":
        from far_scale.codecs.pca import PCACodec

        codec = PCACodec.load(weights, expected_sha256)
        if codec.info.image_size != image_size:
            raise CodecError(f"{weights} was fitted for {codec.info.image_size} px images, not {image_size}")
        return codec
    if name == "kl16":
        from far_scale.codecs.kl16 import KL16Codec

        return KL16Codec.load(weights, image_size, patch_size or 1, expected_sha256)
    from far_scale.codecs.diffusers_vae import DEFAULT_PATCH_SIZE, DiffusersVAECodec

    return DiffusersVAECodec.load(weights, image_size, patch_size or DEFAULT_PATCH_SIZE, expected_sha256)


def load_manifest_codec(info: Mapping[str, Any], weights: Optional[str] = None) -> Codec:
    """The codec a dataset was encoded with (checksum-checked), from its manifest's ``codec`` record;
    ``weights`` overrides the path."""
    return load_codec(
        info["name"],
        weights or info["weights_path"],
        info["image_size"],
        info["patch_size"],
        expected_sha256=info["weights_sha256"],
    )


__all__ = ["Codec", "CodecError", "CodecInfo", "CODEC_NAMES", "load_codec", "load_manifest_codec"]
