"""Checkpoints on S3 (a real moto server): kill -9 during an upload, restart on an empty disk, same losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT, S3_TEST_CREDENTIALS
from tests.distributed.test_training import _command, _common, _env, _losses, _train

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.s3, pytest.mark.chaos]

STEPS = 6
POLL_S = 0.01
KILL_TIMEOUT_S = 300
BASE = [
    "data.split=samples",
    "data.num_workers=0",
    f"run.max_steps={STEPS}",
    "checkpoint.interval_steps=2",
    "checkpoint.keep_last=2",
    "parallel.global_batch_size=8",
    "parallel.micro_batch_size_per_gpu=8",
    "model.head.consistency_target=ema",
    "run.log_interval=1",
]


def _store(url: str):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return fs, url.removeprefix("s3://")


def _kill_during_upload(command: list[str], url: str, tag: str) -> tuple[int, dict]:
    """Start training, kill -9 the moment the first object of checkpoint ``tag`` is on the store; returns
    the exit code and the store's latest.json at that moment."""
    fs, root = _store(url)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO_ROOT, start_new_session=True
    )
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            fs.invalidate_cache()
            if fs.exists(f"{root}/{tag}") and fs.find(f"{root}/{tag}"):
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(POLL_S)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    fs.invalidate_cache()
    return code, json.loads(fs.cat_file(f"{root}/latest.json"))


def _all_bytes(paths) -> bytes:
    return b"".join(p.read_bytes() for p in paths if p.is_file())


def test_s3_checkpoints_survive_a_kill_during_upload_and_an_empty_disk(
    latent_dataset, tmp_path, s3_bucket, reliability
):
    url = f"s3://{s3_bucket}/checkpoints/far"
    _train(1, _common(latent_dataset, tmp_path, "ref", *BASE))
    reference = _losses(tmp_path / "ref")

    first_disk = tmp_path / "node-a"
    overrides = _common(latent_dataset, first_disk, "far", *BASE, f"checkpoint.url={url}")
    code, pointer = _kill_during_upload(_command(1, overrides), url, "step_00000004")
    assert code == -signal.SIGKILL
    print("store pointer at the kill:", pointer)
    # The pointer never names a checkpoint whose upload had not finished.
    assert pointer["tag"] in ("step_00000002", "step_00000004")
    shutil.rmtree(first_disk)  # the node is gone: nothing local survives

    second_disk = tmp_path / "node-b"
    start = time.monotonic()
    result = _train(1, _common(latent_dataset, second_disk, "far", *BASE, f"checkpoint.url={url}"))
    recover_s = time.monotonic() - start
    resumed_at = pointer["step"]
    logs = result.stdout + result.stderr
    assert f"downloaded checkpoint {url}/{pointer['tag']}" in logs
    assert f"resumed from {second_disk / 'far' / 'checkpoints' / pointer['tag']} at step {resumed_at}" in logs
    run_dir = second_disk / "far"
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(resumed_at + 1, STEPS + 1))  # no step repeated or skipped
    assert losses == {step: reference[step] for step in losses}  # bit-identical to the uninterrupted run

    fs, root = _store(url)
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{root}/latest.json"))["tag"] == "step_00000006"
    tags = sorted(name.rsplit("/", 1)[-1] for name in fs.ls(root, detail=False) if "step_" in name)
    assert tags == ["step_00000004", "step_00000006"]  # keep_last=2 on the store too
    local = run_dir / "checkpoints" / "step_00000006"
    for path in (p for p in local.rglob("*") if p.is_file()):
        remote = f"{root}/{path.relative_to(local.parent).as_posix()}"
        assert fs.cat_file(remote) == path.read_bytes(), remote

    # Each checkpoint is an MLflow logged model pointing at the store; MLflow holds none of its bytes.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("far-scale").experiment_id
    models = {int(m.tags["far_scale.step"]): m for m in client.search_logged_models(experiment_ids=[experiment])}
    assert set(models) >= {4, 6} and all(
        m.tags["far_scale.checkpoint"] == f"{url}/step_{step:08d}" for step, m in models.items()
    )
    checkpoint_names = {p.name for p in local.rglob("*") if p.is_file()} - {"config.yaml"}  # the run's own artifact
    artifacts = [p for p in (run_dir / "mlartifacts").rglob("*") if p.is_file()]
    assert not {p.name for p in artifacts} & checkpoint_names, sorted(p.name for p in artifacts)
    assert all(p.stat().st_size < 1_000_000 for p in artifacts)

    # Credentials from the environment reach no file the run wrote, locally or on the store.
    written = _all_bytes(second_disk.rglob("*")) + b"".join(fs.cat_file(p) for p in fs.find(root))
    for secret in S3_TEST_CREDENTIALS.values():
        assert secret.encode() not in written
    reliability.record(
        "kill -9 during the S3 upload of a checkpoint, then the node's disk lost",
        "the store's latest.json names only complete checkpoints; a restart with an empty disk "
        "downloads it and resumes with the same losses",
        f"killed with the store at {pointer['tag']} (step 4 uploading); restarted on an empty disk: "
        f"resumed at step {resumed_at}, steps to {STEPS} bit-identical, store pruned to steps 4 and 6",
        "none (steps after the checkpoint recomputed)",
        recover_s,
    )
