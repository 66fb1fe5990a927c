"""check-config's planning past one machine and the gradient types, against numbers computed by hand."""

from __future__ import annotations

import pytest

from far_scale.config.schema import ParallelConfig
from far_scale.distributed.deepspeed_config import build_deepspeed_config, resolve_gradient_dtypes
from far_scale.planning.scale import ScaleAssumptions, comm_bytes_per_step, plan_scale

BILLION = 1_000_000_000


def test_one_case_by_hand():
    """FAR-sized: 1e9 parameters, bf16, fp32 reduction, ZeRO-2 on 16 GPUs (2 nodes), 4 x 8 images per step."""
    plan = plan_scale(
        BILLION,
        0,
        zero_stage=2,
        world_size=16,
        grad_accum_steps=4,
        micro_batch=8,
        precision="bf16",
        reduce_dtype="fp32",
        seq_len=256,
        token_dim=16,
        assumptions=ScaleAssumptions(300.0, 8, 400.0, 10.0),
    )
    # ring share 15/16; a reduce-scatter of 4e9 fp32 gradient bytes in each of 4 micro-steps + one all-gather of
    # 2e9 bf16 parameter bytes: 15/16 * 18e9
    assert plan.comm_bytes_per_step_per_gpu == pytest.approx(16.875e9)
    assert plan.comm_s_per_step == pytest.approx(16.875e9 / 50e9)  # 400 Gbit/s = 50e9 B/s
    assert plan.compute_s_per_step == pytest.approx(32 / 300)
    assert plan.bytes_per_sample == 2 * 256 * 16 * 2  # two views of fp16 latents
    assert plan.data_bytes_per_s_per_node == pytest.approx(16384 * 300 * 8)
    # bf16 weights 2 + fp32 master 4 + two AdamW moments 8 + fp32 EMA 4 = 18 bytes per parameter
    assert plan.checkpoint_bytes == pytest.approx(18e9)
    assert plan.checkpoint_upload_s == pytest.approx(18e9 / 2 / 1.25e9)  # 2 nodes, 10 Gbit/s each


@pytest.mark.parametrize(
    "stage, expected",
    [(0, 2 * 4e9), (1, 4e9 + 2e9), (2, 4 * 4e9 + 2e9), (3, 4 * (2 * 2e9 + 4e9))],
)
def test_traffic_per_zero_stage(stage, expected):
    assert comm_bytes_per_step(BILLION, stage, 2, 4, 2, 4) == pytest.approx(expected / 2)  # ring share 1/2


def test_one_rank_communicates_nothing():
    assert comm_bytes_per_step(BILLION, 2, 1, 4, 2, 4) == 0


@pytest.mark.parametrize(
    "stage, accum, precision, expected",
    [
        (2, 4, "bf16", ("fp32", "fp32")),
        (1, 2, "bf16", ("fp32", "fp32")),
        (2, 1, "bf16", ("bf16", "fp32")),  # nothing to accumulate
        (0, 4, "bf16", ("bf16", "fp32")),  # DeepSpeed 0.19: no fp32 accumulation at ZeRO-0 with bf16
        (2, 4, "fp32", ("fp32", "fp32")),
    ],
)
def test_gradient_dtypes_auto(stage, accum, precision, expected):
    par = ParallelConfig(zero_stage=stage)
    dtypes = resolve_gradient_dtypes(par, accum, precision)
    assert (dtypes.accumulate, dtypes.reduce) == expected
    config = build_deepspeed_config(par, 1.0, par.micro_batch_size_per_gpu, accum, precision)
    assert config["data_types"] == {"grad_accum_dtype": expected[0]}
    assert config["communication_data_type"] == expected[1]


def test_explicit_bf16_reduction_is_kept():
    dtypes = resolve_gradient_dtypes(ParallelConfig(reduce_dtype="bf16", grad_accum_dtype="bf16"), 8, "bf16")
    assert (dtypes.accumulate, dtypes.reduce) == ("bf16", "bf16")


def test_auto_micro_batch_is_the_largest_divisor_that_fits():
    from far_scale.config.loader import ConfigError
    from far_scale.planning.plan import GIB, resolve_micro_batch

    par = ParallelConfig(global_batch_size=96, micro_batch_size_per_gpu="auto", device_memory_gib=10.0)
    # 8 ranks: 12 images per rank, divisors 12, 6, 4, 3, 2, 1; budget 8.5 GiB, states 2 GiB, 1 GiB per image
    micro, reason = resolve_micro_batch(par, 8, 1.0 * GIB, lambda m: 2.0 * GIB)
    assert micro == 6 and "largest divisor of 12" in reason
    with pytest.raises(ConfigError, match="parallel.device_memory_gib=10"):
        resolve_micro_batch(par, 8, 9.0 * GIB, lambda m: 2.0 * GIB)
    fixed = ParallelConfig(micro_batch_size_per_gpu=16)
    assert resolve_micro_batch(fixed, 8, 1.0, lambda m: 0.0) == (16, "set in the recipe")


def test_auto_micro_batch_in_check_config_for_far_large():
    from far_scale.config.loader import load_config
    from far_scale.planning.plan import plan_for, resolve_data
    from tests.conftest import RECIPES

    cfg = load_config(RECIPES / "far_large_in256.yaml", ["parallel.micro_batch_size_per_gpu=auto", "data.url="])
    plan = plan_for(cfg, 8, resolve_data(cfg))
    assert plan.micro_batch >= 8 and cfg.parallel.global_batch_size % (plan.micro_batch * 8) == 0
    assert plan.deepspeed_config["train_micro_batch_size_per_gpu"] == plan.micro_batch


def test_auto_buckets_are_sized_to_the_model():
    from far_scale.distributed.deepspeed_config import resolve_buckets

    auto = resolve_buckets(ParallelConfig(), 480_000_000, 1024)  # FAR-L-sized
    assert auto.reduce == auto.allgather == 120_000_000  # a quarter: backward overlaps three earlier buckets
    assert (auto.prefetch, auto.persistence) == (int(0.9 * 1024**2), 10_240)
    assert resolve_buckets(ParallelConfig(), 400_000, 128).reduce == 1_000_000  # at least 1M elements
    assert resolve_buckets(ParallelConfig(), 10**10, 8192).reduce == 500_000_000  # at most DeepSpeed's default
    assert resolve_buckets(ParallelConfig(reduce_bucket_size=7), 480_000_000, 1024).reduce == 7
