#!/usr/bin/env bash
# Reproduces the bundled demo models in src/napari_dmoe/models/ (CPU, about 30-40 minutes).
# They are DEMO models trained on synthetic data from `python -m training.synth`: they show
# how the plugin works and are not for clinical use.
# Usage: bash scripts/train_demo_models.sh [WORK_DIR] [fundus] [skin] [ct]   (default: all three)
# A rerun continues (--resume) an unfinished run in WORK_DIR and reuses a finished one.
set -euo pipefail
work=${1:-runs/demo}
shift || true
wanted=${*:-fundus skin ct}
models=src/napari_dmoe/models
mkdir -p "$work" "$models"
demo() {  # name kind attribute classes extra-fit-flags...
  local name=$1 kind=$2 attribute=$3 classes=$4; shift 4
  # no manifest.csv: none yet, or an interrupted synth (manifest.csv is written last)
  [ -f "$work/data/$kind/manifest.csv" ] || \
    python -m training.synth --kind "$kind" --out "$work/data/$kind" --seed 0 --overwrite \
      > /dev/null
  python -m training.fit --data "$work/data/$kind/manifest.csv" --attribute "$attribute" \
    --classes "$classes" --moe dmoe --preset tiny --seed 0 --out "$work/$name" --resume \
    --description "DEMO model trained on synthetic $kind data (training.synth) - not for clinical use" \
    "$@" | tee "$work/$name.log"
  # --overwrite: the evaluation belongs to the run just trained or resumed, so a rerun
  # replaces it with the evaluation of the run's current best checkpoint
  python -m training.evaluate --checkpoint "$work/$name/best.safetensors" \
    --data "$work/data/$kind/manifest.csv" --split test --out "$work/$name/eval" \
    --overwrite | tee -a "$work/$name.log"
  cp "$work/$name/best.safetensors" "$models/$name.safetensors"
}
for kind in $wanted; do
  case $kind in
    fundus) demo fundus_race_dmoe fundus race background,rim,cup \
              --arch transunet --image-size 192 --epochs 30 --batch-size 8 --lr 1e-3 ;;
    skin)   demo skin_age_dmoe skin age_group background,lesion \
              --arch transunet --image-size 128 --epochs 30 --batch-size 8 --lr 1e-3 ;;
    ct)     demo ct_tstage_dmoe ct t_stage background,tumour \
              --arch resunet --spatial-dims 3 --patch-size 64 64 32 --ct-window -150 250 \
              --epochs 40 --batch-size 2 --lr 1e-3 ;;
    *) echo "unknown demo '$kind' (fundus, skin, ct)" >&2; exit 2 ;;
  esac
done
ls -l "$models"
