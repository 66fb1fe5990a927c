"""`far-scale compare` on real MLflow runs: an embedded store, run directories, and a running `mlflow server`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, free_port, wait_for_port

SERVER_START_TIMEOUT_S = 120


def _log_run(
    uri: str, artifacts: Path, name: str, arch: str, lr: float, final_accuracy: float, fd_halfwidth: float = 0.0
) -> str:
    """A run as the trainer logs it: the resolved config as params, losses per step, eval/* at intervals (with
    the 95% interval of eval/fd when ``fd_halfwidth``)."""
    from far_scale.config.schema import Config
    from far_scale.tracking.mlflow_tracker import Tracker

    tracker = Tracker(uri, "far-scale", name, artifacts)
    config = Config.model_validate({"model": {"arch": arch}, "optim": {"lr": lr}, "run": {"max_steps": 20}})
    tracker.log_params({"config": config.model_dump(mode="json")})
    for step in range(1, 21):
        tracker.log_metrics({"loss": 1.0 / step + (0.1 if arch == "mar" else 0.0)}, step)
    for step, accuracy in ((10, final_accuracy / 2), (20, final_accuracy)):
        tracker.log_metrics(
            {
                "eval/accuracy": accuracy,
                "eval/fd": 10.0 / accuracy,
                "eval/images_per_s": 40.0 if arch == "far" else 8.0,
                **(
                    {"eval/fd_lo": 10.0 / accuracy - fd_halfwidth, "eval/fd_hi": 10.0 / accuracy + fd_halfwidth}
                    if fd_halfwidth
                    else {}
                ),
            },
            step,
        )
    tracker.close()
    return tracker.run_id


def _labels(path: Path) -> str:
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
        return image.text["Description"]


def _check_output(text: str, out: Path) -> None:
    assert "far-run" in text and "mar-run" in text
    assert "parameters that differ: config.model.arch, config.optim.lr\n" in text
    for name in ("loss_vs_step", "loss_vs_time", "eval_accuracy_vs_step", "images_per_s_vs_eval_accuracy"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert _labels(out / "loss_vs_step.png") == "x: optimizer step; y: loss"
    assert _labels(out / "loss_vs_time.png") == "x: minutes since the run started; y: loss"
    assert "images / s" in _labels(out / "images_per_s_vs_eval_accuracy.png")


def _wait_for_health(uri: str, timeout_s: float) -> None:
    """The port opens before the app answers: poll MLflow's /health until it says OK."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{uri}/health did not answer within {timeout_s} s")


def _cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "far_scale.cli", "compare", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_compare_lists_only_differing_params_and_marks_the_best(tmp_path):
    from far_scale.tracking.compare import collect_runs, compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    far = _log_run(uri, tmp_path / "artifacts", "far-run", "far", 1e-3, 0.9)
    _log_run(uri, tmp_path / "artifacts", "mar-run", "mar", 2e-3, 0.6)
    records = collect_runs(["far-run", "mar-run"], uri)
    result = compare(records, tmp_path / "out", log_to=uri)
    assert result.params == ["config.model.arch", "config.optim.lr"]
    far_row = next(line for line in result.table.splitlines() if line.startswith(f"| far-run ({far[:8]})"))
    cells = [c.strip() for c in far_row.strip("|").split("|")]
    header = [c.strip() for c in result.table.splitlines()[0].strip("|").split("|")]
    assert cells[header.index("eval/accuracy last")] == "0.9 *"  # higher is better: FAR wins
    # FAR's flow-matching loss and MAR's diffusion loss are different quantities: no winner, and the table says why.
    assert cells[header.index("loss last")] == "0.05"
    assert "- loss: no best run marked: config.model.arch differs (far, mar): not the same quantity" in result.table
    assert cells[header.index("eval/accuracy max")] == "0.9"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    logged = {a.path for a in client.list_artifacts(result.run_id, "comparison")}
    assert "comparison/comparison.md" in logged and "comparison/loss_vs_step.png" in logged
    # The artifacts live beside the sqlite store, not in ./mlruns of the working directory.
    assert client.get_run(result.run_id).info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    filtered = collect_runs([], uri, filter_string="params.`config.model.arch` = 'mar'")
    assert [r.name for r in filtered] == ["mar-run"]


def test_compare_marks_the_loss_winner_among_runs_of_one_objective(tmp_path):
    from far_scale.tracking.compare import collect_runs, compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    low = _log_run(uri, tmp_path / "artifacts", "far-a", "far", 1e-3, 0.9)
    _log_run(uri, tmp_path / "artifacts", "far-b", "far", 2e-3, 0.6)
    result = compare(collect_runs(["far-a", "far-b"], uri), tmp_path / "out")
    header = [c.strip() for c in result.table.splitlines()[0].strip("|").split("|")]
    row = next(line for line in result.table.splitlines() if line.startswith(f"| far-a ({low[:8]})"))
    assert [c.strip() for c in row.strip("|").split("|")][header.index("loss last")] == "0.05 *"
    assert "no best run marked" not in result.table


@pytest.mark.parametrize("halfwidth, winner", [(2.0, False), (0.5, True)])
def test_compare_marks_a_winner_only_where_the_intervals_separate(tmp_path, halfwidth, winner):
    """eval/fd 11.1 vs 12.5 (accuracy 0.9 vs 0.8): intervals of +-2 overlap (no winner: 'no significant
    difference'); of +-0.5 they do not (the lower FD wins). The table shows each interval."""
    from far_scale.tracking.compare import NO_DIFFERENCE, collect_runs, compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    far = _log_run(uri, tmp_path / "artifacts", "far-a", "far", 1e-3, 0.9, halfwidth)
    _log_run(uri, tmp_path / "artifacts", "far-b", "far", 2e-3, 0.8, halfwidth)
    result = compare(collect_runs(["far-a", "far-b"], uri), tmp_path / "out")
    header = [c.strip() for c in result.table.splitlines()[0].strip("|").split("|")]
    row = next(line for line in result.table.splitlines() if line.startswith(f"| far-a ({far[:8]})"))
    cell = [c.strip() for c in row.strip("|").split("|")][header.index("eval/fd last")]
    fd = 10.0 / 0.9
    assert cell.startswith(f"{fd:.4g} [{fd - halfwidth:.4g}, {fd + halfwidth:.4g}]"), cell
    assert cell.endswith(" *") == winner
    assert (f"- eval/fd: no best run marked: {NO_DIFFERENCE}" in result.table) != winner
    assert (tmp_path / "out" / "eval_fd_vs_step.png").stat().st_size > 0


def test_compare_command_on_two_run_directories(tmp_path):
    for name, arch, lr, accuracy in (("far-run", "far", 1e-3, 0.9), ("mar-run", "mar", 2e-3, 0.6)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        _log_run(f"sqlite:///{run_dir / 'mlflow.db'}", run_dir / "mlartifacts", name, arch, lr, accuracy)
    out = tmp_path / "out"
    text = _cli(str(tmp_path / "far-run"), str(tmp_path / "mar-run"), "--out", str(out))
    _check_output(text, out)
    assert (tmp_path / "far-run" / "mlartifacts").is_dir() and not (REPO_ROOT / "mlruns").exists()
    with pytest.raises(AssertionError, match="not a run directory"):
        _cli(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_compare_against_a_running_mlflow_server(tmp_path):
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [
            mlflow,
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            (tmp_path / "server-artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, SERVER_START_TIMEOUT_S, server)
        uri = f"http://127.0.0.1:{port}"
        _wait_for_health(uri, SERVER_START_TIMEOUT_S)
        _log_run(uri, tmp_path / "a", "far-run", "far", 1e-3, 0.9)
        _log_run(uri, tmp_path / "a", "mar-run", "mar", 2e-3, 0.6)
        out = tmp_path / "out"
        text = _cli("far-run", "mar-run", "--tracking-uri", uri, "--out", str(out))
        _check_output(text, out)
        assert "logged as comparison run" in text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
