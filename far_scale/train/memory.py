"""This rank's memory: its peak, and how far a block of work (building the model) raised it.

Device memory on a GPU comes from torch's allocator (exact). Host memory is the process's resident set:
its peak from ``getrusage``, its current size from ``/proc/self/status`` (libraries and the Python heap
included).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from far_scale.data.storage import write_atomic
from far_scale.distributed.runtime import all_gather_objects

GIB = 1024**3
KIB = 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
T = TypeVar("T")


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # KiB on Linux


def host_current_bytes() -> int:
    try:
        return _status_bytes("VmRSS")
    except OSError:  # no /proc (not Linux): the peak so far bounds it
        return host_peak_bytes()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KIB
    raise OSError(f"/proc/self/status has no {field} line")


def host_peak_of(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), bytes)``: how far the process's resident set rose above its size before ``fn`` ran, from the
    kernel's high-water mark, which this resets first (Linux ``clear_refs``; a process-wide counter, so for
    measurements, not for training processes). With glibc, fix its mmap threshold beforehand
    (``set_mmap_threshold``) to count live tensors rather than freed memory the heap keeps."""
    gc.collect()  # what is already unreachable goes first, not during fn
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    result = fn()
    return result, _status_bytes("VmHWM") - before


def set_mmap_threshold(num_bytes: int) -> None:
    """glibc: serve allocations of at least ``num_bytes`` with their own mappings, returned to the OS when
    freed (a fixed threshold also stops glibc from raising it after frees). Process-wide; for measurements."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, num_bytes)


def peak_bytes(device: torch.device) -> int:
    """The most memory this rank has held so far: on the GPU when it has one, else on the host."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return host_peak_bytes()


@dataclass
class Growth:
    """Filled in when the ``peak_growth`` block ends."""

    host_bytes: int = 0
    """How far the host's peak resident set rose above its size when the block began (an upper bound: the
    process's high-water mark may predate the block)."""
    device_bytes: Optional[int] = None
    """The same for GPU memory (exact: the peak counter is reset first); None without a GPU."""


@contextlib.contextmanager
def peak_growth(device: torch.device):
    """Measure the peak memory of a block above what this rank held when it began."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
        device_before = torch.cuda.memory_allocated(device)
    host_before = host_current_bytes()
    growth = Growth()
    yield growth
    growth.host_bytes = max(host_peak_bytes() - host_before, 0)
    if on_gpu:
        growth.device_bytes = max(torch.cuda.max_memory_allocated(device) - device_before, 0)


MEMORY_FILE = "memory.json"  # per-rank peak memory and model-build growth, written when a run ends


def report_memory(
    env,
    growth: Growth,
    model_state_estimate: int,
    construction_estimate: int,
    zero_stage: int,
    built_partitioned: bool,
    run_dir: Path,
) -> Optional[dict[str, float]]:
    """Collective: every rank's peak memory and what building the model added, beside the plan's estimates,
    in ``memory.json`` (one entry per rank); returns the largest over the ranks (MLflow metrics) on rank 0."""
    ranks = all_gather_objects(
        {
            "peak_gib": peak_bytes(env.device) / GIB,
            "build_host_gib": growth.host_bytes / GIB,
            "build_device_gib": None if growth.device_bytes is None else growth.device_bytes / GIB,
        }
    )
    if not env.is_main:
        return None
    record = {
        "device": env.device.type,
        "zero_stage": zero_stage,
        "built_partitioned": built_partitioned,
        "model_state_estimate_gib": model_state_estimate / GIB,
        "construction_estimate_gib": construction_estimate / GIB,
        "ranks": ranks,
    }
    write_atomic(run_dir / MEMORY_FILE, json.dumps(record, indent=1))
    peak = max(r["peak_gib"] for r in ranks)
    build = {"host": max(r["build_host_gib"] for r in ranks)}
    if env.device.type == "cuda":
        build["gpu"] = max(r["build_device_gib"] for r in ranks)
    print(
        f"memory: peak {peak:.2f} GiB on the fullest of {len(ranks)} rank(s) (model states estimated at "
        f"{record['model_state_estimate_gib']:.2f} GiB); building the model "
        f"({'partitioned' if built_partitioned else 'whole'}; fp32 weights estimated at "
        f"{record['construction_estimate_gib']:.2f} GiB) added at most "
        + ", ".join(f"{gib:.2f} GiB on the {where}" for where, gib in build.items()),
        flush=True,
    )
    return {
        "memory/peak_gib_max_rank": peak,
        **{f"memory/build_{where}_gib_max_rank": gib for where, gib in build.items()},
    }
