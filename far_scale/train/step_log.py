"""What rank 0 records of the steps: one line per step in ``metrics.jsonl``, interval means to MLflow and
the console (loss, throughput, data wait, memory, ETA, MFU on a GPU)."""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from far_scale.planning.flops import peak_flops
from far_scale.train.memory import GIB, peak_bytes

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("far_scale.train")


@dataclass
class StepTimes:
    """Host seconds of one step. On a GPU the micro-steps only launch work (nothing waits for the device
    before the step's one transfer), so the device time shows in ``optimizer_s``; the total is exact."""

    data_s: float = 0.0
    compute_s: float = 0.0
    optimizer_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.data_s + self.compute_s + self.optimizer_s


@dataclass
class Window:
    """Accumulates metrics between two log lines."""

    steps: int = 0
    loss_steps: int = 0
    """Steps with a finite loss: a skipped step (NaN loss on every micro-batch) counts in time, not in loss."""
    loss_sum: float = 0.0
    parts: dict = field(default_factory=dict)
    times: StepTimes = field(default_factory=StepTimes)

    def add(self, loss: float, parts: dict, times: StepTimes) -> None:
        self.steps += 1
        if math.isfinite(loss):
            self.loss_steps += 1
            self.loss_sum += loss
            for key, value in parts.items():
                self.parts[key] = self.parts.get(key, 0.0) + value
        self.times.data_s += times.data_s
        self.times.compute_s += times.compute_s
        self.times.optimizer_s += times.optimizer_s


@dataclass
class StepLog:
    """Rank 0's records; on other ranks every call does nothing."""

    run_dir: Path
    enabled: bool
    device: object
    lr_at: Callable[[int], float]
    samples_per_step: int
    seq_len: int
    world_size: int
    flops_per_image: float
    peak_flops: Optional[float]
    window: Window = field(default_factory=Window)

    @classmethod
    def for_run(cls, run_dir: Path, env, lr_at: Callable[[int], float], plan, seq_len: int) -> "StepLog":
        """Rank 0's records of a run with ``plan`` (a ``TrainingPlan``); MFU against this GPU's peak."""
        cuda = env.device.type == "cuda"
        peak = peak_flops(torch.cuda.get_device_name(env.device)) if cuda else None
        return cls(
            run_dir,
            env.is_main,
            env.device,
            lr_at,
            plan.samples_per_step,
            seq_len,
            env.world_size,
            plan.flops_per_image,
            peak,
        )

    def record(self, step: int, loss: float, parts: dict, times: StepTimes) -> None:
        """The per-step line (loss, timing, peak memory) next to the run; MLflow gets interval means."""
        self.window.add(loss, parts, times)
        if not self.enabled:
            return
        row = {
            "step": step,
            "loss": loss,
            **parts,
            "lr": self.lr_at(step - 1),
            "step_time_s": times.total_s,
            "data_s": times.data_s,
            "peak_memory_gib": peak_bytes(self.device) / GIB,
        }
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def interval_metrics(self, step: int, grad_norm: Optional[float], nonfinite: int) -> Optional[dict]:
        """Means over the steps since the last call (and starts a new interval); None on other ranks."""
        window, self.window = self.window, Window()
        if not self.enabled or window.steps == 0:
            return None
        t = window.times
        images_per_s = window.steps * self.samples_per_step / t.total_s if t.total_s > 0 else 0.0
        metrics = {
            "loss": window.loss_sum / window.loss_steps if window.loss_steps else math.nan,
            **{f"loss/{k}": v / window.loss_steps for k, v in window.parts.items()},
            "lr": self.lr_at(step - 1),
            "grad_norm": grad_norm,
            "images_per_s": images_per_s,
            "latents_per_s": images_per_s * self.seq_len,
            "step_time_s": t.total_s / window.steps,
            "data_wait_share": t.data_s / t.total_s if t.total_s > 0 else 0.0,
            "time/forward_backward_s": t.compute_s / window.steps,
            "time/optimizer_s": t.optimizer_s / window.steps,
            "memory/peak_gib": peak_bytes(self.device) / GIB,
            "nonfinite_skipped": float(nonfinite),
        }
        if self.peak_flops:
            metrics["mfu"] = images_per_s / self.world_size * self.flops_per_image / self.peak_flops
        return metrics

    @staticmethod
    def line(metrics: dict, step: int, total_steps: int) -> str:
        remaining = (total_steps - step) * metrics["step_time_s"]
        line = (
            f"step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
            f"{metrics['images_per_s']:.1f} img/s {metrics['latents_per_s']:.0f} latents/s data-wait "
            f"{100 * metrics['data_wait_share']:.0f}% mem {metrics['memory/peak_gib']:.2f} GiB "
            f"eta {remaining / 60:.1f} min"
        )
        if "mfu" in metrics:
            line += f" mfu {100 * metrics['mfu']:.1f}%"
        return line


def write_line(bar, line: str) -> None:
    (bar.write if not bar.disable else print)(line)
    sys.stdout.flush()


class NonfiniteSteps:
    """Steps skipped for a NaN/inf loss on some rank: counted (saved with checkpoints), warned about on rank 0,
    and the run stopped once there are more than ``run.max_nonfinite_steps``."""

    def __init__(self, limit: int, is_main: bool, count: int = 0):
        self.limit, self.is_main, self.count = limit, is_main, count

    def record(self, step: int, micro_batches: int, keys: list) -> None:
        self.count += 1
        if self.is_main:
            log.warning(
                "non-finite loss at step %d (%d micro-batch(es) over all ranks; rank 0's keys %s...); step skipped "
                "(%d so far, limit %d)",
                step,
                micro_batches,
                keys[:2],
                self.count,
                self.limit,
            )
        if self.count > self.limit:
            raise FloatingPointError(
                f"{self.count} non-finite losses exceed run.max_nonfinite_steps={self.limit}: look for NaN/inf "
                "latents (`far-scale data inspect` prints their statistics) or lower optim.lr"
            )
