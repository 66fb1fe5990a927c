"""Malformed recipes and command lines: each is rejected, with a message that names the field, file or URL.

Run in-process (``far_scale.cli.main``), so the whole table costs seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from far_scale.cli import main
from tests.conftest import RECIPES

pytestmark = [pytest.mark.chaos]

TINY = str(RECIPES / "far_tiny_synth64.yaml")
CHECK = ["check-config", TINY]

# name: (argv, text the error must contain); "{tmp}" is the test's temporary directory.
CASES = {
    "unknown key": ([*CHECK, "optim.lrr=1e-4"], "optim.lrr: unknown key; did you mean 'optim.lr'"),
    "unknown section": ([*CHECK, "optimizer.lr=1e-4"], "optimizer"),
    "section set to a value": ([*CHECK, "optim=3"], "optim"),
    "override without =": ([*CHECK, "optim.lr"], "optim.lr"),
    "wrong type": ([*CHECK, "parallel.global_batch_size=abc"], "parallel.global_batch_size"),
    "zero batch": ([*CHECK, "parallel.global_batch_size=0"], "parallel.global_batch_size"),
    "negative micro batch": ([*CHECK, "parallel.micro_batch_size_per_gpu=-1"], "parallel.micro_batch_size_per_gpu"),
    "unknown arch": ([*CHECK, "model.arch=dit"], "model.arch"),
    "unknown size": ([*CHECK, "model.size=gigantic"], "model.size"),
    "zero stage out of range": ([*CHECK, "parallel.zero_stage=4"], "parallel.zero_stage"),
    "unknown precision": ([*CHECK, "parallel.precision=fp8"], "parallel.precision"),
    "unknown data split": ([*CHECK, "data.split=columns"], "data.split"),
    "indivisible batch for the world size": (
        [*CHECK, "--world-size", "3"],
        "is not divisible by parallel.micro_batch_size_per_gpu",
    ),
    "world size zero": ([*CHECK, "--world-size", "0"], "world size must be >= 1"),
    "neither steps nor epochs": ([*CHECK, "run.max_steps=null"], "set exactly one of run.max_steps and run.epochs"),
    "both steps and epochs": ([*CHECK, "run.epochs=2"], "set exactly one of run.max_steps and run.epochs"),
    "two warm-ups": ([*CHECK, "schedule.warmup_epochs=1"], "schedule.warmup_epochs and schedule.warmup_steps"),
    "custom size without dims": ([*CHECK, "model.size=custom"], "model.encoder_depth"),
    "width not divisible by heads": (
        [*CHECK, "model.width=130"],
        "model.width=130 is not divisible by model.num_heads",
    ),
    "levels not a power of two": ([*CHECK, "model.head.num_levels=100"], "model.head.num_levels=100"),
    "head steps not a power of two": ([*CHECK, "eval.head_steps=3"], "eval.head_steps=3"),
    "DDPM steps above training steps": (
        [*CHECK, "model.arch=mar", "eval.head_steps=5000"],
        "eval.head_steps=5000 exceeds model.head.num_train_timesteps",
    ),
    "mask ratio bounds": ([*CHECK, "model.mask_ratio_mean=0.6"], "model.mask_ratio_min=0.7 is above"),
    "FID without reference statistics": (
        [*CHECK, "eval.inception_weights=/x/pt_inception.pth"],
        "eval.inception_weights and eval.reference_stats",
    ),
    "guidance distillation on MAR": (
        [*CHECK, "model.arch=mar", "model.head.guidance_distillation_scale=2"],
        "model.head.guidance_distillation_scale",
    ),
    "guidance distillation without dropout": (
        [*CHECK, "model.head.guidance_distillation_scale=2", "model.class_dropout=0"],
        "model.class_dropout > 0",
    ),
    "more iterations than tokens": ([*CHECK, "eval.num_iter=1000"], "eval.num_iter=1000 exceeds the sequence length"),
    "data shape contradicts the manifest": (
        [*CHECK, "data.url={data}", "data.expect.seq_len=256"],
        "data.expect.seq_len is 256 but the manifest says",
    ),
    "unknown storage protocol": ([*CHECK, "data.url=nosuch://bucket/x"], "data.url=nosuch://bucket/x"),
    "unknown checkpoint protocol": ([*CHECK, "checkpoint.url=nosuch://bucket/x"], "checkpoint.url=nosuch://bucket/x"),
    "bad tracking URI": ([*CHECK, "tracking.uri=mysql://db"], "tracking.uri=mysql://db"),
    "missing recipe file": (["check-config", "{tmp}/missing.yaml"], "missing.yaml"),
    "recipe YAML syntax error": (["check-config", "{tmp}/broken.yaml"], "broken.yaml"),
    "recipe with an unknown top-level key": (["check-config", "{tmp}/unknown_top.yaml"], "trainer"),
    "recipe whose base is missing": (["check-config", "{tmp}/bad_base.yaml"], "nowhere.yaml"),
    "verify a URL with no manifest": (["data", "verify", "{tmp}/empty"], "no manifest.json at"),
    "encode an empty image folder": (
        [
            "data",
            "encode",
            "{tmp}/empty",
            "{tmp}/out",
            "--codec",
            "pca",
            "--codec-weights",
            "{tmp}/missing.safetensors",
        ],
        "no class folders under",
    ),
    "unknown codec": (["data", "encode", "{tmp}/empty", "{tmp}/out", "--codec", "nosuch"], "--codec"),
    "sample a run that has no checkpoint": (["sample", "{tmp}/empty", "--out", "{tmp}/samples"], "empty"),
    "sampling override outside eval": (
        ["sample", "{tmp}/empty", "--out", "{tmp}/samples", "model.width=3"],
        "model.width=3",
    ),
    "FID with missing reference statistics": (
        ["eval", "fid", "{tmp}/none.npz", "--ref", "{tmp}/ref.npz", "--inception", "{tmp}/pt_inception.pth"],
        "ref.npz",
    ),
    "SLURM launch with zero nodes": (["launch", "slurm", TINY, "--nodes", "0", "--dry-run"], "--nodes"),
    "local launch with zero processes": (["launch", "local", TINY, "--nproc", "0"], "--nproc"),
}


def _write_recipes(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "broken.yaml").write_text("model:\n  arch: far\n   size: tiny\n")
    (tmp / "unknown_top.yaml").write_text(f"base: {TINY}\ntrainer:\n  lr: 1\n")
    (tmp / "bad_base.yaml").write_text("base: nowhere.yaml\n")


@pytest.fixture(scope="module")
def tmp_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    _write_recipes(tmp)
    return tmp


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_rejected_naming_it(case, tmp_inputs, latent_dataset, capsys, reliability):
    argv, must_contain = CASES[case]
    argv = [a.format(tmp=tmp_inputs, data=latent_dataset) for a in argv]
    must_contain = must_contain.format(tmp=tmp_inputs, data=latent_dataset)
    start = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert code not in (0, None), f"{case}: accepted"
    assert must_contain in err, f"{case}: {err[-1500:]}"
    assert "Traceback" not in err
    message = " ".join(line.strip() for line in err.strip().splitlines()[-2:])
    reliability.record(
        f"bad input: {case}",
        "rejected (exit != 0) naming the field, file or URL",
        f"exit {code} in {seconds:.1f} s: {message[:150]}",
        "none",
        tmp_path=tmp_inputs,
    )
