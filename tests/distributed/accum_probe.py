"""Run inside a 1-rank process group (``python -m tests.distributed.accum_probe STAGE:PRECISION:ACCUM_DTYPE ...``):
one optimizer step of a small MLP through far-scale's DeepSpeed engine with 64 images as 32 accumulated
micro-batches of 2, against the same step as 1 micro-batch of 64 in fp32. Prints, as JSON, the largest weight
difference after the step and the relative error of the accumulated gradient (read at the accumulation boundary,
before the step, as DeepSpeed's fp32 copy of it) against the reference's."""

from __future__ import annotations

import json
import sys

import torch
from deepspeed.utils import safe_get_full_grad
from torch import nn

from far_scale.config.schema import OptimConfig, ParallelConfig
from far_scale.distributed import engine as ds
from far_scale.distributed.deepspeed_config import build_deepspeed_config
from far_scale.distributed.runtime import init_distributed, shutdown

IMAGES, WIDTH, ACCUM = 64, 64, 32


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 1))


def _step(stage: int, precision: str, accum_dtype: str, accum: int, x, y):
    par = ParallelConfig(
        zero_stage=stage,
        global_batch_size=IMAGES,
        micro_batch_size_per_gpu=IMAGES // accum,
        grad_accum_dtype=accum_dtype,
        precision=precision,
    )
    config = build_deepspeed_config(par, 0.0, IMAGES // accum, accum, precision)
    model = _model()
    groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    engine = ds.build_engine(model, config, OptimConfig(), torch.device("cpu"), groups, lr=1e-2)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    grads = None
    for micro, (chunk_x, chunk_y) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        loss = nn.functional.mse_loss(engine(chunk_x.to(dtype)).float(), chunk_y)
        engine.backward(loss)
        if micro == accum - 1:
            grads = [safe_get_full_grad(p).float().clone() for p in engine.module.parameters()]
        engine.step()
    weights = [p.detach().float().clone() for p in engine.module.parameters()]
    engine.destroy()
    return weights, grads


def compare(stage: int, precision: str, accum_dtype: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(IMAGES, WIDTH, generator=generator)
    y = torch.randn(IMAGES, 1, generator=generator)
    reference, reference_grads = _step(stage, "fp32", "fp32", 1, x, y)
    weights, grads = _step(stage, precision, accum_dtype, ACCUM, x, y)
    diff = max((a - r).abs().max().item() for a, r in zip(weights, reference))
    want = torch.cat([g.flatten() for g in reference_grads])
    got = torch.cat([g.flatten() for g in grads])
    return {"max_weight_diff": diff, "grad_rel_error": ((got - want).norm() / want.norm()).item()}


def main(cases: list[str]) -> dict:
    init_distributed("cpu")
    try:
        results = {}
        for case in cases:
            stage, precision, accum_dtype = case.split(":")
            results[case] = compare(int(stage), precision, accum_dtype)
        return results
    finally:
        shutdown()


if __name__ == "__main__":
    print("PROBE " + json.dumps(main(sys.argv[1:])), flush=True)
