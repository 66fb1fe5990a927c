"""The GPU session script cannot rot: every part runs on CPU at toy sizes (--dry-run), and a re-run resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_session import PARTS
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DOCS = REPO_ROOT / "docs" / "benchmarks.md"


def _session(state, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_session", "--dry-run", f"--state={state}", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )


def test_every_part_runs_on_cpu_and_a_rerun_skips_what_is_done(tmp_path):
    state = tmp_path / "state.json"
    docs_before = DOCS.read_text()
    first = _session(state)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    parts = json.loads(state.read_text())["parts"]
    assert set(parts) == {p.name for p in PARTS}
    for name, part in parts.items():
        # Done, or skipped with the reason said (the FID cross-check needs weights that are never downloaded).
        assert part["status"] == "done" or part["status"].startswith("skipped ("), (name, part)
    assert parts["train_step"]["status"] == "done" and parts["sampling"]["status"] == "done"
    assert DOCS.read_text() == docs_before  # a dry run writes no rows

    second = _session(state, "--parts=train_step,trainer")
    assert second.returncode == 0
    assert "[train_step] done before: skipped" in second.stdout
    assert "[trainer] done before: skipped" in second.stdout
