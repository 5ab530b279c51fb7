"""Fit `characterise.TEXTURE_SOLID_FRACTION` on the training cubes (never the validation ones).

    .venv/bin/python scripts/fit_texture_rule.py runs/ct_findings/model.pt

For each training cube with a readers' majority texture, the solid fraction of the model's
mask at the nodule's centre (`characterise.characterise_patches`, as the plugin reads it); the two cut points (a grid of
0.025 steps) that maximise the agreement with the readers' majority on the training split.
Prints them and the accuracy on the validation split for the record.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import torch

from napari_resmtnet.evaluation import evaluate as E
from napari_resmtnet.inference.characterise import characterise_patches
from napari_resmtnet.model.network import centre_patches
from napari_resmtnet.io.preprocess import CT_WINDOW, normalize_ct
from napari_resmtnet.inference.weights import build_model, load_checkpoint, sha256_of


def fractions(model, records):
    """(readers' majority texture class, solid fraction of the model's mask) per cube."""
    out = []
    for r in records:
        if r.attributes is None or r.attributes[r.main][0] < 0:
            continue
        c = [r.centers[r.main]]
        f = characterise_patches(model, centre_patches(torch.from_numpy(normalize_ct(r.array)), c), c, 1.0, CT_WINDOW)
        out.append((int(r.attributes[r.main][0]), f[0][0].get("solid_fraction", 0.0)))
    return np.array(out)


def rule(f, lo, hi):
    return np.where(f >= hi, 2, np.where(f <= lo, 0, 1))


def main(path: str) -> int:
    ck = load_checkpoint(path, sha256_of(path))
    model = build_model(ck).eval()
    train, val = E._load_val(ck, None, "CT")
    tr, va = fractions(model, train), fractions(model, val)
    grid = np.linspace(0, 1, 41)
    acc, lo, hi = max(
        ((rule(tr[:, 1], a, b) == tr[:, 0]).mean(), a, b) for a, b in itertools.product(grid, grid) if a < b
    )
    print(
        f"TEXTURE_SOLID_FRACTION = ({lo:.3f}, {hi:.3f}): train {acc:.3f} ({len(tr)} cubes), "
        f"validation {(rule(va[:, 1], lo, hi) == va[:, 0]).mean():.3f} ({len(va)} cubes)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/ct_findings/model.pt"))
