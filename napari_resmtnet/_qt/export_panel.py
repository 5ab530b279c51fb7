"""The files panel: export and import the nodules, the reading report, the autosave.

Export writes LUNA16-style CSV + full JSON (`napari_resmtnet.annotations.export`); Import restores a
JSON (or CSV) made for the same image; Report writes an HTML report of the accepted
nodules with a key image of each (`napari_resmtnet.annotations.report`), and for a CT read from DICOM
also its DICOM SEG and SR. Whenever an image whose autosave holds nodules is opened
(again), the reader is asked whether to restore them, and "Restore autosave" brings them
back on demand (``RESMTNET_AUTOSAVE_RESTORE=always`` or ``never`` answers for scripted
sessions). Errors become one notification each.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QFileDialog, QHBoxLayout, QPushButton, QWidget

from ..annotations import autosave
from ..annotations.dicom_export import DicomExportError, write_dicom_report
from ..annotations.export import NoduleFileError, export_nodules, import_nodules
from ..annotations.report import write_html_report
from ..annotations.table import META_KEY, image_identity
from ..layers import scan_for_layer
from ..annotations.session import complete_csv_table
from .layer_view import image_layers, is_nodule_layer

#: autosave this long after the last change of the nodules (ms); see `AutosaveQueue`
AUTOSAVE_DELAY_MS = 1000


class ExportPanel(QWidget):
    """``host`` gives ``viewer``, ``session``, ``layers``, ``autosave`` (an
    `AutosaveQueue`), ``notify``, ``ask``, ``show_nodules``, ``image_layer()``, ``modality_for(layer)`` and
    ``model_threshold()``."""

    def __init__(self, host, parent=None):
        super().__init__(parent)
        self.host = host
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._export_dialog)
        self.import_button = QPushButton("Import…")
        self.import_button.clicked.connect(self._import_dialog)
        self.report_button = QPushButton("Report…")
        self.report_button.setToolTip("An HTML report of the accepted nodules with a key image of each")
        self.report_button.clicked.connect(self._report_dialog)
        self.restore_button = QPushButton("Restore autosave")
        self.restore_button.setToolTip("Show the nodules autosaved for the chosen image")
        self.restore_button.clicked.connect(self._restore_clicked)
        for b in (self.export_button, self.import_button, self.report_button, self.restore_button):
            row.addWidget(b)
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self.flush_autosave)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.flush_autosave)

    def update_buttons(self, have: bool) -> None:
        self.export_button.setEnabled(have)
        self.report_button.setEnabled(have)

    # --- export / import ------------------------------------------------------------------
    def export_nodules(self, path) -> list[str]:
        """Write ``<stem>.csv`` and ``<stem>.json``; errors become notifications."""

        t = self.host.session.table
        if t is None:
            self.host.notify("error", "There are no nodules to export yet.")
            return []
        try:
            paths = export_nodules(path, t)
        except NoduleFileError as exc:
            self.host.notify("error", str(exc))
            return []
        n = int(t.visible_mask().sum())
        self.host.notify("info", f"Saved {n} nodule(s) to {paths[0]} and {os.path.basename(paths[1])}")
        return paths

    def _current_image_identity(self):
        layer, host = self.host.image_layer(), self.host
        if layer is not None:
            try:
                return image_identity(scan_for_layer(layer, host.modality_for(layer))), layer.name
            except ValueError as exc:
                host.notify("error", str(exc))
                return None, None
        if host.session.table is not None:
            return dict(host.session.table.image), host.layers.layer.metadata.get("image_layer") or None
        host.notify("error", "Open the image the nodules belong to first.")
        return None, None

    def import_nodules(self, path):
        """Load a nodule JSON/CSV made for the chosen image; refuses another image's."""

        image, image_layer = self._current_image_identity()
        if image is None:
            return None
        try:
            table = import_nodules(path, image)
        except NoduleFileError as exc:
            self.host.notify("error", str(exc))
            return None
        if str(path).lower().endswith(".csv") and table.model_info is None:
            current = self.host.layers.layer_for_image(image_layer) if image_layer else None
            table = complete_csv_table(
                table, current.metadata[META_KEY] if current is not None else None, self.host.model_threshold()
            )
        layer = self.host.show_nodules(table, image_layer_name=image_layer)
        self.host.notify("info", f"Imported {len(table)} nodule(s) from {os.path.basename(str(path))}")
        return layer

    # --- report ---------------------------------------------------------------------------
    def write_report(self, path, states=("accepted",)):
        """Write the HTML reading report of the nodules in ``states`` (default: accepted)
        with a key image of each; returns its path (None after an error notification)."""

        t, notify = self.host.session.table, self.host.notify
        if t is None:
            notify("error", "There are no nodules to report yet.")
            return None
        image = self.host.layers.image_of_nodules()
        if image is None:
            notify("error", "Open the image the nodules belong to first: the report shows it.")
            return None
        try:
            arr = scan_for_layer(image, "CT" if t.ndim == 3 else "CXR").array
            out = write_html_report(path, t, arr, states=states)
        except (OSError, ValueError) as exc:
            notify("error", f"Could not write the report {path}: {exc}")
            return None
        n = sum(int(np.sum(t.visible_mask() & (t.review == s))) for s in states)
        notify("info", f"Wrote the report of {n} {'/'.join(states)} nodule(s) to {out}")
        self._write_dicom_report(t, image, out, states)
        return out

    def _write_dicom_report(self, t, image, out, states) -> list:
        """When the CT was read from a DICOM series, also its DICOM SEG and SR (TID 1500) of
        the accepted nodules beside the HTML report (``<name>_seg.dcm``, ``<name>_sr.dcm``),
        referencing the source series; a failure is one notification, the HTML stays."""
        src = str((image.metadata or {}).get("path") or "")
        if t.ndim != 3 or "accepted" not in states or not src:
            return []
        p = Path(src)
        if not (p.is_dir() or p.suffix.lower() == ".dcm"):
            return []

        try:
            files = write_dicom_report(t, p, out)
        except DicomExportError as exc:
            self.host.notify("error", f"Wrote the HTML report, but no DICOM SR/SEG: {exc}")
            return []
        except ImportError as exc:  # highdicom/pydicom not installed
            self.host.notify("error", f"Wrote the HTML report; DICOM SR/SEG need highdicom ({exc})")
            return []
        self.host.notify(
            "info", f"Wrote the DICOM SEG and SR of the accepted nodules: {files[0].name}, {files[1].name}"
        )
        return files

    # --- dialogs --------------------------------------------------------------------------
    def _start_name(self, suffix: str) -> str | None:
        t = self.host.session.table
        return None if t is None else (t.image.get("seriesuid") or "nodules") + suffix

    def _report_dialog(self, *_) -> None:
        start = self._start_name("_report.html")
        if start is not None:
            path, _ = QFileDialog.getSaveFileName(self, "Reading report (HTML)", start, "HTML (*.html)")
            if path:
                self.write_report(path)

    def _export_dialog(self, *_) -> None:
        start = self._start_name("_nodules.csv")
        if start is not None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Export nodules (CSV + JSON)", start, "Nodule CSV (*.csv);;Nodule JSON (*.json)"
            )
            if path:
                self.export_nodules(path)

    def _import_dialog(self, *_) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import nodules", "", "Nodule files (*.json *.csv)")
        if path:
            self.import_nodules(path)

    # --- autosave -------------------------------------------------------------------------
    def schedule_autosave(self, table) -> None:
        """Autosave ``table`` AUTOSAVE_DELAY_MS after the last change (debounced: a dragged
        slider or a burst of edits is one write), at the latest `AutosaveQueue.max_delay_s`
        after the first unsaved change."""
        if table is None:
            return
        if self.host.autosave.add(table):
            self.flush_autosave()
        else:
            self._autosave_timer.start()

    def flush_autosave(self, *_) -> list[str]:
        """Write the pending autosaves now; a failure is one error notification (not
        repeated while the same problem persists). Returns the paths written."""
        self._autosave_timer.stop()
        written, error = self.host.autosave.flush()
        if error:
            self.host.notify("error", error)
        return written

    def offer_restore(self, layer) -> None:
        """When ``layer`` (an image) has autosaved nodules and no nodule layer yet, offer
        them back (ask, or as ``RESMTNET_AUTOSAVE_RESTORE`` says)."""
        from napari.layers import Image

        viewer, host = self.host.viewer, self.host
        if not isinstance(layer, Image) or layer not in viewer.layers:
            return
        policy = autosave.restore_policy()
        if policy == "never":
            return
        try:
            image = image_identity(scan_for_layer(layer, host.modality_for(layer)))
        except (ValueError, TypeError):
            return
        key = autosave.image_key(image)
        if not host.autosave.offer(key, id(layer)):
            return
        if key in host.autosave.pending or any(
            is_nodule_layer(ly) and autosave.image_key(ly.metadata[META_KEY].image) == key for ly in viewer.layers
        ):
            return
        try:
            info = autosave.peek(image)
        except NoduleFileError as exc:
            host.notify("error", f"Autosaved nodules of {layer.name} cannot be restored: {exc}")
            return
        if info is None or info.n_nodules == 0:
            return
        name = layer.name

        def answer(yes: bool) -> None:
            if yes:
                self.restore_autosave(name)

        if policy == "always":
            answer(True)
            return
        when = f" on {info.saved_at.replace('T', ' at ')[:22]}" if info.saved_at else ""
        host.ask(
            "restore",
            f"{info.n_nodules} nodule(s) of {name} ({info.n_shown} shown) were autosaved{when}. Restore them?",
            answer,
        )

    def _restore_clicked(self, *_) -> None:
        layer = self.host.image_layer()
        if layer is None:
            self.host.notify("info", "Open the image whose autosaved nodules you want back first.")
            return
        if self.restore_autosave(layer.name) is None:
            self.host.notify("info", f"There are no autosaved nodules for {layer.name}.")

    def restore_autosave(self, image_layer_name: str):
        """Show the autosaved nodules of the image layer ``image_layer_name``; returns the
        nodule layer (None when there is nothing to restore)."""

        host = self.host
        layer = next((ly for ly in image_layers(host.viewer) if ly.name == image_layer_name), None)
        if layer is None:
            return None
        try:
            image = image_identity(scan_for_layer(layer, host.modality_for(layer)))
            table = autosave.load(image)
        except (ValueError, NoduleFileError) as exc:
            host.notify("error", f"Autosaved nodules of {image_layer_name} cannot be restored: {exc}")
            return None
        if table is None:
            return None
        out = host.show_nodules(table, image_layer_name=image_layer_name)
        host.notify("info", f"Restored {len(table)} autosaved nodule(s) of {image_layer_name}")
        return out
