#!/usr/bin/env bash
# Malignancy variants of the CT Res-MTNet, each trained with the bundled model's full
# 80-epoch recipe (configs/ct.json, same seed and split) and evaluated side by side on the
# validation split, with and without flip-averaged malignancy:
#   binary    LIDC 1-2 vs 4-5 targets (configs/ct.json as it is; = runs/ct)
#   rating    soft targets (rating - 1) / 4, so rating-3 nodules train the head too
#   seg       binary targets + the auxiliary segmentation head fed by the nodule masks
#   seg_thick seg, then the bundled model's thick-slice fine-tune (configs/ct_finetune_thick.json)
#   scripts/malignancy_variants.sh [OUT=runs/malignancy]
set -euo pipefail
OUT=${1:-runs/malignancy}
BIN=${BIN:-.venv/bin}
declare -A VARIANTS=(
  [binary]=""
  [rating]="malignancy_target=rating"
  [seg]="network.segmentation=true"
)
for v in binary rating seg; do
  [ -f "$OUT/$v/model.pt" ] && continue
  "$BIN/resmtnet-train" --config configs/ct.json --out "$OUT/$v" --resume --no-progress --set ${VARIANTS[$v]} ${EXTRA_SET:-}
done
if [ ! -f "$OUT/seg_thick/model.pt" ]; then
  "$BIN/resmtnet-train" --config configs/ct_finetune_thick.json --out "$OUT/seg_thick" --resume --no-progress \
    --set init="$OUT/seg/model.pt" network.segmentation=true ${EXTRA_SET:-}
fi
W=("binary targets=$OUT/binary/model.pt" "rating targets=$OUT/rating/model.pt"
   "binary + segmentation head=$OUT/seg/model.pt" "segmentation head, thick-slice fine-tune=$OUT/seg_thick/model.pt")
"$BIN/resmtnet-evaluate" --modality CT --weights "${W[@]}" --json "$OUT/variants.json" --markdown "$OUT/variants.md"
"$BIN/resmtnet-evaluate" --modality CT --weights "${W[@]}" --tta --json "$OUT/variants_tta.json" --markdown "$OUT/variants_tta.md"
