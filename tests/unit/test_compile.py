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


def _sampling_models(arch: str, device: str = "cpu"):
    """The same weights twice: one eager, one to compile for sampling."""
    cfg = ModelConfig(arch=arch, size="tiny", num_buffer_tokens=2, dropout=0.0, class_dropout=0.0, head=HeadConfig())
    torch.manual_seed(0)
    eager = build_model(cfg, SMALL).to(device).eval()
    compiled = build_model(cfg, SMALL).to(device).eval()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _sampling_pair(arch: str):
    """Eager and compiled for sampling (``eval.compile=default``)."""
    from far_scale.models.compile import compile_for_sampling

    eager, compiled = _sampling_models(arch)
    assert compile_for_sampling(compiled, "default", torch.device("cpu")) is None  # no CUDA-graph step marker
    assert compile_for_sampling(compiled, "default", torch.device("cpu")) is None  # a second call compiles nothing
    with pytest.raises(ValueError, match="already compiled with eval.compile=default"):
        compile_for_sampling(compiled, "cudagraphs", torch.device("cuda"))
    return eager, compiled


SAMPLING_CASES = pytest.mark.parametrize(
    "arch, options",
    [
        ("far_causal", dict(head_steps=2, cfg_scale=2.5, static_kv_cache=True)),
        ("far", dict(num_iter=4, head_steps=2, cfg_scale=2.5, backbone_refresh_every=2, guidance_refresh_every=2)),
    ],
    ids=["causal-static-cache", "masked-both-caches"],
)


@SAMPLING_CASES
def test_compiled_sampling_agrees_with_eager(arch, options):
    import torch._dynamo.utils as dynamo

    from far_scale.models.generation import SamplingOptions, generate

    eager, compiled = _sampling_pair(arch)
    labels = torch.tensor([0, 3])
    sampling = SamplingOptions(**options)
    dynamo.counters.clear()
    first = generate(compiled, labels, sampling, torch.Generator().manual_seed(0))
    graphs = dynamo.counters["stats"]["unique_graphs"]
    for seed in (0, 1):
        reference = generate(eager, labels, sampling, torch.Generator().manual_seed(seed))
        got = first if seed == 0 else generate(compiled, labels, sampling, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert dynamo.counters["stats"]["unique_graphs"] == graphs  # a second generation compiles nothing new


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@SAMPLING_CASES
def test_cuda_graph_sampling_agrees_with_eager_and_records_every_graph(arch, options):
    """eval.compile=cudagraphs: no graph falls back to eager (a mutated cache that is not a static address would),
    and a second generation replays what the first recorded."""
    import torch._dynamo.utils as dynamo

    from far_scale.models.compile import compile_for_sampling
    from far_scale.models.generation import SamplingOptions, generate

    eager, compiled = _sampling_models(arch, "cuda")
    replay = compile_for_sampling(compiled, "cudagraphs", torch.device("cuda"))
    labels = torch.tensor([0, 3], device="cuda")
    sampling = SamplingOptions(**options)
    dynamo.counters.clear()
    for seed in (0, 1, 2):
        noise = torch.Generator(device="cuda").manual_seed(seed)
        got = generate(compiled, labels, sampling, noise, replay).clone()
        reference = generate(eager, labels, sampling, torch.Generator(device="cuda").manual_seed(seed))
        torch.testing.assert_close(got, reference, rtol=1e-3, atol=1e-3)  # TF32 and fused kernels
        if seed == 1:
            graphs = dynamo.counters["stats"]["unique_graphs"]
    assert dynamo.counters["inductor"]["cudagraph_skips"] == 0
    assert dynamo.counters["stats"]["unique_graphs"] == graphs
