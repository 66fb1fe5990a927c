"""Shared fixtures: repository paths and small deterministic model builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and a small thread count (2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process=None) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "farscale-test-key", "AWS_SECRET_ACCESS_KEY": "farscale-test-SECRET-4f1c"}
MOTO_START_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API: moto_server on 127.0.0.1, credentials and endpoint in the environment."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    executable = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    try:
        wait_for_port(port, MOTO_START_TIMEOUT_S, process)
        for key, value in {**S3_TEST_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(key, value)
        yield endpoint
    finally:
        patch.undo()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; returns its name."""
    import re

    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-bucket"
    fs.mkdir(name)
    return name
