"""``far-scale data verify``: re-read every shard and check it against the manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from far_scale.codecs import Codec, CodecError, load_manifest_codec
from far_scale.data.manifest import Manifest, ShardEntry, read_manifest
from far_scale.data.shards import iter_tar_bytes
from far_scale.data.storage import filesystem, join

ERRORS_SHOWN = 5
"""Problems printed by name; the rest are counted."""


@dataclass
class VerifyReport:
    num_shards: int = 0
    num_samples: int = 0
    bad_shards: dict[str, list[str]] = field(default_factory=dict)
    decoded: int = 0
    decode_note: str = ""
    decode_required: bool = True
    """A dataset whose codec cannot be loaded is not OK unless decoding was waived (``--no-decode``)."""

    @property
    def ok(self) -> bool:
        return not self.bad_shards and (self.decoded > 0 or not self.decode_required)

    def __str__(self) -> str:
        lines = [
            f"{self.num_shards} shards, {self.num_samples} samples checked; "
            f"{self.decoded} samples decoded to images{self.decode_note}"
        ]
        if self.ok:
            lines.append("OK: every shard matches the manifest")
        elif not self.bad_shards:
            lines.append("NOT VERIFIED: no sample could be decoded (pass --codec-weights, or --no-decode to skip it)")
        problems = [f"{name}: {problem}" for name, found in self.bad_shards.items() for problem in found]
        for problem in problems[:ERRORS_SHOWN]:
            lines.append(f"BAD {problem}")
        if len(problems) > ERRORS_SHOWN:
            lines.append(
                f"... and {len(problems) - ERRORS_SHOWN} more problem(s) in {len(self.bad_shards)} bad shard(s) "
                f"of {self.num_shards}"
            )
        return "\n".join(lines)


def _check_shard(
    data: bytes, entry: ShardEntry, manifest: Manifest, codec: Optional[Codec]
) -> tuple[list[str], int, bool]:
    problems: list[str] = []
    name = entry.name
    shape_problems = 0
    if len(data) != entry.num_bytes:
        problems.append(f"size {len(data)} bytes, manifest says {entry.num_bytes} (truncated or appended)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        problems.append(f"sha256 {digest[:12]}... differs from the manifest's {entry.sha256[:12]}...")
    codec_info = manifest.codec
    expected_shape = (2, codec_info["moments"], codec_info["seq_len"], codec_info["token_dim"])
    num_classes = len(manifest.classes)
    count, first = 0, None
    try:
        for sample in iter_tar_bytes(data, name):
            count += 1
            first = first if first is not None else sample
            if sample.latents.shape != expected_shape:
                shape_problems += 1
                if shape_problems == 1:
                    problems.append(
                        f"sample {sample.key} has latents {sample.latents.shape}, expected {expected_shape}"
                    )
            if not np.isfinite(sample.latents).all():
                problems.append(f"sample {sample.key} has non-finite latents")
            if not 0 <= sample.label < num_classes:
                problems.append(f"sample {sample.key} has label {sample.label} outside [0, {num_classes})")
    except ValueError as exc:
        problems.append(f"unreadable: {exc}")
    if shape_problems > 1:
        problems.append(f"{shape_problems} samples in all have latents of another shape (another codec?)")
    if count != entry.num_samples:
        problems.append(f"{count} samples, manifest says {entry.num_samples}")
    decoded = False
    if codec is not None and first is not None and first.latents.shape == expected_shape:
        image = codec.decode(torch.from_numpy(first.latents[0, 0].astype(np.float32))[None])
        decoded = bool(torch.isfinite(image).all())
        if not decoded:
            problems.append(f"sample {first.key} decodes to non-finite pixels")
    return problems, count, decoded


def _sidecar_problems(fs, root: str, entry: ShardEntry, manifest: Manifest) -> list[str]:
    """What the shard's sidecar says about its making, against the manifest's codec."""
    path = join(root, entry.name.removesuffix(".tar") + ".stats.json")
    if not fs.exists(path):
        return ["no stats sidecar (the shard's record of its codec and images)"]
    record = json.loads(fs.cat_file(path))
    made_by, expected = record.get("codec_sha256"), manifest.codec["weights_sha256"]
    if made_by is None:
        return []  # written before sidecars recorded their codec: the latent shapes below are the check
    if made_by != expected:
        return [f"made by codec weights sha256 {made_by[:12]}..., the manifest names {expected[:12]}..."]
    return []


def verify_dataset(
    url: str, codec_weights: Optional[str] = None, progress: bool = True, decode: bool = True
) -> VerifyReport:
    manifest = read_manifest(url)
    fs, root = filesystem(url)
    report = VerifyReport(decode_required=decode)
    codec: Optional[Codec] = None
    if decode:
        try:
            codec = load_manifest_codec(manifest.codec, codec_weights)
        except CodecError as exc:
            report.decode_note = f" (codec not available, decoding skipped: {exc})"
    else:
        report.decode_note = " (decoding skipped: --no-decode)"
    for entry in tqdm(manifest.shards, unit="shard", desc="verify", disable=not progress):
        report.num_shards += 1
        path = join(root, entry.name)
        if not fs.exists(path):
            report.bad_shards[entry.name] = ["missing"]
            continue
        problems, count, decoded = _check_shard(fs.cat_file(path), entry, manifest, codec)
        problems = _sidecar_problems(fs, root, entry, manifest) + problems
        report.num_samples += count
        report.decoded += int(decoded)
        if problems:
            report.bad_shards[entry.name] = problems
    return report
