#!/usr/bin/env bash
# Debian packages the test suite needs, installed when missing (root + apt; a no-op when present):
# slurm-wlm and munge for the tests marked `slurm`, chromium for the tests marked `browser`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/slurm/local-cluster.sh install
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" != 0 ]; then echo "[system-deps] chromium missing and not root: install it first" >&2; exit 1; fi
  echo "[system-deps] installing chromium (apt)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
