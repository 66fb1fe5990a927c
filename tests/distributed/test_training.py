"""Real DeepSpeed training on 2 gloo ranks (torchrun) against single-process references."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = str(REPO_ROOT / "recipes" / "far_tiny_synth64.yaml")
LAUNCH_TIMEOUT_S = 420
# fp32 on CPU: the 2-rank runs differ from the reference only in the order of floating-point
# reductions (gloo all-reduce of gradients, accumulation vs. batch split), ~1e-7 relative per step,
# growing slowly through Adam; 1e-4 relative over 6 steps is far below any real divergence (a wrong
# gradient scale or data split changes the loss at the 1e-2 level).
PARITY_RTOL = 1e-4
# The shortcut head's targets from a target EMA of its own (decay ramped over 2 steps), distinct from the
# evaluation EMA (optim.ema_decay=0.9): every checkpoint and resume below carries both.
TARGET_EMA = [
    "model.head.consistency_target=ema",
    "model.head.target_ema_decay=0.5",
    "model.head.target_ema_warmup_steps=2",
    # Post-hoc EMA: two power-function EMAs, an fp32 snapshot every 2 steps (compared exactly below).
    "ema.posthoc.enabled=true",
    "ema.posthoc.snapshot_interval_steps=2",
    "ema.posthoc.snapshot_dtype=fp32",
]


def _common(data_url, out: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.url={data_url}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "eval.interval_steps=1000",
        "eval.num_iter=4",
        "eval.grid_images=4",
        "eval.num_images=4",
        "run.log_interval=1",
        "optim.ema_decay=0.9",
        "data.expect.seq_len=null",
        "data.expect.token_dim=null",
        "data.expect.num_classes=null",
        *extra,
    ]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MASTER_ADDR", None)
    return env


def _command(nproc: int, overrides: list[str], recipe: str = RECIPE) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "far_scale.cli", "train", recipe, *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "far_scale.cli",
        "train",
        recipe,
        *overrides,
    ]


def _train(nproc: int, overrides: list[str], recipe: str = RECIPE) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(nproc, overrides, recipe),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        env=_env(),
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]  # a resumed run's line replaces a killed run's
    return losses


def _keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    keys = {}
    for line in (run_dir / f"sample_keys.rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        keys[row["step"]] = row["keys"]
    return keys


def _ema(run_dir: Path, step: int, name: str = "ema.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / name))


def _target_ema(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return _ema(run_dir, step, "target_ema.safetensors")


def _posthoc_ema(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The tracked power-function EMAs saved with checkpoint ``step`` (fp32, keys ``<profile>/<param>``)."""
    return _ema(run_dir, step, "posthoc_ema.safetensors")


def _snapshots(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    directory = run_dir / "checkpoints" / "posthoc"
    return {
        int(p.stem.removeprefix("phema_step")): load_file(str(p))
        for p in sorted(directory.glob("phema_step*.safetensors"))
    }


@pytest.fixture(scope="module")
def parity_runs(latent_dataset, tmp_path_factory):
    """One 1-rank reference (accumulation 2) and 2-rank runs with ZeRO 1, 2, 3 on the same global batches."""
    out = tmp_path_factory.mktemp("parity")
    base = [
        "data.split=samples",
        "data.num_workers=0",
        "run.max_steps=6",
        "checkpoint.interval_steps=3",
        "checkpoint.keep_last=5",
        "parallel.global_batch_size=16",
        "parallel.micro_batch_size_per_gpu=8",
        "tracking.enabled=false",
        *TARGET_EMA,
    ]
    _train(1, _common(latent_dataset, out, "ref", *base, "parallel.zero_stage=0"))
    for stage in (1, 2, 3):
        _train(2, _common(latent_dataset, out, f"zero{stage}", *base, f"parallel.zero_stage={stage}"))
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_on_two_ranks_match_one_rank(parity_runs, stage):
    reference = _losses(parity_runs / "ref")
    sharded = _losses(parity_runs / f"zero{stage}")
    assert sorted(reference) == sorted(sharded) == list(range(1, 7))
    for step in reference:
        assert sharded[step] == pytest.approx(reference[step], rel=PARITY_RTOL), step
    # The loss moves (the comparison is not between constants).
    assert reference[6] < reference[1]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_rank_reports_its_memory(parity_runs, stage):
    """memory.json: each rank's peak and what building the model added, beside the plan's estimates."""
    record = json.loads((parity_runs / f"zero{stage}" / "memory.json").read_text())
    assert record["built_partitioned"] == (stage == 3)
    assert len(record["ranks"]) == 2
    for rank in record["ranks"]:
        assert rank["peak_gib"] > rank["build_host_gib"] >= 0 and rank["build_device_gib"] is None
    assert 0 < record["construction_estimate_gib"] and 0 < record["model_state_estimate_gib"]


def _assert_close_states(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = PARITY_RTOL, atol: float = 1e-6
) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("load", [_ema, _target_ema, _posthoc_ema], ids=["ema", "target_ema", "posthoc_ema"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_emas_under_zero_equal_unsharded_ones(parity_runs, stage, load):
    _assert_close_states(load(parity_runs / f"zero{stage}", 6), load(parity_runs / "ref", 6))
    # Each EMA differs from its step-3 value (decay 0.9 / 0.5 over 6 steps), so this compares real averages.
    earlier, reference = load(parity_runs / "ref", 3), load(parity_runs / "ref", 6)
    assert any(not torch.equal(earlier[n], reference[n]) for n in reference)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_posthoc_snapshots_on_two_ranks_equal_one_rank_snapshots(parity_runs, stage):
    reference, sharded = _snapshots(parity_runs / "ref"), _snapshots(parity_runs / f"zero{stage}")
    assert sorted(reference) == sorted(sharded) == [2, 4, 6]
    for step in reference:
        _assert_close_states(sharded[step], reference[step])
    listing = json.loads((parity_runs / f"zero{stage}" / "checkpoints" / "posthoc" / "files.json").read_text())
    assert sorted(listing) == [f"phema_step{s:08d}.safetensors" for s in (2, 4, 6)]
    # The two profiles are distinct averages, and a snapshot is the checkpoint's tracked state at its step.
    last = reference[6]
    assert any(not torch.equal(last[f"0/{n}"], last[f"1/{n}"]) for n in _ema(parity_runs / "ref", 6))
    _assert_close_states(last, _posthoc_ema(parity_runs / "ref", 6), rtol=0, atol=0)


def test_target_ema_is_an_average_of_its_own(parity_runs):
    """The target EMA covers the head's MLP with its own decay: distinct from the evaluation EMA's tensors."""
    ema, target = _ema(parity_runs / "ref", 6), _target_ema(parity_runs / "ref", 6)
    assert set(target) == {name for name in ema if name.startswith("head.net.")}
    assert all(not torch.equal(target[name], ema[name]) for name in target if name.endswith("final.linear.weight"))


def _resume_from(parity_runs: Path, stage: int, tmp_path: Path, name: str) -> Path:
    """A fresh run directory holding only the step-3 checkpoint of the 2-rank ZeRO-``stage`` run."""
    source = parity_runs / f"zero{stage}" / "checkpoints"
    target = tmp_path / name / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(source / "step_00000003", target / "step_00000003")
    (target / "latest.json").write_text(json.dumps({"tag": "step_00000003", "step": 3, "world_size": 2}))
    return tmp_path / name


def _parity_overrides(data_url, tmp_path: Path, name: str, stage: int) -> list[str]:
    return _common(
        data_url,
        tmp_path,
        name,
        "data.split=samples",
        "data.num_workers=0",
        "run.max_steps=6",
        "checkpoint.interval_steps=3",
        "parallel.global_batch_size=16",
        "parallel.micro_batch_size_per_gpu=8",
        f"parallel.zero_stage={stage}",
        "tracking.enabled=false",
        *TARGET_EMA,
    )


# Resuming a ZeRO-3 checkpoint on another world size through DeepSpeed's universal format restores the weights
# (step 4's loss, computed before any update, matches to 1e-4) but the updates after it drift: step 5's loss
# differs by 3e-4 relative and some weights by up to one learning-rate step (1.5e-4; measured 2026-11-30). The converted
# universal files hold the exact Adam moments and step (checked against the per-rank states), and a 1-rank
# ZeRO-3 run from scratch matches the reference bit for bit, so the loss is in DeepSpeed's ZeRO-3 universal
# load. Stated here so that anything worse still fails; far-scale's own resharding is the open fix.
UNIVERSAL_ZERO3_RTOL = 5e-3
UNIVERSAL_ZERO3_ATOL = 5e-4  # about three learning-rate steps


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoints_resume_from_two_to_one_to_two_ranks(parity_runs, latent_dataset, tmp_path, stage):
    """A ZeRO checkpoint from 2 ranks continues on 1 rank (step 4), whose checkpoint continues on 2 ranks
    (steps 5-6), each time through DeepSpeed's universal format; both EMAs too."""
    run_dir = _resume_from(parity_runs, stage, tmp_path, "resized")
    overrides = _parity_overrides(latent_dataset, tmp_path, "resized", stage)
    shrunk = _train(1, [o for o in overrides if not o.startswith("run.max_steps=")] + ["run.max_steps=4"])
    grown = _train(2, overrides)
    assert "universal" in shrunk.stderr and "universal" in grown.stderr
    resumed = _losses(run_dir)
    reference = _losses(parity_runs / "ref")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed[4] == pytest.approx(reference[4], rel=PARITY_RTOL)
    rtol, atol = (PARITY_RTOL, 1e-6) if stage < 3 else (UNIVERSAL_ZERO3_RTOL, UNIVERSAL_ZERO3_ATOL)
    for step in (5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=rtol), step
    # The EMAs after 3 more steps follow those steps' weights (and their drift under ZeRO-3).
    for load in (_ema, _target_ema, _posthoc_ema):
        _assert_close_states(load(run_dir, 6), load(parity_runs / "ref", 6), rtol, atol)


@pytest.mark.parametrize("stage", [2, 3])
def test_both_emas_are_restored_exactly_at_another_world_size(parity_runs, latent_dataset, tmp_path, stage):
    """Resumed on 1 rank at its last step, the run saves again what it restored: the 2-rank EMAs, bit for bit."""
    run_dir = _resume_from(parity_runs, stage, tmp_path, "restored")
    overrides = _parity_overrides(latent_dataset, tmp_path, "restored", stage)
    _train(1, [o for o in overrides if not o.startswith("run.max_steps=")] + ["run.max_steps=3"])
    for load in (_ema, _target_ema, _posthoc_ema):
        expected, got = load(parity_runs / f"zero{stage}", 3), load(run_dir, 3)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


def test_zero0_checkpoint_resumes_on_two_ranks(parity_runs, latent_dataset, tmp_path):
    """ZeRO-0 states are whole: a 1-rank checkpoint continues on 2 ranks without the universal format."""
    source = parity_runs / "ref" / "checkpoints"
    target = tmp_path / "grown" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(source / "step_00000003", target / "step_00000003")
    (target / "latest.json").write_text(json.dumps({"tag": "step_00000003", "step": 3, "world_size": 1}))
    result = _train(2, _parity_overrides(latent_dataset, tmp_path, "grown", 0))
    assert "loading them directly" in result.stderr
    resumed, reference = _losses(tmp_path / "grown"), _losses(parity_runs / "ref")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=PARITY_RTOL), step
    for load in (_ema, _target_ema):
        _assert_close_states(load(tmp_path / "grown", 6), load(parity_runs / "ref", 6))


def test_zero3_resume_on_the_same_ranks_is_bit_identical(parity_runs, latent_dataset, tmp_path):
    """ZeRO-3, 2 ranks, resumed from step 3: the same losses and both EMAs, bit for bit."""
    run_dir = _resume_from(parity_runs, 3, tmp_path, "resumed")
    _train(2, _parity_overrides(latent_dataset, tmp_path, "resumed", 3))
    straight, resumed = _losses(parity_runs / "zero3"), _losses(run_dir)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == straight[step], step
    for load in (_ema, _target_ema):
        expected, got = load(parity_runs / "zero3", 6), load(run_dir, 6)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


def _kill_after_checkpoint(command: list[str], checkpoints: Path, step: int) -> int:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO_ROOT, start_new_session=True
    )
    pointer = checkpoints / "latest.json"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= step:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def resume_runs(latent_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    base = [
        "data.split=shards",
        "data.num_workers=2",
        "run.max_steps=8",
        "checkpoint.interval_steps=4",
        "parallel.global_batch_size=8",
        "parallel.micro_batch_size_per_gpu=4",
        "parallel.zero_stage=2",
        "run.record_sample_keys=true",
        *TARGET_EMA,
    ]
    _train(2, _common(latent_dataset, out, "straight", *base))
    killed = _common(latent_dataset, out, "killed", *base)
    code = _kill_after_checkpoint(_command(2, killed), out / "killed" / "checkpoints", 4)
    assert code == -signal.SIGKILL
    latest = json.loads((out / "killed" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4, "the run finished before it could be killed"
    _train(2, killed)
    return out


def test_resume_after_sigkill_is_bit_identical(resume_runs):
    straight, resumed = _losses(resume_runs / "straight"), _losses(resume_runs / "killed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == straight[step], step  # exact: same data, same draws, same optimizer state
    for load in (_ema, _target_ema, _posthoc_ema):
        expected, got = load(resume_runs / "straight", 8), load(resume_runs / "killed", 8)
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    # Every post-hoc snapshot is kept, and those written after the resume equal the uninterrupted run's.
    expected, got = _snapshots(resume_runs / "straight"), _snapshots(resume_runs / "killed")
    assert sorted(got) == sorted(expected) == [2, 4, 6, 8]
    for step in expected:
        for name in expected[step]:
            assert torch.equal(got[step][name], expected[step][name]), (step, name)


def test_resume_neither_repeats_nor_skips_samples(resume_runs):
    for rank in range(2):
        straight, resumed = _keys(resume_runs / "straight", rank), _keys(resume_runs / "killed", rank)
        assert resumed == straight
    seen = [k for rank in range(2) for keys in _keys(resume_runs / "killed", rank).values() for k in keys]
    assert len(seen) == len(set(seen)) == 8 * 8  # 8 steps x 8 images, all distinct within the epoch


def test_mlflow_store_holds_the_run_and_resume_appends(resume_runs):
    from mlflow.tracking import MlflowClient

    for name, runs_expected in (("straight", 1), ("killed", 1)):
        run_dir = resume_runs / name
        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("far-scale")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == runs_expected  # the resumed job continued the same run
        run = runs[0]
        assert run.data.params["config.model.arch"] == "far"
        assert run.data.params["derived.total_steps"] == "8"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted({m.step for m in history}) == list(range(1, 9))
        for metric in ("latents_per_s", "data_wait_share", "grad_norm", "lr", "loss/flow_matching"):
            assert client.get_metric_history(run.info.run_id, metric), metric
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts
        # Sample grids are MLflow images under the key "samples" with their step (the UI's step slider).
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert any(p.startswith("images/samples+step+8+") and p.endswith(".png") for p in images), images
        assert client.get_experiment_by_name("far-scale").tags["mlflow.experimentKind"] == "custom_model_development"
        assert run.data.tags["checkpoint/step"] == "8"


def test_export_writes_safetensors_and_config(resume_runs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "far_scale.cli", "export", str(resume_runs / "straight"), str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ema = load_file(str(tmp_path / "export" / "ema.safetensors"))
    raw = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert ema.keys() == raw.keys() and "head.net.final.linear.weight" in ema
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert "arch: far" in (tmp_path / "export" / "config.yaml").read_text()
    # A post-hoc EMA length chosen now, from the run's snapshots: a tracked width is the tracked EMA itself.
    for sigma, out in (("0.1", "tracked"), ("0.07", "between")):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "far_scale.cli",
                "export",
                str(resume_runs / "straight"),
                str(tmp_path / out),
                "--ema-only",
                "--ema-sigma-rel",
                sigma,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "profile residual" in result.stdout
    tracked = _posthoc_ema(resume_runs / "straight", 8)
    got = load_file(str(tmp_path / "tracked" / "ema.safetensors"))
    _assert_close_states(got, {k.removeprefix("1/"): v for k, v in tracked.items() if k.startswith("1/")}, 1e-5, 1e-6)
    info = json.loads((tmp_path / "between" / "posthoc.json").read_text())
    assert info["step"] == 8 and info["snapshots"] == 4 and info["residual"] < 0.05
    # Sampling reads only the export (safetensors + config) and the dataset's codec.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "far_scale.cli",
            "sample",
            str(tmp_path / "export"),
            "--out",
            str(tmp_path / "samples"),
            "--num-images",
            "8",
            "--head-steps",
            "2",
            "--num-iter",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    with Image.open(tmp_path / "samples" / "grid.png") as image:
        assert image.size == (4 * 32, 2 * 32)  # 4 classes per row, 32 px images


def test_unreachable_tracking_server_does_not_stop_training(latent_dataset, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = _train(
        1,
        _common(
            latent_dataset,
            tmp_path,
            "offline",
            "run.max_steps=2",
            "data.num_workers=0",
            "parallel.global_batch_size=8",
            "parallel.micro_batch_size_per_gpu=8",
            f"tracking.uri={dead}",
            "tracking.final_flush_timeout_s=2",
        ),
    )
    assert "unreachable" in result.stderr and "never answered" in result.stderr
    assert sorted(_losses(tmp_path / "offline")) == [1, 2]
    # Nothing is lost: what the server never received is kept beside the run.
    unsent = [json.loads(line) for line in (tmp_path / "offline" / "mlflow_unsent.jsonl").read_text().splitlines()]
    assert {(m["key"], m["step"]) for m in unsent} >= {("loss", 2)}


GOLDEN = REPO_ROOT / "tests" / "assets" / "golden_losses_far_tiny.json"
# Same torch build and recipe give the same fp32 losses; a different CPU's kernels may round
# differently in the last bits, which stays far below this.
GOLDEN_RTOL = 1e-4


def test_reference_run_matches_golden_losses(parity_runs):
    """The 1-rank reference run's first losses against values stored in tests/assets/.

    Regenerate after an intended change of model, data or loss: FAR_SCALE_UPDATE_GOLDEN=1 pytest -k golden.
    """
    losses = _losses(parity_runs / "ref")
    first = {str(step): losses[step] for step in (1, 2, 3)}
    if os.environ.get("FAR_SCALE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "losses": first}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    for step, value in golden.items():
        assert first[step] == pytest.approx(value, rel=GOLDEN_RTOL), step


def test_nonfinite_losses_are_skipped_and_counted(latent_dataset, tmp_path):
    """A shard of NaN latents: its micro-batches are skipped on every rank, counted, then the run stops."""
    import dataclasses
    import hashlib

    import numpy as np
    import webdataset as wds

    from far_scale.data.contract import encode_sample
    from far_scale.data.manifest import read_manifest, write_manifest
    from far_scale.data.shards import iter_tar_bytes

    data = tmp_path / "nan-shards"
    shutil.copytree(latent_dataset, data)
    manifest = read_manifest(str(data))
    entries = []
    for entry in manifest.shards:
        path = data / entry.name
        samples = list(iter_tar_bytes(path.read_bytes(), entry.name))
        with open(path, "wb") as handle, wds.TarWriter(handle, encoder=False) as tar:
            for sample in samples:
                tar.write(encode_sample(int(sample.key), sample.label, np.full_like(sample.latents, np.nan)))
        # As an encoder that produced NaNs would have recorded them (the loader checks every shard's checksum).
        written = path.read_bytes()
        entries.append(dataclasses.replace(entry, num_bytes=len(written), sha256=hashlib.sha256(written).hexdigest()))
    write_manifest(str(data), dataclasses.replace(manifest, shards=tuple(entries)))
    common = _common(
        data,
        tmp_path,
        "nan",
        "run.max_steps=3",
        "data.num_workers=0",
        "tracking.enabled=false",
        "parallel.global_batch_size=8",
        "parallel.micro_batch_size_per_gpu=8",
    )
    result = subprocess.run(
        _command(1, [*common, "run.max_nonfinite_steps=2"]),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        env=_env(),
        cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert "non-finite loss at step 0" in result.stderr
    assert "3 non-finite losses exceed run.max_nonfinite_steps=2" in result.stderr
    assert not (tmp_path / "nan" / "checkpoints" / "latest.json").exists()
