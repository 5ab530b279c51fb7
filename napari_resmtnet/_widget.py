"""The "Detect nodules" dock widget: detect, review, correct, report lung nodules.

Workflow: pick the image layer, the model (CT or CXR; from the image's modality unless
overridden) and device, click **Detect nodules**. Detection runs in a napari worker thread
with a progress bar (stage and percent) in the widget and in napari's activity dock, and a
Cancel button; the layers change only when it returns, on the GUI thread
(``RESMTNET_SYNC=1`` runs it synchronously for debugging). Detecting again keeps what the
reader accepted, rejected or drew (asked once) and replaces only unreviewed candidates
(`napari_resmtnet.annotations.review.merge_detections`).

The nodules are shown in a Shapes layer (`napari_resmtnet.layers`): for CT a 2D layer with
the boxes of the slice on screen, refilled when the slice changes (so that napari can pick
them: see `NoduleWidget._add_slice_layer`); colour by label (benign green, malignant red,
rejected grey), text "malignant 0.87 ✓" = label, detection probability, review mark;
opacity by confidence. In 3D the nodules are wire boxes (one label each) inside a lung surface.

Views: **Three planes** opens coronal and sagittal views beside the axial canvas
(`napari_resmtnet._qt.planes`): the same CT with the nodule boxes of their plane (z extent
visible) and a linked cursor -- a click in any view moves the others' slices there, and
jumping to a nodule (table, ``.`` / ``,``) centres all three on it. Window presets on keys
(bound on the viewer, so they work whatever layer is active) and buttons: ``F2`` lung
(W1500/L-600), ``F3`` mediastinum (W350/L40), ``F4`` bone (W2000/L500). The line under them
gives the three planes' slices and their positions in mm.

Reading: the threshold slider (starting at the model's operating point) hides/shows
candidates without re-running the model; the table lists shown nodules in reading order
(click or arrow keys: go to its slice and select it). On the canvas, click a box to select
it, drag to move, drag a handle to resize (napari's select tool, on any slice of a CT
nodule); ``[`` / ``]`` make the selected nodule start / end at the slice shown. Keys (on the
canvas and in the table): ``a`` accept, ``x`` reject, ``u`` back to unreviewed, ``.`` / ``,``
next / previous unreviewed nodule, ``m`` flip benign/malignant, ``r`` toggle accepted,
``n`` draw a new box, Delete, Ctrl+Z undo, Ctrl+Shift+Z or Ctrl+Y redo. The selection
stays across edits. Export writes LUNA16-style CSV + full JSON; Import restores a JSON (or
CSV) made for the same image; Report writes an HTML report of the accepted nodules with a
key image of each (`napari_resmtnet.annotations.report`).

Weights: "Weights…" picks a user weights file for its modality (checked at once: sha256
from ``<file>.sha256``, ``weights_only`` loading, format, network config); a file that fails
is refused with a notification and the bundled weights stay in use.

No lost work: every change of the nodules is autosaved (`napari_resmtnet.annotations.autosave`, about
one second after the last edit, atomically); whenever an image whose autosave holds
nodules is opened (again), the widget asks whether to restore them, and "Restore autosave"
brings them back on demand (``RESMTNET_AUTOSAVE_RESTORE=always`` or ``never`` answers for
scripted sessions).

The nodule table in ``layer.metadata["nodules"]`` is the truth; every change goes through
`NoduleWidget._set_table`, which ends in `NoduleWidget._on_nodules_changed` -- the one
place to hook autosave (the ``nodules_changed`` signal carries the new table).
"""
from __future__ import annotations

import os
import threading
import time
from functools import partial

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication, QComboBox, QFileDialog, QFormLayout, QGridLayout, QHBoxLayout, QLabel, QMessageBox,
    QProgressBar, QPushButton, QSlider, QVBoxLayout, QWidget,
)

from napari.utils.notifications import show_error, show_info

from .boxes import slice_index_of, voxel_to_world_points
from .annotations.table import LABEL_RGB, LABELS, META_KEY, REJECTED_RGB, NoduleTable, image_identity
from .layers import (
    edge_width_for, feature_defaults, features_frame, reconcile, scan_for_layer, slice_geometry_kwargs, table_to_layer_data,
    table_to_shapes, text_kwargs,
)
from .annotations.review import History, counts, merge_detections, next_nodule, reader_work
from .views import WINDOW_PRESETS, positions_text, window_limits, nodule_boxes_3d, lung_mask
from .inference.predictor import Predictor
from .inference.weights import WeightsError, bundled_entry, load_checkpoint, load_model
from ._qt.runner import ProgressRelay, run_detection
from ._qt.table import NoduleTableView
from ._qt.planes import ThreePlanes
from .scan import napari_geometry_kwargs
from .annotations.autosave import image_key
from .annotations import autosave
from .annotations.export import NoduleFileError, export_nodules, import_nodules
from .annotations.report import write_html_report
from .annotations.dicom_export import DicomExportError, write_dicom_report

MODEL_CHOICES = ("auto", "CT", "CXR")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
UNDO_DEPTH = 50
#: napari keeps shape vertices in float32: closer than this (voxels) counts as unchanged
SAME_VOXELS = 1e-3
#: autosave this long after the last change of the nodules (ms) ...
AUTOSAVE_DELAY_MS = 1000
#: ... but at the latest this long after the first unsaved change (s), during long edits
AUTOSAVE_MAX_DELAY_S = 10.0
#: window presets on keys, bound on the viewer (any layer active): F-keys, because napari's
#: layers use the digits and most letters (the nodule keys take a x u m r n . , [ ])
WINDOW_KEYS = {"lung": "F2", "mediastinum": "F3", "bone": "F4"}


def default_predictor_factory(modality: str, device: str):
    """The bundled Res-MTNet for ``modality`` on ``device`` (loads weights; slow)."""

    return Predictor(modality=modality, device=device)


def user_weights_predictor_factory(modality: str, device: str, weights: str):
    """Res-MTNet from a user weights file (the same checks as the bundled weights)."""

    return Predictor(modality=modality, weights=weights, device=device)


def check_user_weights(path) -> dict:
    """Verify a user weights file now (sha256 from ``<file>.sha256``, weights_only loading,
    format, config, and that this version's network accepts it); returns its info dict.
    Raises `napari_resmtnet.inference.weights.WeightsError` with a one-line message."""

    ckpt = load_checkpoint(path)
    _, info = load_model(ckpt["modality"], weights=path, sha256=ckpt["sha256"], device="cpu")
    if info["sha256"] != ckpt["sha256"]:  # changed between the two reads
        raise WeightsError(f"{path}: the file changed while it was checked")
    return info


def ask_restore(parent, question: str, on_answer) -> None:
    """Ask (without blocking the viewer) whether to restore autosaved nodules; calls
    ``on_answer(True/False)``. Tests and scripts replace this function."""
    box = QMessageBox(QMessageBox.Question, "Restore autosaved nodules?", question,
                      QMessageBox.Yes | QMessageBox.No, parent)
    box.setDefaultButton(QMessageBox.Yes)
    box.setWindowModality(Qt.NonModal)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.finished.connect(lambda result: on_answer(result == QMessageBox.Yes))
    box.show()


def ask_merge(parent, question: str, on_answer) -> None:
    """Ask (without blocking the viewer) whether to detect again, keeping the reader's
    work; calls ``on_answer(True/False)``. Tests and scripts replace this function."""
    box = QMessageBox(QMessageBox.Question, "Detect again?", question,
                      QMessageBox.Yes | QMessageBox.No, parent)
    box.setDefaultButton(QMessageBox.Yes)
    box.setWindowModality(Qt.NonModal)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.finished.connect(lambda result: on_answer(result == QMessageBox.Yes))
    box.show()


def operating_point(modality: str) -> float | None:
    """The bundled model's operating threshold for ``modality`` (from the weights registry;
    no torch), or None when it cannot be read."""
    try:
        return float(bundled_entry(modality).get("threshold", 0.5))
    except Exception:  # a missing or broken registry: the slider just shows no model point
        return None


def probe_cuda() -> tuple[bool, str]:
    """(available, description) of a CUDA GPU, importing torch only now."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    try:
        if torch.cuda.is_available():
            return True, f"CUDA: {torch.cuda.get_device_name(0)}"
    except RuntimeError as exc:
        return False, f"CUDA unusable ({exc})"
    return False, "no CUDA GPU found: CPU"


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb)


def is_nodule_layer(layer) -> bool:
    return isinstance(getattr(layer, "metadata", None), dict) and isinstance(
        layer.metadata.get(META_KEY), NoduleTable)


class NoduleWidget(QWidget):
    """Dock widget: Detect nodules, review, correct, export.

    ``predictor_factory(modality, device)`` returns an object with
    ``predict(scan, progress, cancel) -> Detections``, ``threshold`` and ``model_info``
    (default: `napari_resmtnet.inference.predictor.Predictor`); predictors are cached per
    (modality, device).
    """

    #: emitted with the new `NoduleTable` after every change (see `_on_nodules_changed`)
    nodules_changed = Signal(object)

    def __init__(self, napari_viewer, predictor_factory=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._factory = predictor_factory or default_predictor_factory
        self._predictors: dict = {}
        self._predictor_lock = threading.Lock()
        self._worker = None
        self._running = False
        self._cancel = threading.Event()
        self._pbar = None
        self.nodule_layer = None
        self._history: dict[int, History] = {}
        #: the slice the current-slice nodule layer shows (CT), None before any
        self._slice: int | None = None
        #: nodules the reader selected: kept across edits, slices and re-renders
        self._selected: tuple = ()
        self._merge_asked: set = set()
        self._hidden_for_3d = None
        self._lung_worker = None
        #: the coronal/sagittal dock (`napari_resmtnet._qt.planes.ThreePlanes`) when open
        self.planes = None
        self._planes_dock = None
        self._updating = False
        self._pending_removed: set[int] = set()
        self._sync_scheduled = False
        self._last_selected: tuple = ()
        self.cuda_available = False
        self.weights_path: str | None = None
        self.weights_info: dict | None = None
        self._weights_factory = user_weights_predictor_factory
        self._autosave_pending: dict = {}
        self._autosave_since: float | None = None
        self._autosave_error = ""
        self._autosave_offered: set = set()
        self._offered_keys: dict = {}
        self._build_ui()
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self.flush_autosave)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.flush_autosave)
        self._relay = None

        self._relay = ProgressRelay(self)
        self._relay.progressed.connect(self._on_progress)

        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layer_removed)
        layers.selection.events.active.connect(self._on_active_layer)
        self.viewer.dims.events.point.connect(self._on_dims_point)
        self.viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        for layer in layers:
            self._watch_name(layer)
        self._refresh_images()
        for layer in layers:
            if is_nodule_layer(layer):
                self._adopt(layer)
        for layer in self._image_layers():
            QTimer.singleShot(0, partial(self._offer_restore, layer))
        QTimer.singleShot(0, self._probe_devices)
        for name, key in WINDOW_KEYS.items():
            self.viewer.bind_key(key, partial(self._key_window, name), overwrite=True)
        self.nodules_changed.connect(self._refresh_planes)
        self._update_position()

    # --- UI -------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._update_model_hint)
        form.addRow("image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.addItems(["auto (from image)", "CT (3D)", "CXR (radiograph)"])
        self.model_combo.currentIndexChanged.connect(self._update_model_hint)
        form.addRow("model", self.model_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "CPU", "CUDA"])
        form.addRow("device", self.device_combo)
        self.device_label = QLabel("checking for a GPU…")
        form.addRow("", self.device_label)
        wrow = QHBoxLayout()
        self.weights_label = QLabel("bundled")
        self.weights_label.setWordWrap(True)
        self.weights_button = QPushButton("Weights…")
        self.weights_button.setToolTip("Use a weights file of your own (a <file>.sha256 must lie beside it)")
        self.weights_button.clicked.connect(self._weights_dialog)
        self.bundled_button = QPushButton("Bundled")
        self.bundled_button.setToolTip("Go back to the weights that come with the plugin")
        self.bundled_button.clicked.connect(self.use_bundled_weights)
        self.bundled_button.setEnabled(False)
        wrow.addWidget(self.weights_label, 1)
        wrow.addWidget(self.weights_button)
        wrow.addWidget(self.bundled_button)
        form.addRow("weights", wrow)
        root.addLayout(form)

        view_row = QHBoxLayout()
        self.planes_button = QPushButton("Three planes")
        self.planes_button.setCheckable(True)
        self.planes_button.setToolTip("Coronal and sagittal views beside the axial one, with the nodules "
                                      "and a linked cursor (click in any view to move the others)")
        self.planes_button.toggled.connect(self.show_planes)
        view_row.addWidget(self.planes_button)
        self.window_buttons = {}
        for name, key in WINDOW_KEYS.items():
            wl = WINDOW_PRESETS[name]
            b = QPushButton(f"{name.capitalize()} ({key})")
            b.setToolTip(f"{name} window: W{wl[0]:.0f} / L{wl[1]:.0f} HU")
            b.clicked.connect(partial(self.set_window, name))
            view_row.addWidget(b)
            self.window_buttons[name] = b
        root.addLayout(view_row)
        self.position_label = QLabel("")
        self.position_label.setWordWrap(True)
        self.position_label.setToolTip("The axial, coronal and sagittal slices shown (1-based) and where they "
                                       "lie in the image's millimetres")
        root.addWidget(self.position_label)

        row = QHBoxLayout()
        self.detect_button = QPushButton("Detect nodules")
        self.detect_button.clicked.connect(self.detect)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.detect_button, 3)
        row.addWidget(self.cancel_button, 1)
        root.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("%p%")
        self.progress_bar.setVisible(False)
        root.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)

        thr = QHBoxLayout()
        thr.addWidget(QLabel("threshold"))
        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(50)
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        self.threshold_slider.sliderReleased.connect(self._apply_slider)
        # while the slider is dragged, re-draw at most every 150 ms (many CT boxes are slow)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(150)
        self._threshold_timer.timeout.connect(self._apply_slider)
        thr.addWidget(self.threshold_slider, 1)
        self.threshold_label = QLabel("0.50")
        thr.addWidget(self.threshold_label)
        root.addLayout(thr)
        self.count_label = QLabel("no nodules")
        root.addWidget(self.count_label)
        b, m = _hex(LABEL_RGB["benign"]), _hex(LABEL_RGB["malignant"])
        g = _hex(REJECTED_RGB)
        self.legend = QLabel(f"<span style='color:{b}'>&#9632; benign</span> &nbsp; "
                             f"<span style='color:{m}'>&#9632; malignant</span> &nbsp; "
                             f"<span style='color:{g}'>&#9632; rejected</span><br>"
                             "box text: label and detection probability; fainter = less sure, "
                             "&#10003; accepted, &#10007; rejected")
        self.legend.setWordWrap(True)
        root.addWidget(self.legend)

        self.table = NoduleTableView(self)
        self.table.nodule_clicked.connect(self.focus_nodule)
        self.table.texture_overridden.connect(self.override_texture)
        self.table.key_pressed.connect(self._table_key)
        self.table.itemSelectionChanged.connect(self._on_table_selection)
        root.addWidget(self.table, 1)

        grid = QGridLayout()
        grid.addWidget(QLabel("new nodule label"), 0, 0)
        self.new_label_combo = QComboBox()
        self.new_label_combo.addItems(list(LABELS))
        self.new_label_combo.currentTextChanged.connect(self._on_new_label)
        grid.addWidget(self.new_label_combo, 0, 1)
        self.add_button = QPushButton("Draw new (n)")
        self.add_button.clicked.connect(self.start_drawing)
        grid.addWidget(self.add_button, 0, 2)
        self.accept_button = QPushButton("Accept (a)")
        self.accept_button.setToolTip("Confirm the selected nodules")
        self.accept_button.clicked.connect(self.accept_selected)
        self.reject_button = QPushButton("Reject (x)")
        self.reject_button.setToolTip("Dismiss the selected nodules (kept grey; a new detection "
                                      "run does not bring them back)")
        self.reject_button.clicked.connect(self.reject_selected)
        self.unreview_button = QPushButton("Unreview (u)")
        self.unreview_button.clicked.connect(self.unreview_selected)
        grid.addWidget(self.accept_button, 1, 0)
        grid.addWidget(self.reject_button, 1, 1)
        grid.addWidget(self.unreview_button, 1, 2)
        self.prev_button = QPushButton("< Previous unreviewed (,)")
        self.prev_button.clicked.connect(self.previous_unreviewed)
        self.next_button = QPushButton("Next unreviewed (.) >")
        self.next_button.clicked.connect(self.next_unreviewed)
        grid.addWidget(self.prev_button, 2, 0, 1, 2)
        grid.addWidget(self.next_button, 2, 2)
        self.flip_button = QPushButton("Flip label (m)")
        self.flip_button.clicked.connect(self.flip_selected)
        self.reviewed_button = QPushButton("Accepted (r)")
        self.reviewed_button.setToolTip("Toggle accepted / unreviewed")
        self.reviewed_button.clicked.connect(self.mark_reviewed)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_selected)
        grid.addWidget(self.flip_button, 3, 0)
        grid.addWidget(self.reviewed_button, 3, 1)
        grid.addWidget(self.delete_button, 3, 2)
        self.first_slice_button = QPushButton("First slice here ([)")
        self.first_slice_button.setToolTip("The selected CT nodule starts at the slice shown")
        self.first_slice_button.clicked.connect(self.set_first_slice)
        self.last_slice_button = QPushButton("Last slice here (])")
        self.last_slice_button.setToolTip("The selected CT nodule ends at the slice shown")
        self.last_slice_button.clicked.connect(self.set_last_slice)
        grid.addWidget(self.first_slice_button, 4, 0)
        grid.addWidget(self.last_slice_button, 4, 1)
        self.undo_button = QPushButton("Undo (Ctrl+Z)")
        self.undo_button.clicked.connect(self.undo)
        self.redo_button = QPushButton("Redo (Ctrl+Shift+Z)")
        self.redo_button.clicked.connect(self.redo)
        grid.addWidget(self.undo_button, 5, 0)
        grid.addWidget(self.redo_button, 5, 1)
        self.restore_button = QPushButton("Restore autosave")
        self.restore_button.setToolTip("Show the nodules autosaved for the chosen image")
        self.restore_button.clicked.connect(self._restore_clicked)
        grid.addWidget(self.restore_button, 5, 2)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._export_dialog)
        self.import_button = QPushButton("Import…")
        self.import_button.clicked.connect(self._import_dialog)
        self.report_button = QPushButton("Report…")
        self.report_button.setToolTip("An HTML report of the accepted nodules with a key image of each")
        self.report_button.clicked.connect(self._report_dialog)
        grid.addWidget(self.export_button, 6, 0)
        grid.addWidget(self.import_button, 6, 1)
        grid.addWidget(self.report_button, 6, 2)
        root.addLayout(grid)
        self._update_buttons()

    def _probe_devices(self) -> None:
        self.cuda_available, text = probe_cuda()
        self.device_label.setText(text)
        self.device_combo.model().item(2).setEnabled(self.cuda_available)

    def _update_buttons(self) -> None:
        have = self.nodule_layer is not None
        for b in (self.flip_button, self.reviewed_button, self.delete_button, self.export_button, self.report_button,
                  self.add_button, self.accept_button, self.reject_button, self.unreview_button,
                  self.next_button, self.prev_button):
            b.setEnabled(have)
        ct = have and self.nodules is not None and self.nodules.ndim == 3
        self.first_slice_button.setEnabled(ct)
        self.last_slice_button.setEnabled(ct)
        h = self._history.get(id(self.nodule_layer)) if have else None
        self.undo_button.setEnabled(bool(h and h.can_undo))
        self.redo_button.setEnabled(bool(h and h.can_redo))
        self.detect_button.setEnabled(not self._running)
        self.cancel_button.setEnabled(self._running)

    # --- image layers ---------------------------------------------------------------------
    def _image_layers(self) -> list:
        from napari.layers import Image

        return [ly for ly in self.viewer.layers
                if isinstance(ly, Image) and not (ly.metadata or {}).get("resmtnet_3d")]

    def _watch_name(self, layer) -> None:
        layer.events.name.connect(self._refresh_images)

    def _refresh_images(self, event=None) -> None:
        current = self.image_combo.currentText()
        names = [ly.name for ly in self._image_layers()]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentIndex(names.index(current))
        self.image_combo.blockSignals(False)
        self._update_model_hint()

    def image_layer(self):
        """The image layer chosen in the picker (None when there is none)."""
        name = self.image_combo.currentText()
        for ly in self._image_layers():
            if ly.name == name:
                return ly
        return None

    def set_image_layer(self, layer) -> None:
        i = self.image_combo.findText(layer.name)
        if i >= 0:
            self.image_combo.setCurrentIndex(i)

    def modality_for(self, layer) -> str:
        """CT or CXR: the override if chosen, else the layer's modality, else by ndim."""
        choice = MODEL_CHOICES[self.model_combo.currentIndex()]
        if choice != "auto":
            return choice
        md = getattr(layer, "metadata", {}) or {}
        mod = md.get("modality")
        scan = md.get("scan")
        if mod is None and scan is not None:
            mod = scan.get("modality") if isinstance(scan, dict) else getattr(scan, "modality", None)
        if str(mod).upper() in ("CT", "CXR"):
            return str(mod).upper()
        nd = layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0)
        return "CT" if nd == 3 else "CXR"

    def _update_model_hint(self, *_):
        layer = self.image_layer()
        if self.nodule_layer is not None:
            self._update_status()  # the nodules' state stays on the status line
        elif layer is not None and not self._running:
            self.status_label.setText(f"{layer.name}: {self.modality_for(layer)} model")
        if self.nodule_layer is None and hasattr(self, "threshold_slider"):
            op = self.model_threshold()  # before any nodules: the model's operating point
            if op is not None:
                self._set_slider(op)

    def device(self) -> str:
        return DEVICE_CHOICES[self.device_combo.currentIndex()]

    # --- detection ------------------------------------------------------------------------
    def _get_predictor(self, modality: str, device: str):
        weights = self.weights_path if self.weights_info and self.weights_info.get("modality") == modality else None
        key = (modality, device, weights)
        with self._predictor_lock:
            if key not in self._predictors:
                if weights is None:
                    self._predictors[key] = self._factory(modality, device)
                else:
                    self._predictors[key] = self._weights_factory(modality, device, weights)
            return self._predictors[key]

    # --- user weights ---------------------------------------------------------------------
    def set_weights(self, path) -> bool:
        """Use the weights file ``path`` for its modality, after checking it; a file that
        fails the checks is refused with a notification (the current weights stay)."""

        path = os.fspath(path)
        try:
            info = check_user_weights(path)
        except WeightsError as exc:
            show_error(f"Weights not used: {exc}")
            return False
        except (OSError, RuntimeError, ValueError) as exc:  # unexpected, still one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            show_error(f"Weights not used: {path}: {first}")
            return False
        self.weights_path, self.weights_info = path, info
        self.weights_label.setText(f"{os.path.basename(path)} ({info['modality']}, {info['name']} "
                                   f"{info['version']}, sha256 {info['sha256'][:8]}…)")
        self.bundled_button.setEnabled(True)
        show_info(f"Using weights {path} for {info['modality']} (sha256 {info['sha256'][:12]}…)")
        return True

    def use_bundled_weights(self, *_) -> None:
        self.weights_path, self.weights_info = None, None
        self.weights_label.setText("bundled")
        self.bundled_button.setEnabled(False)

    def _weights_dialog(self, *_) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Res-MTNet weights", "", "Weights (*.pt *.pth);;All files (*)")
        if path:
            self.set_weights(path)

    @property
    def is_running(self) -> bool:
        return self._running

    def detect(self, *_) -> None:
        """Run detection on the chosen image layer (in a worker thread)."""
        if self._running:
            show_info("Detection is already running; wait for it or cancel it.")
            return
        layer = self.image_layer()
        if layer is None:
            show_error("Open a chest CT or X-ray first: there is no image layer to search.")
            return
        modality = self.modality_for(layer)
        try:
            scan = scan_for_layer(layer, modality)
        except ValueError as exc:
            show_error(str(exc))
            return
        device = self.device()
        if device == "cuda" and not self.cuda_available:
            show_error("CUDA was chosen but no CUDA GPU was found; choose auto or CPU.")
            return
        old_layer = self._layer_for_image(layer.name)
        work = reader_work(old_layer.metadata[META_KEY]) if old_layer is not None else 0
        if work and id(old_layer) not in self._merge_asked:
            def answer(yes: bool) -> None:
                if yes:
                    self._merge_asked.add(id(old_layer))
                    self._start_detection(layer, scan, modality, device)

            ask_merge(self, f"{layer.name} has {work} nodule(s) you accepted, rejected or drew. "
                            "Detect again? They are kept as they are; only the unreviewed "
                            "candidates are replaced by the new run's.", answer)
            return
        self._start_detection(layer, scan, modality, device)

    def _start_detection(self, layer, scan, modality: str, device: str) -> None:
        if self._running or layer not in self.viewer.layers:
            return
        from napari.utils import progress

        self._cancel = threading.Event()
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("starting %p%")
        self.progress_bar.setVisible(True)
        self._running = True
        self._update_buttons()
        self.status_label.setText(f"Detecting nodules in {layer.name} ({modality}, {device})…")
        self._pbar = progress(total=1000, desc=f"Detecting nodules ({modality})")
        job = partial(run_detection, self._get_predictor, scan, modality, device, self._cancel,
                      self._relay, {"image_layer": layer.name, "image": image_identity(scan)})
        if os.environ.get("RESMTNET_SYNC") == "1":
            self._on_detection_done(job())
            return
        from napari.qt.threading import create_worker

        worker = create_worker(job, _start_thread=False)
        worker.returned.connect(self._on_detection_done)
        worker.finished.connect(self._on_worker_finished)
        self._worker = worker
        worker.start()

    def cancel(self, *_) -> None:
        """Ask the running detection to stop (at its next check)."""
        if self._running:
            self._cancel.set()
            self.status_label.setText("Cancelling…")
            self.cancel_button.setEnabled(False)

    def _on_progress(self, fraction: float, stage: str) -> None:
        pbar = self._pbar
        if pbar is None or not self._running:
            return  # a late update from a finished run
        if stage:
            pbar.set_description(f"Detecting nodules: {stage}")
            self.progress_bar.setFormat(f"{stage} %p%")
        target = int(round(fraction * 1000))
        if target > pbar.n:
            pbar.update(target - pbar.n)
        if target > self.progress_bar.value():
            self.progress_bar.setValue(target)

    def _close_progress(self, complete: bool = False) -> None:
        if self._pbar is not None:
            if complete and self._pbar.n < self._pbar.total:
                # the worker's last progress signal may arrive after its result; a finished
                # run shows a full bar either way
                self._pbar.update(self._pbar.total - self._pbar.n)
            self._pbar.close()
            self._pbar = None
        self.progress_bar.setVisible(False)

    def _on_worker_finished(self) -> None:
        self._worker = None

    def _on_detection_done(self, outcome) -> None:
        """GUI thread: the only place detection changes layers."""
        self._running = False
        self._close_progress(complete=outcome.kind not in ("cancelled", "error"))
        self._update_buttons()
        if outcome.kind == "cancelled":
            self.status_label.setText("Detection cancelled.")
            show_info("Nodule detection cancelled.")
            return
        if outcome.kind == "error":
            self.status_label.setText(f"Detection failed: {outcome.message}")
            show_error(f"Nodule detection failed: {outcome.message}")
            return
        image = outcome.context["image"]
        try:
            table = NoduleTable.from_detections(outcome.detections, image, threshold=outcome.threshold,
                                                model_info=outcome.model_info)
        except (ValueError, KeyError, TypeError) as exc:
            show_error(f"Nodule detection returned unusable results: {exc}")
            return
        if outcome.threshold is not None:
            table.meta["model_threshold"] = float(outcome.threshold)
        name = outcome.context["image_layer"]
        old_layer = self._layer_for_image(name)
        old = old_layer.metadata[META_KEY] if old_layer is not None else None
        merged = ""
        if old is not None and reader_work(old):
            meta = dict(table.meta)
            table, summary = merge_detections(old, table)
            table.meta.update(meta)
            merged = f" Merged: {summary.text()}."
        layer = self.show_nodules(table, image_layer_name=name)
        n = int(table.visible_mask().sum())
        self._update_status()
        show_info(f"Found {n} nodule(s) in {name} "
                  f"({len(table)} candidates kept; move the threshold to see more).{merged}")
        return layer

    # --- nodule layers --------------------------------------------------------------------
    def _layer_for_image(self, image_layer_name: str):
        for ly in self.viewer.layers:
            if is_nodule_layer(ly) and ly.metadata.get("image_layer") == image_layer_name:
                return ly
        return None

    def _viewer_slice(self, table: NoduleTable) -> int | None:
        """The CT slice the viewer shows, by the image's geometry (rounded: see
        `napari_resmtnet.boxes.slice_index_of`); None for a radiograph."""
        if table.ndim != 3:
            return None
        point = np.asarray(self.viewer.dims.point, float)
        if len(point) < 3:
            return 0
        return slice_index_of(point[-3:], table.geometry, table.shape[0])

    def show_nodules(self, table: NoduleTable, image_layer_name: str | None = None):
        """Show ``table`` in the nodule layer of that image (made if missing; an existing one
        is replaced, undoably) and make it the widget's layer."""
        layer = self._layer_for_image(image_layer_name) if image_layer_name else None
        if layer is None and image_layer_name is None:
            layer = self.nodule_layer
        if layer is None:
            layer = self._add_slice_layer(table, image_layer_name or "",
                                          f"{image_layer_name} nodules" if image_layer_name else None)
            self._adopt(layer)
            self._on_nodules_changed()
        else:
            self._adopt(layer)
            self._set_table(table, undo=True)
        self.viewer.layers.selection.active = layer
        return layer

    def _add_slice_layer(self, table: NoduleTable, image_layer_name: str, name=None, index=None):
        """Add the widget's nodule layer for ``table``: for CT a 2D layer showing the nodules
        of the current slice (refilled on every slice change), for a radiograph all of them.

        Why one 2D layer of the current slice rather than a 3D layer with a rectangle on every
        slice: napari picks a shape for a click only when the slice position, converted from
        millimetres to the layer's voxels, equals the shape's slice *exactly*, and that
        conversion is rarely exact (``29.000000000000014``), so boxes that are drawn could not
        be clicked. A 2D layer has no slice position to compare; the slice is computed once,
        rounded, by the image's geometry. It also keeps the layer small (a few boxes instead
        of one per slice of every candidate) and puts no stack of slabs into the 3D view.
        """
        from napari.layers import Layer

        k = self._viewer_slice(table)
        data, kw, kind = table_to_layer_data(table, name=name, new_label=self.new_label_combo.currentText(),
                                             slice_index=k)
        kw["metadata"]["image_layer"] = image_layer_name
        kw["metadata"]["slice"] = k
        layer = Layer.create(data, kw, kind)
        self._updating = True
        try:
            if index is None:
                self.viewer.add_layer(layer)
            else:
                self.viewer.layers.insert(index, layer)
        finally:
            self._updating = False
        self._slice = k
        return layer

    def _adopt(self, layer) -> None:
        """Make ``layer`` the one the widget edits: events, key bindings, slider, table. A 3D
        nodule layer made elsewhere (a sample, a script) is swapped for the current-slice
        layer of the same name and table."""
        if layer is self.nodule_layer:
            return
        table = layer.metadata[META_KEY]
        if not layer.metadata.get("image_layer"):
            layer.metadata["image_layer"] = self._find_image_layer_name(table)
        if table.ndim == 3 and layer.ndim == 3 and layer in self.viewer.layers:
            index = self.viewer.layers.index(layer)
            name, image_layer = layer.name, layer.metadata["image_layer"]
            self._updating = True
            try:
                self.viewer.layers.remove(layer)
            finally:
                self._updating = False
            layer = self._add_slice_layer(table, image_layer, name=name, index=index)
        self._release()
        self.nodule_layer = layer
        self._slice = layer.metadata.get("slice")
        self._selected = ()
        layer.events.data.connect(self._on_layer_data)
        layer.events.highlight.connect(self._on_layer_selection)
        for key, cb in (("m", self._key_flip), ("r", self._key_reviewed), ("n", self._key_draw),
                        ("a", self._key_accept), ("x", self._key_reject), ("u", self._key_unreview),
                        (".", self._key_next), (",", self._key_previous),
                        ("[", self._key_first_slice), ("]", self._key_last_slice),
                        ("Control-Z", self._key_undo), ("Control-Shift-Z", self._key_redo),
                        ("Control-Y", self._key_redo)):
            layer.bind_key(key, cb, overwrite=True)
        self._on_new_label(self.new_label_combo.currentText())
        self._set_slider(table.threshold)
        self.table.set_table(table)
        if table.ndim == 3 and self._viewer_slice(table) != self._slice:
            self._render()
        self._update_counts()
        self._update_status()
        self._update_buttons()

    def _find_image_layer_name(self, table: NoduleTable) -> str:
        """The image layer a nodule layer made elsewhere (a sample, a script) belongs to:
        same seriesuid, else same shape and spacing."""
        uid = table.image.get("seriesuid")
        match = ""
        for ly in self._image_layers():
            md = ly.metadata or {}
            if uid and md.get("seriesuid") == uid:
                return ly.name
            shape = tuple(ly.data.shape[:-1] if getattr(ly, "rgb", False) else ly.data.shape)
            if shape == table.shape and np.allclose(np.asarray(ly.scale)[-table.ndim:], table.spacing):
                match = match or ly.name
        return match

    def _release(self) -> None:
        layer = self.nodule_layer
        if layer is None:
            return
        for ev, cb in ((layer.events.data, self._on_layer_data),
                       (layer.events.highlight, self._on_layer_selection)):
            try:
                ev.disconnect(cb)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.nodule_layer = None

    @property
    def nodules(self) -> NoduleTable | None:
        """The current nodule table (the truth), or None."""
        return self.nodule_layer.metadata.get(META_KEY) if self.nodule_layer is not None else None

    @property
    def current_slice(self) -> int | None:
        """The CT slice the nodule layer shows (None for a radiograph or no layer)."""
        return self._slice

    def _on_dims_point(self, event=None) -> None:
        """The viewer moved: show the nodules of the new slice."""
        self._update_position()
        t = self.nodules
        if t is None or t.ndim != 3 or self._updating:
            return
        k = self._viewer_slice(t)
        if k != self._slice:
            self._render()

    def _render(self) -> None:
        """Bring the layer's shapes, features, colours and text in line with its table (at
        the current slice for CT); the reader's selection is kept."""
        layer, table = self.nodule_layer, self.nodules
        k = self._viewer_slice(table)
        data, feats, edge, text = table_to_shapes(table, slice_index=k)
        keep = self._selected
        self._updating = True
        try:
            layer.selected_data = set()
            if k is not None:
                geo = slice_geometry_kwargs(table.image, k)
                if not np.allclose(layer.translate, geo["translate"]):
                    layer.translate = geo["translate"]
            same = (len(layer.data) == len(data) and "id" in layer.features
                    and layer.features["id"].tolist() == feats["id"]
                    and all(a.shape == b.shape and np.allclose(a, b, rtol=0, atol=SAME_VOXELS)
                            for a, b in zip(layer.data, data)))
            if not same:
                if len(layer.data):
                    layer.data = []
                if data:
                    layer.add(data, shape_type="rectangle", edge_width=edge_width_for(table),
                              edge_color=edge, face_color=np.zeros((len(data), 4)))
            layer.features = features_frame(feats)
            if data:
                layer.edge_color = edge
            layer.text = text_kwargs(text)
            layer.feature_defaults = feature_defaults(self.new_label_combo.currentText(),
                                                      -1 if k is None else k)
            layer.metadata["image"] = dict(table.image)
            layer.metadata["model_info"] = table.model_info
            layer.metadata["threshold"] = table.threshold
            layer.metadata["slice"] = k
            self._slice = k
            ids = set(keep)
            if ids:
                layer.selected_data = {j for j, i in enumerate(feats["id"]) if i in ids}
        finally:
            self._updating = False
        self._last_selected = tuple(sorted(i for i in set(keep) if i in set(feats["id"])))

    def _history_of(self, layer) -> History:
        return self._history.setdefault(id(layer), History(UNDO_DEPTH))

    def _set_table(self, table: NoduleTable, undo: bool = True) -> None:
        """The one way nodules change: store, re-render layer and table, notify."""
        layer = self.nodule_layer
        old = layer.metadata.get(META_KEY)
        if undo and old is not None:
            self._history_of(layer).push(old)
        layer.metadata[META_KEY] = table
        self._selected = tuple(i for i in self._selected if i in table)
        self._render()
        self._set_slider(table.threshold)
        self.table.set_table(table)
        if self._selected:
            self.table.select_ids(self._selected)
        self._update_counts()
        self._update_status()
        self._update_buttons()
        self._update_3d()
        self._on_nodules_changed()

    def _on_nodules_changed(self) -> None:
        """Called after every change of the nodules (edits, detection, import, undo,
        threshold): emits ``nodules_changed`` and schedules the autosave."""
        self.nodules_changed.emit(self.nodules)
        self.schedule_autosave(self.nodules)

    # --- windows, planes, position --------------------------------------------------------
    def _ct_layer(self):
        """The CT the views are about: the nodules' image, else the chosen image (3D only)."""
        layer = self._image_of_nodules() or self.image_layer()
        if layer is None or getattr(layer, "rgb", False) or layer.data.ndim != 3:
            return None
        return layer

    def set_window(self, name: str, *_) -> bool:
        """Show the CT in a window preset (`napari_resmtnet.views.WINDOW_PRESETS`): lung
        W1500/L-600, mediastinum W350/L40, bone W2000/L500."""
        layer = self._ct_layer()
        if layer is None:
            show_info("Window presets are for a CT (Hounsfield units): open one first.")
            return False
        lo, hi = window_limits(name)
        rlo, rhi = layer.contrast_limits_range
        if lo < rlo or hi > rhi:  # a window wider than the data (lung below -1024 HU)
            layer.contrast_limits_range = (min(lo, rlo), max(hi, rhi))
        layer.contrast_limits = (lo, hi)
        w, lv = WINDOW_PRESETS[name]
        self.viewer.status = f"{layer.name}: {name} window (W{w:.0f} / L{lv:.0f})"
        return True

    def _key_window(self, name, viewer=None):
        self.set_window(name)

    def _update_position(self) -> None:
        """The slice position line: the three planes' slices and their place in mm."""
        layer = self._ct_layer()
        if layer is None or len(self.viewer.dims.point) < 3:
            self.position_label.setText("")
            return
        try:
            geo = scan_for_layer(layer, "CT")
        except ValueError:
            self.position_label.setText("")
            return
        self.position_label.setText(positions_text(self.viewer.dims.point, geo, layer.data.shape))

    def show_planes(self, show: bool = True) -> None:
        """Open (or close) the coronal and sagittal views of the CT beside the axial view."""
        if bool(show) == (self.planes is not None):
            self._sync_planes_button()
            return
        if not show:
            self._close_planes()
            return
        layer = self._ct_layer()
        if layer is None:
            show_info("Three planes need a CT: open one first.")
            self._sync_planes_button()
            return

        self._updating = True  # the planes' cursor layer is no nodule layer to adopt
        try:
            self.planes = ThreePlanes(self.viewer, layer, table=lambda: self.nodules)
        finally:
            self._updating = False
        self._planes_dock = self.viewer.window.add_dock_widget(self.planes, name="Three planes", area="bottom")
        self._sync_planes_button()
        sel = self._selected[0] if len(self._selected) == 1 else None
        if sel is not None and self.nodules is not None and sel in self.nodules:
            self.focus_nodule(sel)

    def _close_planes(self) -> None:
        planes, dock = self.planes, self._planes_dock
        self.planes, self._planes_dock = None, None
        if planes is not None:
            planes.close_planes()
        if dock is not None:
            try:
                self.viewer.window.remove_dock_widget(dock)
            except (KeyError, ValueError, RuntimeError, LookupError):
                pass
        self._sync_planes_button()

    def _sync_planes_button(self) -> None:
        self.planes_button.blockSignals(True)
        self.planes_button.setChecked(self.planes is not None)
        self.planes_button.blockSignals(False)

    def _refresh_planes(self, *_) -> None:
        if self.planes is not None:
            self.planes.refresh()

    # --- 3D view --------------------------------------------------------------------------
    def _on_ndisplay(self, event=None) -> None:
        """Entering 3D: the nodules as wire boxes and the lungs as a surface instead of the CT
        block and flat boxes; back in 2D: as before."""
        three = self.viewer.dims.ndisplay == 3
        t = self.nodules
        if t is None or t.ndim != 3 or self.nodule_layer is None:
            return
        self.nodule_layer.visible = not three  # a 2D layer would lie flat in the 3D scene
        for ly in self.viewer.layers:
            if (ly.metadata or {}).get("resmtnet_cursor"):
                ly.visible = not three  # the planes' cursor is a 2D aid
        image = self._image_of_nodules()
        if three:
            if image is not None and image.visible:
                image.visible = False
                self._hidden_for_3d = image
            self._update_3d()
            if image is not None:
                self._start_lung_surface(image)
        else:
            for ly in self._layers_3d():
                ly.visible = False
            if self._hidden_for_3d is not None and self._hidden_for_3d in self.viewer.layers:
                self._hidden_for_3d.visible = True
            self._hidden_for_3d = None

    def _image_of_nodules(self):
        name = self.nodule_layer.metadata.get("image_layer") if self.nodule_layer is not None else None
        return next((ly for ly in self._image_layers() if ly.name == name), None)

    def _layers_3d(self) -> list:
        return [ly for ly in self.viewer.layers if (ly.metadata or {}).get("resmtnet_3d")]

    def _update_3d(self) -> None:
        """Put the current nodules into the 3D layers (made when missing): each nodule a wire
        box (a Vectors layer: its 12 edges, in world mm, z extent = the slices it spans) and
        one label at its top corner (a Points layer with text; the points themselves are
        invisible)."""

        t = self.nodules
        if t is None or t.ndim != 3 or self.viewer.dims.ndisplay != 3:
            return
        vectors, colors, anchors, texts, ids = nodule_boxes_3d(t)
        name = self.nodule_layer.name
        boxes = next((ly for ly in self._layers_3d() if ly.metadata["resmtnet_3d"] == "boxes"), None)
        labels = next((ly for ly in self._layers_3d() if ly.metadata["resmtnet_3d"] == "labels"), None)
        feats = {"id": ids, "text": list(texts)}
        text = {"string": "{text}", "color": "white", "size": 10, "anchor": "upper_left"}
        self._updating = True
        try:
            if boxes is None:
                self.viewer.add_vectors(vectors, edge_width=1.5, edge_color=colors if len(vectors) else "white",
                                        vector_style="line", name=f"{name} 3D boxes",
                                        metadata={"resmtnet_3d": "boxes"})
            else:
                boxes.data = vectors
                if len(vectors):
                    boxes.edge_color = colors
                boxes.visible = True
            if labels is None:
                self.viewer.add_points(anchors, size=0.1, face_color="transparent", border_width=0,
                                       features=feats, text=text, name=f"{name} 3D labels",
                                       metadata={"resmtnet_3d": "labels"})
            else:
                labels.data = anchors
                labels.features = feats
                labels.text = text
                labels.visible = True
        finally:
            self._updating = False

    def _start_lung_surface(self, image) -> None:
        """Compute the lung surface off the GUI thread (once per image), then show it."""
        existing = next((ly for ly in self._layers_3d() if ly.metadata.get("resmtnet_3d") == "lungs"
                         and ly.metadata.get("image_layer") == image.name), None)
        if existing is not None:
            existing.visible = True
            return
        if self._lung_worker is not None:
            return
        from napari.qt.threading import create_worker

        try:
            scan = scan_for_layer(image, "CT")
        except ValueError:
            return
        worker = create_worker(lung_mask, scan.array, scan.spacing, _start_thread=False)
        worker.returned.connect(partial(self._show_lung_surface, image.name, scan))
        worker.finished.connect(lambda: setattr(self, "_lung_worker", None))
        self._lung_worker = worker
        worker.start()

    def _show_lung_surface(self, image_name: str, scan, result) -> None:
        mask, step = result
        if self.viewer.dims.ndisplay != 3 or not mask.any():
            return
        geo = napari_geometry_kwargs(np.asarray(scan.spacing) * step, scan.origin, scan.direction)
        self._updating = True
        try:
            # float32, not the mask's uint8: vispy samples a uint8 volume as a normalised
            # texture (a mask's 1 reads as 1/255 in the shader) while napari 0.9 scales the iso
            # threshold by the contrast limits (0, 1) only, so the shader compared 1/255 with
            # 0.5 and the surface drew nothing. A float texture is not normalised: 0 and 1 on
            # either side of 0.5.
            self.viewer.add_image(mask.astype(np.float32), name=f"{image_name} lungs", rendering="iso", iso_threshold=0.5,
                                  contrast_limits=(0, 1), colormap="bop blue", opacity=0.4,
                                  blending="translucent",
                                  metadata={"resmtnet_3d": "lungs", "image_layer": image_name}, **geo)
        finally:
            self._updating = False

    # --- autosave -------------------------------------------------------------------------
    def schedule_autosave(self, table) -> None:
        """Autosave ``table`` AUTOSAVE_DELAY_MS after the last change (debounced: a
        dragged slider or a burst of edits is one write), at the latest
        AUTOSAVE_MAX_DELAY_S after the first unsaved change."""
        if table is None:
            return

        self._autosave_pending[image_key(table.image)] = table
        now = time.monotonic()
        if self._autosave_since is None:
            self._autosave_since = now
        if now - self._autosave_since >= AUTOSAVE_MAX_DELAY_S:
            self.flush_autosave()
        else:
            self._autosave_timer.start()

    def flush_autosave(self) -> list[str]:
        """Write the pending autosaves now; a failure is one error notification (not
        repeated while the same problem persists). Returns the paths written."""
        self._autosave_timer.stop()
        pending, self._autosave_pending = self._autosave_pending, {}
        self._autosave_since = None
        if not pending:
            return []

        written = []
        for table in pending.values():
            try:
                written.append(str(autosave.save(table)))
            except NoduleFileError as exc:
                msg = f"Autosave failed: {exc}"
                if msg != self._autosave_error:
                    show_error(msg + " (export your nodules to keep them)")
                self._autosave_error = msg
                continue
            self._autosave_error = ""
        return written

    def _offer_restore(self, layer) -> None:
        """When ``layer`` (an image) has autosaved nodules and no nodule layer yet, offer
        them back (ask, or as ``RESMTNET_AUTOSAVE_RESTORE`` says)."""
        from napari.layers import Image

        if not isinstance(layer, Image) or layer not in self.viewer.layers:
            return
        policy = autosave.restore_policy()
        if policy == "never":
            return
        try:
            image = image_identity(scan_for_layer(layer, self.modality_for(layer)))
        except (ValueError, TypeError):
            return
        key = autosave.image_key(image)
        if key in self._autosave_offered:
            return
        self._autosave_offered.add(key)
        self._offered_keys[id(layer)] = key
        if key in self._autosave_pending or any(
                is_nodule_layer(ly) and autosave.image_key(ly.metadata[META_KEY].image) == key
                for ly in self.viewer.layers):
            return
        try:
            info = autosave.peek(image)
        except NoduleFileError as exc:
            show_error(f"Autosaved nodules of {layer.name} cannot be restored: {exc}")
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
        ask_restore(self, f"{info.n_nodules} nodule(s) of {name} ({info.n_shown} shown) were autosaved"
                          f"{when}. Restore them?", answer)

    def _restore_clicked(self, *_) -> None:
        name = self.image_combo.currentText()
        if not name:
            show_info("Open the image whose autosaved nodules you want back first.")
            return
        if self.restore_autosave(name) is None:
            show_info(f"There are no autosaved nodules for {name}.")

    def restore_autosave(self, image_layer_name: str):
        """Show the autosaved nodules of the image layer ``image_layer_name``; returns the
        nodule layer (None when there is nothing to restore)."""

        layer = next((ly for ly in self._image_layers() if ly.name == image_layer_name), None)
        if layer is None:
            return None
        try:
            image = image_identity(scan_for_layer(layer, self.modality_for(layer)))
            table = autosave.load(image)
        except (ValueError, NoduleFileError) as exc:
            show_error(f"Autosaved nodules of {image_layer_name} cannot be restored: {exc}")
            return None
        if table is None:
            return None
        out = self.show_nodules(table, image_layer_name=image_layer_name)
        show_info(f"Restored {len(table)} autosaved nodule(s) of {image_layer_name}")
        return out

    def _update_counts(self) -> None:
        t = self.nodules
        if t is None:
            self.count_label.setText("no nodules")
            return
        c = counts(t)
        self.count_label.setText(
            f"{c['shown']} of {c['total']} nodules shown: {c['unreviewed']} unreviewed, "
            f"{c['accepted']} accepted, {c['rejected']} rejected")

    def _update_status(self) -> None:
        """The status line: what the nodules are now (kept current on every change)."""
        t = self.nodules
        if t is None or self._running:
            return
        n = int(t.visible_mask().sum())
        where = f" (slice {self._slice})" if self._slice is not None else ""
        self.status_label.setText(f"{len(t)} candidates, {n} shown at threshold {t.threshold:.2f}{where}.")

    # --- threshold ------------------------------------------------------------------------
    def model_threshold(self) -> float | None:
        """The operating point of the model behind the current nodules (from their model
        information), else of the bundled model for the chosen image's modality."""
        t = self.nodules
        info = (t.model_info or {}) if t is not None else {}
        if info.get("threshold") is not None:
            return float(info["threshold"])
        if t is not None and t.meta.get("model_threshold") is not None:
            return float(t.meta["model_threshold"])
        layer = self.image_layer()
        modality = self.modality_for(layer) if layer is not None else ("CT" if t is None or t.ndim == 3 else "CXR")
        if t is not None:
            modality = "CT" if t.ndim == 3 else "CXR"
        return operating_point(modality)

    def _set_slider(self, value: float) -> None:
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(int(round(value * 100)))
        self.threshold_slider.blockSignals(False)
        self._show_threshold(value)

    def _show_threshold(self, value: float) -> None:
        op = self.model_threshold()
        if op is not None and abs(value - op) < 0.005:
            self.threshold_label.setText(f"{value:.2f} (model's operating point)")
            self.threshold_label.setToolTip("The threshold chosen for this model on its validation data")
        else:
            self.threshold_label.setText(f"{value:.2f}" + (f" (model: {op:.2f})" if op is not None else ""))
            self.threshold_label.setToolTip("")

    def set_threshold(self, value: float) -> None:
        """Show nodules with probability >= value (the user's always); no re-detection."""
        value = float(min(max(value, 0.0), 1.0))
        self._set_slider(value)
        t = self.nodules
        if t is None or t.threshold == value:
            return
        t = t.copy()
        t.threshold = value
        self._set_table(t, undo=False)

    def _on_threshold(self, v: int) -> None:
        self._show_threshold(v / 100.0)
        if self.threshold_slider.isSliderDown():
            if not self._threshold_timer.isActive():
                self._threshold_timer.start()
        else:
            self.set_threshold(v / 100.0)

    def _apply_slider(self) -> None:
        self._threshold_timer.stop()
        self.set_threshold(self.threshold_slider.value() / 100.0)

    # --- layer -> table -------------------------------------------------------------------
    def _on_layer_data(self, event) -> None:
        if self._updating or self.nodule_layer is None:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("removing"):
            ids = self.nodule_layer.features["id"].to_numpy() if len(self.nodule_layer.features) else []
            for i in getattr(event, "data_indices", ()):
                if 0 <= i < len(ids) and ids[i] >= 0:
                    self._pending_removed.add(int(ids[i]))
        elif action.endswith(("added", "changed", "removed")):
            if not self._sync_scheduled:
                self._sync_scheduled = True
                # after napari finishes the mouse event that made the change
                QTimer.singleShot(0, self.sync_from_layer)

    def sync_from_layer(self) -> bool:
        """Fold the user's edits of the layer into the table; True when something changed."""
        self._sync_scheduled = False
        layer = self.nodule_layer
        if layer is None or self._updating:
            return False
        removed, self._pending_removed = self._pending_removed, set()
        feats = layer.features
        cols = {c: feats[c].tolist() for c in ("id", "slice") if c in feats}
        # what the reader is working on stays selected: the edited shapes' nodules
        selected = self._layer_selected_ids()
        new, changed, added = reconcile(self.nodules, list(layer.data), cols, removed,
                                        new_label=self.new_label_combo.currentText(),
                                        slice_index=self._slice)
        if changed:
            self._selected = tuple(added) if added else tuple(i for i in selected if i in new)
            self._set_table(new)
        return changed

    def _on_layer_selection(self, event=None) -> None:
        if self._updating or self.nodule_layer is None:
            return
        ids = tuple(self._layer_selected_ids())
        if ids == self._last_selected:
            return
        self._last_selected = ids
        if ids or self.nodule_layer.mode in ("select", "direct"):
            self._selected = ids
        self.table.select_ids(ids)

    def _layer_selected_ids(self) -> list[int]:
        layer = self.nodule_layer
        if layer is None or not len(layer.selected_data) or "id" not in layer.features:
            return []
        ids = layer.features["id"].to_numpy()
        return sorted({int(ids[i]) for i in layer.selected_data if i < len(ids) and ids[i] >= 0})

    def selected_ids(self) -> list[int]:
        """Nodules selected in the layer, else in the table, else the last ones the reader
        selected (a CT nodule stays selected on slices it does not reach)."""
        t = self.nodules
        ids = self._layer_selected_ids() or self.table.selected_ids() or list(self._selected)
        return [i for i in ids if t is not None and i in t]

    def _on_table_selection(self) -> None:
        if self._updating or self.nodule_layer is None:
            return
        ids = set(self.table.selected_ids())
        layer = self.nodule_layer
        if not ids or "id" not in layer.features:
            return
        self._selected = tuple(sorted(ids))
        if set(self._layer_selected_ids()) == ids:
            return
        self._select_in_layer(ids)

    def _select_in_layer(self, ids) -> None:
        """Select every shape of these nodules in the layer (without echoing to the table)."""
        layer = self.nodule_layer
        fid = layer.features["id"].to_numpy()
        self._updating = True
        try:
            layer.selected_data = {j for j in range(len(fid)) if int(fid[j]) in ids}
        finally:
            self._updating = False
        self._last_selected = tuple(sorted(ids))
        self._selected = tuple(sorted(ids))

    # --- navigation -----------------------------------------------------------------------
    def focus_nodule(self, nodule_id: int) -> None:
        """Go to the nodule's centre slice, centre the camera on it and select it."""
        layer, t = self.nodule_layer, self.nodules
        if t is None or nodule_id not in t:
            return
        i = t.index_of(nodule_id)
        c = t.centers_voxel()[i].copy()
        k = t.center_slice(i)
        if t.ndim == 3:
            c[0] = k

        world = voxel_to_world_points(c, t.geometry)[0]
        self._selected = (int(nodule_id),)
        axis0 = self.viewer.dims.ndim - t.ndim
        if t.ndim == 3:
            # the whole position: the axial slice, and the coronal and sagittal planes through
            # the nodule's centre (what the three-plane view shows)
            point = list(self.viewer.dims.point)
            point[axis0:] = [float(v) for v in world]
            self.viewer.dims.point = point
            if self._viewer_slice(t) != self._slice:
                self._render()
            if self.planes is not None:
                self.planes.center_on(point)
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        camera = scene.camera if scene is not None and hasattr(scene, "camera") else self.viewer.camera
        camera.center = tuple(float(v) for v in world[-2:])
        self.viewer.layers.selection.active = layer
        self._select_in_layer({int(nodule_id)})
        self._updating = True
        try:
            if layer.mode not in ("select", "direct"):
                layer.mode = "select"
        finally:
            self._updating = False
        self.table.select_ids([nodule_id])
        self._update_status()

    def next_unreviewed(self, *_) -> int | None:
        """Jump to the next unreviewed nodule (reading order: by detection probability)."""
        return self._step(+1)

    def previous_unreviewed(self, *_) -> int | None:
        return self._step(-1)

    def _step(self, step: int) -> int | None:
        t = self.nodules
        if t is None:
            return None
        cur = self._selected[0] if len(self._selected) == 1 else None
        nid = next_nodule(t, cur, step=step)
        if nid is None:
            c = counts(t)
            show_info(f"No unreviewed nodule left: {c['accepted']} accepted, {c['rejected']} rejected.")
            return None
        self.focus_nodule(nid)
        return nid

    # --- edits ----------------------------------------------------------------------------
    def _edit(self, fn, what: str, ids=None) -> bool:
        """Apply ``fn(table, ids)`` to the nodules ``ids`` (default: the selected ones), as one
        undoable edit; a refused edit is one error notification."""
        t = self.nodules
        if t is None:
            show_info("No nodules yet: detect, import, or draw one first.")
            return False
        ids = self.selected_ids() if ids is None else list(ids)
        if not ids:
            show_info(f"Select one or more nodules (in the layer or the table) to {what}.")
            return False
        try:
            new = fn(t, ids)
        except (ValueError, KeyError) as exc:
            show_error(f"Cannot {what}: {exc}")
            return False
        self._selected = () if what == "delete" else tuple(ids)
        self._set_table(new)
        return True

    def flip_selected(self, *_) -> bool:
        """Benign <-> malignant for the selected nodules."""
        return self._edit(lambda t, ids: t.flipped(ids), "flip")

    def mark_reviewed(self, *_) -> bool:
        """Accept the selected nodules (or back to unreviewed, when all already are)."""
        return self._edit(lambda t, ids: t.with_reviewed(ids), "mark reviewed")

    def accept_selected(self, *_) -> bool:
        return self._edit(lambda t, ids: t.with_review(ids, "accepted"), "accept")

    def reject_selected(self, *_) -> bool:
        return self._edit(lambda t, ids: t.with_review(ids, "rejected"), "reject")

    def unreview_selected(self, *_) -> bool:
        return self._edit(lambda t, ids: t.with_review(ids, "unreviewed"), "mark unreviewed")

    def delete_selected(self, *_) -> bool:
        return self._edit(lambda t, ids: t.removed(ids), "delete")

    def set_first_slice(self, *_) -> bool:
        """The selected CT nodule starts at the slice shown (its z extent)."""
        return self._z_edit(first=True)

    def set_last_slice(self, *_) -> bool:
        """The selected CT nodule ends at the slice shown."""
        return self._z_edit(first=False)

    def _z_edit(self, first: bool) -> bool:
        t = self.nodules
        if t is None or t.ndim != 3:
            show_info("Only a CT nodule has slices to set.")
            return False
        k = self._viewer_slice(t)

        def fn(t, ids):
            for nid in ids:
                t = t.with_z_extent(nid, first=k) if first else t.with_z_extent(nid, last=k)
            return t

        return self._edit(fn, "set the " + ("first" if first else "last") + " slice of")

    def override_texture(self, nodule_id: int, texture: str) -> bool:
        """The reader's nodule type for one nodule ("" gives the model's call back); the
        Lung-RADS category follows. Undoable like every edit."""
        t = self.nodules
        if t is None or int(nodule_id) not in t:
            return False
        return self._edit(lambda t, ids: t.with_texture(ids, texture or None), "set the nodule type",
                          ids=[int(nodule_id)])

    def set_label(self, ids, label: str) -> None:
        self._set_table(self.nodules.with_label(ids, label))

    def add_nodule(self, box, label: str | None = None) -> int:
        """Add a user nodule with ``box`` in image voxels; returns its id."""
        t, nid = self.nodules.added(box, label=label or self.new_label_combo.currentText())
        self._set_table(t)
        return nid

    def start_drawing(self, *_) -> None:
        """Switch the layer to the rectangle tool: the next box drawn is a new nodule."""
        if self.nodule_layer is None:
            return
        self.viewer.layers.selection.active = self.nodule_layer
        self.nodule_layer.mode = "add_rectangle"

    def undo(self, *_) -> bool:
        """Undo the last change of the nodules (the threshold stays)."""
        return self._travel(undo=True)

    def redo(self, *_) -> bool:
        """Redo what the last undo took back (the threshold stays)."""
        return self._travel(undo=False)

    def _travel(self, undo: bool) -> bool:
        t = self.nodules
        h = self._history.get(id(self.nodule_layer)) if t is not None else None
        target = (h.undo(t) if undo else h.redo(t)) if h is not None else None
        if target is None:
            show_info("Nothing to undo." if undo else "Nothing to redo.")
            return False
        target = target.copy()
        target.threshold = t.threshold
        self._set_table(target, undo=False)
        return True

    def _on_new_label(self, label: str) -> None:
        if self.nodule_layer is not None and "id" in self.nodule_layer.features:
            self._updating = True
            try:
                self.nodule_layer.feature_defaults = feature_defaults(
                    label, -1 if self._slice is None else self._slice)
            finally:
                self._updating = False

    # key bindings (bound on the nodule layer; napari passes the layer)
    def _key_flip(self, layer):
        self.flip_selected()

    def _key_reviewed(self, layer):
        self.mark_reviewed()

    def _key_accept(self, layer):
        self.accept_selected()

    def _key_reject(self, layer):
        self.reject_selected()

    def _key_unreview(self, layer):
        self.unreview_selected()

    def _key_next(self, layer):
        self.next_unreviewed()

    def _key_previous(self, layer):
        self.previous_unreviewed()

    def _key_first_slice(self, layer):
        self.set_first_slice()

    def _key_last_slice(self, layer):
        self.set_last_slice()

    def _key_draw(self, layer):
        self.start_drawing()

    def _key_undo(self, layer):
        self.undo()

    def _key_redo(self, layer):
        self.redo()

    def _table_key(self, key: str) -> None:
        name = self.KEYS.get(key)
        if name is not None and self.nodule_layer is not None:
            getattr(self, name)()

    #: what the keys do, in the widget's table as on the canvas
    KEYS = {"m": "flip_selected", "r": "mark_reviewed", "a": "accept_selected", "x": "reject_selected",
            "u": "unreview_selected", ".": "next_unreviewed", ",": "previous_unreviewed",
            "[": "set_first_slice", "]": "set_last_slice", "n": "start_drawing"}

    # --- export / import ------------------------------------------------------------------
    def export_nodules(self, path) -> list[str]:
        """Write ``<stem>.csv`` and ``<stem>.json``; errors become notifications."""

        if self.nodules is None:
            show_error("There are no nodules to export yet.")
            return []
        try:
            paths = export_nodules(path, self.nodules)
        except NoduleFileError as exc:
            show_error(str(exc))
            return []
        n = int(self.nodules.visible_mask().sum())
        show_info(f"Saved {n} nodule(s) to {paths[0]} and {os.path.basename(paths[1])}")
        return paths

    def _current_image_identity(self):
        layer = self.image_layer()
        if layer is not None:
            try:
                return image_identity(scan_for_layer(layer, self.modality_for(layer))), layer.name
            except ValueError as exc:
                show_error(str(exc))
                return None, None
        if self.nodules is not None:
            return dict(self.nodules.image), self.nodule_layer.metadata.get("image_layer") or None
        show_error("Open the image the nodules belong to first.")
        return None, None

    def import_nodules(self, path):
        """Load a nodule JSON/CSV made for the chosen image; refuses another image's."""

        image, image_layer = self._current_image_identity()
        if image is None:
            return None
        try:
            table = import_nodules(path, image)
        except NoduleFileError as exc:
            show_error(str(exc))
            return None
        if str(path).lower().endswith(".csv") and table.model_info is None:
            table = self._complete_csv_table(table, image_layer)
        layer = self.show_nodules(table, image_layer_name=image_layer)
        show_info(f"Imported {len(table)} nodule(s) from {os.path.basename(str(path))}")
        return layer

    def _complete_csv_table(self, table: NoduleTable, image_layer) -> NoduleTable:
        """A LUNA16-style CSV lists the nodules shown when it was exported, without the
        threshold or the model: keep every row shown (threshold at most the lowest model
        probability in it) and keep the model information of the nodules already on this
        image, so that a re-import shows what was exported."""
        t = table.copy()
        current = self._layer_for_image(image_layer) if image_layer else None
        cur = current.metadata[META_KEY] if current is not None else None
        thr = cur.threshold if cur is not None else (self.model_threshold() or t.threshold)
        model = t.probability[t.source == "model"]
        if len(model):
            thr = min(thr, float(np.floor(model.min() * 100) / 100))
        t.threshold = float(thr)
        if cur is not None and cur.model_info:
            t.model_info = dict(cur.model_info)
        return t

    def write_report(self, path, states=("accepted",)):
        """Write the HTML reading report of the nodules in ``states`` (default: accepted)
        with a key image of each; returns its path (None after an error notification)."""

        t = self.nodules
        if t is None:
            show_error("There are no nodules to report yet.")
            return None
        image = self._image_of_nodules()
        if image is None:
            show_error("Open the image the nodules belong to first: the report shows it.")
            return None
        try:
            arr = scan_for_layer(image, "CT" if t.ndim == 3 else "CXR").array
            out = write_html_report(path, t, arr, states=states)
        except (OSError, ValueError) as exc:
            show_error(f"Could not write the report {path}: {exc}")
            return None
        n = sum(int(np.sum(t.visible_mask() & (t.review == s))) for s in states)
        show_info(f"Wrote the report of {n} {'/'.join(states)} nodule(s) to {out}")
        self._write_dicom_report(t, image, out, states)
        return out

    def _write_dicom_report(self, t, image, out, states) -> list:
        """When the CT was read from a DICOM series, also its DICOM SEG and SR (TID 1500) of
        the accepted nodules beside the HTML report (``<name>_seg.dcm``, ``<name>_sr.dcm``),
        referencing the source series; a failure is one notification, the HTML stays."""
        from pathlib import Path

        src = str((image.metadata or {}).get("path") or "")
        if t.ndim != 3 or "accepted" not in states or not src:
            return []
        p = Path(src)
        if not (p.is_dir() or p.suffix.lower() == ".dcm"):
            return []

        try:
            files = write_dicom_report(t, p, out)
        except DicomExportError as exc:
            show_error(f"Wrote the HTML report, but no DICOM SR/SEG: {exc}")
            return []
        except ImportError as exc:  # highdicom/pydicom not installed
            show_error(f"Wrote the HTML report; DICOM SR/SEG need highdicom ({exc})")
            return []
        show_info(f"Wrote the DICOM SEG and SR of the accepted nodules: {files[0].name}, {files[1].name}")
        return files

    def _report_dialog(self, *_) -> None:
        if self.nodules is None:
            return
        start = (self.nodules.image.get("seriesuid") or "nodules") + "_report.html"
        path, _ = QFileDialog.getSaveFileName(self, "Reading report (HTML)", start, "HTML (*.html)")
        if path:
            self.write_report(path)

    def _export_dialog(self, *_) -> None:
        if self.nodules is None:
            return
        start = (self.nodules.image.get("seriesuid") or "nodules") + "_nodules.csv"
        path, _ = QFileDialog.getSaveFileName(self, "Export nodules (CSV + JSON)", start,
                                              "Nodule CSV (*.csv);;Nodule JSON (*.json)")
        if path:
            self.export_nodules(path)

    def _import_dialog(self, *_) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import nodules", "",
                                              "Nodule files (*.json *.csv)")
        if path:
            self.import_nodules(path)

    # --- viewer events --------------------------------------------------------------------
    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        self._watch_name(layer)
        self._refresh_images()
        if is_nodule_layer(layer) and self.nodule_layer is None and not self._updating:
            self._adopt(layer)
        elif layer in self._image_layers():
            # after napari (and a sample/script that adds nodules with it) is done
            QTimer.singleShot(0, partial(self._offer_restore, layer))

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        try:
            layer.events.name.disconnect(self._refresh_images)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._refresh_images()
        # the same image opened again in this session is offered its autosave again
        self._autosave_offered.discard(self._offered_keys.pop(id(layer), None))
        if self.planes is not None and layer is self.planes.image_layer:
            self._close_planes()
        if layer is self.nodule_layer:
            self.flush_autosave()
            self._release()
            self._history.pop(id(layer), None)
            self.table.set_table(None)
            self._update_counts()
            self._update_buttons()

    def _on_active_layer(self, event) -> None:
        layer = event.value
        if layer is None or self._updating:
            return
        if is_nodule_layer(layer) and layer is not self.nodule_layer:
            self._adopt(layer)
        elif layer in self._image_layers():
            self.set_image_layer(layer)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self._cancel.set()
        self.flush_autosave()
        self._close_planes()
        super().closeEvent(event)
