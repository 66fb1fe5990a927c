"""Checkpoints on object storage (``checkpoint.url: s3://bucket/prefix``).

DeepSpeed writes every checkpoint to a local staging directory; this module mirrors it to the store with
the same rule as the data shards: an object appears only complete, and ``latest.json`` on the store is
written only after every file of that checkpoint is there. A job killed mid-upload therefore leaves the
store pointing at the previous complete checkpoint. A restart on a machine with an empty disk downloads
the checkpoint ``latest.json`` names into the staging directory and resumes from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from far_scale.data.storage import filesystem, is_local, join, write_atomic
from far_scale.errors import ActionableError
from far_scale.train.checkpoint import (
    LATEST,
    CheckpointError,
    CheckpointRef,
    checkpoint_tags,
    latest_text,
    parse_latest,
    read_latest,
    tags_to_prune,
    verify_checkpoint,
)

log = logging.getLogger("far_scale.train")

UPLOAD_ATTEMPTS = 4
RETRY_BASE_S = 1.0  # waits 1, 2, 4 s between attempts
T = TypeVar("T")


class CheckpointStoreError(ActionableError, RuntimeError):
    """The object store could not be read or written after retries; the message names the URL."""


def is_remote(url: str) -> bool:
    """True for an object-store URL (``s3://``...); local paths and ``file://`` are used in place."""
    return bool(url) and not is_local(filesystem(url)[0])


def local_directory(url: str) -> Path:
    """The directory of a local checkpoint URL (a path or ``file://``)."""
    return Path(filesystem(url)[1])


def _retry(what: str, url: str, action: Callable[[], T]) -> T:
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            return action()
        except (OSError, RuntimeError, ValueError) as exc:  # botocore errors surface as OSError from s3fs
            if attempt == UPLOAD_ATTEMPTS - 1:
                raise CheckpointStoreError(
                    f"could not {what} {url} after {UPLOAD_ATTEMPTS} attempts: {exc}. Check that the object "
                    "store is reachable (AWS_ENDPOINT_URL, credentials) and restart: the job resumes from the "
                    "last checkpoint that reached the store"
                ) from exc
            wait_s = RETRY_BASE_S * 2**attempt
            log.warning("%s %s failed (%s); retrying in %.0f s", what, url, exc, wait_s)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


class RemoteCheckpoints:
    """A checkpoint directory on an object store, mirrored from (and into) a local staging directory."""

    def __init__(self, url: str, staging: Path):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.staging = staging

    def latest(self) -> Optional[CheckpointRef]:
        """The store's ``latest.json`` as a reference into the staging directory, or None."""
        pointer = join(self.root, LATEST)

        def read() -> Optional[bytes]:
            self.fs.invalidate_cache()
            return self.fs.cat_file(pointer) if self.fs.exists(pointer) else None

        text = _retry("read", f"{self.url}/{LATEST}", read)
        if text is None:
            return None
        tag, step, world_size = parse_latest(text.decode(errors="replace"), f"{self.url}/{LATEST}", self.staging)
        return CheckpointRef(self.staging, tag, step, world_size)

    def fetch(self, ref: CheckpointRef) -> None:
        """Make the staging directory hold ``ref``, verified against its ``files.json``: the local copy when
        its own ``latest.json`` names the same tag (this machine wrote it) and its files are intact, else a
        fresh download."""
        try:
            local = read_latest(self.staging)
            if local is not None and local.tag == ref.tag and ref.path.is_dir():
                verify_checkpoint(ref)
                return
        except CheckpointError as exc:
            log.warning("local copy of %s not used: %s", ref.tag, exc)
        partial = self.staging / f".{ref.tag}.download"
        shutil.rmtree(partial, ignore_errors=True)
        remote = join(self.root, ref.tag)
        _retry(
            "download", f"{self.url}/{ref.tag}", lambda: self.fs.get(remote + "/", str(partial) + "/", recursive=True)
        )
        shutil.rmtree(ref.path, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        os.replace(partial, ref.path)
        print(f"downloaded checkpoint {self.url}/{ref.tag} to {ref.path}", flush=True)
        verify_checkpoint(ref)

    def upload(self, tag: str) -> None:
        """Upload every file of the staged checkpoint ``tag`` (each object appears only complete). The caller
        writes ``latest.json`` afterwards, once every rank's files are up."""
        for path in sorted(p for p in (self.staging / tag).rglob("*") if p.is_file()):
            relative = path.relative_to(self.staging).as_posix()
            target = join(self.root, relative)
            _retry("upload", f"{self.url}/{relative}", lambda: self.fs.put_file(str(path), target))

    def upload_files(self, relative: list[str]) -> None:
        """Upload files of the staging directory (paths relative to it) as they are."""
        for name in relative:
            target = join(self.root, name)
            _retry("upload", f"{self.url}/{name}", lambda: self.fs.put_file(str(self.staging / name), target))

    def read_file(self, relative: str) -> Optional[bytes]:
        path = join(self.root, relative)

        def read() -> Optional[bytes]:
            self.fs.invalidate_cache()
            return self.fs.cat_file(path) if self.fs.exists(path) else None

        return _retry("read", f"{self.url}/{relative}", read)

    def write_latest(self, ref: CheckpointRef) -> None:
        url = f"{self.url}/{LATEST}"
        _retry("write", url, lambda: write_atomic(url, latest_text(ref)))

    def tags(self) -> list[str]:
        """The checkpoint tags on the store, oldest first."""
        self.fs.invalidate_cache()
        return checkpoint_tags(name.rsplit("/", 1)[-1] for name in self.fs.ls(self.root, detail=False))

    def prune(self, keep_last: int, current: str) -> list[str]:
        """Delete all but the newest ``keep_last`` checkpoints up to ``current`` on the store, and any
        partial one after it (``checkpoint.tags_to_prune``)."""
        self.fs.invalidate_cache()
        names = (name.rsplit("/", 1)[-1] for name in self.fs.ls(self.root, detail=False))
        removed = tags_to_prune(names, keep_last, current)
        for tag in removed:
            _retry("delete", f"{self.url}/{tag}", lambda: self.fs.rm(join(self.root, tag), recursive=True))
        return removed
