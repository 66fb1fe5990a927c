"""`make demo`'s stages, reduced (fewer steps and samples): every stage runs for real, on the real digits."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.distributed]

DEMO_TIMEOUT_S = 900


def _make_demo(out) -> subprocess.CompletedProcess:
    """The README's `make demo`, reduced through DEMO_ARGS (set-up is already done: the stamp is current)."""
    args = f"--out {out} --steps 20 --eval-images 20"
    return subprocess.run(
        ["make", "demo", f"DEMO_ARGS={args}", f"PYTHON={sys.executable}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=DEMO_TIMEOUT_S,
    )


def test_reduced_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = _make_demo(out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    text = result.stdout
    for stage in (
        "[1/8] images",
        "[2/8] S3",
        "[3/8] shards on S3",
        "[4/8] digit benchmark",
        "[5/8] train FAR",
        "[6/8] train MAR",
        "[7/8] sample",
        "[8/8] compare",
    ):
        assert stage in text, stage
    # SIGUSR1 goes out once step 10 is logged; the ranks stop at the first step whose collective sees it.
    resumed = re.search(r"resumed at step (\d+) from the checkpoint on S3", text)
    assert resumed and 10 <= int(resumed.group(1)) < 20 and "the same run" in text, text[-3000:]
    assert "wrote 3000 training and 2000 held-out real digits" in text
    assert "offline benchmark VALID" in text  # the digit benchmark passes its negative controls
    assert "/#/experiments/" in text and "/runs" in text  # the URL that opens the runs table
    summary = (out / "summary.md").read_text()
    assert all(summary.count(f"| {row} |") == 1 for row in ("FAR", "FAR fast", "MAR"))
    assert (out / "far_vs_mar_samples.png").is_file() and (out / "data_grid.png").is_file()
    assert list((out / "compare").glob("*.png"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("far-scale").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["far_tiny_digits32", "mar_tiny_digits32"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")][-1] == 20
        assert "eval/accuracy" in run.data.metrics
        assert any(a.path == "images" or a.path.startswith("images") for a in client.list_artifacts(run.info.run_id))

    # A second demo starts from what this one left: its per-run outputs go, the images, codec and benchmark
    # cache stay and are reused without running anything (running the whole demo again costs CI minutes).
    demo_script = _demo_module()
    kept = {p.name for p in out.iterdir()} - set(demo_script.PER_RUN_OUTPUTS)
    assert kept == {"images", "pca.safetensors", "images.json", "eval-cache"}
    assert demo_script.clear_previous(out) is True
    assert {p.name for p in out.iterdir()} == kept and demo_script.clear_previous(out) is False
    demo = demo_script.Demo(out, 20, 20)
    demo.run = lambda *args, **kwargs: pytest.fail(f"a reused stage ran {args[0]}")
    assert demo_script.prepare_images(demo) == (out / "images", out / "pca.safetensors")


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_script", REPO_ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
