"""Checkpoints as MLflow logged models (MLflow 3's ``LoggedModel``): one per saved checkpoint of a run.

Each is an *external* model (``mlflow.model.isExternal``): its weights stay where the checkpoint is (a local path
or an ``s3://`` URL, recorded as the tag ``far_scale.checkpoint``); MLflow holds only a stub ``MLmodel`` file, never
the checkpoint's bytes. It carries the step, the checkpoint's digest (sha256 of its ``files.json``), the model's
derived numbers as params, and the evaluation metrics measured on it (metrics logged with its ``model_id``). Its
name is ``<run name>-step<step>``: recording it again (a re-save, a resumed run catching up) finds it instead of
adding a second. A pruned checkpoint's model is kept, tagged ``far_scale.checkpoint_pruned``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

MODEL_TYPE = "far-scale checkpoint"
STEP_TAG = "far_scale.step"
LOCATION_TAG = "far_scale.checkpoint"
DIGEST_TAG = "far_scale.checkpoint_sha256"
PRUNED_TAG = "far_scale.checkpoint_pruned"
RUN_DIR_TAG = "far_scale.run_dir"


def model_name(run_name: str, step: int) -> str:
    return f"{run_name}-step{step:08d}"


@dataclass(frozen=True)
class CheckpointRecord:
    """What a saved checkpoint tells MLflow."""

    step: int
    location: str
    digest: str
    params: dict[str, str]
    run_dir: str = ""

    def tags(self) -> dict[str, str]:
        return {
            STEP_TAG: str(self.step),
            LOCATION_TAG: self.location,
            DIGEST_TAG: self.digest,
            RUN_DIR_TAG: self.run_dir,
        }


def find_model(client, experiment_id: str, run_id: str, name: str):
    """The run's logged model called ``name``, or None."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'", max_results=1
    )
    return found[0] if found else None


def ensure_model(client, experiment_id: str, run_id: str, run_name: str, record: CheckpointRecord) -> str:
    """The logged model of ``record`` (created as an external model, or the existing one); returns its id."""
    name = model_name(run_name, record.step)
    existing = find_model(client, experiment_id, run_id, name)
    if existing is not None:
        client.set_logged_model_tags(existing.model_id, {**record.tags(), PRUNED_TAG: "false"})
        return existing.model_id
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        tags={**record.tags(), PRUNED_TAG: "false", MLFLOW_MODEL_IS_EXTERNAL: "true"},
        params=record.params,
        model_type=MODEL_TYPE,
    )
    # The registry needs an MLmodel file; the weights are the checkpoint's, outside MLflow.
    with tempfile.TemporaryDirectory() as tmp:
        get_external_mlflow_model_spec(model).save(f"{tmp}/{MLMODEL_FILE_NAME}")
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def run_models(client, experiment_id: str, run_id: str) -> dict[int, str]:
    """Step -> model id of every checkpoint model of the run."""
    found, token = {}, None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'", page_token=token
        )
        found.update({int(m.tags[STEP_TAG]): m.model_id for m in page if STEP_TAG in (m.tags or {})})
        token = page.token
        if not token:
            return found


def mark_pruned(client, experiment_id: str, run_id: str, run_name: str, step: int) -> None:
    model = find_model(client, experiment_id, run_id, model_name(run_name, step))
    if model is not None:
        client.set_logged_model_tags(model.model_id, {PRUNED_TAG: "true"})


@dataclass(frozen=True)
class CheckpointModel:
    """A logged checkpoint as ``compare`` and ``export --best`` see it."""

    model_id: str
    run_id: str
    run_name: str
    step: int
    location: str
    pruned: bool
    metrics: dict[str, float]

    @classmethod
    def of(cls, model, run_name: str) -> "CheckpointModel":
        tags = model.tags or {}
        metrics = {m.key: m.value for m in (model.metrics or [])}
        return cls(
            model.model_id,
            model.source_run_id,
            run_name,
            int(tags.get(STEP_TAG, -1)),
            tags.get(LOCATION_TAG, ""),
            tags.get(PRUNED_TAG) == "true",
            metrics,
        )


def checkpoint_models(
    client, experiment_ids: Sequence[str], run_names: dict[str, str], order_by: Optional[str] = None
) -> list[CheckpointModel]:
    """The logged checkpoints of the runs ``run_names`` (run id -> name), ordered by metric ``order_by`` (ascending
    unless it is a higher-is-better metric) or by run and step."""
    from far_scale.tracking.compare import higher_is_better

    order: list[dict[str, Any]] = []
    if order_by:
        order = [{"field_name": f"metrics.{order_by}", "ascending": not higher_is_better(order_by)}]
    found, token = [], None
    while True:
        page = client.search_logged_models(
            experiment_ids=list(experiment_ids),
            order_by=order or None,
            page_token=token,
        )
        found += [m for m in page if m.source_run_id in run_names]
        token = page.token
        if not token:
            break
    models = [CheckpointModel.of(m, run_names[m.source_run_id]) for m in found if STEP_TAG in (m.tags or {})]
    return models if order_by else sorted(models, key=lambda m: (m.run_name, m.step))
