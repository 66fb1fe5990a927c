"""The docs stay true: the recipes reference is generated, every documented command runs or parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from far_scale.cli import build_parser, main
from far_scale.config.reference import render

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
# Commands a test runs as written (a few seconds, no GPU, no cluster); the others must parse.
RUN_AS_WRITTEN = ("check-config",)
DRY_RUN = ("launch slurm", "launch slurm-encode")


DEFAULTED = re.compile(r"^(\w+)=\$\{\1:-([^}]*)\}", re.M)
"""A doc's shell defaults (``OWN=${OWN:-runs/own}``): its commands are checked with those values."""


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        defaults = dict(DEFAULTED.findall(text))
        for block in BLOCK.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                for name, value in defaults.items():
                    line = line.replace(f"${name}", value)
                if line.startswith(("far-scale ", "make ")):
                    found.append((doc.name, line))
    return found


def test_recipes_reference_is_up_to_date():
    assert (REPO_ROOT / "docs" / "recipes.md").read_text() == render(), (
        "docs/recipes.md is out of date: python -m far_scale.config.reference > docs/recipes.md"
    )


def test_docs_show_commands():
    docs_with_commands = {doc for doc, _ in _commands()}
    assert {"README.md", "quickstart.md", "imagenet.md", "operations.md"} <= docs_with_commands


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("doc, command", _commands(), ids=[f"{d}:{c[:60]}" for d, c in _commands()])
def test_documented_command(doc, command, capsys, monkeypatch):
    argv = shlex.split(command)
    if argv[0] == "make":
        assert argv[1] in _make_targets(), f"{doc}: `{command}` is not a Makefile target"
        return
    argv = argv[1:]
    joined = " ".join(argv[:2])
    monkeypatch.chdir(REPO_ROOT)
    if argv[0] in RUN_AS_WRITTEN or joined in DRY_RUN:
        if joined in DRY_RUN and "--dry-run" not in argv:
            argv.append("--dry-run")
        code = main(argv)
        assert code == 0, f"{doc}: `{command}` failed:\n{capsys.readouterr().err[-2000:]}"
    else:
        parser = build_parser()
        try:
            parser.parse_known_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{doc}: `{command}` does not parse with the current CLI (exit {exc.code})")
