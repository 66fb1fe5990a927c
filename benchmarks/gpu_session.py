"""The GPU session: every GPU benchmark as one resumable command for a session that is lent a card.

    python -m benchmarks.gpu_session                # on the card; writes docs/benchmarks.md rows
    python -m benchmarks.gpu_session --dry-run      # every part on CPU at toy sizes, nothing into docs/

Parts run in order of importance, so a session with 15 minutes of device time gets the most important rows first;
each part is one command of an existing benchmark (which records the card's name, torch, CUDA and DeepSpeed
versions and the date with its rows). The state file (``--state``) records each part's outcome: a re-run skips
what is done (``--force`` repeats it), ``--parts`` picks some, ``--budget-s`` skips a part whose estimate no
longer fits. A failing part is recorded with its log's tail and the session goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from benchmarks.report import REPO_ROOT, describe_machine

DEFAULT_STATE = REPO_ROOT / "benchmarks" / "results" / "gpu_session_state.json"
LOG_TAIL = 4000


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    estimate_s: float
    """On one H100/H200, roughly; used against --budget-s."""
    command: list[str]
    dry_run: list[str]
    """The same code path on CPU at toy sizes, without writing docs."""
    missing: Callable[[], Optional[str]] = lambda: None
    """What the part needs and this machine lacks (then it is skipped and says so), or None."""


FID_ENV = ("FAR_SCALE_FID_SAMPLES", "FAR_SCALE_FID_REFERENCE", "FAR_SCALE_INCEPTION")


def _fid_inputs_missing() -> Optional[str]:
    absent = [name for name in FID_ENV if not Path(os.environ.get(name, "/nonexistent")).is_file()]
    if absent:
        return f"set {', '.join(absent)} to local files (no download here)"
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "torch-fidelity is not installed (pip install '.[eval]')"
    return None


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{name}", *args]


# sampling_speed's sizes and batches on the card, and the toy ones of the dry run.
SAMPLING_GPU = ("--device=cuda", "--dtype=bf16", "--sizes=base,large", "--batch=64,256")
SAMPLING_DRY_RUN = (
    "--device=cpu",
    "--sizes=tiny",
    "--batch=2",
    "--seq-len=16",
    "--num-iter=4",
    "--repeats=1",
    "--no-docs",
)

PARTS = [
    Part(
        "sync_debug",
        "the gpu-marked tests: no host syncs (set_sync_debug_mode), CUDA-graph sampling equals eager (pytest -m gpu)",
        120,
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit", "tests/distributed/test_step.py"],
        [sys.executable, "-m", "pytest", "-q", "tests/unit/test_sampling.py", "-k", "no_host_syncs and not cuda"],
    ),
    Part(
        "train_step",
        "bf16 train step (forward+backward) images/s, MFU and peak memory: FAR-B/L beside MAR-B/L, eager and compiled",
        150,
        _module(
            "train_throughput",
            "--step-only",
            "--device=cuda",
            "--precision=bf16",
            "--sizes=base,large",
            "--batch=64",
            "--repeats=10",
            "--compile",
        ),
        _module(
            "train_throughput", "--step-only", "--device=cpu", "--sizes=tiny", "--batch=2", "--repeats=1", "--no-docs"
        ),
    ),
    Part(
        "sampling",
        "sampling images/s of every acceleration, FAR vs MAR-100, batch 64 and 256, bf16",
        180,
        _module("sampling_speed", "--techniques", *SAMPLING_GPU),
        _module("sampling_speed", "--techniques", *SAMPLING_DRY_RUN),
    ),
    Part(
        "sampling_graphs",
        "sampling images/s eager, compiled and as CUDA graphs (eval.compile): FAR O=4, MAR-100, FAR-Causal static cache",
        150,
        _module("sampling_speed", "--graphs", *SAMPLING_GPU),
        _module("sampling_speed", "--graphs", "--graph-modes=eager", *SAMPLING_DRY_RUN),
    ),
    Part(
        "trainer",
        "far-scale train end to end (DeepSpeed ZeRO-2, bf16, data streamed): FAR and MAR base/large",
        200,
        _module(
            "train_throughput",
            "--device=cuda",
            "--precision=bf16",
            "--configs=base:1:2:64,base:1:2:64:mar,large:1:2:32,large:1:2:32:mar",
            "--steps=20",
            "--no-s3",
        ),
        _module(
            "train_throughput",
            "--device=cpu",
            "--configs=tiny:1:2:4,tiny:1:2:4:mar",
            "--steps=3",
            "--no-s3",
            "--no-docs",
        ),
    ),
    Part(
        "fit",
        "the largest micro batch per GPU that trains (FAR-L, ZeRO-2, bf16)",
        240,
        _module("train_throughput", "--fit", "--device=cuda", "--precision=bf16", "--configs=large:1:2:512"),
        _module(
            "train_throughput", "--fit", "--device=cpu", "--configs=tiny:1:2:1", "--memory-budget-gib=64", "--no-docs"
        ),
    ),
    Part(
        "fid_crosscheck",
        "far-scale's FID/IS against torch-fidelity on the same images and weights",
        120,
        _module(
            "fid_crosscheck",
            os.environ.get(FID_ENV[0], ""),
            os.environ.get(FID_ENV[1], ""),
            f"--inception={os.environ.get(FID_ENV[2], '')}",
        ),
        [],
        _fid_inputs_missing,
    ),
]


def _load(state: Path) -> dict:
    return json.loads(state.read_text()) if state.exists() else {"parts": {}}


def _save(state: Path, data: dict) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(state)


def run_session(args) -> dict:
    state_path = Path(args.state)
    data = _load(state_path)
    import torch

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no CUDA device here: run on the lent card, or --dry-run to check the parts on CPU")
    data["machine"] = describe_machine(device)
    chosen = [p for p in PARTS if not args.parts or p.name in args.parts.split(",")]
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for part in chosen:
        previous = data["parts"].get(part.name, {})
        if previous.get("status") == "done" and previous.get("dry_run") == args.dry_run and not args.force:
            print(f"[{part.name}] done before: skipped (--force repeats it)", flush=True)
            continue
        if deadline is not None and not args.dry_run and time.monotonic() + part.estimate_s > deadline:
            print(f"[{part.name}] ~{part.estimate_s:.0f} s does not fit the remaining budget: skipped", flush=True)
            data["parts"][part.name] = {"status": "skipped (budget)", "dry_run": args.dry_run}
            _save(state_path, data)
            continue
        missing = part.missing()
        if missing or (args.dry_run and not part.dry_run):
            reason = missing or "no CPU stand-in"
            print(f"[{part.name}] skipped: {reason}", flush=True)
            data["parts"][part.name] = {"status": f"skipped ({reason})", "dry_run": args.dry_run}
            _save(state_path, data)
            continue
        command = part.dry_run if args.dry_run else part.command
        print(f"[{part.name}] {part.what}\n  $ {' '.join(command)}", flush=True)
        start = time.monotonic()
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        log = (result.stdout + result.stderr)[-LOG_TAIL:]
        data["parts"][part.name] = {
            "status": "done" if result.returncode == 0 else f"failed (exit {result.returncode})",
            "dry_run": args.dry_run,
            "seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(command),
            "log_tail": log,
        }
        _save(state_path, data)
        print(f"[{part.name}] {data['parts'][part.name]['status']} in {seconds:.0f} s", flush=True)
        if result.returncode != 0:
            print(log[-1500:], flush=True)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU at toy sizes, nothing into docs/")
    parser.add_argument("--parts", default="", help=f"comma-separated subset of: {','.join(p.name for p in PARTS)}")
    parser.add_argument("--force", action="store_true", help="repeat parts the state file says are done")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip parts whose estimate no longer fits")
    parser.add_argument(
        "--state",
        default=None,
        help=f"state file (default {DEFAULT_STATE.relative_to(REPO_ROOT)}; a temporary one with --dry-run)",
    )
    args = parser.parse_args(argv)
    if args.state is None:
        args.state = (
            str(Path(tempfile.gettempdir()) / "gpu_session_dry_run.json") if args.dry_run else str(DEFAULT_STATE)
        )
    data = run_session(args)
    failed = [name for name, part in data["parts"].items() if part["status"].startswith("failed")]
    print(f"state: {args.state}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
