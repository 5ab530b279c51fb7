"""Fit `characterise.MASK_LEVEL` (the probability above which a voxel is nodule) on the
training cubes (never the validation ones).

    .venv/bin/python scripts/fit_mask_level.py runs/ct_findings_detail/model.pt

For each training cube with a nodule mask, the mask decoder's probabilities on the patch at
the nodule's centre, as the plugin reads them (`characterise._patch_outputs`, the connected
part at the centre, `characterise._centre_component`); the level on a 0.05 grid with the
highest median Dice against the cube's mask on the training split. Prints the median Dice
and volume error per level on both splits for the record.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from napari_resmtnet.evaluation import evaluate as E
from napari_resmtnet.inference.characterise import _centre_component, _patch_outputs
from napari_resmtnet.inference.weights import build_model, load_checkpoint, sha256_of
from napari_resmtnet.io.preprocess import normalize_ct
from napari_resmtnet.measurements import dice
from napari_resmtnet.model.network import centre_patches

LEVELS = np.round(np.arange(0.2, 0.81, 0.05), 2)


def scores(model, records):
    """(levels, cubes) Dice and relative volume error of the centre component at each level."""
    d, v = [], []
    with torch.inference_mode():
        for r in records:
            if r.mask is None or not len(r.centers):
                continue
            c = [np.asarray(r.centers[r.main], float)]
            patch = centre_patches(torch.from_numpy(normalize_ct(r.array)), c)
            _, prob = _patch_outputs(model, patch, False)
            truth = E.truth_patch(r, c[0])
            if not truth.any():
                continue
            masks = [_centre_component(prob[0] > lv) for lv in LEVELS]
            d.append([dice(m, truth) for m in masks])
            v.append([abs(float(m.sum()) - float(truth.sum())) / float(truth.sum()) for m in masks])
    return np.asarray(d).T, np.asarray(v).T


def main(path: str) -> int:
    ck = load_checkpoint(path, sha256_of(path))
    model = build_model(ck).eval()
    train, val = E._load_val(ck, None, "CT")
    (dt, vt), (dv, vv) = scores(model, train), scores(model, val)
    for k, lv in enumerate(LEVELS):
        print(
            f"level {lv:.2f}: train Dice {np.median(dt[k]):.3f} volume error {np.median(vt[k]):.3f} ({dt.shape[1]}) | "
            f"validation Dice {np.median(dv[k]):.3f} volume error {np.median(vv[k]):.3f} ({dv.shape[1]})"
        )
    best = int(np.argmax(np.median(dt, axis=1)))
    print(f"MASK_LEVEL = {LEVELS[best]:.2f} (train median Dice {np.median(dt[best]):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/ct_findings_detail/model.pt"))
