"""The project's one box convention, and the only place that converts boxes.

**Convention ("corner, array order"):** a box is ``(z0, y0, x0, z1, y1, x1)`` in 3D and
``(y0, x0, y1, x1)`` in 2D -- the minimum corner then the maximum corner, in array axis
order (napari's order). Coordinates are continuous voxel indices where voxel ``i`` has its
centre at ``i``; a nodule of diameter ``d`` voxels centred at ``c`` is ``(c - d/2, c + d/2)``.

Inside the model boxes are in voxels of the model's input grid; at the edges of the program
(CSV/JSON, napari layers) they are in world millimetres. Conversions go through the named
functions below, which take the geometry of a `napari_resmtnet.scan.Scan`.

Array math here is numpy; `box_iou` and `nms` also accept torch tensors and are vectorised
(no Python loop over boxes).
"""

from __future__ import annotations

import numpy as np


def ndim_of(boxes) -> int:
    n = boxes.shape[-1]
    if n not in (4, 6):
        raise ValueError(f"boxes must have 4 (2D) or 6 (3D) columns, got shape {tuple(boxes.shape)}")
    return n // 2


def centers_sizes_to_boxes(centers, sizes):
    """(N, d) centres and (N, d) or (N,) sizes -> (N, 2d) corner boxes (same units)."""
    c = np.asarray(centers, dtype=float).reshape(-1, np.shape(centers)[-1] if np.ndim(centers) else 1)
    s = np.asarray(sizes, dtype=float)
    if s.ndim == 1:
        s = np.repeat(s[:, None], c.shape[1], axis=1)
    return np.concatenate([c - s / 2, c + s / 2], axis=1)


def boxes_to_centers_sizes(boxes):
    """(N, 2d) corner boxes -> ((N, d) centres, (N, d) sizes)."""
    b = np.asarray(boxes, dtype=float)
    d = ndim_of(b)
    lo, hi = b[:, :d], b[:, d:]
    return (lo + hi) / 2, hi - lo


def box_iou(a, b):
    """IoU matrix (N, M) between corner boxes ``a`` (N, 2d) and ``b`` (M, 2d); numpy or torch."""
    d = ndim_of(a)
    if hasattr(a, "clamp"):  # torch
        lo = torch_max(a[:, None, :d], b[None, :, :d])
        hi = torch_min(a[:, None, d:], b[None, :, d:])
        inter = (hi - lo).clamp(min=0).prod(-1)
        va = (a[:, d:] - a[:, :d]).clamp(min=0).prod(-1)
        vb = (b[:, d:] - b[:, :d]).clamp(min=0).prod(-1)
        return inter / (va[:, None] + vb[None, :] - inter).clamp(min=1e-9)
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    lo = np.maximum(a[:, None, :d], b[None, :, :d])
    hi = np.minimum(a[:, None, d:], b[None, :, d:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    va = np.clip(a[:, d:] - a[:, :d], 0, None).prod(-1)
    vb = np.clip(b[:, d:] - b[:, :d], 0, None).prod(-1)
    return inter / np.maximum(va[:, None] + vb[None, :] - inter, 1e-9)


def torch_max(x, y):
    import torch

    return torch.maximum(x, y)


def torch_min(x, y):
    import torch

    return torch.minimum(x, y)


def nms(boxes, scores, iou_threshold: float = 0.1):
    """Greedy non-maximum suppression, vectorised; returns kept indices by decreasing score.

    Works on torch tensors (returns a LongTensor) or numpy arrays (returns an int array).
    The greedy result is the unique fixed point of ``keep[i] = not any(keep[j] and
    iou[j, i] > t for j ranked before i)``; it is reached by iterating that rule on the whole
    IoU matrix at once (at most N, in practice a handful of, matrix steps).
    """
    is_torch = hasattr(boxes, "clamp")
    if is_torch:
        import torch

        if boxes.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=boxes.device)
        order = torch.argsort(scores, descending=True, stable=True)
        iou = box_iou(boxes[order], boxes[order])
        over = torch.triu(iou > iou_threshold, diagonal=1)  # over[j, i]: j ranked before i
        keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
        for _ in range(len(order)):
            new = ~(over & keep[:, None]).any(0)
            if torch.equal(new, keep):
                break
            keep = new
        return order[keep]
    boxes = np.asarray(boxes, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if len(boxes) == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(boxes[order], boxes[order])
    over = np.triu(iou > iou_threshold, k=1)
    keep = np.ones(len(order), dtype=bool)
    for _ in range(len(order)):
        new = ~(over & keep[:, None]).any(0)
        if np.array_equal(new, keep):
            break
        keep = new
    return order[keep]


# --- voxel <-> world -----------------------------------------------------------------------


def _geometry(scan_or_geom):
    s = scan_or_geom
    if isinstance(s, dict):
        return np.asarray(s["spacing"], float), np.asarray(s["origin"], float), np.asarray(s["direction"], float)
    return np.asarray(s.spacing, float), np.asarray(s.origin, float), np.asarray(s.direction, float)


def voxel_to_world_points(points, geom):
    """(N, d) array-order voxel coordinates -> (N, d) world mm (array order)."""
    sp, org, dirn = _geometry(geom)
    p = np.atleast_2d(np.asarray(points, dtype=float))
    return p * sp @ dirn.T + org


def world_to_voxel_points(points, geom):
    """(N, d) world mm (array order) -> (N, d) fractional voxel coordinates (array order)."""
    sp, org, dirn = _geometry(geom)
    w = np.atleast_2d(np.asarray(points, dtype=float)) - org
    return np.linalg.solve(dirn, w.T).T / sp


def voxel_boxes_to_world(boxes, geom):
    """Corner boxes in voxels -> (centres (N, d) world mm, sizes (N, d) mm along array axes).

    A box that is axis-aligned in the voxel grid stays a box of the same physical extents
    along the grid axes; with a non-identity direction it is rotated in world space, so the
    world form is centre + per-axis size rather than world corners.
    """
    sp, _, _ = _geometry(geom)
    c, s = boxes_to_centers_sizes(np.atleast_2d(boxes))
    return voxel_to_world_points(c, geom), s * sp


def world_to_voxel_boxes(centers_mm, sizes_mm, geom):
    """World centres (N, d, array order) and per-axis sizes in mm -> voxel corner boxes."""
    sp, _, _ = _geometry(geom)
    c = world_to_voxel_points(centers_mm, geom)
    s = np.atleast_2d(np.asarray(sizes_mm, dtype=float))
    if s.shape[1] == 1:
        s = np.repeat(s, c.shape[1], axis=1)
    return centers_sizes_to_boxes(c, s / sp)


def slice_index_of(world_point, geom, n_slices: int, axis: int = 0) -> int:
    """The slice (integer index along array ``axis``) nearest a world position (array
    order, mm), clipped to ``[0, n_slices)``.

    This is the one place a viewer position becomes a slice number: the position is
    converted with the scan's own geometry and *rounded*, so floating-point noise in the
    position (``origin + k * spacing`` is rarely exact: ``29.000000000000014``) can never
    put it between slices.
    """
    v = world_to_voxel_points(np.asarray(world_point, dtype=float).reshape(1, -1), geom)[0]
    k = v[axis]
    if not np.isfinite(k):
        return 0
    return int(min(max(int(np.floor(k + 0.5)), 0), int(n_slices) - 1))
