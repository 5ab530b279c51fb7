"""Whole-scan inference: a `Scan` (any size, spacing, orientation) -> `Detections`. Qt-free.

Pipeline (CT; radiographs take the same path in 2D, without the lung mask and with the
CXR training's own resampling and normalisation, `napari_resmtnet.io.preprocess.preprocess_radiograph`)::
    scan array ─ resample (SimpleITK, index space) ─ HU window ─┬─ sliding windows ─ stitched
                 to the model's spacing                          │  (batched, overlap)    stride-4 maps
                 └─ resample to the stride-4 cell grid ─ lung mask ┘  (windows without lung skipped)
    stitched maps ─ heatmap outside the lung set to -inf ─ decode peaks ─ NMS (torch, vectorised)
                  ─ boxes: model voxels -> world mm -> scan voxels

**Geometry.** Resampling happens in the scan's *index space*: the model grid has the scan's
origin and direction and only a different spacing, so the network sees the voxel-grid axes
(the axial plane stays the axial plane whatever the direction cosines say). Model voxel
``k`` is world point ``origin + direction @ (spacing_model * k)``, which is scan voxel
``k * spacing_model / spacing_scan``; boxes are mapped to scan voxels by that per-axis scale
and carry the scan's geometry (`Detections.geometry`), so their world millimetres are right
for any slice spacing, origin and direction (radiographs: the resampling's pixel-centre
convention, ``(k + 0.5) / zoom - 0.5``).

**Windows.** The model grid is padded (edge values) to a multiple of 4 voxels, so that the
network's stride-4 output cell ``j`` of every window lies on the global cell grid (windows
start at multiples of 4). Windows overlap by ``overlap`` voxels; every cell of the stitched
maps comes from the one window whose centre region holds it (the overlap is split in the
middle), so each cell has at least ``overlap / 2`` voxels of context on every side that is
not the scan's border. The maps are decoded once, after stitching.

**Lung mask** (CT). Computed on the stride-4 cell grid: voxels below -400 HU, minus the air
components touching the in-plane border (outside air), the two largest remaining components
(the lungs; a second one only if it is at least a tenth of the first), holes filled, dilated
by 20 mm (juxta-pleural nodules). It is used -- windows without lung are skipped and peaks
outside it dropped -- only where the scan shows a whole thorax: an in-plane field of view of
more than 150 mm on both axes and a lung volume between 200 mL and 15 L. Otherwise (a 50 mm
cube, a scan cut through the lungs) nothing is restricted.

**Memory** is bounded by the resampled volume (float32), the stride-4 maps and one batch of
windows; the scan array is not copied beyond one SimpleITK image during resampling.

Progress is reported through ``progress(fraction, stage)``; ``cancel`` (a
`threading.Event` or a callable returning True) is checked between windows and raises
`Cancelled`. Results on the CPU are deterministic (no randomness anywhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..detections import Detections
from ..errors import Cancelled, InputError
from ..scan import Scan
from .weights import load_model
from ..io.preprocess import (
    CT_WINDOW,
    MODEL_SPACING_MM,
    normalize_ct,
    normalize_cxr,
    preprocess_radiograph,
    resample_to_spacing,
)
from .. import boxes as B
from .characterise import MAX_CHARACTERISED, characterise
from ..io.formats import load_scan
from ..measurements import MIN_NODULE_MM, smaller_than_nodule

__all__ = [
    "Predictor",
    "predict",
    "Cancelled",
    "PredictionError",
    "DeviceError",
    "resolve_device",
    "lung_mask_cells",
    "scan_lung_mask",
    "window_starts",
]

#: Largest model grid (bytes) a CT may need after resampling; a whole-body CT at 1 mm
#: (500 x 500 x 2000 mm) needs about 2.4 GB, so this only refuses absurd spacings.
MAX_GRID_BYTES = 4e9

#: Hounsfield units below which a voxel counts as air/lung for the lung mask.
LUNG_HU = -400.0
#: The lung mask restricts detection only for an in-plane field of view above this (mm).
MIN_THORAX_FOV_MM = 150.0
#: ... and a lung volume in this range (mL).
LUNG_VOLUME_ML = (200.0, 15000.0)
#: In-plane closing of the lung mask (mm): fills the dent a juxta-pleural nodule makes.
LUNG_CLOSING_MM = 12.0
#: Margin around the closed lung mask (mm): a candidate touching the pleura keeps its centre in.
LUNG_MARGIN_MM = 4.0
#: Large airways: the trachea's (and a main bronchus') cross-section on an axial slice (mm^2),
#: and the trachea's largest distance from the body's left-right middle (mm).
TRACHEA_AREA_MM2 = (48.0, 900.0)
TRACHEA_MIDLINE_MM = 30.0
#: ... where the lumen's air joins the lung's on a slice, the lumen is followed through cells
#: darker than this (lung parenchyma averages about -850 HU over a 4 mm cell), and the whole
#: tree stays below this volume (mL).
AIRWAY_LUMEN_HU = -900.0
AIRWAY_MAX_ML = 80.0
#: ... followed so for at most this length (mm): the main bronchi, not the lobes' own bronchi.
AIRWAY_JOINED_MM = 48.0
#: Candidates are not searched within this distance of the large airways' lumen (mm): the
#: trachea's and main bronchi's walls, the paratracheal and hilar nodes and vessels beside them.
AIRWAY_MARGIN_MM = 8.0


@dataclass(frozen=True)
class ModalityDefaults:
    """What the `Predictor` uses for a modality unless told otherwise.

    Large windows: on a CPU the network runs about 1.7x more voxels per second on 160-256
    voxel windows than on 96-128 ones, and fewer windows means less overlap; results with
    192-256 windows match one whole-lung window (GroupNorm statistics are taken per window),
    smaller windows drift from it."""

    window: int  # largest window side (model voxels)
    overlap: int  # overlap of neighbouring windows (model voxels)
    batch_cpu: int  # windows per network call on a CPU
    batch_gpu: int  # ... on a GPU
    spacing_mm: float  # model spacing, when the weights do not record one


#: Per modality.
DEFAULTS = {
    "CT": ModalityDefaults(window=256, overlap=32, batch_cpu=1, batch_gpu=4, spacing_mm=1.0),
    "CXR": ModalityDefaults(window=512, overlap=64, batch_cpu=1, batch_gpu=4, spacing_mm=1.6),
}
_MIN_SIDE = 16  # smallest model input side (the backbone reaches stride 16)
#: Windows with fewer voxels run on one CPU thread unless ``threads`` says otherwise.
SMALL_WINDOW = 1 << 20


class PredictionError(InputError):
    """The scan cannot be run through the model (one-line message saying what and why)."""


class DeviceError(PredictionError):
    """The requested compute device is not available."""


# --- device --------------------------------------------------------------------------------


def resolve_device(device="auto"):
    """ "auto" -> CUDA when available, else CPU; "cpu", "cuda", "cuda:N" checked; -> torch.device."""
    import torch

    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available here "
                f"(torch {torch.__version__}, {build}); use --device cpu / device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type not in ("cpu", "mps"):
        raise DeviceError(f"unsupported device {device!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {device!r} requested but MPS is not available here")
    return dev


# --- windows -------------------------------------------------------------------------------


def window_starts(size: int, window: int, overlap: int, lo: int = 0, hi: int | None = None) -> tuple[list[int], int]:
    """Windows along one axis covering voxels [lo, hi) of an axis of ``size`` voxels (all
    multiples of 4): (start voxels, window side). The side is at most ``window``, as small
    as covers the range with the fewest windows, and neighbours overlap by at least
    ``overlap`` voxels; starts are multiples of 4."""
    hi = size if hi is None else hi
    if hi - lo < _MIN_SIDE:  # grow a tiny range to the smallest input the network takes
        lo = max(0, min(lo, hi - _MIN_SIDE))
        hi = min(size, lo + _MIN_SIDE)
    extent = hi - lo
    if extent <= window:
        return [lo], extent
    n = 2
    while True:
        # side such that n windows with steps of at most (side - overlap) cover the range
        side = -(-(extent + (n - 1) * overlap) // n)
        side = -(-side // 4) * 4
        step = -(-(extent - side) // (n - 1))
        step = -(-step // 4) * 4
        if side <= window and side - step >= overlap:
            break
        n += 1
    starts = [min(lo + i * step, hi - side) for i in range(n)]
    return starts, side


def _core_bounds(starts: list[int], w: int, lo_cell: int, hi_cell: int) -> list[tuple[int, int]]:
    """Per window, the cell range [a, b) it owns: overlaps are split in their middle."""
    bounds = []
    for i, s in enumerate(starts):
        a = lo_cell if i == 0 else int(round((s + starts[i - 1] + w) / 2 / 4))
        b = hi_cell if i == len(starts) - 1 else int(round((starts[i + 1] + s + w) / 2 / 4))
        bounds.append((a, b))
    return bounds


# --- lung mask -----------------------------------------------------------------------------


def lung_mask_cells(
    hu_cells: np.ndarray,
    cell_mm,
    in_plane_fov_mm,
    axial_axis: int = 0,
    head_last: bool | None = None,
    lr_axis: int | None = None,
) -> tuple[np.ndarray | None, dict]:
    """Lung mask on a coarse 3D grid of HU values, or None where the scan does not show a
    whole thorax; returns (mask or None, info dict with ``used``, ``reason``, ``volume_ml``).
    ``axial_axis``: the array axis closest to the patient's head-feet axis; air touching the
    faces of the two other axes is outside air.

    The mask follows the pleura: air-filled lung (< ``LUNG_HU``), holes filled in 3D and on
    every axial slice (vessels, nodules inside the lung), closed on each axial slice with a
    disc of ``LUNG_CLOSING_MM`` (a juxta-pleural nodule is a dent in the lung's outline that
    the closing fills), then grown by ``LUNG_MARGIN_MM`` so that a nodule touching the pleura
    keeps its centre inside. The mediastinum, heart, great vessels, chest wall and the air
    outside the body stay outside; so do the large airways and ``AIRWAY_MARGIN_MM`` around
    them (`large_airways`), where the closing would otherwise join the trachea's wall and the
    paratracheal tissue to the lung. ``head_last``: whether the head end is the axial axis's
    last index (None: unknown, both ends tried); ``lr_axis``: the left-right array axis (None:
    the last in-plane axis). All steps are 2D per slice or 3D labelling on the coarse
    grid, which keeps the mask robust on thick slices and cheap (~0.1 s on a whole chest)."""
    from scipy import ndimage
    from skimage import measure

    cell_mm = np.broadcast_to(np.asarray(cell_mm, float), (3,))
    info = {"used": False, "volume_ml": 0.0, "reason": ""}
    if min(in_plane_fov_mm) <= MIN_THORAX_FOV_MM:
        info["reason"] = (
            f"in-plane field of view {min(in_plane_fov_mm):.0f} mm <= {MIN_THORAX_FOV_MM:.0f} mm: "
            "not a whole thorax, whole image searched"
        )
        return None, info
    air = hu_cells < LUNG_HU
    lab = measure.label(air, connectivity=1)
    if lab.max() == 0:
        info["reason"] = "no air-filled region: whole image searched"
        return None, info
    faces = []
    for ax in range(3):
        if ax != axial_axis:
            faces += [np.take(lab, 0, axis=ax).ravel(), np.take(lab, -1, axis=ax).ravel()]
    border = np.unique(np.concatenate(faces))
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    counts[border] = 0
    order = np.argsort(counts)[::-1]
    keep = [order[0]] if counts[order[0]] > 0 else []
    if len(order) > 1 and counts[order[1]] > 0 and counts[order[1]] >= 0.1 * counts[order[0]]:
        keep.append(order[1])
    cell_ml = float(np.prod(cell_mm)) / 1000.0
    vol = float(sum(counts[k] for k in keep)) * cell_ml
    info["volume_ml"] = round(vol, 1)
    if not (LUNG_VOLUME_ML[0] <= vol <= LUNG_VOLUME_ML[1]):
        info["reason"] = (
            f"lung volume {vol:.0f} mL outside {LUNG_VOLUME_ML[0]:.0f}..{LUNG_VOLUME_ML[1]:.0f} mL: "
            "whole image searched"
        )
        return None, info
    lung_air = np.isin(lab, keep)
    del lab
    lung = ndimage.binary_fill_holes(lung_air)
    # per axial slice: fill holes, close with a disc (juxta-pleural dents), grow by the margin
    lung = np.moveaxis(lung, axial_axis, 0)
    plane_mm = [cell_mm[a] for a in range(3) if a != axial_axis]
    disc = _disc(LUNG_CLOSING_MM, plane_mm)
    pad = max(disc.shape)
    out = np.empty_like(lung)
    for k in range(lung.shape[0]):
        sl = lung[k]
        if not sl.any():
            out[k] = sl
            continue
        sl = ndimage.binary_fill_holes(sl)
        sl = ndimage.binary_closing(np.pad(sl, pad), disc)[pad:-pad, pad:-pad]
        out[k] = ndimage.binary_fill_holes(sl)
    lung = np.moveaxis(out, 0, axial_axis)
    if LUNG_MARGIN_MM > 0:
        dist = ndimage.distance_transform_edt(~lung, sampling=cell_mm)
        lung = dist <= LUNG_MARGIN_MM
    airways, airway_note = large_airways(hu_cells, lung_air, cell_mm, axial_axis, head_last, lr_axis)
    if airways is not None:
        lung &= ndimage.distance_transform_edt(~airways, sampling=cell_mm) > AIRWAY_MARGIN_MM
        info["airways_ml"] = round(float(airways.sum()) * cell_ml, 1)
    info["used"] = True
    info["reason"] = (
        f"lung mask ({vol:.0f} mL), closed {LUNG_CLOSING_MM:.0f} mm in-plane, "
        f"margin {LUNG_MARGIN_MM:.0f} mm; {airway_note}"
    )
    info["mask_ml"] = round(float(lung.sum()) * cell_ml, 1)
    return lung, info


def large_airways(
    hu_cells: np.ndarray,
    lung_air: np.ndarray,
    cell_mm,
    axial_axis: int = 0,
    head_last: bool | None = None,
    lr_axis: int | None = None,
) -> tuple[np.ndarray | None, str]:
    """The trachea and the main bronchi down to where they enter the lungs, or None; returns
    (mask or None, a note saying what was found).

    Start: on the axial slices within 20 mm of the lungs' head end, an air region of the
    lungs' air of a trachea's cross-section (``TRACHEA_AREA_MM2``) near the body's left-right
    middle. Followed slice by slice towards the feet: the next slice's air regions that
    overlap the airway of the slice before, as long as each stays within a trachea's
    cross-section; where the lumen joins the lung's air on a slice (a wall thinner than a
    cell, the carina, the main bronchi), through its dark cells (< ``AIRWAY_LUMEN_HU``) within
    a cell of the slice before while it keeps at least half its size, for at most
    ``AIRWAY_JOINED_MM``; then the bronchus has entered the lung and the airway stops. Elsewhere
    slice-wise 2D labelling of air (< ``LUNG_HU``) on the coarse grid, with no threshold on
    the lumen, whose cells are partly wall at 4 mm. A scan whose head end shows no trachea (a
    slab, a scan starting below the carina) keeps its mask as it is."""
    from scipy import ndimage
    from skimage import measure

    cell_mm = np.broadcast_to(np.asarray(cell_mm, float), (3,))
    plane = [a for a in range(3) if a != axial_axis]
    lr = plane[-1] if lr_axis is None or lr_axis == axial_axis else int(lr_axis)
    lr_in_plane = plane.index(lr)
    air3 = np.moveaxis(lung_air, axial_axis, 0)
    hu3 = np.moveaxis(hu_cells, axial_axis, 0)
    zs = np.nonzero(air3.any(axis=(1, 2)))[0]
    if not len(zs):
        return None, "no airway found"
    cell_area = float(np.prod([cell_mm[a] for a in plane]))
    lo, hi = (TRACHEA_AREA_MM2[0] / cell_area, TRACHEA_AREA_MM2[1] / cell_area)
    depth = max(1, int(round(20.0 / cell_mm[axial_axis])))
    cell_ml = float(np.prod(cell_mm)) / 1000.0
    labels: dict = {}

    def slice_labels(j):  # each slice's air regions, labelled once for every seed
        if j not in labels:
            labels[j] = measure.label(air3[j], connectivity=1)
        return labels[j]

    def follow(k, cur, step):
        """The airway from region ``cur`` of slice ``k`` towards the feet: (tree, cells)."""
        tree = np.zeros(air3.shape, bool)
        tree[k] = cur
        n = int(cur.sum())
        j = k + step
        joined = 0  # slices followed where the lumen's air joins the lung's
        while 0 <= j < len(air3) and air3[j].any():
            lab_j = slice_labels(j)
            near = ndimage.binary_dilation(cur)
            hit = np.unique(lab_j[near & (lab_j > 0)])
            if not len(hit):
                break
            if (np.bincount(lab_j.ravel())[hit] > hi).any():
                # joined to the lung's air on this slice (a wall thinner than a cell, the
                # carina, the main bronchi at the hila): follow the dark lumen within one
                # cell of the slice before, while it keeps its size
                down = near & air3[j] & (hu3[j] < AIRWAY_LUMEN_HU)
                joined += 1
                if not (0.5 * cur.sum() <= down.sum() <= hi) or joined * cell_mm[axial_axis] > AIRWAY_JOINED_MM:
                    break
                cur = down
            else:
                cur = np.isin(lab_j, hit)
            if (n + int(cur.sum())) * cell_ml > AIRWAY_MAX_ML:
                break
            tree[j] = cur
            n += int(cur.sum())
            j += step
        return tree, n

    best, best_n = None, 0
    for last in [True, False] if head_last is None else [bool(head_last)]:
        order = zs[::-1] if last else zs
        for k in order[:depth]:
            body = np.nonzero((hu3[k] > -500).any(axis=1 - lr_in_plane))[0]
            if not len(body):
                continue
            middle = (body[0] + body[-1]) / 2
            lab = slice_labels(k)
            for r in measure.regionprops(lab):
                if not (lo <= r.area <= hi) or abs(r.centroid[lr_in_plane] - middle) * cell_mm[lr] > TRACHEA_MIDLINE_MM:
                    continue
                tree, n = follow(k, lab == r.label, -1 if last else 1)
                if n > best_n:
                    best, best_n = tree, n
            if best is not None:
                break
        if best is not None:
            break
    ml = best_n * cell_ml
    if best is None or ml < 1.0:
        return None, "no trachea at the head end: airways not excluded"
    return np.moveaxis(
        best, 0, axial_axis
    ), f"large airways ({ml:.0f} mL) and {AIRWAY_MARGIN_MM:.0f} mm around them excluded"


def scan_lung_mask(scan: Scan, hu_cells: np.ndarray, cell_mm: float) -> tuple[np.ndarray | None, dict]:
    """`lung_mask_cells` for ``hu_cells``, the scan resampled in its index space to cells of
    ``cell_mm``: the axial axis, which end is the head, the left-right axis and the in-plane
    field of view come from the scan's geometry (array-order direction cosines: row 0 is the
    world's head-feet axis, row 2 its left-right axis)."""
    d = np.asarray(scan.direction, float)
    axial = int(np.argmax(np.abs(d[0])))  # the array axis along world z
    lr = int(np.argmax(np.abs(d[2])))
    fov = [n * s for ax, (n, s) in enumerate(zip(scan.shape, scan.spacing)) if ax != axial]
    return lung_mask_cells(hu_cells, cell_mm, fov, axial, head_last=bool(d[0, axial] > 0), lr_axis=lr)


def _disc(radius_mm: float, spacing_mm) -> np.ndarray:
    """2D disc structuring element of ``radius_mm`` on a grid of ``spacing_mm`` (2 values)."""
    r = [max(1, int(np.floor(radius_mm / s))) for s in spacing_mm]
    yy, xx = np.mgrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1]
    return (yy * spacing_mm[0]) ** 2 + (xx * spacing_mm[1]) ** 2 <= radius_mm**2 + 1e-6


# --- SimpleITK helpers ---------------------------------------------------------------------

_SITK_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64)


def _sitk_image(array: np.ndarray, spacing_arr):
    """SimpleITK image of ``array`` in index space (origin 0, identity direction)."""
    import SimpleITK as sitk

    a = array
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    elif a.dtype.type not in _SITK_DTYPES or a.dtype.byteorder == ">":
        a = a.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(a))
    img.SetSpacing(tuple(float(s) for s in spacing_arr[::-1]))
    return img


def _resample(img, spacing_arr, size_arr):
    """Linear resampling onto a grid of ``spacing_arr``/``size_arr`` (array order) with the
    same origin (index space); outside the image the nearest edge value is used."""
    import SimpleITK as sitk

    nd = img.GetDimension()
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(tuple(float(s) for s in spacing_arr[::-1]))
    f.SetSize([int(s) for s in size_arr[::-1]])
    f.SetOutputOrigin((0.0,) * nd)
    f.SetOutputDirection(tuple(np.eye(nd).ravel()))
    f.SetInterpolator(sitk.sitkLinear)
    f.SetOutputPixelType(sitk.sitkFloat32)
    f.SetUseNearestNeighborExtrapolator(True)
    return f.Execute(img)


# --- the predictor -------------------------------------------------------------------------


class _torch_threads:
    """Run a block with ``n`` torch CPU threads (None: unchanged), restoring them after."""

    def __init__(self, n):
        self.n, self.old = n, None

    def __enter__(self):
        import torch

        if self.n is not None and self.n != torch.get_num_threads():
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import torch

            torch.set_num_threads(self.old)
        return False


def _check_cancel(cancel):
    if cancel is None:
        return
    hit = cancel.is_set() if hasattr(cancel, "is_set") else bool(cancel())
    if hit:
        raise Cancelled("prediction cancelled")


class Predictor:
    """Res-MTNet on whole scans.

    Parameters
    ----------
    modality : "CT" or "CXR"
    weights : path, optional
        A weights file (``<file>.sha256`` beside it or ``sha256`` given); default: bundled.
    device : "auto" (CUDA when available, else CPU), "cpu" or "cuda[:N]".
    model, info : an already built network (with ``forward_maps``) and its info dict
        (name, version, sha256, spacing_mm, threshold); for tests and custom models.
    window : largest window side in model voxels (default 256 for CT, 512 for radiographs).
    overlap : overlap of neighbouring windows in model voxels (default 32 / 64).
    batch_size : windows per network call (default 1 on CPU, 4 on GPU).
    lung_mask : restrict CT detection to the lungs where the scan shows a whole thorax.
    score_floor : lowest detection probability kept (the candidates below the operating
        threshold are kept down to this floor, for review; never above the threshold).
    max_detections : most candidates returned per scan.
    nms_iou : IoU above which the weaker of two overlapping boxes is dropped.
    min_nodule_mm : a candidate at the operating point whose segmented mask is smaller than
        a sphere of this diameter is dropped (`measurements.MIN_NODULE_MM`: LIDC and LUNA16
        count lesions from 3 mm as nodules); 0 keeps them. Needs the mask decoder.
    threads : CPU threads for the network (default: torch's setting, but one thread for
        windows under ``SMALL_WINDOW`` voxels, e.g. radiographs and cubes: there a second
        thread saves little when the CPU is idle and costs up to 100x when it is busy).
    """

    def __init__(
        self,
        modality: str = "CT",
        weights=None,
        device="auto",
        model=None,
        info=None,
        window: int | None = None,
        overlap: int | None = None,
        batch_size: int | None = None,
        sha256: str | None = None,
        lung_mask: bool = True,
        score_floor: float = 0.05,
        max_detections: int = 100,
        nms_iou: float = 0.1,
        threads: int | None = None,
        detector_only: bool = False,
        min_nodule_mm: float = MIN_NODULE_MM,
    ):
        m = str(modality).upper()
        if m not in DEFAULTS:
            raise PredictionError(f"modality must be 'CT' or 'CXR', got {modality!r}")
        self.modality = m
        self.ndim = 3 if m == "CT" else 2
        self.device = resolve_device(device)
        d = DEFAULTS[m]
        if model is None:
            model, info = load_model(m, weights=weights, sha256=sha256, device="cpu")
        else:
            nd = getattr(getattr(model, "config", None), "spatial_dims", self.ndim)
            if nd != self.ndim:
                raise PredictionError(f"the model is {nd}D but modality {m} needs a {self.ndim}D model")
            info = dict(info or {})
            info.setdefault("name", type(model).__name__)
            info.setdefault("version", "?")
            info.setdefault("sha256", "")
            info.setdefault("modality", m)
            info.setdefault("spacing_mm", d.spacing_mm)
            info.setdefault("threshold", 0.5)
        self.model = model.to(self.device).eval()
        self.info = dict(info)
        self.spacing_mm = float(self.info.get("spacing_mm") or d.spacing_mm)
        self.window = int(window or d.window)
        self.overlap = int(d.overlap if overlap is None else overlap)
        if self.window < _MIN_SIDE or self.window % 4:
            raise PredictionError(f"window must be a multiple of 4 and at least {_MIN_SIDE}, got {self.window}")
        if self.overlap < 0 or self.overlap % 4 or self.overlap >= self.window:
            raise PredictionError(f"overlap must be a multiple of 4 in [0, window), got {self.overlap}")
        gpu = self.device.type == "cuda"
        self.batch_size = int(batch_size or (d.batch_gpu if gpu else d.batch_cpu))
        if self.batch_size < 1:
            raise PredictionError(f"batch_size must be at least 1, got {self.batch_size}")
        self.use_lung_mask = bool(lung_mask) and m == "CT"
        self.score_floor = float(score_floor)
        self.max_detections = int(max_detections)
        self.nms_iou = float(nms_iou)
        if not min_nodule_mm >= 0:
            raise PredictionError(f"min_nodule_mm must be >= 0, got {min_nodule_mm}")
        self.min_nodule_mm = float(min_nodule_mm)
        if threads is not None and int(threads) < 1:
            raise PredictionError(f"threads must be at least 1, got {threads}")
        self.threads = None if threads is None else int(threads)
        cfg = getattr(self.model, "config", None)
        self.second_stage = bool(getattr(cfg, "fpr", False)) and not detector_only
        self.size_channels = self.ndim if getattr(cfg, "size_per_axis", False) else 1
        self._characterises = bool(getattr(cfg, "attributes", False) or getattr(cfg, "fine_segmentation", False))

    # -- public ---------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The operating point recorded with the weights."""
        return float(self.info.get("threshold", 0.5))

    @property
    def model_info(self) -> dict:
        return {k: self.info.get(k) for k in ("name", "version", "sha256")}

    def predict(self, scan: Scan, progress=None, cancel=None) -> Detections:
        """All candidates above ``score_floor`` as `Detections` in the scan's voxels."""
        report = progress or (lambda f, s: None)
        self._check_scan(scan)
        timings = {}
        t0 = time.perf_counter()
        report(0.0, "preprocessing")
        _check_cancel(cancel)
        vol, hu_cells, to_scan = self._preprocess(scan)
        timings["preprocessing"] = time.perf_counter() - t0
        _check_cancel(cancel)

        t = time.perf_counter()
        mask, mask_info = None, {"used": False, "reason": "not used for radiographs" if self.ndim == 2 else "disabled"}
        if self.use_lung_mask and hu_cells is not None:
            report(0.08, "lung mask")
            mask, mask_info = scan_lung_mask(scan, hu_cells, 4 * self.spacing_mm)
        del hu_cells
        timings["lung_mask"] = time.perf_counter() - t
        _check_cancel(cancel)

        t = time.perf_counter()
        maps, win_info = self._run_windows(vol, mask, report, cancel)
        timings["network"] = time.perf_counter() - t

        t = time.perf_counter()
        report(0.95, "postprocessing")
        det = self._postprocess(maps, mask, scan, to_scan, vol)
        del vol
        timings["postprocessing"] = time.perf_counter() - t
        det.meta.update(
            {
                "model_info": self.model_info,
                "threshold": self.threshold,
                "modality": self.modality,
                "model_spacing_mm": self.spacing_mm,
                "device": str(self.device),
                "windows": win_info,
                "lung_mask": mask_info,
                "timings": {k: round(v, 4) for k, v in timings.items()},
            }
        )
        report(1.0, "done")
        return det

    # -- steps ----------------------------------------------------------------------------
    def _check_scan(self, scan):
        if not isinstance(scan, Scan):
            raise PredictionError(f"expected a Scan, got {type(scan).__name__}")
        what = f"{scan.path or scan.name}"
        if scan.modality != self.modality:
            raise PredictionError(f"{what}: a {scan.modality} scan given to the {self.modality} model")
        if scan.array.ndim != self.ndim:
            raise PredictionError(f"{what}: expected a {self.ndim}D image for {self.modality}, got shape {scan.shape}")
        if min(scan.shape) < 1 or scan.array.size == 0:
            raise PredictionError(f"{what}: empty image (shape {scan.shape})")
        sp = np.asarray(scan.spacing, float)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise PredictionError(f"{what}: voxel spacing must be positive finite mm, got {scan.spacing}")
        dirn = np.asarray(scan.direction, float)
        if not np.all(np.isfinite(dirn)) or abs(np.linalg.det(dirn)) < 1e-6:
            raise PredictionError(f"{what}: direction matrix is singular or not finite")
        if scan.array.dtype.kind not in "biuf":
            raise PredictionError(f"{what}: expected a numeric image, got dtype {scan.array.dtype}")

    def _grid(self, scan):
        """Model spacing (array order) and padded model-grid size (multiple of 4, >= 16)."""
        m = self.spacing_mm
        sp = np.asarray(scan.spacing, float)
        n = np.maximum(1, np.round(np.asarray(scan.shape) * sp / m)).astype(int)
        n = np.maximum(_MIN_SIDE, (n + 3) // 4 * 4)
        return np.full(self.ndim, m), n

    def _preprocess(self, scan):
        """-> (normalised model-grid tensor, HU on the stride-4 cell grid or None,
        (a, b): per-axis map of model voxel ``k`` to scan voxel ``a * k + b``)."""
        import torch

        sp = np.asarray(scan.spacing, float)
        if self.modality == "CXR":
            return self._preprocess_cxr(scan, sp)

        model_sp, n = self._grid(scan)
        need = float(np.prod(n.astype(float))) * 4 * 1.2  # float32 grid + the stride-4 cell grid
        if need > MAX_GRID_BYTES:
            raise PredictionError(
                f"{scan.path or scan.name}: at the model's {self.spacing_mm:g} mm the scan is a "
                f"{' x '.join(str(int(v)) for v in n)} grid ({need / 1e9:.1f} GB), more than the "
                f"{MAX_GRID_BYTES / 1e9:.0f} GB limit; check the voxel spacing {tuple(round(v, 3) for v in sp)} mm"
            )
        img = _sitk_image(scan.array, sp)
        res = _resample(img, model_sp, n)
        hu_cells = None
        if self.use_lung_mask:
            hu_cells = sitk_array(_resample(img, 4 * model_sp, n // 4))
        del img
        view = sitk_view(res)
        vol = normalize_ct(view, out=np.empty(view.shape, np.float32))
        del view, res
        np.nan_to_num(vol, copy=False, nan=-1.0, posinf=1.0, neginf=-1.0)
        return torch.from_numpy(vol), hu_cells, (model_sp / sp, np.zeros(3))

    def _preprocess_cxr(self, scan, sp):
        """Radiographs go through the CXR training's own preprocessing (block-mean + linear
        resampling to the model spacing, percentile normalisation), padded with edge values
        to a multiple of 4 pixels at the bottom/right (which moves no pixel)."""
        import torch

        a = scan.array
        if not np.all(np.isfinite(a)):
            a = np.nan_to_num(
                a.astype(np.float32), nan=float(np.nanmin(a)) if np.isfinite(a).any() else 0.0, posinf=0.0, neginf=0.0
            )
        if abs(self.spacing_mm - MODEL_SPACING_MM) < 1e-9:
            img, zoom = preprocess_radiograph(a, tuple(sp))
        else:
            img, zoom = resample_to_spacing(a, tuple(sp), target_mm=self.spacing_mm)
            img = normalize_cxr(img)
        n = np.maximum(_MIN_SIDE, (np.asarray(img.shape) + 3) // 4 * 4)
        if tuple(n) != img.shape:
            img = np.pad(img, [(0, int(n[i] - img.shape[i])) for i in range(2)], mode="edge")
        z = np.broadcast_to(np.asarray(zoom, float), (2,))
        return torch.from_numpy(np.ascontiguousarray(img, np.float32)), None, (1.0 / z, 0.5 / z - 0.5)

    def _run_windows(self, vol, mask, report, cancel):
        """Sliding windows over ``vol`` (model grid) -> stitched stride-4 maps (CPU float32)."""
        import torch

        nd = self.ndim
        size = vol.shape
        cells = [s // 4 for s in size]
        if mask is not None:  # tile only the bounding box of the lungs
            nz = (
                np.nonzero(mask.any(axis=tuple(range(1, nd))))[0],
                *[np.nonzero(mask.any(axis=tuple(a for a in range(nd) if a != ax)))[0] for ax in range(1, nd)],
            )
            region = [(int(ix[0]) * 4, (int(ix[-1]) + 1) * 4) for ix in nz]
        else:
            region = [(0, s) for s in size]
        per_axis = [window_starts(s, self.window, self.overlap, lo, hi) for s, (lo, hi) in zip(size, region)]
        wshape = [w for _, w in per_axis]
        bounds = [_core_bounds(st, w, st[0] // 4, (st[-1] + w) // 4) for st, w in per_axis]
        grid = np.stack(np.meshgrid(*[np.arange(len(st)) for st, _ in per_axis], indexing="ij"), -1).reshape(-1, nd)
        todo = []
        for ij in grid:
            start = [per_axis[a][0][ij[a]] for a in range(nd)]
            core = tuple(slice(*bounds[a][ij[a]]) for a in range(nd))
            if mask is not None and not mask[core].any():
                continue
            todo.append((start, core))
        maps = {
            "heatmap": torch.full((1, 1, *cells), -1e4, dtype=torch.float32),
            "size": torch.zeros((1, self.size_channels, *cells), dtype=torch.float32),
            "offset": torch.zeros((1, nd, *cells), dtype=torch.float32),
            "malignancy": torch.zeros((1, 1, *cells), dtype=torch.float32),
        }
        info = {
            "run": len(todo),
            "total": int(len(grid)),
            "window": wshape,
            "overlap": self.overlap,
            "grid": [int(s) for s in size],
            "region": [[int(a), int(b)] for a, b in region],
        }
        dev = self.device
        gpu = dev.type == "cuda"
        report(0.1, "network")
        done = 0
        threads = self.threads
        if threads is None and not gpu and int(np.prod(wshape)) * self.batch_size < SMALL_WINDOW:
            threads = 1
        with torch.inference_mode(), _torch_threads(threads):
            for b0 in range(0, len(todo), self.batch_size):
                _check_cancel(cancel)
                batch = todo[b0 : b0 + self.batch_size]
                x = torch.stack([vol[tuple(slice(s, s + w) for s, w in zip(st, wshape))] for st, _ in batch])
                x = x[:, None].to(dev, non_blocking=True)
                if gpu:
                    with torch.autocast("cuda", dtype=torch.float16):
                        out = self.model.forward_maps(x)
                else:
                    out = self.model.forward_maps(x)
                for k, (st, core) in enumerate(batch):
                    local = tuple(slice(c.start - s // 4, c.stop - s // 4) for c, s in zip(core, st))
                    for name, t in maps.items():
                        o = out[name]
                        if o.shape[2:] != tuple(w // 4 for w in wshape):
                            raise PredictionError(
                                f"the model's {name} map has shape {tuple(o.shape[2:])} for a "
                                f"window of {tuple(wshape)}; expected stride 4"
                            )
                        t[(0, slice(None)) + core] = o[(k, slice(None)) + local].float().cpu()
                done += len(batch)
                report(0.1 + 0.85 * done / max(1, len(todo)), "network")
        return maps, info

    def _boxes_from_masks(self, bx, findings):
        """Boxes (model voxels) sized and centred on each nodule's segmented mask where the
        model gave one: the mask follows the nodule's own outline, which the size head only
        estimates (`characterise`); a candidate without a mask keeps the size head's box."""
        import torch

        bx = bx.clone()
        for k, f in enumerate(findings):
            ext, off = f.get("mask_extent_mm"), f.get("mask_centre_offset_mm")
            if ext is None or off is None:
                continue
            c = (bx[k, :3] + bx[k, 3:]) / 2 + torch.as_tensor(off, dtype=bx.dtype) / self.spacing_mm
            h = torch.as_tensor(ext, dtype=bx.dtype) / self.spacing_mm / 2
            bx[k] = torch.cat([c - h, c + h])
            f["box_from"] = "mask"
        return bx

    def _postprocess(self, maps, mask, scan, to_scan, vol=None) -> Detections:
        import torch

        from ..model.network import decode  # lazy: the network imports torch

        if mask is not None:
            maps["heatmap"][0, 0][~torch.from_numpy(mask)] = -1e4
        floor = min(self.score_floor, self.threshold)
        dets = decode(maps, score_floor=floor, max_detections=max(200, 2 * self.max_detections))[0]
        bx, sc, mal = dets["boxes"], dets["scores"], dets["malignancy"]
        stages = {}
        if len(bx):
            keep = B.nms(bx, sc, self.nms_iou)[: (2 if self.second_stage else 1) * self.max_detections]
            bx, sc, mal = bx[keep], sc[keep], mal[keep]
        if self.second_stage and len(bx) and vol is not None:
            centres = ((bx[:, : self.ndim] + bx[:, self.ndim :]) / 2).double().numpy()
            with _torch_threads(self.threads):
                p_fpr = self.model.rescore(vol, centres).float()
            p = self.model.combine(sc.float(), p_fpr)
            order = torch.argsort(p, descending=True)
            order = order[p[order] >= floor][: self.max_detections]
            stages = {"detector": sc[order].tolist(), "second_stage": p_fpr[order].tolist()}
            bx, sc, mal = bx[order], p[order], mal[order]
        findings: list[dict] = []
        dropped = 0
        if self.ndim == 3 and len(bx) and vol is not None and self._characterises and (sc >= self.threshold).any():
            # the candidates shown at the operating point (one patch pass each, ~0.2-0.4 s on a CPU)
            n = min(int((sc >= self.threshold).sum()), MAX_CHARACTERISED)
            centres = ((bx[:n, :3] + bx[:n, 3:]) / 2).double().numpy()
            with _torch_threads(self.threads):
                findings = characterise(self.model, vol, centres, self.spacing_mm, CT_WINDOW)
            findings += [{} for _ in range(len(bx) - n)]
            bx = self._boxes_from_masks(bx, findings)
            small = {k for k, f in enumerate(findings) if smaller_than_nodule(f.get("volume_mm3"), self.min_nodule_mm)}
            if small:  # its own outline says it is no nodule (never with min_nodule_mm 0)
                keep_k = [k for k in range(len(findings)) if k not in small]
                idx = torch.as_tensor(keep_k, dtype=torch.long)
                bx, sc, mal = bx[idx], sc[idx], mal[idx]
                findings = [findings[k] for k in keep_k]
                stages = {name: [v[k] for k in keep_k] for name, v in stages.items()}
                dropped = len(small)
        bx = bx.double().numpy().reshape(-1, 2 * self.ndim)
        if len(bx):
            # model voxel k -> scan voxel a * k + b: the model grid shares the scan's origin
            # and direction, so this is the world-mm round trip model -> world -> scan.
            a, b = to_scan
            centres, sizes = B.boxes_to_centers_sizes(bx)
            bx = B.centers_sizes_to_boxes(centres * a + b, sizes * a)
        meta: dict = {"stages": stages} if stages else {}
        if dropped:
            meta["below_min_size"] = dropped
        return Detections(bx, sc.numpy(), mal.numpy(), Detections.geometry_of(scan), meta, findings)


def sitk_view(img):
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(img)


def sitk_array(img):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)


# --- one-call API --------------------------------------------------------------------------

_CACHE: dict = {}


def _cached_predictor(modality, weights, device, sha256, **kw) -> Predictor:
    key = (
        modality.upper(),
        str(weights) if weights is not None else None,
        sha256,
        str(resolve_device(device)),
        tuple(sorted(kw.items())),
    )
    p = _CACHE.get(key)
    if p is None:
        if len(_CACHE) > 4:
            _CACHE.clear()
        p = _CACHE[key] = Predictor(modality, weights=weights, device=device, sha256=sha256, **kw)
    return p


def predict(
    scan_or_path,
    *,
    modality: str | None = None,
    weights=None,
    device="auto",
    model=None,
    info=None,
    progress=None,
    cancel=None,
    sha256: str | None = None,
    **kw,
) -> Detections:
    """Detect nodules in a `Scan` or an image path (anything `napari_resmtnet.io.formats.load_scan`
    reads). Keyword arguments go to `Predictor`; the predictor for bundled or file weights
    is reused between calls."""
    if isinstance(scan_or_path, Scan):
        scan = scan_or_path
    elif isinstance(scan_or_path, (str, Path)):
        if progress:
            progress(0.0, "reading")
        scan = load_scan(scan_or_path)
    else:
        raise PredictionError(f"expected a Scan or a path, got {type(scan_or_path).__name__}")
    m = (modality or scan.modality).upper()
    if model is not None:
        pred = Predictor(m, device=device, model=model, info=info, **kw)
    else:
        pred = _cached_predictor(m, weights, device, sha256, **kw)
    return pred.predict(scan, progress=progress, cancel=cancel)
