"""ZeRO-3 partitioned construction (DeepSpeed's ``zero.Init``) on 2 real gloo ranks against a 1-rank build.

For the same seed the gathered weights must be bit-identical to what an unpartitioned build draws, for
every architecture; while building, no rank may hold more than its share of the model plus the layer
being built (host RSS high-water mark per rank, with glibc told to hand freed tensors back to the OS); and
a bf16 engine on a model built partitioned must train exactly like one on a model built whole.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from far_scale.config.schema import ModelConfig, OptimConfig, ParallelConfig
from far_scale.data.spec import DataSpec
from far_scale.distributed import engine as ds
from far_scale.distributed.deepspeed_config import (
    build_deepspeed_config,
    estimate_construction_memory,
)
from far_scale.distributed.runtime import init_distributed
from far_scale.models.model import largest_layer_parameters
from far_scale.planning.builder import build_meta_model, build_model
from far_scale.train.memory import host_peak_of, set_mmap_threshold
from far_scale.train.optim import parameter_groups
from tests.conftest import free_port

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
SEED = 0
ARCHS = ("far", "far_causal", "mar")
SMALL_DATA = DataSpec(seq_len=16, token_dim=8, num_classes=4)
# The memory probe needs a model whose whole size stands far above one layer: FAR-B (~200M parameters).
PROBE_MODEL, PROBE_DATA = ModelConfig(arch="far", size="base"), DataSpec(seq_len=64, token_dim=16, num_classes=10)
# Besides the layer being built, a rank briefly holds up to three more copies of it: the all-gather
# output that zero.Init's apply writes into, gloo's staging copy of it, and the host-drawn values.
LAYER_BUFFERS = 3
MMAP_THRESHOLD_BYTES = 64 * 1024
TRAIN_STEPS = 3
MICRO_BATCH = 2


def _ds_config(precision: str) -> dict:
    par = ParallelConfig(
        zero_stage=3,
        precision=precision,
        global_batch_size=MICRO_BATCH * WORLD_SIZE,
        micro_batch_size_per_gpu=MICRO_BATCH,
    )
    return build_deepspeed_config(
        par, grad_clip=1.0, micro_batch=par.micro_batch_size_per_gpu, grad_accum_steps=1, precision=precision
    )


def _gathered_state(model) -> dict[str, torch.Tensor]:
    state = {}
    for name, param in model.named_parameters():
        with ds.gathered([param]):
            state[name] = param.data.detach().clone()
    return state


def _held_elements(model) -> int:
    """Parameter elements this rank holds: partitions, plus any parameter kept whole."""
    return sum(p.ds_tensor.numel() + p.data.numel() for p in model.parameters())


def _train_losses(model, ds_config: dict) -> list[float]:
    engine = ds.build_engine(
        model,
        ds_config,
        OptimConfig(),
        torch.device("cpu"),
        parameter_groups(model, OptimConfig().weight_decay),
        lr=1e-3,
    )
    gen = torch.Generator().manual_seed(dist.get_rank())
    losses = []
    for step in range(TRAIN_STEPS):
        torch.manual_seed(step)
        latents = torch.randn(MICRO_BATCH, SMALL_DATA.seq_len, SMALL_DATA.token_dim, generator=gen)
        labels = torch.randint(0, SMALL_DATA.num_classes, (MICRO_BATCH,), generator=gen)
        loss = engine(latents.to(torch.bfloat16), labels)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _worker(rank: int, port: int, out_dir: str) -> None:
    set_mmap_threshold(MMAP_THRESHOLD_BYTES)  # freed tensors leave the resident set
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    init_distributed("cpu")
    try:
        fp32 = _ds_config("fp32")
        states, held = {}, {}
        for arch in ARCHS:
            torch.manual_seed(SEED)
            model = ds.build_partitioned(
                lambda: build_model(ModelConfig(arch=arch, size="tiny"), SMALL_DATA), fp32, torch.device("cpu")
            )
            states[arch], held[arch] = _gathered_state(model), _held_elements(model)
        del model

        torch.manual_seed(SEED)
        model, partitioned_peak = host_peak_of(
            lambda: ds.build_partitioned(lambda: build_model(PROBE_MODEL, PROBE_DATA), fp32, torch.device("cpu"))
        )
        probe_held = _held_elements(model)
        del model
        model, whole_peak = host_peak_of(lambda: build_model(PROBE_MODEL, PROBE_DATA))
        del model

        bf16 = _ds_config("bf16")
        tiny_far = ModelConfig(arch="far", size="tiny")
        torch.manual_seed(SEED)
        partitioned_losses = _train_losses(
            ds.build_partitioned(lambda: build_model(tiny_far, SMALL_DATA), bf16, torch.device("cpu")), bf16
        )
        torch.manual_seed(SEED)
        whole_losses = _train_losses(build_model(tiny_far, SMALL_DATA), bf16)
        torch.save(
            {
                "states": states if rank == 0 else None,
                "held": held,
                "probe_held": probe_held,
                "partitioned_peak": partitioned_peak,
                "whole_peak": whole_peak,
                "partitioned_losses": partitioned_losses,
                "whole_losses": whole_losses,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("partitioned")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("arch", ARCHS)
def test_partitioned_build_draws_the_weights_of_a_whole_build(ranks, arch):
    torch.manual_seed(SEED)
    expected = build_model(ModelConfig(arch=arch, size="tiny"), SMALL_DATA).state_dict()
    got = ranks[0]["states"][arch]
    assert got.keys() == expected.keys()
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_holds_about_half_of_the_model(ranks, arch):
    total = sum(p.numel() for p in build_meta_model(ModelConfig(arch=arch, size="tiny"), SMALL_DATA).parameters())
    for rank in ranks:
        # Parameters under ZeRO-3's persistence threshold (biases, norms) stay whole on every rank.
        assert total / WORLD_SIZE <= rank["held"][arch] < 0.6 * total


def test_construction_memory_stays_within_a_share_plus_one_layer(ranks):
    meta = build_meta_model(PROBE_MODEL, PROBE_DATA)
    total = sum(p.numel() for p in meta.parameters())
    layer_bytes = 4 * largest_layer_parameters(meta)
    whole_bytes = 4 * total
    estimate = estimate_construction_memory(total, largest_layer_parameters(meta), 3, WORLD_SIZE)
    for rank in ranks:
        assert rank["probe_held"] < 0.6 * total
        # The probe sees a whole build ...
        assert rank["whole_peak"] >= 0.95 * whole_bytes, rank["whole_peak"]
        # ... and a partitioned one never holds more than its share plus the layer being built.
        assert rank["partitioned_peak"] <= estimate + LAYER_BUFFERS * layer_bytes, (
            f"peak {rank['partitioned_peak'] / 2**20:.0f} MiB, share + layer {estimate / 2**20:.0f} MiB, "
            f"layer {layer_bytes / 2**20:.1f} MiB, whole {whole_bytes / 2**20:.0f} MiB"
        )


def test_bf16_engine_trains_a_partitioned_build_like_a_whole_one(ranks):
    for rank in ranks:
        assert rank["partitioned_losses"] == rank["whole_losses"]
