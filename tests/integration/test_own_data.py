"""docs/own-data.md runs as written (fewer images and steps), and the other docs' example paths are what it makes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow]

BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
WALKTHROUGH = REPO_ROOT / "docs" / "own-data.md"
# Docs whose examples use the walkthrough's folder (runs/own): their paths must be ones it writes.
USERS = [REPO_ROOT / "docs" / "tracking.md", REPO_ROOT / "docs" / "operations.md"]
DOC_ROOT = "runs/own"


def test_the_own_data_walkthrough_runs_as_written(tmp_path):
    script = "\n".join(BLOCK.findall(WALKTHROUGH.read_text()))
    own = tmp_path / "own"
    env = {
        **os.environ,
        "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OWN": str(own),
        "PER_CLASS": "30",
        "STEPS": "20",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MASTER_ADDR", None)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for made in ("shards/manifest.json", "benchmark.safetensors", "exports/far-lr1e-3/codec", "compare/comparison.md"):
        assert (own / made).exists(), made
    assert (own / "samples" / "far-lr1e-3" / "samples.npz").is_file()
    assert "images used" in result.stdout  # the input report
    # Every runs/own path in the other docs' commands is one the walkthrough wrote.
    for doc in USERS:
        for block in BLOCK.findall(doc.read_text()):
            for path in re.findall(rf"{DOC_ROOT}/[\w./-]+", block):
                relative = path[len(DOC_ROOT) + 1 :].rstrip(".")
                assert (own / relative).exists(), f"{doc.name}: {path} is not written by docs/own-data.md"
