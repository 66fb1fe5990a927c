"""Training against a real `mlflow server` that is killed and restarted mid-run: system metrics come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

RECIPE = str(REPO_ROOT / "recipes" / "far_tiny_synth64.yaml")
SERVER_START_TIMEOUT_S = 120
METRIC = "system/node0/cpu_utilization_percentage"
WAIT_S = 180


def start_server(store: Path, port: int) -> subprocess.Popen:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [
            mlflow,
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--default-artifact-root",
            (store / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow server exited at start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not answer /health")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the whole group: uvicorn workers and the job runner too
    server.wait(timeout=30)


def system_metric_times(store: Path) -> list[int]:
    """Timestamps (ms) of this node's CPU metric, read straight from the server's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("far-scale")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return sorted(m.timestamp for run in runs for m in client.get_metric_history(run.info.run_id, METRIC))


def wait_until(condition, what: str, trainer: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert trainer.poll() is None, f"training ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_system_metrics_resume_after_the_tracking_server_restarts(latent_dataset, tmp_path):
    store, port = tmp_path / "server", free_port()
    server = start_server(store, port)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # Fail fast while the server is down instead of MLflow's minutes of HTTP retries.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    env.pop("MASTER_ADDR", None)
    overrides = [
        f"data.url={latent_dataset}",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=outage",
        "run.max_steps=100000",
        "run.log_interval=5",
        "eval.grid_images=0",
        "eval.interval_steps=100000",
        "checkpoint.interval_steps=100000",
        f"tracking.uri=http://127.0.0.1:{port}",
        "tracking.system_metrics_interval_s=1",
        "data.expect.seq_len=null",
        "data.expect.token_dim=null",
        "data.expect.num_classes=null",
        "data.num_workers=0",
    ]
    trainer = subprocess.Popen(
        [sys.executable, "-m", "far_scale.cli", "train", RECIPE, *overrides],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: len(system_metric_times(store)) >= 2, "the first system metrics", trainer)
        stop_server(server)
        time.sleep(5)  # the monitor's next call fails and its thread ends
        server = start_server(store, port)
        restarted_ms = time.time() * 1000
        wait_until(
            lambda: any(t > restarted_ms for t in system_metric_times(store)),
            "system metrics after the restart",
            trainer,
        )
        (tmp_path / "runs" / "outage" / "stop_request").touch()
        output, _ = trainer.communicate(timeout=WAIT_S)
        assert trainer.returncode == 75, output[-3000:]  # checkpointed on request
        assert "restarted after the tracking server came back" in output, output[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stop_server(server)
