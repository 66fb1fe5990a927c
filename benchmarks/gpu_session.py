"""The GPU session: every GPU benchmark as one resumable command for an air-gapped node lent for minutes.

    python -m benchmarks.gpu_session --plan first --budget-s 480 --out /tmp/session   # on the card
    python -m benchmarks.gpu_session --merge session.tgz                              # back here: results, docs
    python -m benchmarks.gpu_session --dry-run --out DIR                              # every part on CPU, toy sizes

The node has no network and returns only its output folder: with ``--out DIR`` every part writes its result JSONs
(``DIR/results``), the docs rows it would add and their plots (``DIR/docs``, a copy of docs/benchmarks.md) and its
full log (``DIR/logs``) into DIR, and the state file (``DIR/state.json``: each part's outcome, seconds and log
tail) goes there too; the job archives DIR into one file of ``$OUT``. ``--merge`` folds a returned folder or
archive into benchmarks/results/ and docs/ (idempotent) and keeps its state file, from which the next job resumes
(``--state``).

Parts run in the order of their plan (``--plan first``: what the first 10-minute job must bring back; ``second``:
compile and CUDA graphs; ``later``: the large sizes, the trainer end to end and the fit search; ``all``). A part
starts only if its estimate fits what is left of ``--budget-s``; it runs as its own process group and is killed
with all its children when it outlasts its timeout or the budget; a re-run skips what is done (``--force``
repeats it). A failing part is recorded with its log's tail and the session goes on.

Estimates (seconds on one H100/H200): each part's CPU dry run measured on the 2-core Xeon (2026-12-05; those are
its fixed costs: interpreter, torch/DeepSpeed imports, data and model set-up, which the GPU node pays too) plus
its work at the card's sizes, guessed from the FLOPs of the timed steps at a third of the bf16 peak. They decide
what is started, never what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from benchmarks.report import DOCS_ENV, REPO_ROOT, RESULTS_ENV, describe_machine, device_key, results_dir

STATE_FILE = "gpu_session_state.json"
"""The session's state beside the results (``report.results_dir()``: benchmarks/results/ unless
$FAR_SCALE_RESULTS_DIR says otherwise)."""


def default_state() -> Path:
    return results_dir() / STATE_FILE


LOG_TAIL = 4000
KILL_GRACE_S = 10
PROBE_DIR = REPO_ROOT / "benchmarks" / "device" / "probe"
AS_NODE_ENV = "FAR_SCALE_AS_NODE"
"""Set (``--as-node``): every Python process of a part imports like the GPU node (only the image's distributions
and the wheelhouse's), so that a dry run here fails where the node would."""


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    plan: str
    """first, second or later: the job that runs it."""
    estimate_s: float
    """On one H100/H200 (module docstring); used against --budget-s."""
    command: list[str]
    dry_run: list[str]
    """The same code path on CPU at toy sizes, writing only into the session's folder."""
    timeout_s: float = 0.0
    """Killed (with its children) after this long; 0: twice the estimate."""
    missing: Callable[[], Optional[str]] = field(default=lambda: None)
    """What the part needs and this machine lacks (then it is skipped and says so), or None."""

    @property
    def limit_s(self) -> float:
        return self.timeout_s or 2 * self.estimate_s


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


GPU = ("--device=cuda",)
SAMPLING_DRY_RUN = ("--device=cpu", "--sizes=tiny", "--batch=2", "--seq-len=16", "--num-iter=4", "--repeats=1")
STEP_DRY_RUN = ("--step-only", "--device=cpu", "--sizes=tiny", "--batch=2", "--repeats=1")
PLANS = ("first", "second", "later")

PARTS = [
    Part(
        "sync_debug",
        "the gpu-marked tests: no host syncs in a bf16 step (set_sync_debug_mode), CUDA-graph sampling equals eager",
        "first",
        150,
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit", "tests/distributed/test_step.py"],
        [sys.executable, "-m", "pytest", "-q", "tests/unit/test_sampling.py", "-k", "no_host_syncs and not cuda"],
    ),
    Part(
        "train_step",
        "bf16 training step (forward + backward) images/s, MFU and peak memory: FAR-B beside MAR-B, eager",
        "first",
        90,
        _module(
            "train_throughput", "--step-only", *GPU, "--precision=bf16", "--sizes=base", "--batch=64", "--repeats=10"
        ),
        _module("train_throughput", *STEP_DRY_RUN),
    ),
    Part(
        "sampling",
        "sampling images/s, FAR O=4/8 vs MAR-100, FAR-B and MAR-B at batch 64, bf16, eager",
        "first",
        150,
        _module(
            "sampling_speed",
            *GPU,
            "--dtype=bf16",
            "--sizes=base",
            "--batch=64",
            "--num-iter=64",
            "--far-steps=4,8",
            "--mar-steps=100",
            "--causal-steps=8",
        ),
        _module("sampling_speed", *SAMPLING_DRY_RUN, "--far-steps=4", "--mar-steps=25"),
    ),
    Part(
        "train_step_compiled",
        "bf16 training step images/s, MFU and peak memory, eager and compiled: FAR-B/L beside MAR-B/L",
        "second",
        240,
        _module(
            "train_throughput",
            "--step-only",
            *GPU,
            "--precision=bf16",
            "--sizes=base,large",
            "--batch=64",
            "--repeats=10",
            "--compile",
        ),
        _module("train_throughput", *STEP_DRY_RUN, "--compile"),
    ),
    Part(
        "sampling_graphs",
        "sampling eager, compiled and as CUDA graphs (eval.compile; rows with cudagraph_skips > 0 refused)",
        "second",
        240,
        _module("sampling_speed", "--graphs", *GPU, "--dtype=bf16", "--sizes=base", "--batch=64"),
        _module("sampling_speed", "--graphs", "--graph-modes=eager", *SAMPLING_DRY_RUN),
    ),
    Part(
        "sampling_techniques",
        "sampling images/s of every acceleration, FAR vs MAR-100, base and large, batch 64 and 256, bf16",
        "later",
        300,
        _module("sampling_speed", "--techniques", *GPU, "--dtype=bf16", "--sizes=base,large", "--batch=64,256"),
        _module("sampling_speed", "--techniques", *SAMPLING_DRY_RUN),
    ),
    Part(
        "trainer",
        "far-scale train end to end (DeepSpeed ZeRO-2, bf16, data streamed): FAR and MAR base/large",
        "later",
        300,
        _module(
            "train_throughput",
            *GPU,
            "--precision=bf16",
            "--configs=base:1:2:64,base:1:2:64:mar,large:1:2:32,large:1:2:32:mar",
            "--steps=20",
            "--no-s3",
        ),
        _module("train_throughput", "--device=cpu", "--configs=tiny:1:2:4,tiny:1:2:4:mar", "--steps=3", "--no-s3"),
    ),
    Part(
        "fit",
        "the largest micro batch per GPU that trains (FAR-L, ZeRO-2, bf16; trials write no checkpoint)",
        "later",
        360,
        _module("train_throughput", "--fit", "--precision=bf16", "--configs=large:1:2:512"),
        _module("train_throughput", "--fit", "--device=cpu", "--configs=tiny:1:2:1", "--memory-budget-gib=64"),
    ),
    Part(
        "fid_crosscheck",
        "far-scale's FID/IS against torch-fidelity on the same images and weights",
        "later",
        120,
        _module(
            "fid_crosscheck",
            os.environ.get(FID_ENV[0], ""),
            os.environ.get(FID_ENV[1], ""),
            f"--inception={os.environ.get(FID_ENV[2], '')}",
        ),
        [],
        missing=_fid_inputs_missing,
    ),
]


# ---- state and the output folder ----------------------------------------------------------------------------
def _load(state: Path) -> dict:
    return json.loads(state.read_text()) if state.exists() else {"parts": {}}


def _save(state: Path, data: dict) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(state)


def prepare_out(out: Path) -> dict[str, str]:
    """The session's folder (results, docs copy, logs) and the environment that sends every part's writes there."""
    for sub in ("results", "docs/img", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    doc = out / "docs" / "benchmarks.md"
    if not doc.exists():
        shutil.copyfile(REPO_ROOT / "docs" / "benchmarks.md", doc)
    return {RESULTS_ENV: str(out / "results"), DOCS_ENV: str(out / "docs")}


# ---- running one part ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str
    seconds: float
    log_tail: str
    process_group: int


def run_part(command: list[str], env: dict, limit_s: float, log_path: Path) -> Outcome:
    """``command`` in a process group of its own, its output into ``log_path``; the whole group killed (TERM, then
    KILL) when it outlasts ``limit_s``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(limit_s, 1.0))
            status = "done" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _kill_group(process)
            status = f"timed out after {limit_s:.0f} s (killed with its children)"
    tail = log_path.read_text(errors="replace")[-LOG_TAIL:]
    return Outcome(status, time.monotonic() - start, tail, process.pid)


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # the leader is gone; its children may not be
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def _chosen(args) -> list[Part]:
    names = set(args.parts.split(",")) if args.parts else None
    plans = PLANS if args.plan == "all" else (args.plan,)
    return [p for p in PARTS if (p.name in names if names is not None else p.plan in plans)]


def run_session(args) -> dict:
    state_path = Path(args.state)
    data = _load(state_path)
    import torch

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no CUDA device here: run on the lent card, or --dry-run to check the parts on CPU")
    data["machine"] = describe_machine(device)
    data["card"] = device_key(data["machine"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.out:
        env.update(prepare_out(Path(args.out)))
    if args.as_node:
        env[AS_NODE_ENV] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(PROBE_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    timeouts = dict(item.split("=") for item in args.timeouts.split(",")) if args.timeouts else {}
    logs = Path(args.out) / "logs" if args.out else Path(tempfile.mkdtemp(prefix="gpu-session-logs-"))
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for part in _chosen(args):
        previous = data["parts"].get(part.name, {})
        if previous.get("status") == "done" and previous.get("dry_run") == args.dry_run and not args.force:
            print(f"[{part.name}] done before: skipped (--force repeats it)", flush=True)
            continue
        left = deadline - time.monotonic() if deadline is not None else float("inf")
        estimate = part.estimate_s
        missing = part.missing()
        if missing or (args.dry_run and not part.dry_run):
            outcome = {"status": f"skipped ({missing or 'no CPU stand-in'})"}
        elif estimate > left:
            outcome = {"status": f"skipped (budget: ~{estimate:.0f} s estimated, {max(left, 0):.0f} s left)"}
        else:
            command = part.dry_run if args.dry_run else part.command
            limit = min(float(timeouts.get(part.name, part.limit_s)), left)
            print(f"[{part.name}] {part.what}\n  $ {' '.join(command)}  (at most {limit:.0f} s)", flush=True)
            run = run_part(command, env, limit, logs / f"{part.name}.log")
            outcome = {
                "status": run.status,
                "seconds": round(run.seconds, 1),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(command),
                "process_group": run.process_group,
                "log_tail": run.log_tail,
            }
        data["parts"][part.name] = {"dry_run": args.dry_run, **outcome}
        _save(state_path, data)
        print(
            f"[{part.name}] {outcome['status']}" + (f" in {outcome['seconds']:.0f} s" if "seconds" in outcome else ""),
            flush=True,
        )
        if not outcome["status"].startswith(("done", "skipped")):
            print(outcome["log_tail"][-1500:], flush=True)
    return data


# ---- back home ----------------------------------------------------------------------------------------------
def merge(source: Path, state: Optional[Path] = None) -> list[str]:
    """Fold a session's folder (or its archive) into benchmarks/results/ and docs/: its result JSONs and images
    copied, every section of docs/benchmarks.md rendered again, its state kept for the next job. Idempotent."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = source
        if source.is_file():
            with tarfile.open(source) as archive:
                archive.extractall(tmp, filter="data")
            folder = Path(tmp)
        from benchmarks.report import img_dir

        merged = []
        for path in sorted((folder / "results").glob("*.json")):
            results_dir().mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, results_dir() / path.name)
            merged.append(path.name)
        for path in sorted((folder / "docs" / "img").glob("*")):
            img_dir().mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, img_dir() / path.name)
        if (folder / "state.json").is_file():
            state = state or default_state()
            state.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / "state.json", state)
    render_all()
    return merged


def render_all() -> None:
    """Every section the GPU session's parts write, from all saved results."""
    from benchmarks import sampling_graphs, sampling_speed, sampling_study, train_throughput

    sampling_speed.SECTION.render()
    sampling_study.SPEED_SECTION.render()
    sampling_graphs.SECTION.render()
    train_throughput.THROUGHPUT_SECTION.render()
    train_throughput.FIT_SECTION.render()
    train_throughput.render_step_docs()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU at toy sizes")
    parser.add_argument("--plan", choices=[*PLANS, "all"], default="all", help="which job's parts (docstring)")
    parser.add_argument("--parts", default="", help=f"comma-separated subset of: {','.join(p.name for p in PARTS)}")
    parser.add_argument("--force", action="store_true", help="repeat parts the state file says are done")
    parser.add_argument("--budget-s", type=float, default=0.0, help="seconds for the whole session (0: no limit)")
    parser.add_argument("--timeouts", default="", help="NAME=SECONDS,... overriding parts' timeouts")
    parser.add_argument("--out", default=None, help="write results, docs rows, logs and state into this folder")
    parser.add_argument("--merge", default=None, help="fold a returned session folder or archive into the repo")
    parser.add_argument(
        "--as-node",
        action="store_true",
        help="import like the GPU node: only its image's and the wheelhouse's packages",
    )
    parser.add_argument(
        "--state",
        default=None,
        help=f"state file to resume from (default: OUT/state.json with --out, else "
        f"benchmarks/results/{STATE_FILE}; a temporary one with --dry-run)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge(Path(args.merge))
        print(f"merged {len(merged)} result(s) into benchmarks/results and docs/benchmarks.md: {', '.join(merged)}")
        return 0
    if args.out:
        own = Path(args.out) / "state.json"
        if args.state and Path(args.state).resolve() != own.resolve() and Path(args.state).is_file():
            own.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.state, own)  # a returned state file: this job resumes from it
        args.state = str(own)
    elif args.dry_run:
        # A dry run writes nothing into the repo: its folder is a temporary one unless --out names one.
        args.out = tempfile.mkdtemp(prefix="gpu-session-dry-run-")
        args.state = args.state or str(Path(args.out) / "state.json")
    elif args.state is None:
        args.state = str(default_state())
    data = run_session(args)
    failed = [name for name, part in data["parts"].items() if not part["status"].startswith(("done", "skipped"))]
    print(f"state: {args.state}" + (f"; not done: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
