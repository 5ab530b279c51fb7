#!/usr/bin/env bash
# Ablation of Res-MTNet on CT: four variants trained with one equal budget (configs/ct.json,
# 12 epochs each, same seed and split), then evaluated side by side on the validation split.
#   scripts/ablation.sh [OUT=runs/ablation]
set -euo pipefail
OUT=${1:-runs/ablation}
BIN=${BIN:-.venv/bin}
EPOCHS=${EPOCHS:-12}
declare -A VARIANTS=(
  [full]="network.cross_task=true"
  [no_cross]="network.cross_task=false"
  [det_only]="network.malignancy=false network.cross_task=false"
  [mal_only]="network.detection=false network.cross_task=false"
)
for v in full no_cross det_only mal_only; do
  [ -f "$OUT/$v/model.pt" ] && continue
  "$BIN/resmtnet-train" --config configs/ct.json --out "$OUT/$v" --resume --no-progress \
    --set epochs=$EPOCHS ${VARIANTS[$v]} ${EXTRA_SET:-}
done
"$BIN/resmtnet-evaluate" --modality CT \
  --weights "Res-MTNet (full)=$OUT/full/model.pt" "multi-task, no cross-task residuals=$OUT/no_cross/model.pt" \
            "detection only=$OUT/det_only/model.pt" "malignancy only=$OUT/mal_only/model.pt" \
  --json "$OUT/ablation.json" --markdown "$OUT/ablation.md"
