"""Services failing under a running job: the MLflow server restarted, the S3 endpoint down, an upload killed."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.distributed.test_training import _command, _common, _env
from tests.integration.test_tracking_server import start_server, stop_server

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RUN = "far"
WAIT_S = 300


def _wait(condition, what: str, process: subprocess.Popen, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_mlflow_server_killed_and_restarted_mid_run(latent_dataset, tmp_path, reliability):
    store, port = tmp_path / "server", free_port()
    server = start_server(store, port)
    env = {**_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    steps, down_s = 400, 5.0
    overrides = _common(
        latent_dataset,
        tmp_path,
        RUN,
        f"run.max_steps={steps}",
        "data.num_workers=0",
        "parallel.global_batch_size=16",
        "parallel.micro_batch_size_per_gpu=16",
        "checkpoint.interval_steps=100000",
        f"tracking.uri=http://127.0.0.1:{port}",
        "tracking.system_metrics=false",
    )
    job = subprocess.Popen(
        _command(1, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT
    )
    try:
        _wait(lambda: len(_rows(tmp_path / RUN)) >= 10, "step 10", job)
        stop_server(server)
        killed_at_step = len(_rows(tmp_path / RUN))
        time.sleep(down_s)
        restart = time.monotonic()
        server = start_server(store, port)
        restarted_at_step = len(_rows(tmp_path / RUN))
        output, _ = job.communicate(timeout=WAIT_S)
        recover_s = time.monotonic() - restart
    finally:
        if job.poll() is None:
            job.kill()
        stop_server(server)
    assert job.returncode == 0, output[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("far-scale").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    local = {row["step"]: row["loss"] for row in _rows(tmp_path / RUN)}
    assert sorted(history) == list(range(1, steps + 1)), f"MLflow lost logged steps: {output[-3000:]}"
    assert history == pytest.approx(local, rel=1e-6)
    assert run.info.status == "FINISHED"
    reliability.record(
        "MLflow server killed (kill -9) and restarted mid-run",
        "training never stops; metrics are buffered and reach the server once it answers",
        f"server down from step {killed_at_step} for {down_s:.0f} s (back at step {restarted_at_step} of {steps}); "
        f"the run finished; MLflow holds the loss of all {steps} steps, equal to metrics.jsonl, status FINISHED",
        "none",
        recover_s,
        tmp_path=tmp_path,
    )


class PausableProxy:
    """A TCP proxy to ``target`` on 127.0.0.1 that can go down (listener closed, connections reset) and up."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self._stop = threading.Event()
        self._up = threading.Event()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._up.set()
        self._thread.start()

    def _serve(self) -> None:
        listener = None
        while not self._stop.is_set():
            if not self._up.is_set():
                if listener is not None:
                    listener.close()
                    listener = None
                time.sleep(0.05)
                continue
            if listener is None:
                listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
                listener.settimeout(0.1)
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        if listener is not None:
            listener.close()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while self._up.is_set():
                for key, _ in selector.select(timeout=0.1):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                sock.close()

    def down(self) -> None:
        self._up.clear()
        with self._lock:
            for sock in self._connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.down()
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def s3_data(latent_dataset, s3_bucket):
    """The latent dataset copied to the moto server."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    url = f"s3://{s3_bucket}/latents"
    for path in sorted(Path(latent_dataset).iterdir()):
        fs.put_file(str(path), f"{s3_bucket}/latents/{path.name}")
    return url


@pytest.mark.s3
@pytest.mark.parametrize("down_s, retry_s", [(6.0, 120.0), (30.0, 5.0)], ids=["short-outage", "long-outage"])
def test_s3_endpoint_down_during_training(s3_data, s3_endpoint, tmp_path, down_s, retry_s, reliability):
    proxy = PausableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    # The SDK's own retries (botocore: several attempts with backoff) would hide a short outage; with one
    # attempt every failed request reaches far-scale's retry, which is what is under test.
    env = {**_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_MAX_ATTEMPTS": "1"}
    overrides = _common(
        s3_data,
        tmp_path,
        RUN,
        "run.max_steps=60",
        "data.num_workers=0",
        "data.split=shards",
        "parallel.global_batch_size=4",
        "parallel.micro_batch_size_per_gpu=4",
        "checkpoint.interval_steps=100000",
        "tracking.enabled=false",
        f"data.read_retry_s={retry_s}",
    )
    job = subprocess.Popen(
        _command(1, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT
    )
    try:
        _wait(lambda: len(_rows(tmp_path / RUN)) >= 5, "step 5", job)
        proxy.down()
        down_at = len(_rows(tmp_path / RUN))
        back = time.monotonic() + down_s
        while time.monotonic() < back and job.poll() is None:  # a job that gave up need not be waited for
            time.sleep(0.1)
        proxy.up()
        up_at = time.monotonic()
        output, _ = job.communicate(timeout=WAIT_S)
        after_s = time.monotonic() - up_at
    finally:
        if job.poll() is None:
            job.kill()
        proxy.close()
    steps = [row["step"] for row in _rows(tmp_path / RUN)]
    if down_s < retry_s:
        assert job.returncode == 0, output[-3000:]
        assert steps == list(range(1, 61))
        assert "retrying in" in output
        observed = (
            f"endpoint down {down_s:.0f} s from step {down_at}: shard reads retried with backoff, all 60 "
            "steps ran, none repeated or skipped"
        )
        reliability.record(
            f"S3 endpoint down {down_s:.0f} s during training (data.read_retry_s={retry_s:.0f})",
            "shard reads retry with backoff; training continues",
            observed,
            "none",
            after_s,
            tmp_path=tmp_path,
        )
    else:
        assert job.returncode == 1, output[-3000:]
        error = [line for line in output.splitlines() if line.startswith("error: ")][-1]
        assert f"could not read {s3_data}/shard-" in error and "data.read_retry_s" in error
        reliability.record(
            f"S3 endpoint down {down_s:.0f} s during training (data.read_retry_s={retry_s:.0f})",
            "after the retry budget, a clear error naming the shard URL (never a hang)",
            error.removeprefix("error: ")[:200],
            "none (resume from the last checkpoint)",
            tmp_path=tmp_path,
        )


@pytest.mark.s3
def test_data_prep_killed_during_s3_uploads(tmp_path, s3_bucket, reliability):
    import fsspec

    from data_prep.fit_codec import fit_pca_codec
    from data_prep.synth import SynthSpec, write_dataset

    images = write_dataset(
        tmp_path / "images", SynthSpec(num_classes=10, images_per_class=30, resolution=32), progress=False
    )
    weights = tmp_path / "pca.safetensors"
    fit_pca_codec(str(images), str(weights), 32, 8, 8, 64, 20_000, 0)
    url = f"s3://{s3_bucket}/latents"
    encode = [
        sys.executable,
        "-m",
        "far_scale.cli",
        "data",
        "encode",
        str(images),
        None,
        "--codec",
        "pca",
        "--codec-weights",
        str(weights),
        "--image-size",
        "32",
        "--images-per-shard",
        "3",
        "--batch-size",
        "3",
        "--loader-workers",
        "0",
        "--quiet",
    ]
    subprocess.run([*encode[:6], str(tmp_path / "local"), *encode[7:]], check=True, capture_output=True, timeout=300)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    job = subprocess.Popen(
        [*encode[:6], url, *encode[7:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait(
            lambda: fs.invalidate_cache() or len(fs.glob(f"{s3_bucket}/latents/shard-*.tar")) >= 5,
            "5 shards on the store",
            job,
        )
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    fs.invalidate_cache()
    uploaded = sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{s3_bucket}/latents/shard-*.tar"))
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").glob("shard-*.tar")}
    for name in uploaded:  # whatever is on the store under a final name is complete
        assert fs.cat_file(f"{s3_bucket}/latents/{name}") == local[name], name
    assert not fs.exists(f"{s3_bucket}/latents/manifest.json")
    start = time.monotonic()
    subprocess.run([*encode[:6], url, *encode[7:]], check=True, capture_output=True, timeout=300)
    verify = subprocess.run(
        [sys.executable, "-m", "far_scale.cli", "data", "verify", url, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    recover_s = time.monotonic() - start
    assert verify.returncode == 0, verify.stdout + verify.stderr
    fs.invalidate_cache()
    for name, data in local.items():
        assert fs.cat_file(f"{s3_bucket}/latents/{name}") == data, name
    reliability.record(
        "kill -9 of data prep during S3 uploads",
        "objects appear only complete; a re-run completes the dataset byte-identically",
        f"{len(uploaded)} of {len(local)} shards on the store at the kill, each complete; the re-run "
        "wrote the rest, `data verify` OK, every shard identical to a local encode",
        "none",
        recover_s,
        tmp_path=tmp_path,
    )
