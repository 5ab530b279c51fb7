"""The CXR implant figure: CT nodules implanted into a radiograph beside real JSRT nodules
(``resmtnet figure``; ``python -m napari_resmtnet.training.figure figure``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..io.preprocess import preprocess_radiograph
from .cxr_data import (
    DEFAULT_GAIN,
    build_implant_bank,
    calibrate_gain,
    implant_nodule,
    load_cxr_records,
    rough_lung_mask,
)
from .datasets import split_by_series

# --- figure ----------------------------------------------------------------------------------

_GREEN, _RED = (40, 170, 60), (210, 40, 40)


def _tile(img, centre, size=64, up=2):
    pad = np.pad(img, size, mode="edge")
    r, c = int(round(centre[0])) + size, int(round(centre[1])) + size
    t = pad[r - size // 2 : r + size // 2, c - size // 2 : c + size // 2]
    t = np.clip((t + 1) / 2 * 255, 0, 255).astype(np.uint8)
    return np.kron(t, np.ones((up, up), np.uint8))


def implant_figure(out_path, radiograph, cube_root, jsrt_root=None, seed: int = 3, size: int = 64) -> Path:
    """PNG: 8 CT nodules implanted into a radiograph (top row) above 8 real JSRT nodules.

    Each tile is a ``size``-pixel crop at 1.6 mm/px (shown 2x) centred on the nodule, with a
    strip below it: green benign, red malignant. Implants use the CT train split and the
    gain calibrated on the JSRT training nodules (`training_context`), as in training.
    """
    import SimpleITK as sitk
    import torch
    from skimage.io import imsave

    from .train import TrainConfig, split_records  # lazy: train imports torch

    img_sitk = sitk.ReadImage(str(radiograph))
    arr = sitk.GetArrayFromImage(img_sitk).astype(np.float32)
    base, _ = preprocess_radiograph(arr, img_sitk.GetSpacing()[::-1])
    lung = rough_lung_mask(base)
    with open(Path(cube_root) / "nodules.csv", newline="") as f:
        uids = [r["seriesuid"] for r in csv.DictReader(f)]
    bank = build_implant_bank(cube_root, split_by_series(uids, 0.2, 0)[0], 8.0)
    gain = DEFAULT_GAIN * 2
    real_recs = []
    if jsrt_root is not None and Path(jsrt_root).exists():
        recs = load_cxr_records(jsrt_root)
        cfg = TrainConfig(modality="CXR", data=str(jsrt_root))
        train, _, _, _ = split_records(recs, cfg)
        gain = calibrate_gain(train, bank)["gain"]
        by_sub = {
            k: sorted([r for r in train if len(r.centers) and r.subtlety == k], key=lambda r: r.name)
            for k in (5, 4, 3, 2)
        }
        for k in (5, 4, 3, 2):
            real_recs += by_sub[k][:2]
    g = torch.Generator().manual_seed(seed)
    order = sorted(range(len(bank)), key=lambda i: bank[i].diameter_px)
    picks = [order[int(q * (len(order) - 1))] for q in np.linspace(0.15, 0.95, 8)]
    up = 2
    tile = size * up
    strip = 6
    rows = []
    top = []
    for i in picks:
        res = implant_nodule(base, lung, bank[i], gain, g)
        if res is None:
            continue
        out, c, _ = res
        top.append((_tile(out, c, size, up), bank[i].malignant))
    rows.append(top)
    if real_recs:
        rows.append([(_tile(r.image, r.centers[0], size, up), int(r.malignant[0])) for r in real_recs])
    gap = 4
    H = len(rows) * (tile + strip) + (len(rows) - 1) * gap * 2
    W = 8 * tile + 7 * gap
    canvas = np.full((H, W, 3), 255, np.uint8)
    for ri, row in enumerate(rows):
        y = ri * (tile + strip + 2 * gap)
        for ci, (t, lab) in enumerate(row):
            x = ci * (tile + gap)
            canvas[y : y + tile, x : x + tile] = t[..., None]
            canvas[y + tile : y + tile + strip, x : x + tile] = _RED if lab == 1 else _GREEN
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    imsave(tmp, canvas, check_contrast=False)
    tmp.replace(out_path)
    return out_path


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m napari_resmtnet.training.figure", description="JSRT data tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("figure", help="implanted vs real nodules figure")
    f.add_argument("--out", default="docs/figures/cxr_implants.png")
    f.add_argument("--radiograph", default="../shared/data/cxr/node21_3.mha")
    f.add_argument("--cubes", default="../shared/data/ct_nodule_cubes")
    f.add_argument("--jsrt", default="../shared/data/jsrt", help="JSRT folder for the real-nodule row ('' to omit)")
    a = p.parse_args(argv)
    try:
        path = implant_figure(a.out, a.radiograph, a.cubes, a.jsrt or None)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"cxr_data: {e}", file=sys.stderr)
        return 1
    print(f"figure written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
