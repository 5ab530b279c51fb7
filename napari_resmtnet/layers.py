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
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import boxes as B
from .detections import Detections
from .scan import geometry_dict

LABELS = ("benign", "malignant")
SOURCES = ("model", "user")
#: The reader's decision on a nodule. ``reviewed`` (in files) means "accepted".
REVIEW_STATES = ("unreviewed", "accepted", "rejected")
#: Edge colour of a rejected nodule (grey: still visible, clearly set aside).
REJECTED_RGB = (0.55, 0.55, 0.55)
#: RGB colours of the two labels (also used by the widget's legend).
LABEL_RGB = {"benign": (0.20, 0.85, 0.30), "malignant": (0.95, 0.20, 0.20)}
#: Per-shape feature columns of a nodule layer.
FEATURE_COLUMNS = ("id", "probability", "malignancy", "label", "diameter_mm", "source",
                   "reviewed", "review", "mark", "slice")
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
        self.threshold = float(self.threshold)
        for name in ("ids", "probability", "malignancy", "label", "source", "reviewed", "review"):
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
    def from_detections(cls, detections: Detections, image: dict, threshold: float | None = None,
                        model_info: dict | None = None, start_id: int = 1) -> "NoduleTable":
        n = len(detections)
        nd = len(image["shape"])
        if detections.ndim != nd:
            raise ValueError(f"detections are {detections.ndim}D but the image is {nd}D "
                             f"(shape {image['shape']})")
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
        )

    def to_detections(self, visible_only: bool = False) -> Detections:
        k = self.visible_mask() if visible_only else np.ones(len(self), bool)
        return Detections(self.boxes[k], self.probability[k], self.malignancy[k], self.geometry,
                          {"ids": self.ids[k].tolist(), "labels": self.label[k].tolist(),
                           "model_info": self.model_info, "threshold": self.threshold})

    def copy(self) -> "NoduleTable":
        return NoduleTable(self.boxes.copy(), self.ids.copy(), self.probability.copy(),
                           self.malignancy.copy(), self.label.copy(), self.source.copy(),
                           self.reviewed.copy(), copy.deepcopy(self.image), self.threshold,
                           copy.deepcopy(self.model_info), copy.deepcopy(self.meta), self.review.copy())

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
        }

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
        for name in ("boxes", "ids", "probability", "malignancy", "label", "source", "reviewed", "review"):
            setattr(t, name, getattr(t, name)[keep])
        return t

    def taken(self, index) -> "NoduleTable":
        """The nodules at positions ``index`` (any order; ids kept)."""
        t = self.copy()
        index = np.asarray(index, dtype=int).reshape(-1)
        for name in ("boxes", "ids", "probability", "malignancy", "label", "source", "reviewed", "review"):
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
        return t

    def with_box(self, nodule_id: int, box) -> "NoduleTable":
        t = self.copy()
        t.boxes[t.index_of(nodule_id)] = np.asarray(box, float).reshape(2 * self.ndim)
        return t

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
        return t

    def added(self, box, label: str = "benign", probability: float = 1.0,
              malignancy: float | None = None, source: str = "user", reviewed: bool = False,
              nodule_id: int | None = None, review: str | None = None) -> tuple["NoduleTable", int]:
        """A new nodule; a user's has probability 1 and malignancy 1/0 from its label."""
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


def table_to_shapes(table: NoduleTable, threshold: float | None = None, slice_index: int | None = None):
    """Shapes for the nodules visible at ``threshold``.

    Without ``slice_index``: one (4, ndim) rectangle per slice a CT nodule spans (the whole
    volume). With ``slice_index`` (CT): one 2D (4, 2) rectangle per nodule that spans that
    slice -- what the widget's current-slice layer shows.

    Returns ``(data, features, edge_color, text_color)``: a list of rectangles in voxel
    coordinates, a dict of per-shape feature columns, and (S, 4) RGBA arrays.
    """
    vis = table.visible_mask(threshold)
    diam = table.diameter_mm()
    data, rows = [], {c: [] for c in FEATURE_COLUMNS}
    edge, text = [], []
    for i in np.flatnonzero(vis):
        ip = inplane(table.boxes[i])
        if table.ndim != 3:
            slices, z_of = [None], None
        elif slice_index is None:
            slices, z_of = list(table.slices(i)), (lambda k: k)
        else:
            slices = [int(slice_index)] if int(slice_index) in table.slices(i) else []
            z_of = None
        for k in slices:
            data.append(_rect(ip, None if z_of is None else z_of(k)))
            rows["id"].append(int(table.ids[i]))
            rows["probability"].append(float(table.probability[i]))
            rows["malignancy"].append(float(table.malignancy[i]))
            rows["label"].append(str(table.label[i]))
            rows["diameter_mm"].append(float(diam[i]))
            rows["source"].append(str(table.source[i]))
            rows["reviewed"].append(bool(table.reviewed[i]))
            rows["review"].append(str(table.review[i]))
            rows["mark"].append(REVIEW_MARKS[str(table.review[i])])
            rows["slice"].append(-1 if k is None else int(k))
            e, t = nodule_colors(table, i)
            edge.append(e)
            text.append(t)
    edge = np.asarray(edge, float).reshape(-1, 4)
    text = np.asarray(text, float).reshape(-1, 4)
    return data, rows, edge, text


def slice_geometry_kwargs(image: dict, slice_index: int) -> dict:
    """scale / translate / affine of a 2D layer that shows slice ``slice_index`` of a CT
    ``image`` (its in-plane axes) in the image's millimetres."""
    from .scan import napari_geometry_kwargs

    sp = np.asarray(image["spacing"], float)
    org = np.asarray(image["origin"], float)
    d = np.asarray(image["direction"], float).reshape(3, 3)
    at_k = org + d @ np.array([sp[0] * float(slice_index), 0.0, 0.0])
    return napari_geometry_kwargs(sp[1:], at_k[1:], d[1:, 1:])


_FEATURE_DTYPES = {"id": "int64", "probability": "float64", "malignancy": "float64", "label": object,
                   "diameter_mm": "float64", "source": object, "reviewed": "bool", "review": object,
                   "mark": object, "slice": "int64"}


def features_frame(rows: dict):
    """Per-shape feature columns -> a typed pandas DataFrame (typed even when empty, so that
    napari accepts string/bool defaults for shapes drawn later)."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(rows.get(c, []), dtype=_FEATURE_DTYPES[c]) for c in FEATURE_COLUMNS})


def feature_defaults(new_label: str = "benign", slice_index: int = -1) -> dict:
    """Features a shape drawn by hand starts with; ``id`` -1 marks it as not yet a nodule."""
    return {"id": -1, "probability": 1.0, "malignancy": 1.0 if new_label == "malignant" else 0.0,
            "label": new_label, "diameter_mm": 0.0, "source": "user", "reviewed": False,
            "review": "unreviewed", "mark": "", "slice": int(slice_index)}


def edge_width_for(table: NoduleTable) -> float:
    """Edge width in data pixels: ~2 px on a 512 grid, wider on big radiographs."""
    return float(max(1.5, max(table.shape[-2:]) / 300.0))


def text_kwargs(text_color) -> dict:
    return {"string": TEXT_FORMAT, "anchor": "upper_left", "size": 10,
            "color": {"array": np.asarray(text_color, float).reshape(-1, 4), "default": "white"}}


def napari_kwargs_of(image: dict) -> dict:
    """scale / translate / affine for a layer in the image's millimetres (as `Scan.napari_kwargs`)."""
    from .scan import napari_geometry_kwargs

    return napari_geometry_kwargs(image["spacing"], image["origin"], image["direction"])


def layer_name_for(image: dict) -> str:
    base = image.get("seriesuid") or "image"
    if len(base) > 24:
        base = base[:10] + "…" + base[-10:]
    return f"{base} nodules"


def table_to_layer_data(table: NoduleTable, threshold: float | None = None,
                        name: str | None = None, new_label: str = "benign",
                        slice_index: int | None = None):
    """The LayerDataTuple ``(data, kwargs, "shapes")`` showing ``table``.

    Without ``slice_index`` a CT table gives a 3D layer with a rectangle on every slice of
    every nodule (for use without the widget). With ``slice_index`` it gives the widget's
    2D current-slice layer: the rectangles of that slice only, placed in the image's
    millimetres at that slice (`slice_geometry_kwargs`); the widget refills it whenever
    the viewer moves to another slice.
    """
    if threshold is not None:
        table = table.copy()
        table.threshold = float(threshold)
    per_slice = table.ndim == 3 and slice_index is not None
    data, feats, edge, text = table_to_shapes(table, slice_index=slice_index if per_slice else None)
    n = len(data)
    geometry = slice_geometry_kwargs(table.image, slice_index) if per_slice else napari_kwargs_of(table.image)
    kwargs = dict(
        name=name or layer_name_for(table.image),
        ndim=2 if per_slice else table.ndim,
        shape_type=["rectangle"] * n,
        edge_color=edge if n else "lime",
        face_color=np.zeros((n, 4)) if n else "transparent",
        edge_width=edge_width_for(table),
        features=features_frame(feats),
        feature_defaults=feature_defaults(new_label, slice_index if per_slice else -1),
        text=text_kwargs(text),
        metadata={META_KEY: table, "image": dict(table.image), "model_info": table.model_info,
                  "threshold": table.threshold},
        opacity=1.0,
        **geometry,
    )
    return (data, kwargs, "shapes")


def detections_to_layer_data(detections: Detections, scan, threshold: float | None = None,
                             name: str | None = None, model_info: dict | None = None) -> list:
    """Detections on ``scan`` -> ``[LayerDataTuple]``: one Shapes layer of nodule boxes.

    All candidates are kept in the layer's table (``layer.metadata["nodules"]``); those
    below ``threshold`` (default: ``detections.meta["threshold"]``, else 0.5) are hidden.
    """
    table = NoduleTable.from_detections(detections, image_identity(scan), threshold=threshold,
                                        model_info=model_info)
    return [table_to_layer_data(table, name=name)]


# --- napari layer -> table -------------------------------------------------------------------

def _parts(layer):
    """(data, kwargs-like state, layer type) of a napari layer or a LayerDataTuple."""
    if isinstance(layer, tuple):
        data = layer[0]
        meta = layer[1] if len(layer) > 1 and layer[1] else {}
        kind = layer[2] if len(layer) > 2 else "shapes"
        return data, meta, str(kind).lower()
    meta = {
        "metadata": layer.metadata,
        "features": getattr(layer, "features", None),
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "affine": np.asarray(layer.affine.affine_matrix),
        "size": getattr(layer, "size", None),
        "name": layer.name,
    }
    return layer.data, meta, type(layer).__name__.lower()


def _image_from_state(meta: dict, ndim: int, extent_hint) -> dict:
    md = meta.get("metadata") or {}
    if isinstance(md.get("image"), dict) and len(md["image"].get("shape", ())) == ndim:
        return dict(md["image"])
    scale = np.asarray(meta.get("scale", np.ones(ndim)), float)[-ndim:]
    translate = np.asarray(meta.get("translate", np.zeros(ndim)), float)[-ndim:]
    aff = meta.get("affine")
    direction, origin = np.eye(ndim), translate
    if aff is not None:
        a = np.asarray(getattr(aff, "affine_matrix", aff), float)
        if a.shape == (ndim + 1, ndim + 1):
            lin = a[:ndim, :ndim]
            direction = lin
            origin = lin @ translate + a[:ndim, ndim]
    shape = [int(max(1, math.ceil(e + 1))) for e in extent_hint]
    return {"path": "", "seriesuid": str(md.get("seriesuid", "")), "modality": "CT" if ndim == 3 else "CXR",
            "shape": shape, "spacing": scale.tolist(), "origin": list(map(float, origin)),
            "direction": np.asarray(direction).tolist()}


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


def layer_to_nodules(layer) -> NoduleTable:
    """The nodule table of a napari layer (or LayerDataTuple): the reverse of
    `detections_to_layer_data`.

    A layer made by this module carries its table in ``metadata["nodules"]``; a copy is
    returned. Any other Shapes layer is read shape by shape: shapes sharing a feature ``id``
    make one nodule (a CT nodule's slices), the rest one nodule each; probability,
    malignancy, label, source and reviewed come from features when present. A Points layer
    gives one nodule per point, its box the point's size.
    """
    data, meta, kind = _parts(layer)
    md = meta.get("metadata") or {}
    t = md.get(META_KEY)
    if isinstance(t, NoduleTable):
        return t.copy()
    if isinstance(t, dict):
        from .export import table_from_json_dict

        return table_from_json_dict(t)
    feats = meta.get("features")
    if kind.startswith("points"):
        pts = np.atleast_2d(np.asarray(data, float))
        n = len(pts) if np.asarray(data).size else 0
        ndim = pts.shape[1] if n else int(meta.get("ndim", 2))
        size = meta.get("size")
        sizes = np.broadcast_to(np.asarray(size if size is not None else 5.0, float), (n,)) if n else np.zeros(0)
        half = np.repeat(sizes[:, None], ndim, 1) / 2 if n else np.zeros((0, ndim))
        vboxes = np.concatenate([pts - half, pts + half], 1) if n else np.zeros((0, 2 * ndim))
        groups = [[i] for i in range(n)]
    else:
        shapes = [np.asarray(s, float) for s in (data or [])]
        n = len(shapes)
        ndim = shapes[0].shape[1] if n else int(meta.get("ndim", 2))
        ids = _column(feats, "id", n, -1)
        groups_d: dict[Any, list[int]] = {}
        for i, v in enumerate(ids):
            key = int(float(v)) if valid_id(v) else ("new", i)
            groups_d.setdefault(key, []).append(i)
        groups = list(groups_d.values())
        vboxes = []
        for g in groups:
            verts = np.concatenate([shapes[i] for i in g])
            lo, hi = verts.min(0), verts.max(0)
            if ndim == 3:
                lo[0] -= 0.5
                hi[0] += 0.5
            vboxes.append(np.concatenate([lo, hi]))
        vboxes = np.asarray(vboxes, float).reshape(-1, 2 * ndim)
    if ndim not in (2, 3):
        raise ValueError(f"nodule layer must be 2D or 3D, got {ndim}D data")
    extent = vboxes[:, ndim:].max(0) if len(vboxes) else np.zeros(ndim)
    image = _image_from_state(meta, ndim, extent)
    n_rows = sum(len(g) for g in groups) if not kind.startswith("points") else len(groups)
    col = {c: _column(feats, c, n_rows, None) for c in ("id", "probability", "malignancy", "label",
                                                         "source", "reviewed", "review")}
    ids, prob, mal, lab, src, rev, state = [], [], [], [], [], [], []
    used = set()
    for g in groups:
        i = g[0]
        nid = col["id"][i]
        nid = int(float(nid)) if valid_id(nid) and int(float(nid)) not in used else None
        ids.append(nid)
        if nid is not None:
            used.add(nid)
        p = col["probability"][i]
        prob.append(float(p) if p is not None and np.isfinite(float(p)) else 1.0)
        label = col["label"][i] if col["label"][i] in LABELS else None
        m = col["malignancy"][i]
        m = float(m) if m is not None and np.isfinite(float(m)) else None
        if m is None:
            m = 1.0 if label == "malignant" else 0.0
        mal.append(m)
        lab.append(label or label_of(m))
        src.append(col["source"][i] if col["source"][i] in SOURCES else "user")
        rev.append(bool(col["reviewed"][i]) if col["reviewed"][i] is not None else False)
        r = col["review"][i]
        state.append(r if r in REVIEW_STATES else ("accepted" if rev[-1] else "unreviewed"))
    nxt = max(used, default=0) + 1
    for j, v in enumerate(ids):
        if v is None:
            ids[j] = nxt
            nxt += 1
    thr = md.get("threshold", DEFAULT_THRESHOLD)
    return NoduleTable(vboxes, ids, prob, mal, lab, src, rev, image,
                       threshold=float(thr) if thr is not None else DEFAULT_THRESHOLD,
                       model_info=md.get("model_info"), review=state)


# --- reconcile a user-edited layer with the table ---------------------------------------------

def reconcile(table: NoduleTable, shapes, features, removed_ids=(), new_label: str = "benign",
              atol: float = 1e-3, slice_index: int | None = None):
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
        if (nid is not None and table.ndim == 3 and s.shape[1] == 3 and valid_id(k)
                and round(float(np.median(s[:, 0]))) != int(float(k))):
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
            z = float(np.round(np.median(s[:, 0]))) if s.shape[1] == 3 else float(k if valid_id(k) else (slice_index or 0))
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


# --- image layer -> Scan ---------------------------------------------------------------------

def scan_for_layer(layer, modality: str | None = None):
    """A `Scan` for a napari Image layer (or anything with .data/.metadata/.scale/.translate).

    Geometry comes from ``layer.metadata["scan"]`` (a Scan or a dict with spacing, origin,
    direction) when our reader put it there; otherwise from the layer's scale, translate
    and affine. The modality is ``modality`` if given, else ``metadata["modality"]``, else
    CT for 3D and CXR for 2D data.
    """
    from .scan import Scan

    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    arr = np.asarray(data)
    if getattr(layer, "rgb", False):
        arr = arr[..., :3].astype(np.float32).mean(-1)
    if arr.ndim not in (2, 3):
        raise ValueError(f"layer '{getattr(layer, 'name', '?')}': expected a 2D radiograph or a 3D CT "
                         f"volume, got data of shape {arr.shape}")
    nd = arr.ndim
    md = dict(getattr(layer, "metadata", {}) or {})
    src = md.get("scan")
    geom = None
    path, seriesuid, smod = md.get("path", ""), md.get("seriesuid", ""), None
    if src is not None:
        get = (lambda k, d=None: src.get(k, d)) if isinstance(src, dict) else (lambda k, d=None: getattr(src, k, d))
        sp, org, dirn = get("spacing"), get("origin"), get("direction")
        if sp is not None and len(sp) == nd:
            geom = (sp, org if org is not None else (0.0,) * nd, dirn if dirn is not None else np.eye(nd))
        path = get("path", path) or path
        seriesuid = get("seriesuid", seriesuid) or seriesuid
        smod = get("modality")
    if geom is None:
        scale = np.asarray(layer.scale, float)[-nd:]
        translate = np.asarray(layer.translate, float)[-nd:]
        direction, origin = np.eye(nd), translate
        aff = getattr(layer, "affine", None)
        if aff is not None:
            a = np.asarray(getattr(aff, "affine_matrix", aff), float)[-(nd + 1):, -(nd + 1):]
            lin = a[:nd, :nd]
            if not np.allclose(lin, np.eye(nd)):
                # keep a rotation/flip as the direction; a scale or shear cannot be one
                if np.allclose(lin @ lin.T, np.eye(nd), atol=1e-6):
                    direction = lin
                else:
                    raise ValueError(f"layer '{layer.name}': its affine is not a rotation, so "
                                     "it has no scan geometry; set scale/translate instead")
            origin = lin @ translate + a[:nd, nd]
        geom = (scale, origin, direction)
    mod = modality or md.get("modality") or smod or ("CT" if nd == 3 else "CXR")
    mod = str(mod).upper()
    if mod not in ("CT", "CXR"):
        mod = "CT" if nd == 3 else "CXR"
    if (mod == "CT") != (nd == 3):
        raise ValueError(f"layer '{getattr(layer, 'name', '?')}': the {mod} model needs a "
                         f"{'3D volume' if mod == 'CT' else '2D image'}, got data of shape {arr.shape}")
    if not seriesuid:
        seriesuid = str(getattr(layer, "name", "") or "")
    return Scan(arr, tuple(geom[0]), tuple(geom[1]), np.asarray(geom[2], float), mod,
                path=str(path or ""), seriesuid=str(seriesuid), metadata={"layer": getattr(layer, "name", "")})
