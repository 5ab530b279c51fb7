"""The Detect-nodules dock widget in a headless napari viewer, with fake predictors."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qtpy")
napari = pytest.importorskip("napari")

from napari_resmtnet import _widget as W  # noqa: E402
from napari_resmtnet.detections import Detections  # noqa: E402
from napari_resmtnet.annotations.table import REJECTED_RGB  # noqa: E402

pytestmark = pytest.mark.gui

MODEL = {"name": "fake-resmtnet", "version": "0.0.1", "sha256": "f" * 64}
CT_SHAPE = (20, 64, 64)
CT_SPACING = (2.0, 0.7, 0.7)
CT_ORIGIN = (-100.0, 10.0, -50.0)
CT_BOXES = [
    [4.2, 10, 12, 8.6, 20, 24],  # id 1, slices 5..8, p 0.9 malignant
    [10.0, 30, 30, 12.0, 36, 40],  # id 2, slices 10..11, p 0.3 benign (hidden at 0.5)
    [15.1, 40, 40, 15.3, 44, 44],
]  # id 3, slice 15, p 0.7 malignant
CT_PROB = [0.9, 0.3, 0.7]
CT_MAL = [0.87, 0.2, 0.6]


from napari_resmtnet.errors import Cancelled  # noqa: E402  (what every long task raises on Cancel)


class FakePredictor:
    threshold = 0.5
    model_info = MODEL

    def __init__(self, modality="CT", delay=0.0, error=None):
        self.modality, self.delay, self.error = modality, delay, error
        self.calls = 0
        self.thread = None

    def predict(self, scan, progress=None, cancel=None):
        self.calls += 1
        self.thread = threading.current_thread()
        steps = 20
        for i in range(steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            if self.delay:
                time.sleep(self.delay / steps)
            if progress:
                progress((i + 1) / steps, "scanning")
        if self.error:
            raise self.error
        if scan.ndim == 3:
            return Detections(CT_BOXES, CT_PROB, CT_MAL, Detections.geometry_of(scan))
        return Detections([[10, 20, 30, 40], [50, 50, 60, 64]], [0.8, 0.6], [0.1, 0.9], Detections.geometry_of(scan))


class Factory:
    def __init__(self, **kw):
        self.kw, self.made, self.predictors = kw, [], []

    def __call__(self, modality, device):
        self.made.append((modality, device))
        p = FakePredictor(modality, **self.kw)
        self.predictors.append(p)
        return p


@pytest.fixture
def notes(monkeypatch):
    got = {"error": [], "info": []}
    monkeypatch.setattr(W, "show_error", lambda m: got["error"].append(str(m)))
    monkeypatch.setattr(W, "show_info", lambda m: got["info"].append(str(m)))
    return got


def make(make_napari_viewer, factory, ndim=3):
    viewer = make_napari_viewer()
    if ndim == 3:
        viewer.add_image(
            np.zeros(CT_SHAPE, np.int16), name="ct", scale=CT_SPACING, translate=CT_ORIGIN, metadata={"modality": "CT"}
        )
    else:
        viewer.add_image(np.zeros((100, 120), np.uint16), name="cxr", scale=(0.5, 0.5))
    w = W.NoduleWidget(viewer, predictor_factory=factory)
    viewer.window.add_dock_widget(w)
    return viewer, w


def detect(qtbot, w):
    w.detect_panel.detect_button.click()
    qtbot.waitUntil(lambda: not w.is_running, timeout=10000)
    return w.nodule_layer


def test_detect_makes_a_nodule_layer_in_image_mm(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    assert w.image_layer().name == "ct" and w.modality_for(w.image_layer()) == "CT"
    layer = detect(qtbot, w)
    assert f.made == [("CT", "auto")]
    assert f.predictors[0].thread is not threading.main_thread()  # ran in a worker
    assert layer is not None and layer in viewer.layers
    # a 2D layer of the current slice, in the image's millimetres
    np.testing.assert_allclose(layer.scale, CT_SPACING[1:])
    np.testing.assert_allclose(layer.translate, CT_ORIGIN[1:])
    # nodule 1 spans slices 5..8, nodule 3 slice 15; nodule 2 is below the threshold
    shown = {}
    for k in range(CT_SHAPE[0]):
        viewer.dims.set_current_step(0, k)
        assert w.current_slice == k
        shown[k] = layer.features["id"].tolist()
    assert {k: v for k, v in shown.items() if v} == {5: [1], 6: [1], 7: [1], 8: [1], 15: [3]}
    viewer.dims.set_current_step(0, 6)
    assert set(layer.features.columns) >= {
        "id",
        "probability",
        "malignancy",
        "label",
        "diameter_mm",
        "source",
        "reviewed",
        "review",
    }
    assert layer.features["label"].tolist()[0] == "malignant"
    # box text: label and the detection probability (not the malignancy)
    assert list(layer.text.values) == ["malignant 0.90"]
    t = layer.metadata["nodules"]
    assert len(t) == 3 and t.model_info == MODEL and t.threshold == 0.5
    assert w.review_panel.table.rowCount() == 2 and w.review_panel.table.ids == [1, 3]
    assert "2 of 3 nodules shown" in w.review_panel.count_label.text()
    assert notes["error"] == []


def test_responsive_while_running_and_second_click_ignored(make_napari_viewer, qtbot, notes):
    from qtpy.QtCore import QTimer

    f = Factory(delay=1.0)
    viewer, w = make(make_napari_viewer, f)
    ticks, shown = [], []
    timer = QTimer()
    timer.setInterval(20)

    def tick():
        if w.is_running:
            ticks.append(time.perf_counter())
            shown.append(
                (
                    w.detect_panel.progress_bar.isHidden(),
                    w.detect_panel.progress_bar.value(),
                    w.detect_panel.progress_bar.text(),
                )
            )

    timer.timeout.connect(tick)
    timer.start()
    w.detect_panel.detect_button.click()
    assert w.is_running and not w.detect_panel.detect_button.isEnabled() and w.detect_panel.cancel_button.isEnabled()
    pbar = w.detect_panel.pbar
    assert pbar is not None and pbar in napari.utils.progress._all_instances  # activity dock
    w.detect()  # a second click while running
    qtbot.waitUntil(lambda: not w.is_running, timeout=10000)
    timer.stop()
    assert len(f.made) == 1 and f.predictors[0].calls == 1
    assert pbar.n == 1000 and pbar not in napari.utils.progress._all_instances  # closed
    # the widget's own bar: stage and percent while running, hidden afterwards
    assert not any(hidden for hidden, _, _ in shown)
    assert any(text.startswith("scanning ") and text.endswith("%") and 0 < v < 1000 for _, v, text in shown)
    assert w.detect_panel.progress_bar.isHidden()
    assert any("already running" in m for m in notes["info"])
    gaps = np.diff(ticks)
    assert len(ticks) > 20 and gaps.max() < 0.2, f"event loop stalled for {gaps.max():.3f} s"
    assert w.nodule_layer is not None


def test_cancel_stops_detection_without_layers(make_napari_viewer, qtbot, notes):
    f = Factory(delay=3.0)
    viewer, w = make(make_napari_viewer, f)
    n_layers = len(viewer.layers)
    w.detect_panel.detect_button.click()
    qtbot.wait(100)
    w.detect_panel.cancel_button.click()
    qtbot.waitUntil(lambda: not w.is_running, timeout=5000)
    assert len(viewer.layers) == n_layers and w.nodule_layer is None
    assert "cancelled" in w.detect_panel.status_label.text().lower()
    assert any("cancelled" in m for m in notes["info"]) and notes["error"] == []
    assert w.detect_panel.detect_button.isEnabled()


def test_error_is_a_notification_not_a_crash(make_napari_viewer, qtbot, notes):
    f = Factory(error=RuntimeError("weights file is corrupt"))
    viewer, w = make(make_napari_viewer, f)
    detect(qtbot, w)
    assert notes["error"] and "weights file is corrupt" in notes["error"][0]
    assert w.nodule_layer is None and w.detect_panel.detect_button.isEnabled()

    def broken_factory(modality, device):
        raise ImportError("No module named 'napari_resmtnet.inference.predictor'")

    w.detect_panel.factory = broken_factory
    w.detect_panel.predictors.clear()
    detect(qtbot, w)
    assert "model is not available" in notes["error"][-1]


def test_sync_mode_and_cxr_modality(make_napari_viewer, qtbot, notes, monkeypatch):
    monkeypatch.setenv("RESMTNET_SYNC", "1")
    f = Factory()
    viewer, w = make(make_napari_viewer, f, ndim=2)
    w.detect()
    assert not w.is_running
    assert f.made == [("CXR", "auto")]
    layer = w.nodule_layer
    assert len(layer.data) == 2 and layer.data[0].shape == (4, 2)
    # forcing the CT model on a radiograph is refused with a message
    w.detect_panel.params.model.value = "CT"
    w.detect()
    assert "CT model needs a 3D volume" in notes["error"][-1]


def test_threshold_slider_filters_live(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    viewer.dims.set_current_step(0, 10)  # nodule 2 (p 0.3) is on slices 10, 11
    assert w.review_panel.threshold_label.text().startswith("0.50 (model's operating point)")
    assert "3 candidates, 2 shown at threshold 0.50" in w.detect_panel.status_label.text()
    w.review_panel.threshold_slider.setValue(20)
    assert layer.features["id"].tolist() == [2] and w.review_panel.table.rowCount() == 3
    assert "3 shown at threshold 0.20" in w.detect_panel.status_label.text()  # the status follows
    assert w.review_panel.threshold_label.text() == "0.20 (model: 0.50)"
    w.review_panel.threshold_slider.setValue(80)
    assert len(layer.data) == 0 and w.review_panel.table.rowCount() == 1
    w.review_panel.threshold_slider.setValue(95)
    assert len(layer.data) == 0 and w.review_panel.table.rowCount() == 0
    assert len(layer.metadata["nodules"]) == 3  # nothing was thrown away
    assert len(f.made) == 1  # and the model did not run again
    # while dragging, redraws are throttled; the last value is applied
    w.review_panel.threshold_slider.setSliderDown(True)
    w.review_panel.threshold_slider.setValue(60)
    w.review_panel.threshold_slider.setValue(20)
    assert w.review_panel.threshold_label.text().startswith("0.20") and len(layer.data) == 0
    qtbot.waitUntil(lambda: len(layer.data) == 1, timeout=2000)
    w.review_panel.threshold_slider.setSliderDown(False)
    assert w.nodules.threshold == 0.2


def test_table_click_goes_to_the_slice_and_selects(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    row = w.review_panel.table.ids.index(3)
    w.review_panel.table.click_row(row)
    # nodule 3 is on slice 15 -> world z = origin + 15 * 2 mm
    assert viewer.dims.point[0] == pytest.approx(CT_ORIGIN[0] + 15 * CT_SPACING[0])
    sel = list(layer.selected_data)
    assert len(sel) == 1 and layer.features["id"][sel[0]] == 3 and layer.features["slice"][sel[0]] == 15
    w.review_panel.table.click_row(w.review_panel.table.ids.index(1))
    assert viewer.dims.point[0] == pytest.approx(CT_ORIGIN[0] + 6 * CT_SPACING[0])  # centre 6.4 -> slice 6
    # selecting in the layer selects the table row
    viewer.dims.set_current_step(0, 15)
    assert layer.selected_data == set()  # nodule 1 is not on slice 15
    layer.selected_data = {0}
    layer._set_highlight(force=True)
    assert w.review_panel.table.selected_ids() == [3]


def _wait_sync(qtbot, w):
    qtbot.waitUntil(lambda: not w.layers.sync_scheduled, timeout=3000)


def test_edits_move_resize_delete_add_flip_review_undo(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    changes = []
    w.nodules_changed.connect(changes.append)

    # on slice 6, move nodule 1's rectangle by (+3, -2) voxels: the 3D box follows
    viewer.dims.set_current_step(0, 6)
    data = [d.copy() for d in layer.data]
    data[0] += [3, -2]
    layer.data = data
    _wait_sync(qtbot, w)
    t = w.nodules
    np.testing.assert_allclose(t.boxes[t.index_of(1)], [4.2, 13, 10, 8.6, 23, 22])
    for k in (5, 8):  # and its other slices show the moved box
        viewer.dims.set_current_step(0, k)
        np.testing.assert_allclose(layer.data[0].min(0), [13, 10])
    assert len(changes) == 1

    # resize nodule 3 on its slice
    viewer.dims.set_current_step(0, 15)
    layer.data = [np.array([[40, 40], [40, 52], [50, 52], [50, 40]], float)]
    _wait_sync(qtbot, w)
    t = w.nodules
    np.testing.assert_allclose(t.boxes[t.index_of(3)], [15.1, 40, 40, 15.3, 50, 52])
    assert layer.features["diameter_mm"][0] == pytest.approx(np.mean([0.2 * 2, 10 * 0.7, 12 * 0.7]))

    # flip with the 'm' key, mark reviewed (accepted) with 'r'
    keys = viewer.window._qt_viewer._key_map_handler
    viewer.layers.selection.active = layer
    layer.selected_data = {0}
    keys.press_key("m")
    keys.release_key("m")
    t = w.nodules
    assert t.label[t.index_of(3)] == "benign"
    assert layer.features["label"][0] == "benign"
    assert layer.selected_data == {0}  # the selection survives the edit
    keys.press_key("r")
    keys.release_key("r")
    assert w.nodules.reviewed[w.nodules.index_of(3)]
    assert w.review_panel.table.item(w.review_panel.table.ids.index(3), 7).text() == "accepted"
    # table action: select a row, flip with the button
    w.review_panel.table.click_row(w.review_panel.table.ids.index(1))
    w.review_panel.flip_button.click()
    assert w.nodules.label[w.nodules.index_of(1)] == "benign"

    # add: draw a rectangle on slice 12 with "new nodule label" = malignant
    w.review_panel.new_label_combo.setCurrentText("malignant")
    viewer.dims.set_current_step(0, 12)
    layer.add(np.array([[50, 50], [50, 57], [57, 57], [57, 50]], float), shape_type="rectangle")
    _wait_sync(qtbot, w)
    t = w.nodules
    assert len(t) == 4 and 4 in t
    i = t.index_of(4)
    assert (t.source[i], t.probability[i], t.label[i]) == ("user", 1.0, "malignant")
    assert 12 in t.slices(i)
    assert w.selected_ids() == [4]  # what was just drawn is selected

    # delete nodule 1's rectangle on one of its slices: the nodule goes
    viewer.dims.set_current_step(0, 7)
    layer.selected_data = {0}
    layer.remove_selected()
    _wait_sync(qtbot, w)
    assert 1 not in w.nodules and len(layer.data) == 0

    # undo brings it back (Ctrl+Z on the layer), then the button undoes the add
    keys.press_key("Control-Z")
    keys.release_key("Control-Z")
    assert 1 in w.nodules and layer.features["id"].tolist() == [1]
    w.review_panel.undo_button.click()
    assert 4 not in w.nodules
    # redo (Ctrl+Shift+Z, and the button) does them again
    assert w.review_panel.redo_button.isEnabled()
    keys.press_key("Control-Shift-Z")
    keys.release_key("Control-Shift-Z")
    assert 4 in w.nodules and 1 in w.nodules
    w.review_panel.redo_button.click()
    assert 1 not in w.nodules and not w.review_panel.redo_button.isEnabled()
    assert len(changes) >= 10


def test_export_import_round_trip_and_foreign_file(make_napari_viewer, qtbot, notes, tmp_path):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    w.review_panel.table.click_row(0)
    w.mark_reviewed()
    w.add_nodule([2.5, 5, 5, 3.5, 9, 9], label="malignant")
    before = w.nodules.copy()
    paths = w.export_panel.export_nodules(tmp_path / "case.csv")
    assert [Path(p).name for p in paths] == ["case.csv", "case.json"]
    d = json.loads(Path(paths[1]).read_text())
    assert d["model"] == MODEL and d["image"]["shape"] == list(CT_SHAPE)
    assert d["image"]["spacing"] == list(CT_SPACING)
    # wreck the nodules, then import
    w.review_panel.table.click_row(0)
    w.delete_selected()
    w.set_threshold(0.1)
    assert not w.nodules.equals(before)
    w.export_panel.import_nodules(paths[1])
    assert w.nodules.equals(before)
    assert w.nodule_layer is layer and w.review_panel.threshold_slider.value() == 50
    assert sorted(w.review_panel.table.ids) == sorted(before.ids[before.visible_mask()].tolist())
    # a file made for another image is refused with a message
    other = dict(json.loads(Path(paths[1]).read_text()))
    other["image"]["shape"] = [30, 64, 64]
    Path(tmp_path / "other.json").write_text(json.dumps(other))
    w.export_panel.import_nodules(tmp_path / "other.json")
    assert "belongs to another image" in notes["error"][-1]
    assert w.nodules.equals(before)
    # a failed export reports and leaves the old file alone
    w.export_panel.export_nodules(tmp_path / "missing-folder" / "x.csv")
    assert "could not write" in notes["error"][-1]


def test_writer_contribution_writes_the_layer(make_napari_viewer, qtbot, notes, tmp_path):
    from napari_resmtnet._writer import write_nodules

    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    paths = write_nodules(str(tmp_path / "w.json"), [layer.as_layer_data_tuple()])
    d = json.loads(Path(paths[1]).read_text())
    assert [n["id"] for n in d["nodules"]] == [1, 3] and [n["id"] for n in d["hidden"]] == [2]
    # through napari's own File > Save Layers, dispatched by the manifest
    written = napari.save_layers(str(tmp_path / "saved.csv"), [layer], plugin="napari-resmtnet")
    assert sorted(Path(p).name for p in written) == ["saved.csv", "saved.json"]
    assert "seriesuid,coordX,coordY,coordZ" in (tmp_path / "saved.csv").read_text()


def test_widget_adopts_a_nodule_layer_made_elsewhere(make_napari_viewer, qtbot, notes):
    """A sample or script adds image + nodule layers (detections_to_layer_data): the widget
    picks the nodule layer up, links it to its image, and edits it."""
    from napari_resmtnet.layers import detections_to_layer_data
    from napari_resmtnet.scan import Scan

    scan = Scan(np.zeros(CT_SHAPE, np.int16), CT_SPACING, CT_ORIGIN, np.eye(3), "CT", seriesuid="1.2.3")
    det = Detections(CT_BOXES, CT_PROB, CT_MAL, Detections.geometry_of(scan), {"model_info": MODEL})
    viewer = make_napari_viewer()
    viewer.add_image(scan.array, name="lung", metadata={"seriesuid": "1.2.3", "modality": "CT"}, **scan.napari_kwargs())
    data, kw, kind = detections_to_layer_data(det, scan, 0.5)[0]
    viewer.add_layer(napari.layers.Layer.create(data, kw, kind))
    w = W.NoduleWidget(viewer, predictor_factory=Factory())
    viewer.window.add_dock_widget(w)
    assert w.nodule_layer is viewer.layers[1] and w.nodule_layer.metadata["image_layer"] == "lung"
    assert w.review_panel.table.ids == [1, 3] and w.nodules.model_info == MODEL
    w.review_panel.table.click_row(0)
    w.flip_selected()
    assert w.nodules.label[0] == "benign"


@pytest.mark.slow
def test_real_predictor_on_the_bundled_cube(make_napari_viewer, qtbot, notes):
    """The bundled Res-MTNet on the bundled LUNA16 cube, through the reader's layer."""
    try:
        from napari_resmtnet._sample_data import sample_cube
        from napari_resmtnet.inference.predictor import Predictor
    except ImportError as exc:
        pytest.skip(f"inference or sample data not available: {exc}")
    try:
        layer_data = sample_cube()
        predictor = Predictor(modality="CT", device="cpu")
    except Exception as exc:  # missing weights or sample files in this checkout
        pytest.skip(f"bundled model or cube not available: {type(exc).__name__}: {exc}")
    viewer = make_napari_viewer()
    for data, kw, kind in layer_data:
        viewer.add_layer(napari.layers.Layer.create(data, kw, kind))
    w = W.NoduleWidget(viewer, predictor_factory=lambda modality, device: predictor)
    viewer.window.add_dock_widget(w)
    w.detect_panel.detect_button.click()
    qtbot.waitUntil(lambda: not w.is_running, timeout=120000)
    assert notes["error"] == []
    t = w.nodules
    assert t is not None and t.model_info == predictor.model_info
    assert t.shape == tuple(layer_data[0][0].shape) and t.threshold == predictor.threshold
    assert w.nodule_layer.metadata["image_layer"] == viewer.layers[0].name


@pytest.mark.slow
def test_real_predictor_tiny_network_through_the_widget(make_napari_viewer, qtbot, notes):
    """The real Predictor (tiny random Res-MTNet, no weights needed) on a real CT crop:
    the bundled LUNA16 cube through the reader's layer data, run and cancelled in the worker."""
    try:
        import torch
        from napari_resmtnet.inference.predictor import Predictor
        from napari_resmtnet.model.network import ResMTNet, ResMTNetConfig
    except ImportError as exc:
        pytest.skip(f"inference not available: {exc}")
    try:
        from napari_resmtnet._sample_data import sample_cube

        layer_data = sample_cube()
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        pytest.skip(f"bundled LUNA16 cube not available: {exc}")
    torch.manual_seed(0)
    net = ResMTNet(ResMTNetConfig(spatial_dims=3, widths=(4, 8, 8, 8), blocks=(1, 1, 1), head_width=8))
    with torch.no_grad():
        net.heatmap.bias.fill_(0.0)  # p = 0.5 prior: plenty of candidates
    predictor = Predictor(
        "CT",
        model=net,
        info={"spacing_mm": 1.0, "threshold": 0.4, "name": "tiny", "version": "test", "sha256": "0" * 64},
        device="cpu",
        window=64,
        overlap=8,
    )
    viewer = make_napari_viewer()
    for data, kw, kind in layer_data:
        viewer.add_layer(napari.layers.Layer.create(data, kw, kind))
    w = W.NoduleWidget(viewer, predictor_factory=lambda modality, device: predictor)
    viewer.window.add_dock_widget(w)
    assert w.modality_for(viewer.layers[0]) == "CT"
    w.detect_panel.detect_button.click()
    qtbot.waitUntil(lambda: not w.is_running, timeout=60000)
    assert notes["error"] == []
    t = w.nodules
    assert t is not None and len(t) > 0 and t.threshold == 0.4
    assert t.model_info == {"name": "tiny", "version": "test", "sha256": "0" * 64}
    assert t.shape == tuple(layer_data[0][0].shape)
    assert t.image["seriesuid"] == layer_data[0][1]["metadata"]["seriesuid"]
    assert w.nodule_layer.metadata["image_layer"] == viewer.layers[0].name
    # the real Cancelled raised between windows ends the run quietly
    n = len(viewer.layers)
    w.detect_panel.detect_button.click()
    w.detect_panel.cancel()
    qtbot.waitUntil(lambda: not w.is_running, timeout=60000)
    assert notes["error"] == [] and "cancelled" in w.detect_panel.status_label.text().lower()
    assert len(viewer.layers) == n


def _canvas_xy(viewer, world):
    """Canvas pixel (x, y) where the world position ``world`` (its displayed axes) is drawn."""
    canvas = viewer.window._qt_viewer.canvas
    yx = [world[d] for d in viewer.dims.displayed]
    p = (canvas.view.transform * canvas.view.scene.transform).map([yx[1], yx[0], 0, 1])
    return float(p[0] / p[3]), float(p[1] / p[3])


MOVE_MS = 20


def mouse(viewer, qtbot, start, end=None, steps=4):
    """A left click at world position ``start`` (or a drag to ``end``), sent as mouse events
    to napari's canvas, the way a reader's mouse produces them."""
    from vispy.app.canvas import MouseEvent

    scene = viewer.window._qt_viewer.canvas._scene_canvas
    a = _canvas_xy(viewer, start)
    scene.events.mouse_move(pos=a, modifiers=())  # the pointer arrives
    qtbot.wait(MOVE_MS)
    scene.events.mouse_press(pos=a, modifiers=(), button=1)
    press = MouseEvent(pos=a, type="mouse_press", button=1)
    if end is not None:
        b = _canvas_xy(viewer, end)
        for f in np.linspace(0, 1, steps + 1)[1:]:
            p = (a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]))
            scene.events.mouse_move(pos=p, modifiers=(), button=1, press_event=press)
            qtbot.wait(MOVE_MS)  # napari throttles mouse moves (5 ms): let each one land
        a = b
    scene.events.mouse_release(pos=a, modifiers=(), button=1)
    qtbot.wait(MOVE_MS)


def press(viewer, key):
    keys = viewer.window._qt_viewer._key_map_handler
    keys.press_key(key)
    keys.release_key(key)


#: lung1's geometry: slice k lies at -777.4999999999998 + 5 k mm, which napari converts back
#: to slice 29.000000000000014 and the like
LUNG1 = dict(scale=(5.0, 0.5703125, 0.5703125), translate=(-777.4999999999998, -215.5, -134.0234375))


def test_canvas_click_select_drag_resize_and_z_extent(make_napari_viewer, qtbot, notes):
    """Click a box on a CT slice, drag it, resize it by its handle, set its first and last
    slices with the keys -- all through napari's canvas mouse events and key handler, on a
    geometry whose slice positions are not exact."""
    boxes = [[27.6, 20, 20, 30.4, 30, 32]]  # slices 28, 29, 30
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((48, 64, 64), np.int16), name="lung1", metadata={"modality": "CT"}, **LUNG1)

    class P(FakePredictor):
        def predict(self, scan, progress=None, cancel=None):
            return Detections(boxes, [0.9], [0.8], Detections.geometry_of(scan))

    w = W.NoduleWidget(viewer, predictor_factory=lambda m, d: P())
    viewer.window.add_dock_widget(w)
    layer = detect(qtbot, w)
    noisy = []
    for k in (28, 29, 30):
        viewer.dims.set_current_step(0, k)
        d = image.world_to_data(viewer.dims.point)[0]
        if d != k:
            noisy.append(k)
    assert 29 in noisy  # the viewer's slice position is not exactly slice 29 ...
    viewer.dims.set_current_step(0, 29)
    assert w.current_slice == 29 and layer.features["id"].tolist() == [1]  # ... the layer is
    viewer.layers.selection.active = layer
    layer.mode = "select"
    layer.selected_data = set()
    to_world = lambda yx: np.array([viewer.dims.point[0], *layer.data_to_world(yx)])  # noqa: E731

    # click inside the box: it is selected, in the layer and the table
    mouse(viewer, qtbot, to_world([25, 26]))
    assert layer.selected_data == {0} and w.review_panel.table.selected_ids() == [1]

    # drag it 4 voxels down: the 3D box moves in-plane, z stays; the selection stays
    mouse(viewer, qtbot, to_world([25, 26]), to_world([29, 26]))
    _wait_sync(qtbot, w)
    t = w.nodules
    np.testing.assert_allclose(t.boxes[0], [27.6, 24, 20, 30.4, 34, 32], atol=1e-4)
    assert layer.selected_data == {0} and w.selected_ids() == [1]

    # resize by the lower right handle of the selected box
    mouse(viewer, qtbot, to_world([34, 32]), to_world([38, 35]))
    _wait_sync(qtbot, w)
    np.testing.assert_allclose(w.nodules.boxes[0], [27.6, 24, 20, 30.4, 38, 35], atol=1e-4)
    assert w.selected_ids() == [1]

    # z extent: go up two slices (the box is not there), '[' starts it here; ']' ends it lower
    viewer.dims.set_current_step(0, 26)
    assert len(layer.data) == 0 and w.selected_ids() == [1]
    press(viewer, "[")
    assert list(w.nodules.slices(0)) == [26, 27, 28, 29, 30]
    assert layer.features["id"].tolist() == [1] and layer.selected_data == {0}
    viewer.dims.set_current_step(0, 33)
    press(viewer, "]")
    assert list(w.nodules.slices(0)) == list(range(26, 34))
    np.testing.assert_allclose(w.nodules.boxes[0, [1, 2, 4, 5]], [24, 20, 38, 35], atol=1e-4)
    press(viewer, "Control-Z")
    assert list(w.nodules.slices(0)) == [26, 27, 28, 29, 30]
    press(viewer, "Control-Y")
    assert list(w.nodules.slices(0)) == list(range(26, 34))

    # draw a new box with the rectangle tool on slice 40
    viewer.dims.set_current_step(0, 40)
    layer.mode = "add_rectangle"
    mouse(viewer, qtbot, to_world([10, 40]), to_world([18, 50]))
    _wait_sync(qtbot, w)
    t = w.nodules
    assert len(t) == 2 and t.source[1] == "user" and 40 in t.slices(1)
    np.testing.assert_allclose(t.boxes[1, [1, 2, 4, 5]], [10, 40, 18, 50], atol=0.05)
    assert notes["error"] == []


def test_cxr_click_and_drag(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f, ndim=2)
    layer = detect(qtbot, w)
    viewer.layers.selection.active = layer
    layer.mode = "select"
    layer.selected_data = set()
    to_world = layer.data_to_world
    mouse(viewer, qtbot, to_world([20, 30]))  # inside nodule 1: (10, 20)-(30, 40)
    assert w.selected_ids() == [1]
    mouse(viewer, qtbot, to_world([20, 30]), to_world([25, 30]))
    _wait_sync(qtbot, w)
    np.testing.assert_allclose(w.nodules.boxes[0], [15, 20, 35, 40], atol=1e-4)
    assert w.selected_ids() == [1]


def test_review_keys_next_unreviewed_and_counts(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    w.review_panel.threshold_slider.setValue(20)  # all three shown; reading order 1 (0.9), 3 (0.7), 2 (0.3)
    viewer.layers.selection.active = layer
    assert "3 of 3 nodules shown: 3 unreviewed, 0 accepted, 0 rejected" in w.review_panel.count_label.text()
    press(viewer, ".")
    assert w.selected_ids() == [1] and w.current_slice == 6 and layer.selected_data == {0}
    press(viewer, "a")
    assert w.nodules.review[0] == "accepted" and layer.features["mark"].tolist() == [" \u2713"]
    press(viewer, ".")
    assert w.selected_ids() == [3] and w.current_slice == 15
    press(viewer, "x")
    t = w.nodules
    assert t.review[t.index_of(3)] == "rejected"
    np.testing.assert_allclose(layer.edge_color[0][:3], REJECTED_RGB)
    assert list(layer.text.values) == ["malignant 0.70 \u2717"]
    assert w.review_panel.table.item(w.review_panel.table.ids.index(3), 7).text() == "rejected"
    press(viewer, ",")
    assert w.selected_ids() == [2] and w.current_slice in (10, 11)
    assert "1 unreviewed, 1 accepted, 1 rejected" in w.review_panel.count_label.text()
    press(viewer, "a")
    press(viewer, ".")
    assert any("No unreviewed nodule left" in m for m in notes["info"])
    press(viewer, "u")
    assert w.nodules.review[w.nodules.index_of(2)] == "unreviewed"
    # keys work the same while the table has the focus
    w.review_panel.table.click_row(w.review_panel.table.ids.index(1))
    from qtpy.QtCore import Qt

    qtbot.keyClick(w.review_panel.table, Qt.Key_M)
    assert w.nodules.label[0] == "benign"
    # arrow keys in the table go to the nodule
    qtbot.keyClick(w.review_panel.table, Qt.Key_Down)
    assert w.selected_ids() == [3] and w.current_slice == 15


def test_detect_again_merges_keeps_reviewed_and_drawn(make_napari_viewer, qtbot, notes, monkeypatch):
    asked = []
    monkeypatch.setattr(W, "ask_merge", lambda parent, q, answer: (asked.append(q), answer(True)))
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    assert asked == []  # nothing of the reader's yet: no question
    w.set_threshold(0.2)
    w.focus_nodule(1)
    w.accept_selected()
    w.focus_nodule(3)
    w.reject_selected()
    nid = w.add_nodule([2.5, 50, 50, 3.5, 58, 58], label="malignant")
    w.focus_nodule(1)
    w.flip_selected()
    before = w.nodules.copy()
    detect(qtbot, w)
    assert len(asked) == 1 and "3 nodule(s) you accepted, rejected or drew" in asked[0]
    t = w.nodules
    assert w.nodule_layer is layer
    # the reader's nodules are kept exactly; nodule 2 (unreviewed) is replaced by the new run's
    for i in (1, 3, nid):
        j, k = t.index_of(i), before.index_of(i)
        assert (t.review[j], t.label[j], t.source[j]) == (before.review[k], before.label[k], before.source[k])
        np.testing.assert_array_equal(t.boxes[j], before.boxes[k])
    assert 2 not in t and len(t) == 4 and t.review[-1] == "unreviewed" and t.ids[-1] == nid + 1
    assert any("Merged: 3 reviewed or drawn nodule(s) kept" in m for m in notes["info"])
    detect(qtbot, w)  # asked once per layer
    assert len(asked) == 1 and len(w.nodules) == 4
    w.undo()
    w.undo()
    back = w.nodules.copy()
    back.threshold, back.model_info = before.threshold, before.model_info  # undo keeps the threshold
    assert back.equals(before)


def test_csv_reimport_keeps_threshold_and_model(make_napari_viewer, qtbot, notes, tmp_path):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    detect(qtbot, w)
    w.set_threshold(0.25)
    paths = w.export_panel.export_nodules(tmp_path / "case.csv")
    w.set_threshold(0.6)
    w.export_panel.import_nodules(paths[0])
    t = w.nodules
    assert int(t.visible_mask().sum()) == 3 and t.threshold <= 0.3  # all exported rows shown
    assert t.model_info == MODEL
    assert notes["error"] == []


def test_restore_offered_again_and_restore_button(make_napari_viewer, qtbot, notes, monkeypatch):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    detect(qtbot, w)
    w.focus_nodule(1)
    w.accept_selected()
    saved = w.nodules.copy()
    w.flush_autosave()
    viewer.layers.remove(w.nodule_layer)
    assert w.nodule_layer is None
    # the button brings them back
    w.export_panel.restore_button.click()
    assert w.nodules is not None and w.nodules.equals(saved)
    viewer.layers.remove(w.nodule_layer)
    # the same image opened again in this session is offered its autosave (again)
    monkeypatch.setenv("RESMTNET_AUTOSAVE_RESTORE", "always")
    data = viewer.layers["ct"].data
    viewer.layers.remove("ct")
    viewer.add_image(data, name="ct", scale=CT_SPACING, translate=CT_ORIGIN, metadata={"modality": "CT"})
    qtbot.waitUntil(lambda: w.nodules is not None, timeout=3000)
    assert w.nodules.equals(saved)
    viewer.layers.remove(w.nodule_layer)
    viewer.layers.remove("ct")
    viewer.add_image(data, name="ct", scale=CT_SPACING, translate=CT_ORIGIN, metadata={"modality": "CT"})
    qtbot.waitUntil(lambda: w.nodules is not None, timeout=3000)


def iso_crosses_mask(viewer, layer) -> bool:
    """Whether the iso threshold the GPU shader uses lies between the mask's 0 and 1 as the
    shader samples them. A uint8 mask is a normalised texture (1 reads as 1/255) while
    napari scales the threshold by the contrast limits only: 0.5 is then never reached and
    the surface draws nothing (what the README's 3D screenshot showed)."""
    node = viewer.window._qt_viewer.canvas.layer_to_visual[layer].node
    tex = node._texture
    lo, hi = (
        tex.normalize_value(v, layer.data.dtype) if np.issubdtype(layer.data.dtype, np.integer) else v for v in (0, 1)
    )
    return lo < node.threshold < hi


def test_3d_view_shows_boxes_and_lungs_not_slabs(make_napari_viewer, qtbot, notes):
    from napari_resmtnet.views import nodule_boxes_3d

    f = Factory()
    viewer = make_napari_viewer()
    ct = np.full(CT_SHAPE, -1000, np.int16)  # air around the patient
    ct[2:18, 5:60, 5:60] = 40  # the body
    ct[4:16, 16:48, 12:28] = -850  # two lungs inside the chest wall
    ct[4:16, 16:48, 36:52] = -850
    image = viewer.add_image(ct, name="ct", scale=CT_SPACING, translate=CT_ORIGIN, metadata={"modality": "CT"})
    w = W.NoduleWidget(viewer, predictor_factory=f)
    viewer.window.add_dock_widget(w)
    layer = detect(qtbot, w)
    viewer.dims.ndisplay = 3
    boxes = [ly for ly in viewer.layers if ly.metadata.get("resmtnet_3d") == "boxes"]
    labels = [ly for ly in viewer.layers if ly.metadata.get("resmtnet_3d") == "labels"]
    assert len(boxes) == 1 and len(labels) == 1 and not layer.visible and not image.visible
    t = w.nodules
    # one wire box (12 edges) and one label for each of the two shown nodules, in world mm
    assert boxes[0].data.shape == (24, 2, 3) and len(labels[0].data) == 2
    assert labels[0].features["text"].tolist() == ["malignant 0.90", "malignant 0.70"]
    ends = boxes[0].data[:12, 0]
    lo = np.asarray(CT_ORIGIN) + np.asarray(CT_SPACING) * [4.5, 10, 12]  # nodule 1: slices 5..8
    hi = np.asarray(CT_ORIGIN) + np.asarray(CT_SPACING) * [8.5, 20, 24]
    np.testing.assert_allclose(ends.min(0), lo)
    np.testing.assert_allclose((boxes[0].data[:12, 0] + boxes[0].data[:12, 1]).max(0), hi)
    np.testing.assert_allclose(boxes[0].data, nodule_boxes_3d(t)[0])
    qtbot.waitUntil(lambda: any(ly.metadata.get("resmtnet_3d") == "lungs" for ly in viewer.layers), timeout=10000)
    lungs = [ly for ly in viewer.layers if ly.metadata.get("resmtnet_3d") == "lungs"][0]
    assert lungs.rendering == "iso" and lungs.data.sum() > 0 and lungs.name not in w.detect_panel.params.image.value
    assert tuple(lungs.contrast_limits) == (0, 1)  # the mask's 1 is bright, not 1/255
    assert iso_crosses_mask(viewer, lungs)  # the surface draws something
    assert "3 candidates, 2 shown" in w.detect_panel.status_label.text()  # the status is still the nodules
    w.focus_nodule(3)
    w.reject_selected()  # a rejected nodule leaves the 3D view
    assert boxes[0].data.shape == (12, 2, 3) and len(labels[0].data) == 1
    viewer.dims.ndisplay = 2
    assert layer.visible and image.visible and not boxes[0].visible and not lungs.visible
    assert notes["error"] == []


def test_report_button_writes_accepted_nodules(make_napari_viewer, qtbot, notes, tmp_path):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    detect(qtbot, w)
    w.focus_nodule(1)
    w.accept_selected()
    p = w.export_panel.write_report(tmp_path / "report.html")
    text = p.read_text(encoding="utf-8")
    assert text.count("<img ") == 1 and "fake-resmtnet" in text
    assert w.export_panel.write_report(tmp_path / "missing" / "x" / "r.html") is not None  # folders are made
    (tmp_path / "file").write_text("x")  # a file where a folder should be
    assert w.export_panel.write_report(tmp_path / "file" / "r.html") is None
    assert "Could not write the report" in notes["error"][-1]


def test_reader_overrides_the_type_in_the_table_and_the_category_follows(make_napari_viewer, qtbot, notes):
    """A reader picks "ground-glass" in the table's type cell: the nodule's type becomes the
    reader's, its Lung-RADS category is recomputed, and Ctrl+Z gives the model's call back."""
    from qtpy.QtWidgets import QComboBox

    from napari_resmtnet._qt.table import TYPE_COLUMN

    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    detect(qtbot, w)
    nid = 1
    i = w.nodules.index_of(nid)
    before = w.nodules.grade(i)
    assert w.nodules.texture_of(i) == ""  # this model gives no type
    row = w.review_panel.table.row_of(nid)
    w.review_panel.table.setCurrentCell(row, TYPE_COLUMN)
    w.review_panel.table.editItem(w.review_panel.table.item(row, TYPE_COLUMN))
    combo = w.review_panel.table.findChild(QComboBox)
    assert combo is not None
    combo.setCurrentIndex(combo.findText("ground-glass"))
    combo.activated.emit(combo.currentIndex())  # what a click on the item does
    qtbot.waitUntil(lambda: w.nodules.texture_override[w.nodules.index_of(nid)] == "ground-glass", timeout=3000)
    g = w.nodules.grade(w.nodules.index_of(nid))
    assert g.nodule_type == "ground-glass" and g.type_from == "reader" and g.category == "2"
    assert "ground-glass" in w.review_panel.table.item(w.review_panel.table.row_of(nid), TYPE_COLUMN).text()
    w.undo()
    assert w.nodules.texture_override[w.nodules.index_of(nid)] == "" and w.nodules.grade(i) == before


def test_report_of_a_dicom_series_also_writes_sr_and_seg(make_napari_viewer, qtbot, notes, tmp_path):
    """A CT opened from a DICOM folder: Report... also writes the DICOM SEG and SR of the
    accepted nodule, referencing the source series (read back with highdicom)."""
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pacs_fixtures import write_ct_series

    info = write_ct_series(tmp_path / "ct", seed=3)
    viewer = make_napari_viewer()
    viewer.open(str(info["folder"]), plugin="napari-resmtnet")
    w = W.NoduleWidget(viewer, predictor_factory=Factory())
    viewer.window.add_dock_widget(w)
    detect(qtbot, w)  # the fake model's boxes lie inside this 16 x 48 x 48 series
    w.focus_nodule(1)
    w.accept_selected()
    out = w.export_panel.write_report(tmp_path / "out" / "report.html")
    assert out is not None
    seg_path, sr_path = tmp_path / "out" / "report_seg.dcm", tmp_path / "out" / "report_sr.dcm"
    assert seg_path.exists() and sr_path.exists(), notes
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series_uid"]
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 1


def test_smallest_nodule_size_reaches_the_ct_predictor_and_is_told(make_napari_viewer, qtbot, notes):
    """'smallest nodule (mm)': each CT run sets the predictor's size rule (3 mm by default,
    0 shows micronodules); what the rule left out is said in the notification."""

    class SizeAware(FakePredictor):
        min_nodule_mm = -1.0

        def predict(self, scan, progress=None, cancel=None):
            self.seen = getattr(self, "seen", []) + [self.min_nodule_mm]
            det = super().predict(scan, progress, cancel)
            if self.min_nodule_mm > 0:
                det.meta["below_min_size"] = 2
            return det

    pred = SizeAware()
    viewer, w = make(make_napari_viewer, lambda modality, device: pred)
    spin = w.detect_panel.params.min_nodule_mm
    assert spin.value == 3.0 and "LIDC" in spin.tooltip
    detect(qtbot, w)
    assert pred.seen == [3.0]
    assert "2 smaller than 3 mm left out" in notes["info"][-1]
    spin.value = 0.0  # the reader wants micronodules too
    detect(qtbot, w)
    assert pred.seen == [3.0, 0.0]
    assert "left out" not in notes["info"][-1]
