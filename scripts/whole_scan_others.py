"""Show every detection at the operating point that lies on no labelled lesion ("other
detections") on the whole validation scans, so a reader can judge what the count hides.

    .venv/bin/python scripts/whole_scan_others.py docs/screenshots/whole_scan_others.png

For each other detection (bundled CT weights, their threshold): a 40 mm axial, coronal and
sagittal crop at its centre (lung window -1000..400 HU, 1 mm pixels, the box's outline in
red), one row each, in the order printed (scan, rank, probability, world centre, box size,
mask volume). The scans' labels are incomplete where the source says so (e.g. only the
tumour of a staging CT is labelled), so an "other" can be an unlabelled nodule: the figure is
what lets a reader tell.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from skimage import io, transform

from napari_resmtnet.evaluation import evaluate as E
from napari_resmtnet.inference.predictor import Predictor
from napari_resmtnet.inference.weights import bundled_entry, load_checkpoint
from napari_resmtnet.training.wholescan import match_scan, whole_scans

HALF_MM = 20.0
TILE = 160


def _crop(scan, centre, box, axis: int) -> np.ndarray:
    """(TILE, TILE, 3) lung-window crop through ``centre`` perpendicular to ``axis``, 1 mm
    pixels, with the box's outline."""
    sp = np.asarray(scan.spacing, float)
    grid = np.arange(-HALF_MM, HALF_MM, 1.0)
    keep = [a for a in range(3) if a != axis]
    pts = np.zeros((len(grid), len(grid), 3))
    pts[..., axis] = centre[axis]
    pts[..., keep[0]] = centre[keep[0]] + grid[:, None] / sp[keep[0]]
    pts[..., keep[1]] = centre[keep[1]] + grid[None, :] / sp[keep[1]]
    idx = np.clip(np.round(pts).astype(int), 0, np.asarray(scan.array.shape) - 1)
    hu = scan.array[idx[..., 0], idx[..., 1], idx[..., 2]].astype(float)
    g = np.clip((hu + 1000.0) / 1400.0, 0, 1)
    rgb = np.stack([g] * 3, -1)
    lo = (box[:3][keep] - centre[keep]) * sp[keep] + HALF_MM
    hi = (box[3:][keep] - centre[keep]) * sp[keep] + HALF_MM
    (r0, c0), (r1, c1) = np.round(lo).astype(int), np.round(hi).astype(int)
    n = len(grid)
    for r in (r0, r1):
        if 0 <= r < n:
            rgb[r, max(c0, 0) : min(c1, n - 1) + 1] = (1, 0, 0)
    for c in (c0, c1):
        if 0 <= c < n:
            rgb[max(r0, 0) : min(r1, n - 1) + 1, c] = (1, 0, 0)
    if axis != 0:  # coronal / sagittal: head up
        rgb = rgb[::-1]
    return transform.resize(rgb, (TILE, TILE), order=0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "whole_scan_others.png")
    entry = bundled_entry("CT")
    ck = load_checkpoint(entry["path"], entry["sha256"])
    scans = E._scans_dir(None, ck["train_config"]["data"])  # the folder `resmtnet evaluate` reads
    if scans is None:
        print(f"no whole scans beside {ck['train_config']['data']}", file=sys.stderr)
        return 1
    pred = Predictor("CT")
    rows = []
    for ws in whole_scans(scans, ck["split"], splits=("val",)):
        scan = ws.load()
        det = pred.predict(scan).above(pred.threshold)
        match = match_scan(det.centers_world_xyz(), ws.lesions)
        for k in np.nonzero(match < 0)[0]:
            b = det.boxes[k]
            c = (b[:3] + b[3:]) / 2
            f = det.findings[k] if det.findings else {}
            vol = f.get("volume_mm3")
            print(
                f"{ws.file}  rank {k + 1}  p {det.probability[k]:.3f}  world xyz "
                f"{np.round(det.centers_world_xyz()[k], 1).tolist()} mm  box {np.round(det.sizes_mm()[k], 1).tolist()}"
                f" mm (z, y, x)  mask {vol if vol is None else round(vol)} mm³"
            )
            rows.append(np.concatenate([_crop(scan, c, b, a) for a in (0, 1, 2)], 1))
    if not rows:
        print("no other detections at the threshold")
        return 0
    img = np.concatenate([np.pad(r, ((2, 2), (0, 0), (0, 0)), constant_values=1) for r in rows], 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(out, (img * 255).astype(np.uint8), check_contrast=False)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
