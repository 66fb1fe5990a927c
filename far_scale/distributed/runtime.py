"""Rank, world size and device from torchrun or SLURM; process-group set-up and small collectives."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A single process without a launcher still gets a (1-rank) process group: DeepSpeed needs one.
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


DEFAULT_TIMEOUT_MIN = 60.0  # parallel.process_group_timeout_min's default, for callers without a recipe


def configure_math(tf32: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on Ampere and later GPUs (torch's default is full fp32): the fp32
    parts of a bf16 autocast run (the loss, the head's fp32 islands, the optimizer's master weights) and every
    fp32 run use the tensor cores. No effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def init_distributed(device: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistEnv:
    """Join (or create) the process group: NCCL on GPUs, gloo on CPU; a collective fails after ``timeout_min``."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if "MASTER_ADDR" not in os.environ and world_size > 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: launch with torchrun "
            "(far-scale launch local|slurm) so that ranks can find each other"
        )
    # What torchrun exports for a launch; DeepSpeed reads these from the environment (LOCAL_RANK above
    # all), so a plain `far-scale train` on one process gets the same variables a 1-process torchrun would.
    for name, value in (
        ("RANK", rank),
        ("WORLD_SIZE", world_size),
        ("LOCAL_RANK", local_rank),
        ("MASTER_ADDR", LOOPBACK),
        ("MASTER_PORT", free_port() if world_size == 1 else None),
    ):
        if value is not None:
            os.environ.setdefault(name, str(value))
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=timeout_min)
        )
    return DistEnv(rank, world_size, local_rank, torch_device)


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (small Python objects only)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
