"""`far-scale sample` and `far-scale eval ...`: their parsers beside their handlers."""

from __future__ import annotations

import argparse
from pathlib import Path

SAMPLING_SHORTHANDS = ("num_iter", "head_steps", "cfg_scale", "temperature")  # --num-iter N = eval.num_iter=N


def _sample(args: argparse.Namespace) -> int:
    from far_scale.eval.sample_job import SampleRequest, run_sampling

    # The flags are shorthands for eval.* overrides (the one way sampling settings come in); explicit
    # eval.KEY=VALUE arguments after them win.
    shorthands = [f"eval.{key}={getattr(args, key)}" for key in SAMPLING_SHORTHANDS if getattr(args, key) is not None]
    report = run_sampling(
        SampleRequest(
            args.source,
            args.out,
            args.num_images,
            args.batch_size,
            args.seed,
            args.device,
            args.precision,
            args.raw_weights,
            args.grid_images,
            not args.no_latency,
            (*shorthands, *args.overrides),
            args.tracking_uri,
        )
    )
    if report:
        speed = f"{report['images_per_s']:.3f} images/s" if report["images_per_s"] else "all batches reused"
        latency = (
            f", {report['seconds_per_image_batch1']:.3f} s per image at batch 1"
            if "seconds_per_image_batch1" in report
            else ""
        )
        print(
            f"wrote {report['samples']} ({report['num_images']} images; {report['sampled_now']} sampled now on "
            f"{report['world_size']} rank(s), {speed}{latency}); grid {report['grid']}"
        )
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    import json

    from far_scale.eval.fid import build_inception_scorer, fid_of_source

    scorer = build_inception_scorer(
        args.inception, args.ref, args.device, args.batch_size, args.inception_sha256 or None
    )
    metrics, count = fid_of_source(args.samples, scorer, args.batch_size, args.image_size)
    print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({count} images vs {args.ref})")
    if args.json:
        Path(args.json).write_text(json.dumps({"num_images": count, **metrics}, indent=2))
    return 0


def _eval_ref_stats(args: argparse.Namespace) -> int:
    from far_scale.eval.fid import write_reference_stats

    path, count = write_reference_stats(
        args.source,
        args.out,
        args.inception,
        args.image_size,
        args.max_images,
        args.keep_features,
        args.device,
        args.batch_size,
        args.inception_sha256 or None,
        args.codec_weights,
    )
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
    result = run_sweep(
        args.source,
        sweep_points(
            ints(args.num_iter),
            ints(args.head_steps),
            floats,
            [float(v) for v in args.ema_sigma_rel.split(",")] if args.ema_sigma_rel else [None],
        ),
        scorer,
        args.out,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        tracking_uri=args.tracking_uri,
    )
    print(
        f"{result.created} points evaluated, {result.reused} already logged; plots: "
        + ", ".join(str(p) for p in result.plots)
    )
    return 0


def _benchmark_settings(args: argparse.Namespace):
    from dataclasses import replace

    from far_scale.eval.offline import BenchmarkSettings

    settings = BenchmarkSettings.for_folder(args.images, args.image_size, epochs=args.epochs, seed=args.seed)
    return replace(settings, holdout_fraction=args.holdout_fraction, split_seed=args.seed)


def _eval_offline_setup(args: argparse.Namespace) -> int:
    from far_scale.eval.offline import build_benchmark, format_rows

    path, bench, reused = build_benchmark(
        args.images, args.cache_dir, args.data, _benchmark_settings(args), args.codec_weights
    )
    if args.out:
        from far_scale.data.storage import write_atomic

        write_atomic(Path(args.out), path.read_bytes())
        path = Path(args.out)
    print(
        f"{'reused' if reused else 'wrote'} {path}: classifier of {bench.meta['num_classes']} classes, "
        f"train accuracy {bench.meta['train_accuracy']:.3f}, held-out accuracy {bench.meta['holdout_accuracy']:.3f}; "
        f"reference set {bench.meta['num_reference']} images\ncalibration:\n{format_rows(bench.calibration)}\n"
        f"{bench.verdict.line()}"
    )
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
        Path(args.json).write_text(
            json.dumps(
                {
                    "samples": row.as_dict(),
                    "verdict": bench.meta["verdict"],
                    "calibration": [r.as_dict() for r in bench.calibration],
                },
                indent=2,
            )
        )
    return 0


def add_commands(commands) -> None:
    from far_scale.eval.inception import WEIGHTS_FILE

    ev = commands.add_parser(
        "eval",
        help="quality of sample sets: FID/IS, reference statistics, offline benchmark, sampling sweeps",
        description="See docs/evaluation.md.",
    )
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    def inception_args(parser):
        parser.add_argument("--inception", required=True, help=f"local Inception weights ({WEIGHTS_FILE})")
        parser.add_argument(
            "--inception-sha256",
            default=None,
            help="expected sha256 (or prefix) of the weights; default: the published one",
        )
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

    sweep = sub.add_parser(
        "sweep",
        help="quality and images/s over K x head steps x CFG, each point an MLflow child "
        "run of the training run (re-runs skip logged points)",
    )
    sweep.add_argument("source", help="run directory (its latest checkpoint) or export directory")
    sweep.add_argument("--num-iter", default="16,32,64", help="K values")
    sweep.add_argument("--head-steps", default="1,2,4,8", help="O for FAR, DDPM steps for MAR (e.g. 25,50,100)")
    sweep.add_argument("--cfg-scale", default="1,2,3")
    sweep.add_argument(
        "--ema-sigma-rel",
        default=None,
        help="EMA lengths to compare, e.g. 0.02,0.05,0.1,0.2: each reconstructed from the run's post-hoc snapshots "
        "(ema.posthoc) and scored at every sampling point",
    )
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

    setup = sub.add_parser(
        "offline-setup",
        help="train the offline benchmark's classifier and autoencoder and calibrate them (cached by a checksum of "
        "data and settings)",
    )
    setup.add_argument("images", help="the real image folder (ImageNet layout), e.g. from far-scale data synth")
    setup.add_argument(
        "--data", default=None, help="latent dataset URL: its codec calibrates reconstructions and random-latent images"
    )
    setup.add_argument("--cache-dir", default="runs/eval-cache")
    setup.add_argument(
        "--out", default=None, help="also write the benchmark file here (a stable path for recipes and scripts)"
    )
    setup.add_argument("--codec-weights", default=None)
    setup.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="classifier input size (default: the dataset card's resolution, else 64)",
    )
    setup.add_argument("--epochs", type=int, default=15)
    setup.add_argument("--holdout-fraction", type=float, default=0.3)
    setup.add_argument("--seed", type=int, default=0)
    setup.set_defaults(handler=_eval_offline_setup)

    offline = sub.add_parser(
        "offline",
        help="class accuracy, Fréchet distance and precision/recall of samples "
        "on the offline benchmark, with its calibration",
    )
    offline.add_argument("samples", help="samples .npz (far-scale sample)")
    offline.add_argument("--bench", required=True, help="benchmark file printed by `far-scale eval offline-setup`")
    offline.add_argument("--json", default=None)
    offline.set_defaults(handler=_eval_offline)


def add_sample(commands) -> None:
    sample = commands.add_parser(
        "sample",
        help="sample a class-balanced image set (.npz + PNG grid) from an export or a run directory",
        description="Image i has class i mod C and a seed from (--seed, i): the same images on any number of "
        "ranks (run it under torchrun / far-scale launch to split the batches). Finished batches are kept "
        "under OUT/parts, so a re-run after a kill samples only what is missing. EMA weights by default.",
    )
    sample.add_argument(
        "source",
        help="export directory (far-scale export), run / checkpoints directory, or a registered model "
        "models:/NAME/VERSION (far-scale export --register)",
    )
    sample.add_argument(
        "--tracking-uri", default=None, help="the registry of a models:/ source (default: MLFLOW_TRACKING_URI)"
    )
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
    sample.add_argument(
        "overrides",
        nargs="*",
        metavar="eval.KEY=VALUE",
        help="sampling settings of the recipe's eval section, e.g. eval.backbone_refresh_share=0.25 "
        "eval.guidance_refresh_share=0.25 eval.head_steps_end=1 (see docs/sampling.md)",
    )
    sample.set_defaults(handler=_sample)
