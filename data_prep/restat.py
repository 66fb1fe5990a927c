"""``far-scale data restat``: recompute a dataset's latent statistics from its shards.

Manifests written before far-scale recorded per-dimension extremes (``stats.dim_min`` / ``dim_max``) cannot give
the shortcut head's ``clip_value: auto`` its bound. This job re-reads every shard (checking its size and sha256
against the manifest), rewrites each shard's stats sidecar and then the manifest's ``stats`` (atomically, last).
The shards themselves are not touched; the statistics of unchanged shards come out the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from tqdm import tqdm

from data_prep.encode import ShardStats
from far_scale.data.contract import stats_name
from far_scale.data.manifest import Manifest, combine_stats, read_manifest, write_manifest
from far_scale.data.shards import iter_tar_bytes
from far_scale.data.storage import filesystem, join, write_bytes_atomic
from far_scale.errors import ActionableError


class RestatError(ActionableError, ValueError):
    """A shard differs from its manifest entry; nothing was rewritten."""


def restat_dataset(url: str, progress: bool = True) -> Manifest:
    """Rewrite every sidecar's statistics and the manifest's ``stats`` from the shards' contents."""
    manifest = read_manifest(url)
    fs, root = filesystem(url)
    token_dim = int(manifest.codec["token_dim"])
    prefix = manifest.shards[0].name.rsplit("-", 1)[0]
    records = []
    for index, entry in enumerate(tqdm(manifest.shards, unit="shard", desc="restat", disable=not progress)):
        data = fs.cat_file(join(root, entry.name))
        if len(data) != entry.num_bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise RestatError(
                f"{url}/{entry.name} differs from its manifest entry (size or sha256): run `far-scale data verify "
                f"{url}` and re-encode the bad shards before recomputing statistics; nothing was rewritten"
            )
        stats = ShardStats(token_dim)
        for sample in iter_tar_bytes(data, entry.name):
            stats.add(sample.label, sample.latents)
        records.append(
            {
                "name": entry.name,
                "index": index,
                **{k: getattr(entry, k) for k in ("num_samples", "num_bytes", "sha256")},
                **stats.as_dict(),
            }
        )
    for index, record in enumerate(records):
        path = join(root, stats_name(index, prefix))
        old = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
        write_bytes_atomic(fs, path, json.dumps({**old, **record}).encode())
    stats = combine_stats(records, token_dim, int(manifest.codec.get("latent_shape", [token_dim])[0]))
    codec = {**manifest.codec, "scale": stats["scale"]}
    updated = replace(manifest, stats=stats, codec=codec)
    write_manifest(url, updated)
    return updated
