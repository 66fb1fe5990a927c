"""One training step's contract, traced inside a real Trainer and DeepSpeed engine (1 gloo rank, every ZeRO
stage): at most one host sync per optimizer step outside DeepSpeed's own code, and a step with a NaN loss
leaves weights, optimizer moments and the EMA exactly as they were, while the next step updates them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = str(REPO_ROOT / "recipes" / "far_tiny_synth64.yaml")
PROBE_TIMEOUT_S = 300


def _probe(data_url, out, zero_stage: int, accum: int, *flags: str, extra: tuple = ()) -> dict:
    overrides = [
        f"data.url={data_url}",
        f"run.output_dir={out}",
        f"run.name=probe{zero_stage}",
        "data.num_workers=0",
        "tracking.enabled=false",
        "eval.interval_steps=1000",
        "eval.grid_images=0",
        "data.expect.seq_len=null",
        "data.expect.token_dim=null",
        "data.expect.num_classes=null",
        f"parallel.zero_stage={zero_stage}",
        f"parallel.global_batch_size={4 * accum}",
        "parallel.micro_batch_size_per_gpu=4",
        *extra,
    ]
    return _run_probe("tests.distributed.step_probe", *flags, RECIPE, *overrides)


def _run_probe(module: str, *args: str) -> dict:
    """A probe script in its own process (its own process group); its PROBE line's JSON."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, cwd=REPO_ROOT
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_step_syncs_once_and_a_nan_step_changes_nothing(latent_dataset, tmp_path, zero_stage):
    probe = _probe(latent_dataset, tmp_path, zero_stage, accum=2)
    # The CPU trace sees .item()-style reads; the step's one transfer (summary.tolist()) is not an aten op on
    # CPU, so nothing of ours may show up at all.
    assert probe["our_syncs"] == [], probe["our_syncs"]
    assert probe["nonfinite"] == 1
    assert probe["unchanged_by_nan_step"] == {"weights": True, "moments": True, "ema": True}
    assert probe["changed_by_next_step"] == {"weights": True, "moments": True, "ema": True}


def test_a_compiled_step_under_deepspeed_syncs_once_and_skips_nan_steps(latent_dataset, tmp_path):
    """parallel.compile (blocks and head body through torch.compile, CPU inductor) inside a ZeRO-2 engine."""
    probe = _probe(latent_dataset, tmp_path, 2, 2, extra=("parallel.compile=true",))
    assert probe["our_syncs"] == [], probe["our_syncs"]
    assert probe["unchanged_by_nan_step"] == {"weights": True, "moments": True, "ema": True}
    assert probe["changed_by_next_step"] == {"weights": True, "moments": True, "ema": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_syncs_the_device_once_on_cuda(latent_dataset, tmp_path):
    """torch's own sync detector: two bf16 steps with accumulation 2, ZeRO-2; ours is the step's one transfer."""
    # bf16 as it says: the tiny recipes are fp32 (CPU), so the precision is set here.
    probe = _probe(latent_dataset, tmp_path, 2, 2, "--cuda", extra=("parallel.precision=bf16",))
    assert probe["precision"] == "bf16", probe
    assert len(probe["our_syncs"]) <= probe["steps_traced"], probe


ACCUM_CASES = [f"{stage}:fp32:fp32" for stage in (0, 2, 3)] + [
    f"{stage}:bf16:{dtype}" for stage in (1, 2, 3) for dtype in ("fp32", "bf16")
]


@pytest.fixture(scope="module")
def accumulation():
    """Every case in one process (DeepSpeed's import is most of the cost)."""
    return _run_probe("tests.distributed.accum_probe", *ACCUM_CASES)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_fp32_accumulation_equals_one_micro_step(accumulation, zero_stage):
    """32 accumulated micro-batches of 2 against one of 64: the same step within 1e-6 (fp32)."""
    probe = accumulation[f"{zero_stage}:fp32:fp32"]
    assert probe["max_weight_diff"] < 1e-6 and probe["grad_rel_error"] < 1e-6, probe


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_fp32_accumulation_of_bf16_gradients_is_closer_to_the_fp32_reference(accumulation, zero_stage):
    """Measured on this CPU (bf16 emulated), 32 micro-batches: relative gradient error 0.0040 with fp32
    accumulation against 0.0083 with bf16 (what remains is bf16's forward and backward)."""
    fp32 = accumulation[f"{zero_stage}:bf16:fp32"]["grad_rel_error"]
    bf16 = accumulation[f"{zero_stage}:bf16:bf16"]["grad_rel_error"]
    assert fp32 < 0.75 * bf16, (fp32, bf16)
