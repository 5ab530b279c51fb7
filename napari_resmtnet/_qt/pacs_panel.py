"""The "Open from PACS" dock panel: search a DICOMweb PACS, open a series, send findings back.

* **Endpoint:** the DICOMweb base address (default ``$RESMTNET_PACS_URL``) and, optionally, the
  path of a credentials file (default ``$RESMTNET_PACS_TOKEN_FILE``; else
  ``$RESMTNET_PACS_TOKEN``). The panel never asks for or shows a token.
* **Search** (QIDO-RS): patient ID, patient name (``*`` wildcards), study dates, modality.
  Picking a study lists its series (number, modality, description, images); series that are
  not images (SR, SEG, ...) are listed greyed out.
* **Open** (WADO-RS, double-click or the button): the series becomes an image layer in world
  mm, exactly as the reader would open its files, with progress and Cancel.
* **Send accepted findings** (STOW-RS): the nodules accepted in the nodule layer of an opened
  series go to its study as DICOM SEG + SR (`napari_resmtnet.annotations.dicom_export`), then a query
  confirms the PACS has them. Unreviewed candidates are sent only when the box is ticked.

Network work runs in napari ``thread_worker`` threads; every failure is one line in the
panel's status (and a napari notification), never a traceback.
"""

from __future__ import annotations

import os
import threading

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from ..io.pacs import Cancelled, Pacs, PacsError
from .runner import ProgressRelay
from .._reader import scan_layer_data
from ..annotations.table import META_KEY, NoduleTable
from ..annotations.dicom_export import DicomExportError, report_objects

URL_ENV = "RESMTNET_PACS_URL"


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except ImportError:  # pragma: no cover
        pass


class PacsPanel(QWidget):
    """Dock widget; ``pacs_factory(url, token_file)`` makes the client (default: `Pacs`)."""

    def __init__(self, napari_viewer, pacs_factory=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._factory = pacs_factory
        self._studies: list = []
        self._series: list = []
        self._opened: dict = {}  # image layer name -> {"url", "study_uid", "series_uid"}
        self._worker = None
        self._cancel = threading.Event()
        self.last_sent = None  # what the last Send did: ("sent", (stored, missing)), ("none", None), ...

        self.url_edit = QLineEdit(os.environ.get(URL_ENV, ""))
        self.url_edit.setPlaceholderText("https://pacs.example.org/dicom-web")
        self.token_edit = QLineEdit(os.environ.get("RESMTNET_PACS_TOKEN_FILE", ""))
        self.token_edit.setPlaceholderText("credentials file (optional)")
        self.patient_id_edit = QLineEdit()
        self.patient_name_edit = QLineEdit()
        self.patient_name_edit.setPlaceholderText("Doe^J*")
        self.date_from_edit = QLineEdit()
        self.date_from_edit.setPlaceholderText("YYYY-MM-DD")
        self.date_to_edit = QLineEdit()
        self.date_to_edit.setPlaceholderText("YYYY-MM-DD")
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(["any", "CT", "CR", "DX"])
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)

        self.study_table = self._table(["date", "patient", "name", "description", "modalities"])
        self.study_table.itemSelectionChanged.connect(self._on_study_selected)
        self.series_table = self._table(["#", "modality", "description", "images"])
        self.series_table.itemSelectionChanged.connect(self._update_buttons)
        self.series_table.itemDoubleClicked.connect(lambda *_: self.open_selected())

        self.open_button = QPushButton("Open series")
        self.open_button.clicked.connect(self.open_selected)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.unreviewed_check = QCheckBox("include unreviewed candidates")
        self.send_button = QPushButton("Send accepted findings (SR + SEG)")
        self.send_button.clicked.connect(self.send_findings)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setVisible(False)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("DICOMweb URL", self.url_edit)
        form.addRow("Credentials", self.token_edit)
        form.addRow("Patient ID", self.patient_id_edit)
        form.addRow("Patient name", self.patient_name_edit)
        dates = QHBoxLayout()
        dates.addWidget(self.date_from_edit)
        dates.addWidget(QLabel("to"))
        dates.addWidget(self.date_to_edit)
        form.addRow("Study date", dates)
        form.addRow("Modality", self.modality_combo)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.search_button)
        lay.addWidget(QLabel("Studies"))
        lay.addWidget(self.study_table)
        lay.addWidget(QLabel("Series"))
        lay.addWidget(self.series_table)
        row = QHBoxLayout()
        row.addWidget(self.open_button)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.unreviewed_check)
        lay.addWidget(self.send_button)
        lay.addWidget(self.status_label)
        self._update_buttons()

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _table(columns) -> QTableWidget:
        t = QTableWidget(0, len(columns))
        t.setHorizontalHeaderLabels(columns)
        t.setSelectionBehavior(QAbstractItemView.SelectRows)
        t.setSelectionMode(QAbstractItemView.SingleSelection)
        t.setEditTriggers(QAbstractItemView.NoEditTriggers)
        t.verticalHeader().setVisible(False)
        t.horizontalHeader().setStretchLastSection(True)
        return t

    @property
    def is_busy(self) -> bool:
        return self._worker is not None

    def _pacs(self):
        url = self.url_edit.text().strip()
        token = self.token_edit.text().strip() or None
        if self._factory is not None:
            return self._factory(url, token)

        return Pacs(url, token_file=token)

    def _update_buttons(self) -> None:
        busy = self.is_busy
        self.search_button.setEnabled(not busy)
        s = self.selected_series()
        self.open_button.setEnabled(not busy and s is not None and s.is_image)
        self.cancel_button.setEnabled(busy)
        self.send_button.setEnabled(not busy and bool(self._opened))

    def _say(self, text: str, error: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet("color: #e05050;" if error else "")
        if error:
            _notify_error(text)

    def _run(self, job, on_done, label: str, progress: bool = False) -> None:
        """Run ``job(cancel, report)`` in a napari thread worker; ``on_done(result)`` on the GUI
        thread; a failure (one line) goes to the status. ``report(fraction, text)`` may be
        called from the worker (a queued Qt signal carries it to the progress bar)."""
        from napari.qt.threading import thread_worker

        self._cancel = cancel = threading.Event()
        self._relay = relay = ProgressRelay()
        relay.progressed.connect(self._on_progress)

        @thread_worker
        def work():
            return self._guard(job, cancel, relay)

        worker = work()
        worker.returned.connect(lambda r: self._finish(r, on_done))
        self._worker = worker
        self.progress_bar.setVisible(progress)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%p%")
        self._say(label)
        self._update_buttons()
        worker.start()

    @staticmethod
    def _guard(job, cancel, report):
        try:
            return ("ok", job(cancel, report))
        except Cancelled:
            return ("cancelled", None)
        except PacsError as e:
            return ("error", str(e))
        except MemoryError:
            return ("error", "not enough memory")
        except Exception as e:  # noqa: BLE001 -- the thread boundary: one line, never a crash
            text = " ".join(str(e).split()) or type(e).__name__
            return ("error", f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text)

    def _on_progress(self, fraction: float, text: str) -> None:
        if self._worker is None:
            return  # a late update from a finished job
        self.progress_bar.setValue(int(round(1000 * fraction)))
        if text:
            self.progress_bar.setFormat(f"{text} %p%")

    def _finish(self, result, on_done) -> None:
        self._worker = None
        self.progress_bar.setVisible(False)
        kind, value = result if result else ("error", "no result")
        if kind == "ok":
            on_done(value)
        elif kind == "cancelled":
            self._say("Cancelled.")
        else:
            self._say(value, error=True)
        self._update_buttons()

    def cancel(self, *_) -> None:
        if self.is_busy:
            self._cancel.set()
            self._say("Cancelling…")

    # -- search -----------------------------------------------------------------------------
    def search(self, *_) -> None:
        if self.is_busy:
            return
        if not self.url_edit.text().strip():
            self._say("Give the PACS's DICOMweb address first.", error=True)
            return
        mod = self.modality_combo.currentText()
        kw = dict(
            patient_id=self.patient_id_edit.text().strip() or None,
            patient_name=self.patient_name_edit.text().strip() or None,
            date_from=self.date_from_edit.text().strip() or None,
            date_to=self.date_to_edit.text().strip() or None,
            modality=None if mod == "any" else mod,
        )
        self._run(lambda cancel, report: self._pacs().search_studies(**kw), self._show_studies, "Searching…")

    def _show_studies(self, studies) -> None:
        self._studies = list(studies)
        t = self.study_table
        t.setRowCount(len(self._studies))
        for r, s in enumerate(self._studies):
            date = f"{s.date[:4]}-{s.date[4:6]}-{s.date[6:]}" if len(s.date) == 8 else s.date
            for c, v in enumerate([date, s.patient_id, s.patient_name, s.description, " ".join(s.modalities)]):
                t.setItem(r, c, QTableWidgetItem(str(v)))
        t.resizeColumnsToContents()
        self.series_table.setRowCount(0)
        self._series = []
        self._say(f"{len(self._studies)} study(ies) found." if self._studies else "No study matches.")

    def selected_study(self):
        rows = {i.row() for i in self.study_table.selectedItems()}
        return self._studies[min(rows)] if rows and min(rows) < len(self._studies) else None

    def _on_study_selected(self) -> None:
        st = self.selected_study()
        if st is None or self.is_busy:
            return
        self._run(lambda cancel, report: self._pacs().search_series(st.study_uid), self._show_series, "Listing series…")

    def _show_series(self, series) -> None:
        self._series = list(series)
        t = self.series_table
        t.setRowCount(len(self._series))
        for r, s in enumerate(self._series):
            vals = [
                "" if s.number is None else s.number,
                s.modality,
                s.description,
                "" if s.n_instances is None else s.n_instances,
            ]
            for c, v in enumerate(vals):
                item = QTableWidgetItem(str(v))
                if not s.is_image:
                    item.setFlags(item.flags() & ~Qt.ItemIsEnabled & ~Qt.ItemIsSelectable)
                    item.setToolTip("not an image series: cannot be opened")
                t.setItem(r, c, item)
        t.resizeColumnsToContents()
        self._say(f"{len(self._series)} series.")
        self._update_buttons()

    def selected_series(self):
        rows = {i.row() for i in self.series_table.selectedItems()}
        return self._series[min(rows)] if rows and min(rows) < len(self._series) else None

    # -- open -------------------------------------------------------------------------------
    def open_selected(self, *_) -> None:
        s = self.selected_series()
        if s is None or self.is_busy:
            return
        if not s.is_image:
            self._say(f"Series {s.number} is {s.modality}, not an image (CT, CR, DX).", error=True)
            return

        def job(cancel, report):
            return self._pacs().load_series(s.study_uid, s.series_uid, progress=report, cancel=cancel.is_set)

        self._run(job, self._add_scan, f"Opening series {s.number or ''} ({s.modality})…", progress=True)

    def _add_scan(self, scan) -> None:
        s = self.selected_series()
        name = " ".join(filter(None, [s.modality if s else scan.modality, s.description if s else ""])) or scan.name
        data, kwargs, _ = scan_layer_data(scan, name=name)[0]
        layer = self.viewer.add_image(data, **kwargs)
        self._opened[layer.name] = dict(scan.metadata.get("dicomweb", {}))
        msg = f"Opened {layer.name}: {' x '.join(str(n) for n in scan.shape)}."
        if scan.warnings:
            msg += " " + " ".join(scan.warnings)
        self._say(msg)

    # -- send -------------------------------------------------------------------------------
    def nodule_table_for(self, image_layer_name: str):
        """The nodule table (from the detect widget's layer) of an opened series, or None."""

        ref = self._opened.get(image_layer_name) or {}
        for ly in self.viewer.layers:
            t = ly.metadata.get(META_KEY) if isinstance(getattr(ly, "metadata", None), dict) else None
            if isinstance(t, NoduleTable) and (
                ly.metadata.get("image_layer") == image_layer_name or t.image.get("seriesuid") == ref.get("series_uid")
            ):
                return t
        return None

    def send_findings(self, *_) -> None:
        if self.is_busy:
            return
        active = self.viewer.layers.selection.active
        names = [n for n in self._opened if n in self.viewer.layers]
        name = None
        if active is not None and active.name in names:
            name = active.name
        else:
            for ly in self.viewer.layers:  # a selected nodule layer of an opened image
                md = getattr(ly, "metadata", {}) or {}
                if ly in self.viewer.layers.selection and md.get("image_layer") in names:
                    name = md["image_layer"]
            name = name or (names[-1] if names else None)
        if name is None:
            self._say("Open a series from the PACS and detect nodules first.", error=True)
            return
        table = self.nodule_table_for(name)
        if table is None:
            self._say(f"{name} has no nodules: press Detect nodules first.", error=True)
            return
        ref = self._opened[name]
        include = self.unreviewed_check.isChecked()

        def job(cancel, report):
            pacs = self._pacs()
            headers = pacs.series_headers(ref["study_uid"], ref["series_uid"])
            try:
                objs = report_objects(table, headers, include_unreviewed=include)
            except DicomExportError as e:
                return ("refused", str(e))
            if objs is None:
                return ("none", None)
            stored = pacs.store(objs)
            missing = pacs.confirm_stored(ref["study_uid"], stored)
            return ("sent", (stored, missing))

        self._run(job, self._sent, "Sending SR + SEG…")

    def _sent(self, result) -> None:
        kind, value = result
        if kind == "none":
            self._say("No accepted nodules to send (accept them first, or tick 'include unreviewed').", error=True)
        elif kind == "refused":
            self._say(value, error=True)
        else:
            stored, missing = value
            if missing:
                self._say(
                    f"The PACS took {len(stored)} object(s) but does not list {len(missing)} of them.", error=True
                )
            else:
                self._say(f"Sent and confirmed: DICOM SEG + SR ({len(stored)} objects) in the study.")
        self.last_sent = result
