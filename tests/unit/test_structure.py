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
            # `from package import module` imports the module too (names that are not modules match nothing).
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(PACKAGE.parent)): _imports(path) for path in sorted((PACKAGE / package).rglob("*.py"))}


def _offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in _package_imports(package).items()
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_config_imports_nothing_from_far_scale_outside_itself():
    outside = [
        f"far_scale.{p.name}" for p in PACKAGE.iterdir() if p.is_dir() and p.name not in ("config", "__pycache__")
    ]
    outside += ["far_scale.cli"]
    assert _offending("config", tuple(outside)) == []


@pytest.mark.parametrize("layer", ["config", "data", "distributed", "train", "tracking", "planning", "eval", "launch"])
def test_models_import_no_infrastructure(layer):
    assert _offending("models", (f"far_scale.{layer}",)) == []


def test_only_distributed_imports_deepspeed():
    offenders = [
        f"{path} imports {name}"
        for package in (p.name for p in PACKAGE.iterdir() if p.is_dir())
        if package != "distributed"
        for path, names in _package_imports(package).items()
        for name in names
        if name == "deepspeed" or name.startswith("deepspeed.")
    ]
    assert offenders == []


def test_the_checker_sees_real_imports():
    """The test above would pass vacuously if the parser found nothing: it must see known edges."""
    assert "far_scale.config.schema" in _imports(PACKAGE / "planning" / "plan.py")
    assert "deepspeed" in set().union(*_package_imports("distributed").values())


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_circles(root: Path) -> list[list[str]]:
    """Cycles among the modules of each sub-package of ``root`` (lazy imports inside functions count too)."""
    modules = {_module_name(p, root): _imports(p) for p in sorted(root.rglob("*.py"))}
    circles = []
    for package in sorted({name.rsplit(".", 1)[0] for name in modules if name.count(".") >= 2}):
        graph = {
            name: {i for i in imports if i in modules and i.rsplit(".", 1)[0] == package and i != name}
            for name, imports in modules.items()
            if name.rsplit(".", 1)[0] == package
        }
        state: dict[str, int] = {}

        def visit(node: str, path: list[str]) -> None:
            state[node] = 1
            for nxt in sorted(graph[node]):
                if state.get(nxt) == 1:
                    circles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
                elif nxt not in state:
                    visit(nxt, path + [nxt])
            state[node] = 2

        for start in sorted(graph):
            if start not in state:
                visit(start, [start])
    return circles


def imports_between(root: Path, package: str, forbidden: str) -> list[str]:
    base = root / package
    prefix = f"{root.name}.{forbidden}"
    return [
        f"{path.relative_to(root.parent)} imports {name}"
        for path in sorted(base.rglob("*.py"))
        for name in sorted(_imports(path))
        if name == prefix or name.startswith(prefix + ".")
    ]


def test_eval_imports_nothing_from_train():
    """Evaluation reads run folders through far_scale.artifacts, never the trainer's modules."""
    assert imports_between(PACKAGE, "eval", "train") == []


def test_no_import_circles_inside_a_package():
    assert import_circles(PACKAGE) == []


def test_the_structure_checks_fail_on_planted_violations(tmp_path):
    root = tmp_path / "far_scale"
    for package in ("eval", "train"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "eval" / "a.py").write_text("from far_scale.eval import b\n")
    (root / "eval" / "b.py").write_text("def f():\n    from far_scale.eval.a import x\n")
    (root / "eval" / "c.py").write_text("from far_scale.train.trainer import Trainer\n")
    assert import_circles(root) == [["far_scale.eval.a", "far_scale.eval.b", "far_scale.eval.a"]]
    assert imports_between(root, "eval", "train")[0] == "far_scale/eval/c.py imports far_scale.train.trainer"
