"""``far-scale launch slurm`` / ``slurm-encode``: render sbatch scripts into the run directory and submit them.

No hyperparameter lives here: the job gets the recipe path and the overrides, and the recipe is
validated for the job's world size before anything is submitted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from far_scale.config.loader import load_config
from far_scale.data.storage import write_atomic
from far_scale.launch.templates import quote_all, render, sbatch_lines
from far_scale.planning.checks import validate
from far_scale.train.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, STOP_FILE

EXECUTABLE_MODE = 0o755

DEFAULT_RDZV_PORT = 29500


@dataclass(frozen=True)
class SlurmResources:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None

    def extra_lines(self) -> str:
        return sbatch_lines(
            {"partition": self.partition, "account": self.account, "qos": self.qos, "constraint": self.constraint}
        )

    def gpu_line(self) -> str:
        return sbatch_lines({"gpus-per-node": self.gpus_per_node or None})


def _sbatch(script: Path, *flags: str) -> str:
    """Submit and return the job id."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: run on a SLURM login node (or start launchers/slurm/local-cluster.sh)")
    result = subprocess.run(["sbatch", "--parsable", *flags, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def _write(path: Path, text: str) -> Path:
    write_atomic(path, text, mode=EXECUTABLE_MODE)
    return path


def render_train(
    recipe: str,
    overrides: Sequence[str],
    res: SlurmResources,
    *,
    grace_s: int,
    max_restarts: int,
    rdzv_port: int = DEFAULT_RDZV_PORT,
) -> tuple[str, Path]:
    """The sbatch script for a training run and where it belongs (``<run_dir>/slurm/train.sbatch``)."""
    procs = max(res.gpus_per_node, 1)
    cfg = load_config(recipe, overrides)
    validate(cfg, res.nodes * procs)  # fail here, not after hours in the queue
    run_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    log_dir = run_dir / "slurm"
    values = {
        "job_name": cfg.run.name,
        "nodes": res.nodes,
        "gpu_line": res.gpu_line(),
        "cpus_per_task": res.cpus_per_task,
        "time": res.time,
        "log_dir": log_dir,
        "grace_s": grace_s,
        "extra_lines": res.extra_lines(),
        "stop_file": STOP_FILE,
        "preempted_marker": PREEMPTED_MARKER,
        "run_dir_q": quote_all([run_dir]),
        "log_dir_q": quote_all([log_dir]),
        "max_restarts": max_restarts,
        "exit_preempted": EXIT_PREEMPTED,
        "workdir_q": quote_all([Path.cwd()]),
        "rdzv_port": rdzv_port,
        "omp_threads": max(res.cpus_per_task // procs, 1),
        "torchrun": quote_all([sys.executable, "-m", "torch.distributed.run"]),
        "procs_per_node": procs,
        "recipe": quote_all([str(Path(recipe).resolve())]),
        "overrides": quote_all(overrides),
    }
    return render("train.sbatch", values), log_dir / "train.sbatch"


def launch_train(
    recipe: str,
    overrides: Sequence[str],
    res: SlurmResources,
    *,
    grace_s: int,
    max_restarts: int,
    dry_run: bool,
    rdzv_port: int = DEFAULT_RDZV_PORT,
) -> Optional[str]:
    text, path = render_train(recipe, overrides, res, grace_s=grace_s, max_restarts=max_restarts, rdzv_port=rdzv_port)
    if dry_run:
        print(text)
        return None
    _write(path, text)
    job = _sbatch(path)
    print(f"submitted job {job}: {path}\nlogs: {path.parent}/ (node<N>.log per node, <name>-<job>.out)")
    return job


def launch_encode(
    src: str, dst: str, encode_args: Sequence[str], array_size: int, res: SlurmResources, log_dir: Path, dry_run: bool
) -> Optional[tuple[str, str]]:
    """An array job of ``array_size`` encode workers, then a dependent manifest + verify job."""
    if array_size < 1:
        raise ValueError(f"--array-size must be >= 1, got {array_size}")
    log_dir = log_dir.resolve()
    python = quote_all([sys.executable])
    common = {
        "log_dir": log_dir,
        "workdir_q": quote_all([Path.cwd()]),
        "python": python,
        "time": res.time,
        "extra_lines": res.extra_lines(),
    }
    encode_text = render(
        "encode.sbatch",
        {
            **common,
            "job_name": "far-scale-encode",
            "last_task": array_size - 1,
            "gpu_line": res.gpu_line(),
            "cpus_per_task": res.cpus_per_task,
            "encode_args": quote_all([src, dst, *encode_args]),
        },
    )
    manifest_text = render(
        "manifest.sbatch",
        {
            **common,
            "job_name": "far-scale-manifest",
            "manifest_args": quote_all([src, dst, *_manifest_args(encode_args)]),
            "dst": quote_all([dst]),
        },
    )
    if dry_run:
        print(encode_text + "\n# --- then, after the array succeeded ---\n" + manifest_text)
        return None
    encode_job = _sbatch(_write(log_dir / "encode.sbatch", encode_text))
    manifest_job = _sbatch(_write(log_dir / "manifest.sbatch", manifest_text), f"--dependency=afterok:{encode_job}")
    print(f"submitted encode array {encode_job} ({array_size} tasks) and manifest job {manifest_job}; logs: {log_dir}")
    return encode_job, manifest_job


# Encode options that do not apply to `data manifest` (it shares the rest).
_ENCODE_ONLY = {
    "--loader-workers": 1,
    "--device": 1,
    "--precision": 1,
    "--worker-id": 1,
    "--num-workers": 1,
    "--quiet": 0,
}


def _manifest_args(encode_args: Sequence[str]) -> list[str]:
    kept, skip = [], 0
    for item in encode_args:
        if skip:
            skip -= 1
            continue
        name = item.split("=", 1)[0]
        if name in _ENCODE_ONLY:
            skip = _ENCODE_ONLY[name] if "=" not in item else 0
            continue
        kept.append(item)
    return kept
