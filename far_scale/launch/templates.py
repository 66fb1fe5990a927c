"""Rendering of the sbatch templates under launchers/slurm/ (``@{name}`` placeholders; bash keeps its ``$``)."""

from __future__ import annotations

import re
import shlex
from importlib import resources
from typing import Iterable

PLACEHOLDER = re.compile(r"@\{(\w+)\}")


def template_text(name: str) -> str:
    return resources.files("launchers").joinpath("slurm", name).read_text()


def render(name: str, values: dict[str, object]) -> str:
    """Fill every placeholder; a missing value is an error naming it."""
    text = template_text(name)
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise KeyError(f"template {name} needs values for: {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def quote_all(items: Iterable[str]) -> str:
    return " ".join(shlex.quote(str(item)) for item in items)


def sbatch_lines(options: dict[str, object]) -> str:
    """``#SBATCH --key=value`` lines for the options that are set."""
    return "".join(f"#SBATCH --{key}={value}\n" for key, value in options.items() if value not in (None, ""))
