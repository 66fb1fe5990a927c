"""The sampler: bit-identical to the reference with every acceleration off, each option's math, no host syncs."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

from far_scale.config.schema import HeadConfig, ModelConfig
from far_scale.data.spec import DataSpec
from far_scale.models.generation import (
    SamplingOptions,
    generate,
    guidance_conditions,
    plan_generation,
)
from far_scale.models.heads import DiffusionHead, ShortcutHead
from far_scale.planning.builder import build_model
from tests.sync_ops import SyncOps

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden_samples.json"
SMALL = DataSpec(seq_len=16, token_dim=8, num_classes=4)
# Cases and model construction exactly as when the golden digests were written (reference sampler).
GOLDEN_CASES = {
    "far_plain": ("far", dict(num_iter=5, head_steps=4)),
    "far_cfg": ("far", dict(num_iter=5, head_steps=2, cfg_scale=2.5)),
    "far_cfg_constant": ("far", dict(num_iter=16, head_steps=8, cfg_scale=3.0, cfg_schedule="constant")),
    "mar_cfg": ("mar", dict(num_iter=4, head_steps=10, cfg_scale=2.5)),
    "mar_plain": ("mar", dict(num_iter=3, head_steps=25, temperature=0.9)),
    "causal_cfg": ("far_causal", dict(head_steps=2, cfg_scale=2.5)),
}
NO_OP_OPTIONS = dict(
    backbone_refresh_every=1,
    guidance_refresh_every=1,
    mask_schedule_power=1.0,
    backbone_refresh_share=None,
    guidance_refresh_share=None,
)


def build(arch: str):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch=arch, size="tiny", num_buffer_tokens=2, dropout=0.0, class_dropout=0.0, head=HeadConfig()),
        SMALL,
    ).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def sample(model, **options):
    return generate(model, torch.tensor([0, 1, 3]), SamplingOptions(**options), torch.Generator().manual_seed(1))


def digest(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.contiguous().numpy().tobytes()).hexdigest()


# Another CPU's kernels (AVX2 vs AVX512, another BLAS path) round the last bits differently, and the sampler
# iterates: such differences stay far below this, a change of the sampler's logic moves samples by O(1).
CROSS_CPU_TOLERANCE = 1e-3


def cpu_kernels() -> str:
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_every_option_off_is_bit_identical_to_the_reference_sampler(case):
    """Bit-identical to the stored digest on the CPU kernel family it was written on; elsewhere equal to the
    stored samples within CROSS_CPU_TOLERANCE. Either way, each option at its no-op value changes no bit."""
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"digests written with torch {golden['torch']}, running {torch.__version__}")
    arch, options = GOLDEN_CASES[case]
    model = build(arch)
    samples = sample(model, **options)
    recorded = golden["sha256"].get(cpu_kernels())
    if recorded is not None:
        assert digest(samples) == recorded[case]
    else:
        reference = torch.tensor(golden["values"][case]).reshape(samples.shape)
        torch.testing.assert_close(samples, reference, rtol=CROSS_CPU_TOLERANCE, atol=CROSS_CPU_TOLERANCE)
    # Each option at the value that makes it a no-op changes nothing either.
    no_op = dict(NO_OP_OPTIONS, head_steps_end=options.get("head_steps", 8))
    assert digest(sample(model, **options, **no_op)) == digest(samples)


@pytest.mark.parametrize("guided", [False, True])
def test_lazy_pass_equals_a_full_pass_when_the_cache_is_current(guided):
    """With keys/values recorded by a full pass over the same known tokens, a lazy pass recomputes the same z,
    and the keys it writes back (the buffer's included: lazy passes recompute it) equal the recorded ones."""
    model = build("far")
    backbone = model.backbone
    labels, batch = torch.tensor([0, 1, 3]), 3
    cond = guidance_conditions(model, labels, guided)
    rows = cond.shape[0]
    tokens = torch.randn(rows, 16, 8)
    orders = torch.argsort(torch.rand(batch, 16), dim=1)
    orders = torch.cat([orders, orders]) if guided else orders
    known, new, query = orders[:, :7].sort(1).values, orders[:, 4:7], orders[:, 7:10].sort(1).values
    with torch.no_grad():
        caches = backbone.new_token_caches(rows, device="cpu", dtype=torch.float32)
        full = backbone.predict(tokens, known, cond, caches)
        visible_keys = torch.zeros(rows, 2 + 16, dtype=torch.bool)
        visible_keys[:, :2] = True
        visible_keys.scatter_(1, known + 2, True)
        recorded = [layer.keys.clone() for cache in caches for layer in cache.layers]
        lazy = backbone.predict_lazy(tokens, new, query, visible_keys, cond, caches)
    expected = full.gather(1, query[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(lazy, expected, atol=2e-5, rtol=1e-5)
    rewritten = [layer.keys for cache in caches for layer in cache.layers]
    for before, after in zip(recorded, rewritten):
        torch.testing.assert_close(after[:, :, :2], before[:, :, :2], atol=2e-5, rtol=1e-5)  # the 2 buffer slots


def test_lazy_passes_recompute_the_buffer_from_the_context():
    """After new tokens are revealed, a lazy pass's buffer keys move (they see the new context)."""
    model = build("far")
    backbone = model.backbone
    labels = torch.tensor([0, 1, 3])
    cond = guidance_conditions(model, labels, False)
    tokens = torch.randn(3, 16, 8)
    orders = torch.argsort(torch.rand(3, 16), dim=1)
    with torch.no_grad():
        caches = backbone.new_token_caches(3, device="cpu", dtype=torch.float32)
        backbone.predict(tokens, orders[:, :2].sort(1).values, cond, caches)
        before = caches[0].layers[-1].keys[:, :, :2].clone()
        visible_keys = torch.zeros(3, 2 + 16, dtype=torch.bool)
        visible_keys[:, :2] = True
        visible_keys.scatter_(1, orders[:, :8] + 2, True)
        backbone.predict_lazy(tokens, orders[:, 2:8], orders[:, 8:10].sort(1).values, visible_keys, cond, caches)
    assert not torch.allclose(caches[0].layers[-1].keys[:, :, :2], before, atol=1e-4)


def test_token_caching_changes_samples_only_between_refreshes():
    model = build("far")
    reference = sample(model, num_iter=6, head_steps=2)
    # Refresh every 6th iteration of 6: only the first is full; the rest reuse caches and differ.
    cached = sample(model, num_iter=6, head_steps=2, backbone_refresh_every=6)
    assert cached.shape == reference.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, reference)
    # The first iteration is a full pass in both: its tokens agree.
    first = plan_generation(SamplingOptions(num_iter=6), 16, "masked", ShortcutHead.anneal_steps)[0]
    orders = torch.argsort(torch.rand(3, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    first_tokens = orders[:, first.start : first.end]
    gathered = [t.gather(0, first_tokens[..., None].expand(-1, -1, 8)[i]) for i, t in enumerate(reference)]
    gathered_cached = [t.gather(0, first_tokens[..., None].expand(-1, -1, 8)[i]) for i, t in enumerate(cached)]
    torch.testing.assert_close(torch.stack(gathered), torch.stack(gathered_cached))


def test_guidance_caching_keeps_the_conditional_rows_intact():
    """At w = 1 guidance returns the conditional output whatever the unconditional one: caching it changes nothing."""
    model = build("far")
    # Every backbone pass full in both (a lazy pattern would differ: passes of both halves are full ones).
    conditional = sample(model, num_iter=6, head_steps=2)
    for guidance in (dict(guidance_refresh_every=3), dict(guidance_refresh_share=0.3)):
        cached = sample(model, num_iter=6, head_steps=2, cfg_scale=1.0, use_cfg=True, **guidance)
        torch.testing.assert_close(cached, conditional, atol=1e-4, rtol=1e-4)
    guided = sample(model, num_iter=6, head_steps=2, cfg_scale=3.0)
    assert not torch.equal(sample(model, num_iter=6, head_steps=2, cfg_scale=3.0, guidance_refresh_every=3), guided)


@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("num_iter", [1, 4, 16, 64])
def test_plans_reveal_every_token_exactly_once(power, num_iter):
    plan = plan_generation(
        SamplingOptions(num_iter=num_iter, mask_schedule_power=power), 256, "masked", ShortcutHead.anneal_steps
    )
    assert len(plan) == num_iter and plan[0].start == 0 and plan[-1].end == 256
    assert all(a.end == b.start and a.end > a.start for a, b in zip(plan, plan[1:]))


def test_structure_first_schedule_spends_more_iterations_on_the_first_tokens():
    cosine = plan_generation(SamplingOptions(num_iter=16), 256, "masked", ShortcutHead.anneal_steps)
    slow_start = plan_generation(
        SamplingOptions(num_iter=16, mask_schedule_power=2.0), 256, "masked", ShortcutHead.anneal_steps
    )
    assert slow_start[7].end < cosine[7].end  # fewer tokens known after half the iterations


def test_head_step_schedules():
    plan = plan_generation(
        SamplingOptions(num_iter=16, head_steps=8, head_steps_end=1), 256, "masked", ShortcutHead.anneal_steps
    )
    steps = [it.head_steps for it in plan]
    assert steps[0] == 8 and steps[-1] == 1 and steps == sorted(steps, reverse=True)
    assert set(steps) <= {1, 2, 4, 8}
    assert [DiffusionHead.anneal_steps(100, 20, p) for p in (0.0, 0.5, 1.0)] == [100, 60, 20]
    model = build("far")
    annealed = sample(model, num_iter=4, head_steps=8, head_steps_end=1)
    assert torch.isfinite(annealed).all() and not torch.equal(annealed, sample(model, num_iter=4, head_steps=8))
    mar = build("mar")
    assert torch.isfinite(sample(mar, num_iter=3, head_steps=20, head_steps_end=5, temperature=0.5)).all()


def test_plan_refreshes():
    options = SamplingOptions(num_iter=8, cfg_scale=2.0, backbone_refresh_every=4, guidance_refresh_every=3)
    plan = plan_generation(options, 64, "masked", ShortcutHead.anneal_steps)
    # Iteration 0 knows no token: its difference is not reused, iteration 1 computes both halves again.
    assert [it.both_halves for it in plan] == [True, True, False, True, False, False, True, False]
    # Passes of both halves refresh the backbone too (the cached difference needs every position).
    assert [it.full_backbone for it in plan] == [True, True, False, True, True, False, True, False]


def test_plan_refreshes_by_revealed_share():
    options = SamplingOptions(num_iter=8, backbone_refresh_every=1000, backbone_refresh_share=0.25)
    plan = plan_generation(options, 64, "masked", ShortcutHead.anneal_steps)
    last = 0
    for it in plan:
        assert it.full_backbone == (it.start == 0 or it.start - last >= 16), [(i.start, i.full_backbone) for i in plan]
        last = it.start if it.full_backbone else last


@pytest.mark.parametrize("num_iter", [2, 4, 8, 16, 64])
@pytest.mark.parametrize(
    "caching",
    [dict(guidance_refresh_every=g) for g in (2, 4, 64)] + [dict(guidance_refresh_share=s) for s in (0.1, 0.5)],
)
def test_a_cached_difference_never_comes_from_a_pass_without_known_tokens(num_iter, caching):
    for token_cache in (dict(), dict(backbone_refresh_every=4)):
        options = SamplingOptions(num_iter=num_iter, cfg_scale=3.0, **caching, **token_cache)
        plan = plan_generation(options, 64, "masked", ShortcutHead.anneal_steps)
        source = None
        for it in plan:
            if it.both_halves:
                source = it.start
            else:
                assert source is not None and source > 0, [(i.start, i.both_halves) for i in plan]


def test_fast_ddpm_chain_matches_the_reference_chain():
    mar = build("mar")
    options = dict(num_iter=3, head_steps=10, temperature=0.5)
    torch.testing.assert_close(sample(mar, fast_ddpm=True, **options), sample(mar, **options), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "arch, options",
    [
        ("far", dict(num_iter=6, head_steps=4, cfg_scale=2.0)),
        (
            "far",
            dict(
                num_iter=6,
                head_steps=8,
                head_steps_end=1,
                cfg_scale=2.0,
                backbone_refresh_every=2,
                guidance_refresh_every=3,
                mask_schedule_power=1.5,
            ),
        ),
        ("mar", dict(num_iter=4, head_steps=10, cfg_scale=2.0, fast_ddpm=True)),
        ("far_causal", dict(head_steps=2, cfg_scale=2.0)),
        ("far_causal", dict(head_steps=2, cfg_scale=2.0, static_kv_cache=True)),
    ],
)
def test_sampling_loop_has_no_host_syncs(arch, options):
    model = build(arch)
    with SyncOps() as ops:
        sample(model, **options)
    assert ops.found == []


@pytest.mark.parametrize(
    "arch, options",
    [
        ("far_causal", dict(head_steps=2, cfg_scale=2.0, static_kv_cache=True)),
        ("far", dict(num_iter=4, head_steps=2, cfg_scale=2.0, backbone_refresh_every=2, guidance_refresh_every=2)),
    ],
    ids=["causal-static-cache", "masked-both-caches"],
)
def test_graph_replay_reuses_its_cache_buffers_and_changes_no_sample(arch, options):
    """CUDA graphs replay at the addresses they were recorded with: every generation through one
    ``GraphReplay`` writes the same cache buffers, yet samples exactly as fresh caches do."""
    from far_scale.models.generation import GraphReplay

    model = build(arch)
    marks = []
    replay = GraphReplay(lambda: marks.append(1))
    calls = [(torch.tensor([0, 1, 3]), 1), (torch.tensor([2, 0, 1]), 5)]

    def run(labels, seed, replay=None):
        return generate(model, labels, SamplingOptions(**options), torch.Generator().manual_seed(seed), replay)

    fresh = [run(labels, seed) for labels, seed in calls]
    first = run(*calls[0], replay)
    buffers = {id(c) for c in replay._caches.values()}
    second = run(*calls[1], replay)
    assert torch.equal(first, fresh[0]) and torch.equal(second, fresh[1])
    assert len(buffers) == 1 and {id(c) for c in replay._caches.values()} == buffers  # one cache, reused
    iterations = model.backbone.seq_len if arch == "far_causal" else options["num_iter"]
    assert len(marks) == 2 * iterations  # a step mark before every iteration of both generations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_loop_has_no_host_syncs_on_cuda():
    model = build("far").cuda()
    options = SamplingOptions(
        num_iter=6, head_steps=4, cfg_scale=2.0, backbone_refresh_every=2, guidance_refresh_every=3
    )
    labels = torch.tensor([0, 1, 3], device="cuda")
    from far_scale.models.generation import SamplingNoise, sample_masked

    noise = SamplingNoise.from_generator(model, options, 3, torch.Generator(device="cuda").manual_seed(0), "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_masked(model, labels, options, noise)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_iter", [2, 4, 8, 16, 64])
def test_head_steps_end_is_reached_at_the_last_iteration(num_iter):
    for head, first, last in ((ShortcutHead, 8, 1), (ShortcutHead, 1, 8), (DiffusionHead, 100, 20)):
        plan = plan_generation(
            SamplingOptions(num_iter=num_iter, head_steps=first, head_steps_end=last), 256, "masked", head.anneal_steps
        )
        assert (plan[0].head_steps, plan[-1].head_steps) == (first, last), (head.__name__, num_iter)


def test_head_steps_above_the_shortcut_levels_are_refused_naming_the_field():
    model = build("far")
    levels = model.head.num_levels
    with pytest.raises(ValueError, match=rf"head_steps={2 * levels} \(eval.head_steps\).*num_levels={levels}"):
        sample(model, num_iter=2, head_steps=2 * levels)
    with pytest.raises(ValueError, match=r"head_steps_end=3 \(eval.head_steps_end\)"):
        sample(model, num_iter=2, head_steps=4, head_steps_end=3)


def test_cache_diagnostics_measure_without_changing_samples():
    from far_scale.models.cache_diagnostics import diagnose_caches, summarize
    from far_scale.models.generation import SamplingNoise, sample_masked

    model = build("far")
    labels = torch.tensor([0, 1, 3])
    off = SamplingOptions(num_iter=6, head_steps=2, cfg_scale=3.0)
    cached = SamplingOptions(
        num_iter=6, head_steps=2, cfg_scale=3.0, guidance_refresh_every=6, backbone_refresh_every=6
    )

    def noise(options):
        return SamplingNoise.from_generator(model, options, 3, torch.Generator().manual_seed(0), "cpu")

    assert diagnose_caches(model, labels, off, noise(off))[1] == []  # nothing reused, nothing recorded
    tokens, records = diagnose_caches(model, labels, cached, noise(cached))
    # Iterations 0 and 1 compute both halves (iteration 0 knew no token); the other 4 reuse both caches.
    assert [r.iteration for r in records] == [2, 3, 4, 5]
    assert all(r.lazy and r.cached_guidance and r.z_error > 0 and r.effective_cfg is not None for r in records)
    summary = summarize(records, 16)
    assert 0 < summary["cached_token_share"] < 1 and summary["nominal_cfg"] > 1
    with torch.no_grad():
        assert torch.equal(tokens, sample_masked(model, labels, cached, noise(cached)))


def test_cuda_graphs_on_a_cpu_are_refused_naming_the_field():
    from far_scale.models.compile import compile_for_sampling

    model = build("far")
    with pytest.raises(ValueError, match=r"eval.compile=cudagraphs needs a CUDA device \(sampling on cpu\)"):
        compile_for_sampling(model, "cudagraphs", torch.device("cpu"))
    assert not hasattr(model, "compiled_for_sampling")  # nothing was compiled
