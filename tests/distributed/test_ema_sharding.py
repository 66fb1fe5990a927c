"""The sharded EMA on 2 real gloo ranks against the whole EMA of 1 process (no DeepSpeed: ZeRO-0/1/2 layout)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from far_scale.config.schema import ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.model import TARGET_NET_PREFIX
from far_scale.planning.builder import build_model
from far_scale.train.ema import EMA, Layout
from tests.conftest import free_port

pytestmark = pytest.mark.distributed

DECAY = 0.9
NUM_UPDATES = 5


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="far", size="tiny"), DataSpec(seq_len=16, token_dim=8, num_classes=4))


def _train_like(model, step: int) -> None:
    """The same deterministic weight change on every rank (as after an all-reduced optimizer step)."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=gen))


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _model()
        ema = EMA(model, DECAY)
        target = EMA(model, 0.5, prefix=TARGET_NET_PREFIX, whole_prefix=TARGET_NET_PREFIX)
        for step in range(NUM_UPDATES):
            _train_like(model, step)
            ema.update()
            target.update()
        full = ema.full_state_dict()
        # A state written at another world size loads exactly (the 1 -> 2 ranks resume).
        given = {
            name: torch.randn(tensor.shape, generator=torch.Generator().manual_seed(9)) for name, tensor in full.items()
        }
        ema.load_full_state_dict(given)
        reloaded = ema.full_state_dict()
        layouts = {ema.layout[name] for name in ema.params}
        bind_error = ""
        try:
            ema.bind(_model().head.net, TARGET_NET_PREFIX)
        except ValueError as exc:
            bind_error = str(exc)
        if rank == 0:
            torch.save(
                {
                    "full": full,
                    "target": target.full_state_dict(),
                    "given": given,
                    "reloaded": reloaded,
                    "bytes": ema.num_bytes(),
                    "full_bytes": ema.full_num_bytes(),
                    "layouts": layouts,
                    "bind_error": bind_error,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ema") / "rank0.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def _reference() -> tuple[dict, dict]:
    model = _model()
    ema, target = EMA(model, DECAY), EMA(model, 0.5, prefix=TARGET_NET_PREFIX)
    for step in range(NUM_UPDATES):
        _train_like(model, step)
        ema.update()
        target.update()
    return ema.full_state_dict(), target.full_state_dict()


def test_sharded_ema_equals_the_whole_ema_of_one_process(two_ranks):
    reference, target_reference = _reference()
    assert two_ranks["full"].keys() == reference.keys()
    for name in reference:
        assert torch.equal(two_ranks["full"][name], reference[name]), name  # elementwise lerp: exact
    for name in target_reference:
        assert torch.equal(two_ranks["target"][name], target_reference[name]), name


def test_each_rank_holds_half_of_the_ema(two_ranks):
    assert two_ranks["layouts"] == {Layout.SLICE}
    share = two_ranks["bytes"] / two_ranks["full_bytes"]
    assert 0.5 <= share < 0.51  # half, plus at most one padding element per parameter


def test_sharded_ema_reloads_a_full_state_exactly(two_ranks):
    for name, tensor in two_ranks["given"].items():
        assert torch.equal(two_ranks["reloaded"][name], tensor), name


def test_a_network_runs_only_on_a_whole_ema(two_ranks):
    assert "whole_prefix" in two_ranks["bind_error"]
