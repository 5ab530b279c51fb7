"""Render the HTML reading report of the bundled lung1 sample to docs/screenshots/report.png.

    xvfb-run -a -s '-screen 0 1280x1024x24' .venv/bin/python scripts/report_screenshot.py

Detects with the bundled CT model, accepts the most probable nodule, writes the report with
`report.write_html_report` (the widget's **Report...**) and renders it in a Qt text browser,
so the picture is the report file as written.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from napari_resmtnet import load_scan, sample_path
from napari_resmtnet.inference.predictor import Predictor
from napari_resmtnet.annotations.table import NoduleTable, image_identity
from napari_resmtnet.annotations.report import write_html_report


def main(out="docs/screenshots/report.png") -> int:
    from qtpy.QtWidgets import QApplication, QTextBrowser

    scan = load_scan(sample_path("lung1"))
    det = Predictor("CT", device="cpu").predict(scan)
    table = NoduleTable.from_detections(
        det, image_identity(scan), threshold=det.meta["threshold"], model_info=det.meta["model_info"]
    )
    best = int(table.ids[int(table.probability.argmax())])
    table = table.with_review([best], "accepted")
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(write_html_report(Path(tmp) / "lung1_report.html", table, scan.array))
        app = QApplication.instance() or QApplication(sys.argv)
        view = QTextBrowser()
        view.setHtml(html.read_text(encoding="utf-8"))
        view.resize(1100, 900)
        view.show()
        app.processEvents()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        view.grab().save(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
