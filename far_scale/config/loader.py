"""Strict recipe loading: YAML -> ``base:`` inheritance -> dotted overrides -> frozen ``Config``.

Errors are collected and raised once as ``ConfigError``; each message names the dotted
path of the offending key and, for unknown keys, the nearest valid one.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from far_scale.config.schema import Config

BASE_KEY = "base"


class ConfigError(ValueError):
    """One or more problems with a recipe; ``problems`` lists each message."""

    def __init__(self, problems: Sequence[str], source: str = ""):
        self.problems = list(problems)
        self.source = source
        header = f"invalid config{f' ({source})' if source else ''}"
        super().__init__(header + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-4`` as a float (YAML 1.1 requires a dot; people don't write one)."""


_FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789."))


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML, turning syntax errors into ``ConfigError`` with file and line."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error at {where}: {problem}"], source) from None


def parse_value(text: str) -> Any:
    """Parse the right-hand side of a ``key=value`` override as a YAML scalar/list."""
    return parse_yaml_text(text, "<override>") if text != "" else ""


def _read_recipe(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError([f"base: inheritance cycle: {chain}"], str(path))
    if not path.is_file():
        raise ConfigError([f"recipe file not found: {path}"], str(path))
    data = parse_yaml_text(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"a recipe must be a mapping at the top level, got {type(data).__name__}"], str(path))
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([f"base: expected a recipe path (str), got {type(base).__name__}"], str(path))
    parent = _read_recipe(path.parent / base, (*seen, path))
    return deep_merge(parent, data)


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, other values replace)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(data: Mapping, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML)."""
    result = copy.deepcopy(dict(data))
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        try:
            node[parts[-1]] = parse_value(raw)
        except ConfigError as exc:
            problems.extend(f"override {item!r}: {p}" for p in exc.problems)
    if problems:
        raise ConfigError(problems, "overrides")
    return result


def _section_model(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc[:-1]``."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _expected_type(loc: Sequence[Any]) -> str:
    model = _section_model(loc)
    field = model.model_fields.get(str(loc[-1])) if model else None
    if field is None:
        return "?"
    annotation = field.annotation
    name = getattr(annotation, "__name__", None)
    return name if name and not str(annotation).startswith("typing.") else str(annotation).replace("typing.", "")


def nearest_key(loc: Sequence[Any]) -> str | None:
    """The valid dotted key closest to an unknown one, or None when nothing is close."""
    model = _section_model(loc)
    if model is None:
        return None
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    if not matches:
        return None
    return ".".join([*map(str, loc[:-1]), matches[0]])


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    path = ".".join(loc) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        hint = nearest_key(loc)
        suffix = f"; did you mean {hint!r}?" if hint else ""
        return f"{path}: unknown key{suffix}"
    value = error.get("input")
    if kind.endswith("_type") or kind in {"literal_error", "enum"}:
        expected = _expected_type(loc)
        return f"{path}: expected {expected}, got {type(value).__name__} {value!r} ({error['msg']})"
    return f"{path}: {error['msg']} (got {value!r})"


def build_config(data: Mapping[str, Any], source: str = "") -> Config:
    """Strictly validate a nested dict into a frozen ``Config``."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()], source) from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a recipe file with its ``base:`` chain and overrides into a frozen ``Config``."""
    data = _read_recipe(Path(path), ())
    data = apply_overrides(data, overrides)
    return build_config(data, str(path))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text: what is written next to runs, into checkpoints and MLflow."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_from_yaml(text: str, source: str = "<resolved config>", overrides: Iterable[str] = ()) -> Config:
    """Inverse of ``config_to_yaml``, with optional dotted overrides applied on top."""
    return build_config(apply_overrides(parse_yaml_text(text, source) or {}, overrides), source)
