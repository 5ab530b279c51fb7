"""What the views show, as pure geometry (Qt-free, tested without a viewer).

* **Three planes** (`plane_marks`, `plane_rectangle`, `cursor_lines`, `plane_positions`):
  the coronal and sagittal views beside the axial one show, on their current plane, a
  rectangle for each nodule box that reaches it -- its z extent snapped to the slices the
  box spans in the axial view (`display_box`) -- and the lines where the other two planes
  cross (the linked cursor). Slice index <-> millimetres goes through the image geometry
  (`point_to_voxel`, `voxel_to_point`), rounded, as `napari_resmtnet.boxes.slice_index_of`.
* **Window presets** (`WINDOW_PRESETS`, `window_limits`): lung W1500/L-600, mediastinum
  W350/L40, bone W2000/L500.
* **The 3D view**: in 3D a CT's lung window is a white block (the chest wall and the air
  around the patient hide the lungs); what a reader wants to see is where the nodules lie
  inside the lungs. So the 3D view shows a rough lung mask (air-like voxels inside the body,
  on a coarse grid, `lung_mask`) rendered as a translucent iso-surface, and each nodule as a
  wire box of its extent with one label (`nodule_boxes_3d`), coloured like its 2D box
  (rejected ones left out). `nodule_spheres` gives spheres of the nodules' diameters instead.
"""

from __future__ import annotations

import math

import numpy as np

from .boxes import voxel_to_world_points, world_to_voxel_points
from .annotations.table import REVIEW_MARKS, REVIEW_STATES, NoduleTable, nodule_colors  # noqa: F401 (REVIEW_STATES: docs)

#: voxels below this (HU) are air-like: lung parenchyma and airways, and the air outside
LUNG_HU = -400.0
#: the coarse grid of the lung mask (mm): fine enough to show the lungs' shape
LUNG_GRID_MM = 4.0


def lung_mask(hu: np.ndarray, spacing, grid_mm: float = LUNG_GRID_MM):
    """A rough lung mask of a CT on a coarse grid: air-like voxels that are not connected to
    the in-plane edges (the air around the patient), largest components first, keeping
    those of at least 5 % of the largest. Returns ``(mask (uint8), step (per axis))``: the
    mask is ``hu[::step[0], ::step[1], ::step[2]]``-shaped."""
    from scipy import ndimage

    sp = np.asarray(spacing, float)
    step = np.maximum(1, np.round(grid_mm / sp)).astype(int)
    small = np.asarray(hu[:: step[0], :: step[1], :: step[2]], np.float32)
    air = small < LUNG_HU
    lab, n = ndimage.label(air)
    if n == 0:
        return np.zeros(small.shape, np.uint8), step
    # the air around the patient touches the in-plane edges; the lungs may well touch the
    # first and last slices of a scan that does not cover the whole chest
    border = np.unique(np.concatenate([lab[:, [0, -1]].ravel(), lab[:, :, [0, -1]].ravel()]))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    sizes[border] = 0
    if sizes.max() == 0:
        return np.zeros(small.shape, np.uint8), step
    keep = sizes >= 0.05 * sizes.max()
    mask = keep[lab]
    # close small holes (vessels, nodules) so the surface is the lung's outline
    mask = ndimage.binary_closing(mask, iterations=1)
    return mask.astype(np.uint8), step


def nodule_spheres(table: NoduleTable):
    """Spheres for the nodules shown at the table's threshold, rejected ones left out:
    ``(centres (N, ndim) world mm, diameters (N,) mm, RGBA (N, 4), ids (N,))``."""
    if table is None or not len(table):
        return np.zeros((0, 3)), np.zeros(0), np.zeros((0, 4)), np.zeros(0, int)
    k = table.visible_mask() & (table.review != "rejected")
    idx = np.flatnonzero(k)
    centres = table.centers_world()[idx]
    diam = table.diameter_mm()[idx]
    colors = np.array([nodule_colors(table, i)[1] for i in idx], float).reshape(-1, 4)
    return centres, diam, colors, table.ids[idx].astype(int)


# --- three planes (axial, coronal, sagittal) ------------------------------------------------
#
# The planes are the image array's planes: axial slices are indices along array axis 0
# (z), coronal along axis 1 (y), sagittal along axis 2 (x). Everything here is in voxel
# coordinates of the image (the project's corner convention, `napari_resmtnet.boxes`), so a
# layer drawn from it takes the image's scale / translate / affine and lands in millimetres.

#: plane name -> the array axis it cuts (the plane's normal)
PLANE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
PLANES = tuple(PLANE_AXES)

#: window presets: name -> (width, level) in HU
WINDOW_PRESETS = {"lung": (1500.0, -600.0), "mediastinum": (350.0, 40.0), "bone": (2000.0, 500.0)}


def window_limits(name: str) -> tuple[float, float]:
    """Contrast limits ``(level - width/2, level + width/2)`` of a window preset."""
    if name not in WINDOW_PRESETS:
        raise KeyError(f"unknown window {name!r}; expected one of {sorted(WINDOW_PRESETS)}")
    w, level = WINDOW_PRESETS[name]
    return level - w / 2.0, level + w / 2.0


def window_of(limits, tol: float = 0.5) -> str | None:
    """The preset whose contrast limits are ``limits`` (within ``tol`` HU), else None."""
    lo, hi = (float(v) for v in limits)
    for name in WINDOW_PRESETS:
        a, b = window_limits(name)
        if abs(lo - a) <= tol and abs(hi - b) <= tol:
            return name
    return None


def box_span(box, axis: int, n: int) -> range:
    """Indices ``k`` along array ``axis`` a 3D box spans: ``lo <= k < hi`` of its extent,
    clipped to ``[0, n)``; a box thinner than a voxel gets the one nearest its centre. The
    same rule as the slices of `napari_resmtnet.annotations.table.NoduleTable.slices`, along any axis."""
    lo_f, hi_f = float(box[axis]), float(box[axis + 3])
    lo, hi = max(math.ceil(lo_f), 0), min(math.ceil(hi_f), n)
    if hi <= lo:
        c = int(min(max(round((lo_f + hi_f) / 2), 0), n - 1))
        return range(c, c + 1)
    return range(lo, hi)


def display_box(box, shape) -> np.ndarray:
    """The box as the views draw it: in-plane (y, x) extents as they are, the z extent
    snapped to the slices the box spans (first slice - 0.5 to last slice + 0.5), so that a
    coronal or sagittal rectangle covers exactly the axial slices that show the box."""
    b = np.asarray(box, float).reshape(6).copy()
    ks = box_span(b, 0, int(shape[0]))
    b[0], b[3] = ks[0] - 0.5, ks[-1] + 0.5
    return b


def plane_rectangle(box, axis: int, index: int, shape) -> np.ndarray:
    """(4, 3) voxel coordinates of the rectangle a 3D box draws on plane ``index`` of array
    ``axis`` (whether the box reaches that plane is `box_span`'s question)."""
    b = display_box(box, shape)
    a, c = (d for d in range(3) if d != axis)
    rect = np.zeros((4, 3))
    rect[:, axis] = float(index)
    rect[:, a] = [b[a], b[a], b[a + 3], b[a + 3]]
    rect[:, c] = [b[c], b[c + 3], b[c + 3], b[c]]
    return rect


def plane_marks(table: NoduleTable, axis: int, index: int):
    """The nodule marks of plane ``index`` along array ``axis``: nodules shown at the table's
    threshold whose box reaches that plane. Returns ``(rectangles [(4, 3) voxels], ids,
    edge RGBA (N, 4), text RGBA (N, 4), texts [str])``; the text is the box text of the
    axial view (`napari_resmtnet.layers.TEXT_FORMAT`)."""
    rects, ids, edge, tcol, texts = [], [], [], [], []
    if table is None or table.ndim != 3 or not len(table):
        return rects, np.zeros(0, int), np.zeros((0, 4)), np.zeros((0, 4)), texts
    n = int(table.shape[axis])
    for i in np.flatnonzero(table.visible_mask()):
        if int(index) not in box_span(table.boxes[i], axis, n):
            continue
        rects.append(plane_rectangle(table.boxes[i], axis, index, table.shape))
        ids.append(int(table.ids[i]))
        e, t = nodule_colors(table, i)
        edge.append(e)
        tcol.append(t)
        texts.append(f"{table.label[i]} {float(table.probability[i]):.2f}{REVIEW_MARKS.get(str(table.review[i]), '')}")
    return (
        rects,
        np.asarray(ids, int),
        np.asarray(edge, float).reshape(-1, 4),
        np.asarray(tcol, float).reshape(-1, 4),
        texts,
    )


def point_to_voxel(point_world, geometry, shape) -> np.ndarray:
    """The voxel (integer index per array axis, clipped to the image) nearest a world
    position (array order, mm); rounded, so floating-point noise never falls between
    slices (see `napari_resmtnet.boxes.slice_index_of`)."""
    v = world_to_voxel_points(np.asarray(point_world, float).reshape(1, -1)[:, -3:], geometry)[0]
    v = np.where(np.isfinite(v), v, 0.0)
    return np.clip(np.round(v), 0, np.asarray(shape[-3:]) - 1).astype(int)


def voxel_to_point(voxel, geometry) -> np.ndarray:
    """World position (array order, mm) of a voxel index (the inverse of `point_to_voxel`
    on the voxel grid)."""
    return voxel_to_world_points(np.asarray(voxel, float).reshape(1, 3), geometry)[0]


def plane_positions(point_world, geometry, shape) -> dict:
    """Where the three planes through a world position are: ``{plane: (index, mm)}``, the
    slice index along the plane's axis and the world coordinate (mm) of that slice along
    the same axis (for an axial CT: the table position ``z`` of the slice)."""
    v = point_to_voxel(point_world, geometry, shape)
    w = voxel_to_point(v, geometry)
    return {p: (int(v[a]), float(w[a])) for p, a in PLANE_AXES.items()}


def positions_text(point_world, geometry, shape) -> str:
    """One status line of the planes' positions, e.g. ``axial 33/47 z -612.5 mm · coronal
    ...``: the slice index and the last index (as napari's slider shows them) and the
    slice's world position."""
    pos = plane_positions(point_world, geometry, shape)
    names = {"axial": "z", "coronal": "y", "sagittal": "x"}
    return " \u00b7 ".join(
        f"{p} {k}/{int(shape[PLANE_AXES[p]]) - 1} {names[p]} {mm:.1f} mm" for p, (k, mm) in pos.items()
    )


def cursor_lines(axis: int, voxel, shape) -> dict:
    """The lines where the other two planes through ``voxel`` cross the plane of array
    ``axis`` at ``voxel[axis]``: ``{plane name: (2, 3) voxel end points}``, across the whole
    image (the linked cursor of a three-plane view)."""
    v = np.asarray(voxel, float)
    out = {}
    for name, other in PLANE_AXES.items():
        if other == axis:
            continue
        along = next(d for d in range(3) if d not in (axis, other))
        line = np.tile(v, (2, 1))
        line[:, along] = [-0.5, float(shape[along]) - 0.5]
        out[name] = line
    return out


# --- the 3D view: boxes ------------------------------------------------------------------------

#: the 12 edges of a box, as pairs of corner numbers (corner bits: z, y, x = high or low)
_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def box_edges_world(box, geometry, shape) -> np.ndarray:
    """(12, 2, 3) napari vectors (start, direction) in world mm of a 3D box's edges (its
    `display_box`), for a Vectors layer: a wire box, whatever the image's direction."""
    b = display_box(box, shape)
    corners = np.array([[b[3 * ((k >> (2 - d)) & 1) + d] for d in range(3)] for k in range(8)], float)
    w = voxel_to_world_points(corners, geometry)
    return np.stack([np.stack([w[a], w[b2] - w[a]]) for a, b2 in _EDGES])


def nodule_boxes_3d(table: NoduleTable):
    """Wire boxes for the nodules shown at the table's threshold, rejected ones left out:
    ``(vectors (12 N, 2, 3) world mm, edge RGBA (12 N, 4), label anchors (N, 3) world mm,
    texts [str], ids (N,))``. One label per nodule, at the box's top corner (largest z,
    smallest y and x) -- not one per slice."""
    empty = (np.zeros((0, 2, 3)), np.zeros((0, 4)), np.zeros((0, 3)), [], np.zeros(0, int))
    if table is None or table.ndim != 3 or not len(table):
        return empty
    idx = np.flatnonzero(table.visible_mask() & (table.review != "rejected"))
    if not len(idx):
        return empty
    vec, col, anchors, texts = [], [], [], []
    for i in idx:
        vec.append(box_edges_world(table.boxes[i], table.geometry, table.shape))
        col.append(np.tile(nodule_colors(table, i)[1], (12, 1)))
        b = display_box(table.boxes[i], table.shape)
        anchors.append(voxel_to_point([b[3], b[1], b[2]], table.geometry))
        texts.append(f"{table.label[i]} {float(table.probability[i]):.2f}")
    return (
        np.concatenate(vec),
        np.concatenate(col).astype(float),
        np.asarray(anchors, float),
        texts,
        table.ids[idx].astype(int),
    )
