#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in data, on this machine's CPUs:
# synthetic images -> offline codec -> latent shards -> offline quality benchmark -> 2-rank ZeRO-2 training of a
# tiny FAR with quality metrics in MLflow -> a class-balanced evaluation set -> its scores beside the calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FS="$PY -m far_scale.cli"
OUT=${DEMO_DIR:-runs/demo}
STEPS=${DEMO_STEPS:-600}
RECIPE=recipes/far_tiny_synth64.yaml
mkdir -p "$OUT"

echo "== 1/6 synthetic class-conditional images (ImageNet layout) =="
$FS data synth "$OUT/images" --num-classes 10 --images-per-class 100 --resolution 64

echo "== 2/6 offline codec (patch PCA; a stand-in for a VAE, no download) =="
$FS data fit-codec "$OUT/images" "$OUT/pca.safetensors" --image-size 64 --patch-size 8 --dim 16

echo "== 3/6 encode to webdataset shards + manifest, then verify and look =="
$FS data encode "$OUT/images" "$OUT/shards" --codec pca --codec-weights "$OUT/pca.safetensors" \
  --image-size 64 --images-per-shard 100 --loader-workers 1
$FS data verify "$OUT/shards" --quiet
$FS data inspect "$OUT/shards" --out "$OUT/data_grid.png" | tail -n 1

echo "== 4/6 offline quality benchmark: a classifier of the real images, calibrated (cached) =="
$FS eval offline-setup "$OUT/images" --data "$OUT/shards" --cache-dir "$OUT/eval-cache" | tee "$OUT/offline-setup.txt"
BENCH=$(sed -n 's/^\(wrote\|reused\) \([^:]*\):.*/\2/p' "$OUT/offline-setup.txt")

echo "== 5/6 plan and train tiny FAR on 2 CPU ranks (DeepSpeed ZeRO-2, torchrun), $STEPS steps =="
OVERRIDES=("data.url=$OUT/shards" "run.output_dir=$OUT/runs" "run.max_steps=$STEPS" "eval.benchmark=$BENCH"
           "eval.interval_steps=$((STEPS / 2))" "eval.num_images=200" "eval.batch_size=50")
$FS check-config "$RECIPE" --world-size 2 --precision fp32 "${OVERRIDES[@]}" | sed -n '/# derived/,/^params: /p'
OMP_NUM_THREADS=1 $FS launch local "$RECIPE" --nproc 2 "${OVERRIDES[@]}"

RUN="$OUT/runs/far_tiny_synth64"
echo "== 6/6 sample 200 class-balanced images with the EMA weights and score them =="
$FS sample "$RUN" --out "$OUT/samples" --num-images 200 --batch-size 50
$FS eval offline "$OUT/samples/samples.npz" --bench "$BENCH"

echo "== results =="
echo "checkpoint:   $(cat "$RUN/checkpoints/latest.json")  in $RUN/checkpoints"
echo "samples:      $OUT/samples/samples.npz, grid $OUT/samples/grid.png (one column per class)"
echo "data grid:    $OUT/data_grid.png"
echo "MLflow store: $RUN/mlflow.db (artifacts in $RUN/mlartifacts; eval/* metrics at steps $((STEPS / 2)) and $STEPS)"
echo "  open it:    .venv/bin/mlflow ui --backend-store-uri sqlite:///$(realpath "$RUN")/mlflow.db --port 5000"
echo "export:       $FS export $RUN $OUT/export"
