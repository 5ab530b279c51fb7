"""A human-readable reading report: the findings table and one key image per nodule. Qt-free.

`write_html_report` writes one self-contained HTML file (key images embedded as PNG) for
the nodules the reader accepted; rejected and unreviewed candidates are left out unless
asked for. Each key image is the nodule's centre slice (CT, lung window) or the radiograph,
cropped around the nodule, with its box drawn in the label's colour.

Where the nodules have findings (`NoduleTable.findings`) or a reader's type, the table adds
the nodule type (the reader's or the model's, said which), long x short axis, volume, and the
Lung-RADS category, headed and footnoted as decision support, with where its size came from
and the model's calcification flag (any pattern: never category 1 by itself).

Research use only: the report says so, and which model and threshold produced the
candidates.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .table import NoduleTable, axes_text, grade_text, nodule_colors, texture_text, volume_text
from ..lungrads import DECISION_SUPPORT, VERSION

#: lung window (HU) of the CT key images
LUNG_WINDOW = (-1350.0, 150.0)
#: key images show at least this much around the nodule (mm)
CONTEXT_MM = 40.0


def _window(img: np.ndarray, modality: str) -> np.ndarray:
    img = np.asarray(img, np.float32)
    if modality == "CT":
        lo, hi = LUNG_WINDOW
    else:
        finite = img[np.isfinite(img)]
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def key_image(array: np.ndarray, table: NoduleTable, i: int, size_px: int = 256) -> np.ndarray:
    """(H, W, 3) uint8: the nodule ``i``'s centre slice (or the radiograph) around it, with
    its box drawn; square in millimetres."""
    from skimage.transform import resize

    modality = table.image.get("modality", "CT" if table.ndim == 3 else "CXR")
    box = table.boxes[i]
    if table.ndim == 3:
        plane = np.asarray(array[table.center_slice(i)])
        y0, x0, y1, x1 = box[1], box[2], box[4], box[5]
        sp = table.spacing[1:]
    else:
        plane = np.asarray(array)
        y0, x0, y1, x1 = box
        sp = table.spacing
    half_mm = max(CONTEXT_MM / 2, 1.5 * max((y1 - y0) * sp[0], (x1 - x0) * sp[1]))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    hy, hx = half_mm / sp[0], half_mm / sp[1]
    r0, r1 = int(np.floor(cy - hy)), int(np.ceil(cy + hy))
    c0, c1 = int(np.floor(cx - hx)), int(np.ceil(cx + hx))
    pad = ((max(0, -r0), max(0, r1 - plane.shape[0])), (max(0, -c0), max(0, c1 - plane.shape[1])))
    fill = LUNG_WINDOW[0] if modality == "CT" else float(np.min(plane))
    padded = np.pad(plane.astype(np.float32), pad, constant_values=fill)
    crop = padded[r0 + pad[0][0] : r1 + pad[0][0], c0 + pad[1][0] : c1 + pad[1][0]]
    gray = _window(crop, modality)
    out = resize(gray, (size_px, size_px), order=1, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    rgb = np.repeat(out[..., None], 3, axis=2)
    # the box, in the crop's pixels scaled to the output
    sy, sx = size_px / max(crop.shape[0], 1), size_px / max(crop.shape[1], 1)
    by0, by1 = int(round((y0 - 0.5 - r0) * sy)), int(round((y1 + 0.5 - r0) * sy))
    bx0, bx1 = int(round((x0 - 0.5 - c0) * sx)), int(round((x1 + 0.5 - c0) * sx))
    color = (np.asarray(nodule_colors(table, i)[1][:3]) * 255).astype(np.uint8)
    for t in range(2):
        for a, b, fixed, horizontal in (
            (bx0, bx1, by0 - t, True),
            (bx0, bx1, by1 + t, True),
            (by0, by1, bx0 - t, False),
            (by0, by1, bx1 + t, False),
        ):
            lo, hi = max(min(a, b), 0), min(max(a, b), size_px - 1)
            if 0 <= fixed < size_px and lo <= hi:
                if horizontal:
                    rgb[fixed, lo : hi + 1] = color
                else:
                    rgb[lo : hi + 1, fixed] = color
    return rgb


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def report_rows(table: NoduleTable, states=("accepted",)) -> list[int]:
    """Positions of the nodules a report includes: those in ``states`` that are shown at the
    table's threshold (a reader's own nodules always are), by detection probability."""
    vis = table.visible_mask()
    keep = [i for i in range(len(table)) if vis[i] and table.review[i] in states]
    return sorted(keep, key=lambda i: (-table.probability[i], int(table.ids[i])))


def findings_cells(table: NoduleTable, i: int) -> list[str]:
    """Type, long x short axis (mm), volume (mm³) and Lung-RADS of nodule ``i`` as report
    cells (plain text, not yet escaped); empty where the nodule has none."""
    f = table.findings[i]
    return [texture_text(table, i), axes_text(f), volume_text(f), grade_text(table, i)]


def _caption_findings(table: NoduleTable, i: int) -> str:
    kind, _, _, grade = findings_cells(table, i)
    parts = [p for p in (kind, f"Lung-RADS {grade} ({DECISION_SUPPORT})" if grade and grade != "-" else "") if p]
    return ("<br>" + html.escape(", ".join(parts))) if parts else ""


def write_html_report(
    path, table: NoduleTable, array: np.ndarray, states=("accepted",), title: str = "Lung nodule reading report"
) -> Path:
    """Write the report for ``table`` on the image ``array`` to ``path`` (atomically);
    returns the path. ``states``: which review states to include (default: accepted)."""
    path = Path(path)
    rows = report_rows(table, states)
    centres = table.centers_world_xyz()
    sizes = table.sizes_mm()
    diam = table.diameter_mm()
    esc = html.escape
    model = table.model_info or {}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;text-align:right}"
        "th{background:#eee}.nodule{display:inline-block;margin:8px;text-align:center;font-size:90%}"
        ".warn{color:#a00}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p class='warn'><b>Research use only. Not a medical device.</b> Findings were proposed by a "
        "model and reviewed by the reader; only the nodules listed were " + esc(" or ".join(states)) + ".</p>",
        "<p>",
        f"Image: {esc(str(table.image.get('seriesuid') or ''))} ({esc(str(table.image.get('modality', '')))}, "
        f"shape {esc(str(list(table.shape)))}, spacing {esc(', '.join(f'{s:g}' for s in table.spacing))} mm)<br>",
        f"Model: {esc(str(model.get('name', 'none')))} {esc(str(model.get('version', '')))}"
        f" (sha256 {esc(str(model.get('sha256', ''))[:12])}…), threshold {table.threshold:.2f}<br>",
        f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"{len(rows)} nodule(s) reported of {len(table)} kept.</p>",
    ]
    if not rows:
        parts.append("<p>No nodules to report.</p>")
    else:
        with_findings = any(table.findings[i] or table.texture_override[i] for i in rows)
        head = [
            "#",
            "id",
            "label",
            "malignancy",
            "detection",
            "diameter (mm)",
            "size (mm)",
            "centre x, y, z (mm, LPS)",
            "slice",
            "review",
            "source",
        ]
        if with_findings:
            head += ["type", "long × short (mm)", "volume (mm³)", f"Lung-RADS* ({DECISION_SUPPORT})"]
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
        for n, i in enumerate(rows, 1):
            cells = [
                n,
                int(table.ids[i]),
                esc(str(table.label[i])),
                f"{table.malignancy[i]:.2f}",
                f"{table.probability[i]:.2f}",
                f"{diam[i]:.1f}",
                " × ".join(f"{v:.1f}" for v in sizes[i][::-1]),
                ", ".join(f"{v:.1f}" for v in centres[i]),
                table.center_slice(i) if table.ndim == 3 else "-",
                esc(str(table.review[i])),
                esc(str(table.source[i])),
            ]
            if with_findings:
                cells += [esc(c) for c in findings_cells(table, i)]
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
        if with_findings:
            parts.append(
                f"<p class='note'>* Lung-RADS: {esc(VERSION)} category from the nodule type and mean diameter, "
                f'<b>{esc(DECISION_SUPPORT)}</b> only: the reader confirms type and size. "measured": the model\'s '
                'caliper measurement; "box": the box\'s diameter (no measurement). A calcification found by the '
                "model (any pattern) is shown beside the category and never makes it 1: only a benign pattern "
                "(complete, central, popcorn, concentric) or fat does, which the reader judges. Growth, prior "
                "scans and the S modifier are left to the reader.</p>"
            )
        parts.append("<h2>Key images</h2>")
        for n, i in enumerate(rows, 1):
            uri = _png_data_uri(key_image(array, table, i))
            where = f"slice {table.center_slice(i)}, " if table.ndim == 3 else ""
            parts.append(
                f"<div class='nodule'><img src='{uri}' width='256' height='256' "
                f"alt='nodule {int(table.ids[i])}'><br>#{n} (id {int(table.ids[i])}): "
                f"{esc(str(table.label[i]))}, {diam[i]:.1f} mm, {where}malignancy {table.malignancy[i]:.2f}"
                + _caption_findings(table, i)
                + "</div>"
            )
    parts.append("</body></html>")
    text = "\n".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
