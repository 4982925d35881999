#!/usr/bin/env bash
# Reproduces the README's fairness comparison on synthetic fundus data (CPU, same budget
# for every method): --moe none / moe / dmoe with DiceCE, and --moe none with FEBS.
# Usage: bash scripts/compare_methods.sh [OUT_DIR] [EPOCHS]
set -euo pipefail
out=${1:-runs/compare}
epochs=${2:-30}
data=$out/data/fundus
[ -f "$data/manifest.csv" ] || python -m training.synth --kind fundus --out "$data" --n 400 --seed 0
common=(--data "$data/manifest.csv" --attribute race --classes background,rim,cup
        --arch transunet --preset tiny --image-size 128 --epochs "$epochs" --batch-size 8
        --lr 1e-3 --seed 0 --quiet)
run() {  # name, extra flags...
  local name=$1; shift
  python -m training.fit "${common[@]}" "$@" --out "$out/$name" > "$out/$name.log" 2>&1
  python -m training.evaluate --checkpoint "$out/$name/best.safetensors" \
    --data "$data/manifest.csv" --split test --out "$out/$name/eval" >> "$out/$name.log"
}
mkdir -p "$out"
# two at a time, one thread each, so the 2-core machine is used fully
export OMP_NUM_THREADS=1
(run none --moe none; run moe --moe moe) &
(run dmoe --moe dmoe; run febs --moe none --loss febs) &
wait
python -m training.evaluate --compare "$out/none/eval" "$out/febs/eval" "$out/moe/eval" \
  "$out/dmoe/eval" --names "TransUNet" "TransUNet+FEBS" "TransUNet+MoE" "TransUNet+dMoE" \
  --out "$out"
