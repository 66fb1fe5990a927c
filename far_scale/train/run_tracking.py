"""What a training run tells MLflow, behind one small interface: rank 0's run, every node's system metrics.

Every rank holds a ``RunTracking``; only rank 0's has an MLflow run (``Tracker``), so the trainer calls it
unconditionally and the other ranks' calls do nothing. System metrics come from each node's local rank 0
into rank 0's run, restarted after a tracking-server outage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from far_scale.config.schema import Config
from far_scale.distributed.runtime import DistEnv, all_gather_objects
from far_scale.tracking.logged_models import CheckpointRecord
from far_scale.tracking.mlflow_tracker import Tracker, default_tracking_uri
from far_scale.tracking.system_metrics import NodeSystemMetrics, start_node_metrics

UNSENT_METRICS_FILE = "mlflow_unsent.jsonl"  # metrics an unreachable tracking server never received
ENTRY_POINT = "far-scale train"


def source_tags() -> dict[str, str]:
    """MLflow's source columns: the entry point, and the git commit of the far-scale checkout that runs it (when it
    is one)."""
    import subprocess

    tags = {"mlflow.source.name": ENTRY_POINT, "mlflow.source.type": "LOCAL"}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed wheel): no commit to record
    return tags


class RunTracking:
    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.uri = cfg.tracking.uri or default_tracking_uri(run_dir)
        self.tracker: Optional[Tracker] = None
        self.node_metrics: Optional[NodeSystemMetrics] = None

    @property
    def run_id(self) -> Optional[str]:
        return self.tracker.run_id if self.tracker is not None else None

    def start(self, run_id: Optional[str], params: dict[str, Any], config_file: Path) -> None:
        """Collective: rank 0 opens (or, with ``run_id``, continues) the run; nodes start their system metrics."""
        tracking = self.cfg.tracking
        if self.env.is_main:
            self.tracker = Tracker(
                self.uri,
                tracking.experiment,
                tracking.run_name or self.cfg.run.name,
                self.run_dir / "mlartifacts",
                run_id=run_id,
                enabled=tracking.enabled,
                final_flush_timeout_s=tracking.final_flush_timeout_s,
                unsent_path=self.run_dir / UNSENT_METRICS_FILE,
            )
            if run_id is None or self.tracker.continued_from:
                self.tracker.log_params(params)
                self.tracker.log_artifact(config_file)
            self.tracker.set_tags(
                {"run_dir": str(self.run_dir.resolve()), "world_size": self.env.world_size, **source_tags()}
            )
        shared_id = all_gather_objects(self.run_id)[0]
        if self.env.local_rank == 0 and tracking.enabled and tracking.system_metrics:
            self.node_metrics = start_node_metrics(self.uri, shared_id, tracking.system_metrics_interval_s)

    def keep_alive(self) -> None:
        """Restart this node's monitor after a server outage; on rank 0 start it once the run exists."""
        if self.node_metrics is not None:
            self.node_metrics.ensure_running()
        elif self.env.is_main and self.tracker.run_id and self.cfg.tracking.system_metrics:
            self.node_metrics = start_node_metrics(
                self.uri, self.tracker.run_id, self.cfg.tracking.system_metrics_interval_s
            )

    def log_metrics(
        self, metrics: dict[str, float], step: int, flush: bool = False, of_checkpoint: bool = False
    ) -> None:
        """``of_checkpoint``: measured on the weights of the checkpoint saved at ``step`` (linked to its model)."""
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step, of_checkpoint)
            if flush:
                self.tracker.flush()

    def record_stored(self, stored, params: dict[str, str]) -> None:
        """Rank 0, on resume: every checkpoint the run holds (``Checkpointer.stored``) as its logged models."""
        if self.tracker is not None:
            run_dir = str(self.run_dir.resolve())
            self.tracker.record_stored(
                [CheckpointRecord(s.step, s.location, s.digest, params, run_dir) for s in stored]
            )

    def record_checkpoint(self, saved, params: dict[str, str]) -> None:
        """Rank 0: checkpoint ``saved`` (``Checkpointer.save``'s result) as a logged model of the run."""
        if self.tracker is not None:
            record = CheckpointRecord(saved.step, saved.location, saved.digest, params, str(self.run_dir.resolve()))
            self.tracker.record_checkpoint(record, saved.pruned_steps)

    def log_dataset(self, url: str, manifest) -> None:
        """Rank 0: the run's input dataset (the shard set: its name, the digest of its shards' contents, the URL as
        source)."""
        if self.tracker is not None and self.tracker.enabled:
            import json

            from mlflow.entities import Dataset

            digest = manifest.content_digest[:16]  # the same shards at another URL: the same dataset
            summary = {
                "num_images": manifest.num_images,
                "num_shards": len(manifest.shards),
                "num_classes": len(manifest.classes),
                "tokens": f"{manifest.spec.seq_len} x {manifest.spec.token_dim}",
                "codec": manifest.codec["name"],
            }
            name = url.rstrip("/").rsplit("/", 1)[-1] or url
            source_type = url.split("://", 1)[0] if "://" in url else "local"
            dataset = Dataset(name, digest, source_type, json.dumps({"uri": url}), profile=json.dumps(summary))
            self.tracker.log_input(dataset, {"mlflow.data.context": "training"})

    def log_image(self, image, key: str, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_image(image, key, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.set_tags(tags)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log_params(params)

    def close(self, status: str, wait: bool = True) -> None:
        if self.node_metrics is not None:
            self.node_metrics.finish()
        if self.tracker is not None:
            self.tracker.close(status, wait=wait)


def checkpoint_params(cfg: Config, plan) -> dict[str, str]:
    """What a checkpoint's logged model carries as params: the architecture and the derived sizes."""
    dims = plan.dims
    params = {
        "arch": cfg.model.arch,
        "size": cfg.model.size,
        "backbone": f"{dims.encoder_depth}+{dims.decoder_depth} x {dims.width}",
        "head": f"{dims.head_kind} {dims.head_depth} x {dims.head_width}",
    }
    return {**params, **{f"parameters.{k}": str(v) for k, v in plan.parameters.items()}}
