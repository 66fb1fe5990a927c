"""The direction of imports: config is a leaf, models take plain values, only distributed imports deepspeed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "far_scale"


def _imports(module_path: Path) -> set[str]:
    """Every module imported anywhere in the file (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(module_path.read_text(), str(module_path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(PACKAGE.parent)): _imports(path) for path in sorted((PACKAGE / package).rglob("*.py"))}


def _offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path} imports {name}" for path, names in _package_imports(package).items() for name in sorted(names)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_config_imports_nothing_from_far_scale_outside_itself():
    outside = [f"far_scale.{p.name}" for p in PACKAGE.iterdir()
               if p.is_dir() and p.name not in ("config", "__pycache__")]
    outside += ["far_scale.cli"]
    assert _offending("config", tuple(outside)) == []


@pytest.mark.parametrize("layer", ["config", "data", "distributed", "train", "tracking", "planning", "eval", "launch"])
def test_models_import_no_infrastructure(layer):
    assert _offending("models", (f"far_scale.{layer}",)) == []


def test_only_distributed_imports_deepspeed():
    offenders = [f"{path} imports {name}" for package in (p.name for p in PACKAGE.iterdir() if p.is_dir())
                 if package != "distributed"
                 for path, names in _package_imports(package).items() for name in names
                 if name == "deepspeed" or name.startswith("deepspeed.")]
    assert offenders == []


def test_the_checker_sees_real_imports():
    """The test above would pass vacuously if the parser found nothing: it must see known edges."""
    assert "far_scale.config.schema" in _imports(PACKAGE / "planning" / "plan.py")
    assert "deepspeed" in set().union(*_package_imports("distributed").values())
