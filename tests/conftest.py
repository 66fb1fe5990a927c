"""Shared fixtures: repository paths and small deterministic model builders."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pytest
import torch

from far_scale.distributed.runtime import free_port  # noqa: F401  (tests import it from here)

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
    from far_scale.local_s3 import LocalS3

    patch = pytest.MonkeyPatch()
    with LocalS3(
        S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        timeout_s=MOTO_START_TIMEOUT_S,
    ) as s3:
        try:
            for key, value in s3.env.items():
                patch.setenv(key, value)
            yield s3.endpoint
        finally:
            patch.undo()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; returns its name."""
    import re

    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-bucket"
    fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def latent_dataset(tmp_path_factory):
    """A small real latent dataset: synthetic 32 px images -> PCA codec -> 12 shards of 10 (+ a short one)."""
    from data_prep.pca_latents import encode_with_pca
    from data_prep.synth import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("latents")
    images = write_dataset(
        root / "images", SynthSpec(num_classes=4, images_per_class=32, resolution=32, seed=1), progress=False
    )
    _, shards = encode_with_pca(
        images, root, 32, 8, 8, images_per_shard=10, max_images=64, max_patches=20_000, batch_size=16
    )
    return shards


@dataclasses.dataclass
class FaultRow:
    fault: str
    expected: str
    observed: str
    data_lost: str
    recover_s: Optional[float] = None


class ReliabilityTable:
    """Rows of the fault-injection suite (tests marked ``chaos``); written as a markdown table at the end."""

    HEADER = "| fault | expected behaviour | observed | data lost | time to recover |\n|---|---|---|---|---|\n"
    NOT_RUN = [
        FaultRow(
            "one GPU rank killed mid-step under NCCL",
            "the job stops, the restart resumes",
            "not run: this machine has no GPU (gloo ranks are tested instead)",
            "-",
        )
    ]

    def __init__(self):
        self.rows: list[FaultRow] = []

    def record(
        self,
        fault: str,
        expected: str,
        observed: str,
        data_lost: str = "none",
        recover_s: Optional[float] = None,
        tmp_path: Optional[Path] = None,
    ) -> None:
        """Add a row; ``tmp_path`` is shortened to ``$TMP`` in the observed text."""
        if tmp_path is not None:
            observed = observed.replace(str(tmp_path), "$TMP")
        self.rows.append(FaultRow(fault, expected, observed, data_lost, recover_s))

    BAD_INPUT = "bad input: "

    def markdown(self) -> str:
        def line(row: FaultRow) -> str:
            recover = f"{row.recover_s:.1f} s" if row.recover_s is not None else "-"
            return f"| {row.fault} | {row.expected} | {row.observed} | {row.data_lost} | {recover} |\n"

        faults = [r for r in self.rows if not r.fault.startswith(self.BAD_INPUT)]
        inputs = [r for r in self.rows if r.fault.startswith(self.BAD_INPUT)]
        text = "## Faults\n\n" + self.HEADER + "".join(line(r) for r in [*faults, *self.NOT_RUN])
        if inputs:
            text += f"\n## Malformed input ({len(inputs)} cases)\n\n| input | observed |\n|---|---|\n" + "".join(
                f"| {r.fault.removeprefix(self.BAD_INPUT)} | {r.observed} |\n" for r in inputs
            )
        return text


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def reliability(request):
    """The chaos table of this session; written to $FAR_SCALE_RELIABILITY_DOC (make chaos: docs/reliability.md)
    or runs/chaos/reliability.md, and printed."""
    import os
    import time

    table = ReliabilityTable()
    yield table
    if not table.rows:
        return
    target = Path(os.environ.get("FAR_SCALE_RELIABILITY_DOC", REPO_ROOT / "runs" / "chaos" / "reliability.md"))
    target.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Reliability: the fault-injection suite\n\n"
        "Generated by `make chaos` (`pytest -m chaos`): every row is a fault injected for real into real\n"
        "components (torchrun ranks, DeepSpeed, webdataset shards, a moto S3 server, an `mlflow server`,\n"
        "tmpfs mounts), with its expected behaviour asserted by the test that wrote the row.\n\n"
        f"Machine: {_cpu_name()}, "
        f"{os.cpu_count()} CPUs; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{len(table.rows)} faults run in this session.\n\n"
    )
    target.write_text(header + table.markdown())
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nreliability table ({target}):\n" + table.markdown())
