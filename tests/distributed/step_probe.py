"""Run inside a 1-rank process group (``python -m tests.distributed.step_probe RECIPE OVERRIDES...``): set up a
real Trainer (DeepSpeed engine included), then report as JSON on stdout
- the host syncs of two training steps after a warm-up step, ours and DeepSpeed's (``tests.sync_ops``);
- what a step whose loss is NaN changes: the weights, the optimizer's moments and step counts, the EMA.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import torch

from far_scale.config.loader import load_config
from far_scale.distributed.runtime import init_distributed, shutdown
from far_scale.train.trainer import Trainer
from tests.sync_ops import SyncOps


def _snapshot(trainer: Trainer) -> dict:
    optimizer = trainer.engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    moments = [v.clone() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in trainer.engine.module.parameters()]
    return {"weights": weights, "moments": moments, "ema": [v.clone() for v in trainer.ema.full_state_dict().values()]}


def _same(a: dict, b: dict) -> dict:
    return {k: all(torch.equal(x, y) for x, y in zip(a[k], b[k])) and len(a[k]) == len(b[k]) for k in a}


def cuda_syncs(recipe: str, overrides: list[str]) -> dict:
    """On a GPU: the synchronising calls torch reports (``set_sync_debug_mode("warn")``) in two steps after a
    warm-up, by the file that made them (ours, or DeepSpeed's own)."""
    env = init_distributed("cuda")
    try:
        trainer = Trainer(load_config(recipe, overrides), env)
        trainer.setup()
        batches = trainer.loader.batches()
        trainer.train_step(batches)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step(batches)
                trainer.train_step(batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        return {
            "precision": trainer.precision,
            "steps_traced": 2,
            "our_syncs": [s for s in syncs if "/deepspeed/" not in s],
            "deepspeed_syncs": len([s for s in syncs if "/deepspeed/" in s]),
        }
    finally:
        shutdown()


def main(recipe: str, overrides: list[str]) -> dict:
    env = init_distributed("cpu")
    try:
        trainer = Trainer(load_config(recipe, overrides), env)
        trainer.setup()
        batches = trainer.loader.batches()
        trainer.train_step(batches)  # warm-up: DeepSpeed's first step sets up its buffers
        with SyncOps() as ops:
            trainer.train_step(batches)
            trainer.train_step(batches)
        ours = [w for name, w in zip(ops.found, ops.where) if name not in ops.by_deepspeed]
        before = _snapshot(trainer)
        poisoned = (dataclasses.replace(b, latents=torch.full_like(b.latents, float("nan"))) for b in batches)
        loss, _, _ = trainer.train_step(poisoned)
        after_nan = _snapshot(trainer)
        trainer.train_step(batches)
        return {
            "precision": trainer.precision,
            "steps_traced": 2,
            "our_syncs": ours,
            "deepspeed_syncs": len(ops.by_deepspeed),
            "nonfinite": trainer.nonfinite.count,
            "unchanged_by_nan_step": _same(before, after_nan),
            "changed_by_next_step": {k: not v for k, v in _same(after_nan, _snapshot(trainer)).items()},
            "loss_of_nan_step": loss,
        }
    finally:
        shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "--cuda":
        print("PROBE " + json.dumps(cuda_syncs(sys.argv[2], sys.argv[3:])), flush=True)
    else:
        print("PROBE " + json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)
