"""`far-scale compare`: its parser beside its handler."""

from __future__ import annotations

import argparse
from pathlib import Path


def _compare(args: argparse.Namespace) -> int:
    from far_scale.tracking.compare import COMPARE_EXPERIMENT, DEFAULT_METRICS, collect_runs, compare
    from far_scale.tracking.model_table import checkpoints_section

    metrics = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
    records = collect_runs(args.runs, args.tracking_uri, args.experiment, args.filter or "", metrics)
    log_to = None if args.no_log else (args.tracking_uri or _first_store(args.runs))
    sections = [checkpoints_section(records, args.best_by)]
    result = compare(records, args.out, metrics, log_to, COMPARE_EXPERIMENT, sections)
    print(f"{len(records)} runs; parameters that differ: {', '.join(result.params) or 'none'}\n{result.table}")
    print(f"wrote {', '.join(str(p) for p in [*result.files, *result.plots])}")
    if result.run_id:
        print(f"logged as comparison run {result.run_id} (experiment far-scale-compare) at {log_to}")
    return 0


def _first_store(runs) -> str:
    from far_scale.tracking.compare import store_uri

    return store_uri(Path(runs[0]))


def add_commands(commands) -> None:
    cmp = commands.add_parser(
        "compare",
        help="compare MLflow runs: differing params, last/best metrics with intervals, logged checkpoints, plots",
        description="Runs are run directories (their embedded mlflow.db), or run ids / names at --tracking-uri; "
        "without any, every run of --experiment matching --filter. Writes comparison.md/.csv (metrics with their 95% "
        "intervals; a best run marked only where the intervals are apart; every logged checkpoint with the best "
        "marked) and PNG plots with error bars to --out, and logs them as a run of the experiment far-scale-compare.",
    )
    cmp.add_argument("runs", nargs="*", metavar="RUN", help="run directory, run id or run name")
    cmp.add_argument("--tracking-uri", default=None, help="MLflow server or store (http://..., sqlite:///...)")
    cmp.add_argument("--experiment", default="far-scale")
    cmp.add_argument("--filter", default=None, help="MLflow search filter, e.g. \"params.`config.model.arch` = 'far'\"")
    cmp.add_argument("--metrics", default=None, help="comma-separated metric keys (default: loss and eval/*)")
    cmp.add_argument("--out", default="runs/compare", help="directory for the table and plots")
    cmp.add_argument("--no-log", action="store_true", help="do not log the comparison as an MLflow run")
    cmp.add_argument(
        "--best-by",
        default=None,
        metavar="METRIC",
        help="mark the best logged checkpoint by this metric (default: eval/fid, eval/fd or eval/accuracy, the first "
        "the checkpoints carry)",
    )
    cmp.set_defaults(handler=_compare)
