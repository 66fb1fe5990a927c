"""The recipes reference (docs/recipes.md), generated from the config schema so that it cannot drift.

``python -m far_scale.config.reference > docs/recipes.md``; a test checks the file is up to date.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from far_scale.config.schema import Config

HEADER = """# Recipes reference

Every field a recipe (`recipes/*.yaml`) or a dotted command-line override (`section.field=value`) can set,
with its type, default and meaning. Generated from `far_scale/config/schema.py` by
`python -m far_scale.config.reference > docs/recipes.md` (a test fails when this file is out of date).
A recipe may start with `base: other.yaml`; unknown keys and wrong types are errors naming the dotted path.
`far-scale check-config RECIPE --world-size N` prints the resolved recipe and every derived number.
"""


def _bounds(meta) -> list[tuple[str, Any]]:
    """(operator, value) of a Field's numeric bounds kept in ``Annotated`` metadata."""
    names = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = []
    for item in getattr(meta, "metadata", [meta]):
        for attr, op in names.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append((op, value))
    return found


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        constraints = ", ".join(f"{k} {v}" for m in args[1:] for k, v in _bounds(m))
        return _type_name(args[0]) + (f" ({constraints})" if constraints else "")
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field) -> str:
    bounds = []
    for item in field.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, name, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""


def _default(field) -> str:
    value = field.default
    if value is PydanticUndefined:
        return "required"
    return f"`{json.dumps(value)}`"


def _section(model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{prefix}{name}", annotation))
            continue
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        kind = f"{_type_name(annotation)}{_constraints(field)}"
        rows.append(f"| `{prefix}{name}` | {kind} | {_default(field)} | {text} |")
    lines = []
    if rows:
        doc = " ".join((model.__doc__ or "").split()) if model.__doc__ and "BaseModel" not in model.__doc__ else ""
        lines += [
            f"## `{prefix.rstrip('.')}`",
            "",
            *([doc, ""] if doc else []),
            "| field | type | default | meaning |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    for name, sub in nested:
        lines += _section(sub, f"{name}.")
    return lines


def render() -> str:
    """The whole reference as markdown."""
    return HEADER + "\n" + "\n".join(_section(Config, "")).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
