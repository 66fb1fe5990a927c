#!/usr/bin/env bash
# The wheelhouse of the air-gapped GPU node: writes .whl/ with what the GPU session needs beyond the node's image
# (benchmarks/device/wheels.txt; --mlflow and --s3 add those sets), at this venv's versions, for CPython 3.12
# manylinux x86-64; prints the sizes and fails above 60 MiB together with the tracked files.
# Usage: bash scripts/device-wheels.sh [--mlflow] [--s3]   (after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m benchmarks.device.wheelhouse "$@"
