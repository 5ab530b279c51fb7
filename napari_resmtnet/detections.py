"""`Detections`: the model's findings on one scan, in the scan's voxels and world millimetres.

Boxes follow `napari_resmtnet.boxes` (corner, array order, voxels of the *scan's* array).
Everything is numpy; no torch, no Qt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import boxes as B
from .scan import geometry_dict


@dataclass
class Detections:
    """N nodules found in (or drawn on) one scan.

    boxes : (N, 2*ndim) corner boxes in voxels of the scan array (array order).
    probability : (N,) detection confidence in [0, 1].
    malignancy : (N,) probability that the nodule is malignant, in [0, 1].
    geometry : dict with ``spacing``, ``origin``, ``direction`` of the scan (array order).
    findings : one dict per nodule (or an empty list: none measured) with what the model
        says about each nodule beyond box and malignancy; every key is optional:
        ``texture`` ("solid" / "part-solid" / "ground-glass", the model's call),
        ``texture_probability`` ({class: p}), ``calcified``, ``spiculated``,
        ``ill_defined_margin`` (probabilities), ``long_axis_mm``, ``short_axis_mm``,
        ``mean_diameter_mm`` (caliper measurements on the axial slice of the largest long
        axis, see `measurements`), ``volume_mm3``, ``solid_mean_diameter_mm`` (of the
        component above -300 HU), ``lungrads`` (category "1".."4B", decision support) and
        ``lungrads_reason``.
    """

    boxes: np.ndarray
    probability: np.ndarray
    malignancy: np.ndarray
    geometry: dict
    meta: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)

    def __post_init__(self):
        nd = len(self.geometry["spacing"])
        self.boxes = np.asarray(self.boxes, dtype=float).reshape(-1, 2 * nd)
        self.probability = np.asarray(self.probability, dtype=float).reshape(-1)
        self.malignancy = np.asarray(self.malignancy, dtype=float).reshape(-1)
        if not (len(self.boxes) == len(self.probability) == len(self.malignancy)):
            raise ValueError("boxes, probability and malignancy must have the same length")
        self.findings = [dict(f or {}) for f in self.findings]
        if self.findings and len(self.findings) != len(self.boxes):
            raise ValueError(f"findings: {len(self.findings)} entries for {len(self.boxes)} nodules")

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def ndim(self) -> int:
        return len(self.geometry["spacing"])

    @property
    def labels(self) -> list[str]:
        return ["malignant" if m >= 0.5 else "benign" for m in self.malignancy]

    def centers_world(self) -> np.ndarray:
        """(N, ndim) world mm, array order (z, y, x) / (y, x)."""
        return B.voxel_boxes_to_world(self.boxes, self.geometry)[0] if len(self) else np.zeros((0, self.ndim))

    def centers_world_xyz(self) -> np.ndarray:
        """(N, ndim) world mm in ITK/LUNA16 order (x, y[, z])."""
        return self.centers_world()[:, ::-1]

    def sizes_mm(self) -> np.ndarray:
        return B.voxel_boxes_to_world(self.boxes, self.geometry)[1] if len(self) else np.zeros((0, self.ndim))

    def diameter_mm(self) -> np.ndarray:
        """Equivalent diameter: mean of the box's physical extents."""
        return self.sizes_mm().mean(axis=1) if len(self) else np.zeros(0)

    def above(self, threshold: float) -> "Detections":
        k = self.probability >= threshold
        findings = [f for f, keep in zip(self.findings, k) if keep]
        return Detections(
            self.boxes[k], self.probability[k], self.malignancy[k], self.geometry, dict(self.meta), findings
        )

    @staticmethod
    def geometry_of(scan) -> dict:
        return geometry_dict(scan)
