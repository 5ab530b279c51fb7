"""Three planes, window presets and the slice position, driven as a reader does: the widget's
button, napari's key handler and mouse events on each view's canvas."""

import numpy as np
import pytest

pytest.importorskip("qtpy")
napari = pytest.importorskip("napari")

from napari_resmtnet import _widget as W  # noqa: E402
from napari_resmtnet.annotations.table import REJECTED_RGB  # noqa: E402
from test_widget import CT_ORIGIN, CT_SHAPE, CT_SPACING, MOVE_MS, Factory, detect, notes, press  # noqa: E402,F401

pytestmark = pytest.mark.gui


def make_ct(make_napari_viewer):
    viewer = make_napari_viewer()
    ct = np.linspace(-1000, 1000, int(np.prod(CT_SHAPE))).reshape(CT_SHAPE).astype(np.int16)
    image = viewer.add_image(ct, name="ct", scale=CT_SPACING, translate=CT_ORIGIN, metadata={"modality": "CT"})
    w = W.NoduleWidget(viewer, predictor_factory=Factory())
    viewer.window.add_dock_widget(w)
    return viewer, image, w


def canvas_xy(qt_viewer, model, world):
    """Canvas pixel (x, y) where ``world`` (its displayed axes) is drawn in a view."""
    canvas = qt_viewer.canvas
    yx = [world[d] for d in model.dims.displayed]
    p = (canvas.view.transform * canvas.view.scene.transform).map([yx[1], yx[0], 0, 1])
    return float(p[0] / p[3]), float(p[1] / p[3])


def click(qtbot, qt_viewer, model, world):
    """A left click at ``world`` sent as napari mouse events to a view's canvas."""
    scene = qt_viewer.canvas._scene_canvas
    a = canvas_xy(qt_viewer, model, world)
    scene.events.mouse_move(pos=a, modifiers=())
    qtbot.wait(MOVE_MS)
    scene.events.mouse_press(pos=a, modifiers=(), button=1)
    qtbot.wait(MOVE_MS)
    scene.events.mouse_release(pos=a, modifiers=(), button=1)
    qtbot.wait(MOVE_MS)


def world_of(voxel):
    return np.asarray(CT_ORIGIN) + np.asarray(CT_SPACING) * np.asarray(voxel, float)


def test_three_planes_marks_linked_cursor_and_jump(make_napari_viewer, qtbot, notes):  # noqa: F811
    viewer, image, w = make_ct(make_napari_viewer)
    layer = detect(qtbot, w)
    w.views_panel.planes_button.click()
    planes = w.views_panel.planes
    assert planes is not None and w.views_panel.planes_button.isChecked()
    cor, sag = planes.views["coronal"], planes.views["sagittal"]
    qtbot.wait(50)
    # jump to the first unreviewed nodule (1: slices 5..8, y 10..20, x 12..24): all three views go there
    viewer.layers.selection.active = layer
    press(viewer, ".")
    assert w.selected_ids() == [1] and w.current_slice == 6
    v = planes.voxel()
    assert v.tolist() == [6, 15, 18]
    assert cor.index() == 15 and sag.index() == 18
    assert planes.marks_ids("coronal") == [1] and planes.marks_ids("sagittal") == [1]
    # the side views show the box's z extent: the slices 5..8 of the axial view
    rect = cor.marks.data[0] * cor.mark_spacing  # mm from the origin
    np.testing.assert_allclose(rect[:, 0].min() / CT_SPACING[0], 4.5)
    np.testing.assert_allclose(rect[:, 0].max() / CT_SPACING[0], 8.5)
    np.testing.assert_allclose(rect[:, 2].min() / CT_SPACING[2], 12, atol=1e-4)
    np.testing.assert_allclose(rect[:, 2].max() / CT_SPACING[2], 24, atol=1e-4)
    assert len(cor.cursor.data) == 2 and len(planes.axial_cursor.data) == 2
    assert "axial 6/19 z -88.0 mm" in w.views_panel.position_label.text()
    # the cameras of the side views are centred on the nodule
    np.testing.assert_allclose(cor.model.scene.camera.center[-2:], world_of([6, 15, 18])[[0, 2]], atol=1e-6)

    # a click in the coronal view, on slice 15 at nodule 3's x: the axial view goes to slice 15
    # and the sagittal plane to that x; nodule 3 is marked in the views that reach it
    click(qtbot, cor.qt_viewer, cor.model, world_of([15, 15, 42]))
    assert w.current_slice == 15 and layer.features["id"].tolist() == [3]
    assert planes.voxel().tolist() == [15, 15, 42] and sag.index() == 42
    assert planes.marks_ids("sagittal") == [3] and planes.marks_ids("coronal") == [1]  # y = 15 cuts nodule 1
    assert (
        "axial 15/19" in w.views_panel.position_label.text() and "sagittal 42/63" in w.views_panel.position_label.text()
    )

    # a click in the axial view moves the coronal and sagittal planes (a click on no box)
    layer.mode = "pan_zoom"
    click(qtbot, viewer.window._qt_viewer, viewer, world_of([15, 41, 43]))
    v = planes.voxel()  # where the click lands, to the canvas's pixel (9 px a voxel here)
    assert v[0] == 15 and abs(v[1] - 41) <= 1 and abs(v[2] - 43) <= 1
    assert cor.index() == v[1] and sag.index() == v[2]
    assert planes.marks_ids("coronal") == [3] and w.current_slice == 15

    # moving the sagittal view's slider moves the shared position (and the axial cursor)
    sag.model.dims.set_current_step(2, 20)
    assert planes.voxel().tolist() == [15, v[1], 20]
    np.testing.assert_allclose(planes.axial_cursor.data[1][:, 2], [20, 20])

    # an edit of the nodules reaches the side views: rejecting 3 greys its marks
    w.focus_nodule(3)
    press(viewer, "x")
    np.testing.assert_allclose(cor.marks.edge_color[0][:3], REJECTED_RGB)

    # closing the planes removes the cursor from the axial view and unlinks
    w.views_panel.planes_button.click()
    assert w.views_panel.planes is None and planes.axial_cursor is None
    assert not any((ly.metadata or {}).get("resmtnet_cursor") for ly in viewer.layers)
    viewer.dims.set_current_step(0, 3)
    assert notes["error"] == []


def test_window_presets_on_keys_and_buttons(make_napari_viewer, qtbot, notes):  # noqa: F811
    viewer, image, w = make_ct(make_napari_viewer)
    layer = detect(qtbot, w)
    viewer.layers.selection.active = layer  # the keys work with the nodule layer active ...
    press(viewer, "F2")
    assert tuple(image.contrast_limits) == (-1350.0, 150.0)
    press(viewer, "F3")
    assert tuple(image.contrast_limits) == (-135.0, 215.0)
    viewer.layers.selection.active = image  # ... and with the image active
    press(viewer, "F4")
    assert tuple(image.contrast_limits) == (-500.0, 1500.0)
    w.views_panel.planes_button.click()
    w.views_panel.window_buttons["lung"].click()
    assert tuple(image.contrast_limits) == (-1350.0, 150.0)
    for view in w.views_panel.planes.views.values():  # the side views show the same window
        assert tuple(view.image.contrast_limits) == (-1350.0, 150.0)
    # the nodule keys still work (the presets are bound on the viewer, not instead of them)
    viewer.layers.selection.active = layer
    press(viewer, ".")
    press(viewer, "a")
    assert w.nodules.review[0] == "accepted"
    assert notes["error"] == []


def test_window_presets_and_planes_need_a_ct(make_napari_viewer, qtbot, notes):  # noqa: F811
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((100, 120), np.uint16), name="cxr", scale=(0.5, 0.5))
    w = W.NoduleWidget(viewer, predictor_factory=Factory())
    viewer.window.add_dock_widget(w)
    press(viewer, "F2")
    w.views_panel.planes_button.click()
    assert w.views_panel.planes is None and not w.views_panel.planes_button.isChecked()
    assert sum("CT" in m for m in notes["info"]) == 2 and w.views_panel.position_label.text() == ""
