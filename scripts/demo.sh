#!/usr/bin/env bash
# `make demo`: run what the pipeline has so far, end to end, on built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"

echo "== 1. check the tiny FAR recipe for 2 CPU ranks (what the demo trains) =="
$PY -m far_scale.cli check-config recipes/far_tiny_synth64.yaml --world-size 2 --precision fp32 | sed -n '/# derived/,/# deepspeed/p'

echo "== 2. plan FAR-B on 32 GPUs (the paper's setup) =="
$PY -m far_scale.cli check-config recipes/far_base_in256.yaml --world-size 32 | sed -n '/# derived/,/# deepspeed/p'

echo "== 3. sampling speed of tiny FAR vs MAR on this CPU =="
$PY benchmarks/sampling_speed.py --sizes tiny --batch 8 --repeats 2 --quick --no-docs --out "$OUT/sampling_speed"

echo
echo "Demo done. Outputs under $OUT/."
