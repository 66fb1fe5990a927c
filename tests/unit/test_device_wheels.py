"""The air-gapped GPU node gets everything the GPU session imports: from its image or from the wheelhouse; and the
job command that runs there fits the node's 2,000 characters and parses."""

from __future__ import annotations

import re
import subprocess
import sys

from benchmarks.device.wheelhouse import base_image, canonical, core_wheels, uncovered
from benchmarks.gpu_session import PARTS
from tests.conftest import REPO_ROOT

# The modules the parts' processes import, lazily imported ones included (the trainer imports DeepSpeed and the
# shard reader only when it runs); the slow dry-run test records the real imports of every part as well.
PART_MODULES = (
    "benchmarks.train_throughput",
    "benchmarks.sampling_speed",
    "benchmarks.sampling_graphs",
    "benchmarks.gpu_session",
    "far_scale.cli",
    "far_scale.train.trainer",
    "far_scale.distributed.engine",
    "far_scale.data.loader",
    "deepspeed",
    "webdataset",
    "pytest",
)


def test_the_gpu_parts_import_with_only_the_image_and_the_wheelhouse():
    """Their modules imported as on the node (``NodeImage``: every other distribution unimportable): nothing fails,
    and what they import comes from the image or the wheelhouse."""
    code = (
        "import importlib, sys\n"
        "from benchmarks.device.wheelhouse import NodeImage, uncovered\n"
        "NodeImage().install()\n"
        f"for m in {PART_MODULES!r}: importlib.import_module(m)\n"
        "print(uncovered(list(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_module_the_node_lacks_is_reported_and_cannot_be_imported_as_there():
    assert "mlflow" in " ".join(uncovered(["mlflow", "torch", "deepspeed"]))
    assert canonical("torch") in base_image() and "deepspeed" in {canonical(n) for n in core_wheels()}
    code = "from benchmarks.device.wheelhouse import NodeImage\nNodeImage().install()\nimport mlflow\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode != 0 and "not on the GPU node" in result.stderr


def test_every_part_has_a_cpu_stand_in_or_says_why():
    for part in PARTS:
        assert part.dry_run or part.missing is not None, part.name
        assert part.plan in ("first", "second", "later"), part.name


JOB = re.compile(r"<!-- gpu-job:begin -->\n```bash\n(.*?)\n```\n<!-- gpu-job:end -->", re.S)


def test_the_documented_job_command_fits_the_node_and_parses():
    text = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    found = JOB.search(text)
    assert found, "docs/benchmarks.md lacks the GPU job command between <!-- gpu-job:begin/end --> markers"
    command = found.group(1).strip()
    assert "\n" not in command and len(command) <= 2000, len(command)
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    for needed in ("--no-index", "--target", ".whl/*.whl", "benchmarks.gpu_session", "--budget-s", "$OUT"):
        assert needed in command, needed
