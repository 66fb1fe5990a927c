"""A local S3 API (moto server on 127.0.0.1) for the demo, the tests and the benchmarks: started, waited
for and stopped in one place.

Nothing in training or data preparation uses it: they reach any S3 endpoint through the standard ``AWS_*``
variables, which ``LocalS3.env`` provides for this one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional

from far_scale.distributed.runtime import LOOPBACK, free_port

START_TIMEOUT_S = 60
POLL_S = 0.2
STOP_TIMEOUT_S = 30


class LocalS3:
    """``with LocalS3(credentials) as s3: ...``: a moto server on a free port; ``s3.env`` holds the endpoint and
    credentials for ``fsspec``/``s3fs`` and subprocesses. Its process group is stopped on exit."""

    def __init__(self, access_key: str, secret_key: str, log: Optional[IO] = None, timeout_s: float = START_TIMEOUT_S):
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        executable = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        output = log if log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [executable, "-H", LOOPBACK, "-p", str(self.port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode} before listening")
            with socket.socket() as sock:
                if sock.connect_ex((LOOPBACK, self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not listen on {self.endpoint} within {timeout_s:.0f} s")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> "LocalS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
