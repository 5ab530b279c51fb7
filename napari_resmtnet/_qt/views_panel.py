"""The views panel: three planes, window presets, the slice position, and the 3D view.

**Three planes** opens coronal and sagittal views beside the axial canvas
(`napari_resmtnet._qt.planes`): the same CT with the nodule boxes of their plane (z extent
visible) and a linked cursor -- a click in any view moves the others' slices there, and
jumping to a nodule centres all three on it. Window presets on keys (bound on the viewer,
so they work whatever layer is active: F-keys, because napari's layers use the digits and
most letters) and buttons: ``F2`` lung (W1500/L-600), ``F3`` mediastinum (W350/L40),
``F4`` bone (W2000/L500). The line under them gives the three planes' slices and their
positions in mm. In 3D the nodules are wire boxes (one label each) inside a lung surface,
computed off the GUI thread in a napari worker.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..layers import scan_for_layer
from ..scan import napari_geometry_kwargs
from ..views import WINDOW_PRESETS, lung_mask, nodule_boxes_3d, positions_text, window_limits
from .planes import ThreePlanes

#: window presets on keys, bound on the viewer (any layer active)
WINDOW_KEYS = {"lung": "F2", "mediastinum": "F3", "bone": "F4"}


class ViewsPanel(QWidget):
    """``host`` gives ``viewer``, ``session``, ``layers`` (`NoduleLayerView`), ``notify``,
    ``image_layer()`` and ``focus_nodule(id)``."""

    def __init__(self, host, parent=None):
        super().__init__(parent)
        self.host, self.viewer = host, host.viewer
        #: the coronal/sagittal dock (`napari_resmtnet._qt.planes.ThreePlanes`) when open
        self.planes = None
        self._planes_dock = None
        self._hidden_for_3d = None
        self._lung_worker = None
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.planes_button = QPushButton("Three planes")
        self.planes_button.setCheckable(True)
        self.planes_button.setToolTip(
            "Coronal and sagittal views beside the axial one, with the nodules "
            "and a linked cursor (click in any view to move the others)"
        )
        self.planes_button.toggled.connect(self.show_planes)
        row.addWidget(self.planes_button)
        self.window_buttons = {}
        for name, key in WINDOW_KEYS.items():
            w, lv = WINDOW_PRESETS[name]
            b = QPushButton(f"{name.capitalize()} ({key})")
            b.setToolTip(f"{name} window: W{w:.0f} / L{lv:.0f} HU")
            b.clicked.connect(partial(self.set_window, name))
            row.addWidget(b)
            self.window_buttons[name] = b
            self.viewer.bind_key(key, partial(self._key_window, name), overwrite=True)
        root.addLayout(row)
        self.position_label = QLabel("")
        self.position_label.setWordWrap(True)
        self.position_label.setToolTip(
            "The axial, coronal and sagittal slices shown (1-based) and where they lie in the image's millimetres"
        )
        root.addWidget(self.position_label)

    def ct_layer(self):
        """The CT the views are about: the nodules' image, else the chosen image (3D only)."""
        layer = self.host.layers.image_of_nodules() or self.host.image_layer()
        if layer is None or getattr(layer, "rgb", False) or layer.data.ndim != 3:
            return None
        return layer

    # --- windows and position -------------------------------------------------------------
    def set_window(self, name: str, *_) -> bool:
        """Show the CT in a window preset (`napari_resmtnet.views.WINDOW_PRESETS`)."""
        layer = self.ct_layer()
        if layer is None:
            self.host.notify("info", "Window presets are for a CT (Hounsfield units): open one first.")
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

    def update_position(self) -> None:
        """The slice position line: the three planes' slices and their place in mm."""
        layer = self.ct_layer()
        text = ""
        if layer is not None and len(self.viewer.dims.point) >= 3:
            try:
                text = positions_text(self.viewer.dims.point, scan_for_layer(layer, "CT"), layer.data.shape)
            except ValueError:
                text = ""
        self.position_label.setText(text)

    # --- three planes ---------------------------------------------------------------------
    def show_planes(self, show: bool = True) -> None:
        """Open (or close) the coronal and sagittal views of the CT beside the axial view."""
        if bool(show) == (self.planes is not None):
            self._sync_planes_button()
            return
        if not show:
            self.close_planes()
            return
        layer = self.ct_layer()
        if layer is None:
            self.host.notify("info", "Three planes need a CT: open one first.")
            self._sync_planes_button()
            return

        with self.host.layers.busy():  # the planes' cursor layer is no nodule layer to adopt
            self.planes = ThreePlanes(self.viewer, layer, table=lambda: self.host.session.table)
        self._planes_dock = self.viewer.window.add_dock_widget(self.planes, name="Three planes", area="bottom")
        self._sync_planes_button()
        session = self.host.session
        sel = session.selected[0] if len(session.selected) == 1 else None
        if sel is not None and session.table is not None and sel in session.table:
            self.host.focus_nodule(sel)

    def close_planes(self) -> None:
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

    def refresh_planes(self, *_) -> None:
        if self.planes is not None:
            self.planes.refresh()

    def center_on(self, point) -> None:
        if self.planes is not None and point is not None:
            self.planes.center_on(point)

    def on_layer_removed(self, layer) -> None:
        if self.planes is not None and layer is self.planes.image_layer:
            self.close_planes()

    # --- 3D view --------------------------------------------------------------------------
    def layers_3d(self) -> list:
        return [ly for ly in self.viewer.layers if (ly.metadata or {}).get("resmtnet_3d")]

    def on_ndisplay(self, event=None) -> None:
        """Entering 3D: the nodules as wire boxes and the lungs as a surface instead of the CT
        block and flat boxes; back in 2D: as before."""
        three = self.viewer.dims.ndisplay == 3
        t, nodule_layer = self.host.session.table, self.host.layers.layer
        if t is None or t.ndim != 3 or nodule_layer is None:
            return
        nodule_layer.visible = not three  # a 2D layer would lie flat in the 3D scene
        for ly in self.viewer.layers:
            if (ly.metadata or {}).get("resmtnet_cursor"):
                ly.visible = not three  # the planes' cursor is a 2D aid
        image = self.host.layers.image_of_nodules()
        if three:
            if image is not None and image.visible:
                image.visible = False
                self._hidden_for_3d = image
            self.update_3d()
            if image is not None:
                self._start_lung_surface(image)
        else:
            for ly in self.layers_3d():
                ly.visible = False
            if self._hidden_for_3d is not None and self._hidden_for_3d in self.viewer.layers:
                self._hidden_for_3d.visible = True
            self._hidden_for_3d = None

    def update_3d(self) -> None:
        """Put the current nodules into the 3D layers (made when missing): each nodule a wire
        box (a Vectors layer: its 12 edges, in world mm, z extent = the slices it spans) and
        one label at its top corner (a Points layer with text; the points are invisible)."""

        t, layers = self.host.session.table, self.host.layers
        if t is None or t.ndim != 3 or self.viewer.dims.ndisplay != 3 or layers.layer is None:
            return
        vectors, colors, anchors, texts, ids = nodule_boxes_3d(t)
        name = layers.layer.name
        boxes = next((ly for ly in self.layers_3d() if ly.metadata["resmtnet_3d"] == "boxes"), None)
        labels = next((ly for ly in self.layers_3d() if ly.metadata["resmtnet_3d"] == "labels"), None)
        feats = {"id": ids, "text": list(texts)}
        text = {"string": "{text}", "color": "white", "size": 10, "anchor": "upper_left"}
        with layers.busy():
            if boxes is None:
                self.viewer.add_vectors(
                    vectors,
                    edge_width=1.5,
                    edge_color=colors if len(vectors) else "white",
                    vector_style="line",
                    name=f"{name} 3D boxes",
                    metadata={"resmtnet_3d": "boxes"},
                )
            else:
                boxes.data = vectors
                if len(vectors):
                    boxes.edge_color = colors
                boxes.visible = True
            if labels is None:
                self.viewer.add_points(
                    anchors,
                    size=0.1,
                    face_color="transparent",
                    border_width=0,
                    features=feats,
                    text=text,
                    name=f"{name} 3D labels",
                    metadata={"resmtnet_3d": "labels"},
                )
            else:
                labels.data = anchors
                labels.features = feats
                labels.text = text
                labels.visible = True

    def _start_lung_surface(self, image) -> None:
        """Compute the lung surface off the GUI thread (once per image), then show it."""
        existing = next(
            (
                ly
                for ly in self.layers_3d()
                if ly.metadata.get("resmtnet_3d") == "lungs" and ly.metadata.get("image_layer") == image.name
            ),
            None,
        )
        if existing is not None:
            existing.visible = True
            return
        if self._lung_worker is not None:
            return
        from napari.qt.threading import thread_worker

        try:
            scan = scan_for_layer(image, "CT")
        except ValueError:
            return
        worker = thread_worker(lung_mask, start_thread=False)(scan.array, scan.spacing)
        worker.returned.connect(partial(self._show_lung_surface, image.name, scan))
        worker.finished.connect(lambda: setattr(self, "_lung_worker", None))
        self._lung_worker = worker
        worker.start()

    def _show_lung_surface(self, image_name: str, scan, result) -> None:

        mask, step = result
        if self.viewer.dims.ndisplay != 3 or not mask.any():
            return
        geo = napari_geometry_kwargs(np.asarray(scan.spacing) * step, scan.origin, scan.direction)
        with self.host.layers.busy():
            # float32, not the mask's uint8: vispy samples a uint8 volume as a normalised
            # texture (a mask's 1 reads as 1/255 in the shader) while napari 0.9 scales the iso
            # threshold by the contrast limits (0, 1) only, so the shader compared 1/255 with
            # 0.5 and the surface drew nothing. A float texture is not normalised: 0 and 1 on
            # either side of 0.5.
            self.viewer.add_image(
                mask.astype(np.float32),
                name=f"{image_name} lungs",
                rendering="iso",
                iso_threshold=0.5,
                contrast_limits=(0, 1),
                colormap="bop blue",
                opacity=0.4,
                blending="translucent",
                metadata={"resmtnet_3d": "lungs", "image_layer": image_name},
                **geo,
            )
