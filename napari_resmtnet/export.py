"""Export and import nodule annotations: LUNA16-style CSV + a JSON with everything. Qt-free.

CSV (one row per nodule shown at the table's threshold; world millimetres, LPS, x/y/z order
as in LUNA16's ``annotations.csv``; ``coordZ`` is empty for radiographs)::

    seriesuid,coordX,coordY,coordZ,diameter_mm,probability,malignancy,label,id,source,reviewed

JSON (``format: "resmtnet-nodules"``): the image identity (path, seriesuid, modality, shape,
spacing, origin, direction -- array order), the model (name, version, sha256), threshold,
export time, and every nodule with its full box in voxels (array order, min then max
corner), its world centre (x, y[, z]) and size in mm (x, y[, z]) and all its features.
Candidates hidden below the threshold are kept under ``"hidden"`` so that re-importing the
JSON restores the table exactly.

Every write is atomic: a temporary file in the target folder, flushed and fsynced, then
``os.replace``; a failed write leaves any previous file untouched and raises
`NoduleFileError` with a one-line message naming the file.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import boxes as B
from .layers import LABELS, SOURCES, NoduleTable
from .scan import geometry_dict

FORMAT = "resmtnet-nodules"
FORMAT_VERSION = 1
CSV_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "probability",
               "malignancy", "label", "id", "source", "reviewed"]


class NoduleFileError(ValueError):
    """A nodule file that cannot be written, read, or does not belong to the image."""


# --- atomic writes ---------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(target: Path) -> int:
    """Permissions the written file should have: those of the file it replaces, else what
    ``open()`` would give (0o666 minus the umask), not mkstemp's private 0o600."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_texts(files: dict) -> list[str]:
    """Write ``{path: text}`` atomically: every file goes to a temporary file in its folder
    first; only when all are written and fsynced are they moved into place."""
    temps: list[tuple[str, Path]] = []
    current = None
    try:
        for path, text in files.items():
            current = Path(path)
            folder = current.parent if str(current.parent) else Path(".")
            if not folder.is_dir():
                raise FileNotFoundError(f"folder {folder} does not exist")
            fd, tmp = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=folder)
            temps.append((tmp, current))
            try:
                os.fchmod(fd, _final_mode(current))
            except (OSError, AttributeError):  # e.g. Windows, some network shares
                pass
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in temps:
            current = target
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except (OSError, ValueError, TypeError) as exc:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NoduleFileError(f"could not write {current}: {why}") from exc
    return [str(p) for p in files]


# --- serialising -----------------------------------------------------------------------------

def _num(x: float) -> str:
    return repr(float(x))


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
        w.writerow([uid, _num(c[0]), _num(c[1]), _num(c[2]) if table.ndim == 3 else "",
                    _num(diam[i]), _num(table.probability[i]), _num(table.malignancy[i]),
                    table.label[i], int(table.ids[i]), table.source[i],
                    "true" if table.reviewed[i] else "false"])
    return out.getvalue()


def _nodule_dict(table: NoduleTable, i: int, centres, sizes, diam) -> dict:
    d = {
        "id": int(table.ids[i]),
        "probability": float(table.probability[i]),
        "malignancy": float(table.malignancy[i]),
        "label": str(table.label[i]),
        "diameter_mm": float(diam[i]),
        "source": str(table.source[i]),
        "reviewed": bool(table.reviewed[i]),
        "box_voxel": [float(v) for v in table.boxes[i]],
        "center_world_xyz": [float(v) for v in centres[i][::-1]],
        "size_mm_xyz": [float(v) for v in sizes[i][::-1]],
    }
    if table.ndim == 3:
        s = table.slices(i)
        d["slices"] = [s.start, s.stop - 1]
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
        "box_convention": ("box_voxel: min corner then max corner in voxel indices of the image "
                           "array, array order (z, y, x) / (y, x), voxel centres at integers; "
                           "world: LPS millimetres, x/y/z order"),
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

def _req(d: dict, key: str, where: str):
    if key not in d:
        raise NoduleFileError(f"{where}: missing field '{key}'")
    return d[key]


def table_from_json_dict(d: dict, where: str = "nodule JSON") -> NoduleTable:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise NoduleFileError(f"{where}: not a nodule file (expected \"format\": \"{FORMAT}\")")
    image = _req(d, "image", where)
    for k in ("shape", "spacing", "origin", "direction"):
        _req(image, k, where + " image")
    nd = len(image["shape"])
    rows = list(_req(d, "nodules", where)) + list(d.get("hidden", []))
    # by id; rows whose id is not an integer sort first and are refused below with a message
    rows.sort(key=lambda r: r["id"] if isinstance(r, dict) and type(r.get("id")) is int else -1)
    cols = {k: [] for k in ("boxes", "ids", "probability", "malignancy", "label", "source", "reviewed")}
    for j, r in enumerate(rows):
        w = f"{where} nodule {j + 1}"
        if not isinstance(r, dict):
            raise NoduleFileError(f"{w}: expected an object, got {type(r).__name__}")
        box = _req(r, "box_voxel", w)
        if not isinstance(box, (list, tuple)) or len(box) != 2 * nd:
            raise NoduleFileError(f"{w}: box_voxel must be a list of {2 * nd} numbers, got {box!r}"[:200])
        lab, src = _req(r, "label", w), r.get("source", "user")
        if lab not in LABELS:
            raise NoduleFileError(f"{w}: label must be one of {LABELS}, got {lab!r}")
        if src not in SOURCES:
            raise NoduleFileError(f"{w}: source must be one of {SOURCES}, got {src!r}")
        try:
            nums = [float(v) for v in box]
            nid = int(_req(r, "id", w))
            prob = float(r.get("probability", 1.0))
            mal = float(_req(r, "malignancy", w))
        except (TypeError, ValueError) as exc:
            raise NoduleFileError(f"{w}: id, box_voxel, probability and malignancy must be numbers ({exc})") from None
        if not all(math.isfinite(v) for v in nums + [prob, mal]):
            raise NoduleFileError(f"{w}: box_voxel, probability and malignancy must be finite numbers")
        cols["boxes"].append(nums)
        cols["ids"].append(nid)
        cols["probability"].append(prob)
        cols["malignancy"].append(mal)
        cols["label"].append(lab)
        cols["source"].append(src)
        cols["reviewed"].append(bool(r.get("reviewed", False)))
    try:
        return NoduleTable(np.asarray(cols["boxes"], float).reshape(-1, 2 * nd), cols["ids"],
                           cols["probability"], cols["malignancy"], cols["label"], cols["source"],
                           cols["reviewed"], image=dict(image),
                           threshold=float(d.get("threshold", 0.5)),
                           model_info=dict(d["model"]) if d.get("model") else None)
    except (ValueError, KeyError) as exc:
        raise NoduleFileError(f"{where}: {exc}") from exc


def read_nodules_json(path) -> NoduleTable:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NoduleFileError(f"cannot read {p}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NoduleFileError(f"{p}: not valid JSON ({exc})") from exc
    return table_from_json_dict(d, where=str(p))


def read_nodules_csv(path, image: dict, threshold: float = 0.5) -> NoduleTable:
    """Rows of a LUNA16-style CSV for ``image`` (matched by seriesuid when the file has one)
    -> table. Boxes are cubes of ``diameter_mm`` around the centre; missing columns get
    probability 1, malignancy from label, source "user"."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise NoduleFileError(f"cannot read {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise NoduleFileError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text))
    need = {"coordX", "coordY", "diameter_mm"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise NoduleFileError(f"{p}: expected columns {sorted(need)} (LUNA16 style), got {reader.fieldnames}")
    nd = len(image["shape"])
    uid = image.get("seriesuid", "")
    rows = list(reader)
    mine = [r for r in rows if not r.get("seriesuid") or not uid or r.get("seriesuid") == uid]
    if rows and not mine:
        others = sorted({r.get("seriesuid", "") for r in rows})
        raise NoduleFileError(f"{p} belongs to another image: it has seriesuid(s) "
                              f"{', '.join(others[:3])}, this image is '{uid}'")
    geom = geometry_dict(image)
    table = NoduleTable.empty(image, threshold=threshold)
    for j, r in enumerate(mine):
        w = f"{p} row {j + 2}"
        try:
            xyz = [float(r["coordX"]), float(r["coordY"])]
            if nd == 3:
                xyz.append(float(r.get("coordZ") or "nan"))
            dmm = float(r["diameter_mm"])
            mal = r.get("malignancy")
            mal = float(mal) if mal not in (None, "") else None
            prob = r.get("probability")
            prob = float(prob) if prob not in (None, "") else 1.0
        except (TypeError, ValueError) as exc:
            raise NoduleFileError(f"{w}: {exc}") from None
        if not all(math.isfinite(v) for v in xyz + [dmm]):
            raise NoduleFileError(f"{w}: coordinates and diameter must be numbers"
                                  + (" (coordZ is needed for a CT)" if nd == 3 else ""))
        if not all(math.isfinite(v) for v in [prob] + ([mal] if mal is not None else [])):
            raise NoduleFileError(f"{w}: probability and malignancy must be finite numbers")
        centre = np.asarray(xyz[::-1], float)[None]
        box = B.world_to_voxel_boxes(centre, np.full((1, nd), dmm), geom)[0]
        lab = r.get("label") or ""
        if lab not in LABELS:
            lab = "malignant" if (mal is not None and mal >= 0.5) else "benign"
        src = r.get("source") if r.get("source") in SOURCES else "user"
        nid = int(r["id"]) if (r.get("id") or "").isdigit() and int(r["id"]) not in table else None
        table, _ = table.added(box, label=lab, probability=prob,
                               malignancy=mal, source=src,
                               reviewed=str(r.get("reviewed", "")).lower() in ("true", "1", "yes"),
                               nodule_id=nid)
    return table


def check_same_image(file_image: dict, image: dict, path) -> None:
    """Refuse nodules made on another image: seriesuid, shape and spacing must match."""
    diffs = []
    a, b = file_image.get("seriesuid", ""), image.get("seriesuid", "")
    if a and b and a != b:
        diffs.append(f"seriesuid '{a}' vs '{b}'")
    if [int(s) for s in file_image.get("shape", [])] != [int(s) for s in image["shape"]]:
        diffs.append(f"shape {list(file_image.get('shape', []))} vs {list(image['shape'])}")
    elif not np.allclose(np.asarray(file_image.get("spacing"), float), np.asarray(image["spacing"], float),
                         rtol=1e-4, atol=1e-6):
        diffs.append(f"spacing {list(file_image.get('spacing'))} vs {list(image['spacing'])}")
    if diffs:
        raise NoduleFileError(f"{path} belongs to another image ({'; '.join(diffs)}: file vs this image)")


def import_nodules(path, image: dict) -> NoduleTable:
    """Read a nodule JSON (exact) or LUNA16-style CSV made for ``image`` (an
    `napari_resmtnet.layers.image_identity`); refuses files of another image."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        return read_nodules_csv(p, image)
    table = read_nodules_json(p)
    check_same_image(table.image, image, p)
    # keep the file's boxes; take this image's identity (path may differ between machines)
    table.image = dict(image)
    return table
