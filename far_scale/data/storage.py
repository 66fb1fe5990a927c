"""fsspec helpers: one code path for local directories, ``file://`` and ``s3://`` URLs.

S3 endpoints and credentials come from the standard AWS environment variables (or fsspec
options), never from recipes or manifests.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from typing import IO, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from far_scale.secrets import MASK, is_secret_name

PARTIAL_SUFFIX = ".partial"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def join(root: str, name: str) -> str:
    return posixpath.join(root, name)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def atomic_writer(fs: fsspec.AbstractFileSystem, path: str, mode: Optional[int] = None) -> Iterator[IO[bytes]]:
    """Write ``path`` so that it appears only complete: far-scale's one way of writing a file.

    Locally: a hidden partial file, fsync, ``mode`` (permission bits, if given), rename. On object
    stores: the object exists only once its upload completes; on an exception the upload is
    discarded instead of committed.
    """
    if is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        tmp = os.path.join(directory, f".{name}{PARTIAL_SUFFIX}")
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)  # a failed write leaves nothing behind, not even its partial file
        return
    handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        discard = getattr(handle, "discard", None)
        if discard is not None:
            discard()
        raise
    handle.close()


@contextlib.contextmanager
def local_atomic_writer(path, mode: Optional[int] = None) -> Iterator[IO[bytes]]:
    """``atomic_writer`` for a path on this machine."""
    with atomic_writer(LocalFileSystem(), str(path), mode) as handle:
        yield handle


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_writer(fs, path) as handle:
        handle.write(data)


def write_atomic(url, data: bytes | str, mode: Optional[int] = None) -> None:
    """Write ``data`` (text is UTF-8 encoded) to a local path or an object-store URL, atomically."""
    fs, path = filesystem(str(url))
    with atomic_writer(fs, path, mode) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def redact_command(argv: list[str]) -> list[str]:
    """argv with the values of secret-looking options masked (for manifests and logs)."""
    redacted, hide_next = [], False
    for item in argv:
        if hide_next:
            redacted.append(MASK)
            hide_next = False
            continue
        name, sep, _ = item.partition("=")
        if name.startswith("-") and is_secret_name(name):
            if sep:
                redacted.append(f"{name}={MASK}")
            else:
                redacted.append(item)
                hide_next = True
            continue
        redacted.append(re.sub(r"://[^/@\s]+:[^/@\s]+@", "://***@", item))
    return redacted
