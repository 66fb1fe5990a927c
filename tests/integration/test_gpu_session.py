"""The GPU session cannot rot: its parts run on CPU at toy sizes importing only what the GPU node has (--dry-run
--as-node), into one returned folder (--out); a part that outlasts its time is killed with its children and the
next one runs; a budget smaller than a part's estimate skips it; --merge folds the folder into the repo, twice alike;
a fit trial writes no checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from benchmarks.gpu_session import PARTS
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DOCS = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS = REPO_ROOT / "benchmarks" / "results"


def _session(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_session", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
    )


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_session_as_on_the_node_returns_one_folder_and_merges_idempotently(tmp_path, monkeypatch):
    out = tmp_path / "session"
    docs_before, results_before = DOCS.read_text(), sorted(p.name for p in RESULTS.iterdir())
    repo_files = {p.name: p.read_bytes() for p in RESULTS.iterdir() if p.is_file()}
    # The first plan's parts, then the trainer (a process tree: the benchmark, then far-scale train) given 5 s, killed
    # with its children, and the fit search after it. (The compiled and CUDA-graph parts take minutes to compile on a
    # CPU; the import test covers their modules.)
    chosen = ("sync_debug", "train_step", "sampling", "trainer", "fit")
    first = _session("--dry-run", "--as-node", f"--out={out}", "--timeouts=trainer=5", f"--parts={','.join(chosen)}")
    state = json.loads((out / "state.json").read_text())
    parts = state["parts"]
    assert set(parts) == set(chosen) and set(chosen) <= {p.name for p in PARTS}
    trainer = parts["trainer"]
    assert trainer["status"].startswith("timed out after 5 s"), trainer
    assert not _alive(trainer["process_group"])  # its children are gone too
    assert parts["fit"]["status"] == "done", parts["fit"]  # the next part ran
    for name, part in parts.items():
        if name != "trainer":
            assert part["status"] == "done" or part["status"].startswith("skipped ("), (name, part["log_tail"][-2000:])
    assert first.returncode == 1  # the timed-out part is not done
    # Everything came into the one folder: nothing into the repo.
    assert DOCS.read_text() == docs_before and sorted(p.name for p in RESULTS.iterdir()) == results_before
    returned = sorted(p.name for p in (out / "results").glob("*.json"))
    assert any(n.startswith("train_step_far_vs_mar__cpu_tiny") for n in returned), returned
    assert (out / "logs" / "sampling.log").stat().st_size > 0 and "Training step: FAR vs MAR" in (
        out / "docs" / "benchmarks.md"
    ).read_text()
    # Merged into a copy of the repo's results and docs (the test must not change the repository itself).
    archive = tmp_path / "session.tgz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(out, arcname=".")
    repo_results, repo_docs = tmp_path / "repo-results", tmp_path / "repo-docs"
    shutil.copytree(RESULTS, repo_results)
    (repo_docs / "img").mkdir(parents=True)
    shutil.copyfile(DOCS, repo_docs / "benchmarks.md")
    env = {**os.environ, "FAR_SCALE_RESULTS_DIR": str(repo_results), "FAR_SCALE_DOCS_DIR": str(repo_docs)}
    merged = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_session", f"--merge={archive}"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        merged.append(((repo_docs / "benchmarks.md").read_text(), sorted(p.name for p in repo_results.iterdir())))
    assert merged[0] == merged[1]  # idempotent
    assert set(returned) <= set(merged[0][1])
    assert (repo_results / "gpu_session_state.json").is_file()  # the state kept beside the merged results ...
    assert {p.name: p.read_bytes() for p in RESULTS.iterdir() if p.is_file()} == repo_files  # ... not in the repo


def test_a_budget_smaller_than_a_parts_estimate_skips_it_saying_so(tmp_path):
    result = _session("--dry-run", f"--out={tmp_path}", "--parts=train_step,sampling", "--budget-s=60")
    parts = json.loads((tmp_path / "state.json").read_text())["parts"]
    assert result.returncode == 0
    for name in ("train_step", "sampling"):  # estimates 90 s and 150 s: neither fits 60 s
        assert parts[name]["status"].startswith("skipped (budget: ~"), parts[name]


def test_a_fit_trial_writes_no_checkpoint(tmp_path):
    from benchmarks.train_throughput import build_data, train

    data = build_data(tmp_path / "data", 64)
    row = train(data, tmp_path / "runs", "tiny", 1, 2, 2, 2, device="cpu", precision="fp32")
    assert row["images_per_s"] > 0
    run = next((tmp_path / "runs").iterdir())
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
