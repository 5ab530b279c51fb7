"""Training data: CT nodule cubes (from the NODE21 cube layout or a full LUNA16 layout) and
the patient-disjoint split.

A `CubeRecord` is a 50 mm cube at 1 mm (array order z, y, x, int16 HU) with every annotated
nodule of its series that falls inside it (centres in cube voxels), so other nodules in the
cube are positives, not false positives. Malignancy labels follow the LIDC convention:
rating 1-2 benign (0), 4-5 malignant (1), 3 or unknown -1 (detection only).

Two layouts, one code path (`load_ct_records`):

* cube folder (``ct_nodule_cubes``): ``images/<uid>_dcm_<k>.mha`` + ``nodules.csv`` (+ the
  nodule masks ``masks/<uid>_seg_<k>.mha`` where present, for the segmentation term);
* LUNA16: ``subset*/<seriesuid>.mhd`` + ``annotations.csv`` (+ optional malignancy CSV with
  ``seriesuid, coordX, coordY, coordZ`` and ``malignancy_rating`` or ``diagnosis``): a cube is
  resampled with SimpleITK around each annotation, then treated exactly like a cube file.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from .readers import TEXTURE_CLASSES, labels_for, read_reader_ratings
from ..boxes import world_to_voxel_points

CUBE_MM = 50
CUBE_SPACING = 1.0


def rating_to_label(rating) -> int:
    try:
        r = float(rating)
    except (TypeError, ValueError):
        return -1
    if r in (1, 2):
        return 0
    if r in (4, 5):
        return 1
    return -1


def rating_to_score(rating) -> float:
    """LIDC rating 1-5 -> soft malignancy target (rating - 1) / 4 in [0, 1]; -1 when unknown.

    Used by ``malignancy_target: "rating"``: benign 1-2 -> 0 / 0.25, indeterminate 3 -> 0.5,
    malignant 4-5 -> 0.75 / 1. The 0.5 decision threshold still separates 1-2 from 4-5, and
    the indeterminate nodules, which the binary target must leave out, teach the ordering.
    """
    try:
        r = float(rating)
    except (TypeError, ValueError):
        return -1.0
    if not 1 <= r <= 5:
        return -1.0
    return (r - 1) / 4


def mean_to_score(mean) -> float:
    """Readers' mean malignancy (1-5) -> soft target (mean - 1) / 4; -1 when unknown. Used by
    ``malignancy_target: "readers_mean"``: every rated nodule trains, indeterminate ones at
    their own mean, and the 0.5 decision threshold is the readers'-mean definition (< 3 benign,
    > 3 malignant)."""
    try:
        m = float(mean)
    except (TypeError, ValueError):
        return -1.0
    return (m - 1) / 4 if 1 <= m <= 5 else -1.0


def mean_to_label(mean) -> int:
    """Readers'-mean label: 0 benign (< 3), 1 malignant (> 3), -1 indeterminate (= 3) or unknown."""
    try:
        m = float(mean)
    except (TypeError, ValueError):
        return -1
    if not 1 <= m <= 5 or abs(m - 3) < 1e-9:
        return -1
    return int(m > 3)


MALIGNANCY_TARGETS = ("binary", "rating", "readers_mean")


@dataclass
class CubeRecord:
    name: str
    seriesuid: str
    array: np.ndarray  # (z, y, x) int16 HU at 1 mm
    centers: np.ndarray  # (K, 3) nodule centres, cube voxels, array order
    diameters: np.ndarray  # (K,) mm (= voxels at 1 mm)
    malignant: np.ndarray  # (K,) 1 / 0 / -1
    main: int = 0  # index of the nodule the cube was cut around
    rating: float = float("nan")  # LIDC rating of the main nodule
    origin_xyz: tuple = (0.0, 0.0, 0.0)
    extra: dict = field(default_factory=dict)
    ratings: np.ndarray | None = None  # (K,) LIDC rating of each nodule, NaN when unknown
    mask: np.ndarray | None = None  # (z, y, x) uint8 mask of the main nodule, when the data has one
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # ITK direction (x, y, z)
    reader_means: np.ndarray | None = None  # (K,) every LIDC reader's mean malignancy, NaN when unknown
    attributes: np.ndarray | None = None  # (K, 4) readers' texture class, calcified, spiculated,
    #                                         ill-defined margin (`attribute_row`), -1 unknown

    @property
    def reader_mean(self) -> float:
        return float(self.reader_means[self.main]) if self.reader_means is not None else float("nan")

    @property
    def label_mean(self) -> int:
        """The main nodule's readers'-mean label (1 malignant, 0 benign, -1 indeterminate/unknown)."""
        return mean_to_label(self.reader_mean)

    def extents(self) -> np.ndarray:
        """(K, 3) per-axis extent (z, y, x) of each nodule in cube voxels (= mm at 1 mm): the
        main nodule's from its mask's bounding box where the data has one, the others'
        (and a main nodule without a mask) the annotated diameter on every axis. These are
        the size targets of a per-axis size head (`ResMTNetConfig.size_per_axis`)."""
        ext = np.repeat(np.asarray(self.diameters, np.float32).reshape(-1, 1), 3, axis=1)
        e = mask_extent(self.mask) if self.mask is not None else None
        if e is not None:
            ext[self.main] = e
        return ext

    @property
    def label(self) -> int:
        return int(self.malignant[self.main])

    @property
    def diameter(self) -> float:
        return float(self.diameters[self.main])

    def target(self, malignancy: str = "binary") -> dict:
        """Training target; ``malignancy`` "binary" (1 / 0 / -1 masked) or "rating" (soft
        score from each nodule's LIDC rating, see `rating_to_score`)."""
        if malignancy not in MALIGNANCY_TARGETS:
            raise ValueError(f"malignancy target must be one of {MALIGNANCY_TARGETS}, got {malignancy!r}")
        mal = self.malignant
        if malignancy == "rating":
            ratings = self.ratings if self.ratings is not None else np.full(len(self.diameters), np.nan)
            mal = np.array([rating_to_score(r) for r in ratings], dtype=np.float32)
        elif malignancy == "readers_mean":
            means = self.reader_means if self.reader_means is not None else np.full(len(self.diameters), np.nan)
            mal = np.array([mean_to_score(m) for m in means], dtype=np.float32)
        out = {"centers": self.centers, "diameters": self.diameters, "malignant": mal, "extents": self.extents()}
        if self.attributes is not None:
            out["attributes"] = self.attributes
        return out

    def ignore_region(self, margin: float = 2.0) -> np.ndarray:
        """(z, y, x) uint8: balls around the nodules other than the main one (radius + margin),
        which the main nodule's mask does not cover; the segmentation term leaves them out."""
        key = ("ignore", margin)
        if key in self.extra:
            return self.extra[key]
        out = np.zeros(self.array.shape, np.uint8)
        grid = np.indices(self.array.shape, dtype=np.float32)
        for k, (c, d) in enumerate(zip(self.centers, self.diameters)):
            if k == self.main:
                continue
            r2 = (float(d) / 2 + margin) ** 2
            out |= (((grid - np.asarray(c, np.float32)[:, None, None, None]) ** 2).sum(0) <= r2).astype(np.uint8)
        self.extra[key] = out
        return out


def attribute_row(labels) -> list[float]:
    """A cube's reader labels (`readers.CubeLabels`, or None) -> the attribute head's targets:
    texture class index (`model.network.TEXTURE_CLASSES` order), calcified (any pattern),
    spiculated (majority spiculation >= 3), ill-defined margin (majority margin <= 3); -1 unknown."""

    if labels is None:
        return [-1.0] * 4

    def flag(v):
        return -1.0 if v is None else float(bool(v))

    return [
        float(TEXTURE_CLASSES.index(labels.texture)) if labels.texture is not None else -1.0,
        flag(labels.calcified),
        flag(None if labels.spiculation is None else labels.spiculation >= 3),
        flag(None if labels.margin is None else labels.margin <= 3),
    ]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mask_extent(mask) -> np.ndarray | None:
    """(z, y, x) extent in voxels of the largest connected part of a binary mask (its bounding
    box, end voxels included), or None for an empty mask."""
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if not m.any():
        return None
    lab, n = ndimage.label(m)
    if n > 1:
        m = lab == (1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    idx = np.nonzero(m)
    return np.array([i.max() - i.min() + 1 for i in idx], np.float32)


def _nodules_in_cube(world_xyz, origin_xyz, shape_zyx, spacing=CUBE_SPACING, direction=None):
    """World centres (K, 3 xyz) -> cube voxel centres (K, 3 zyx) and an inside mask.

    Through the cube's header (world = origin + D @ (spacing * index), the geometry of
    `napari_resmtnet.boxes` in array order). Cubes stored with a flipped direction
    (-1, -1, 1) have their nodules at origin - index in x and y, not origin + index."""

    D = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    geom = {"spacing": [spacing] * 3, "origin": np.asarray(origin_xyz, float)[::-1], "direction": D[::-1, ::-1]}
    v = world_to_voxel_points(np.asarray(world_xyz, float).reshape(-1, 3)[:, ::-1], geom)
    inside = ((v >= 0) & (v <= np.asarray(shape_zyx) - 1)).all(1)
    return v, inside


def _pad_to_cube(arr, n=int(CUBE_MM / CUBE_SPACING)):
    """Cubes cut at the edge of their scan are padded at their far end (edge values), so
    that every cube is n^3; the origin, hence every nodule position, is unchanged."""
    pad = [(0, max(0, n - s)) for s in arr.shape]
    return np.pad(arr, pad, mode="edge") if any(p[1] for p in pad) else arr


def _records_from_series(cubes, nodules_world, diam, labels, main_index, ratings, reader_means=None, attributes=None):
    """cubes: list of (name, uid, array, origin_xyz[, direction]); nodules of the same series."""
    out = []
    for cube, mi in zip(cubes, main_index):
        name, uid, arr, origin = cube[:4]
        direction = cube[4] if len(cube) > 4 else None
        v, inside = _nodules_in_cube(nodules_world, origin, arr.shape, direction=direction)
        inside[mi] = True
        idx = np.nonzero(inside)[0]
        out.append(
            CubeRecord(
                name=name,
                seriesuid=uid,
                array=arr,
                centers=v[idx],
                diameters=diam[idx],
                malignant=labels[idx],
                main=int(np.nonzero(idx == mi)[0][0]),
                rating=ratings[mi],
                origin_xyz=tuple(origin),
                ratings=np.asarray(ratings, float)[idx],
                direction=tuple(direction) if direction is not None else CubeRecord.direction,
                reader_means=None if reader_means is None else np.asarray(reader_means, float)[idx],
                attributes=None if attributes is None else np.asarray(attributes, np.float32).reshape(-1, 4)[idx],
            )
        )
    return out


def load_cube_folder(root, limit: int | None = None, seriesuids=None) -> list[CubeRecord]:
    """Read the NODE21/LUNA16 cube layout (``images/*.mha`` + ``nodules.csv``)."""
    import SimpleITK as sitk

    root = Path(root)
    rows = _read_csv(root / "nodules.csv")
    if seriesuids is not None:
        keep = set(seriesuids)
        rows = [r for r in rows if r["seriesuid"] in keep]
    if limit:
        rows = rows[:limit]
    by_series: dict[str, list] = {}
    for r in rows:
        by_series.setdefault(r["seriesuid"], []).append(r)
    reader_mean, reader_labels = {}, {}
    if (root / "reader_ratings.csv").exists():
        reader_labels = labels_for(read_reader_ratings(root / "reader_ratings.csv"))
        reader_mean = {
            k: (v.mean_malignancy if v.mean_malignancy is not None else np.nan) for k, v in reader_labels.items()
        }
    records = []
    for uid, rs in by_series.items():
        world = np.array([[float(r["center_x_mm"]), float(r["center_y_mm"]), float(r["center_z_mm"])] for r in rs])
        diam = np.array([float(r["diameter_mm"]) for r in rs])
        labels = np.array([rating_to_label(r.get("malignancy_rating")) for r in rs])
        ratings = [
            float(r["malignancy_rating"]) if r.get("malignancy_rating") not in (None, "") else float("nan") for r in rs
        ]
        cubes, masks = [], []
        for r in rs:
            img = sitk.ReadImage(str(root / "images" / r["cube"]))
            arr = _pad_to_cube(sitk.GetArrayFromImage(img).astype(np.int16))
            cubes.append((r["cube"], uid, arr, img.GetOrigin(), img.GetDirection()))
            mpath = root / "masks" / r["cube"].replace("_dcm_", "_seg_")
            m = None
            if mpath.exists():
                m = _pad_to_cube((sitk.GetArrayFromImage(sitk.ReadImage(str(mpath))) > 0).astype(np.uint8))
                m = m if m.shape == arr.shape else None
            masks.append(m)
        means = [reader_mean.get(r["cube"], np.nan) for r in rs]
        attrs = [attribute_row(reader_labels.get(r["cube"])) for r in rs] if reader_labels else None
        recs = _records_from_series(cubes, world, diam, labels, range(len(rs)), ratings, means, attrs)
        for rec, m in zip(recs, masks):
            rec.mask = m
        records += recs
    return records


def extract_cube(image, center_xyz, size_mm=CUBE_MM, spacing=CUBE_SPACING):
    """Resample a ``size_mm`` cube at ``spacing`` centred on a world point (SimpleITK image).

    The cube is axis-aligned in world space (identity direction), like the LUNA16 cubes.
    Returns (array zyx int16, origin_xyz).
    """
    import SimpleITK as sitk

    n = int(round(size_mm / spacing))
    origin = np.asarray(center_xyz, float) - spacing * (n // 2)  # voxel n//2 is the centre, as in the cube files
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing((spacing,) * 3)
    f.SetSize((n, n, n))
    f.SetOutputOrigin(tuple(float(o) for o in origin))
    f.SetOutputDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    f.SetDefaultPixelValue(-1024)
    f.SetInterpolator(sitk.sitkLinear)
    out = f.Execute(sitk.Cast(image, sitk.sitkFloat32))
    return np.round(sitk.GetArrayFromImage(out)).astype(np.int16), tuple(origin)


def load_luna16(
    root, annotations=None, malignancy_csv=None, limit: int | None = None, seriesuids=None
) -> list[CubeRecord]:
    """Read a LUNA16 layout: ``subset*/<uid>.mhd`` + ``annotations.csv`` (+ malignancy CSV)."""
    import SimpleITK as sitk

    root = Path(root)
    ann_path = Path(annotations) if annotations else root / "annotations.csv"
    rows = _read_csv(ann_path)
    if seriesuids is not None:
        keep = set(seriesuids)
        rows = [r for r in rows if r["seriesuid"] in keep]
    mal_rows = _read_csv(malignancy_csv) if malignancy_csv else []
    scans = {p.stem: p for p in root.glob("subset*/*.mhd")}
    by_series: dict[str, list] = {}
    for r in rows:
        if r["seriesuid"] in scans:
            by_series.setdefault(r["seriesuid"], []).append(r)
    records = []
    for uid, rs in sorted(by_series.items()):
        if limit and len(records) >= limit:
            break
        world = np.array([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for r in rs])
        diam = np.array([float(r.get("diameter_mm") or 5.0) for r in rs])
        ratings, labels = [], []
        for w in world:
            best, rating = 5.0, float("nan")
            for m in mal_rows:
                if m["seriesuid"] != uid:
                    continue
                d = np.linalg.norm(w - [float(m["coordX"]), float(m["coordY"]), float(m["coordZ"])])
                if d <= best:
                    best = d
                    if m.get("malignancy_rating") not in (None, ""):
                        rating = float(m["malignancy_rating"])
                    else:
                        rating = {"benign": 1.0, "malignant": 5.0}.get(m.get("diagnosis", ""), 3.0)
            ratings.append(rating)
            labels.append(rating_to_label(rating))
        img = sitk.ReadImage(str(scans[uid]))
        cubes = []
        for k, w in enumerate(world):
            arr, origin = extract_cube(img, w)
            cubes.append((f"{uid}_ann_{k}", uid, arr, origin))
        records += _records_from_series(cubes, world, diam, np.array(labels), range(len(rs)), ratings)
    return records[:limit] if limit else records


def load_ct_records(path, limit: int | None = None, **kw) -> list[CubeRecord]:
    """Either layout, chosen from what the folder holds."""
    p = Path(path)
    if (p / "nodules.csv").exists() and (p / "images").is_dir():
        return load_cube_folder(p, limit=limit, **{k: v for k, v in kw.items() if k == "seriesuids"})
    if any(p.glob("subset*/*.mhd")):
        return load_luna16(p, limit=limit, **kw)
    raise FileNotFoundError(
        f"{p}: expected a cube folder (images/ + nodules.csv) or a LUNA16 layout (subset*/*.mhd + annotations.csv)"
    )


def split_by_series(seriesuids, val_fraction=0.2, seed=0):
    """Patient-disjoint split: each series goes wholly to train or to validation.

    Deterministic for a given seed, independent of input order: series are ranked by a hash
    of (seed, uid) and the first ``val_fraction`` go to validation.
    """
    uids = sorted(set(seriesuids))
    ranked = sorted(uids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    n_val = int(round(len(uids) * val_fraction))
    val = sorted(ranked[:n_val])
    train = sorted(ranked[n_val:])
    return train, val
