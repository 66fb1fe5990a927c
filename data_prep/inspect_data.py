"""``far-scale data inspect``: what a latent dataset holds, in numbers and as a picture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from far_scale.codecs import CodecError, load_manifest_codec
from far_scale.data.images import to_uint8
from far_scale.data.manifest import Manifest, read_manifest
from far_scale.data.shards import iter_tar_bytes
from far_scale.data.storage import filesystem, join
from far_scale.eval.grid import save_grid

HISTOGRAM_WIDTH = 40


def summarize(manifest: Manifest, labels: Counter) -> str:
    codec, source, stats = manifest.codec, manifest.source, manifest.stats
    lines = [
        f"images: {source['num_images']} in {len(manifest.shards)} shards "
        f"({manifest.images_per_shard} per shard), {len(source['classes'])} classes, from {source['root']}",
        f"codec: {codec['name']} latent {codec['latent_shape']} -> {codec['seq_len']} tokens x {codec['token_dim']} "
        f"(patch {codec['patch_size']}), {'posterior mean+logvar' if codec['posterior'] else 'deterministic'}, "
        f"weights sha256 {codec['weights_sha256'][:12]}...",
        f"latents: mean {stats['mean']:.4f}, std {stats['std']:.4f} -> scale {stats['scale']:.4f}",
        "per-channel mean: " + " ".join(f"{v:+.3f}" for v in stats["channel_mean"]),
        "per-channel std:  " + " ".join(f"{v:.3f}" for v in stats["channel_std"]),
        f"created: {manifest.created.get('time')} by `{manifest.created.get('command')}`",
        "class histogram (sampled shards):" if labels else "",
    ]
    most = max(labels.values(), default=1)
    for label in sorted(labels):
        name = source["classes"][label]
        lines.append(
            f"  {label:4d} {name[:24]:24s} {labels[label]:6d} " + "#" * max(1, labels[label] * HISTOGRAM_WIDTH // most)
        )
    return "\n".join(line for line in lines if line)


def inspect_dataset(
    url: str, out_png: Optional[str], num_images: int = 16, max_shards: int = 8, codec_weights: Optional[str] = None
) -> str:
    """Summary text; writes a grid (row pairs: decoded image, decoded flip) to ``out_png``."""
    manifest = read_manifest(url)
    fs, root = filesystem(url)
    labels: Counter = Counter()
    picked = []
    for entry in manifest.shards[:max_shards]:
        for sample in iter_tar_bytes(fs.cat_file(join(root, entry.name)), entry.name):
            labels[sample.label] += 1
            if len(picked) < num_images:
                picked.append(sample)
    text = summarize(manifest, labels)
    if out_png and picked:
        try:
            codec = load_manifest_codec(manifest.codec, codec_weights)
        except CodecError as exc:
            return text + f"\nno grid: {exc}"
        tokens = torch.from_numpy(np.stack([s.latents[view, 0] for view in (0, 1) for s in picked]).astype(np.float32))
        save_grid(to_uint8(codec.decode(tokens)), Path(out_png), columns=len(picked))
        text += f"\ngrid of {len(picked)} decoded samples (top: image, bottom: stored flip): {out_png}"
    return text
