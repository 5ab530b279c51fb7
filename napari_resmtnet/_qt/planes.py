"""Three planes: coronal and sagittal views beside napari's axial view, with linked cursors.

The main napari canvas stays the axial view (where nodules are edited); this dock adds a
coronal and a sagittal view of the same CT. Each is a napari ``ViewerModel`` drawn by
napari's ``QtViewer`` and holds: the image (the same array, no copy, with the axial view's
contrast), the nodule marks of its current plane (one rectangle per box that reaches it,
coloured and labelled as in the axial view, its z extent visible) and the cursor (the lines
where the other two planes cross it). All three views share one position, the main
viewer's ``dims.point`` (z = axial slice, y = coronal slice, x = sagittal slice): a click
in any view moves the other views' slices there, scrolling a view's slider moves its plane.

Why not napari-orthogonal-views (PyPI, 0.5.0, for napari 0.6.5-0.9): it copies every
layer of the viewer into its side views and keeps all their properties synchronised. With
this plugin's nodule layer (a 2D Shapes layer of the current axial slice, see
`napari_resmtnet._qt.layer_view.NoduleLayerView.add_slice_layer` and napari issue #8901) showing the
side views fails on napari 0.9.2: syncing the layer's ``feature_defaults`` raises
``ValueError: assignment destination is read-only`` from pandas. Switching Shapes syncing
off avoids the error, but the copy of a 2D current-slice layer still lies in the wrong plane
of a side view, so the side views need marks of their own anyway; it also replaces
napari's central widget, binds ``T`` for every viewer, shows the sagittal view with z
across, and brings OpenCV (for screen recording). What the plugin needs of it -- two
synchronised side views -- is a few napari calls, so the plugin uses napari's own
``ViewerModel`` and ``QtViewer``.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QSplitter, QVBoxLayout, QWidget

from ..views import PLANE_AXES, cursor_lines, plane_marks, point_to_voxel, positions_text, voxel_to_point
from ..scan import napari_geometry_kwargs
from ..layers import scan_for_layer

#: the array axes each side view shows, as napari ``dims.order`` (last two displayed):
#: coronal shows (z, x), sagittal (z, y); z points up (head at the top) in both
SIDE_ORDERS = {"coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
#: colours of the cursor lines, by the plane each line shows
CURSOR_RGBA = {"axial": (1.0, 0.85, 0.1, 0.8), "coronal": (0.2, 0.8, 1.0, 0.8), "sagittal": (1.0, 0.35, 1.0, 0.8)}
#: a press and release closer than this (canvas pixels) is a click (sets the cursor), not a drag
CLICK_PX = 4.0
#: line widths of the cursor and of the nodule marks, in in-plane pixels. napari draws a
#: Shapes edge with a width in the layer's data units: with the image's own scale a width
#: would be 5 mm across a 5 mm slice and 0.6 mm across a pixel, so in a coronal view lines
#: along x would be thick and those along z thin. The side views' marks therefore use a
#: grid that is square on screen (both shown axes at the finer spacing) and keeps the image
#: spacing along the view's own axis, so that a plane's coordinate is its slice index:
#: napari shows a rectangle only when its coordinate, cast to int, lies within half a unit
#: of the slice position.
CURSOR_WIDTH = 1.5
MARK_WIDTH = 2.5


def image_geometry_kwargs(image) -> dict:
    """scale / translate / affine of a napari image layer, for layers drawn on it."""
    kw = {"scale": tuple(image.scale), "translate": tuple(image.translate)}
    aff = np.asarray(image.affine.affine_matrix, float)
    if not np.allclose(aff, np.eye(len(aff))):
        kw["affine"] = aff
    return kw


def _set_lines(layer, lines: dict) -> None:
    """Replace the shapes of a cursor layer by ``{plane: (2, 3) end points}`` lines (mm)."""
    layer.selected_data = set()
    if len(layer.data):
        layer.data = []
    if lines:
        layer.add(
            [np.asarray(v, float) for v in lines.values()],
            shape_type="line",
            edge_color=[CURSOR_RGBA[p] for p in lines],
            edge_width=CURSOR_WIDTH,
        )


def _set_marks(layer, rects, edge, tcol, texts, ids) -> None:
    layer.selected_data = set()
    if len(layer.data):
        layer.data = []
    if rects:
        layer.add(
            rects, shape_type="rectangle", edge_color=edge, face_color=np.zeros((len(rects), 4)), edge_width=MARK_WIDTH
        )
        layer.features = {"id": np.asarray(ids, int), "text": list(texts)}
        layer.text = {
            "string": "{text}",
            "anchor": "upper_left",
            "size": 9,
            "color": {"array": np.asarray(tcol, float).reshape(-1, 4), "default": "white"},
        }
    else:
        layer.features = {"id": np.zeros(0, int), "text": np.zeros(0, object)}


def click_callback(on_click):
    """A napari mouse-drag callback that calls ``on_click(world position)`` for a click (a
    press and release in place) and leaves drags (pan, moving a box) alone."""

    def callback(layer_or_viewer, event):
        if event.button != 1 or event.modifiers:
            return
        start = np.asarray(event.pos, float)
        moved = False
        yield
        while event.type == "mouse_move":
            if np.hypot(*(np.asarray(event.pos, float) - start)) > CLICK_PX:
                moved = True
            yield
        if event.type == "mouse_release" and not moved:
            on_click(np.asarray(event.position, float))

    return callback


class PlaneView(QWidget):
    """One side view (coronal or sagittal) of an image: a napari ViewerModel + QtViewer."""

    def __init__(self, plane: str, image, geometry, parent=None):
        from napari.components import ViewerModel
        from napari.qt import QtViewer

        super().__init__(parent)
        self.plane = plane
        self.axis = PLANE_AXES[plane]
        self.model = ViewerModel(title=plane)
        geo = image_geometry_kwargs(image)
        self.image = self.model.add_image(
            image.data, name=image.name, colormap=image.colormap, contrast_limits=image.contrast_limits, **geo
        )
        sp = np.asarray(geometry["spacing"], float)
        shown = [d for d in range(3) if d != self.axis]
        self.spacing = sp
        self.mark_spacing = sp.copy()
        self.mark_spacing[shown] = sp[shown].min()  # square on screen; the view's axis keeps its spacing
        mk = napari_geometry_kwargs(self.mark_spacing, geometry["origin"], geometry["direction"])
        self.marks = self.model.add_shapes(ndim=3, name="nodules", edge_width=MARK_WIDTH, **mk)
        self.cursor = self.model.add_shapes(ndim=3, name="cursor", edge_width=CURSOR_WIDTH, **mk)
        self.marks.features = {"id": np.zeros(0, int), "text": np.zeros(0, object)}
        for ly in (self.marks, self.cursor):  # display only: edits are made in the axial view
            ly.editable = False
        self.model.dims.order = SIDE_ORDERS[plane]
        self.model.scene.camera.orientation2d = ("up", "right")
        self.qt_viewer = QtViewer(self.model)
        self.title = QLabel(plane)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.title)
        lay.addWidget(self.qt_viewer, 1)
        self.model.reset_view()

    def to_marks(self, voxels) -> np.ndarray:
        """Image voxel coordinates -> the marks layers' data coordinates."""
        return np.asarray(voxels, float).reshape(-1, 3) * self.spacing / self.mark_spacing

    def index(self) -> int:
        """The slice this view shows (along its axis)."""
        return int(self.model.dims.current_step[self.axis])

    def center_on(self, world) -> None:
        """Centre the camera on a world position (its displayed axes)."""
        d = list(self.model.dims.displayed)
        self.model.scene.camera.center = tuple(float(world[a]) for a in d)

    def close_viewer(self) -> None:
        self.qt_viewer.close()


class ThreePlanes(QWidget):
    """Coronal and sagittal views of ``image`` linked to the main (axial) viewer.

    ``table()`` returns the current `NoduleTable` (or None); call `refresh` after the nodules
    changed. The main viewer's ``dims.point`` is the one position all views share.
    """

    def __init__(self, viewer, image, table=lambda: None, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.image_layer = image
        self.table = table
        self._syncing = False
        self._closed = False
        self._geo = None
        #: what each view last drew (table, slice, voxel): a move along an axis redraws only what changed
        self._drawn: dict = {}
        self.position_label = QLabel("")
        self.position_label.setWordWrap(True)
        split = QSplitter(Qt.Horizontal)
        self.views = {}
        for plane in ("coronal", "sagittal"):
            view = PlaneView(plane, image, self._geometry())
            view.model.mouse_drag_callbacks.append(click_callback(self.set_cursor))
            view.model.dims.events.point.connect(self._on_side_point)
            split.addWidget(view)
            self.views[plane] = view
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.position_label)
        lay.addWidget(split, 1)
        self.setMinimumHeight(280)
        self._main_click = click_callback(self.set_cursor)
        viewer.mouse_drag_callbacks.append(self._main_click)
        viewer.dims.events.point.connect(self._on_main_point)
        image.events.contrast_limits.connect(self._on_contrast)
        image.events.colormap.connect(self._on_contrast)
        self.axial_cursor = self._add_axial_cursor()
        self._on_main_point()

    # --- the shared position ------------------------------------------------------------
    def _geometry(self):
        """The image's geometry (spacing, origin, direction in array order), read once."""
        if self._geo is None:
            scan = scan_for_layer(self.image_layer, "CT")
            self._geo = {"spacing": scan.spacing, "origin": scan.origin, "direction": scan.direction}
        return self._geo

    def voxel(self) -> np.ndarray:
        """The voxel (z, y, x) of the shared position."""
        return point_to_voxel(self.viewer.dims.point, self._geometry(), self.image_layer.data.shape)

    def set_cursor(self, world) -> None:
        """Move the shared position to the voxel nearest ``world`` (the planes through it):
        a click in a view."""
        point = list(self.viewer.dims.point)
        geo, shape = self._geometry(), self.image_layer.data.shape
        snapped = voxel_to_point(point_to_voxel(np.asarray(world, float)[-3:], geo, shape), geo)
        point[-3:] = [float(v) for v in snapped]
        self.viewer.dims.point = point

    def center_on(self, world) -> None:
        """Move the shared position to ``world`` and centre both side views on it."""
        self.set_cursor(world)
        for view in self.views.values():
            view.center_on(np.asarray(world, float)[-3:])

    def _on_main_point(self, event=None) -> None:
        if self._closed:
            return
        point = tuple(self.viewer.dims.point)[-3:]
        self._syncing = True
        try:
            for view in self.views.values():
                if tuple(view.model.dims.point) != point:
                    view.model.dims.point = point
        finally:
            self._syncing = False
        self.refresh()

    def _on_side_point(self, event=None) -> None:
        """A side view's slider or scroll moved its plane: the shared position follows."""
        if self._syncing or self._closed or event is None:
            return
        src = event.source
        view = next((v for v in self.views.values() if v.model.dims is src), None)
        if view is None:
            return
        point = list(self.viewer.dims.point)
        point[view.axis - 3] = float(src.point[view.axis])
        if tuple(point) != tuple(self.viewer.dims.point):
            self.viewer.dims.point = point

    def _on_contrast(self, event=None) -> None:
        for view in self.views.values():
            view.image.contrast_limits = self.image_layer.contrast_limits
            view.image.colormap = self.image_layer.colormap

    # --- marks and cursor ---------------------------------------------------------------
    def _add_axial_cursor(self):
        """The cursor in the main (axial) view: where the coronal and sagittal planes are."""
        sel = self.viewer.layers.selection.active
        layer = self.viewer.add_shapes(
            ndim=3,
            name=f"{self.image_layer.name} planes",
            edge_width=CURSOR_WIDTH,
            metadata={"resmtnet_cursor": True},
            **image_geometry_kwargs(self.image_layer),
        )
        layer.editable = False
        if sel is not None and sel in self.viewer.layers:
            self.viewer.layers.selection.active = sel  # the nodule keys stay on the nodule layer
        return layer

    def refresh(self, force: bool = False) -> None:
        """Redraw the marks and cursors of all views at the shared position (what changed;
        everything when ``force``)."""
        if self._closed or self.image_layer not in self.viewer.layers or len(self.viewer.dims.point) < 3:
            return  # the image is going (or the viewer closing): the widget closes the planes
        if force:
            self._drawn.clear()
        shape = self.image_layer.data.shape
        v = self.voxel()
        t = self.table()
        for view in self.views.values():
            k = int(v[view.axis])
            prev = self._drawn.get(("marks", view.plane))
            if prev is None or prev[0] is not t or prev[1] != k:
                rects, edge, tcol, texts, ids = _marks_args(t, view.axis, k)
                _set_marks(view.marks, [view.to_marks(r) for r in rects], edge, tcol, texts, ids)
                self._drawn[("marks", view.plane)] = (t, k)
            if self._drawn.get(("cursor", view.plane)) != tuple(v):
                lines = cursor_lines(view.axis, v, shape)
                _set_lines(view.cursor, {p: view.to_marks(ln) for p, ln in lines.items()})
                self._drawn[("cursor", view.plane)] = tuple(v)
        if self.axial_cursor is not None and self.axial_cursor in self.viewer.layers:
            if self._drawn.get(("cursor", "axial")) != tuple(v):
                _set_lines(self.axial_cursor, cursor_lines(0, v, shape))
                self._drawn[("cursor", "axial")] = tuple(v)
        self.position_label.setText(positions_text(self.viewer.dims.point, self._geometry(), shape))

    def marks_ids(self, plane: str) -> list[int]:
        """The nodules marked in a side view now (for tests and scripts)."""
        return self.views[plane].marks.features["id"].astype(int).tolist()

    def close_planes(self) -> None:
        """Disconnect from the main viewer and remove the axial cursor."""
        if self._closed:
            return
        self._closed = True
        for emitter, cb in (
            (self.viewer.dims.events.point, self._on_main_point),
            (self.image_layer.events.contrast_limits, self._on_contrast),
            (self.image_layer.events.colormap, self._on_contrast),
        ):
            try:
                emitter.disconnect(cb)
            except (TypeError, ValueError, RuntimeError):
                pass
        if self._main_click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._main_click)
        if self.axial_cursor is not None and self.axial_cursor in self.viewer.layers:
            self.viewer.layers.remove(self.axial_cursor)
        self.axial_cursor = None
        for view in self.views.values():
            view.close_viewer()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.close_planes()
        super().closeEvent(event)


def _marks_args(table, axis: int, index: int):
    rects, ids, edge, tcol, texts = plane_marks(table, axis, index)
    return rects, edge, tcol, texts, ids
