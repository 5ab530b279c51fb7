"""Whole chest CTs with their lesions: the whole-scan split, hard negatives and the per-scan
evaluation (false positives per scan, lesion found). Qt-free.

The cubes teach what a nodule looks like; only whole scans show what the detector must *not*
call a nodule: mediastinum, hila, heart, airways, chest wall, fissures, vessels on thick
slices. The data folder ``ct_scans/`` holds such scans (``scans.csv``) and their labelled
lesions (``lesions.csv``: world-mm centre and box size, ``kind`` nodule or tumour_box), and the
sample ``lung1`` with its label mask.

**Split** (`scan_split`): a LIDC slab of a LUNA16 series goes where that series' cubes go (the
series uid in the weights' split), so no patient is in both; the other scans are assigned in
`WHOLE_SCAN_SPLIT` (training: the thin-slice whole chest, the largest source of negatives;
validation: the contrast chest CT, the 8 mm chest CT and the slab of a non-LUNA16 series);
``lung1`` is the test scan that no training or threshold choice reads.

**Matching**: a detection is on a lesion when its centre lies within the lesion's box grown by
`LESION_MARGIN_MM` or within max(radius, 5 mm) of its centre; every other detection counts as
a false positive (nothing outside a labelled lesion is known to be a nodule).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..scan import Scan
from ..io.formats import load_scan
from ..metrics import froc
from ..inference.predictor import _resample, _sitk_image, scan_lung_mask, sitk_array

#: Scans that are not LIDC slabs: which split they belong to.
WHOLE_SCAN_SPLIT = {
    "ricord_419639-000082.nii.gz": "train",
    "cptac_lscc_C3N-00247.nii.gz": "val",
    "lungpetctdx_A0002_3-B40f-10983.nii.gz": "val",
    "lung1_image.nrrd": "test",
}
LESION_MARGIN_MM = 5.0
LUNG1 = ("lung1_image.nrrd", "lung1_label.nrrd")


@dataclass
class Lesion:
    centre_xyz: np.ndarray  # world mm (x, y, z)
    size_xyz: np.ndarray  # box size mm (x, y, z)
    kind: str = "nodule"

    def hits(self, centres_xyz) -> np.ndarray:
        """Which world points (K, 3 xyz) lie on this lesion (box + margin, or near its centre)."""
        c = np.asarray(centres_xyz, float).reshape(-1, 3)
        inside = (np.abs(c - self.centre_xyz) <= self.size_xyz / 2 + LESION_MARGIN_MM).all(1)
        near = np.linalg.norm(c - self.centre_xyz, axis=1) <= max(float(self.size_xyz.max()) / 2, 5.0)
        return inside | near


@dataclass
class WholeScan:
    file: str
    series_uid: str
    split: str
    path: Path
    lesions: list = field(default_factory=list)
    _scan: Scan | None = field(default=None, repr=False, compare=False)

    def load(self) -> Scan:
        """The scan, read once (mining, negative crops and the second stage's candidates all
        start from it)."""
        if self._scan is None:
            self._scan = load_scan(self.path)
        return self._scan


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _lung1_lesion(label_path) -> Lesion:
    """The lung1 nodule from its label mask: world-mm centre and extent of the mask's box."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(label_path))
    a = sitk.GetArrayFromImage(img) > 0
    idx = np.nonzero(a)
    lo = np.array([i.min() for i in idx], float)[::-1]  # x, y, z index
    hi = np.array([i.max() for i in idx], float)[::-1]
    pts = [img.TransformContinuousIndexToPhysicalPoint(tuple(v)) for v in (lo, hi)]
    sp = np.asarray(img.GetSpacing(), float)
    D = np.abs(np.asarray(img.GetDirection(), float).reshape(3, 3))
    size = D @ ((hi - lo + 1) * sp)
    return Lesion((np.asarray(pts[0]) + np.asarray(pts[1])) / 2, size, "nodule")


def lung1_lesion(root) -> Lesion:
    return _lung1_lesion(Path(root) / LUNG1[1])


def scan_split(file: str, series_uid: str, cube_split: dict | None) -> str:
    if file in WHOLE_SCAN_SPLIT:
        return WHOLE_SCAN_SPLIT[file]
    if cube_split is not None:
        if series_uid in set(cube_split.get("train", ())):
            return "train"
        if series_uid in set(cube_split.get("val", ())):
            return "val"
    return "val"  # a series without cubes: never trained on


def whole_scans(root, cube_split: dict | None = None, splits=("train", "val", "test")) -> list[WholeScan]:
    """The scans of ``root`` (the ``ct_scans`` folder) in the given splits, with their lesions."""
    root = Path(root)
    lesions: dict[str, list] = {}
    for r in _read_csv(root / "lesions.csv"):
        lesions.setdefault(r["scan"], []).append(
            Lesion(
                np.array([float(r[f"center_{a}_mm"]) for a in "xyz"]),
                np.array([float(r[f"size_{a}_mm"]) for a in "xyz"]),
                r["kind"],
            )
        )
    out = []
    for r in _read_csv(root / "scans.csv"):
        split = scan_split(r["file"], r["series_uid"], cube_split)
        if split in splits:
            out.append(WholeScan(r["file"], r["series_uid"], split, root / r["file"], lesions.get(r["file"], [])))
    if "test" in splits and (root / LUNG1[0]).exists():
        out.append(WholeScan(LUNG1[0], "lung1", "test", root / LUNG1[0], [_lung1_lesion(root / LUNG1[1])]))
    return out


def match_scan(centres_xyz, lesions) -> np.ndarray:
    """Per detection: index of the lesion it lies on, or -1 (a false positive)."""
    c = np.asarray(centres_xyz, float).reshape(-1, 3)
    out = np.full(len(c), -1, int)
    for j, les in enumerate(lesions):
        h = les.hits(c) & (out < 0)
        out[h] = j
    return out


def evaluate_scans(predictor, scans, thresholds=None) -> dict:
    """Run ``predictor`` (a `napari_resmtnet.inference.predictor.Predictor`) over whole scans.

    Returns per scan the candidates (score, lesion index), the detections at each threshold
    (lesions found, other detections), the box of the best hit (size per axis, mm) and timing;
    plus a FROC against false positives per scan (lesion-level sensitivity, each lesion
    counted once, further hits on it ignored)."""
    import time

    per_scan, curve = {}, []
    n_lesions = 0
    for ws in scans:
        scan = ws.load()
        t = time.perf_counter()
        det = predictor.predict(scan)
        dt = time.perf_counter() - t
        c = det.centers_world_xyz() if len(det) else np.zeros((0, 3))
        m = match_scan(c, ws.lesions)
        s = det.probability
        seen, mm = set(), m.copy()
        for i in np.argsort(-s, kind="stable"):
            if m[i] >= 0:
                mm[i] = -2 if m[i] in seen else m[i]
                seen.add(int(m[i]))
        curve.append((s, mm))
        n_lesions += len(ws.lesions)
        entry = {
            "split": ws.split,
            "n_lesions": len(ws.lesions),
            "seconds": round(dt, 2),
            "lung_mask": det.meta.get("lung_mask", {}).get("reason", ""),
            "scores": [round(float(v), 4) for v in s],
            "match": mm.tolist(),
        }
        if det.meta.get("stages"):
            entry["stages"] = {k: [round(float(v), 4) for v in vals] for k, vals in det.meta["stages"].items()}
        if len(ws.lesions) and (m >= 0).any():
            best = int(np.argmax(np.where(m >= 0, s, -1)))
            entry["best_hit"] = {
                "score": float(s[best]),
                "rank": int((s > s[best]).sum()) + 1,
                "size_xyz_mm": det.sizes_mm()[best][::-1].round(1).tolist(),
                "lesion_size_xyz_mm": ws.lesions[int(m[best])].size_xyz.round(1).tolist(),
            }
        for thr in thresholds or []:
            k = s >= thr
            entry[f"at_{thr:.4f}"] = {
                "found": int(len(set(mm[k & (mm >= 0)].tolist()))),
                "other": int((k & (mm == -1)).sum()),
            }
        per_scan[ws.file] = entry
    fr = froc(curve, n_lesions)  # lesion-level, one FROC point per false positive per scan
    return {
        "scans": per_scan,
        "froc_per_scan": {
            "fp_rates": fr["fp_rates"],
            "sensitivity": fr["sensitivity"],
            "n_lesions": n_lesions,
            "n_scans": len(curve),
        },
        "curve": {
            "scores": fr["curve"]["scores"],
            "fp_per_scan": fr["curve"]["fp_per_image"],
            "sensitivity": fr["curve"]["sensitivity"],
        },
    }


def fp_per_scan_at(result: dict, threshold: float) -> float:
    s = np.asarray(result["curve"]["scores"])
    fp = np.asarray(result["curve"]["fp_per_scan"])
    k = s >= threshold
    return float(fp[k].max()) if k.any() else 0.0


# --- training negatives ------------------------------------------------------------------------


def model_grid_hu(scan: Scan, spacing_mm: float = 1.0):
    """The scan resampled as the `Predictor` sees it (index space, ``spacing_mm`` voxels, edge
    values outside): (int16 HU array, per-axis factor ``a`` with scan voxel = a * model voxel)."""

    sp = np.asarray(scan.spacing, float)
    n = np.maximum(1, np.round(np.asarray(scan.shape) * sp / spacing_mm)).astype(int)
    img = _sitk_image(scan.array, sp)
    hu = sitk_array(_resample(img, np.full(3, spacing_mm), n))
    return np.clip(np.round(hu), -2048, 4000).astype(np.int16), spacing_mm / sp


@dataclass
class NegativeScan:
    """A training whole scan on the model grid with the points to cut negative crops around
    and its lesions (model voxels, array order; extents per axis in voxels)."""

    name: str
    hu: np.ndarray
    points: np.ndarray  # (P, 3) crop centres
    lesion_centres: np.ndarray  # (L, 3)
    lesion_extents: np.ndarray  # (L, 3)


def negative_pool(
    scans, spacing_mm: float = 1.0, mined: dict | None = None, n_random: int = 600, seed: int = 0
) -> list[NegativeScan]:
    """Crop centres for hard negatives on whole training scans: the detector's own candidates
    (``mined``: file -> (K, 3) world xyz, off the lesions), voxels of dense structure inside the
    lung mask (vessels, fissures, pleura: HU > -600) and lung voxels at random."""

    rng = np.random.default_rng(seed)
    out = []
    for ws in scans:
        scan = ws.load()
        hu, a = model_grid_hu(scan, spacing_mm)
        mask, _ = scan_lung_mask(scan, hu[::4, ::4, ::4].astype(np.float32), 4 * spacing_mm)
        pts = []
        if mask is not None:
            lung = np.argwhere(mask) * 4
            dense = lung[hu[tuple(lung.T)] > -600]
            for src, k in ((dense, n_random), (lung, n_random // 3)):
                if len(src):
                    pts.append(src[rng.choice(len(src), min(k, len(src)), replace=False)].astype(float))
        m = np.asarray((mined or {}).get(ws.file, []), float).reshape(-1, 3)
        if len(m):
            pts.append(scan.world_to_index(m[:, ::-1]) / a)
        pts = np.concatenate(pts) if pts else np.zeros((0, 3))
        lc = np.array([scan.world_to_index(les.centre_xyz[::-1][None])[0] / a for les in ws.lesions]).reshape(-1, 3)
        D = np.abs(np.asarray(scan.direction, float))
        le = np.array([D.T @ les.size_xyz[::-1] / spacing_mm for les in ws.lesions]).reshape(-1, 3)
        out.append(NegativeScan(ws.file, hu, pts, lc, le))
    return out


def negative_crop(neg: NegativeScan, point, side: int = 50):
    """(side^3 int16 crop centred on ``point`` (edge-padded), lesion centres inside it (K, 3)
    in crop voxels, their extents (K, 3))."""
    c = np.round(np.asarray(point, float)).astype(int)
    lo = c - side // 2
    idx = [np.clip(np.arange(l, l + side), 0, n - 1) for l, n in zip(lo, neg.hu.shape)]
    crop = neg.hu[np.ix_(*idx)]
    lc = neg.lesion_centres - lo
    inside = ((lc >= 0) & (lc <= side - 1)).all(1) if len(lc) else np.zeros(0, bool)
    return crop, lc[inside], neg.lesion_extents[inside]


def mine_candidates(predictor, scans, floor: float = 0.05) -> dict:
    """The detector's own candidates (score >= ``floor``) on each scan that lie on no labelled
    lesion: file -> (K, 3) world xyz. These are its false positives, the hard negatives."""
    out = {}
    for ws in scans:
        det = predictor.predict(ws.load())
        det = det.above(floor)
        c = det.centers_world_xyz() if len(det) else np.zeros((0, 3))
        out[ws.file] = c[match_scan(c, ws.lesions) < 0]
    return out
