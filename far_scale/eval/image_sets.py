"""Sets of images to score: ADM-style ``.npz`` files (written byte-reproducibly), image folders, latent shards.

Every source yields uint8 ``[N, H, W, 3]`` batches with their class labels, so FID reference
statistics, the offline benchmark and sample files are computed by one code path.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from far_scale.data.contract import MANIFEST_NAME
from far_scale.data.images import list_images, load_image, to_uint8
from far_scale.data.storage import local_atomic_writer

IMAGES_KEY = "arr_0"  # ADM's reference batches and sample files: uint8 NHWC images
LABELS_KEY = "arr_1"  # and their class labels
# A fixed timestamp in the zip entries: the same arrays always give the same bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ImageBatch:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` with fixed zip metadata, written atomically (hidden partial file, fsync, rename)."""
    path = Path(path)
    with local_atomic_writer(path) as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
                archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE_TIME), buffer.getvalue())
    return path


def load_npz_images(path: str | Path) -> ImageBatch:
    """Images (and labels, -1 where absent) of an ADM-style ``.npz``; a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sample file at {path}")
    with np.load(path, allow_pickle=False) as data:
        if IMAGES_KEY not in data.files:
            raise ValueError(
                f"{path} has no {IMAGES_KEY!r} array (found {', '.join(data.files)}); expected "
                "uint8 [N, H, W, 3] images as `far-scale sample` and ADM write them"
            )
        images = data[IMAGES_KEY]
        labels = data[LABELS_KEY] if LABELS_KEY in data.files else np.full(len(images), -1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: {IMAGES_KEY} is {images.dtype} {images.shape}; expected uint8 [N, H, W, 3]")
    return ImageBatch(images, labels.astype(np.int64))


def iter_source(
    source: str, image_size: int, batch_size: int, max_images: Optional[int] = None, codec_weights: Optional[str] = None
) -> Iterator[ImageBatch]:
    """Batches from an ``.npz`` file, an image folder (center-cropped to ``image_size``) or a latent dataset
    URL (a directory or ``s3://`` prefix with ``manifest.json``; the stored image latents are decoded)."""
    limit = max_images or None
    if source.endswith(".npz"):
        batch = load_npz_images(source)
        for start in range(0, len(batch.images[:limit]), batch_size):
            end = min(start + batch_size, len(batch.images[:limit]))
            yield ImageBatch(batch.images[start:end], batch.labels[start:end])
        return
    from far_scale.data.storage import filesystem, join

    fs, root = filesystem(source)
    if fs.exists(join(root, MANIFEST_NAME)):
        yield from _iter_latent_dataset(source, batch_size, limit, codec_weights)
        return
    images = list_images(source)
    count = len(images) if limit is None else min(limit, len(images))
    for start in range(0, count, batch_size):
        end = min(start + batch_size, count)
        pixels = np.stack([load_image(images.root / p, image_size) for p in images.paths[start:end]])
        yield ImageBatch(pixels.transpose(0, 2, 3, 1), np.asarray(images.labels[start:end], dtype=np.int64))


def _iter_latent_dataset(
    url: str, batch_size: int, limit: Optional[int], codec_weights: Optional[str]
) -> Iterator[ImageBatch]:
    from far_scale.codecs import load_manifest_codec
    from far_scale.data.manifest import read_manifest
    from far_scale.data.shards import iter_tar_bytes
    from far_scale.data.storage import filesystem, join

    manifest = read_manifest(url)
    codec = load_manifest_codec(manifest.codec, codec_weights)
    fs, root = filesystem(url)
    pending, labels, seen = [], [], 0

    def flush() -> ImageBatch:
        tokens = torch.from_numpy(np.stack(pending).astype(np.float32))
        with torch.no_grad():
            pixels = to_uint8(codec.decode(tokens))
        batch = ImageBatch(pixels, np.asarray(labels, dtype=np.int64))
        pending.clear()
        labels.clear()
        return batch

    for entry in manifest.shards:
        if limit is not None and seen >= limit:
            break  # no further shard is read once the limit is reached
        for sample in iter_tar_bytes(fs.cat_file(join(root, entry.name)), entry.name):
            if limit is not None and seen >= limit:
                break
            pending.append(sample.latents[0, 0])  # the image (not its flip), posterior mean
            labels.append(sample.label)
            seen += 1
            if len(pending) == batch_size:
                yield flush()
    if pending:
        yield flush()
