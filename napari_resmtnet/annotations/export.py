"""Export and import nodule annotations: LUNA16-style CSV + a JSON with everything. Qt-free.

CSV (one row per nodule shown at the table's threshold; world millimetres, LPS, x/y/z order
as in LUNA16's ``annotations.csv``; ``coordZ`` is empty for radiographs)::
    (
        seriesuid,
        coordX,
        coordY,
        coordZ,
        diameter_mm,
        probability,
        malignancy,
        label,
        id,
        source,
        reviewed,
    )
    (
        texture,
        texture_model,
        texture_override,
        p_solid,
        p_part_solid,
        p_ground_glass,
        p_calcified,
    )
    (
        p_spiculated,
        p_ill_defined_margin,
        long_axis_mm,
        short_axis_mm,
        mean_diameter_mm,
        volume_mm3,
    )
    solid_mean_diameter_mm, lungrads, lungrads_size_from, lungrads_note, lungrads_reason

The findings columns (after ``reviewed``) are empty where the model gave nothing: ``texture``
is the effective nodule type (the reader's ``texture_override`` if set, else the model's
``texture_model``); ``p_*`` are the model's probabilities; the sizes are the model's caliper
measurements (mm, mm³); ``lungrads`` is the category recomputed from the effective type and
size (empty: undetermined), ``lungrads_size_from`` says whether that size is the model's
measurement or the box's diameter, and ``lungrads_note`` is always "decision support".
Reading a CSV takes ``texture_model``, ``texture_override`` and the numbers back; the derived
columns (``texture``, ``lungrads*``) are recomputed (a file with ``texture`` but neither
``texture_model`` nor ``texture_override``, e.g. typed by hand, gives it as the reader's
override). Files written before these columns existed, and plain LUNA16 files, still read.

JSON (``format: "resmtnet-nodules"``): the image identity (path, seriesuid, modality, shape,
spacing, origin, direction -- array order), the model (name, version, sha256), threshold,
export time, and every nodule with its full box in voxels (array order, min then max
corner), its world centre (x, y[, z]) and size in mm (x, y[, z]) and all its features: the
model's ``findings`` (`Detections.findings`, exactly), ``texture_model``, the reader's
``texture_override`` (null: none), the effective ``texture`` and ``lungrads`` (category,
reason, size graded and where it came from, the model's calcification probability, marked
"decision support"). ``findings`` and ``texture_override`` are what import reads; the rest
is derived and recomputed. Files without them (written before) import with no findings.
Candidates hidden below the threshold are kept under ``"hidden"`` so that re-importing the
JSON restores the table exactly.

Every write is atomic: a temporary file in the target folder, flushed and fsynced, then
``os.replace``; a failed write leaves any previous file untouched and raises
`NoduleFileError` with a one-line message naming the file. Only regular files (or new files
in a writable folder) are written: devices, FIFOs, folders and links to them are refused.

Text cells of the CSV that a spreadsheet would run as a formula (starting with ``= + - @``,
a tab, a carriage return, or the escape ``'`` itself) get a leading ``'``; reading the CSV
back removes it, so every value round-trips exactly.

Reading is strict and linear in the file's size: one schema for JSON and CSV (types,
ranges, finite numbers, at most `MAX_NODULES` nodules, `MAX_FILE_BYTES`), a UTF-8 BOM is
allowed, and the image identity is checked on every field the file has (seriesuid, shape,
spacing, origin, direction; CSV rows: seriesuid and a centre inside the image). Every
failure is one `NoduleFileError` line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import boxes as B
from .. import lungrads as LR
from .table import (
    FLAT_FINDINGS,
    LABELS,
    REVIEW_STATES,
    ROW_FIELDS,
    SOURCES,
    NoduleTable,
    clean_findings,
    clean_override,
    findings_from_flat,
    flat_findings,
)
from ..files import NoduleFileError, atomic_write_texts
from ..paths import escape_text, file_kind, shown
from ..scan import geometry_dict

FORMAT = "resmtnet-nodules"
FORMAT_VERSION = 1
#: the LUNA16-style columns every version wrote
BASE_CSV_COLUMNS = [
    "seriesuid",
    "coordX",
    "coordY",
    "coordZ",
    "diameter_mm",
    "probability",
    "malignancy",
    "label",
    "id",
    "source",
    "reviewed",
]
#: findings and the Lung-RADS grade (decision support), after the base columns
FINDINGS_CSV_COLUMNS = [
    "texture",
    "texture_model",
    "texture_override",
    *FLAT_FINDINGS,
    "lungrads",
    "lungrads_size_from",
    "lungrads_note",
    "lungrads_reason",
]
CSV_COLUMNS = BASE_CSV_COLUMNS + FINDINGS_CSV_COLUMNS


#: nodule files larger than this, or holding more nodules, are refused before parsing
MAX_FILE_BYTES = 64 << 20
MAX_NODULES = 100_000
#: first characters that make a spreadsheet read a cell as a formula (plus our escape)
FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r", "'")


def _num(x: float) -> str:
    return repr(float(x))


def safe_cell(text) -> str:
    """A text cell a spreadsheet will not run: ``'`` before a leading ``= + - @``, tab, CR or
    ``'`` (OWASP's CSV-injection advice); `read_cell` undoes it exactly."""
    text = str(text)
    return "'" + text if text.startswith(FORMULA_CHARS) else text


def read_cell(text: str) -> str:
    """The value `safe_cell` wrote."""
    if len(text) >= 2 and text[0] == "'" and text[1:].startswith(FORMULA_CHARS):
        return text[1:]
    return text


def csv_text(table: NoduleTable) -> str:
    """The LUNA16-style CSV of the nodules shown at the table's threshold."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    vis = table.visible_mask()
    centres = table.centers_world_xyz()
    diam = table.diameter_mm()
    uid = table.image.get("seriesuid", "")
    for i in np.flatnonzero(vis):
        c = centres[i]
        w.writerow(
            [
                safe_cell(uid),
                _num(c[0]),
                _num(c[1]),
                _num(c[2]) if table.ndim == 3 else "",
                _num(diam[i]),
                _num(table.probability[i]),
                _num(table.malignancy[i]),
                safe_cell(table.label[i]),
                int(table.ids[i]),
                safe_cell(table.source[i]),
                "true" if table.reviewed[i] else "false",
                *_findings_cells(table, i),
            ]
        )
    return out.getvalue()


def _findings_cells(table: NoduleTable, i: int) -> list:
    f = table.findings[i]
    g = table.grade(i)
    flat = [("" if math.isnan(v) else _num(v)) for v in flat_findings(f).values()]
    return [
        table.texture_of(i),
        f.get("texture", ""),
        table.texture_override[i],
        *flat,
        g.category,
        g.size_from,
        LR.DECISION_SUPPORT,
        safe_cell(g.reason),
    ]


def grade_dict(table: NoduleTable, i: int) -> dict:
    """The Lung-RADS grade of nodule ``i`` as the JSON stores it (derived; marked decision support)."""
    g = table.grade(i)
    return {
        "category": g.category or None,
        "reason": g.reason,
        "nodule_type": g.nodule_type or None,
        "type_from": g.type_from or None,
        "mean_diameter_mm": g.mean_diameter_mm,
        "size_from": g.size_from or None,
        "calcified_probability": g.calcified,
        "note": LR.DECISION_SUPPORT,
        "version": LR.VERSION,
    }


def _nodule_dict(table: NoduleTable, i: int, centres, sizes, diam) -> dict:
    d = {
        "id": int(table.ids[i]),
        "probability": float(table.probability[i]),
        "malignancy": float(table.malignancy[i]),
        "label": str(table.label[i]),
        "diameter_mm": float(diam[i]),
        "source": str(table.source[i]),
        "reviewed": bool(table.reviewed[i]),
        "review": str(table.review[i]),
        "box_voxel": [float(v) for v in table.boxes[i]],
        "center_world_xyz": [float(v) for v in centres[i][::-1]],
        "size_mm_xyz": [float(v) for v in sizes[i][::-1]],
    }
    if table.ndim == 3:
        s = table.slices(i)
        d["slices"] = [s.start, s.stop - 1]
    f = table.findings[i]
    d["texture"] = table.texture_of(i) or None
    d["texture_model"] = f.get("texture")
    d["texture_override"] = table.texture_override[i] or None
    d["findings"] = dict(f)
    d["lungrads"] = grade_dict(table, i)
    return d


def json_dict(table: NoduleTable, exported_at: str | None = None) -> dict:
    centres = table.centers_world()
    sizes = table.sizes_mm()
    diam = table.diameter_mm()
    vis = table.visible_mask()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_at": exported_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "box_convention": (
            "box_voxel: min corner then max corner in voxel indices of the image "
            "array, array order (z, y, x) / (y, x), voxel centres at integers; "
            "world: LPS millimetres, x/y/z order"
        ),
        "image": dict(table.image),
        "model": dict(table.model_info) if table.model_info else None,
        "threshold": float(table.threshold),
        "nodules": [_nodule_dict(table, i, centres, sizes, diam) for i in np.flatnonzero(vis)],
        "hidden": [_nodule_dict(table, i, centres, sizes, diam) for i in np.flatnonzero(~vis)],
    }


def json_text(table: NoduleTable, exported_at: str | None = None) -> str:
    return json.dumps(json_dict(table, exported_at), indent=2, allow_nan=False) + "\n"


def output_paths(path) -> tuple[Path, Path]:
    """``x.csv`` / ``x.json`` / ``x`` -> (``x.csv``, ``x.json``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() in (".csv", ".json") else p
    return stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")


def export_nodules(path, table: NoduleTable, exported_at: str | None = None) -> list[str]:
    """Write ``<stem>.csv`` and ``<stem>.json`` next to ``path``; returns both paths."""
    csv_path, json_path = output_paths(path)
    try:
        files = {csv_path: csv_text(table), json_path: json_text(table, exported_at)}
    except (ValueError, TypeError) as exc:
        raise NoduleFileError(f"could not write {json_path}: {exc}") from exc
    return atomic_write_texts(files)


# --- reading ---------------------------------------------------------------------------------
#
# One schema for JSON and CSV. Every check is a plain pass over the values (linear time);
# every failure is a `NoduleFileError` naming the file (and the nodule or row) and the problem.


def _read_text(path, what: str) -> str:
    """The text of a nodule file: a regular file of at most `MAX_FILE_BYTES`, UTF-8 with or
    without a BOM (as spreadsheet programs save it)."""
    p = Path(path)
    kind = file_kind(p)
    if kind == "missing":
        raise NoduleFileError(f"cannot read {shown(p)}: no such file")
    if kind != "file":
        raise NoduleFileError(f"cannot read {shown(p)}: it is a {kind}, not a regular file")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise NoduleFileError(
                f"{shown(p)}: {size} bytes is more than a nodule {what} may hold ({MAX_FILE_BYTES} bytes); refused"
            )
        data = p.read_bytes()
    except OSError as exc:
        raise NoduleFileError(f"cannot read {shown(p)}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NoduleFileError(f"{shown(p)}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None


def _number(value, where: str, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite JSON number (not a bool, not text) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NoduleFileError(f"{where}: {name} must be a number, got {_brief(value)}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise NoduleFileError(f"{where}: {name} must be a finite number, got {_brief(value)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise NoduleFileError(f"{where}: {name} must be in [{lo:g}, {hi:g}], got {v:g}")
    return v


def _brief(value) -> str:
    if isinstance(value, (dict, list)):
        return f"a{'n object' if isinstance(value, dict) else ' list'} of {len(value)}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return "a number too large to use"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _numbers(value, where: str, name: str, n: int, **kw) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        raise NoduleFileError(f"{where}: {name} must be a list of {n} numbers, got {_brief(value)}")
    return [_number(v, where, name, **kw) for v in value]


def _text(value, where: str, name: str, choices=None, max_len: int = 1000) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise NoduleFileError(f"{where}: {name} must be text (at most {max_len} characters), got {_brief(value)}")
    if choices is not None and value not in choices:
        raise NoduleFileError(f"{where}: {name} must be one of {choices}, got {_brief(value)}")
    return value


def _require(obj: dict, keys, where: str) -> None:
    """Refuse ``obj`` (a JSON object) without one of ``keys``, naming the first missing."""
    for k in keys:
        if k not in obj:
            raise NoduleFileError(f"{where}: missing field '{k}'")


def _checked_image(image, where: str) -> dict:
    """The ``image`` identity of a nodule JSON, validated; only the known fields are kept."""
    w = f"{where} image"
    if not isinstance(image, dict):
        raise NoduleFileError(f"{w}: must be an object, got {_brief(image)}")
    _require(image, ("shape", "spacing", "origin", "direction"), w)
    shape = image["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 3)
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10**6 for v in shape)
    ):
        raise NoduleFileError(f"{w}: shape must be 2 or 3 whole numbers from 1 to 1000000, got {_brief(shape)}")
    nd = len(shape)
    out = {
        "shape": list(shape),
        "spacing": _numbers(image["spacing"], w, "spacing", nd, lo=1e-6, hi=1e4),
        "origin": _numbers(image["origin"], w, "origin", nd, lo=-1e7, hi=1e7),
    }
    rows = image["direction"]
    if not isinstance(rows, list) or len(rows) != nd:
        raise NoduleFileError(f"{w}: direction must be a {nd} x {nd} matrix, got {_brief(rows)}")
    out["direction"] = [_numbers(r, w, "direction", nd, lo=-1.0 - 1e-6, hi=1.0 + 1e-6) for r in rows]
    for k in ("path", "seriesuid", "modality"):
        if k in image and image[k] is not None:
            out[k] = _text(image[k], w, k, max_len=4096)
    return {k: out[k] for k in image if k in out}  # the file's order: a re-export is identical


def _plain(value, depth: int = 0) -> bool:
    """JSON of text, booleans, finite numbers, and lists/objects of them, at most 4 deep and
    100 items per level."""
    if value is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, (int, float)):
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    if depth >= 4 or not isinstance(value, (list, dict)) or len(value) > 100:
        return False
    items = value.values() if isinstance(value, dict) else value
    return all(_plain(v, depth + 1) for v in items)


def _checked_model(model, where: str) -> dict | None:
    """The ``model`` of a nodule JSON: None or an object of plain values (see `_plain`)."""
    if model is None:
        return None
    if not isinstance(model, dict) or len(model) > 100:
        raise NoduleFileError(f"{where}: model must be an object, got {_brief(model)}")
    for k, v in model.items():
        if not _plain(v, 1):
            raise NoduleFileError(
                f"{where}: model field {_brief(k)} must be text, finite numbers or short lists/objects of them"
            )
    return dict(model)


def _checked_box(box, where: str, nd: int) -> list[float]:
    nums = _numbers(box, where, "box_voxel", 2 * nd, lo=-1e7, hi=1e7)
    if any(nums[nd + a] < nums[a] for a in range(nd)):
        raise NoduleFileError(f"{where}: box_voxel {nums} has a negative size (max corner below min corner)")
    return nums


def table_from_json_dict(d: dict, where: str = "nodule JSON") -> NoduleTable:
    """A nodule table from a parsed nodule JSON, checked against the schema (one line on failure)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise NoduleFileError(f'{where}: not a nodule file (expected "format": "{FORMAT}")')
    ver = d.get("format_version", FORMAT_VERSION)
    if isinstance(ver, bool) or not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise NoduleFileError(
            f"{where}: format_version {_brief(ver)} is not one this version reads "
            f"(up to {FORMAT_VERSION}); update the plugin"
        )
    _require(d, ("image",), where)
    image = _checked_image(d["image"], where)
    nd = len(image["shape"])
    _require(d, ("nodules",), where)
    rows = []
    for key in ("nodules", "hidden"):
        part = d.get(key, [])
        if not isinstance(part, list):
            raise NoduleFileError(f"{where}: {key} must be a list, got {_brief(part)}")
        rows += part
    if len(rows) > MAX_NODULES:
        raise NoduleFileError(f"{where}: {len(rows)} nodules, more than {MAX_NODULES}; refused")
    threshold = _number(d.get("threshold", 0.5), where, "threshold", lo=0.0, hi=1.0)
    model = _checked_model(d.get("model"), where)
    cols: dict[str, list] = {k: [] for k in ROW_FIELDS}
    seen: set[int] = set()
    for j, r in enumerate(rows):
        w = f"{where} nodule {j + 1}"
        if not isinstance(r, dict):
            raise NoduleFileError(f"{w}: expected an object, got {_brief(r)}")
        _require(r, ("id", "box_voxel", "label", "malignancy"), w)
        nid = r["id"]
        if isinstance(nid, bool) or not isinstance(nid, int) or not 0 <= nid < 2**53:
            raise NoduleFileError(f"{w}: id must be a whole number from 0 to 2**53, got {_brief(nid)}")
        if nid in seen:
            raise NoduleFileError(f"{w}: id {nid} is used twice")
        seen.add(nid)
        reviewed = r.get("reviewed", False)
        if not isinstance(reviewed, bool):
            raise NoduleFileError(f"{w}: reviewed must be true or false, got {_brief(reviewed)}")
        cols["boxes"].append(_checked_box(r["box_voxel"], w, nd))
        cols["ids"].append(nid)
        cols["probability"].append(_number(r.get("probability", 1.0), w, "probability", lo=0.0, hi=1.0))
        cols["malignancy"].append(_number(r["malignancy"], w, "malignancy", lo=0.0, hi=1.0))
        cols["label"].append(_text(r["label"], w, "label", LABELS))
        cols["source"].append(_text(r.get("source", "user"), w, "source", SOURCES))
        review = r.get("review", "accepted" if reviewed else "unreviewed")  # files before review states
        if review not in REVIEW_STATES:
            raise NoduleFileError(f"{w}: review must be one of {REVIEW_STATES}, got {_brief(review)}")
        if "review" in r and "reviewed" in r and reviewed != (review == "accepted"):
            raise NoduleFileError(f"{w}: reviewed={str(reviewed).lower()} contradicts review={review!r}")
        cols["reviewed"].append(reviewed or review == "accepted")
        cols["review"].append(review)
        found, over = _json_findings(r, w)
        cols["findings"].append(found)
        cols["texture_override"].append(over)
    order = np.argsort(np.asarray(cols["ids"], np.int64), kind="stable")  # the table lists nodules by id
    pick = lambda v: [v[i] for i in order]  # noqa: E731
    try:
        return NoduleTable(
            np.asarray(pick(cols["boxes"]), float).reshape(-1, 2 * nd),
            pick(cols["ids"]),
            pick(cols["probability"]),
            pick(cols["malignancy"]),
            pick(cols["label"]),
            pick(cols["source"]),
            pick(cols["reviewed"]),
            image=image,
            threshold=threshold,
            model_info=model,
            review=pick(cols["review"]),
            findings=pick(cols["findings"]),
            texture_override=pick(cols["texture_override"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise NoduleFileError(f"{where}: {exc}") from None


def _json_findings(r: dict, where: str) -> tuple[dict, str]:
    """The model's findings and the reader's texture override of one JSON nodule (both
    optional: files before findings have neither); the derived ``texture`` and ``lungrads``
    are not read. A ``texture_model`` without ``findings.texture`` (a file edited by hand)
    is taken as the model's texture."""
    found = r.get("findings")
    if found is None:
        found = {}
    if not isinstance(found, dict) or len(found) > 100:
        raise NoduleFileError(f"{where}: findings must be an object, got {_brief(found)}")
    if "texture" not in found and r.get("texture_model") is not None:
        found = {**found, "texture": r["texture_model"]}
    over = r.get("texture_override")
    if over is not None and not isinstance(over, str):
        raise NoduleFileError(f"{where}: texture_override must be text or null, got {_brief(over)}")
    try:
        return clean_findings(found), clean_override(over)
    except ValueError as exc:
        raise NoduleFileError(f"{where}: {exc}") from None


def read_nodules_json(path) -> NoduleTable:
    p = Path(path)
    text = _read_text(p, "JSON")
    try:
        d = json.loads(text)  # NaN/Infinity parse, and are refused by the schema with their place
    except RecursionError:
        raise NoduleFileError(f"{shown(p)}: not a nodule file (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, integers of thousands of digits
        raise NoduleFileError(f"{shown(p)}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    return table_from_json_dict(d, where=shown(p))


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def read_nodules_csv(path, image: dict, threshold: float = 0.5) -> NoduleTable:
    """Rows of a LUNA16-style CSV for ``image`` (matched by seriesuid when the file has one)
    -> table. Boxes are cubes of ``diameter_mm`` around the centre; missing columns get
    probability 1, malignancy from label, source "user". Linear in the number of rows."""
    p = Path(path)
    name = shown(p)
    text = _read_text(p, "CSV")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fields = reader.fieldnames
    except csv.Error as exc:
        raise NoduleFileError(f"{name}: not a CSV file ({exc})") from None
    nd = len(image["shape"])
    need = {"coordX", "coordY", "diameter_mm"} | ({"coordZ"} if nd == 3 else set())
    if not fields or not need <= set(fields):
        raise NoduleFileError(
            f"{name}: expected columns {sorted(need)} (LUNA16 style), got {_brief(list(fields or []))}"
        )
    uid = image.get("seriesuid", "")
    rows, others = [], set()
    try:
        for r in reader:
            if len(rows) >= MAX_NODULES:
                raise NoduleFileError(f"{name}: more than {MAX_NODULES} rows; refused")
            row_uid = read_cell(r.get("seriesuid") or "")
            if row_uid and uid and row_uid != uid:
                others.add(row_uid)
                continue
            rows.append((reader.line_num, r))
    except csv.Error as exc:
        raise NoduleFileError(f"{name} line {reader.line_num}: not a valid CSV row ({exc})") from None
    if others and not rows:
        shown_uids = ", ".join(escape_text(u)[:80] for u in sorted(others)[:3])
        raise NoduleFileError(
            f"{name} belongs to another image: it has seriesuid(s) {shown_uids}, this image is '{uid}'"
        )
    cols = {
        k: []
        for k in (
            "centre",
            "diameter",
            "lines",
            "ids",
            "probability",
            "malignancy",
            "label",
            "source",
            "reviewed",
            "findings",
            "texture_override",
        )
    }
    # the findings columns this file has (none in older files: nothing to read per row)
    texture_is_override = "texture" in fields and not {"texture_model", "texture_override"} & set(fields)
    finding_cols = (
        [c for c in FLAT_FINDINGS if c in fields]
        + [c for c in ("texture_model",) if c in fields]
        + [c for c in ("texture" if texture_is_override else "texture_override",) if c in fields]
    )
    used: set[int] = set()
    top = 0
    for line, r in rows:
        w = f"{name} line {line}"
        if None in r:
            raise NoduleFileError(f"{w}: more cells than columns")
        xyz = [_csv_float(r, "coordX", w), _csv_float(r, "coordY", w)]
        if nd == 3:
            xyz.append(_csv_float(r, "coordZ", w))
        dmm = _csv_float(r, "diameter_mm", w)
        if not 0 < dmm <= 1000:
            raise NoduleFileError(f"{w}: diameter_mm must be more than 0 and at most 1000 mm, got {dmm:g}")
        prob = _csv_float(r, "probability", w, 1.0)
        mal = _csv_float(r, "malignancy", w, None)
        for k, v in (("probability", prob), ("malignancy", mal)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise NoduleFileError(f"{w}: {k} must be in [0, 1], got {v:g}")
        lab = read_cell(r.get("label") or "")
        if lab and lab not in LABELS:
            raise NoduleFileError(f"{w}: label must be one of {LABELS} or empty, got {_brief(lab)}")
        if not lab:
            lab = "malignant" if (mal is not None and mal >= 0.5) else "benign"
        src = read_cell(r.get("source") or "") or "user"
        if src not in SOURCES:
            raise NoduleFileError(f"{w}: source must be one of {SOURCES} or empty, got {_brief(src)}")
        rev = (r.get("reviewed") or "").strip().lower()
        if rev not in _TRUE + _FALSE:
            raise NoduleFileError(f"{w}: reviewed must be true or false, got {_brief(r.get('reviewed'))}")
        raw_id = (r.get("id") or "").strip()
        if raw_id and not (raw_id.isascii() and raw_id.isdigit() and len(raw_id) <= 15):
            raise NoduleFileError(f"{w}: id must be a whole number, got {_brief(raw_id)}")
        nid = int(raw_id) if raw_id else None
        if nid is None or nid in used:  # like adding it by hand: the next free id
            nid = top + 1
        used.add(nid)
        top = max(top, nid)
        cols["centre"].append(xyz[::-1])
        cols["diameter"].append(dmm)
        cols["lines"].append(line)
        cols["ids"].append(nid)
        cols["probability"].append(prob)
        cols["malignancy"].append(mal if mal is not None else (1.0 if lab == "malignant" else 0.0))
        cols["label"].append(lab)
        cols["source"].append(src)
        cols["reviewed"].append(rev in _TRUE)
        found, over = _csv_findings(r, w, texture_is_override) if any(r[c] for c in finding_cols) else ({}, "")
        cols["findings"].append(found)
        cols["texture_override"].append(over)
    # all rows at once: world mm -> voxel boxes; every centre must lie in this image
    n = len(cols["ids"])
    centres = np.asarray(cols["centre"], float).reshape(n, nd)
    sizes = np.repeat(np.asarray(cols["diameter"], float).reshape(n, 1), nd, axis=1)
    boxes = (
        B.world_to_voxel_boxes(centres, sizes, geometry_dict(image)).reshape(n, 2 * nd) if n else np.zeros((0, 2 * nd))
    )
    mid = (boxes[:, :nd] + boxes[:, nd:]) / 2
    outside = np.flatnonzero(~np.all((mid >= -0.5) & (mid <= np.asarray(image["shape"], float) - 0.5), axis=1))
    if outside.size:
        i = int(outside[0])
        xyz = ", ".join(f"{v:g}" for v in centres[i][::-1])
        raise NoduleFileError(
            f"{name} line {cols['lines'][i]}: the nodule at ({xyz}) mm lies outside this "
            "image; the file belongs to another image or another coordinate system"
        )
    try:
        return NoduleTable(
            boxes,
            cols["ids"],
            cols["probability"],
            cols["malignancy"],
            cols["label"],
            cols["source"],
            cols["reviewed"],
            image=dict(image),
            threshold=threshold,
            findings=cols["findings"],
            texture_override=cols["texture_override"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise NoduleFileError(f"{name}: {exc}") from None


def _csv_findings(r: dict, where: str, texture_is_override: bool) -> tuple[dict, str]:
    """The model's findings and the reader's override of one CSV row; empty or missing
    cells are no finding (files before these columns have none)."""
    flat = {c: _csv_float(r, c, where, None) for c in FLAT_FINDINGS}
    texture_model = read_cell(r.get("texture_model") or "")
    over = read_cell(r.get("texture" if texture_is_override else "texture_override") or "")
    try:
        return clean_findings(findings_from_flat(flat, texture_model)), clean_override(over)
    except ValueError as exc:
        raise NoduleFileError(f"{where}: {exc}") from None


def _csv_float(r: dict, key: str, where: str, default=math.nan):
    cell = (r.get(key) or "").strip()
    if not cell:
        if default is not math.nan:
            return default
        raise NoduleFileError(f"{where}: {key} is empty" + (" (coordZ is needed for a CT)" if key == "coordZ" else ""))
    try:
        v = float(cell)
    except ValueError:
        raise NoduleFileError(f"{where}: {key} must be a number, got {_brief(cell)}") from None
    if not math.isfinite(v):
        raise NoduleFileError(f"{where}: {key} must be a finite number, got {_brief(cell)}")
    return v


def check_same_image(file_image: dict, image: dict, path) -> None:
    """Refuse nodules made on another image: every identity field the file has must match
    this image's (seriesuid, modality, shape, spacing, origin, direction)."""
    diffs = []
    a, b = file_image.get("seriesuid", ""), image.get("seriesuid", "")
    if a and b and a != b:
        diffs.append(f"seriesuid '{a}' vs '{b}'")
    a, b = file_image.get("modality", ""), image.get("modality", "")
    if a and b and a != b:
        diffs.append(f"modality {a} vs {b}")
    fshape = [int(s) for s in file_image.get("shape", [])]
    if fshape != [int(s) for s in image["shape"]]:
        diffs.append(f"shape {fshape} vs {list(image['shape'])}")
    else:
        for key, tol in (
            ("spacing", dict(rtol=1e-4, atol=1e-6)),
            ("origin", dict(rtol=1e-6, atol=1e-3)),
            ("direction", dict(rtol=0, atol=1e-4)),
        ):
            if key not in file_image or key not in image:
                continue
            fa, ia = np.asarray(file_image[key], float), np.asarray(image[key], float)
            if fa.shape != ia.shape or not np.allclose(fa, ia, **tol):
                diffs.append(f"{key} {np.round(fa, 4).tolist()} vs {np.round(ia, 4).tolist()}")
    if diffs:
        raise NoduleFileError(f"{shown(path)} belongs to another image ({'; '.join(diffs)}: file vs this image)")


def import_nodules(path, image: dict) -> NoduleTable:
    """Read a nodule JSON (exact) or LUNA16-style CSV made for ``image`` (an
    `napari_resmtnet.annotations.table.image_identity`); refuses files of another image. Any failure is
    one `NoduleFileError` line; nothing else escapes."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".csv":
            return read_nodules_csv(p, image)
        table = read_nodules_json(p)
        check_same_image(table.image, image, p)
        # keep the file's boxes; take this image's identity (path may differ between machines)
        table.image = dict(image)
        return table
    except NoduleFileError:
        raise
    except RecursionError:
        raise NoduleFileError(f"{shown(p)}: not a nodule file (nested too deeply)") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        raise NoduleFileError(f"{shown(p)}: not a usable nodule file ({type(exc).__name__}: {exc})") from None
