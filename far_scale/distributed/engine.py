"""DeepSpeed: the only module that imports it. Engine construction, ZeRO-3 parameter access, checkpoints.

The optimizer is a client ``torch.optim.AdamW`` and the LR is set by the trainer each step,
so DeepSpeed compiles none of its optimizer ops. On CPU its shared-memory allreduce op (a
~6 minute JIT build on 2 cores) is disabled and gloo is used as is.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from far_scale.config.schema import OptimConfig
from far_scale.models.transformer import BlockStack

SHM_COMM_OP = "deepspeed_shm_comm"
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}  # deepspeed.checkpoint.constants value


def configure_deepspeed(device: torch.device):
    """Import and configure DeepSpeed for ``device`` (idempotent); returns the module."""
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # DeepSpeed caches this probe in the module and documents that edits persist; without it the
        # first init_distributed on a CPU machine JIT-compiles the shm op for minutes.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    return deepspeed


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block in backward; returns the number of block stacks switched."""
    stacks = [m for m in model.modules() if isinstance(m, BlockStack)]
    for stack in stacks:
        stack.activation_checkpointing = True
    return len(stacks)


def build_engine(
    model: nn.Module,
    ds_config: dict,
    optim: OptimConfig,
    device: torch.device,
    param_groups: list[dict],
    lr: float,
    load_universal: bool = False,
):
    """A DeepSpeed engine over ``model`` with a client AdamW; ``ds_config`` is the plan's."""
    deepspeed = configure_deepspeed(device)
    optimizer = SkippableAdamW(
        param_groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=device.type == "cuda"
    )
    ds_config = copy.deepcopy(ds_config)  # DeepSpeed may edit its config; the plan's stays as planned
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    if not any(is_partitioned(p) for p in model.parameters()):
        model = model.to(device)  # a model built partitioned is already where zero.Init put its shares
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose next ``step`` can be cancelled from outside.

    Every ZeRO stage (and DeepSpeed's bf16 optimizer) ends its boundary step by calling the client optimizer's
    ``step`` on the fp32 master weights and copying them back, so cancelling that one call skips the update at
    every stage alike: no parameter, moment or step-count change, and no extra synchronisation.
    """

    skip_next: bool = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def optimizer_step(engine, apply: bool) -> None:
    """The step that closes an accumulation (every micro-batch's backward has run): applied, or skipped when
    ``apply`` is False (a non-finite loss on some rank; every rank passes the same value)."""
    client = _client_optimizer(engine)
    client.skip_next = not apply
    try:
        engine.step()
    finally:
        client.skip_next = False  # DeepSpeed may skip the call itself (a bf16 overflow): never carry it over


def _client_optimizer(engine) -> SkippableAdamW:
    optimizer = engine.optimizer
    while not isinstance(optimizer, SkippableAdamW):  # ZeRO and bf16 wrappers keep the client as .optimizer
        optimizer = optimizer.optimizer
    return optimizer


def build_partitioned(build: Callable[[], nn.Module], ds_config: dict, device: torch.device) -> nn.Module:
    """``build()`` partitioned over the data-parallel ranks as it runs (ZeRO-3, DeepSpeed's ``zero.Init``):
    each layer is created whole, broadcast from rank 0 and cut to this rank's share as soon as its
    ``__init__`` returns, so no rank holds more than its share plus one layer.

    Tensors are created with torch's defaults (host, fp32: ``tensor_overrides=[]``) so that the initialisers
    draw the values an unpartitioned build draws (models/init.py); the shares are then given the engine's
    precision, which DeepSpeed does not do for a model built this way. DeepSpeed's memory-efficient linear
    stays off: it patches ``torch.nn.functional.linear`` for the whole process.
    """
    deepspeed = configure_deepspeed(device)
    # zero.Init reads the world size from DeepSpeed's communicator: attach it to the process group first.
    deepspeed.init_distributed(
        dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, dist_init_required=False, verbose=False
    )
    with deepspeed.zero.Init(config_dict_or_path=ds_config, tensor_overrides=[], mem_efficient_linear=False):
        model = build()
    if ds_config.get("bf16", {}).get("enabled"):
        for param in model.parameters():
            param.ds_tensor.data = param.ds_tensor.data.to(torch.bfloat16)
            param.data = param.data.to(torch.bfloat16)
    return model


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter (a ZeRO-3 parameter's own ``shape`` is that of an empty placeholder)."""
    return param.ds_shape if is_partitioned(param) else param.shape


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data lives in per-rank partitions)."""
    return hasattr(param, "ds_tensor")


def partition_bytes(module: nn.Module) -> int:
    """Bytes of the ZeRO-3 parameter partitions this rank holds of ``module``."""
    return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters() if is_partitioned(p))


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]):
    """Full values of (possibly ZeRO-3 partitioned) parameters, read-only, inside the block."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    # modifier_rank=None: read-only. Writes made inside would be discarded on exit.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_checkpoint(engine, directory: str, tag: str, client_state: dict[str, Any]) -> None:
    """Collective: every rank must call it."""
    engine.save_checkpoint(
        directory,
        tag=tag,
        client_state={**client_state, "universal_checkpoint_info": UNIVERSAL_INFO},
        save_latest=False,
    )


def load_checkpoint(engine, directory: str, tag: str) -> Optional[dict]:
    """Collective. Returns the client state, or None if DeepSpeed found nothing."""
    path, client_state = engine.load_checkpoint(
        directory, tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    return client_state if path is not None else None


def restore_group_settings(engine, settings: list[dict]) -> None:
    """Put back each optimizer parameter group's own hyperparameters (e.g. weight decay) after a universal
    load: DeepSpeed's ZeRO-3 universal loader copies the first group's settings onto every group."""
    groups = engine.optimizer.param_groups
    if len(groups) != len(settings):
        raise RuntimeError(
            f"the optimizer has {len(groups)} parameter groups after loading, the model defines {len(settings)}"
        )
    for group, own in zip(groups, settings):
        group.update(own)


def convert_to_universal(directory: str, tag: str, output: str) -> None:
    """Run DeepSpeed's ``ds_to_universal`` (world-size independent checkpoint) on one rank."""
    out = Path(output)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(Path(directory) / tag),
        "--output_folder",
        str(out / tag),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"ds_to_universal failed on {directory}/{tag}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    (out / "latest_universal").write_text(tag)


def consolidated_fp32_state_dict(directory: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag)
