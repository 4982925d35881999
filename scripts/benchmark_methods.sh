#!/usr/bin/env bash
# Reproduces the README's method benchmark on synthetic data: every method of the paper
# (TransUNet, +MoE, +dMoE, +FEBS, +GroupDRO, +ADV, one model per group) x 3 seeds, same
# budget, evaluated on the test split with paired-bootstrap confidence intervals.
# Usage: bash scripts/benchmark_methods.sh [OUT_DIR] [fundus|intersectional]
# (CPU: about 25 minutes per data set on 2 cores; finished runs are skipped when rerun.)
set -euo pipefail
out=${1:-runs/benchmark}
kind=${2:-fundus}
attribute=race
[ "$kind" = intersectional ] && attribute=race,gender
data=$out/data/$kind
# no manifest.csv: none yet, or an interrupted synth (manifest.csv is written last), whose
# files --overwrite replaces
[ -f "$data/manifest.csv" ] || \
  python -m training.synth --kind "$kind" --out "$data" --n 240 --seed 0 --overwrite
python -m training.benchmark --data "$data/manifest.csv" --attribute "$attribute" \
  --classes background,rim,cup --image-size 48 --batch-size 8 --epochs 8 --lr 2e-3 \
  --model-kwargs '{"embed_dim": 48, "depth": 2, "num_heads": 2}' \
  --methods none,moe,dmoe,febs,groupdro,adv,separate --seeds 3 --out "$out/$kind"
cat "$out/$kind/summary.md"
