"""MLflow tracking from rank 0: params, batched metrics, artifacts, images; survives outages.

System metrics (one monitor per node) are ``far_scale.tracking.system_metrics``.

The default store is embedded (sqlite + an artifact folder under the run directory), so
nothing must be started. With an ``http(s)://`` server, an unreachable server never stops
training: metrics are buffered (bounded) and sent once it answers; what could not be kept
is counted and reported.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from far_scale.secrets import MASK, is_secret_name
from far_scale.tracking.logged_models import CheckpointRecord, ensure_model, mark_pruned, run_models
from far_scale.tracking.system_metrics import is_server, server_answers

log = logging.getLogger("far_scale.tracking")

MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
MAX_BUFFERED_METRICS = 200_000
RETRY_INTERVAL_S = 30.0
CLOSE_FIRST_WAIT_S = 1.0  # close() retries after 1, 2, 4, ... s (at most RETRY_INTERVAL_S)
MAX_PARAM_LENGTH = 500
# MLflow 3 opens experiments by kind; without this tag its UI shows far-scale's runs in the GenAI view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the values of secret names masked (``far_scale.secrets``: whole words at the end of a name,
    so ``token_dim`` stays)."""
    return {k: (MASK if is_secret_name(k) else v) for k, v in params.items()}


CONTINUED_TAG = "far_scale.continues_run"


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class Tracker:
    """Rank 0's MLflow run. Every method is a no-op when tracking is disabled."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        artifact_dir: Path,
        run_id: Optional[str] = None,
        enabled: bool = True,
        final_flush_timeout_s: float = 0.0,
        unsent_path: Optional[Path] = None,
    ):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.artifact_dir = artifact_dir
        self.final_flush_timeout_s, self.unsent_path = final_flush_timeout_s, unsent_path
        self.enabled = enabled
        self.run_id = run_id
        self._client = None
        self._buffer: list = []
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._pending_artifacts: list[tuple[str, Optional[str]]] = []
        self._pending_images: list[tuple[Any, str, int]] = []
        self._pending_checkpoints: dict[int, CheckpointRecord] = {}
        self._pending_pruned: set[int] = set()
        self._stored_steps: Optional[set[int]] = None
        self._pending_inputs: list = []
        self.model_ids: dict[int, str] = {}
        """Logged-model id of each checkpoint step recorded so far: evaluation metrics of that step link to it."""
        self.experiment_id: Optional[str] = None
        self.continued_from: Optional[str] = None
        """The run id a resumed checkpoint named when that run is not in this store (a new run continues it)."""
        self.dropped_metrics = 0
        self._next_attempt = 0.0
        self._warned = False
        if enabled:
            self._connect()

    @property
    def online(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _connect(self) -> bool:
        if self.online:
            return True
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + RETRY_INTERVAL_S
        if not server_answers(self.uri):
            if not self._warned:
                log.warning(
                    "MLflow at %s is unreachable: training continues, metrics are buffered "
                    "(up to %d) and sent when it answers",
                    self.uri,
                    MAX_BUFFERED_METRICS,
                )
                self._warned = True
            return False
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                location = (
                    self.artifact_dir.resolve().as_uri()
                    if "://" not in self.uri or self.uri.startswith("sqlite")
                    else None
                )
                experiment_id = client.create_experiment(
                    self.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            else:
                experiment_id = experiment.experiment_id
                if EXPERIMENT_KIND_TAG not in experiment.tags:
                    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            self.experiment_id = experiment_id
            if self.run_id is not None and not _run_exists(client, self.run_id):
                # A checkpoint resumed with another store (a new disk took the run's sqlite store along): a new
                # run, which says where it continues from.
                log.warning("MLflow run %s is not in %s: continuing in a new run", self.run_id, self.uri)
                self.continued_from, self.run_id = self.run_id, None
            if self.run_id is None:
                tags = {CONTINUED_TAG: self.continued_from} if self.continued_from else None
                self.run_id = client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            else:
                client.update_run(self.run_id, status="RUNNING")
            self._client = client
            if self._warned:
                log.warning("MLflow at %s answers again; sending buffered data", self.uri)
            return True
        except Exception as exc:  # network errors, server errors: never fatal to training
            log.warning("MLflow at %s failed (%s); will retry", self.uri, exc)
            self._warned = True
            return False

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._pending_params.update({k: str(v)[:MAX_PARAM_LENGTH] for k, v in redact(flatten(params)).items()})
            self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._pending_tags.update({k: str(v) for k, v in tags.items()})
            self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int, of_checkpoint: bool = False) -> None:
        """Buffer ``metrics`` at ``step``; ``of_checkpoint``: they were measured on the checkpoint saved at ``step``
        (evaluation), so they are also linked to its logged model."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            if len(self._buffer) >= MAX_BUFFERED_METRICS:
                self._buffer.pop(0)
                self.dropped_metrics += 1
            metric = Metric(key, float(value), timestamp, step)
            metric.far_scale_checkpoint = of_checkpoint  # resolved to the model's id when sent
            self._buffer.append(metric)

    def record_checkpoint(self, record: CheckpointRecord, pruned_steps: Sequence[int] = ()) -> None:
        """A saved checkpoint as a logged model of the run (sent now, or when the server answers), and the
        checkpoints pruned to make room for it marked as such."""
        if self.enabled:
            self._pending_checkpoints[record.step] = record
            self._pending_pruned.update(pruned_steps)
            self.flush()

    def record_stored(self, records: Sequence[CheckpointRecord]) -> None:
        """Every checkpoint the run holds (a resume): each a logged model (existing ones found, not duplicated),
        and the run's other checkpoint models marked pruned (their pruning was not recorded before a kill)."""
        if self.enabled:
            for record in records:
                self._pending_checkpoints[record.step] = record
            self._stored_steps = {record.step for record in records}
            self.flush()

    def log_input(self, dataset, tags: dict[str, str]) -> None:
        """The run's training data (an ``mlflow.entities.Dataset``), once."""
        if self.enabled:
            self._pending_inputs.append((dataset, tags))
            self.flush()

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._pending_artifacts.append((str(path), artifact_path))
            self.flush()

    def log_image(self, image, key: str, step: int) -> None:
        """An image (uint8 HWC array) under ``key`` at ``step``: the UI's image view shows a step slider."""
        if self.enabled:
            self._pending_images.append((image, key, step))
            self.flush()

    def flush(self) -> None:
        """Send what is buffered; on failure keep it for the next call."""
        if not self.enabled or not self._connect():
            return
        try:
            from mlflow.entities import Param, RunTag

            if self._pending_params:
                existing = self._client.get_run(self.run_id).data.params
                params = [Param(k, v) for k, v in self._pending_params.items() if k not in existing]
                for start in range(0, len(params), 100):
                    self._client.log_batch(self.run_id, params=params[start : start + 100])
                self._pending_params.clear()
            if self._pending_tags:
                self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._pending_tags.items()])
                self._pending_tags.clear()
            self._send_models()
            while self._buffer:
                chunk = self._buffer[:MAX_BATCH_METRICS]
                self._client.log_batch(self.run_id, metrics=[self._linked(m) for m in chunk])
                del self._buffer[: len(chunk)]
            while self._pending_artifacts:
                path, artifact_path = self._pending_artifacts[0]
                self._client.log_artifact(self.run_id, path, artifact_path)
                self._pending_artifacts.pop(0)
            while self._pending_images:
                image, key, step = self._pending_images[0]
                self._client.log_image(self.run_id, image, key=key, step=step)
                self._pending_images.pop(0)
        except Exception as exc:
            log.warning("MLflow logging failed (%s); %d metrics kept for retry", exc, len(self._buffer))
            self._client = None if is_server(self.uri) else self._client
            self._next_attempt = time.monotonic() + RETRY_INTERVAL_S

    def _send_models(self) -> None:
        """Pending inputs, checkpoint models and pruned marks (each removed from the queue once sent)."""
        from mlflow.entities import DatasetInput, InputTag

        while self._pending_inputs:
            dataset, tags = self._pending_inputs[0]
            known = {d.dataset.digest for d in self._client.get_run(self.run_id).inputs.dataset_inputs}
            if dataset.digest not in known:
                inputs = [DatasetInput(dataset, [InputTag(k, v) for k, v in tags.items()])]
                self._client.log_inputs(self.run_id, datasets=inputs)
            self._pending_inputs.pop(0)
        for step in sorted(self._pending_checkpoints):
            record = self._pending_checkpoints[step]
            self.model_ids[step] = ensure_model(self._client, self.experiment_id, self.run_id, self.run_name, record)
            del self._pending_checkpoints[step]
        if self._stored_steps is not None:
            known = run_models(self._client, self.experiment_id, self.run_id)
            self._pending_pruned.update(step for step in known if step not in self._stored_steps)
            self._stored_steps = None
        for step in sorted(self._pending_pruned):
            mark_pruned(self._client, self.experiment_id, self.run_id, self.run_name, step)
            self._pending_pruned.discard(step)

    def _linked(self, metric):
        """``metric`` with the id of the logged model it was measured on, if it was and that model exists."""
        from mlflow.entities import Metric

        model_id = self.model_ids.get(metric.step) if getattr(metric, "far_scale_checkpoint", False) else None
        if model_id is None:
            return metric
        return Metric(metric.key, metric.value, metric.timestamp, metric.step, model_id=model_id, run_id=self.run_id)

    def _pending(self) -> bool:
        return bool(
            self._buffer
            or self._pending_params
            or self._pending_tags
            or self._pending_artifacts
            or self._pending_images
            or self._pending_checkpoints
            or self._pending_pruned
            or self._pending_inputs
            or self._stored_steps is not None
        )

    def close(self, status: str = "FINISHED", wait: bool = True) -> None:
        """Send everything, waiting up to ``final_flush_timeout_s`` for an unreachable server (not with
        ``wait=False``: a preempted job has seconds left); what still cannot be sent is written to
        ``unsent_path`` (one JSON metric per line), never silently dropped."""
        if not self.enabled:
            return
        # Only a server can come back; a local store that fails once fails again.
        waits = wait and is_server(self.uri)
        deadline = time.monotonic() + (self.final_flush_timeout_s if waits else 0.0)
        wait_s = CLOSE_FIRST_WAIT_S
        while True:
            self._next_attempt = 0.0  # attempt now, whatever the retry timer says
            self.flush()
            if not self._pending() or time.monotonic() + wait_s > deadline:
                break
            log.warning(
                "MLflow at %s: %d metrics not sent yet; retrying for up to %.0f s more",
                self.uri,
                len(self._buffer),
                deadline - time.monotonic(),
            )
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, RETRY_INTERVAL_S)
        if self.online:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as exc:
                log.warning("could not close MLflow run %s: %s", self.run_id, exc)
        if self._buffer and self.unsent_path is not None:
            with open(self.unsent_path, "a") as handle:
                for metric in self._buffer:
                    handle.write(
                        json.dumps(
                            {
                                "run_id": self.run_id,
                                "key": metric.key,
                                "value": metric.value,
                                "timestamp": metric.timestamp,
                                "step": metric.step,
                            }
                        )
                        + "\n"
                    )
            log.warning(
                "MLflow at %s never answered: %d metrics written to %s", self.uri, len(self._buffer), self.unsent_path
            )
        elif self._buffer or self.dropped_metrics:
            log.warning(
                "MLflow: %d metrics never reached %s and %d were dropped from a full buffer",
                len(self._buffer),
                self.uri,
                self.dropped_metrics,
            )
