"""Checkpoints as MLflow logged models against a real `mlflow server`: 2 ranks, 3 checkpoints, 2 evaluations; the
best found by search and exported; registered and loaded back by models:/ bit for bit; a resume after SIGKILL while
the server was down loses and duplicates none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, free_port
from tests.integration.test_tracking_server import start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RECIPE = str(REPO_ROOT / "recipes" / "far_tiny_synth64.yaml")
TIMEOUT_S = 600


def _env(port: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # fail fast while the server is down
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
    }
    env.pop("MASTER_ADDR", None)
    return env


def _command(data, runs: Path, port: int, bench: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "far_scale.cli",
        "launch",
        "local",
        RECIPE,
        "--nproc",
        "2",
        f"data.url={data}",
        f"run.output_dir={runs}",
        "run.name=models",
        f"run.max_steps={steps}",
        "checkpoint.interval_steps=2",
        "checkpoint.keep_last=5",
        "eval.interval_steps=4",
        "eval.num_images=16",
        "eval.batch_size=8",
        "eval.num_iter=4",
        "eval.grid_images=0",
        f"eval.benchmark={bench}",
        f"tracking.uri=http://127.0.0.1:{port}",
        "tracking.system_metrics=false",
        "parallel.global_batch_size=8",
        "parallel.micro_batch_size_per_gpu=4",
        "data.num_workers=0",
        "data.split=samples",
        "data.expect.seq_len=null",
        "data.expect.token_dim=null",
        "data.expect.num_classes=null",
    ]


def _models(port: int) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    experiment = client.get_experiment_by_name("far-scale")
    found = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    return [m for m in found if "far_scale.step" in (m.tags or {})]  # checkpoints, not the registered export


@pytest.fixture(scope="module")
def bench(latent_dataset, tmp_path_factory):
    from far_scale.eval.offline import BenchmarkSettings, build_benchmark

    images = latent_dataset.parent / "images"
    path, _, _ = build_benchmark(
        str(images), tmp_path_factory.mktemp("bench"), str(latent_dataset), BenchmarkSettings.for_folder(images, 32)
    )
    return path


def _run(command: list, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "far_scale.cli", *args], env)


def test_checkpoints_are_logged_models_found_exported_registered_and_kept_across_a_kill(
    latent_dataset, bench, tmp_path
):
    import mlflow
    import mlflow.pyfunc

    from far_scale.eval.image_generator import SamplingJob

    store, port = tmp_path / "server", free_port()
    runs = tmp_path / "runs"
    env = _env(port)
    server = start_server(store, port)
    try:
        # 1. Two ranks, checkpoints at 2, 4, 6, evaluations at 4 and 6.
        _run(_command(latent_dataset, runs, port, bench, 6), env)
        models = {int(m.tags["far_scale.step"]): m for m in _models(port)}
        assert sorted(models) == [2, 4, 6]
        for step, model in models.items():
            assert model.tags["far_scale.checkpoint"] == str((runs / "models" / "checkpoints" / f"step_{step:08d}"))
            assert model.params["arch"] == "far" and int(model.params["parameters.total"]) > 0
            evaluated = {m.key for m in model.metrics or [] if m.step == step}
            assert ("eval/fd" in evaluated) == (step in (4, 6)), (step, evaluated)
        # 2. The best by eval/fd, by MLflow's own search, is what export --best exports.
        client = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("far-scale").experiment_id
        # The run's input dataset is named by its shards' contents (the digest a resume from another URL checks).
        from far_scale.data.manifest import read_manifest

        (run,) = client.search_runs([experiment])
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert dataset.digest == read_manifest(str(latent_dataset)).content_digest[:16]
        ordered = client.search_logged_models(
            experiment_ids=[experiment], order_by=[{"field_name": "metrics.eval/fd", "ascending": True}]
        )
        fd = {s: next(m.value for m in models[s].metrics if m.key == "eval/fd") for s in (4, 6)}
        best = min(fd, key=fd.get)
        assert int(ordered[0].tags["far_scale.step"]) == best
        export = tmp_path / "export"
        _cli(
            "export",
            str(runs / "models"),
            str(export),
            "--ema-only",
            "--best",
            "eval/fd",
            "--register",
            "far-test",
            env=env,
        )
        exported = load_file(str(export / "ema.safetensors"))
        saved = load_file(str(runs / "models" / "checkpoints" / f"step_{best:08d}" / "ema.safetensors"))
        assert exported.keys() == saved.keys() and all((exported[k] == saved[k]).all() for k in saved)
        # 3. models:/far-test/1 through pyfunc gives the bytes far-scale sample draws from the export.
        _cli(
            "sample",
            str(export),
            "--out",
            str(tmp_path / "samples"),
            "--num-images",
            "8",
            "--batch-size",
            "8",
            "--no-latency",
            env=env,
        )
        reference = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        try:
            loaded = mlflow.pyfunc.load_model("models:/far-test/1")
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
        job = SamplingJob(8, 4, 8, 0)
        indices = job.indices(0)
        images = loaded.predict({"class_label": job.labels(indices), "seed": job.image_seeds(indices)})
        assert np.array_equal(images, reference)
        _cli(
            "sample",
            "models:/far-test/1",
            "--out",
            str(tmp_path / "registered"),
            "--num-images",
            "8",
            "--batch-size",
            "8",
            "--no-latency",
            env=env,
        )
        assert np.array_equal(np.load(tmp_path / "registered" / "samples.npz")["arr_0"], reference)
        # 4. The server goes down; the job saves 8 and 10 and is killed; the restart records them once each.
        stop_server(server)
        job_process = subprocess.Popen(
            _command(latent_dataset, runs, port, bench, 12),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + TIMEOUT_S
        target = runs / "models" / "checkpoints" / "step_00000010" / "files.json"
        while not target.is_file():
            assert job_process.poll() is None and time.monotonic() < deadline, "no checkpoint at step 10"
            time.sleep(0.5)
        os.killpg(job_process.pid, signal.SIGKILL)
        job_process.wait(timeout=60)
        server = start_server(store, port)
        _run(_command(latent_dataset, runs, port, bench, 12), env)
        found = _models(port)
        steps = sorted(int(m.tags["far_scale.step"]) for m in found)
        assert steps == [2, 4, 6, 8, 10, 12], steps  # none lost, none twice
        pruned = {int(m.tags["far_scale.step"]) for m in found if m.tags["far_scale.checkpoint_pruned"] == "true"}
        on_disk = {int(p.name.removeprefix("step_")) for p in (runs / "models" / "checkpoints").glob("step_*")}
        assert pruned == set(steps) - on_disk and pruned  # keep_last 5: the oldest are marked, not dangling
    finally:
        stop_server(server)
