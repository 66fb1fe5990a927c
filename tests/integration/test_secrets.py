"""Credentials never leave the environment: a planted S3 key and MLflow token appear in no file a run writes.

One run touches every writer: shards read from S3, checkpoints uploaded to S3, metrics and params sent to a
real `mlflow server`, an export, samples, and the rendered sbatch script. Then every byte they wrote (run
directory, server store and artifacts, every object in the bucket, the sbatch text, the processes' logs)
is searched for each secret.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECIPES, REPO_ROOT, S3_TEST_CREDENTIALS, free_port
from tests.distributed.test_training import _common
from tests.integration.test_tracking_server import start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.s3]

MLFLOW_SECRETS = {"MLFLOW_TRACKING_TOKEN": "farscale-mlflow-TOKEN-9d2e51", "MLFLOW_TRACKING_PASSWORD": "pw-77aa-SECRET"}
TIMEOUT_S = 300


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "far_scale.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_no_secret_reaches_any_file_a_run_writes(latent_dataset, tmp_path, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for path in sorted(Path(latent_dataset).iterdir()):
        fs.put_file(str(path), f"{s3_bucket}/latents/{path.name}")
    store, port = tmp_path / "mlflow-server", free_port()
    server = start_server(store, port)
    env = {**os.environ, **MLFLOW_SECRETS, "MLFLOW_TRACKING_USERNAME": "far", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    recipe = str(RECIPES / "far_tiny_synth64.yaml")
    overrides = _common(
        f"s3://{s3_bucket}/latents",
        tmp_path / "runs",
        "far",
        "run.max_steps=2",
        "data.num_workers=0",
        "parallel.global_batch_size=8",
        "parallel.micro_batch_size_per_gpu=8",
        f"checkpoint.url=s3://{s3_bucket}/checkpoints",
        f"tracking.uri=http://127.0.0.1:{port}",
        "tracking.system_metrics=false",
        "eval.interval_steps=2",
    )
    try:
        logs = [_cli("train", recipe, *overrides, env=env)]
        run_dir = tmp_path / "runs" / "far"
        logs.append(_cli("export", str(run_dir), str(tmp_path / "export"), env=env))
        logs.append(
            _cli(
                "sample",
                str(tmp_path / "export"),
                "--out",
                str(tmp_path / "samples"),
                "--num-images",
                "4",
                "--batch-size",
                "4",
                "--no-latency",
                env=env,
            )
        )
        logs.append(_cli("launch", "slurm", recipe, "--dry-run", "--nodes", "1", *overrides, env=env))
    finally:
        stop_server(server)

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written) and any(p.suffix == ".safetensors" for p in written)
    blobs = [p.read_bytes() for p in written]
    objects = fs.find(s3_bucket)
    assert any("checkpoints/step_00000002/" in o for o in objects)
    blobs += [fs.cat_file(o) for o in objects]
    blobs += [(r.stdout + r.stderr).encode() for r in logs]
    for name, secret in {**S3_TEST_CREDENTIALS, **MLFLOW_SECRETS}.items():
        found = [str(p) for p, blob in zip([*written, *objects], blobs) if secret.encode() in blob]
        found += ["a command's output" for blob in blobs[len(written) + len(objects) :] if secret.encode() in blob]
        assert not found, f"{name} leaked into {found}"
