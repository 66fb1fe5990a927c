"""Resuming a run with another recipe: refused, naming every differing key, or recorded (``--allow-config-change``).

A checkpoint holds the resolved config it was trained with. Resuming it under a recipe that says something else
(another learning rate, another model) would leave ``config.yaml``, the weights and MLflow telling three stories.
Only operational settings, which change how a run is watched or fed but not what it learns, may differ silently.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from far_scale.artifacts import CONFIG_FILE, META_FILE, RunMeta
from far_scale.config.schema import Config
from far_scale.errors import ActionableError

CHANGES_FILE = "config_changes.jsonl"
"""One line per accepted change: the step it took effect at and each key's old and new value."""
OPERATIONAL_KEYS = (
    "run.output_dir",  # a resume on another machine or disk (the run directory moved; the checkpoint found it)
    "run.name",  # likewise: the run directory was renamed or copied
    "checkpoint.url",
    "run.max_steps",
    "run.epochs",
    "run.log_interval",
    "run.record_sample_keys",
    "data.num_workers",
    "data.read_retry_s",
    "checkpoint.interval_steps",
    "checkpoint.keep_last",
    "parallel.process_group_timeout_min",
    "tracking.",
    "eval.",
)
"""Keys (or ``section.`` prefixes) a resume may change without ``--allow-config-change``: how long to train, how
the run is logged, evaluated, checkpointed and fed; none of them changes what the weights learn."""
DATA_URL_KEY = "data.url"
"""Operational when the shards at the new URL are those the checkpoint trained on (``Manifest.content_digest``):
data staged to local disk, or copied to another bucket."""


class ConfigDriftError(ActionableError, ValueError):
    """A resume under a recipe that differs from the checkpoint's; names the keys and the two ways on."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _operational(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS)


def config_changes(saved: Mapping[str, Any], current: Config) -> dict[str, tuple[Any, Any]]:
    """Every non-operational key whose value differs between a saved config (parsed YAML) and ``current``:
    key -> (old, new)."""
    old, new = _flatten(saved), _flatten(current.model_dump(mode="json"))
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not _operational(key)
    }


def check_resume(checkpoint: Path, current: Config, content_digest: str, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The changes a resume from the ``checkpoint`` folder would make under ``current``, whose data has
    ``content_digest``; ``ConfigDriftError`` unless they are none or ``allow``. A new ``data.url`` holding the
    checkpoint's shards is no change."""
    saved_config = checkpoint / CONFIG_FILE
    changes = config_changes(yaml.safe_load(saved_config.read_text()) or {}, current)
    note = ""
    if DATA_URL_KEY in changes:
        saved_digest = RunMeta.read(checkpoint / META_FILE).data.content_digest
        if saved_digest == content_digest:
            del changes[DATA_URL_KEY]
        elif saved_digest is None:
            note = " (the checkpoint does not record which shards it trained on, so the new data.url is a change)"
        else:
            note = " (the new data.url holds other shards than the checkpoint trained on: another manifest)"
    if changes and not allow:
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:10])
        more = f" (+{len(changes) - 10} more)" if len(changes) > 10 else ""
        raise ConfigDriftError(
            f"the recipe differs from the config the checkpoint was trained with ({saved_config}): {shown}{more}"
            f"{note}. Resume with the checkpoint's settings, start a new run (another run.name), or pass "
            "--allow-config-change to continue with the new settings (recorded in the run directory and MLflow)"
        )
    return changes


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Append the accepted ``changes`` to ``CHANGES_FILE``; returns the MLflow tags and params that record them."""
    entry = {
        "step": step,
        "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "changes": {key: {"old": old, "new": new} for key, (old, new) in changes.items()},
    }
    with open(run_dir / CHANGES_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return {
        "tags": {f"far_scale.config_change.step_{step}": json.dumps(entry["changes"])[:5000]},
        "params": {f"config_change.step_{step}.{key}": f"{old} -> {new}" for key, (old, new) in changes.items()},
    }
