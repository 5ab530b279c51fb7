"""The detect panel: which image, which model, which device and weights, and the run.

The parameters are a magicgui `Container` (image, model, device, a weights file); the run
happens off the GUI thread in a napari `thread_worker`, with a progress bar (stage and
percent) here and in napari's activity dock (`napari.utils.progress`), and a Cancel
button; layers change only when it returns, on the GUI thread (``RESMTNET_SYNC=1`` runs it
synchronously for debugging). What to do with the nodules found is the host's
(`NoduleWidget.show_nodules`), which merges them into the reader's work.

A weights file picked here is checked at once (sha256 from ``<file>.sha256``,
``weights_only`` loading, format, network config); a file that fails is refused with a
notification and the bundled weights stay in use.
"""

from __future__ import annotations

import os
import threading
from functools import partial

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox
from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..annotations.table import META_KEY, NoduleTable, image_identity
from ..inference.predictor import Predictor
from ..inference.weights import WeightsError, load_checkpoint, load_model
from ..layers import scan_for_layer
from ..measurements import MIN_NODULE_MM
from .layer_view import image_layers
from .runner import ProgressRelay, run_detection

MODEL_CHOICES = (("auto (from image)", "auto"), ("CT (3D)", "CT"), ("CXR (radiograph)", "CXR"))
DEVICE_CHOICES = (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"))


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


def modality_of(layer, choice: str = "auto") -> str:
    """CT or CXR: ``choice`` unless "auto", else the layer's modality, else by its ndim."""
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


class DetectPanel(QWidget):
    """Parameters, Detect / Cancel, progress and the status line.

    ``host`` gives ``viewer``, ``session``, ``layers`` (`NoduleLayerView`),
    ``notify(kind, text)``, ``ask(kind, question, on_answer)``,
    ``show_nodules(table, image_layer_name, merge=True)`` and ``on_choice()`` (the image or
    model picked changed). ``predictor_factory(modality, device)`` makes predictors, cached
    per (modality, device, weights).
    """

    def __init__(self, host, predictor_factory=None, parent=None):
        super().__init__(parent)
        self.host, self.viewer = host, host.viewer
        self.factory = predictor_factory or default_predictor_factory
        self.weights_factory = user_weights_predictor_factory
        self.predictors: dict = {}
        self._lock = threading.Lock()
        self.cuda_available = False
        self.weights_path: str | None = None
        self.weights_info: dict | None = None
        self.running = False
        self.cancel_event = threading.Event()
        self.worker = None
        self.pbar = None
        self.relay = ProgressRelay(self)
        self.relay.progressed.connect(self._on_progress)

        self.params = Container(
            widgets=[
                ComboBox(name="image", label="image", choices=self._image_names),
                ComboBox(name="model", label="model", choices=MODEL_CHOICES, value="auto"),
                ComboBox(name="device", label="device", choices=DEVICE_CHOICES, value="auto"),
                FileEdit(name="weights", label="weights file", mode="r", filter="Weights (*.pt *.pth)"),
                FloatSpinBox(
                    name="min_nodule_mm", label="smallest nodule (mm)", value=MIN_NODULE_MM, min=0.0, max=10.0, step=0.5
                ),
            ]
        )
        p = self.params
        p.weights.tooltip = "Use a weights file of your own (a <file>.sha256 must lie beside it)"
        p.min_nodule_mm.tooltip = (
            "CT: candidates whose own outline is smaller than a sphere of this diameter are left out "
            "(3 mm: the LIDC definition of a nodule); 0 shows micronodules too"
        )
        p.image.changed.connect(lambda *_: host.on_choice())
        p.model.changed.connect(lambda *_: host.on_choice())
        p.weights.changed.connect(self._on_weights_file)

        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        root.addWidget(p.native)
        form = QFormLayout()
        self.device_label = QLabel("checking for a GPU…")
        form.addRow("device found", self.device_label)
        wrow = QHBoxLayout()
        self.weights_label = QLabel("bundled")
        self.weights_label.setWordWrap(True)
        self.bundled_button = QPushButton("Bundled")
        self.bundled_button.setToolTip("Go back to the weights that come with the plugin")
        self.bundled_button.clicked.connect(self.use_bundled_weights)
        self.bundled_button.setEnabled(False)
        wrow.addWidget(self.weights_label, 1)
        wrow.addWidget(self.bundled_button)
        form.addRow("weights in use", wrow)
        root.addLayout(form)
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

    # --- parameters -----------------------------------------------------------------------
    def _image_names(self, *_) -> list[str]:
        return [ly.name for ly in image_layers(self.viewer)]

    def refresh_images(self, *_) -> None:
        with self.params.image.changed.blocked():
            self.params.image.reset_choices()

    def image_layer(self):
        """The image layer chosen (None when there is none)."""
        name = self.params.image.value
        return next((ly for ly in image_layers(self.viewer) if ly.name == name), None)

    def set_image_layer(self, layer) -> None:
        if layer.name in self.params.image.choices:
            self.params.image.value = layer.name

    def modality_for(self, layer) -> str:
        """CT or CXR: the model chosen, else the layer's modality, else by ndim."""
        return modality_of(layer, self.params.model.value)

    def device(self) -> str:
        return self.params.device.value

    def probe_devices(self) -> None:
        self.cuda_available, text = probe_cuda()
        self.device_label.setText(text)
        self.params.device.native.model().item(2).setEnabled(self.cuda_available)

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def update_buttons(self) -> None:
        self.detect_button.setEnabled(not self.running)
        self.cancel_button.setEnabled(self.running)

    # --- user weights ---------------------------------------------------------------------
    def _on_weights_file(self, value) -> None:
        path = str(value or "")
        if path in ("", ".") or path == self.weights_path:
            return
        if not self.set_weights(path):
            self._show_weights_file(self.weights_path)

    def set_weights(self, path) -> bool:
        """Use the weights file ``path`` for its modality, after checking it; a file that
        fails the checks is refused with a notification (the current weights stay)."""

        path = os.fspath(path)
        try:
            info = check_user_weights(path)
        except WeightsError as exc:
            self.host.notify("error", f"Weights not used: {exc}")
            return False
        except (OSError, RuntimeError, ValueError) as exc:  # unexpected, still one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.host.notify("error", f"Weights not used: {path}: {first}")
            return False
        self.weights_path, self.weights_info = path, info
        self.weights_label.setText(
            f"{os.path.basename(path)} ({info['modality']}, {info['name']} "
            f"{info['version']}, sha256 {info['sha256'][:8]}…)"
        )
        self.bundled_button.setEnabled(True)
        self._show_weights_file(path)
        self.host.notify("info", f"Using weights {path} for {info['modality']} (sha256 {info['sha256'][:12]}…)")
        return True

    def use_bundled_weights(self, *_) -> None:
        self.weights_path, self.weights_info = None, None
        self.weights_label.setText("bundled")
        self.bundled_button.setEnabled(False)
        self._show_weights_file(None)

    def _show_weights_file(self, path: str | None) -> None:
        with self.params.weights.changed.blocked():
            self.params.weights.line_edit.value = path or ""

    def get_predictor(self, modality: str, device: str):
        weights = self.weights_path if self.weights_info and self.weights_info.get("modality") == modality else None
        key = (modality, device, weights)
        with self._lock:
            if key not in self.predictors:
                if weights is None:
                    self.predictors[key] = self.factory(modality, device)
                else:
                    self.predictors[key] = self.weights_factory(modality, device, weights)
            return self.predictors[key]

    def _predictor_for_run(self, min_nodule_mm: float, modality: str, device: str):
        """The (cached) predictor with this run's smallest nodule size (CT only)."""
        pred = self.get_predictor(modality, device)
        if modality == "CT" and hasattr(pred, "min_nodule_mm"):
            pred.min_nodule_mm = min_nodule_mm
        return pred

    # --- the run --------------------------------------------------------------------------
    def detect(self, *_) -> None:
        """Run detection on the chosen image layer (in a worker thread); asks first when the
        nodules already there carry the reader's work."""
        notify = self.host.notify
        if self.running:
            notify("info", "Detection is already running; wait for it or cancel it.")
            return
        layer = self.image_layer()
        if layer is None:
            notify("error", "Open a chest CT or X-ray first: there is no image layer to search.")
            return
        modality = self.modality_for(layer)
        try:
            scan = scan_for_layer(layer, modality)
        except ValueError as exc:
            notify("error", str(exc))
            return
        device = self.device()
        if device == "cuda" and not self.cuda_available:
            notify("error", "CUDA was chosen but no CUDA GPU was found; choose auto or CPU.")
            return
        old_layer = self.host.layers.layer_for_image(layer.name)
        session = self.host.session
        work = session.merge_question(old_layer.metadata[META_KEY], id(old_layer)) if old_layer is not None else 0
        if work:

            def answer(yes: bool) -> None:
                if yes:
                    session.confirm_merge(id(old_layer))
                    self._start(layer, scan, modality, device)

            self.host.ask(
                "merge",
                f"{layer.name} has {work} nodule(s) you accepted, rejected or drew. "
                "Detect again? They are kept as they are; only the unreviewed "
                "candidates are replaced by the new run's.",
                answer,
            )
            return
        self._start(layer, scan, modality, device)

    def _start(self, layer, scan, modality: str, device: str) -> None:
        if self.running or layer not in self.viewer.layers:
            return
        from napari.utils import progress

        self.cancel_event = threading.Event()
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("starting %p%")
        self.progress_bar.setVisible(True)
        self.running = True
        self.update_buttons()
        self.set_status(f"Detecting nodules in {layer.name} ({modality}, {device})…")
        self.pbar = progress(total=1000, desc=f"Detecting nodules ({modality})")
        min_mm = float(self.params.min_nodule_mm.value)
        job = partial(
            run_detection,
            partial(self._predictor_for_run, min_mm),
            scan,
            modality,
            device,
            self.cancel_event,
            self.relay,
            {"image_layer": layer.name, "image": image_identity(scan), "min_nodule_mm": min_mm},
        )
        if os.environ.get("RESMTNET_SYNC") == "1":
            self._done(job())
            return
        from napari.qt.threading import thread_worker

        worker = thread_worker(job, start_thread=False)()
        worker.returned.connect(self._done)
        worker.finished.connect(lambda: setattr(self, "worker", None))
        self.worker = worker
        worker.start()

    def cancel(self, *_) -> None:
        """Ask the running detection to stop (at its next check)."""
        if self.running:
            self.cancel_event.set()
            self.set_status("Cancelling…")
            self.cancel_button.setEnabled(False)

    def _on_progress(self, fraction: float, stage: str) -> None:
        pbar = self.pbar
        if pbar is None or not self.running:
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
        if self.pbar is not None:
            if complete and self.pbar.n < self.pbar.total:
                # the worker's last progress signal may arrive after its result; a finished
                # run shows a full bar either way
                self.pbar.update(self.pbar.total - self.pbar.n)
            self.pbar.close()
            self.pbar = None
        self.progress_bar.setVisible(False)

    def _done(self, outcome):
        """GUI thread: the only place detection changes layers."""
        notify = self.host.notify
        self.running = False
        self._close_progress(complete=outcome.kind not in ("cancelled", "error"))
        self.update_buttons()
        if outcome.kind == "cancelled":
            self.set_status("Detection cancelled.")
            notify("info", "Nodule detection cancelled.")
            return None
        if outcome.kind == "error":
            self.set_status(f"Detection failed: {outcome.message}")
            notify("error", f"Nodule detection failed: {outcome.message}")
            return None
        try:
            table = NoduleTable.from_detections(
                outcome.detections, outcome.context["image"], threshold=outcome.threshold, model_info=outcome.model_info
            )
        except (ValueError, KeyError, TypeError) as exc:
            notify("error", f"Nodule detection returned unusable results: {exc}")
            return None
        if outcome.threshold is not None:
            table.meta["model_threshold"] = float(outcome.threshold)
        name = outcome.context["image_layer"]
        layer = self.host.show_nodules(table, image_layer_name=name, merge=True)
        t, merged = self.host.session.table, self.host.session.last_merge
        small = int(outcome.detections.meta.get("below_min_size", 0))
        notify(
            "info",
            f"Found {int(t.visible_mask().sum())} nodule(s) in {name} "
            f"({len(t)} candidates kept; move the threshold to see more)."
            + (f" Merged: {merged}." if merged else "")
            + (
                f" {small} smaller than {outcome.context['min_nodule_mm']:g} mm left out (see 'smallest nodule')."
                if small
                else ""
            ),
        )
        return layer
