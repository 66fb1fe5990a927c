"""`check-config` prints the numbers `train` runs: total steps, warm-up steps, gradient accumulation.

Both read one plan; this proves it end to end, from the printed report to what the trainer did
(steps in metrics.jsonl, the learning rate of each step, the micro-batches each rank consumed per step).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECIPES, REPO_ROOT
from tests.distributed.test_training import _common, _train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MICRO = 4
CASES = {
    # recipe, world size, overrides: uneven shards (12 x 10 + 8), epochs and warm-up in epochs or steps
    "far-1rank-shards-epochs": (
        "far_tiny_synth64.yaml",
        1,
        [
            "run.epochs=1",
            "schedule.warmup_steps=null",
            "schedule.warmup_epochs=0.5",
            "data.split=shards",
            "data.num_workers=2",
            "parallel.global_batch_size=8",
        ],
    ),
    "far-2ranks-shards-accum": (
        "far_tiny_synth64.yaml",
        2,
        [
            "run.epochs=1",
            "schedule.warmup_steps=null",
            "schedule.warmup_epochs=0.4",
            "data.split=shards",
            "data.num_workers=1",
            "parallel.global_batch_size=16",
        ],
    ),
    # micro_batch_size_per_gpu: auto on a (pretend) 25 MB card resolves to 4 of the 8 images per rank: the same
    # number in check-config and in train.
    "far-2ranks-auto-micro": (
        "far_tiny_synth64.yaml",
        2,
        [
            "run.max_steps=3",
            "schedule.warmup_steps=1",
            "data.split=samples",
            "data.num_workers=0",
            "parallel.global_batch_size=16",
            "parallel.micro_batch_size_per_gpu=auto",
            "parallel.device_memory_gib=0.025",
        ],
    ),
    "mar-2ranks-samples-accum3": (
        "mar_tiny_synth64.yaml",
        2,
        [
            "run.epochs=2",
            "schedule.warmup_steps=3",
            "data.split=samples",
            "data.num_workers=0",
            "parallel.global_batch_size=24",
        ],
    ),
}


def _printed(recipe: Path, world_size: int, overrides: list[str]) -> dict[str, int]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "far_scale.cli",
            "check-config",
            str(recipe),
            "--world-size",
            str(world_size),
            "--precision",
            "fp32",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    derived = result.stdout.split("# derived", 1)[1]
    return {
        key: int(re.search(rf"^{key}: (\d+)$", derived, re.M).group(1))
        for key in ("total_steps", "warmup_steps", "grad_accum_steps", "micro_batch_size_per_gpu")
    }


@pytest.mark.parametrize("case", list(CASES))
def test_check_config_numbers_are_what_train_runs(latent_dataset, tmp_path, case):
    recipe_name, world_size, extra = CASES[case]
    overrides = _common(
        latent_dataset,
        tmp_path,
        case,
        "tracking.enabled=false",
        "run.record_sample_keys=true",
        "run.max_steps=null",
        f"parallel.micro_batch_size_per_gpu={MICRO}",
        "schedule.kind=constant",
        "optim.lr=1e-3",
        "checkpoint.interval_steps=1000",
        *extra,
    )
    printed = _printed(RECIPES / recipe_name, world_size, overrides)
    _train(world_size, overrides, str(RECIPES / recipe_name))
    run_dir = tmp_path / case
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, printed["total_steps"] + 1))
    # Linear warm-up to the peak over warmup_steps steps, then constant.
    lrs = [r["lr"] for r in rows]
    warmup = printed["warmup_steps"]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[warmup - 1 if warmup else 0 :] == pytest.approx([1e-3] * (len(lrs) - max(warmup - 1, 0)))
    for rank in range(world_size):
        keys = [
            json.loads(line)["keys"] for line in (run_dir / f"sample_keys.rank{rank}.jsonl").read_text().splitlines()
        ]
        assert {len(k) for k in keys} == {printed["micro_batch_size_per_gpu"] * printed["grad_accum_steps"]}
    if "auto" in case:
        assert (printed["micro_batch_size_per_gpu"], printed["grad_accum_steps"]) == (4, 2)
