"""Reading shards back: one shard at a time as decoded ``LatentSample``s (verify, inspect, tests)."""

from __future__ import annotations

import io
from typing import Iterator

from webdataset.tariterators import group_by_keys, tar_file_expander

from far_scale.data.contract import LatentSample, decode_sample


def iter_tar_bytes(data: bytes, name: str) -> Iterator[LatentSample]:
    """Samples of one shard held in memory; errors name the shard."""
    try:
        for sample in group_by_keys(tar_file_expander([{"url": name, "stream": io.BytesIO(data)}])):
            yield decode_sample(sample)
    except Exception as exc:  # tarfile, numpy and key errors alike: say which shard
        raise ValueError(f"shard {name}: {type(exc).__name__}: {exc}") from None
