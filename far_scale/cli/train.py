"""`far-scale check-config`, `train`, `export` and `launch ...`: their parsers beside their handlers."""

from __future__ import annotations

import argparse

from far_scale.cli.common import at_least


def _check_config(args: argparse.Namespace) -> int:
    from far_scale.config.loader import load_config
    from far_scale.planning.plan import resolve_data
    from far_scale.planning.report import render_report
    from far_scale.planning.scale import ScaleAssumptions

    cfg = load_config(args.recipe, args.overrides)
    assumptions = ScaleAssumptions(args.images_per_s, args.gpus_per_node, args.network_gbps, args.storage_gbps)
    print(render_report(cfg, args.world_size, resolve_data(cfg), args.precision, assumptions))
    return 0


def _train(args: argparse.Namespace) -> int:
    from far_scale.train.run import run_training

    return run_training(args.recipe, args.overrides, args.allow_config_change)


def _export(args: argparse.Namespace) -> int:
    from far_scale.train.export import export_checkpoint

    source = args.checkpoint
    if args.best:
        from far_scale.tracking.model_table import best_logged_checkpoint

        best = best_logged_checkpoint(args.checkpoint, args.best, args.tracking_uri)
        print(f"best checkpoint of {args.checkpoint} by {args.best}: step {best.step} ({best.metrics[args.best]:.4g})")
        source = best.location
    out = export_checkpoint(
        source,
        args.out,
        include_raw=not args.ema_only,
        ema_sigma_rel=args.ema_sigma_rel,
        ema_decay=args.ema_decay,
        overwrite=args.overwrite,
    )
    print(f"exported {source} to {out}")
    if args.register:
        from far_scale.tracking.registry import register_export

        uri, run_id, experiment = _registry_of(out, args.tracking_uri)
        registered = register_export(out, args.register, uri, run_id, experiment)
        print(f"registered {out} as {registered.uri} at {uri}")
    return 0


def _registry_of(export, tracking_uri):
    """(tracking URI, training run id, experiment) for registering an export: the run's own MLflow store unless
    ``--tracking-uri`` names another (the model is then not tied to a run there)."""
    import json
    from pathlib import Path

    from far_scale.artifacts import META_FILE
    from far_scale.config.loader import load_config
    from far_scale.tracking.mlflow_tracker import default_tracking_uri

    cfg = load_config(Path(export) / "config.yaml")
    own = cfg.tracking.uri or default_tracking_uri(Path(cfg.run.output_dir) / cfg.run.name)
    uri = tracking_uri or own
    run_id = json.loads((Path(export) / META_FILE).read_text()).get("mlflow_run_id") if uri == own else None
    return uri, run_id, cfg.tracking.experiment


def _launch_local(args: argparse.Namespace) -> int:
    from far_scale.launch.local import launch_local

    return launch_local(args.recipe, args.overrides, args.nproc)


def _launch_local_sample(args: argparse.Namespace) -> int:
    from far_scale.launch.local import launch_local_sample

    return launch_local_sample(args.sample_args, args.nproc)


def _resources(args: argparse.Namespace):
    from far_scale.launch.slurm import SlurmResources

    return SlurmResources(
        nodes=getattr(args, "nodes", 1),
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
    )


def _launch_slurm(args: argparse.Namespace) -> int:
    from far_scale.launch.slurm import launch_train

    launch_train(
        args.recipe,
        args.overrides,
        _resources(args),
        grace_s=args.grace_s,
        max_restarts=args.max_restarts,
        dry_run=args.dry_run,
        rdzv_port=args.rdzv_port,
    )
    return 0


def _launch_slurm_encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from far_scale.launch.slurm import launch_encode

    launch_encode(
        args.src, args.dst, args.encode_args, args.array_size, _resources(args), Path(args.log_dir), args.dry_run
    )
    return 0


def _add_slurm_resources(parser: argparse.ArgumentParser, nodes: bool) -> None:
    if nodes:
        parser.add_argument("--nodes", type=at_least(1), default=1)
    parser.add_argument("--gpus-per-node", type=at_least(0), default=0, help="0 = CPU (one process per node)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script(s), submit nothing")


def add_launch_commands(commands) -> None:
    launch = commands.add_parser(
        "launch", help="run training (or sampling) on this machine (torchrun) or a SLURM cluster"
    )
    sub = launch.add_subparsers(dest="launch_command", required=True, metavar="TARGET")

    local = sub.add_parser("local", help="torchrun with N processes on this machine")
    local.add_argument("recipe")
    local.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    local.add_argument("--nproc", type=at_least(1), default=1)
    local.set_defaults(handler=_launch_local)

    local_sample = sub.add_parser(
        "local-sample",
        help="far-scale sample with its batches split over N local processes (torchrun)",
        description="Everything else is passed to `far-scale sample` (e.g. RUN_DIR --out DIR --num-images N).",
    )
    local_sample.add_argument("--nproc", type=at_least(1), default=1)
    local_sample.set_defaults(handler=_launch_local_sample, passthrough="sample_args")

    slurm = sub.add_parser(
        "slurm",
        help="render and submit a multi-node training job",
        description="One srun task per node starts torchrun (c10d rendezvous on the first node). The job asks "
        "for USR1 --grace-s seconds before its limit, checkpoints on it and requeues itself (at most "
        "--max-restarts times); the requeued job resumes into the same MLflow run.",
    )
    slurm.add_argument("recipe")
    slurm.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _add_slurm_resources(slurm, nodes=True)
    slurm.add_argument("--grace-s", type=int, default=300, help="seconds between the warning signal and the limit")
    slurm.add_argument("--max-restarts", type=int, default=10, help="requeue at most this many times")
    slurm.add_argument("--rdzv-port", type=int, default=29500)
    slurm.set_defaults(handler=_launch_slurm)

    encode = sub.add_parser(
        "slurm-encode",
        help="encoding as a SLURM job array + a dependent manifest/verify job",
        description="Everything after DST is passed to `far-scale data encode` (e.g. --codec "
        "pca --codec-weights W --image-size 64).",
    )
    encode.add_argument("src")
    encode.add_argument("dst")
    encode.add_argument("--array-size", type=int, required=True, help="number of encode workers (array tasks)")
    encode.add_argument("--log-dir", default="runs/slurm-encode")
    _add_slurm_resources(encode, nodes=False)
    # Every other argument (e.g. --codec pca --codec-weights W) is passed on to `far-scale data encode`.
    encode.set_defaults(handler=_launch_slurm_encode, passthrough="encode_args")


def add_check_config(commands) -> None:
    from far_scale.planning.scale import ScaleAssumptions

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
    check.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="override parallel.precision for the memory estimate and DeepSpeed config",
    )
    defaults = ScaleAssumptions()
    scale = check.add_argument_group("at scale", "assumptions for the communication, data and checkpoint lines")
    scale.add_argument(
        "--images-per-s", type=float, default=defaults.images_per_s_per_gpu, help="training images/s per GPU"
    )
    scale.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node, help="GPUs per node")
    scale.add_argument(
        "--network-gbps", type=float, default=defaults.network_gbps_per_gpu, help="inter-node Gbit/s per GPU"
    )
    scale.add_argument(
        "--storage-gbps", type=float, default=defaults.storage_gbps_per_node, help="object-storage Gbit/s per node"
    )
    check.set_defaults(handler=_check_config)


def add_train_and_export(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a recipe (run under torchrun / far-scale launch for several ranks)",
        description="Stream latent shards into DeepSpeed ZeRO training; resumes from the latest checkpoint in "
        "the run directory; logs to MLflow. SIGUSR1/SIGTERM: checkpoint after the current step, exit 75.",
    )
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a checkpoint under a recipe that differs from the one it was trained with (otherwise refused, "
        "naming the keys); the change is recorded in <run>/config_changes.jsonl and in MLflow",
    )
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="write EMA (and raw) weights as safetensors + config")
    export.add_argument("checkpoint", help="run directory, checkpoints directory or step_* directory")
    export.add_argument("out")
    export.add_argument("--ema-only", action="store_true", help="skip consolidating the raw DeepSpeed weights")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUT (otherwise a non-empty OUT is refused)"
    )
    export.add_argument(
        "--best",
        metavar="METRIC",
        default=None,
        help="export the run's best logged checkpoint by METRIC (e.g. eval/fd) instead of its latest",
    )
    export.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="also log the export as a new version of the registered model NAME (load it with models:/NAME/VERSION)",
    )
    export.add_argument(
        "--tracking-uri", default=None, help="MLflow store of --best and --register (default: the run's own)"
    )
    length = export.add_mutually_exclusive_group()
    length.add_argument(
        "--ema-sigma-rel",
        type=float,
        help="reconstruct the EMA of this relative width from the post-hoc snapshots (runs with ema.posthoc.enabled)",
    )
    length.add_argument(
        "--ema-decay", type=float, help="as --ema-sigma-rel, for the width a classic EMA of this decay has at the step"
    )
    export.set_defaults(handler=_export)
