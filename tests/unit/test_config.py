"""Strict recipe loading, overrides, cross-section checks and every recipe in recipes/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from far_scale.config.loader import (
    ConfigError,
    apply_overrides,
    config_from_yaml,
    config_to_yaml,
    load_config,
)
from far_scale.config.schema import Config
from far_scale.data.spec import DataSpec
from far_scale.distributed.deepspeed_config import estimate_model_state_memory
from far_scale.planning.checks import check_config, validate
from far_scale.planning.plan import derive_plan

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RUNNABLE = sorted(p for p in RECIPES_DIR.glob("*.yaml"))
WORLD_SIZE_FOR = {"in256": 32, "synth64": 2, "digits32": 2}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems_of(excinfo) -> str:
    return "\n".join(excinfo.value.problems)


@pytest.mark.parametrize("recipe", RUNNABLE, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe: Path):
    cfg = load_config(recipe)
    data_tag = recipe.stem.split("_")[-1]
    world_size = WORLD_SIZE_FOR[data_tag]
    plan = derive_plan(cfg, world_size, DataSpec.from_expectation(cfg.data.expect))
    assert plan.grad_accum_steps >= 1
    assert recipe.stem.startswith(cfg.model.arch + "_")
    assert cfg.run.name == recipe.stem


def test_recipe_hyperparameters_follow_spec():
    cfg = load_config(RECIPES_DIR / "far_base_in256.yaml")
    plan = derive_plan(cfg, 32, DataSpec.from_expectation(cfg.data.expect))
    assert plan.lr == pytest.approx(8e-4)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.02 and cfg.optim.grad_clip == 3.0
    assert plan.warmup_steps == 100 * plan.steps_per_epoch and plan.total_steps == 400 * plan.steps_per_epoch
    assert load_config(RECIPES_DIR / "mar_base_in256.yaml").model.arch == "mar"


def test_unknown_key_names_path_and_nearest(tmp_path):
    path = _write(tmp_path, "r.yaml", "model:\n  head:\n    dept: 3\noptim:\n  lrr: 1.0e-4\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    text = _problems_of(excinfo)
    assert "model.head.dept: unknown key; did you mean 'model.head.depth'?" in text
    assert "optim.lrr: unknown key; did you mean 'optim.lr'?" in text


def test_unknown_section_suggests_section(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, "r.yaml", "optimm:\n  lr: 1.0\n"))
    assert "optimm: unknown key; did you mean 'optim'?" in _problems_of(excinfo)


def test_wrong_type_names_path_and_expected_type(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, "r.yaml", "parallel:\n  global_batch_size: '256'\n"))
    text = _problems_of(excinfo)
    assert "parallel.global_batch_size: expected int, got str '256'" in text


def test_invalid_choice_names_path(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, "r.yaml", "model:\n  arch: gpt\n"))
    assert "model.arch" in _problems_of(excinfo) and "'far_causal'" in _problems_of(excinfo)


def test_out_of_range_names_path(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, "r.yaml", "model:\n  class_dropout: 1.5\n"))
    assert "model.class_dropout" in _problems_of(excinfo)


def test_yaml_syntax_error_reports_file_and_line(tmp_path):
    path = _write(tmp_path, "broken.yaml", "model:\n  arch: far\n  size: [base\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert f"{path}:4" in _problems_of(excinfo)


def test_base_inheritance_and_override_order(tmp_path):
    _write(tmp_path, "parent.yaml", "model:\n  arch: mar\n  size: large\noptim:\n  lr: 1.0e-3\n")
    child = _write(tmp_path, "child.yaml", "base: parent.yaml\nmodel:\n  size: base\n")
    cfg = load_config(child, ["optim.lr=3e-4"])
    assert (cfg.model.arch, cfg.model.size, cfg.optim.lr) == ("mar", "base", 3e-4)


def test_base_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_recipe_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_scalars_and_reject_bad_syntax():
    data = apply_overrides({}, ["optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "run.name=x"])
    assert data == {"optim": {"lr": 3e-4, "betas": [0.8, 0.9]}, "run": {"name": "x"}}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["optim.lr"])


def test_config_is_frozen_and_round_trips():
    cfg = load_config(RECIPES_DIR / "far_tiny_synth64.yaml")
    with pytest.raises(pydantic.ValidationError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_batch_divisibility_names_all_three_numbers():
    cfg = Config.model_validate(
        {"parallel": {"global_batch_size": 2048, "micro_batch_size_per_gpu": 64}, "run": {"max_steps": 1}}
    )
    problems = check_config(cfg, world_size=48)
    assert any(
        "parallel.global_batch_size=2048" in p and "parallel.micro_batch_size_per_gpu=64" in p and "world_size=48" in p
        for p in problems
    ), problems


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"run": {}}, "run.max_steps and run.epochs"),
        ({"run": {"max_steps": 1, "epochs": 1.0}}, "run.max_steps and run.epochs"),
        ({"schedule": {"warmup_steps": 1, "warmup_epochs": 1.0}}, "schedule.warmup_epochs and schedule.warmup_steps"),
        ({"model": {"size": "custom", "width": 64}}, "model.encoder_depth"),
        ({"model": {"width": 100, "num_heads": 12}}, "model.width=100 is not divisible by model.num_heads=12"),
        ({"eval": {"head_steps": 3}}, "eval.head_steps=3"),
        ({"model": {"head": {"num_levels": 100}}}, "model.head.num_levels=100"),
        ({"model": {"arch": "mar"}, "eval": {"head_steps": 2000}}, "model.head.num_train_timesteps"),
        ({"eval": {"inception_weights": "w.pth"}}, "eval.reference_stats"),
        (
            {"eval": {"benchmark": "b.safetensors", "inception_weights": "w.pth", "reference_stats": "s.npz"}},
            "eval.benchmark",
        ),
        ({"model": {"mask_ratio_min": 0.9, "mask_ratio_mean": 0.8}}, "model.mask_ratio_min=0.9"),
        ({"eval": {"head_steps_end": 3}}, "eval.head_steps_end=3"),
        (
            {"model": {"arch": "mar", "head": {"guidance_distillation_scale": 2.0}}},
            "model.head.guidance_distillation_scale applies to the shortcut head",
        ),
        ({"model": {"class_dropout": 0.0, "head": {"guidance_distillation_scale": 2.0}}}, "model.class_dropout > 0"),
        ({"parallel": {"offload_optimizer": "cpu"}}, "parallel.offload_optimizer=cpu: DeepSpeed offloads only its own"),
        (
            {"parallel": {"zero_stage": 0, "grad_accum_dtype": "fp32"}},
            "parallel.grad_accum_dtype=fp32 with parallel.zero_stage=0",
        ),
    ],
)
def test_cross_section_rules_name_their_fields(data, fragment):
    data = {"run": {"max_steps": 1}, **data}
    problems = check_config(Config.model_validate(data), world_size=1)
    assert any(fragment in p for p in problems), problems


def test_all_problems_are_raised_at_once():
    cfg = Config.model_validate({"run": {}, "eval": {"head_steps": 3}})
    with pytest.raises(ConfigError) as excinfo:
        validate(cfg, world_size=1)
    assert len(excinfo.value.problems) == 2


def test_data_rules_use_the_manifest_shape():
    cfg = Config.model_validate(
        {"run": {"epochs": 1.0}, "eval": {"num_iter": 80}, "data": {"expect": {"seq_len": 256}}}
    )
    problems = check_config(cfg, 1, DataSpec(seq_len=64, token_dim=16, num_classes=10))
    assert any("data.expect.seq_len is 256 but the manifest says 64" in p for p in problems)
    assert any("eval.num_iter=80 exceeds the sequence length 64" in p for p in problems)
    assert any("data.expect.num_images" in p for p in problems)


def test_missing_data_shape_names_fields():
    with pytest.raises(ValueError, match="data.expect.seq_len"):
        DataSpec.from_expectation(Config().data.expect)


def build_deepspeed_config(cfg: Config, world_size: int, precision=None) -> dict:
    """The DeepSpeed config of the run's plan (the engine receives exactly this)."""
    return derive_plan(
        cfg, world_size, DataSpec.from_expectation(cfg.data.expect), precision=precision
    ).deepspeed_config


def test_deepspeed_config_follows_recipe_and_world_size():
    cfg = load_config(RECIPES_DIR / "far_huge_in256.yaml")
    ds = build_deepspeed_config(cfg, world_size=64)
    assert ds["train_batch_size"] == 2048 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 3.0
    assert build_deepspeed_config(cfg, 64, precision="fp32")["bf16"]["enabled"] is False
    zero1 = build_deepspeed_config(load_config(RECIPES_DIR / "far_base_in256.yaml", ["parallel.zero_stage=1"]), 32)
    assert "contiguous_gradients" not in zero1["zero_optimization"]
    with pytest.raises(ConfigError, match="world_size=3"):
        build_deepspeed_config(cfg, world_size=3)


def test_memory_estimate_shrinks_with_zero_stage():
    totals = [estimate_model_state_memory(10**9, stage, 8, "bf16").total for stage in range(4)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[3]
    # ZeRO-0 bf16 AdamW: 2 (params) + 2 (grads) + 12 (master + 2 states) bytes, + 4 fp32 EMA sharded 8 ways.
    assert totals[0] == pytest.approx(16.5 * 10**9)
    assert estimate_model_state_memory(10**9, 2, 8, "bf16").ema == pytest.approx(0.5 * 10**9)
    assert estimate_model_state_memory(10**9, 3, 8, "bf16").total == pytest.approx(20 * 10**9 / 8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "far_scale.cli", *args], capture_output=True, text=True, timeout=120)


def test_check_config_cli_large_at_256_ranks():
    result = _cli("check-config", str(RECIPES_DIR / "far_large_in256.yaml"), "--world-size", "256")
    assert result.returncode == 0, result.stderr
    assert "grad_accum_steps: 1" in result.stdout
    assert '"zero_optimization"' in result.stdout and "# parameters" in result.stdout


def test_check_config_cli_names_bad_override():
    result = _cli("check-config", str(RECIPES_DIR / "far_large_in256.yaml"), "--world-size", "256", "optim.lrr=1e-4")
    assert result.returncode != 0
    assert "optim.lrr" in result.stderr and "'optim.lr'" in result.stderr


def test_check_config_cli_reports_yaml_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "run:\n  name: x\n  seed: [1\n")
    result = _cli("check-config", str(path))
    assert result.returncode != 0 and f"{path}:4" in result.stderr


def test_flip_on_digits_is_refused_naming_the_field():
    cfg = Config.model_validate({"run": {"max_steps": 1}, "data": {"hflip": True}, "eval": {"num_iter": 16}})
    problems = check_config(cfg, 1, DataSpec(seq_len=16, token_dim=16, num_classes=10, hflip_invariant=False))
    assert any(p.startswith("data.hflip is true") and "data.hflip=false" in p for p in problems), problems
    assert not check_config(cfg, 1, DataSpec(seq_len=16, token_dim=16, num_classes=10))


def test_process_group_gets_the_recipes_timeout(monkeypatch):
    import datetime

    import torch.distributed as dist

    from far_scale.distributed import runtime

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.update(kwargs))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    runtime.init_distributed("cpu", 90.0)
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    assert Config().parallel.process_group_timeout_min >= 60


def test_deepspeed_throughput_timer_is_off():
    """DeepSpeed's default throughput timer synchronises the device at every forward and step."""
    from deepspeed.utils.config import get_timers_config

    config = build_deepspeed_config(load_config(RECIPES_DIR / "far_large_in256.yaml"), 8)
    timers = get_timers_config(config)
    assert timers.enabled is False and timers.synchronized is False


def test_mfu_peak_matches_the_card_not_its_family():
    from far_scale.planning.flops import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H200 NVL") == 835e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None
