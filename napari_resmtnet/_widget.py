"""The "Detect nodules" dock widget: detect, review, correct, report lung nodules.

A thin composition: the state and rules of reading live in the Qt-free
`napari_resmtnet.annotations.session.ReviewSession` (table, selection, edits with undo/redo, threshold,
review states, re-detect merge, type override); this widget builds it and the panels over
it (`napari_resmtnet._qt`: ``detect_panel`` -- parameters in magicgui, the run in a napari
worker; ``views_panel`` -- three planes, window presets F2/F3/F4, position, 3D;
``review_panel`` -- threshold, counts, table, edit buttons; ``export_panel`` -- files,
report, autosave restore; ``layer_view`` -- the nodule layer on the canvas) and connects
them to the viewer. Keys, on the canvas and in the table: ``a`` accept, ``x`` reject, ``u``
unreviewed, ``.`` / ``,`` next / previous unreviewed, ``m`` flip label, ``r`` toggle
accepted, ``n`` draw, ``[`` / ``]`` first / last slice here, Delete, Ctrl+Z undo,
Ctrl+Shift+Z or Ctrl+Y redo. Every change comes out of the session's ``changed`` event into
`NoduleWidget._on_changed`: layer and panels follow, ``nodules_changed`` carries the table,
and the autosave (`napari_resmtnet.annotations.autosave`) is scheduled.
"""

from __future__ import annotations

from functools import partial, partialmethod

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari.utils.notifications import show_error, show_info

from ._qt.detect_panel import DetectPanel
from ._qt.dialogs import ask_merge, ask_restore
from ._qt.export_panel import ExportPanel
from ._qt.layer_view import NoduleLayerView, image_layers, is_nodule_layer
from ._qt.review_panel import BUTTONS, ReviewPanel
from ._qt.views_panel import ViewsPanel
from .annotations.table import NoduleTable
from .annotations.session import AutosaveQueue, ReviewSession

#: what the reader's keys do, in the widget's table as on the canvas
KEYS = {
    "m": "flip_selected",
    "r": "mark_reviewed",
    "a": "accept_selected",
    "x": "reject_selected",
    "u": "unreview_selected",
    ".": "next_unreviewed",
    ",": "previous_unreviewed",
    "[": "set_first_slice",
    "]": "set_last_slice",
    "n": "start_drawing",
}
#: keys bound on the nodule layer
LAYER_KEYS = {**KEYS, "Control-Z": "undo", "Control-Shift-Z": "redo", "Control-Y": "redo"}


class NoduleWidget(QWidget):
    """Dock widget: Detect nodules, review, correct, export.

    ``predictor_factory(modality, device)`` returns an object with
    ``predict(scan, progress, cancel) -> Detections``, ``threshold`` and ``model_info``
    (default: `napari_resmtnet.inference.Predictor`); predictors are cached per
    (modality, device).
    """

    #: emitted with the new `NoduleTable` after every change (see `_on_changed`)
    nodules_changed = Signal(object)
    KEYS = KEYS

    def __init__(self, napari_viewer, predictor_factory=None, parent=None):
        super().__init__(parent)
        self.viewer = viewer = napari_viewer
        self.session = ReviewSession()
        self.autosave = AutosaveQueue()
        self.layers = NoduleLayerView(
            viewer,
            self.session,
            new_label=lambda: self.review_panel.new_label_combo.currentText(),
            on_selection=lambda ids: self.review_panel.table.select_ids(ids),
            keys={k: getattr(self, name) for k, name in LAYER_KEYS.items()},
        )
        self.detect_panel = DetectPanel(self, predictor_factory)
        self.views_panel = ViewsPanel(self)
        self.review_panel = ReviewPanel(
            {b[2]: getattr(self, b[2]) for b in BUTTONS}, self.set_threshold, self.model_threshold
        )
        self.export_panel = ExportPanel(self)
        root = QVBoxLayout(self)
        for panel, stretch in (
            (self.detect_panel, 0),
            (self.views_panel, 0),
            (self.review_panel, 1),
            (self.export_panel, 0),
        ):
            root.addWidget(panel, stretch)

        self.session.changed.connect(self._on_changed)
        self.session.message.connect(self.notify)
        table = self.review_panel.table
        table.nodule_clicked.connect(self.focus_nodule)
        table.texture_overridden.connect(self.override_texture)
        table.key_pressed.connect(self._table_key)
        table.itemSelectionChanged.connect(self._on_table_selection)
        self.review_panel.new_label_combo.currentTextChanged.connect(self.layers.set_new_label)

        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        viewer.layers.selection.events.active.connect(self._on_active_layer)
        viewer.dims.events.point.connect(self._on_dims_point)
        viewer.dims.events.ndisplay.connect(self.views_panel.on_ndisplay)
        for layer in viewer.layers:
            layer.events.name.connect(self._refresh_images)
        self._refresh_images()
        for layer in viewer.layers:
            if is_nodule_layer(layer):
                self._adopt(layer)
        for layer in image_layers(viewer):
            QTimer.singleShot(0, partial(self.export_panel.offer_restore, layer))
        QTimer.singleShot(0, self.detect_panel.probe_devices)
        self.views_panel.update_position()

    # --- what the panels share ------------------------------------------------------------
    def notify(self, kind: str, text: str) -> None:
        """A message for the reader: a napari notification ("error" or "info")."""
        (show_error if kind == "error" else show_info)(text)

    def ask(self, kind: str, question: str, on_answer) -> None:
        """Ask the reader ("merge": detect again? "restore": restore the autosave?)."""
        (ask_merge if kind == "merge" else ask_restore)(self, question, on_answer)

    nodules = property(lambda self: self.session.table, doc="The current nodule table (the truth), or None.")
    nodule_layer = property(lambda self: self.layers.layer, doc="The nodule layer shown and edited, or None.")
    current_slice = property(lambda self: self.layers.slice, doc="The CT slice the nodule layer shows, or None.")
    is_running = property(lambda self: self.detect_panel.running, doc="Whether detection is running.")

    def detect(self, *_) -> None:
        """Run detection on the chosen image layer (in a worker thread)."""
        self.detect_panel.detect()

    def image_layer(self):
        return self.detect_panel.image_layer()

    def modality_for(self, layer) -> str:
        return self.detect_panel.modality_for(layer)

    def model_threshold(self) -> float | None:
        layer = self.image_layer()
        return self.session.model_threshold(self.modality_for(layer) if layer is not None else None)

    # --- the session changed --------------------------------------------------------------
    def _on_changed(self, table) -> None:
        self.layers.show(table)
        self._refresh()
        self.views_panel.update_3d()
        self.views_panel.refresh_planes()
        self.nodules_changed.emit(table)
        self.schedule_autosave(table)

    def _refresh(self) -> None:
        have = self.layers.layer is not None
        if self.nodules is not None:
            self.review_panel.set_slider(self.nodules.threshold)
        self.review_panel.refresh(self.session, have_layer=have)
        self.export_panel.update_buttons(have)
        self.detect_panel.update_buttons()
        self._update_status()

    def _update_status(self) -> None:
        if self.nodules is not None and not self.is_running:
            self.detect_panel.set_status(self.session.status_text(self.layers.slice))

    def on_choice(self) -> None:
        """The image or model picked changed: the status line and (before any nodules) the
        slider at the model's operating point."""
        layer = self.image_layer()
        if self.layers.layer is not None:
            self._update_status()
            return
        if layer is not None and not self.is_running:
            self.detect_panel.set_status(f"{layer.name}: {self.modality_for(layer)} model")
        op = self.model_threshold()
        if op is not None:
            self.review_panel.set_slider(op)

    # --- edits: the session's, on the nodules the reader selected -------------------------
    def selected_ids(self) -> list[int]:
        """Nodules selected in the layer, else in the table, else the last ones the reader
        selected (a CT nodule stays selected on slices it does not reach)."""
        t = self.nodules
        ids = self.layers.selected_ids() or self.review_panel.table.selected_ids() or list(self.session.selected)
        return [i for i in ids if t is not None and i in t]

    def _act(self, method: str, *_) -> bool:
        return getattr(self.session, method)(self.selected_ids())

    flip_selected = partialmethod(_act, "flip")
    mark_reviewed = partialmethod(_act, "toggle_accepted")
    accept_selected = partialmethod(_act, "accept")
    reject_selected = partialmethod(_act, "reject")
    unreview_selected = partialmethod(_act, "unreview")
    delete_selected = partialmethod(_act, "delete")

    def _extent(self, first: bool, *_) -> bool:
        return self.session.set_extent(self.layers.viewer_slice(self.nodules), first, self.selected_ids())

    set_first_slice = partialmethod(_extent, True)
    set_last_slice = partialmethod(_extent, False)

    def _call(self, method: str, *_) -> bool:
        return getattr(self.session, method)()

    undo = partialmethod(_call, "undo")
    redo = partialmethod(_call, "redo")

    def override_texture(self, nodule_id: int, texture: str) -> bool:
        return self.session.override_type(nodule_id, texture)

    def add_nodule(self, box, label: str | None = None) -> int | None:
        """Add a user nodule with ``box`` in image voxels; returns its id."""
        return self.session.add(box, label=label or self.review_panel.new_label_combo.currentText())

    def start_drawing(self, *_) -> None:
        self.layers.start_drawing()

    def set_threshold(self, value: float) -> None:
        """Show nodules with probability >= value (the user's always); no re-detection."""
        self.review_panel.set_slider(self.session.set_threshold(value))

    def _table_key(self, key: str) -> None:
        if KEYS.get(key) is not None and self.layers.layer is not None:
            getattr(self, KEYS[key])()

    # --- navigation and selection ---------------------------------------------------------
    def focus_nodule(self, nodule_id: int) -> None:
        """Go to the nodule's centre slice (all three planes through it), centre the camera on
        it and select it."""
        if self.nodules is None or nodule_id not in self.nodules:
            return
        self.views_panel.center_on(self.layers.focus(nodule_id))
        self.review_panel.table.select_ids([nodule_id])
        self._update_status()

    def _step(self, step: int, *_) -> int | None:
        """Jump to the next (+1) or previous (-1) unreviewed nodule in reading order."""
        nid = self.session.next_unreviewed(step)
        if nid is not None:
            self.focus_nodule(nid)
        return nid

    next_unreviewed = partialmethod(_step, +1)
    previous_unreviewed = partialmethod(_step, -1)

    def _on_table_selection(self) -> None:
        if not self.layers.updating and self.layers.layer is not None:
            self.layers.select(self.review_panel.table.selected_ids())

    # --- nodule layers --------------------------------------------------------------------
    def show_nodules(self, table: NoduleTable, image_layer_name: str | None = None, merge: bool = False):
        """Show ``table`` in the nodule layer of that image (made if missing; an existing one
        is replaced undoably, or with ``merge`` merged into the reader's work) and make it
        the widget's layer."""
        name = image_layer_name
        layer = self.layers.layer_for_image(name) if name else (self.layers.layer if name is None else None)
        self.session.last_merge = ""
        if layer is None:
            layer = self.layers.add_slice_layer(table, name or "", f"{name} nodules" if name else None)
            self._adopt(layer)
            self._on_changed(table)
        else:
            self._adopt(layer)
            if merge:
                self.session.merge_run(table)
            else:
                self.session.replace(table)
        self.viewer.layers.selection.active = self.layers.layer
        return self.layers.layer

    def _adopt(self, layer) -> None:
        if layer is not self.layers.layer:
            self.layers.adopt(layer)
            self._refresh()

    def _refresh_images(self, *_) -> None:
        self.detect_panel.refresh_images()
        self.on_choice()

    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        layer.events.name.connect(self._refresh_images)
        self._refresh_images()
        if is_nodule_layer(layer) and self.layers.layer is None and not self.layers.updating:
            self._adopt(layer)
        elif layer in image_layers(self.viewer):
            # after napari (and a sample/script that adds nodules with it) is done
            QTimer.singleShot(0, partial(self.export_panel.offer_restore, layer))

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        try:
            layer.events.name.disconnect(self._refresh_images)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._refresh_images()
        self.autosave.forget(id(layer))  # the same image opened again is offered its autosave again
        self.views_panel.on_layer_removed(layer)
        if layer is self.layers.layer:
            self.flush_autosave()
            self.layers.release()
            self.session.detach(id(layer))
            self._refresh()

    def _on_active_layer(self, event) -> None:
        layer = event.value
        if layer is None or self.layers.updating:
            return
        if is_nodule_layer(layer) and layer is not self.layers.layer:
            self._adopt(layer)
        elif layer in image_layers(self.viewer):
            self.detect_panel.set_image_layer(layer)

    def _on_dims_point(self, event=None) -> None:
        self.views_panel.update_position()
        self.layers.on_dims_point()

    # --- autosave (the timer and the writing are the export panel's) ----------------------
    def schedule_autosave(self, table) -> None:
        self.export_panel.schedule_autosave(table)

    def flush_autosave(self, *_) -> list[str]:
        """Write the pending autosaves now; returns the paths written."""
        return self.export_panel.flush_autosave()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.detect_panel.cancel_event.set()
        self.flush_autosave()
        self.views_panel.close_planes()
        super().closeEvent(event)
