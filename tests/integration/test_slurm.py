"""SLURM launchers against a real slurmctld + two slurmd on this machine (launchers/slurm/local-cluster.sh)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

CLUSTER_SCRIPT = REPO_ROOT / "launchers" / "slurm" / "local-cluster.sh"
RECIPE = str(REPO_ROOT / "recipes" / "far_tiny_synth64.yaml")
JOB_TIMEOUT_S = 300
CLUSTER_START_TIMEOUT_S = 600
REQUEUE_SETTLE_S = 20  # includes apt-get install on a fresh machine


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "FAR_SCALE_SLURM_DIR": str(state),
        "FAR_SCALE_SLURMCTLD_PORT": str(free_port()),
        "FAR_SCALE_SLURMD_PORT": str(free_port()),
    }
    env.pop("SLURM_CONF", None)
    result = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=CLUSTER_START_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env["OMP_NUM_THREADS"] = "1"
    yield env
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "far_scale.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def _wait_state(env, job: str, states: set[str], timeout_s: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _job_field(env, job, "JobState")
        if state in states:
            return state
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            raise AssertionError(f"job {job} ended {state}")
        time.sleep(0.5)
    raise TimeoutError(f"job {job} not in {states} after {timeout_s} s (now {_job_field(env, job, 'JobState')})")


def _train_overrides(data_url, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"data.url={data_url}",
        f"run.output_dir={out}",
        "run.name=slurm",
        f"run.max_steps={steps}",
        "parallel.global_batch_size=16",
        "parallel.micro_batch_size_per_gpu=8",
        "data.num_workers=1",
        "data.expect.seq_len=null",
        "data.expect.token_dim=null",
        "data.expect.num_classes=null",
        "eval.interval_steps=1000",
        "eval.num_iter=4",
        "eval.grid_images=4",
        "eval.num_images=4",
        "run.log_interval=1",
        "run.record_sample_keys=true",
        *extra,
    ]


def _submit_training(env, overrides: list[str], *flags: str) -> str:
    result = _cli(
        env,
        "launch",
        "slurm",
        RECIPE,
        "--nodes",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "15:00",
        "--rdzv-port",
        str(free_port()),
        *flags,
        *overrides,
    )
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _node_logs(run_dir: Path) -> str:
    """Both nodes' logs (c10d rendezvous decides which node hosts rank 0)."""
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("node*.log")))


def _mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("far-scale").experiment_id])


def test_dry_run_for_64_nodes_of_8_gpus(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "far_scale.cli",
            "launch",
            "slurm",
            str(REPO_ROOT / "recipes" / "far_large_in256.yaml"),
            "--nodes",
            "64",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--grace-s",
            "600",
            "--dry-run",
            "parallel.micro_batch_size_per_gpu=4",
            f"run.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in (
        "#SBATCH --nodes=64",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --open-mode=append",
    ):
        assert line in script, line
    assert "--nproc_per_node=8" in script and "--rdzv_backend=c10d" in script
    assert '--rdzv_endpoint="$RDZV_ENDPOINT"' in script and "scontrol requeue" in script
    assert "parallel.micro_batch_size_per_gpu=4" in script
    assert not (tmp_path / "far_large_in256").exists()  # a dry run writes nothing
    # An impossible batch split fails before submission, naming the numbers.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "far_scale.cli",
            "launch",
            "slurm",
            str(REPO_ROOT / "recipes" / "far_large_in256.yaml"),
            "--nodes",
            "64",
            "--gpus-per-node",
            "8",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "world_size=512" in bad.stderr


@pytest.mark.slurm
def test_two_node_training_job(slurm_env, latent_dataset, tmp_path):
    job = _submit_training(
        slurm_env, _train_overrides(latent_dataset, tmp_path, 4, "tracking.system_metrics_interval_s=0.1")
    )
    _wait_state(slurm_env, job, {"COMPLETED"})
    run_dir = tmp_path / "slurm"
    # Both nodes joined one process group: one rank each, a log per node, the trainer saw 2 ranks.
    assert (run_dir / "sample_keys.rank0.jsonl").is_file() and (run_dir / "sample_keys.rank1.jsonl").is_file()
    assert (run_dir / "slurm" / "node0.log").is_file() and (run_dir / "slurm" / "node1.log").is_file()
    assert "on 2 x cpu" in _node_logs(run_dir)
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 4
    runs = _mlflow_runs(run_dir)
    assert len(runs) == 1
    # One system-metrics monitor per node, each under its node id (a 4-step job lives ~1 s after the monitors
    # start: they sample every 0.1 s here).
    assert {"system/node0/cpu_utilization_percentage", "system/node1/cpu_utilization_percentage"} <= set(
        runs[0].data.metrics
    ), sorted(runs[0].data.metrics)


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(slurm_env, latent_dataset, tmp_path):
    target = 40
    job = _submit_training(
        slurm_env,
        _train_overrides(latent_dataset, tmp_path, target, "checkpoint.interval_steps=1000"),
        "--max-restarts",
        "2",
    )
    run_dir = tmp_path / "slurm"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    # What a preemption or time limit delivers: USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm_env)
    _wait_state(slurm_env, job, {"PENDING"})
    assert _job_field(slurm_env, job, "Restarts") == "1"
    # A requeued job waits ~120 s (BeginTime) before it may start. Releasing it while slurmd still
    # tears down the first run fails it ("job credential revoked"), so give that a moment first.
    time.sleep(REQUEUE_SETTLE_S)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=slurm_env)
    _wait_state(slurm_env, job, {"COMPLETED"})
    steps = _steps(run_dir)
    assert steps == list(range(1, target + 1))  # every step once: none trained twice, none missing
    logs = _node_logs(run_dir)
    stopped = int(re.search(r"stopped on request at step (\d+)", logs).group(1))
    assert 5 <= stopped < target
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in logs
    runs = _mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    out = (run_dir / "slurm").glob("*.out")
    assert "requeueing" in next(out).read_text()


@pytest.mark.slurm
def test_array_encoding_matches_single_worker(slurm_env, tmp_path):
    from data_prep.encode import EncodeJob, run_encode
    from data_prep.fit_codec import fit_pca_codec
    from data_prep.synth import SynthSpec, write_dataset

    images = write_dataset(
        tmp_path / "images", SynthSpec(num_classes=3, images_per_class=10, resolution=32), progress=False
    )
    weights = tmp_path / "pca.safetensors"
    fit_pca_codec(str(images), str(weights), 32, 8, 8, 64, 20_000, 0)
    args = [
        "--codec",
        "pca",
        "--codec-weights",
        str(weights),
        "--image-size",
        "32",
        "--images-per-shard",
        "4",
        "--loader-workers",
        "0",
    ]
    result = _cli(
        slurm_env,
        "launch",
        "slurm-encode",
        str(images),
        str(tmp_path / "array"),
        "--array-size",
        "3",
        "--cpus-per-task",
        "1",
        "--time",
        "10:00",
        "--log-dir",
        str(tmp_path / "logs"),
        *args,
    )
    encode_job, manifest_job = re.search(r"encode array (\d+) .* manifest job (\d+)", result.stdout).groups()
    _wait_state(slurm_env, manifest_job, {"COMPLETED"})
    run_encode(
        EncodeJob(
            src=str(images),
            dst=str(tmp_path / "single"),
            codec="pca",
            codec_weights=str(weights),
            image_size=32,
            images_per_shard=4,
            loader_workers=0,
            progress=False,
        )
    )
    shards = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}  # noqa: E731
    assert shards(tmp_path / "array") == shards(tmp_path / "single") and len(shards(tmp_path / "single")) == 8

    def manifest(d):
        data = json.loads((d / "manifest.json").read_text())
        data.pop("created")
        return data

    assert manifest(tmp_path / "array") == manifest(tmp_path / "single")
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("far-scale-manifest-*.out"))
    assert "OK: every shard matches the manifest" in logs
