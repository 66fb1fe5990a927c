"""A user's own images and re-runs, the mistakes real users make (issue 35's table, one test a row).

Each case ends in one of two ways: a non-zero exit with a one-line message naming the file, folder or key and the
fix, or the correct result. In every case nothing already written changes, and no shard, manifest or export
describes data it does not hold. Each records a row of docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from far_scale.cli import main
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.chaos]

SIZE = 32
PATCH = 8
PER_SHARD = 25


def _shapes(root: Path, classes=("circle", "square"), per_class: int = 20, seed: int = 0) -> Path:
    """A home-made ImageNet-layout folder: a filled shape per class at random places and sizes, in PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for c, name in enumerate(classes):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cx, cy, r = rng.integers(10, 22, 2).tolist() + [int(rng.integers(4, 9))]
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r if c % 2 == 0 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
            pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
            pixels[mask] = rng.integers(80, 255, 3)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


def _cli(argv: list, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fit(src: Path, out: Path, capsys, dim: int = 16, *extra) -> Path:
    code, _, err = _cli(
        ["data", "fit-codec", src, out, "--image-size", SIZE, "--patch-size", PATCH, "--dim", dim, *extra], capsys
    )
    assert code == 0, err
    return out


def _encode(src: Path, dst: Path, codec: Path, capsys, *extra) -> tuple[int, str, str]:
    return _cli(
        [
            "data",
            "encode",
            src,
            dst,
            "--codec",
            "pca",
            "--codec-weights",
            codec,
            "--image-size",
            SIZE,
            "--images-per-shard",
            PER_SHARD,
            "--loader-workers",
            0,
            "--quiet",
            *extra,
        ],
        capsys,
    )


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (what must not change when a run is refused)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return _shapes(tmp_path_factory.mktemp("own-images") / "images")


@pytest.fixture
def encoded(shapes, tmp_path, capsys):
    """``shapes`` encoded with its own codec into ``tmp_path/shards``."""
    codec = _fit(shapes, tmp_path / "pca.safetensors", capsys)
    code, _, err = _encode(shapes, tmp_path / "shards", codec, capsys)
    assert code == 0, err
    return tmp_path / "shards", codec


def _record(reliability, case: str, expected: str, observed: str, start: float, tmp_path: Path) -> None:
    reliability.record(
        f"own images: {case}", expected, f"{observed} ({time.monotonic() - start:.1f} s)", "none", tmp_path=tmp_path
    )


def test_encode_into_a_folder_of_another_codec_is_refused(encoded, shapes, tmp_path, capsys, reliability):
    start = time.monotonic()
    shards, _ = encoded
    before = _digest(shards)
    for dim in (16, 8):  # another codec of the same shape, and one of another token size
        other = _fit(shapes, tmp_path / f"other-{dim}.safetensors", capsys, dim, "--max-images", 10)
        code, _, err = _encode(shapes, shards, other, capsys)
        line = _one_line(err)
        assert code != 0 and str(shards) in line and "made by another codec" in line and "--overwrite" in line
        assert _digest(shards) == before
    _record(
        reliability,
        "encode into a folder of another codec's shards",
        "refused naming the folder, the mismatch and --overwrite; nothing changed",
        f"exit {code}: {line[:120]}",
        start,
        tmp_path,
    )


def test_verify_reports_a_wrong_codec_as_a_summary(encoded, shapes, tmp_path, capsys, reliability):
    """A manifest that names another codec (written by hand or by an old far-scale): verify names the first
    problems and counts the rest instead of printing one per sample."""
    start = time.monotonic()
    shards, _ = encoded
    other = _fit(shapes, tmp_path / "other.safetensors", capsys, 8)
    manifest = json.loads((shards / "manifest.json").read_text())
    code, _, _ = _cli(["data", "verify", shards, "--quiet"], capsys)
    assert code == 0
    from far_scale.codecs import load_codec

    info = load_codec("pca", str(other), SIZE).info.as_dict()
    manifest["codec"].update({k: info[k] for k in ("weights_sha256", "weights_path", "token_dim", "latent_shape")})
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = _cli(["data", "verify", shards, "--quiet"], capsys)
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert code != 0 and 1 <= len(bad) <= 5 and "made by codec weights" in bad[0]
    assert "more problem(s)" in out and len(out) < 4000, out
    _record(
        reliability,
        "verify a dataset whose manifest names another codec",
        "not OK; first 5 problems and a count",
        f"exit {code}, {len(out.splitlines())} lines",
        start,
        tmp_path,
    )


def test_reencode_after_adding_images_is_refused_and_overwrite_encodes_all(tmp_path, capsys, reliability):
    start = time.monotonic()
    src = _shapes(tmp_path / "images", per_class=20)
    codec = _fit(src, tmp_path / "pca.safetensors", capsys)
    shards = tmp_path / "shards"
    assert _encode(src, shards, codec, capsys)[0] == 0
    before = _digest(shards)
    _shapes(tmp_path / "more", per_class=20, seed=1)
    for path in (tmp_path / "more" / "train").rglob("*.png"):  # 40 new images, new names
        shutil.copy(path, src / "train" / path.parent.name / f"new_{path.name}")
    code, _, err = _encode(src, shards, codec, capsys)
    line = _one_line(err)
    assert code != 0 and "made from other images" in line and _digest(shards) == before
    code, _, err = _encode(src, shards, codec, capsys, "--overwrite")
    assert code == 0, err
    from far_scale.data.manifest import read_manifest
    from far_scale.data.shards import iter_tar_bytes

    manifest = read_manifest(str(shards))
    samples = [s for e in manifest.shards for s in iter_tar_bytes((shards / e.name).read_bytes(), e.name)]
    payloads = {hashlib.sha256(s.latents.tobytes()).hexdigest() for s in samples}
    assert manifest.num_images == len(samples) == len(payloads) == 80  # every image once, none twice
    _record(
        reliability,
        "re-encode after adding 40 images",
        "refused (other images); --overwrite encodes all 80 once",
        f"exit {code} after --overwrite, 80 distinct samples",
        start,
        tmp_path,
    )


def test_high_bit_depth_and_other_formats_are_read_by_their_real_range(tmp_path, capsys, reliability):
    from far_scale.data.images import list_images, load_image

    start = time.monotonic()
    root = tmp_path / "formats" / "train"
    for name in ("png16", "tiff", "gif", "rgba"):
        (root / name).mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 65535, SIZE), (SIZE, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(root / "png16" / "ramp.png")
    Image.fromarray(ramp).save(root / "tiff" / "ramp.tif")
    Image.fromarray((ramp >> 8).astype(np.uint8)).convert("P").save(root / "gif" / "ramp.gif")
    Image.fromarray(np.dstack([(ramp >> 8).astype(np.uint8)] * 4)).save(root / "rgba" / "ramp.png")
    images = list_images(tmp_path / "formats")
    assert len(images) == 4 and not images.skipped
    means = {p.split("/")[1]: load_image(images.root / p, SIZE).mean() for p in images.paths}
    for name, mean in means.items():  # a linear ramp from black to white has mean 127.5
        assert abs(mean - 127.5) < 3, (name, mean)
    _record(
        reliability,
        "a 16-bit PNG, a 16-bit TIFF, a GIF, an RGBA PNG",
        "read by their real range (ramp mean 127.5)",
        ", ".join(f"{k} {v:.1f}" for k, v in means.items()),
        start,
        tmp_path,
    )


def test_hidden_folders_empty_classes_and_other_files(tmp_path, capsys, reliability):
    from far_scale.data.images import list_images

    start = time.monotonic()
    src = _shapes(tmp_path / "images", per_class=3)
    (src / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((src / "train" / "circle").iterdir()), src / "train" / ".ipynb_checkpoints" / "x.png")
    (src / "train" / "circle" / ".DS_Store").write_bytes(b"\0")
    (src / "train" / "circle" / "notes.txt").write_text("not an image")
    images = list_images(src)
    assert images.classes == ["circle", "square"] and len(images) == 6
    report = images.report()
    assert report["classes"]["circle"]["skipped"]["hidden"]["count"] == 1
    assert report["classes"]["circle"]["skipped"]["unsupported format (.txt)"]["count"] == 1
    code, out, err = _cli(
        ["data", "fit-codec", src, tmp_path / "c.safetensors", "--image-size", SIZE, "--patch-size", PATCH], capsys
    )
    assert code == 0 and "circle: 3 images; skipped" in out and "notes.txt" in out
    (src / "train" / "empty").mkdir()
    code, _, err = _encode(src, tmp_path / "shards", tmp_path / "c.safetensors", capsys)
    line = _one_line(err)
    assert code != 0 and "empty" in line and "without a readable image" in line
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())
    _record(
        reliability,
        "a hidden .ipynb_checkpoints/ class, stray files, an empty class",
        "hidden and stray files skipped and reported; the empty class refused by name",
        f"exit {code}: {line[:100]}",
        start,
        tmp_path,
    )


def test_exif_orientation_is_applied(tmp_path, reliability):
    from far_scale.data.images import load_image

    start = time.monotonic()
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[:, : SIZE // 4] = 255  # a white bar on the left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "phone.jpg", SIZE).transpose(1, 2, 0)
    assert loaded[: SIZE // 4].mean() > 200 and loaded[-SIZE // 4 :].mean() < 50  # displayed: the bar on top
    _record(
        reliability,
        "a phone photo with EXIF orientation",
        "shown upright",
        "bar on top after orientation",
        start,
        tmp_path,
    )


def test_truncated_jpeg_is_one_line_or_skipped_and_recorded(tmp_path, capsys, reliability):
    start = time.monotonic()
    src = _shapes(tmp_path / "images", per_class=10)
    photo = src / "train" / "square" / "broken.jpg"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(photo, quality=90)
    photo.write_bytes(photo.read_bytes()[: len(photo.read_bytes()) // 2])
    code, _, err = _cli(
        ["data", "fit-codec", src, tmp_path / "c.safetensors", "--image-size", SIZE, "--patch-size", PATCH], capsys
    )
    line = _one_line(err)
    assert code != 0 and str(photo) in line and "--skip-unreadable" in line
    codec = _fit(src, tmp_path / "c.safetensors", capsys, 16, "--skip-unreadable")
    code, _, err = _encode(src, tmp_path / "shards", codec, capsys)
    line = _one_line(err)
    assert code != 0 and str(photo) in line and not (tmp_path / "shards" / "manifest.json").exists()
    code, out, err = _encode(src, tmp_path / "shards", codec, capsys, "--skip-unreadable")
    assert code == 0 and "broken.jpg" in out, err
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["source"]["num_images"] == 20
    skipped = manifest["source"]["report"]["classes"]["square"]["skipped"]
    assert any(
        reason.startswith("unreadable") and item["examples"] == ["train/square/broken.jpg"]
        for reason, item in skipped.items()
    )
    _record(
        reliability,
        "one truncated JPEG",
        "one line naming the file; --skip-unreadable goes on and records it",
        f"exit {code} with --skip-unreadable, recorded in the manifest",
        start,
        tmp_path,
    )


def test_codec_paths_work_from_any_directory(shapes, tmp_path, capsys, reliability, monkeypatch):
    """Encoded with a relative --codec-weights from one directory, verified from another."""
    start = time.monotonic()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _fit(shapes, Path("pca.safetensors"), capsys)
    assert _encode(shapes, Path("shards"), Path("pca.safetensors"), capsys)[0] == 0
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    assert Path(manifest["codec"]["weights_path"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(["data", "verify", work / "shards", "--quiet"], capsys)
    assert code == 0 and "OK" in out and "decoding skipped" not in out
    os.remove(work / "pca.safetensors")
    code, out, _ = _cli(["data", "verify", work / "shards", "--quiet"], capsys)
    assert code != 0 and "NOT VERIFIED" in out  # without the codec: not OK unless --no-decode
    assert _cli(["data", "verify", work / "shards", "--quiet", "--no-decode"], capsys)[0] == 0
    _record(
        reliability,
        "verify from another working directory, then without the codec",
        "absolute codec path: OK; codec gone: NOT VERIFIED unless --no-decode",
        "as expected",
        start,
        tmp_path,
    )


def _command_names(parser) -> set[str]:
    import argparse

    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names |= {name, *_command_names(sub)}
    return names


def test_every_error_hint_is_a_command_that_parses():
    """Each backticked `far-scale ...` command with arguments in the code's messages (f-string fields stand for a
    value) parses with the CLI's own parser; a bare command name (`far-scale export`) is a reference, not a hint."""
    import re

    from far_scale.cli import build_parser, parse_command

    names = _command_names(build_parser())
    hints = set()
    for path in [*(REPO_ROOT / "far_scale").rglob("*.py"), *(REPO_ROOT / "data_prep").rglob("*.py")]:
        # adjacent string literals ("...` far-scale data " "restat URL`...") are one message
        text = re.sub(r"\"\s*\n?\s*f?\"", "", path.read_text())
        # messages quote commands in single backticks; docstrings mention them in double ones (reST)
        for hint in re.findall(r"(?<!`)`(far-scale [^`]+)`(?!`)", text):
            # an f-string field or a count placeholder (N) stands for a value: "1" parses as a path and as a number
            words = ["1" if w == "N" else w for w in re.sub(r"\{[^}]*\}", "1", hint).split()[1:]]
            if all(w in names or w.startswith("--") for w in words) or any(
                w in ("COMMAND", "ARGUMENTS", "...") or "<" in w for w in words
            ):
                continue  # a command's or an option's name, or a pattern of commands
            hints.add(" ".join(words))
    assert len(hints) >= 6, hints
    for hint in sorted(hints):
        try:
            parse_command(hint.split())
        except SystemExit as exc:
            if exc.code not in (0, None):
                pytest.fail(f"the hint `far-scale {hint}` does not parse")


def _train(run_dir: Path, data: Path, *extra, check=True) -> subprocess.CompletedProcess:
    recipe = REPO_ROOT / "recipes" / "far_tiny_synth64.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "far_scale.cli",
            "train",
            recipe,
            f"data.url={data}",
            f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}",
            "data.num_workers=0",
            "data.expect.seq_len=16",
            "data.expect.num_classes=4",
            "data.expect.token_dim=8",
            "parallel.global_batch_size=8",
            "parallel.micro_batch_size_per_gpu=8",
            "eval.grid_images=0",
            "tracking.system_metrics=false",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_resume_with_another_recipe_is_refused_or_recorded(latent_dataset, tmp_path, capsys, reliability):
    start = time.monotonic()
    run = tmp_path / "runs" / "drift"
    _train(run, latent_dataset, "run.max_steps=2", "optim.lr=1e-3")
    config = (run / "config.yaml").read_text()
    refused = _train(run, latent_dataset, "run.max_steps=4", "optim.lr=3e-4", check=False)
    line = _one_line(
        refused.stderr.split("\n[")[-1]
        if "error:" not in refused.stderr
        else "\n".join(x for x in refused.stderr.splitlines() if x.startswith("error:"))
    )
    assert refused.returncode != 0 and "optim.lr: 0.001 -> 0.0003" in line and "--allow-config-change" in line
    assert (run / "config.yaml").read_text() == config  # nothing rewritten
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 2
    _train(run, latent_dataset, "run.max_steps=4", "optim.lr=3e-4", "--allow-config-change")
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[0])
    assert change["step"] == 2 and change["changes"]["optim.lr"] == {"old": 0.001, "new": 0.0003}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    mlflow_run = client.search_runs([client.get_experiment_by_name("far-scale").experiment_id])[0]
    assert "optim.lr" in mlflow_run.data.tags["far_scale.config_change.step_2"]
    assert mlflow_run.data.params["config_change.step_2.optim.lr"] == "0.001 -> 0.0003"
    assert mlflow_run.data.params["config.data.expect.token_dim"] == "8"  # not masked as a secret
    _record(
        reliability,
        "resume after changing optim.lr",
        "refused naming optim.lr; --allow-config-change records old -> new",
        line[:120],
        start,
        tmp_path,
    )
    # exports never clobber
    start = time.monotonic()
    export = tmp_path / "export"
    assert _cli(["export", run, export, "--ema-only"], capsys)[0] == 0
    assert (export / "codec").is_dir()
    before = _digest(export)
    code, _, err = _cli(["export", run, export, "--ema-only"], capsys)
    assert code != 0 and "--overwrite" in _one_line(err) and _digest(export) == before
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    code, _, err = _cli(["export", run, unrelated, "--ema-only"], capsys)
    assert (
        code != 0
        and "not an export" in _one_line(err)
        and _digest(unrelated) == {"thesis.tex": hashlib.sha256(b"precious").hexdigest()}
    )
    assert _cli(["export", run, export, "--ema-only", "--overwrite"], capsys)[0] == 0
    assert not list(tmp_path.glob(".export.*"))  # no staging folder left behind
    # the export samples on its own, from another directory, with the training data gone
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(export, moved)
    code, _, err = _cli(
        ["sample", moved, "--out", tmp_path / "samples", "--num-images", 4, "--batch-size", 4, "--no-latency"], capsys
    )
    assert code == 0, err
    _record(
        reliability,
        "export over an export / into a non-empty folder",
        "refused unless --overwrite; the export samples on its own",
        "as expected",
        start,
        tmp_path,
    )


def test_sample_from_a_run_without_a_checkpoint_says_so(tmp_path, capsys, reliability):
    start = time.monotonic()
    run = tmp_path / "runs" / "young"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run:\n  name: young\n")
    code, _, err = _cli(["sample", run, "--out", tmp_path / "out"], capsys)
    line = _one_line(err)
    assert code != 0 and "without a checkpoint yet" in line
    _record(
        reliability,
        "sample a run directory with no checkpoint yet",
        "says the run has no checkpoint yet",
        line[:120],
        start,
        tmp_path,
    )
