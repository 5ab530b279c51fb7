"""Nodules as napari layers, and back. Qt-free: pure functions on numpy arrays and dicts.

The truth is a `NoduleTable`: one row per nodule with its box in voxels of the image array
(the project's corner convention, `napari_resmtnet.boxes`), the model's probability and
malignancy, the radiologist's label, source and review state. Napari layers are a *view*
of that table, regenerated from it after every edit.

Why a Shapes layer with one rectangle per slice for CT (rather than Points with a size and
``out_of_slice_display``): a rectangle shows the actual in-plane extents of the 3D box on
every slice it spans, and napari's select tool lets the radiologist move and resize it
directly. Points would only show a circle of one size that fades away from the centre
slice, and its size handle cannot express a non-cubic box. Each rectangle carries its
nodule's ``id`` (and ``slice``) in the layer ``features``; editing the rectangle on any one
slice changes the in-plane extents of the 3D box, and all its rectangles are regenerated
from the table. Deleting any of a nodule's rectangles deletes the nodule. A radiograph
nodule is a single rectangle.

Layers live in the image's millimetres: they get the image's ``scale``, ``translate`` and
``affine`` (`Scan.napari_kwargs`), so layer data coordinates are voxel indices of the image.

Findings beyond box and malignancy (`Detections.findings`: texture, calcification,
spiculation, margin, caliper sizes, volume, the model's Lung-RADS) ride along per nodule in
``NoduleTable.findings``, exactly as the model gave them; the reader's texture override is a
separate column (``texture_override``), so both calls are kept. The Lung-RADS category shown
and exported (`NoduleTable.grade`) is recomputed from the effective type (the override if
set, else the model's) and the size, and is always decision support:

* size: the model's measured mean diameter (or long and short axis) when there is one, else
  the box's equivalent diameter; the grade says which (``size_from`` "measured" / "box");
* a resize of the box (in plane or in z) drops the model's size measurements of that nodule
  (and the model's own category): they were measured on the model's segmentation, which the
  reader has just said was the wrong extent, and a category from them would disagree with the
  box on screen; a move that keeps the size keeps them; texture and probabilities always stay;
* a part-solid nodule of 6 mm or more whose solid component was not measured is
  *undetermined* (category ""), never guessed;
* calcification: the model's head says "calcified" of any pattern, while Lung-RADS 1 needs a
  benign pattern (complete, central, popcorn, concentric) or fat. The model's flag therefore
  never gives category 1: the grade reports it beside the category (``calcified``) and in the
  reason, for the reader to judge;
* radiographs are not graded (Lung-RADS is for screening CT).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .. import boxes as B
from .. import lungrads as LR
from ..detections import Detections
from ..scan import geometry_dict

LABELS = ("benign", "malignant")
SOURCES = ("model", "user")
#: The reader's decision on a nodule. ``reviewed`` (in files) means "accepted".
REVIEW_STATES = ("unreviewed", "accepted", "rejected")
#: Edge colour of a rejected nodule (grey: still visible, clearly set aside).
REJECTED_RGB = (0.55, 0.55, 0.55)
#: RGB colours of the two labels (also used by the widget's legend).
LABEL_RGB = {"benign": (0.20, 0.85, 0.30), "malignant": (0.95, 0.20, 0.20)}
#: findings that are a probability in [0, 1] (the model's heads)
FINDING_PROBABILITIES = ("calcified", "spiculated", "ill_defined_margin")
#: findings that are sizes the model measured on its segmentation (mm, mm³): dropped when the
#: reader resizes the box
FINDING_SIZES = ("long_axis_mm", "short_axis_mm", "mean_diameter_mm", "volume_mm3", "solid_mean_diameter_mm")
#: the model's own Lung-RADS, computed from its sizes (dropped with them)
FINDING_GRADE = ("lungrads", "lungrads_reason")
#: flat columns (layer features, CSV) of the numeric findings: column -> findings key (and
#: texture class for ``texture_probability``)
FLAT_FINDINGS = {
    "p_solid": ("texture_probability", "solid"),
    "p_part_solid": ("texture_probability", "part-solid"),
    "p_ground_glass": ("texture_probability", "ground-glass"),
    "p_calcified": ("calcified", None),
    "p_spiculated": ("spiculated", None),
    "p_ill_defined_margin": ("ill_defined_margin", None),
    **{k: (k, None) for k in FINDING_SIZES},
}
#: the model's calcification probability from which grades, tables and reports flag it beside
#: the category (never making it 1: see the module docstring)
CALCIFIED_FLAG = 0.5
#: Per-shape feature columns of a nodule layer.
FEATURE_COLUMNS = (
    "id",
    "probability",
    "malignancy",
    "label",
    "diameter_mm",
    "source",
    "reviewed",
    "review",
    "mark",
    "slice",
    "texture",
    "texture_model",
    "texture_override",
    "lungrads",
    *FLAT_FINDINGS,
)
#: Key in ``layer.metadata`` marking a layer made by this module; the value is the table.
META_KEY = "nodules"
DEFAULT_THRESHOLD = 0.5
#: Box text: the label and the *detection* probability (the malignancy is in the table);
#: ``mark`` is the review state (" ✓" accepted, " ✗" rejected, "" unreviewed).
TEXT_FORMAT = "{label} {probability:.2f}{mark}"
REVIEW_MARKS = {"unreviewed": "", "accepted": " \u2713", "rejected": " \u2717"}


def label_of(malignancy: float) -> str:
    return "malignant" if malignancy >= 0.5 else "benign"


def rgba(label: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    r, g, b = LABEL_RGB.get(label, (1.0, 1.0, 1.0))
    return (r, g, b, float(alpha))


def confidence_alpha(probability: float) -> float:
    """Edge opacity for a detection probability: faint for unsure candidates, solid at 1."""
    p = min(max(float(probability), 0.0), 1.0)
    return 0.35 + 0.65 * p


# --- findings --------------------------------------------------------------------------------


def _finite(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, (bool, np.bool_)):
        value = float(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"finding {name} must be a number, got {value!r}"[:200]) from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"finding {name} must be a finite number in [{lo:g}, {hi:g}], got {value!r}"[:200])
    return v


def _plain_value(value, name: str, depth: int = 0):
    """A JSON-able copy of an unknown finding (numpy scalars become Python numbers)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"finding {name} must be finite, got {value!r}")
        return value
    if depth < 3 and isinstance(value, (list, tuple)) and len(value) <= 100:
        return [_plain_value(v, name, depth + 1) for v in value]
    if depth < 3 and isinstance(value, dict) and len(value) <= 100 and all(isinstance(k, str) for k in value):
        return {k: _plain_value(v, name, depth + 1) for k, v in value.items()}
    raise ValueError(
        f"finding {name} must be text, a finite number or a short list/object of them, got {type(value).__name__}"
    )


def clean_findings(findings) -> dict:
    """One nodule's findings, checked and in plain Python types (what tables hold and files
    store): ``texture`` normalised (`lungrads.normalise_type`), probabilities in [0, 1], sizes
    finite and not negative, ``lungrads`` one of the categories; a key set to None is no
    finding. Keys this version does not know are kept if they are plain JSON values, so a
    newer model's findings survive a round trip. Raises ValueError naming the key."""
    if findings is None:
        return {}
    if not isinstance(findings, dict):
        raise ValueError(f"findings must be an object, got {type(findings).__name__}")
    out: dict = {}
    for k, v in findings.items():
        if not isinstance(k, str):
            raise ValueError(f"finding names must be text, got {k!r}"[:200])
        if v is None:
            continue
        if k == "texture":
            out[k] = LR.normalise_type(v)
        elif k == "texture_probability":
            if not isinstance(v, dict) or len(v) > len(LR.NODULE_TYPES):
                raise ValueError(f"finding texture_probability must be an object {{type: p}}, got {v!r}"[:200])
            out[k] = {LR.normalise_type(c): _finite(p, f"texture_probability[{c}]", 0.0, 1.0) for c, p in v.items()}
        elif k in FINDING_PROBABILITIES:
            out[k] = _finite(v, k, 0.0, 1.0)
        elif k in FINDING_SIZES:
            out[k] = _finite(v, k, 0.0, 1e7)
        elif k == "lungrads":
            cat = str(v).strip().upper()
            if cat not in LR.CATEGORIES:
                raise ValueError(f"finding lungrads must be one of {', '.join(LR.CATEGORIES)}, got {v!r}"[:200])
            out[k] = cat
        elif k == "lungrads_reason":
            if not isinstance(v, str) or len(v) > 1000:
                raise ValueError("finding lungrads_reason must be text of at most 1000 characters")
            out[k] = v
        else:
            out[k] = _plain_value(v, k)
    return out


def clean_override(texture) -> str:
    """A reader's texture override: "" (none: the model's call stands) or a canonical type."""
    if texture is None or (isinstance(texture, float) and math.isnan(texture)):
        return ""
    if isinstance(texture, str) and not texture.strip():
        return ""
    return LR.normalise_type(texture)


def flat_findings(findings: dict) -> dict:
    """The numeric findings as flat columns (`FLAT_FINDINGS`), NaN where there is none."""
    out = {}
    for col, (key, sub) in FLAT_FINDINGS.items():
        v = findings.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        out[col] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    return out


def findings_from_flat(row: dict, texture_model=None) -> dict:
    """The reverse of `flat_findings` (plus the model's texture): missing, empty and NaN
    cells are no finding. The result is not yet checked (`clean_findings` does that)."""
    out: dict = {}
    if (
        texture_model is not None
        and not (isinstance(texture_model, float) and math.isnan(texture_model))
        and str(texture_model).strip()
    ):
        out["texture"] = texture_model
    for col, (key, sub) in FLAT_FINDINGS.items():
        v = row.get(col)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if isinstance(v, float) and math.isnan(v):
            continue
        if sub is None:
            out[key] = v
        else:
            out.setdefault(key, {})[sub] = v
    return out


def _without_sizes(findings: dict) -> dict:
    return {k: v for k, v in findings.items() if k not in FINDING_SIZES and k not in FINDING_GRADE}


class Grade(NamedTuple):
    """The Lung-RADS category of one nodule as the table shows and exports it (decision
    support). ``category`` is "" when it cannot be determined (no type, a part-solid nodule
    without its solid component, a radiograph); ``reason`` says why either way."""

    category: str
    reason: str
    nodule_type: str  # the effective type ("" when none)
    type_from: str  # "reader" (override), "model" or ""
    mean_diameter_mm: float | None  # the size graded (rounded as Lung-RADS reports it)
    size_from: str  # "measured" (the model's caliper measurement), "box" (the box's diameter) or ""
    calcified: float | None  # the model's calcification probability (any pattern), shown beside

    @property
    def label(self) -> str:
        """The category marked as decision support, for a cell or a report."""
        return f"Lung-RADS {self.category or 'undetermined'} ({LR.DECISION_SUPPORT})"


def texture_text(table: "NoduleTable", i: int) -> str:
    """What a table or report shows as the nodule type: the effective type and who said it,
    the model's call kept visible beside a reader's override ("" when there is none)."""
    over, model = str(table.texture_override[i]), str(table.findings[i].get("texture", ""))
    if over:
        return f"{over} (reader" + (f"; model: {model})" if model else ")")
    return f"{model} (model)" if model else ""


def grade_text(table: "NoduleTable", i: int) -> str:
    """What a table or report shows as the Lung-RADS category (decision support): the
    category and the size it used with where that came from ("measured" / "box"),
    "undetermined" when a type is there but the category cannot be had, "-" for a radiograph,
    and the model's calcification flag beside it."""
    if table.ndim != 3:
        return "-"
    g = table.grade(i)
    if g.category:
        text = g.category + (
            f" ({g.size_from} {g.mean_diameter_mm:.1f} mm)" if g.mean_diameter_mm is not None and g.size_from else ""
        )
    else:
        text = "undetermined" if g.nodule_type else ""
    if g.calcified is not None and g.calcified >= CALCIFIED_FLAG:
        text += ("; " if text else "") + f"calcified? {g.calcified:.2f} (model)"
    return text


def axes_text(findings: dict) -> str:
    """The model's long x short axis (mm), "" when not measured."""
    if "long_axis_mm" in findings and "short_axis_mm" in findings:
        return f"{findings['long_axis_mm']:.1f} \u00d7 {findings['short_axis_mm']:.1f}"
    return ""


def volume_text(findings: dict) -> str:
    return f"{findings['volume_mm3']:.0f}" if "volume_mm3" in findings else ""


# --- image identity --------------------------------------------------------------------------


def image_identity(scan) -> dict:
    """What identifies the image nodules belong to: path, seriesuid, modality, geometry."""
    return {
        "path": str(getattr(scan, "path", "") or ""),
        "seriesuid": str(getattr(scan, "seriesuid", "") or ""),
        "modality": str(scan.modality),
        "shape": [int(s) for s in scan.shape],
        "spacing": [float(s) for s in scan.spacing],
        "origin": [float(o) for o in scan.origin],
        "direction": np.asarray(scan.direction, float).tolist(),
    }


# --- the nodule table ------------------------------------------------------------------------


@dataclass
class NoduleTable:
    """The nodules on one image: the truth that layers, the widget's table and exports show.

    boxes : (N, 2*ndim) corner boxes in voxels of the image array (array order).
    ids : (N,) int, unique, stable across edits.
    probability, malignancy : (N,) float in [0, 1].
    label : (N,) "benign" | "malignant" (the radiologist may override the model's call).
    source : (N,) "model" | "user".
    reviewed : (N,) bool: accepted by the reader (what files store).
    review : (N,) "unreviewed" | "accepted" | "rejected" (default: from ``reviewed``);
        ``reviewed`` always equals ``review == "accepted"``.
    image : `image_identity` of the image (its geometry is the boxes' geometry).
    threshold : detection probability below which a nodule is hidden (kept, not deleted).
    model_info : dict(name, version, sha256) of the model that produced the candidates.
    findings : (N,) dicts, the model's findings per nodule (`Detections.findings`, checked by
        `clean_findings`; {} for a drawn nodule or a model that measured nothing).
    texture_override : (N,) the reader's nodule type ("solid", "part-solid", "ground-glass")
        or "" (none: the model's ``findings["texture"]`` stands). See `texture_of`, `grade`.
    """

    boxes: np.ndarray
    ids: np.ndarray
    probability: np.ndarray
    malignancy: np.ndarray
    label: np.ndarray
    source: np.ndarray
    reviewed: np.ndarray
    image: dict
    threshold: float = DEFAULT_THRESHOLD
    model_info: dict | None = None
    meta: dict = field(default_factory=dict)
    review: Any = None
    findings: Any = None
    texture_override: Any = None

    def __post_init__(self):
        nd = len(self.image["shape"])
        if nd not in (2, 3):
            raise ValueError(f"image must be 2D or 3D, got shape {self.image['shape']}")
        self.boxes = np.asarray(self.boxes, dtype=float).reshape(-1, 2 * nd)
        n = len(self.boxes)
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        self.probability = np.asarray(self.probability, dtype=float).reshape(-1)
        self.malignancy = np.asarray(self.malignancy, dtype=float).reshape(-1)
        self.label = np.asarray(list(self.label), dtype=object).reshape(-1)
        self.source = np.asarray(list(self.source), dtype=object).reshape(-1)
        self.reviewed = np.asarray(self.reviewed, dtype=bool).reshape(-1)
        if self.review is None:
            self.review = np.where(self.reviewed, "accepted", "unreviewed").astype(object)
        self.review = np.asarray(list(self.review), dtype=object).reshape(-1)
        bad = [r for r in self.review if r not in REVIEW_STATES]
        if bad:
            raise ValueError(f"review must be one of {REVIEW_STATES}, got {bad[0]!r}")
        if len(self.review) == n:
            self.reviewed = self.review == "accepted"
        found = list(self.findings) if self.findings is not None else []
        if not found:  # none measured (as `Detections` says it)
            found = [{}] * n
        self.findings = _object_array([clean_findings(f) for f in found])
        over = list(self.texture_override) if self.texture_override is not None else [""] * n
        self.texture_override = np.asarray([clean_override(o) for o in over], dtype=object).reshape(-1)
        self.threshold = float(self.threshold)
        for name in ROW_FIELDS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, expected {n} (one per box)")
        if len(set(self.ids.tolist())) != n:
            raise ValueError(f"nodule ids must be unique, got {self.ids.tolist()}")
        bad = [lab for lab in self.label if lab not in LABELS]
        if bad:
            raise ValueError(f"label must be one of {LABELS}, got {bad[0]!r}")

    # construction ----------------------------------------------------------------------
    @classmethod
    def empty(cls, image: dict, threshold: float = DEFAULT_THRESHOLD, model_info=None) -> "NoduleTable":
        nd = len(image["shape"])
        return cls(np.zeros((0, 2 * nd)), [], [], [], [], [], [], image, threshold, model_info)

    @classmethod
    def from_detections(
        cls,
        detections: Detections,
        image: dict,
        threshold: float | None = None,
        model_info: dict | None = None,
        start_id: int = 1,
    ) -> "NoduleTable":
        n = len(detections)
        nd = len(image["shape"])
        if detections.ndim != nd:
            raise ValueError(f"detections are {detections.ndim}D but the image is {nd}D (shape {image['shape']})")
        info = model_info if model_info is not None else detections.meta.get("model_info")
        thr = threshold if threshold is not None else detections.meta.get("threshold", DEFAULT_THRESHOLD)
        return cls(
            boxes=detections.boxes.copy(),
            ids=np.arange(start_id, start_id + n),
            probability=detections.probability.copy(),
            malignancy=detections.malignancy.copy(),
            label=[label_of(m) for m in detections.malignancy],
            source=["model"] * n,
            reviewed=np.zeros(n, bool),
            image=copy.deepcopy(image),
            threshold=float(thr),
            model_info=dict(info) if info else None,
            findings=list(detections.findings) or None,
        )

    def to_detections(self, visible_only: bool = False) -> Detections:
        """The nodules as `Detections`; ``findings`` are the model's, the reader's texture
        overrides are in ``meta["texture_override"]`` ("" for none)."""
        k = self.visible_mask() if visible_only else np.ones(len(self), bool)
        return Detections(
            self.boxes[k],
            self.probability[k],
            self.malignancy[k],
            self.geometry,
            {
                "ids": self.ids[k].tolist(),
                "labels": self.label[k].tolist(),
                "texture_override": self.texture_override[k].tolist(),
                "model_info": self.model_info,
                "threshold": self.threshold,
            },
            copy.deepcopy(list(self.findings[k])),
        )

    def copy(self) -> "NoduleTable":
        return NoduleTable(
            self.boxes.copy(),
            self.ids.copy(),
            self.probability.copy(),
            self.malignancy.copy(),
            self.label.copy(),
            self.source.copy(),
            self.reviewed.copy(),
            copy.deepcopy(self.image),
            self.threshold,
            copy.deepcopy(self.model_info),
            copy.deepcopy(self.meta),
            self.review.copy(),
            list(self.findings),
            self.texture_override.copy(),
        )  # findings are copied when checked

    def equals(self, other: "NoduleTable") -> bool:
        """Same nodules (exactly), same image, threshold and model."""
        return (
            isinstance(other, NoduleTable)
            and np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.probability, other.probability)
            and np.array_equal(self.malignancy, other.malignancy)
            and list(self.label) == list(other.label)
            and list(self.source) == list(other.source)
            and np.array_equal(self.reviewed, other.reviewed)
            and list(self.review) == list(other.review)
            and list(self.findings) == list(other.findings)
            and list(self.texture_override) == list(other.texture_override)
            and self.image == other.image
            and self.threshold == other.threshold
            and (self.model_info or None) == (other.model_info or None)
        )

    # properties ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def ndim(self) -> int:
        return len(self.image["shape"])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image["shape"])

    @property
    def geometry(self) -> dict:
        return geometry_dict(self.image)

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.image["spacing"], float)

    def next_id(self) -> int:
        return int(self.ids.max()) + 1 if len(self) else 1

    def index_of(self, nodule_id: int) -> int:
        hits = np.flatnonzero(self.ids == int(nodule_id))
        if not len(hits):
            raise KeyError(f"no nodule with id {nodule_id}")
        return int(hits[0])

    def __contains__(self, nodule_id) -> bool:
        try:
            return bool(np.any(self.ids == int(nodule_id)))
        except (TypeError, ValueError):
            return False

    def sizes_mm(self) -> np.ndarray:
        if not len(self):
            return np.zeros((0, self.ndim))
        return B.voxel_boxes_to_world(self.boxes, self.geometry)[1]

    def diameter_mm(self) -> np.ndarray:
        """Equivalent diameter: mean of the box's physical extents (as `Detections`)."""
        return self.sizes_mm().mean(axis=1) if len(self) else np.zeros(0)

    def centers_world(self) -> np.ndarray:
        if not len(self):
            return np.zeros((0, self.ndim))
        return B.voxel_boxes_to_world(self.boxes, self.geometry)[0]

    def centers_world_xyz(self) -> np.ndarray:
        return self.centers_world()[:, ::-1]

    def centers_voxel(self) -> np.ndarray:
        return B.boxes_to_centers_sizes(self.boxes)[0] if len(self) else np.zeros((0, self.ndim))

    def visible_mask(self, threshold: float | None = None) -> np.ndarray:
        """Nodules shown at ``threshold``: the model's at or above it, the user's always."""
        t = self.threshold if threshold is None else float(threshold)
        return (self.probability >= t) | (self.source == "user")

    def slices(self, i: int) -> range:
        """Slices (z indices) a CT nodule's box spans: those with z0 <= k < z1, clipped."""
        if self.ndim != 3:
            return range(0, 0)
        return box_slices(self.boxes[i], self.shape[0])

    def center_slice(self, i: int) -> int:
        if self.ndim != 3:
            return 0
        nz = self.shape[0]
        return int(min(max(round(float(self.boxes[i, 0] + self.boxes[i, 3]) / 2), 0), nz - 1))

    def row(self, i: int) -> dict:
        """Feature values of nodule at position ``i``."""
        return {
            "id": int(self.ids[i]),
            "probability": float(self.probability[i]),
            "malignancy": float(self.malignancy[i]),
            "label": str(self.label[i]),
            "diameter_mm": float(self.diameter_mm()[i]),
            "source": str(self.source[i]),
            "reviewed": bool(self.reviewed[i]),
            "review": str(self.review[i]),
            "texture": self.texture_of(i),
            "texture_model": str(self.findings[i].get("texture", "")),
            "texture_override": str(self.texture_override[i]),
            "lungrads": self.grade(i).category,
        }

    # findings --------------------------------------------------------------------------
    def texture_of(self, i: int) -> str:
        """The effective nodule type of nodule ``i``: the reader's override if set, else the
        model's call, else ""."""
        return str(self.texture_override[i] or self.findings[i].get("texture", ""))

    def grade(self, i: int) -> Grade:
        """The Lung-RADS v2022 baseline category of nodule ``i`` from its effective type and
        size (decision support; the rules are in this module's docstring)."""
        f = self.findings[i]
        calc = f.get("calcified")
        kind = self.texture_of(i)
        type_from = "reader" if self.texture_override[i] else ("model" if kind else "")
        if self.ndim != 3:
            return Grade(
                "", "not graded: Lung-RADS is for screening CT, not radiographs", kind, type_from, None, "", calc
            )
        if not kind:
            if "lungrads" in f:  # the model's category without its type: shown, said to be the model's
                m = f.get("mean_diameter_mm")
                return Grade(
                    f["lungrads"],
                    f"the model's category, without a nodule type: "
                    f"{f.get('lungrads_reason', '')} [{LR.DECISION_SUPPORT}]",
                    "",
                    "",
                    LR.round_mm(m) if m else None,
                    "measured" if m else "",
                    calc,
                )
            return Grade("", "undetermined: no nodule type (set it in the table)", "", "", None, "", calc)
        mean, size_from = None, ""
        m, lo, sh = f.get("mean_diameter_mm"), f.get("long_axis_mm"), f.get("short_axis_mm")
        if m is not None and m > 0:
            mean, size_from = float(m), "measured"
        elif lo and sh:
            mean, size_from = LR.mean_diameter(max(lo, sh), min(lo, sh)), "measured"
        else:
            b = self.boxes[i]  # the box's equivalent diameter, as `diameter_mm` (of this box only)
            mean, size_from = float(np.mean((b[self.ndim :] - b[: self.ndim]) * self.spacing)), "box"
        mean_r = LR.round_mm(mean) if mean > 0 else None
        where = "the model's measurement" if size_from == "measured" else "the box's diameter (no measurement)"
        solid = f.get("solid_mean_diameter_mm") if kind == "part-solid" else None
        solid = solid if solid else None
        try:
            category, reason = LR.lung_rads(kind, mean, solid)
        except ValueError as exc:
            if kind == "part-solid" and solid is None and mean_r is not None:
                category, reason = (
                    "",
                    (
                        f"undetermined: part-solid nodule of {mean_r:.1f} mm whose solid "
                        "component was not measured (the reader measures it)"
                    ),
                )
            else:
                category, reason = "", f"undetermined: {exc}"
        reason += f"; type from the {'reader' if type_from == 'reader' else 'model'}, size from {where}"
        if calc is not None and calc >= CALCIFIED_FLAG:
            reason += (
                f"; the model finds calcification (p {calc:.2f}, any pattern): category 1 only for a "
                "benign pattern or fat, which the reader must confirm"
            )
        return Grade(category, reason, kind, type_from, mean_r, size_from, calc)

    def grades(self) -> list[Grade]:
        return [self.grade(i) for i in range(len(self))]

    def with_texture(self, ids, texture: str | None) -> "NoduleTable":
        """The reader's nodule type for nodules ``ids`` ("solid", "part-solid", "ground-glass"
        or a spelling `lungrads.normalise_type` knows); None or "" removes the override, so
        the model's call stands again. The model's call is kept either way."""
        value = clean_override(texture)
        t = self.copy()
        t.texture_override[t._sel(ids)] = value
        return t

    def _resized(self, t: "NoduleTable", i: int) -> "NoduleTable":
        """``t`` with the model's size measurements of nodule ``i`` dropped when its box size
        changed from this table's (a move keeps them)."""
        j = self.index_of(int(t.ids[i]))
        if not np.allclose(
            np.diff(t.boxes[i].reshape(2, -1), axis=0), np.diff(self.boxes[j].reshape(2, -1), axis=0), rtol=0, atol=1e-3
        ):
            t.findings[i] = _without_sizes(t.findings[i])
        return t

    # edits (each returns a new table; the original is left untouched for undo) ---------
    def _sel(self, ids) -> np.ndarray:
        ids = [int(i) for i in np.atleast_1d(ids)]
        missing = [i for i in ids if i not in self]
        if missing:
            raise KeyError(f"no nodule with id {missing[0]}")
        return np.isin(self.ids, ids)

    def removed(self, ids) -> "NoduleTable":
        t = self.copy()
        keep = ~np.isin(t.ids, [int(i) for i in np.atleast_1d(ids)])
        for name in ROW_FIELDS:
            setattr(t, name, getattr(t, name)[keep])
        return t

    def taken(self, index) -> "NoduleTable":
        """The nodules at positions ``index`` (any order; ids kept)."""
        t = self.copy()
        index = np.asarray(index, dtype=int).reshape(-1)
        for name in ROW_FIELDS:
            setattr(t, name, getattr(t, name)[index])
        return t

    def with_label(self, ids, label: str) -> "NoduleTable":
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        t = self.copy()
        t.label[t._sel(ids)] = label
        return t

    def flipped(self, ids) -> "NoduleTable":
        t = self.copy()
        k = t._sel(ids)
        t.label[k] = ["benign" if lab == "malignant" else "malignant" for lab in t.label[k]]
        return t

    def with_reviewed(self, ids, value: bool | None = None) -> "NoduleTable":
        """Mark accepted (value=True) or unreviewed (False), or toggle (None: back to
        unreviewed if all are accepted)."""
        t = self.copy()
        k = t._sel(ids)
        if value is None:
            value = not bool(np.all(t.reviewed[k]))
        return t.with_review(self.ids[k], "accepted" if value else "unreviewed")

    def with_review(self, ids, state: str) -> "NoduleTable":
        """Set the review state ("unreviewed", "accepted", "rejected") of nodules ``ids``."""
        if state not in REVIEW_STATES:
            raise ValueError(f"review must be one of {REVIEW_STATES}, got {state!r}")
        t = self.copy()
        k = t._sel(ids)
        t.review[k] = state
        t.reviewed = t.review == "accepted"
        return t

    def with_z_extent(self, nodule_id: int, first: int | None = None, last: int | None = None) -> "NoduleTable":
        """Set the first and/or last slice a CT nodule spans (inclusive slice indices, in
        either order); the in-plane extents stay."""
        if self.ndim != 3:
            raise ValueError("a radiograph nodule has no z extent")
        t = self.copy()
        i = t.index_of(nodule_id)
        cur = list(t.slices(i))
        lo = cur[0] if first is None else int(first)
        hi = cur[-1] if last is None else int(last)
        lo, hi = sorted((min(max(lo, 0), self.shape[0] - 1), min(max(hi, 0), self.shape[0] - 1)))
        t.boxes[i, 0], t.boxes[i, 3] = lo - 0.5, hi + 0.5
        return self._resized(t, i)

    def with_box(self, nodule_id: int, box) -> "NoduleTable":
        """A new box for a nodule; a new size drops the model's size measurements (see the
        module docstring), a move keeps them."""
        t = self.copy()
        i = t.index_of(nodule_id)
        t.boxes[i] = np.asarray(box, float).reshape(2 * self.ndim)
        return self._resized(t, i)

    def with_inplane(self, nodule_id: int, yx_box) -> "NoduleTable":
        """Replace the in-plane extents (y0, x0, y1, x1) of a nodule's box, keeping z."""
        t = self.copy()
        i = t.index_of(nodule_id)
        y0, x0, y1, x1 = (float(v) for v in yx_box)
        b = t.boxes[i]
        if self.ndim == 3:
            b[1], b[2], b[4], b[5] = y0, x0, y1, x1
        else:
            b[:] = (y0, x0, y1, x1)
        return self._resized(t, i)

    def added(
        self,
        box,
        label: str = "benign",
        probability: float = 1.0,
        malignancy: float | None = None,
        source: str = "user",
        reviewed: bool = False,
        nodule_id: int | None = None,
        review: str | None = None,
        findings: dict | None = None,
        texture_override: str | None = None,
    ) -> tuple["NoduleTable", int]:
        """A new nodule; a user's has probability 1 and malignancy 1/0 from its label, and no
        findings unless given (a drawn box has no model measurements)."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if malignancy is None:
            malignancy = 1.0 if label == "malignant" else 0.0
        nid = self.next_id() if nodule_id is None else int(nodule_id)
        if nid in self:
            raise ValueError(f"nodule id {nid} is already used")
        t = self.copy()
        t.boxes = np.concatenate([t.boxes, np.asarray(box, float).reshape(1, 2 * self.ndim)])
        t.ids = np.append(t.ids, nid)
        t.probability = np.append(t.probability, float(probability))
        t.malignancy = np.append(t.malignancy, float(malignancy))
        t.label = np.append(t.label, np.asarray([label], dtype=object))
        t.source = np.append(t.source, np.asarray([source], dtype=object))
        state = review or ("accepted" if reviewed else "unreviewed")
        if state not in REVIEW_STATES:
            raise ValueError(f"review must be one of {REVIEW_STATES}, got {state!r}")
        t.review = np.append(t.review, np.asarray([state], dtype=object))
        t.reviewed = t.review == "accepted"
        t.findings = _object_array([*t.findings, clean_findings(findings)])
        t.texture_override = np.append(t.texture_override, np.asarray([clean_override(texture_override)], dtype=object))
        return t, nid

    def box_from_slice_rect(self, yx_box, slice_index: int | None) -> np.ndarray:
        """A 3D box for a rectangle drawn on one CT slice: its z extent matches its in-plane
        physical size (a roughly spherical nodule), centred on that slice, at least one slice."""
        y0, x0, y1, x1 = (float(v) for v in yx_box)
        if self.ndim == 2:
            return np.array([y0, x0, y1, x1])
        sp = self.spacing
        d_mm = ((y1 - y0) * sp[1] + (x1 - x0) * sp[2]) / 2
        half = max(d_mm / sp[0] / 2, 0.5)
        k = float(slice_index if slice_index is not None else 0)
        return np.array([k - half, y0, x0, k + half, y1, x1])


#: the per-nodule fields of a `NoduleTable` (all indexed alike by `removed` and `taken`)
ROW_FIELDS = (
    "boxes",
    "ids",
    "probability",
    "malignancy",
    "label",
    "source",
    "reviewed",
    "review",
    "findings",
    "texture_override",
)


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (dicts stay dicts; np.asarray could nest them)."""
    out = np.empty(len(items), dtype=object)
    for k, v in enumerate(items):
        out[k] = v
    return out


def box_slices(box, nz: int) -> range:
    """Slices k a 3D box spans: z0 <= k < z1 (voxel centres inside the half-open extent),
    clipped to [0, nz); a box thinner than a slice gets the slice nearest its centre."""
    z0, z1 = float(box[0]), float(box[3])
    lo = max(math.ceil(z0), 0)
    hi = min(math.ceil(z1), nz)  # exclusive
    if hi <= lo:
        c = int(min(max(round((z0 + z1) / 2), 0), nz - 1))
        return range(c, c + 1)
    return range(lo, hi)


# --- table -> napari layer -------------------------------------------------------------------


def _rect(yx_box, z: int | None) -> np.ndarray:
    y0, x0, y1, x1 = yx_box
    corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float)
    if z is None:
        return corners
    return np.concatenate([np.full((4, 1), float(z)), corners], axis=1)


def inplane(box) -> np.ndarray:
    b = np.asarray(box, float)
    return b[[1, 2, 4, 5]] if len(b) == 6 else b.copy()


def nodule_colors(table: NoduleTable, i: int):
    """(edge RGBA, text RGBA) of nodule ``i``: colour by label, opacity by detection
    probability, solid when accepted, grey when rejected."""
    state = str(table.review[i])
    if state == "rejected":
        return (*REJECTED_RGB, 0.6), (*REJECTED_RGB, 1.0)
    alpha = 1.0 if state == "accepted" else confidence_alpha(table.probability[i])
    return rgba(table.label[i], alpha), rgba(table.label[i])


# --- user-edited layer data -> table (Qt- and napari-free) ----------------------------------


def _column(features, name, n, default):
    if features is None:
        return [default] * n
    try:
        col = features[name]
    except (KeyError, IndexError, TypeError):
        return [default] * n
    vals = list(np.asarray(col).tolist() if not isinstance(col, list) else col)
    return vals if len(vals) == n else [default] * n


def valid_id(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(f) and f >= 0 and f == int(f)


def reconcile(
    table: NoduleTable,
    shapes,
    features,
    removed_ids=(),
    new_label: str = "benign",
    atol: float = 1e-3,
    slice_index: int | None = None,
):
    """The table after the user edited the layer that showed it.

    ``shapes`` and ``features`` are the layer's current data and features (one row per
    shape); ``removed_ids`` are the ids of shapes the user deleted (deleting any of a
    nodule's rectangles deletes the nodule). A shape whose in-plane rectangle differs from
    its nodule's box moved or was resized: the nodule's in-plane extents follow it (z is
    kept). A shape without a valid id (drawn by the user), or a CT shape that is not on the
    slice its features say (pasted), is a new nodule: source "user", probability 1, label
    ``new_label``; 2D shapes of a CT table are on ``slice_index`` (the widget's current-slice
    layer) unless their ``slice`` feature says otherwise. Differences below ``atol`` voxels are float32 rounding (napari stores
    vertices in float32), not edits.

    Returns ``(new_table, changed, added_ids)``; ``table`` itself is not modified.
    """
    removed = {int(i) for i in removed_ids if valid_id(i)} & set(table.ids.tolist())
    new = table.removed(sorted(removed)) if removed else table.copy()
    changed = bool(removed)
    shapes = [np.asarray(s, float) for s in (shapes or [])]
    n = len(shapes)
    ids = _column(features, "id", n, -1)
    slices = _column(features, "slice", n, -1)
    seen_edit: set[int] = set()
    added: list[int] = []
    for s, v, k in zip(shapes, ids, slices):
        if not len(s):
            continue
        lo, hi = s[:, -2:].min(0), s[:, -2:].max(0)
        yx = np.array([lo[0], lo[1], hi[0], hi[1]])
        nid = int(float(v)) if valid_id(v) else None
        if nid is not None and nid in removed:
            continue  # another slice of a deleted nodule
        if (
            nid is not None
            and table.ndim == 3
            and s.shape[1] == 3
            and valid_id(k)
            and round(float(np.median(s[:, 0]))) != int(float(k))
        ):
            nid = None  # a copy pasted onto another slice: a new nodule
        if nid is not None and nid in table:
            if nid in seen_edit:
                continue
            expected = inplane(table.boxes[table.index_of(nid)])
            if not np.allclose(yx, expected, atol=atol, rtol=0):
                new = new.with_inplane(nid, _min_size(yx))
                seen_edit.add(nid)
                changed = True
            continue
        # a new shape
        yx = _min_size(yx)
        if table.ndim == 3:
            z = (
                float(np.round(np.median(s[:, 0])))
                if s.shape[1] == 3
                else float(k if valid_id(k) else (slice_index or 0))
            )
            z = min(max(z, 0.0), table.shape[0] - 1)
            box = new.box_from_slice_rect(yx, int(z))
        else:
            box = yx
        new, nid_new = new.added(box, label=new_label, source="user")
        added.append(nid_new)
        changed = True
    return new, changed, added


def _min_size(yx, minimum: float = 1.0) -> np.ndarray:
    """Grow a rectangle smaller than ``minimum`` voxels (a click, not a drag) around its centre."""
    y0, x0, y1, x1 = (float(v) for v in yx)
    if y1 - y0 < minimum:
        c = (y0 + y1) / 2
        y0, y1 = c - minimum / 2, c + minimum / 2
    if x1 - x0 < minimum:
        c = (x0 + x1) / 2
        x0, x1 = c - minimum / 2, c + minimum / 2
    return np.array([y0, x0, y1, x1])
