#!/usr/bin/env bash
# COCO-Stuff-27 unsupervised segmentation across backbones, one markdown table at the end.
#
#   bash experiments/cocostuff_table.sh [OUT_DIR] [extra Hydra overrides...]
#   bash experiments/cocostuff_table.sh outputs/cocostuff27 trainer=gpu data.limit=500
#
# Needs data/coco (`make data`) and the backbones' weights (`make weights`), or data.root=... /
# backbone.model_id=... overrides. BACKBONES="sd dino" picks a subset. Each run writes
# OUT_DIR/<backbone>/eval/metrics.json; the table is also saved as OUT_DIR/table.md.
set -euo pipefail
OUT=${1:-outputs/cocostuff27}
shift || true
BACKBONES=${BACKBONES:-"sd clip dino mae"}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
for b in $BACKBONES; do
  if [ -f "$OUT/$b/eval/metrics.json" ]; then
    echo "== $b: already evaluated ($OUT/$b/eval/metrics.json), skipping"
    continue
  fi
  echo "== $b"
  "$PYTHON" -m ldsc.run experiment=cocostuff27 "backbone=$b" "hydra.run.dir=$OUT/$b" "$@"
done
runs=()
for b in $BACKBONES; do runs+=("$OUT/$b"); done
"$PYTHON" experiments/metrics_table.py "${runs[@]}" | tee "$OUT/table.md"
