"""parallel.compile: compiled training steps agree with eager ones and do not recompile as the masked-token count
changes (CPU inductor; slow: the first compile takes ~40 s on one core)."""

from __future__ import annotations

import pytest
import torch

from far_scale.config.schema import HeadConfig, ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.compile import compile_model
from far_scale.planning.builder import build_model

pytestmark = pytest.mark.slow

SMALL = DataSpec(seq_len=16, token_dim=8, num_classes=4)


def _pair():
    cfg = ModelConfig(arch="far", size="tiny", num_buffer_tokens=2, dropout=0.0, class_dropout=0.0, head=HeadConfig())
    torch.manual_seed(0)
    eager = build_model(cfg, SMALL)
    with torch.no_grad():  # away from the zero-initialised output layers, so the loss depends on every weight
        generator = torch.Generator().manual_seed(7)
        for param in eager.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    compiled = build_model(cfg, SMALL)
    compiled.load_state_dict(eager.state_dict())
    assert compile_model(compiled) == 4 + 1  # 2 + 2 blocks, the head's body
    return eager.train(), compiled.train()


def _step(model, seed: int, latents, labels):
    torch.manual_seed(seed)  # the same mask ratio, orders, noise and times in both models
    loss = model(latents, labels)["loss"]
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss.detach(), grads


def test_compiled_steps_agree_with_eager_and_do_not_recompile():
    import torch._dynamo.utils as dynamo

    eager, compiled = _pair()
    latents = torch.randn(6, SMALL.seq_len, SMALL.token_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6) % SMALL.num_classes
    dynamo.counters.clear()
    for seed in range(2):  # warm-up: the first dynamic compile of each graph
        _step(compiled, seed, latents, labels)
    graphs = dynamo.counters["stats"]["unique_graphs"]
    masked = set()
    for seed in range(2, 7):  # other mask ratios, so other visible/masked counts
        torch.manual_seed(seed)
        masked.add(eager.backbone(latents, labels).positions.shape[1])
        loss_e, grads_e = _step(eager, seed, latents, labels)
        loss_c, grads_c = _step(compiled, seed, latents, labels)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for ge, gc in zip(grads_e, grads_c):
            if ge is not None:
                torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    assert len(masked) > 1, masked  # the counts did change
    assert dynamo.counters["stats"]["unique_graphs"] == graphs  # and nothing recompiled for them
