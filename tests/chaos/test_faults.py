"""Faults injected for real into real runs: killed ranks and jobs, damaged files, full and read-only disks.

Each test asserts the expected behaviour and records a row of the reliability table (``reliability``
fixture, tests/conftest.py): fault, expected, observed, data lost, time to recover.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.distributed.test_training import _command, _common, _env, _losses, _train

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RUN = "far"
KILL_TIMEOUT_S = 300
DETECT_LIMIT_S = 120  # a dead rank must end the job well within this (no hang)
BASE = [
    "data.split=samples",
    "data.num_workers=0",
    "parallel.global_batch_size=8",
    "parallel.micro_batch_size_per_gpu=4",
    "tracking.enabled=false",
    "model.head.consistency_target=ema",
]


def _overrides(data, out: Path, steps: int, interval: int, *extra: str) -> list[str]:
    return _common(
        data,
        out,
        RUN,
        *BASE,
        f"run.max_steps={steps}",
        f"checkpoint.interval_steps={interval}",
        "checkpoint.keep_last=3",
        *extra,
    )


def _run(nproc: int, overrides: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(
        _command(nproc, overrides), capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=KILL_TIMEOUT_S
    )
    return result, time.monotonic() - start


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _pointer(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())


@pytest.fixture(scope="module")
def references(latent_dataset, tmp_path_factory):
    """Uninterrupted 1- and 2-rank runs of 8 steps (checkpoints every 2): the losses every fault is held to."""
    out = tmp_path_factory.mktemp("chaos-ref")
    runs = {}
    for nproc in (1, 2):
        _train(nproc, _overrides(latent_dataset, out / f"n{nproc}", 8, 2))
        runs[nproc] = out / f"n{nproc}" / RUN
    return runs


def _assert_same_trajectory(run_dir: Path, reference: Path, total: int) -> None:
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, total + 1)), "a step is missing or extra"
    assert losses == _losses(reference), "the resumed trajectory differs from the uninterrupted one"


def _restart_and_compare(nproc: int, overrides: list[str], run_dir: Path, reference: Path) -> float:
    """Run the interrupted command again; it must finish with the uninterrupted run's losses. Returns its time."""
    result, recover_s = _run(nproc, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_trajectory(run_dir, reference, 8)
    return recover_s


def test_one_rank_killed_mid_step(latent_dataset, tmp_path, references, reliability):
    overrides = _overrides(latent_dataset, tmp_path, 8, 2)
    job = subprocess.Popen(
        _command(2, overrides),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    run_dir = tmp_path / RUN
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while _steps_logged(run_dir) < 3 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        victims = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if p.environ().get("RANK") == "1" and "far_scale.cli" in " ".join(p.cmdline())
        ]
        assert len(victims) == 1, "rank 1's process not found"
        victims[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(timeout=DETECT_LIMIT_S)
        detect_s = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert code != 0
    resumed_from = _pointer(run_dir)["step"]
    recover_s = _restart_and_compare(2, overrides, run_dir, references[2])
    reliability.record(
        "kill -9 of one of 2 ranks mid-step (torchrun, ZeRO-2)",
        "the job ends (no hang); a restart resumes from the last checkpoint with the same losses",
        f"job ended {detect_s:.1f} s after the kill (exit {code}); resumed at step {resumed_from}, steps 1-8 "
        "bit-identical to the uninterrupted run",
        "none (steps after the checkpoint recomputed)",
        recover_s,
        tmp_path=tmp_path,
    )


def test_job_killed_during_a_checkpoint_write(latent_dataset, tmp_path, references, reliability):
    overrides = _overrides(latent_dataset, tmp_path, 8, 2)
    run_dir = tmp_path / RUN
    target = run_dir / "checkpoints" / "step_00000004"
    job = subprocess.Popen(
        _command(1, overrides),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not target.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.001)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    pointer = _pointer(run_dir)
    complete = (target / "files.json").is_file()
    recover_s = _restart_and_compare(1, overrides, run_dir, references[1])
    reliability.record(
        "kill -9 of the whole job while it writes a checkpoint",
        "latest.json never names a partial checkpoint; the restart resumes from the last complete one",
        f"killed with latest.json at step {pointer['step']} and step 4 {'complete' if complete else 'partial'}; "
        "resumed there, steps 1-8 bit-identical",
        "none",
        recover_s,
        tmp_path=tmp_path,
    )


# ---- damaged files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(latent_dataset, tmp_path_factory, references):
    """A copy of the data and a 1-rank run with checkpoints at steps 2 and 4 (of 8)."""
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(latent_dataset, root / "data")
    _train(1, _overrides(root / "data", root / "runs", 4, 2))
    return root


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _first_shard(data: Path) -> Path:
    return sorted(data.glob("shard-*.tar"))[0]


TAR_HEADER_BYTES = 512
DAMAGES = {
    # name: (what is damaged, how, the text the error must contain)
    "truncated-shard": (lambda root: _truncate(_first_shard(root / "data")), "shard-000000.tar"),
    "bit-flipped-shard": (
        lambda root: _flip_byte(_first_shard(root / "data"), TAR_HEADER_BYTES * 3 + 100),
        "shard-000000.tar does not match the manifest",
    ),
    "damaged-manifest": (lambda root: _truncate(root / "data" / "manifest.json"), "manifest.json"),
    "truncated-checkpoint-file": (
        lambda root: _truncate(root / "runs" / RUN / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"),
        "mp_rank_00_model_states.pt has",
    ),
    "bit-flipped-checkpoint-file": (
        lambda root: _flip_byte(root / "runs" / RUN / "checkpoints" / "step_00000004" / "ema.safetensors", 5000),
        "ema.safetensors has",
    ),
    "damaged-latest-pointer": (
        lambda root: (root / "runs" / RUN / "checkpoints" / "latest.json").write_text('{"tag": "step_0'),
        "latest.json is damaged",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file_is_named_and_nothing_is_lost(finished, tmp_path, damage, references, reliability):
    root = tmp_path / "copy"
    shutil.copytree(finished, root)
    damage_fn, must_name = DAMAGES[damage]
    damage_fn(root)
    run_dir = root / "runs" / RUN
    before = (run_dir / "checkpoints" / "latest.json").read_text()
    overrides = _overrides(root / "data", root / "runs", 8, 2)
    if "shard" in damage:  # the data is read from step 4 on: start a fresh run that reads every shard
        shutil.rmtree(run_dir)
    result, _ = _run(1, overrides)
    assert result.returncode == 1, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error and must_name in error[-1], result.stderr[-2000:]
    observed = error[-1].removeprefix("error: ")
    recover_s = None
    if "shard" not in damage and "manifest" not in damage:
        # Nothing was loaded or overwritten; following the message's fix resumes with the same losses.
        assert (run_dir / "checkpoints" / "latest.json").read_text() in (before, '{"tag": "step_0')
        hint = json.loads(re.search(r"latest\.json as (\{.*?\}) \(make sure", observed).group(1))
        (run_dir / "checkpoints" / "latest.json").write_text(json.dumps(hint))
        fixed, recover_s = _run(1, overrides)
        assert fixed.returncode == 0, fixed.stderr[-3000:]
        assert _losses(run_dir) == _losses(references[1])
    reliability.record(
        damage.replace("-", " "),
        "exit 1 with one line naming the file and the fix; nothing loaded or overwritten",
        observed[:220]
        + ("..." if len(observed) > 220 else "")
        + ("; after the fix: resumed, losses bit-identical" if recover_s is not None else ""),
        "none" if recover_s is None else "none (the steps after the previous checkpoint recomputed)",
        recover_s,
        tmp_path=tmp_path,
    )


# ---- disks -------------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root or CAP_SYS_ADMIN")


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


CHECKPOINT_FS_MIB = 24  # holds one tiny checkpoint (~19 MiB) but not a second


def test_full_checkpoint_disk(latent_dataset, tmp_path, references, reliability):
    mount = tmp_path / "small-disk"
    _mount_tmpfs(mount, f"size={CHECKPOINT_FS_MIB}m")
    try:
        overrides = _overrides(
            latent_dataset, tmp_path, 8, 2, f"checkpoint.url={mount / 'ckpt'}", "checkpoint.keep_last=1"
        )
        result, _ = _run(1, overrides)
        assert result.returncode == 1
        error = [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1]
        assert "could not write checkpoint" in error and "still names step_00000002" in error
        assert json.loads((mount / "ckpt" / "latest.json").read_text())["tag"] == "step_00000002"
        assert not (mount / "ckpt" / "step_00000004").exists()  # the partial checkpoint was removed
        # Move the checkpoints to a bigger disk and resume from the one latest.json names.
        shutil.copytree(mount / "ckpt", tmp_path / "big-disk")
    finally:
        _unmount(mount)
    fixed, recover_s = _run(1, [*overrides, f"checkpoint.url={tmp_path / 'big-disk'}"])
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert _losses(tmp_path / RUN) == _losses(references[1])
    reliability.record(
        f"checkpoint directory full ({CHECKPOINT_FS_MIB} MiB tmpfs)",
        "exit 1 naming the directory and its free space; latest.json keeps the last complete checkpoint; "
        "the partial one is removed",
        error.removeprefix("error: ")[:140] + "...; resumed on a bigger disk, losses bit-identical",
        "none (steps after the checkpoint recomputed)",
        recover_s,
        tmp_path=tmp_path,
    )


def test_read_only_checkpoint_directory(latent_dataset, tmp_path, reliability):
    mount = tmp_path / "read-only"
    _mount_tmpfs(mount, "size=1m,ro")
    try:
        start = time.monotonic()
        result, _ = _run(1, _overrides(latent_dataset, tmp_path, 8, 2, f"checkpoint.url={mount / 'ckpt'}"))
        seconds = time.monotonic() - start
    finally:
        _unmount(mount)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1]
    assert f"{mount / 'ckpt'} is not writable" in error
    assert not (tmp_path / RUN / "metrics.jsonl").exists()  # refused before the first step
    reliability.record(
        "checkpoint directory not writable (read-only mount)",
        "refused at start, before any step, naming the directory",
        f"{error.removeprefix('error: ')[:120]}... ({seconds:.0f} s after launch)",
        "none",
        tmp_path=tmp_path,
    )
