"""What the 3D view shows: the lungs as a surface and each nodule as a sphere. Qt-free.

In 3D a CT's lung window is a white block (the chest wall and the air around the patient
hide the lungs); what a reader wants to see is where the nodules lie inside the lungs. So
the 3D view shows a rough lung mask (air-like voxels inside the body, on a coarse grid)
rendered as a translucent iso-surface, and the nodules as spheres of their diameter,
coloured like their boxes (rejected ones left out).
"""
from __future__ import annotations

import numpy as np

from .layers import REVIEW_STATES, NoduleTable, nodule_colors  # noqa: F401 (REVIEW_STATES: docs)

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
    small = np.asarray(hu[::step[0], ::step[1], ::step[2]], np.float32)
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
