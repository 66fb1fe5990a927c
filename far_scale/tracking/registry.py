"""Exports in MLflow's model registry: ``far-scale export ... --register NAME`` and ``models:/NAME/VERSION`` back.

A registered far-scale model is an MLflow ``pyfunc`` model whose artifacts are an export folder (EMA and raw
weights, config, ``meta.json`` with the data's shape, normalization and the codec's record) without the codec's
weights: those are referenced by path and checksum (``codec.weights_path`` / ``weights_sha256``), checked when the
model loads, and a missing codec is an error naming it. ``mlflow.pyfunc.load_model("models:/NAME/1").predict``
takes class labels and per-image seeds (and optional sampling settings as params) and returns uint8 images, the
same bytes ``far-scale sample`` of the export draws for those labels and seeds. Logged with ``MlflowClient`` only:
no process-wide tracking URI is set. Imports mlflow at import time: import this module only where it is used.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import numpy as np

from far_scale.artifacts import CODEC_DIR, META_FILE
from far_scale.errors import ActionableError

EXPORT_ARTIFACT = "export"
MODEL_TYPE = "far-scale export"
REGISTRY_SCHEME = "models:/"
SAMPLING_PARAMS = ("num_iter", "head_steps", "cfg_scale", "cfg_schedule", "temperature")
"""``predict(params=...)``: the ``eval.*`` settings a caller may change per call."""


class RegistryError(ActionableError, ValueError):
    """A registered model that cannot be used here (no tracking URI, a missing codec); names it and the fix."""


def _registered_export(export: Path, staging: Path) -> Path:
    """A copy of ``export`` for the registry: the codec's weights left out, its record pointing at the original."""
    target = staging / EXPORT_ARTIFACT
    shutil.copytree(export, target, ignore=shutil.ignore_patterns(CODEC_DIR))
    meta = json.loads((target / META_FILE).read_text())
    codec = meta["data"]["codec"]
    codec["weights_path"] = codec.pop("source_weights_path", codec["weights_path"])
    (target / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return target


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    model_id: str

    @property
    def uri(self) -> str:
        return f"{REGISTRY_SCHEME}{self.name}/{self.version}"


def register_export(export: Path, name: str, tracking_uri: str, run_id: Optional[str], experiment: str) -> Registered:
    """Log ``export`` as a pyfunc model (of the training run ``run_id`` when it is at ``tracking_uri``) and register
    it as a new version of ``name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    with tempfile.TemporaryDirectory() as tmp:
        staged = _registered_export(Path(export), Path(tmp) / "staging")
        model_dir = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(model_dir),
            python_model=FarScaleModel(),
            artifacts={EXPORT_ARTIFACT: str(staged)},
            pip_requirements=["far-scale"],
        )
        model = client.create_logged_model(
            experiment_id,
            name=name,
            source_run_id=run_id,
            model_type=MODEL_TYPE,
            tags={"far_scale.export": str(export)},
        )
        client.log_model_artifacts(model.model_id, str(model_dir))
    client.finalize_logged_model(model.model_id, "READY")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    # The version's source is the model's artifact location (a models:/<id> source would be resolved through the
    # process-wide tracking URI, not this client's).
    version = client.create_model_version(
        name, source=client.get_logged_model(model.model_id).artifact_location, run_id=run_id, model_id=model.model_id
    )
    return Registered(name, str(version.version), model.model_id)


def download_export(uri: str, tracking_uri: Optional[str], cache: Path) -> Path:
    """The export folder of the registered model ``uri`` (``models:/NAME/VERSION``), downloaded under ``cache``."""
    import mlflow.artifacts

    if not tracking_uri:
        raise RegistryError(
            f"{uri} is a registered model: name the registry with --tracking-uri (or MLFLOW_TRACKING_URI)"
        )
    from mlflow.tracking import MlflowClient

    name, _, version = uri[len(REGISTRY_SCHEME) :].partition("/")
    if not name or not version:
        raise RegistryError(f"{uri} is not a registered model version: expected models:/NAME/VERSION")
    target = cache / f"{name}-{version}"
    found = sorted(target.rglob(f"{EXPORT_ARTIFACT}/{META_FILE}")) if target.is_dir() else []
    if not found:
        # The version's source through this registry (download_artifacts would ask the process-wide one).
        source = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version(name, version)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=source.source, dst_path=str(target), tracking_uri=tracking_uri)
        found = sorted(target.rglob(f"{EXPORT_ARTIFACT}/{META_FILE}"))
    if not found:
        raise RegistryError(f"{uri} holds no far-scale export (no {EXPORT_ARTIFACT}/{META_FILE} in its artifacts)")
    return found[0].parent


class FarScaleModel(mlflow.pyfunc.PythonModel):
    """An export as a pyfunc model: ``predict({"class_label": [...], "seed": [...]}, params)`` -> uint8 images
    ``[N, H, W, 3]``."""

    def load_context(self, context) -> None:
        from far_scale.codecs import CodecError

        self.export = Path(context.artifacts[EXPORT_ARTIFACT])
        try:
            self.generator = _generator(self.export, ())
        except CodecError as exc:
            codec = json.loads((self.export / META_FILE).read_text())["data"]["codec"]
            raise RegistryError(
                f"this registered far-scale model needs its codec {codec['name']} (weights sha256 "
                f"{codec['weights_sha256']}) at {codec['weights_path']}: {exc}"
            ) from None

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        labels, seeds = _inputs(model_input)
        generator = self.generator
        if params:
            overrides = tuple(f"eval.{k}={v}" for k, v in params.items() if k in SAMPLING_PARAMS and v is not None)
            generator = _generator(self.export, overrides) if overrides else generator
        return generator.images_for(labels, seeds).images


def _generator(export: Path, overrides: tuple[str, ...]):
    import torch

    from far_scale.eval.sample_job import build_generator, load_sampling_model

    device = torch.device("cpu")
    return build_generator(load_sampling_model(export, device=device, overrides=overrides), device)


def _inputs(model_input: Any) -> tuple[np.ndarray, list[int]]:
    """(labels, seeds) from a DataFrame or mapping with ``class_label`` and ``seed`` columns."""
    try:
        labels = np.asarray(model_input["class_label"], dtype=np.int64)
        seeds = [int(s) for s in np.asarray(model_input["seed"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(
            f"predict takes columns class_label and seed (one image each), got {type(model_input).__name__}: {exc}"
        ) from None
    if len(labels) != len(seeds):
        raise RegistryError(f"predict got {len(labels)} class labels and {len(seeds)} seeds: one of each per image")
    return labels, seeds
