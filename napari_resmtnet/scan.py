"""The `Scan`: an image array with its physical geometry and modality.

Geometry is stored in **array axis order** -- (z, y, x) for a CT volume and (y, x) for a
radiograph -- which is numpy's and napari's order. ITK/SimpleITK and LUNA16 use (x, y, z)
order; `Scan.index_to_world_xyz` gives LPS world millimetres in that order for CSV output.

For an array index ``i`` (array order), the physical position in array order is::
    world = origin + direction @ (spacing * i)

with ``direction`` the (ndim, ndim) direction-cosine matrix re-ordered to array order
(rows and columns reversed from ITK's matrix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from .boxes import voxel_to_world_points, world_to_voxel_points

Modality = Literal["CT", "CXR"]


@dataclass
class Scan:
    """An image with its physical geometry.

    Attributes
    ----------
    array : np.ndarray
        (z, y, x) for CT (Hounsfield units, float32 or int16) or (y, x) for a radiograph.
    spacing : tuple of float
        Millimetres per voxel, array axis order.
    origin : tuple of float
        World position (mm) of voxel index 0, array axis order (z, y, x) / (y, x).
    direction : np.ndarray
        (ndim, ndim) direction cosines, array axis order.
    modality : "CT" or "CXR"
    path : str
        Where it was read from ("" when made in memory).
    seriesuid : str
        DICOM SeriesInstanceUID when known, else the file name without extensions.
    warnings : list of str
        What the reader repaired or assumed (e.g. a default pixel spacing).
    metadata : dict
        Anything else worth keeping (original dtype, photometric interpretation...).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    modality: Modality
    path: str = ""
    seriesuid: str = ""
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        nd = self.array.ndim
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(nd, nd)
        if len(self.spacing) != nd or len(self.origin) != nd:
            raise ValueError(
                f"spacing {self.spacing} and origin {self.origin} must have {nd} values "
                f"for an array of shape {self.array.shape}"
            )
        if self.modality not in ("CT", "CXR"):
            raise ValueError(f"modality must be 'CT' or 'CXR', got {self.modality!r}")

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def name(self) -> str:
        return self.seriesuid or "scan"

    def affine(self) -> np.ndarray:
        """(ndim+1, ndim+1) homogeneous matrix index (array order) -> world mm (array order)."""
        nd = self.ndim
        a = np.eye(nd + 1)
        a[:nd, :nd] = self.direction @ np.diag(self.spacing)
        a[:nd, nd] = self.origin
        return a

    def index_to_world(self, index) -> np.ndarray:
        """(N, ndim) array-order voxel indices (float ok) -> (N, ndim) world mm, array order."""

        return voxel_to_world_points(index, self)

    def world_to_index(self, world) -> np.ndarray:
        """(N, ndim) world mm (array order) -> (N, ndim) fractional voxel indices."""

        return world_to_voxel_points(world, self)

    def index_to_world_xyz(self, index) -> np.ndarray:
        """Voxel indices (array order) -> LPS world mm in ITK/LUNA16 order (x, y[, z])."""
        return self.index_to_world(index)[:, ::-1]

    def napari_kwargs(self) -> dict:
        """`scale`, `translate` and (when not identity) `affine` for a napari layer."""
        return napari_geometry_kwargs(self.spacing, self.origin, self.direction)


def geometry_dict(geom) -> dict:
    """The JSON-able geometry (array order) of a `Scan`, or of any object or mapping with
    ``spacing``, ``origin`` and ``direction``: the one form that detections, nodule tables,
    layer metadata and exports carry."""
    get = geom.get if isinstance(geom, dict) else lambda k: getattr(geom, k)
    nd = len(get("spacing"))
    return {
        "spacing": tuple(float(v) for v in get("spacing")),
        "origin": tuple(float(v) for v in get("origin")),
        "direction": np.asarray(get("direction"), float).reshape(nd, nd).tolist(),
    }


def napari_geometry_kwargs(spacing, origin, direction) -> dict:
    """napari layer `scale`, `translate` and (when not identity) `affine` for a geometry
    given in array order.

    napari maps data -> world as ``affine @ (translate + scale * i)``; with
    ``affine = direction`` and ``translate = direction.T @ origin`` that equals
    ``origin + direction @ (spacing * i)``.
    """
    nd = len(spacing)
    origin = np.asarray(origin, dtype=float)
    direction = np.asarray(direction, dtype=float).reshape(nd, nd)
    kw: dict[str, Any] = {"scale": tuple(float(s) for s in spacing)}
    if np.allclose(direction, np.eye(nd)):
        kw["translate"] = tuple(float(o) for o in origin)
    else:
        kw["translate"] = tuple(float(v) for v in np.linalg.solve(direction, origin))
        aff = np.eye(nd + 1)
        aff[:nd, :nd] = direction
        kw["affine"] = aff
    return kw
