"""Nodule size the way radiology reports and guidelines measure it, from a binary mask.

A reader measures a nodule with calipers on one image: the long axis (the longest diameter)
and the short axis (the longest diameter perpendicular to it), on the axial slice where the
long axis is largest; the mean of the two is the size Lung-RADS and Fleischner use. This
module does the same on a 3D mask in array order (z, y, x) with its voxel spacing in mm, so
anisotropic CT (e.g. 0.7 x 0.7 x 5 mm) is measured in millimetres, not voxels.

How, exactly:

* the nodule's outline on a slice is skimage's marching-squares contour at level 0.5 (the
  edge half-way between inside and outside pixel centres, which is unbiased for a digitised
  disc, unlike pixel centres (too small) or pixel corners (too large));
* the outline is scaled to mm by the in-plane spacing and reduced to its convex hull
  (scipy.spatial.ConvexHull);
* long axis: the largest distance between two hull vertices (exact for the hull);
* short axis: the longest chord of the hull perpendicular to the long axis (exact: the chord
  length is piecewise linear along the long axis, so its maximum lies at a hull vertex). For
  a convex nodule this is the caliper measurement; for a concave one it is the hull's, i.e. at
  most a little larger than a chord drawn inside the nodule;
* volume: voxel count x voxel volume (mm³).

Mean diameters are returned unrounded; ``lungrads.mean_diameter`` applies the reporting
convention (one decimal) before a category is looked up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import find_contours

PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}  # plane -> array axis it is perpendicular to


@dataclass(frozen=True)
class NoduleSize:
    """Caliper measurements of one nodule (mm, mm³).

    ``slice_index`` is the index of the measured slice along the plane's normal (z for
    axial). ``long_axis_ends`` and ``short_axis_ends`` are the two end points of each
    diameter in (continuous) voxel coordinates, array order (z, y, x), ready to be drawn as
    napari line shapes with the image layer's scale.
    """

    long_axis_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_mm3: float
    plane: str
    slice_index: int
    long_axis_ends: tuple[tuple[float, float, float], tuple[float, float, float]]
    short_axis_ends: tuple[tuple[float, float, float], tuple[float, float, float]]

    def as_dict(self) -> dict:
        """Plain floats and lists, for a nodule table row or a JSON export."""
        return {
            "long_axis_mm": self.long_axis_mm,
            "short_axis_mm": self.short_axis_mm,
            "mean_diameter_mm": self.mean_diameter_mm,
            "volume_mm3": self.volume_mm3,
            "plane": self.plane,
            "slice_index": self.slice_index,
            "long_axis_ends": [list(p) for p in self.long_axis_ends],
            "short_axis_ends": [list(p) for p in self.short_axis_ends],
        }


def _spacing(spacing, ndim: int) -> np.ndarray:
    try:
        s = np.asarray(spacing, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {spacing!r}") from None
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {spacing!r}")
    return s


def _mask(mask, ndim: int, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}D array, got shape {m.shape}")
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.number)):
            raise ValueError(f"{name} must be a binary array, got dtype {m.dtype}")
        m = m != 0
    return m


def slice_diameters(mask2d, spacing=(1.0, 1.0)):
    """Long axis and perpendicular short axis (mm) of a 2D mask with (row, column) spacing.

    Returns ``(long_mm, short_mm, long_ends, short_ends)``; the ends are (row, col) pairs in
    continuous pixel coordinates. Raises ValueError for an empty mask.
    """
    m = _mask(mask2d, 2, "mask2d")
    s = _spacing(spacing, 2)
    if not m.any():
        raise ValueError("mask2d is empty: nothing to measure")
    # Contours of the padded slice (so outlines close at the array border), in pixel units.
    padded = np.pad(m.astype(np.float32), 1)
    pts = np.concatenate(find_contours(padded, 0.5)) - 1.0
    mm = pts * s
    hull = _hull(mm)
    # Long axis: the farthest pair of hull vertices.
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    long_mm = float(d[i, j])
    a, b = hull[i], hull[j]
    # Short axis: the longest hull chord perpendicular to a-b, i.e. in a frame where a-b is the
    # first axis, the largest vertical extent of the polygon over the hull's vertex abscissae.
    u = (b - a) / long_mm
    v = np.array([-u[1], u[0]])
    xy = np.stack([(hull - a) @ u, (hull - a) @ v], axis=1)
    short_mm, x0, y_lo, y_hi = _longest_vertical_chord(xy)
    lo = a + x0 * u + y_lo * v
    hi = a + x0 * u + y_hi * v
    to_px = lambda p: (float(p[0] / s[0]), float(p[1] / s[1]))  # noqa: E731
    return long_mm, float(short_mm), (to_px(a), to_px(b)), (to_px(lo), to_px(hi))


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex-hull vertices in order; a degenerate outline (all points on a line) is kept as it is."""
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        return np.unique(points, axis=0)


def _longest_vertical_chord(xy: np.ndarray):
    """Longest segment x = const inside the convex polygon ``xy`` (vertices in order).

    Returns (length, x, y_low, y_high). The extent is a concave, piecewise-linear function of
    x whose breakpoints are the vertices' x, so checking those is exact.
    """
    n = len(xy)
    if n < 3:  # a segment: its thickness across itself is zero
        return 0.0, float(xy[0, 0]), float(xy[0, 1]), float(xy[0, 1])
    p, q = xy, np.roll(xy, -1, axis=0)
    best = (-1.0, 0.0, 0.0, 0.0)
    for x in xy[:, 0]:
        lo_x, hi_x = np.minimum(p[:, 0], q[:, 0]), np.maximum(p[:, 0], q[:, 0])
        on = (lo_x <= x + 1e-9) & (x - 1e-9 <= hi_x)
        dx = q[on, 0] - p[on, 0]
        t = np.where(np.abs(dx) > 1e-12, (x - p[on, 0]) / np.where(np.abs(dx) > 1e-12, dx, 1.0), 0.0)
        ys = p[on, 1] + np.clip(t, 0, 1) * (q[on, 1] - p[on, 1])
        vertical = np.abs(dx) <= 1e-12  # an edge along x = const contributes both its ends
        ys = np.concatenate([ys, q[on, 1][vertical]])
        length = float(ys.max() - ys.min())
        if length > best[0]:
            best = (length, float(x), float(ys.min()), float(ys.max()))
    return best


#: The smallest nodule: LIDC-IDRI and LUNA16 count lesions of 3-30 mm as nodules (smaller
#: ones are "micronodules", not marked by the readers nor scored by LUNA16).
MIN_NODULE_MM = 3.0


def smaller_than_nodule(volume: float | None, min_diameter_mm: float = MIN_NODULE_MM) -> bool:
    """Whether a segmented volume (mm³) is less than a sphere of ``min_diameter_mm``; an
    unknown volume (no mask) is not evidence of anything: False."""
    if volume is None or not math.isfinite(float(volume)):
        return False
    return float(volume) < math.pi / 6.0 * float(min_diameter_mm) ** 3


def volume_mm3(mask, spacing=(1.0, 1.0, 1.0)) -> float:
    """Volume of a 3D mask: voxel count x voxel volume (mm³)."""
    m = _mask(mask, 3)
    return float(np.count_nonzero(m) * np.prod(_spacing(spacing, 3)))


def measure_nodule(mask, spacing=(1.0, 1.0, 1.0), plane: str = "axial") -> NoduleSize:
    """Long axis, perpendicular short axis, mean diameter and volume of one nodule.

    ``mask``: 3D binary array (z, y, x) of one nodule (every foreground voxel counts; pass one
    connected component). ``spacing``: voxel size (z, y, x) in mm. ``plane``: 'axial' (the
    convention of the LIDC readers and most reports), 'coronal', 'sagittal', or 'any', which
    takes the plane whose largest long axis is longest (Lung-RADS v2022 allows any plane; with
    thick slices the reformatted planes are coarse, so axial is the default).

    The measured slice is the one with the longest long axis; ties (common on a pixel grid,
    where neighbouring slices digitise to the same extent) go to the longer short axis, then
    to the larger cross-section, then to the lower index.
    """
    m = _mask(mask, 3)
    s = _spacing(spacing, 3)
    if plane not in PLANES and plane != "any":
        raise ValueError(f"plane must be one of axial, coronal, sagittal, any; got {plane!r}")
    if not m.any():
        raise ValueError("mask is empty: nothing to measure")
    planes = list(PLANES) if plane == "any" else [plane]
    best = None
    for name in planes:
        axis = PLANES[name]
        in_plane = [k for k in range(3) if k != axis]
        occupied = np.flatnonzero(m.any(axis=tuple(in_plane)))
        for idx in occupied:
            sl = np.take(m, idx, axis=axis)
            long_mm, short_mm, lends, sends = slice_diameters(sl, s[in_plane])
            key = (round(long_mm, 9), round(short_mm, 9), int(np.count_nonzero(sl)))
            if best is None or key > best[0]:
                best = (key, name, int(idx), long_mm, short_mm, lends, sends, axis, in_plane)
    assert best is not None  # the mask is not empty, so some slice was measured
    _, name, idx, long_mm, short_mm, lends, sends, axis, in_plane = best

    def to_3d(p2):
        p = [0.0, 0.0, 0.0]
        p[axis] = float(idx)
        p[in_plane[0]], p[in_plane[1]] = p2
        return tuple(p)

    return NoduleSize(
        long_axis_mm=long_mm,
        short_axis_mm=short_mm,
        mean_diameter_mm=(long_mm + short_mm) / 2,
        volume_mm3=volume_mm3(m, s),
        plane=name,
        slice_index=idx,
        long_axis_ends=(to_3d(lends[0]), to_3d(lends[1])),
        short_axis_ends=(to_3d(sends[0]), to_3d(sends[1])),
    )


def dice(pred, truth) -> float:
    """Dice overlap 2|A∩B| / (|A| + |B|) of two binary masks on the same grid; 1.0 when both
    are empty (nothing to find, nothing found)."""
    a, b = np.asarray(pred), np.asarray(truth)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    a, b = _mask(a, a.ndim, "pred"), _mask(b, b.ndim, "truth")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def relative_volume_error(pred, truth, spacing=None) -> float:
    """Signed relative volume error (V_pred - V_truth) / V_truth of two masks, or of two
    volumes in mm³ when both are numbers; take abs() for the 'volume error' of a report.
    Spacing cancels when both masks share a grid and is accepted only for symmetry."""
    if np.ndim(pred) == 0 and np.ndim(truth) == 0:
        vp, vt = float(pred), float(truth)
        if not (math.isfinite(vp) and math.isfinite(vt)) or vp < 0:
            raise ValueError(f"volumes must be finite and non-negative, got {pred!r} and {truth!r}")
    else:
        a, b = np.asarray(pred), np.asarray(truth)
        if a.shape != b.shape:
            raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
        scale = 1.0 if spacing is None else float(np.prod(_spacing(spacing, a.ndim)))
        vp = np.count_nonzero(_mask(a, a.ndim, "pred")) * scale
        vt = np.count_nonzero(_mask(b, b.ndim, "truth")) * scale
    if vt <= 0:
        raise ValueError("the reference volume is empty: relative volume error is undefined")
    return (vp - vt) / vt
