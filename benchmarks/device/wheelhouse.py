"""The wheelhouse of the air-gapped GPU node: the distributions the GPU session needs beyond the node's image.

``scripts/device-wheels.sh [--mlflow] [--s3]`` runs this: it writes ``.whl/`` (git-ignored) with exactly the
distributions of ``wheels.txt`` (and, behind the flags, the sets that MLflow tracking or S3 data need), each at the
version installed in this project's venv, for CPython 3.12 on manylinux x86-64 (the node's Python); deepspeed is
built here as a pure-Python wheel (its sdist, no ops compiled). It prints each wheel's size and the total, and fails
when the wheels and the repository's tracked files together exceed ``LIMIT_MIB`` (the node takes 64 MiB a call).
The node's image is ``base-image.txt``; the job's first step installs the wheels into a target folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WHEELHOUSE = REPO_ROOT / ".whl"
LIMIT_MIB = 60.0
"""Wheels plus tracked files: the node takes 64 MiB a call; the rest is the margin for results carried back in."""
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
BUILT_HERE = ("deepspeed",)
"""Published as an sdist only: built here as a pure-Python wheel (``pip wheel --no-deps --no-build-isolation``)."""
OPTIONAL_ROOTS = {"mlflow": ("mlflow-skinny",), "s3": ("s3fs",)}
"""The roots of the flag-selected sets; their needs that the image lacks come with them."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> list[str]:
    """Distribution names of a list file (comments and blank lines skipped)."""
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def base_image() -> set[str]:
    return {canonical(name) for name in read_list(HERE / "base-image.txt")}


def core_wheels() -> list[str]:
    return read_list(HERE / "wheels.txt")


def requirement_closure(roots: tuple[str, ...], base: set[str]) -> list[str]:
    """``roots`` and, recursively, the installed distributions they require (no extras, markers of this Python)
    that the image lacks."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = canonical(name)
        if key in seen or (key in base and name not in roots):
            continue
        dist = metadata.distribution(name)
        seen[key] = dist.metadata["Name"]
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if canonical(requirement.name) not in base:
                todo.append(requirement.name)
    return sorted(seen.values(), key=str.lower)


SELF = "far-scale"  # the repository itself travels with every call


def distributions_of(module_names) -> set[str]:
    """The installed distributions that provide the top-level modules ``module_names`` (standard library and
    modules of no distribution left out)."""
    provides = metadata.packages_distributions()
    return {canonical(dist) for name in module_names for dist in provides.get(name.split(".")[0], [])}


def uncovered(module_names) -> list[str]:
    """Distributions imported as ``module_names`` that neither the node's image nor the wheelhouse provides."""
    covered = base_image() | {canonical(n) for n in core_wheels()} | {SELF}
    return sorted(distributions_of(module_names) - covered)


class NodeImage:
    """A ``sys.meta_path`` finder that makes this Python import like the GPU node: a module of a distribution that
    neither the node's image nor the wheelhouse provides raises ``ModuleNotFoundError`` (code that imports it only
    when present goes on without it, as it will there)."""

    def __init__(self):
        covered = base_image() | {canonical(n) for n in core_wheels()} | {SELF}
        provides = metadata.packages_distributions()
        self.absent = {
            top for top, dists in provides.items() if dists and not any(canonical(d) in covered for d in dists)
        }

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.absent:
            raise ModuleNotFoundError(f"{name} is not on the GPU node (neither in its image nor in the wheelhouse)")
        return None

    def install(self) -> "NodeImage":
        sys.meta_path.insert(0, self)
        return self


def wanted(mlflow: bool, s3: bool) -> list[str]:
    names = list(core_wheels())
    base = base_image()
    for flag, roots in OPTIONAL_ROOTS.items():
        if {"mlflow": mlflow, "s3": s3}[flag]:
            names += [n for n in requirement_closure(roots, base) if canonical(n) not in {canonical(x) for x in names}]
    return names


def fetch(name: str, target: Path) -> None:
    version = metadata.version(name)
    pip = [sys.executable, "-m", "pip"]
    if canonical(name) in BUILT_HERE:
        command = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(target), f"{name}=={version}"]
    else:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        command = [
            *pip,
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            PYTHON_VERSION,
            "--implementation",
            "cp",
            *platforms,
            "-q",
            "-d",
            str(target),
            f"{name}=={version}",
        ]
    subprocess.run(command, check=True, env={"DS_BUILD_OPS": "0", **__import__("os").environ})


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return sum(
        (REPO_ROOT / name).stat().st_size
        for name in files.decode().split("\0")
        if name and (REPO_ROOT / name).is_file()
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlflow", action="store_true", help="also MLflow tracking (mlflow-skinny and its needs)")
    parser.add_argument("--s3", action="store_true", help="also S3 data (s3fs and its needs)")
    parser.add_argument("--out", default=str(WHEELHOUSE))
    args = parser.parse_args(argv)
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.whl"):
        stale.unlink()
    names = wanted(args.mlflow, args.s3)
    for name in names:
        fetch(name, target)
    wheels = sorted(target.glob("*.whl"))
    mib = 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / mib:7.2f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in wheels)
    tracked = tracked_bytes()
    together = (total + tracked) / mib
    print(
        f"{len(wheels)} wheels, {total / mib:.1f} MiB; with the repository's tracked files ({tracked / mib:.1f} "
        f"MiB) {together:.1f} MiB of the {LIMIT_MIB:g} MiB allowed"
    )
    if together > LIMIT_MIB:
        print(
            f"error: {together:.1f} MiB is above {LIMIT_MIB:g} MiB: carry fewer sets (--mlflow, --s3)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
