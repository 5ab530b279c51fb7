"""The canvas side of the reading session: the napari Shapes layer that shows the nodules.

`NoduleLayerView` keeps one nodule layer in line with `ReviewSession.table` and folds what
the reader does on the canvas back into the session: moving, resizing, drawing and
deleting boxes (`ReviewSession.apply_layer_edit`), selecting them (``session.selected``),
the review keys (bound on the layer). For a CT the layer is 2D and shows the boxes of the
slice on screen, refilled when the slice changes (see `NoduleLayerView.add_slice_layer`).

``updating`` is the guard every part of the widget raises while it changes layers itself,
so that the events those changes fire are not taken for the reader's.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from qtpy.QtCore import QTimer

from ..boxes import slice_index_of, voxel_to_world_points
from ..annotations.table import META_KEY, NoduleTable
from ..layers import (
    edge_width_for,
    feature_defaults,
    features_frame,
    slice_geometry_kwargs,
    table_to_layer_data,
    table_to_shapes,
    text_kwargs,
)

#: napari keeps shape vertices in float32: closer than this (voxels) counts as unchanged
SAME_VOXELS = 1e-3


def is_nodule_layer(layer) -> bool:
    return isinstance(getattr(layer, "metadata", None), dict) and isinstance(layer.metadata.get(META_KEY), NoduleTable)


def image_layers(viewer) -> list:
    """The viewer's image layers a reader opened (not the widget's 3D helpers)."""
    from napari.layers import Image

    return [ly for ly in viewer.layers if isinstance(ly, Image) and not (ly.metadata or {}).get("resmtnet_3d")]


def _key_handler(action):
    def on_key(layer):
        action()

    return on_key


class NoduleLayerView:
    """One nodule layer of ``viewer`` showing ``session``'s table.

    ``new_label()`` gives the label of a box the reader draws; ``on_selection(ids)`` hears
    of a selection made on the canvas; ``keys`` maps napari key names to actions bound on
    every layer adopted.
    """

    def __init__(self, viewer, session, new_label, on_selection, keys: dict):
        self.viewer, self.session = viewer, session
        self.new_label, self.on_selection, self.keys = new_label, on_selection, keys
        self.layer = None
        self.updating = False
        #: the slice the current-slice layer shows (CT), None before any
        self.slice: int | None = None
        self._last_selected: tuple = ()
        self._pending_removed: set[int] = set()
        self.sync_scheduled = False

    @contextmanager
    def busy(self):
        """Changes made by the widget itself, not the reader."""
        old, self.updating = self.updating, True
        try:
            yield
        finally:
            self.updating = old

    # --- which layer ----------------------------------------------------------------------
    def layer_for_image(self, image_layer_name: str):
        for ly in self.viewer.layers:
            if is_nodule_layer(ly) and ly.metadata.get("image_layer") == image_layer_name:
                return ly
        return None

    def image_of_nodules(self):
        name = self.layer.metadata.get("image_layer") if self.layer is not None else None
        return next((ly for ly in image_layers(self.viewer) if ly.name == name), None)

    def viewer_slice(self, table: NoduleTable) -> int | None:
        """The CT slice the viewer shows, by the image's geometry (rounded: see
        `napari_resmtnet.boxes.slice_index_of`); None for a radiograph."""
        if table is None or table.ndim != 3:
            return None
        point = np.asarray(self.viewer.dims.point, float)
        if len(point) < 3:
            return 0
        return slice_index_of(point[-3:], table.geometry, table.shape[0])

    def add_slice_layer(self, table: NoduleTable, image_layer_name: str, name=None, index=None):
        """Add the nodule layer for ``table``: for CT a 2D layer showing the nodules of the
        current slice (refilled on every slice change), for a radiograph all of them.

        Why one 2D layer of the current slice rather than a 3D layer with a rectangle on every
        slice: napari picks a shape for a click only when the slice position, converted from
        millimetres to the layer's voxels, equals the shape's slice *exactly*, and that
        conversion is rarely exact (``29.000000000000014``), so boxes that are drawn could not
        be clicked. A 2D layer has no slice position to compare; the slice is computed once,
        rounded, by the image's geometry. It also keeps the layer small (a few boxes instead
        of one per slice of every candidate) and puts no stack of slabs into the 3D view.
        """
        from napari.layers import Layer

        k = self.viewer_slice(table)
        data, kw, kind = table_to_layer_data(table, name=name, new_label=self.new_label(), slice_index=k)
        kw["metadata"]["image_layer"] = image_layer_name
        kw["metadata"]["slice"] = k
        layer = Layer.create(data, kw, kind)
        with self.busy():
            if index is None:
                self.viewer.add_layer(layer)
            else:
                self.viewer.layers.insert(index, layer)
        self.slice = k
        return layer

    def find_image_layer_name(self, table: NoduleTable) -> str:
        """The image layer a nodule layer made elsewhere (a sample, a script) belongs to:
        same seriesuid, else same shape and spacing."""
        uid = table.image.get("seriesuid")
        match = ""
        for ly in image_layers(self.viewer):
            md = ly.metadata or {}
            if uid and md.get("seriesuid") == uid:
                return ly.name
            shape = tuple(ly.data.shape[:-1] if getattr(ly, "rgb", False) else ly.data.shape)
            if shape == table.shape and np.allclose(np.asarray(ly.scale)[-table.ndim :], table.spacing):
                match = match or ly.name
        return match

    def adopt(self, layer):
        """Make ``layer`` the one shown and edited: events, key bindings, the session's
        table. A 3D nodule layer made elsewhere (a sample, a script) is swapped for the
        current-slice layer of the same name and table. Returns the layer adopted."""
        table = layer.metadata[META_KEY]
        if not layer.metadata.get("image_layer"):
            layer.metadata["image_layer"] = self.find_image_layer_name(table)
        if table.ndim == 3 and layer.ndim == 3 and layer in self.viewer.layers:
            index = self.viewer.layers.index(layer)
            name, image_layer = layer.name, layer.metadata["image_layer"]
            with self.busy():
                self.viewer.layers.remove(layer)
            layer = self.add_slice_layer(table, image_layer, name=name, index=index)
        self.release()
        self.layer = layer
        self.slice = layer.metadata.get("slice")
        self.session.attach(table, key=id(layer))
        layer.events.data.connect(self._on_layer_data)
        layer.events.highlight.connect(self._on_layer_selection)
        for key, action in self.keys.items():
            layer.bind_key(key, _key_handler(action), overwrite=True)
        self.set_new_label(self.new_label())
        if table.ndim == 3 and self.viewer_slice(table) != self.slice:
            self.render()
        return layer

    def release(self) -> None:
        layer = self.layer
        if layer is None:
            return
        for ev, cb in ((layer.events.data, self._on_layer_data), (layer.events.highlight, self._on_layer_selection)):
            try:
                ev.disconnect(cb)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.layer = None

    # --- table -> layer -------------------------------------------------------------------
    def show(self, table: NoduleTable) -> None:
        """The session's table changed: store it in the layer (the writer and napari's Save
        read it there) and re-draw."""
        if self.layer is None:
            return
        self.layer.metadata[META_KEY] = table
        self.render()

    def on_dims_point(self) -> None:
        """The viewer moved: show the nodules of the new slice."""
        t = self.session.table
        if self.layer is None or t is None or t.ndim != 3 or self.updating:
            return
        if self.viewer_slice(t) != self.slice:
            self.render()

    def render(self) -> None:
        """Bring the layer's shapes, features, colours and text in line with the table (at
        the current slice for CT); the reader's selection is kept."""
        layer, table = self.layer, self.session.table
        k = self.viewer_slice(table)
        data, feats, edge, text = table_to_shapes(table, slice_index=k)
        keep = self.session.selected
        with self.busy():
            layer.selected_data = set()
            if k is not None:
                geo = slice_geometry_kwargs(table.image, k)
                if not np.allclose(layer.translate, geo["translate"]):
                    layer.translate = geo["translate"]
            same = (
                len(layer.data) == len(data)
                and "id" in layer.features
                and layer.features["id"].tolist() == feats["id"]
                and all(
                    a.shape == b.shape and np.allclose(a, b, rtol=0, atol=SAME_VOXELS) for a, b in zip(layer.data, data)
                )
            )
            if not same:
                if len(layer.data):
                    layer.data = []
                if data:
                    layer.add(
                        data,
                        shape_type="rectangle",
                        edge_width=edge_width_for(table),
                        edge_color=edge,
                        face_color=np.zeros((len(data), 4)),
                    )
            layer.features = features_frame(feats)
            if data:
                layer.edge_color = edge
            layer.text = text_kwargs(text)
            layer.feature_defaults = feature_defaults(self.new_label(), -1 if k is None else k)
            layer.metadata["image"] = dict(table.image)
            layer.metadata["model_info"] = table.model_info
            layer.metadata["threshold"] = table.threshold
            layer.metadata["slice"] = k
            self.slice = k
            ids = set(keep)
            if ids:
                layer.selected_data = {j for j, i in enumerate(feats["id"]) if i in ids}
        self._last_selected = tuple(sorted(i for i in set(keep) if i in set(feats["id"])))

    def set_new_label(self, label: str) -> None:
        if self.layer is not None and "id" in self.layer.features:
            with self.busy():
                self.layer.feature_defaults = feature_defaults(label, -1 if self.slice is None else self.slice)

    # --- layer -> table -------------------------------------------------------------------
    def _on_layer_data(self, event) -> None:
        if self.updating or self.layer is None:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("removing"):
            ids = self.layer.features["id"].to_numpy() if len(self.layer.features) else []
            for i in getattr(event, "data_indices", ()):
                if 0 <= i < len(ids) and ids[i] >= 0:
                    self._pending_removed.add(int(ids[i]))
        elif action.endswith(("added", "changed", "removed")):
            if not self.sync_scheduled:
                self.sync_scheduled = True
                # after napari finishes the mouse event that made the change
                QTimer.singleShot(0, self.sync_from_layer)

    def sync_from_layer(self) -> bool:
        """Fold the reader's edits of the layer into the table; True when something changed."""
        self.sync_scheduled = False
        layer = self.layer
        if layer is None or self.updating:
            return False
        removed, self._pending_removed = self._pending_removed, set()
        feats = layer.features
        cols = {c: feats[c].tolist() for c in ("id", "slice") if c in feats}
        # what the reader is working on stays selected: the edited shapes' nodules
        return self.session.apply_layer_edit(
            list(layer.data),
            cols,
            removed,
            new_label=self.new_label(),
            slice_index=self.slice,
            selected=self.selected_ids(),
        )

    def _on_layer_selection(self, event=None) -> None:
        if self.updating or self.layer is None:
            return
        ids = tuple(self.selected_ids())
        if ids == self._last_selected:
            return
        self._last_selected = ids
        if ids or self.layer.mode in ("select", "direct"):
            self.session.selected = ids
        self.on_selection(ids)

    def selected_ids(self) -> list[int]:
        """The nodules of the shapes selected in the layer."""
        layer = self.layer
        if layer is None or not len(layer.selected_data) or "id" not in layer.features:
            return []
        ids = layer.features["id"].to_numpy()
        return sorted({int(ids[i]) for i in layer.selected_data if i < len(ids) and ids[i] >= 0})

    def select(self, ids) -> None:
        """Select every shape of these nodules in the layer (without echoing to the table)."""
        ids = {int(i) for i in ids}
        if not ids or self.layer is None or "id" not in self.layer.features:
            return
        self.session.select(ids)
        if set(self.selected_ids()) == ids:
            return
        fid = self.layer.features["id"].to_numpy()
        with self.busy():
            self.layer.selected_data = {j for j in range(len(fid)) if int(fid[j]) in ids}
        self._last_selected = tuple(sorted(ids))

    # --- navigation -----------------------------------------------------------------------
    def focus(self, nodule_id: int):
        """Go to the nodule's centre slice, centre the camera on it and select it; returns
        the viewer's new position for a CT nodule (else None)."""
        layer, t = self.layer, self.session.table
        if t is None or nodule_id not in t:
            return None
        i = t.index_of(nodule_id)
        c = t.centers_voxel()[i].copy()
        if t.ndim == 3:
            c[0] = t.center_slice(i)
        world = voxel_to_world_points(c, t.geometry)[0]
        self.session.select([nodule_id])
        point = list(self.viewer.dims.point)
        if t.ndim == 3:
            # the whole position: the axial slice, and the coronal and sagittal planes through
            # the nodule's centre (what the three-plane view shows)
            point[self.viewer.dims.ndim - 3 :] = [float(v) for v in world]
            self.viewer.dims.point = point
            if self.viewer_slice(t) != self.slice:
                self.render()
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        camera = scene.camera if scene is not None and hasattr(scene, "camera") else self.viewer.camera
        camera.center = tuple(float(v) for v in world[-2:])
        self.viewer.layers.selection.active = layer
        self.select({int(nodule_id)})
        self._last_selected = (int(nodule_id),)
        with self.busy():
            if layer.mode not in ("select", "direct"):
                layer.mode = "select"
        return point if t.ndim == 3 else None

    def start_drawing(self) -> None:
        """Switch the layer to the rectangle tool: the next box drawn is a new nodule."""
        if self.layer is None:
            return
        self.viewer.layers.selection.active = self.layer
        self.layer.mode = "add_rectangle"
