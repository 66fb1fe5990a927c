"""The file layout of run, checkpoint and export folders, defined once: train writes it, eval reads it.

A run directory holds ``config.yaml`` and ``checkpoints/`` (``latest.json`` naming one ``step_*`` folder).
A checkpoint folder and an export folder (``far-scale export``) share the files read without unpickling:
``config.yaml`` (the resolved recipe), ``meta.json`` (``RunMeta``: step, world size, MLflow run id, the data's
shape, scale and codec) and ``ema.safetensors``; an export adds the raw weights ``model.safetensors``.
``open_weights`` finds the weights of any of these folders. A leaf module: it imports nothing of far-scale
but the error base.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from far_scale.errors import ActionableError

CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
EMA_FILE = "ema.safetensors"
RAW_FILE = "model.safetensors"  # exports only (DeepSpeed's consolidated fp32 weights)
TARGET_EMA_FILE = "target_ema.safetensors"
POSTHOC_EMA_FILE = "posthoc_ema.safetensors"  # the tracked power-function EMAs, fp32 (ema.posthoc)
CODEC_DIR = "codec"  # exports only: a copy of the codec's weights (file, or directory for sd-vae)
FILES_FILE = "files.json"  # size and sha256 of every file of the checkpoint, checked before loading
LATEST = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
UNIVERSAL_DIR = "universal"
TAG_PATTERN = re.compile(r"step_\d{8}")


class ArtifactError(ActionableError, ValueError):
    """A run, checkpoint or export folder that is missing a file or holds a malformed one; names it."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    directory: Path
    tag: str
    step: int
    world_size: int

    @property
    def path(self) -> Path:
        return self.directory / self.tag


@dataclass(frozen=True)
class DataInfo:
    """What sampling needs of the training data: the token shape, the latent scale and the codec, and how latents
    became tokens (``LatentNormalization.as_dict``; None in metas written before normalization modes: the
    global ``scale``)."""

    url: str
    seq_len: int
    token_dim: int
    num_classes: int
    scale: float
    codec: dict
    normalization: Optional[dict] = None
    content_digest: Optional[str] = None
    """``Manifest.content_digest`` of the data (None in metas written before it): a resume may read the same
    shards from another ``data.url``."""


def codec_weights_path(codec: dict, folder: Path) -> Path:
    """Where a meta record's codec weights are: a relative path (an export's ``codec/`` copy, or a manifest written
    with a relative path) is taken relative to ``folder`` when it exists there, else as given."""
    path = Path(codec["weights_path"])
    if not path.is_absolute() and (folder / path).exists():
        return folder / path
    return path


@dataclass(frozen=True)
class RunMeta:
    """``meta.json`` of a checkpoint or an export."""

    step: int
    world_size: int
    mlflow_run_id: Optional[str]
    data: DataInfo

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "RunMeta":
        """Validate a parsed ``meta.json``; ``ArtifactError`` names ``where`` and every bad field."""
        fields = {"step": int, "world_size": int, "data": dict}
        data_fields = {"seq_len": int, "token_dim": int, "num_classes": int, "scale": (int, float), "codec": dict}
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object")
        problems = [f"{k}: expected {t.__name__}" for k, t in fields.items() if not isinstance(data.get(k), t)]
        if not problems:
            problems = [
                f"data.{k}: expected a number" if k == "scale" else f"data.{k}: expected {t.__name__}"
                for k, t in data_fields.items()
                if not isinstance(data["data"].get(k), t)
            ]
        if problems:
            raise ArtifactError(
                f"{where} is malformed: {'; '.join(problems)} (rewrite it with `far-scale export`, "
                "or resume the run to write a new checkpoint)"
            )
        info = data["data"]
        return cls(
            data["step"],
            data["world_size"],
            data.get("mlflow_run_id"),
            DataInfo(
                str(info.get("url", "")),
                info["seq_len"],
                info["token_dim"],
                info["num_classes"],
                float(info["scale"]),
                dict(info["codec"]),
                dict(info["normalization"]) if isinstance(info.get("normalization"), dict) else None,
                info.get("content_digest") if isinstance(info.get("content_digest"), str) else None,
            ),
        )

    @classmethod
    def read(cls, path: Path) -> "RunMeta":
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise ArtifactError(f"{path} is missing: not a checkpoint or export folder") from None
        except ValueError as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"{path} is not valid JSON ({exc})") from None


def _restore_hint(directory: Path, bad_tag: Optional[str] = None) -> str:
    tags = [t for t in checkpoint_tags(p.name for p in directory.iterdir() if p.is_dir()) if t != bad_tag]
    if not tags:
        return "no other checkpoint is here: delete the directory to start the run from scratch"
    newest = directory / tags[-1]
    pointer = {"tag": tags[-1], "step": int(tags[-1].removeprefix("step_")), "world_size": "N"}
    try:
        pointer["world_size"] = json.loads((newest / META_FILE).read_text())["world_size"]
    except (OSError, ValueError, KeyError):
        pass  # the user fills in the world size that wrote it
    return (
        f"checkpoints here: {', '.join(tags)}; to resume from the newest of them, write {directory / LATEST} "
        f"as {json.dumps(pointer)} (make sure that checkpoint is complete: `far-scale train` checks its files)"
    )


def checkpoint_tags(names) -> list[str]:
    """The checkpoint tags among directory entry names, oldest first."""
    return sorted(name for name in names if TAG_PATTERN.fullmatch(name))


class CheckpointError(ActionableError, RuntimeError):
    """An unreadable pointer or a checkpoint file that differs from what was written; says what to do."""


def parse_latest(text: str, where: str, directory: Path) -> tuple[str, int, int]:
    """(tag, step, world size) of a ``latest.json``; ``CheckpointError`` names ``where`` if it is damaged."""
    try:
        data = json.loads(text)
        tag, step, world_size = str(data["tag"]), int(data["step"]), int(data["world_size"])
        if not TAG_PATTERN.fullmatch(tag):
            raise ValueError(f"tag {tag!r} is not a checkpoint tag")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{where} is damaged ({type(exc).__name__}: {exc}); "
            f"{_restore_hint(directory) if directory.is_dir() else ''}"
        ) from None
    return tag, step, world_size


def read_latest(directory: Path) -> Optional[CheckpointRef]:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    tag, step, world_size = parse_latest(pointer.read_text(errors="replace"), str(pointer), directory)
    return CheckpointRef(directory, tag, step, world_size)


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A run directory, a checkpoints directory (its latest.json) or one step_* directory."""
    path = Path(path)
    for directory in (path / CHECKPOINTS_DIR, path):
        ref = read_latest(directory)
        if ref is not None:
            return ref
    if (path / META_FILE).is_file():
        meta = RunMeta.read(path / META_FILE)
        return CheckpointRef(path.parent, path.name, meta.step, meta.world_size)
    if (path / CONFIG_FILE).is_file():
        raise ArtifactError(
            f"{path} is a run directory without a checkpoint yet ({path / CHECKPOINTS_DIR / LATEST} does not exist): "
            "train until the first checkpoint (checkpoint.interval_steps, or a stop request), then sample"
        )
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a run directory, a checkpoints directory with "
        f"{LATEST}, a step_* directory or an export folder"
    )


@dataclass(frozen=True)
class Weights:
    """The weights file of a folder, with the folder's config text and meta."""

    folder: Path
    path: Path
    config_path: Path
    meta: RunMeta


def open_weights(path: str | Path, raw: bool = False) -> Weights:
    """The EMA (or, ``raw``, the raw) weights of an export folder, or of a run's / checkpoints folder's latest
    checkpoint, or of one step folder."""
    path = Path(path)
    folder = path if (path / EMA_FILE).is_file() else resolve_checkpoint(path).path
    weights = folder / (RAW_FILE if raw else EMA_FILE)
    if not weights.is_file():
        hint = " (raw weights exist only in exports: `far-scale export`)" if raw else ""
        raise FileNotFoundError(f"no weights at {weights}{hint}")
    return Weights(folder, weights, folder / CONFIG_FILE, RunMeta.read(folder / META_FILE))
