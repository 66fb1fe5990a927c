"""What a person sees in the MLflow UI: two short real trainings, a running `mlflow server`, headless Chromium.

The pages are single-page apps; Chromium's --dump-dom after a virtual time budget returns the DOM once the
JavaScript has fetched and rendered the runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.integration.test_tracking_server import start_server, stop_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_TIMEOUT_S = 180
# The UI fetches runs, metric histories and images asynchronously; a page that is not complete yet is
# loaded again with a longer virtual-time budget.
VIRTUAL_TIME_MS = (30_000, 60_000, 120_000)
SCREEN = "1400,900"
# The chart view renders only the cards inside the window: a tall one shows every section, images included.
TALL_SCREEN = "1400,8000"


def chromium(url: str, profile: Path, *flags: str, window: str = SCREEN, budget_ms: int = VIRTUAL_TIME_MS[0]) -> str:
    """One headless Chromium run with a fresh profile (no UI state carried over between loads)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: run `make system-deps` (scripts/system-deps.sh)"
    shutil.rmtree(profile, ignore_errors=True)
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={window}",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def rendered_dom(url: str, profile: Path, complete, window: str = SCREEN) -> str:
    """The DOM once ``complete(dom)`` holds, trying longer budgets; the last DOM otherwise (for the assertion)."""
    for budget in VIRTUAL_TIME_MS:
        dom = chromium(url, profile, "--dump-dom", window=window, budget_ms=budget)
        if complete(dom):
            break
    return dom


def _train(arch: str, data, out: Path, store: Path) -> None:
    recipe = str(REPO_ROOT / "recipes" / f"{arch}_tiny_synth64.yaml")
    overrides = [
        f"data.url={data}",
        f"run.output_dir={out}",
        f"run.name={arch}-short",
        "run.max_steps=4",
        "run.log_interval=1",
        "eval.interval_steps=4",
        "eval.num_iter=4",
        "eval.head_steps=2",
        "eval.grid_images=4",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "data.num_workers=0",
        "data.expect.seq_len=null",
        "data.expect.token_dim=null",
        "data.expect.num_classes=null",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    result = subprocess.run(
        [sys.executable, "-m", "far_scale.cli", "train", recipe, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_mlflow_ui_shows_both_runs_their_metrics_and_sample_images(latent_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    for arch in ("far", "mar"):
        _train(arch, latent_dataset, tmp_path / "runs", store)
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("far-scale")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"far-short", "mar-short"}
    port = free_port()
    server = start_server(store, port)
    try:
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
        profile = tmp_path / "chromium-profile"
        names = ("far-short", "mar-short")
        table = rendered_dom(f"{base}/runs", profile, lambda dom: all(n in dom for n in names))
        assert all(n in table for n in names)
        # The model-training view (experiment kind), with each run's input dataset (the shard folder) and source.
        assert "Training runs" in table and latent_dataset.name in table
        # Every checkpoint is a logged model of its run, listed in the experiment's Models tab by name and step.
        checkpoints = [f"{n}-step00000004" for n in names]
        models = rendered_dom(f"{base}/models", profile, lambda dom: all(c in dom for c in checkpoints))
        assert all(c in models for c in checkpoints)
        # Each run's sample grid is an MLflow image (log_image with its step) in the chart view.
        images = [f"run_uuid={run_id}" for run_id in runs.values()]
        charts = rendered_dom(
            f"{base}/runs?compareRunsMode=CHART", profile, lambda dom: all(i in dom for i in images), window=TALL_SCREEN
        )
        assert "loss" in charts and "get-artifact?path=images%2Fsamples%2Bstep%2B4%2B" in charts
        assert all(i in charts for i in images)
        ids = json.dumps(sorted(runs.values())).replace(" ", "")
        compare = rendered_dom(
            f'http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments=["{experiment.experiment_id}"]',
            profile,
            lambda dom: all(n in dom for n in names) and "config.model.arch" in dom,
        )
        assert all(n in compare for n in names) and "config.model.arch" in compare and "loss" in compare
        chromium(f"{base}/runs?compareRunsMode=CHART", profile, f"--screenshot={tmp_path / 'charts.png'}")
        assert (tmp_path / "charts.png").stat().st_size > 10_000
    finally:
        stop_server(server)
