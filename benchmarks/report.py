"""Shared plumbing for benchmarks: machine description, result files, and the docs/benchmarks.md sections.

Each benchmark writes one JSON per (benchmark, machine, variant) under benchmarks/results/
and regenerates its own marked section of docs/benchmarks.md from all of its JSONs, so
results from several machines (a CPU box, a lent H100) sit side by side.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from far_scale.data.storage import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ENV = "FAR_SCALE_RESULTS_DIR"
"""Where results go instead of benchmarks/results/ (a GPU session's output folder: only it comes back)."""
DOCS_ENV = "FAR_SCALE_DOCS_DIR"
"""Where benchmarks.md and its images go instead of docs/ (likewise)."""
DOC_HEADER = "# Benchmarks\n\nMeasured numbers only; each table says which machine, command and date produced it.\n"


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or REPO_ROOT / "benchmarks" / "results")


def docs_dir() -> Path:
    return Path(os.environ.get(DOCS_ENV) or REPO_ROOT / "docs")


def doc_path() -> Path:
    return docs_dir() / "benchmarks.md"


def img_dir() -> Path:
    """The benchmarks' plots and grids (docs/img, or the session's output folder)."""
    return docs_dir() / "img"


def device_key(machine: dict) -> str:
    """A result key's machine part: ``cpu``, or the card's name as a slug (an H200's rows never overwrite an
    H100's)."""
    if machine["device"] != "cuda":
        return machine["device"]
    return re.sub(r"[^a-z0-9]+", "-", machine["name"].lower()).strip("-")


def describe_machine(device: torch.device) -> dict:
    """Card or CPU name, core count and library versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": device.type,
        "name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": _version("deepspeed"),
        "python": platform.python_version(),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _result_path(benchmark: str, key: str) -> Path:
    return results_dir() / f"{benchmark}__{key}.json"


def save_result(benchmark: str, key: str, payload: dict) -> dict:
    """Write ``payload`` as ``benchmark``'s result ``key``; returns it as saved (with its date)."""
    results_dir().mkdir(parents=True, exist_ok=True)
    # A result saved again (e.g. its pictures redrawn) keeps the date it was measured on.
    payload = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **payload}
    write_atomic(_result_path(benchmark, key), json.dumps(payload, indent=2))
    return payload


def load_result(benchmark: str, key: str) -> dict:
    """One saved result (``save_result``'s ``benchmark`` and ``key``)."""
    path = _result_path(benchmark, key)
    if not path.is_file():
        raise FileNotFoundError(f"no saved {benchmark} result with key {key!r}: {path} does not exist")
    return json.loads(path.read_text())


def load_results(benchmark: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir().glob(f"{benchmark}__*.json"))]


def markdown_table(header: list[str], rows: Iterable[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_doc_section(benchmark: str, body: str) -> None:
    """Replace the section between this benchmark's markers in docs/benchmarks.md (append if new)."""
    begin, end = f"<!-- {benchmark}:begin -->", f"<!-- {benchmark}:end -->"
    path = doc_path()
    text = path.read_text() if path.exists() else DOC_HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass(frozen=True)
class DocSection:
    """One benchmark's section of docs/benchmarks.md: a heading, an introduction, then each saved result's lines
    (``entry``), regenerated from every result file of the benchmark."""

    benchmark: str
    title: str
    entry: Callable[[dict], list[str]]
    intro: tuple[str, ...] = ()

    def render(self) -> None:
        parts = [f"## {self.title}", "", *self.intro, *([""] if self.intro else [])]
        for result in load_results(self.benchmark):
            parts += self.entry(result)
        write_doc_section(self.benchmark, "\n".join(parts))

    def save(self, key: str, result: dict) -> dict:
        """Save ``result`` under ``key`` and render the section; returns the result as saved (with its date)."""
        saved = save_result(self.benchmark, key, result)
        self.render()
        return saved


def command_line(script: str, argv) -> str:
    """The command that produced a result, as docs/benchmarks.md shows it (``argv`` None: this process's)."""
    return f"python -m benchmarks.{script.removesuffix('.py')} " + " ".join(sys.argv[1:] if argv is None else argv)


def result_heading(what: str, result: dict, details: str = "") -> list[str]:
    """A result's heading lines in docs/benchmarks.md: what, machine, details; date and command."""
    machine = result["machine"]
    return [
        f"### {what} on {machine['name']} ({machine['device']}, {machine['torch_threads']} threads)"
        + (f", {details}" if details else ""),
        f"Date: {result['date']}. Command: `{result['command']}`",
        "",
    ]


def save_result_figure(fig, path: Path, what: str, result: dict) -> None:
    """Title a result's figure with ``what`` and the machine, threads and date that measured it, and write it."""
    from far_scale.tracking.plots import save_figure

    machine = result["machine"]
    fig.suptitle(
        f"{what}: {machine['name']}, {machine['torch_threads']} threads, {result['date']}",
        fontsize=9,
    )
    save_figure(fig, path)


def interval_cell(row: dict, name: str, digits: int) -> str:
    """``row[name]`` with its interval (``*_lo``, ``*_hi``) when it has one, for the docs tables."""
    low, high = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if low is None or low != low:
        return f"{row[name]:.{digits}f}"
    return f"{row[name]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
