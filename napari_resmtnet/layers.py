"""Nodule tables as napari layers, and back: the napari adapter of `NoduleTable`.

Qt-free: pure functions on numpy arrays, dicts and napari layer objects. The table itself
(`napari_resmtnet.annotations.table`) is the truth; a layer is a *view* of it, regenerated
from it after every edit (see that module's docstring for why Shapes, one rectangle per slice).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .annotations.export import table_from_json_dict
from .annotations.table import (
    DEFAULT_THRESHOLD,
    FEATURE_COLUMNS,
    FLAT_FINDINGS,
    LABELS,
    META_KEY,
    REVIEW_MARKS,
    REVIEW_STATES,
    SOURCES,
    TEXT_FORMAT,
    NoduleTable,
    _rect,
    clean_findings,
    clean_override,
    findings_from_flat,
    flat_findings,
    image_identity,
    inplane,
    label_of,
    _column,
    valid_id,
    nodule_colors,
)
from .detections import Detections
from .scan import Scan, napari_geometry_kwargs

# --- table -> napari layer -------------------------------------------------------------------


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
    per_nodule = {}  # findings columns of each shown nodule, computed once (a CT nodule has many shapes)
    for i in np.flatnonzero(vis):
        f = table.findings[i]
        per_nodule[i] = {
            "texture": table.texture_of(i),
            "texture_model": str(f.get("texture", "")),
            "texture_override": str(table.texture_override[i]),
            "lungrads": table.grade(i).category,
            **flat_findings(f),
        }
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
            for c, v in per_nodule[i].items():
                rows[c].append(v)
            e, t = nodule_colors(table, i)
            edge.append(e)
            text.append(t)
    edge = np.asarray(edge, float).reshape(-1, 4)
    text = np.asarray(text, float).reshape(-1, 4)
    return data, rows, edge, text


def slice_geometry_kwargs(image: dict, slice_index: int) -> dict:
    """scale / translate / affine of a 2D layer that shows slice ``slice_index`` of a CT
    ``image`` (its in-plane axes) in the image's millimetres."""

    sp = np.asarray(image["spacing"], float)
    org = np.asarray(image["origin"], float)
    d = np.asarray(image["direction"], float).reshape(3, 3)
    at_k = org + d @ np.array([sp[0] * float(slice_index), 0.0, 0.0])
    return napari_geometry_kwargs(sp[1:], at_k[1:], d[1:, 1:])


_FEATURE_DTYPES = {
    "id": "int64",
    "probability": "float64",
    "malignancy": "float64",
    "label": object,
    "diameter_mm": "float64",
    "source": object,
    "reviewed": "bool",
    "review": object,
    "mark": object,
    "slice": "int64",
    "texture": object,
    "texture_model": object,
    "texture_override": object,
    "lungrads": object,
    **{c: "float64" for c in FLAT_FINDINGS},
}


def features_frame(rows: dict):
    """Per-shape feature columns -> a typed pandas DataFrame (typed even when empty, so that
    napari accepts string/bool defaults for shapes drawn later)."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(rows.get(c, []), dtype=_FEATURE_DTYPES[c]) for c in FEATURE_COLUMNS})


def feature_defaults(new_label: str = "benign", slice_index: int = -1) -> dict:
    """Features a shape drawn by hand starts with; ``id`` -1 marks it as not yet a nodule."""
    return {
        "id": -1,
        "probability": 1.0,
        "malignancy": 1.0 if new_label == "malignant" else 0.0,
        "label": new_label,
        "diameter_mm": 0.0,
        "source": "user",
        "reviewed": False,
        "review": "unreviewed",
        "mark": "",
        "slice": int(slice_index),
        "texture": "",
        "texture_model": "",
        "texture_override": "",
        "lungrads": "",
        **{c: math.nan for c in FLAT_FINDINGS},
    }


def edge_width_for(table: NoduleTable) -> float:
    """Edge width in data pixels: ~2 px on a 512 grid, wider on big radiographs."""
    return float(max(1.5, max(table.shape[-2:]) / 300.0))


def text_kwargs(text_color) -> dict:
    return {
        "string": TEXT_FORMAT,
        "anchor": "upper_left",
        "size": 10,
        "color": {"array": np.asarray(text_color, float).reshape(-1, 4), "default": "white"},
    }


def napari_kwargs_of(image: dict) -> dict:
    """scale / translate / affine for a layer in the image's millimetres (as `Scan.napari_kwargs`)."""

    return napari_geometry_kwargs(image["spacing"], image["origin"], image["direction"])


def layer_name_for(image: dict) -> str:
    base = image.get("seriesuid") or "image"
    if len(base) > 24:
        base = base[:10] + "…" + base[-10:]
    return f"{base} nodules"


def table_to_layer_data(
    table: NoduleTable,
    threshold: float | None = None,
    name: str | None = None,
    new_label: str = "benign",
    slice_index: int | None = None,
):
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
        metadata={
            META_KEY: table,
            "image": dict(table.image),
            "model_info": table.model_info,
            "threshold": table.threshold,
        },
        opacity=1.0,
        **geometry,
    )
    return (data, kwargs, "shapes")


def detections_to_layer_data(
    detections: Detections,
    scan,
    threshold: float | None = None,
    name: str | None = None,
    model_info: dict | None = None,
) -> list:
    """Detections on ``scan`` -> ``[LayerDataTuple]``: one Shapes layer of nodule boxes.

    All candidates are kept in the layer's table (``layer.metadata["nodules"]``); those
    below ``threshold`` (default: ``detections.meta["threshold"]``, else 0.5) are hidden.
    """
    table = NoduleTable.from_detections(detections, image_identity(scan), threshold=threshold, model_info=model_info)
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
    return {
        "path": "",
        "seriesuid": str(md.get("seriesuid", "")),
        "modality": "CT" if ndim == 3 else "CXR",
        "shape": shape,
        "spacing": scale.tolist(),
        "origin": list(map(float, origin)),
        "direction": np.asarray(direction).tolist(),
    }


def layer_to_nodules(layer) -> NoduleTable:
    """The nodule table of a napari layer (or LayerDataTuple): the reverse of
    `detections_to_layer_data`.

    A layer made by this module carries its table in ``metadata["nodules"]``; a copy is
    returned. Any other Shapes layer is read shape by shape: shapes sharing a feature ``id``
    make one nodule (a CT nodule's slices), the rest one nodule each; probability,
    malignancy, label, source, reviewed, the model's texture (``texture_model``), the reader's
    override (``texture_override``) and the numeric findings (`FLAT_FINDINGS`) come from
    features when present (invalid findings are left out, not fatal). A Points layer gives
    one nodule per point, its box the point's size.
    """
    data, meta, kind = _parts(layer)
    md = meta.get("metadata") or {}
    t = md.get(META_KEY)
    if isinstance(t, NoduleTable):
        return t.copy()
    if isinstance(t, dict):
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
    col = {
        c: _column(feats, c, n_rows, None)
        for c in (
            "id",
            "probability",
            "malignancy",
            "label",
            "source",
            "reviewed",
            "review",
            "texture_model",
            "texture_override",
            *FLAT_FINDINGS,
        )
    }
    ids, prob, mal, lab, src, rev, state, found, over = [], [], [], [], [], [], [], [], []
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
        try:
            found.append(
                clean_findings(findings_from_flat({c: col[c][i] for c in FLAT_FINDINGS}, col["texture_model"][i]))
            )
        except ValueError:
            found.append({})
        try:
            over.append(clean_override(col["texture_override"][i]))
        except ValueError:
            over.append("")
    nxt = max(used, default=0) + 1
    for j, v in enumerate(ids):
        if v is None:
            ids[j] = nxt
            nxt += 1
    thr = md.get("threshold", DEFAULT_THRESHOLD)
    return NoduleTable(
        vboxes,
        ids,
        prob,
        mal,
        lab,
        src,
        rev,
        image,
        threshold=float(thr) if thr is not None else DEFAULT_THRESHOLD,
        model_info=md.get("model_info"),
        review=state,
        findings=found,
        texture_override=over,
    )


# --- image layer -> Scan ---------------------------------------------------------------------


def scan_for_layer(layer, modality: str | None = None):
    """A `Scan` for a napari Image layer (or anything with .data/.metadata/.scale/.translate).

    Geometry comes from ``layer.metadata["scan"]`` (a Scan or a dict with spacing, origin,
    direction) when our reader put it there; otherwise from the layer's scale, translate
    and affine. The modality is ``modality`` if given, else ``metadata["modality"]``, else
    CT for 3D and CXR for 2D data.
    """

    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    arr = np.asarray(data)
    if getattr(layer, "rgb", False):
        arr = arr[..., :3].astype(np.float32).mean(-1)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"layer '{getattr(layer, 'name', '?')}': expected a 2D radiograph or a 3D CT "
            f"volume, got data of shape {arr.shape}"
        )
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
            a = np.asarray(getattr(aff, "affine_matrix", aff), float)[-(nd + 1) :, -(nd + 1) :]
            lin = a[:nd, :nd]
            if not np.allclose(lin, np.eye(nd)):
                # keep a rotation/flip as the direction; a scale or shear cannot be one
                if np.allclose(lin @ lin.T, np.eye(nd), atol=1e-6):
                    direction = lin
                else:
                    raise ValueError(
                        f"layer '{layer.name}': its affine is not a rotation, so "
                        "it has no scan geometry; set scale/translate instead"
                    )
            origin = lin @ translate + a[:nd, nd]
        geom = (scale, origin, direction)
    mod = modality or md.get("modality") or smod or ("CT" if nd == 3 else "CXR")
    mod = str(mod).upper()
    if mod not in ("CT", "CXR"):
        mod = "CT" if nd == 3 else "CXR"
    if (mod == "CT") != (nd == 3):
        raise ValueError(
            f"layer '{getattr(layer, 'name', '?')}': the {mod} model needs a "
            f"{'3D volume' if mod == 'CT' else '2D image'}, got data of shape {arr.shape}"
        )
    if not seriesuid:
        seriesuid = str(getattr(layer, "name", "") or "")
    return Scan(
        arr,
        tuple(geom[0]),
        tuple(geom[1]),
        np.asarray(geom[2], float),
        mod,
        path=str(path or ""),
        seriesuid=str(seriesuid),
        metadata={"layer": getattr(layer, "name", "")},
    )
