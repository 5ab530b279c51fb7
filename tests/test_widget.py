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

pytestmark = pytest.mark.gui

MODEL = {"name": "fake-resmtnet", "version": "0.0.1", "sha256": "f" * 64}
CT_SHAPE = (20, 64, 64)
CT_SPACING = (2.0, 0.7, 0.7)
CT_ORIGIN = (-100.0, 10.0, -50.0)
CT_BOXES = [[4.2, 10, 12, 8.6, 20, 24],     # id 1, slices 5..8, p 0.9 malignant
            [10.0, 30, 30, 12.0, 36, 40],   # id 2, slices 10..11, p 0.3 benign (hidden at 0.5)
            [15.1, 40, 40, 15.3, 44, 44]]   # id 3, slice 15, p 0.7 malignant
CT_PROB = [0.9, 0.3, 0.7]
CT_MAL = [0.87, 0.2, 0.6]


class Cancelled(Exception):
    """Stands in for napari_resmtnet.inference.Cancelled."""


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
        return Detections([[10, 20, 30, 40], [50, 50, 60, 64]], [0.8, 0.6], [0.1, 0.9],
                          Detections.geometry_of(scan))


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
        viewer.add_image(np.zeros(CT_SHAPE, np.int16), name="ct", scale=CT_SPACING, translate=CT_ORIGIN,
                         metadata={"modality": "CT"})
    else:
        viewer.add_image(np.zeros((100, 120), np.uint16), name="cxr", scale=(0.5, 0.5))
    w = W.NoduleWidget(viewer, predictor_factory=factory)
    viewer.window.add_dock_widget(w)
    return viewer, w


def detect(qtbot, w):
    w.detect_button.click()
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
    np.testing.assert_allclose(layer.scale, CT_SPACING)
    np.testing.assert_allclose(layer.translate, CT_ORIGIN)
    # 4 rectangles for nodule 1, 1 for nodule 3; nodule 2 below the threshold
    assert layer.features["id"].tolist() == [1, 1, 1, 1, 3]
    assert set(layer.features.columns) >= {"id", "probability", "malignancy", "label", "diameter_mm",
                                           "source", "reviewed"}
    assert layer.features["label"].tolist()[0] == "malignant"
    t = layer.metadata["nodules"]
    assert len(t) == 3 and t.model_info == MODEL and t.threshold == 0.5
    assert w.table.rowCount() == 2 and w.table.ids == [1, 3]
    assert "2 of 3 nodules shown" in w.count_label.text()
    assert notes["error"] == []


def test_responsive_while_running_and_second_click_ignored(make_napari_viewer, qtbot, notes):
    from qtpy.QtCore import QTimer

    f = Factory(delay=1.0)
    viewer, w = make(make_napari_viewer, f)
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: w.is_running and ticks.append(time.perf_counter()))
    timer.start()
    w.detect_button.click()
    assert w.is_running and not w.detect_button.isEnabled() and w.cancel_button.isEnabled()
    pbar = w._pbar
    assert pbar is not None and pbar in napari.utils.progress._all_instances  # activity dock
    w.detect()  # a second click while running
    qtbot.waitUntil(lambda: not w.is_running, timeout=10000)
    timer.stop()
    assert len(f.made) == 1 and f.predictors[0].calls == 1
    assert pbar.n == 1000 and pbar not in napari.utils.progress._all_instances  # closed
    assert any("already running" in m for m in notes["info"])
    gaps = np.diff(ticks)
    assert len(ticks) > 20 and gaps.max() < 0.2, f"event loop stalled for {gaps.max():.3f} s"
    assert w.nodule_layer is not None


def test_cancel_stops_detection_without_layers(make_napari_viewer, qtbot, notes):
    f = Factory(delay=3.0)
    viewer, w = make(make_napari_viewer, f)
    n_layers = len(viewer.layers)
    w.detect_button.click()
    qtbot.wait(100)
    w.cancel_button.click()
    qtbot.waitUntil(lambda: not w.is_running, timeout=5000)
    assert len(viewer.layers) == n_layers and w.nodule_layer is None
    assert "cancelled" in w.status_label.text().lower()
    assert any("cancelled" in m for m in notes["info"]) and notes["error"] == []
    assert w.detect_button.isEnabled()


def test_error_is_a_notification_not_a_crash(make_napari_viewer, qtbot, notes):
    f = Factory(error=RuntimeError("weights file is corrupt"))
    viewer, w = make(make_napari_viewer, f)
    detect(qtbot, w)
    assert notes["error"] and "weights file is corrupt" in notes["error"][0]
    assert w.nodule_layer is None and w.detect_button.isEnabled()

    def broken_factory(modality, device):
        raise ImportError("No module named 'napari_resmtnet.inference'")

    w._factory = broken_factory
    w._predictors.clear()
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
    w.model_combo.setCurrentIndex(1)
    w.detect()
    assert "CT model needs a 3D volume" in notes["error"][-1]


def test_threshold_slider_filters_live(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    w.threshold_slider.setValue(20)
    assert sorted(set(layer.features["id"])) == [1, 2, 3] and len(layer.data) == 7
    assert w.table.rowCount() == 3
    w.threshold_slider.setValue(80)
    assert set(layer.features["id"]) == {1} and w.table.rowCount() == 1
    w.threshold_slider.setValue(95)
    assert len(layer.data) == 0 and w.table.rowCount() == 0
    assert len(layer.metadata["nodules"]) == 3  # nothing was thrown away
    assert len(f.made) == 1  # and the model did not run again
    # while dragging, redraws are throttled; the last value is applied
    w.threshold_slider.setSliderDown(True)
    w.threshold_slider.setValue(60)
    w.threshold_slider.setValue(20)
    assert w.threshold_label.text() == "0.20" and len(layer.data) == 0
    qtbot.waitUntil(lambda: len(layer.data) == 7, timeout=2000)
    w.threshold_slider.setSliderDown(False)
    assert w.nodules.threshold == 0.2


def test_table_click_goes_to_the_slice_and_selects(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    row = w.table.ids.index(3)
    w.table.click_row(row)
    # nodule 3 is on slice 15 -> world z = origin + 15 * 2 mm
    assert viewer.dims.point[0] == pytest.approx(CT_ORIGIN[0] + 15 * CT_SPACING[0])
    sel = list(layer.selected_data)
    assert len(sel) == 1 and layer.features["id"][sel[0]] == 3 and layer.features["slice"][sel[0]] == 15
    w.table.click_row(w.table.ids.index(1))
    assert viewer.dims.point[0] == pytest.approx(CT_ORIGIN[0] + 6 * CT_SPACING[0])  # centre 6.4 -> slice 6
    # selecting in the layer selects the table row
    layer.selected_data = {4}
    layer._set_highlight(force=True)
    assert w.table.selected_ids() == [3]


def _wait_sync(qtbot, w):
    qtbot.waitUntil(lambda: not w._sync_scheduled, timeout=3000)


def test_edits_move_resize_delete_add_flip_review_undo(make_napari_viewer, qtbot, notes):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    changes = []
    w.nodules_changed.connect(changes.append)

    # move the slice-6 rectangle of nodule 1 by (+3, -2) voxels: the 3D box follows
    data = [d.copy() for d in layer.data]
    data[1][:, 1:] += [3, -2]
    layer.data = data
    _wait_sync(qtbot, w)
    t = w.nodules
    np.testing.assert_allclose(t.boxes[t.index_of(1)], [4.2, 13, 10, 8.6, 23, 22])
    for d, nid in zip(layer.data, layer.features["id"]):
        if nid == 1:
            np.testing.assert_allclose(d[:, 1:].min(0), [13, 10])
    assert len(changes) == 1

    # resize nodule 3 on its slice
    data = [d.copy() for d in layer.data]
    j = layer.features["id"].tolist().index(3)
    data[j] = np.array([[15, 40, 40], [15, 40, 52], [15, 50, 52], [15, 50, 40]], float)
    layer.data = data
    _wait_sync(qtbot, w)
    t = w.nodules
    np.testing.assert_allclose(t.boxes[t.index_of(3)], [15.1, 40, 40, 15.3, 50, 52])
    assert layer.features["diameter_mm"][layer.features["id"].tolist().index(3)] == pytest.approx(
        np.mean([0.2 * 2, 10 * 0.7, 12 * 0.7]))

    # flip with the 'm' key, mark reviewed with 'r'
    keys = viewer.window._qt_viewer._key_map_handler
    viewer.layers.selection.active = layer
    layer.selected_data = {j}
    keys.press_key("m")
    keys.release_key("m")
    t = w.nodules
    assert t.label[t.index_of(3)] == "benign"
    assert layer.features["label"][layer.features["id"].tolist().index(3)] == "benign"
    layer.selected_data = {layer.features["id"].tolist().index(3)}
    keys.press_key("r")
    keys.release_key("r")
    assert w.nodules.reviewed[w.nodules.index_of(3)]
    assert w.table.item(w.table.ids.index(3), 7).text() == "yes"
    # table action: select a row, flip with the button
    w.table.click_row(w.table.ids.index(1))
    w.flip_button.click()
    assert w.nodules.label[w.nodules.index_of(1)] == "benign"

    # add: draw a rectangle on slice 12 with "new nodule label" = malignant
    w.new_label_combo.setCurrentText("malignant")
    layer.add(np.array([[12, 50, 50], [12, 50, 57], [12, 57, 57], [12, 57, 50]], float),
              shape_type="rectangle")
    _wait_sync(qtbot, w)
    t = w.nodules
    assert len(t) == 4 and 4 in t
    i = t.index_of(4)
    assert (t.source[i], t.probability[i], t.label[i]) == ("user", 1.0, "malignant")
    assert 12 in t.slices(i)

    # delete one rectangle of nodule 1: the nodule goes
    layer.selected_data = {layer.features["id"].tolist().index(1)}
    layer.remove_selected()
    _wait_sync(qtbot, w)
    assert 1 not in w.nodules and 1 not in set(layer.features["id"])

    # undo brings it back (Ctrl+Z on the layer), then the button undoes the add
    keys.press_key("Control-Z")
    keys.release_key("Control-Z")
    assert 1 in w.nodules and 1 in set(layer.features["id"])
    w.undo_button.click()
    assert 4 not in w.nodules
    assert len(changes) >= 8


def test_export_import_round_trip_and_foreign_file(make_napari_viewer, qtbot, notes, tmp_path):
    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    w.table.click_row(0)
    w.mark_reviewed()
    w.add_nodule([2.5, 5, 5, 3.5, 9, 9], label="malignant")
    before = w.nodules.copy()
    paths = w.export_nodules(tmp_path / "case.csv")
    assert [Path(p).name for p in paths] == ["case.csv", "case.json"]
    d = json.loads(Path(paths[1]).read_text())
    assert d["model"] == MODEL and d["image"]["shape"] == list(CT_SHAPE)
    assert d["image"]["spacing"] == list(CT_SPACING)
    # wreck the nodules, then import
    w.table.click_row(0)
    w.delete_selected()
    w.set_threshold(0.1)
    assert not w.nodules.equals(before)
    w.import_nodules(paths[1])
    assert w.nodules.equals(before)
    assert w.nodule_layer is layer and w.threshold_slider.value() == 50
    assert sorted(set(layer.features["id"])) == sorted(before.ids[before.visible_mask()].tolist())
    # a file made for another image is refused with a message
    other = dict(json.loads(Path(paths[1]).read_text()))
    other["image"]["shape"] = [30, 64, 64]
    Path(tmp_path / "other.json").write_text(json.dumps(other))
    w.import_nodules(tmp_path / "other.json")
    assert "belongs to another image" in notes["error"][-1]
    assert w.nodules.equals(before)
    # a failed export reports and leaves the old file alone
    w.export_nodules(tmp_path / "missing-folder" / "x.csv")
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
    viewer.add_image(scan.array, name="lung", metadata={"seriesuid": "1.2.3", "modality": "CT"},
                     **scan.napari_kwargs())
    data, kw, kind = detections_to_layer_data(det, scan, 0.5)[0]
    viewer.add_layer(napari.layers.Layer.create(data, kw, kind))
    w = W.NoduleWidget(viewer, predictor_factory=Factory())
    viewer.window.add_dock_widget(w)
    assert w.nodule_layer is viewer.layers[1] and w.nodule_layer.metadata["image_layer"] == "lung"
    assert w.table.ids == [1, 3] and w.nodules.model_info == MODEL
    w.table.click_row(0)
    w.flip_selected()
    assert w.nodules.label[0] == "benign"


@pytest.mark.slow
def test_real_predictor_on_the_bundled_cube(make_napari_viewer, qtbot, notes):
    """The bundled Res-MTNet on the bundled LUNA16 cube, through the reader's layer."""
    try:
        from napari_resmtnet._sample_data import sample_cube
        from napari_resmtnet.inference import Predictor
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
    w.detect_button.click()
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
        from napari_resmtnet.inference import Predictor
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
    predictor = Predictor("CT", model=net, info={"spacing_mm": 1.0, "threshold": 0.4, "name": "tiny",
                                                "version": "test", "sha256": "0" * 64},
                          device="cpu", window=64, overlap=8)
    viewer = make_napari_viewer()
    for data, kw, kind in layer_data:
        viewer.add_layer(napari.layers.Layer.create(data, kw, kind))
    w = W.NoduleWidget(viewer, predictor_factory=lambda modality, device: predictor)
    viewer.window.add_dock_widget(w)
    assert w.modality_for(viewer.layers[0]) == "CT"
    w.detect_button.click()
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
    w.detect_button.click()
    w.cancel()
    qtbot.waitUntil(lambda: not w.is_running, timeout=60000)
    assert notes["error"] == [] and "cancelled" in w.status_label.text().lower()
    assert len(viewer.layers) == n


def test_mouse_drag_and_draw_go_through_napari_events(make_napari_viewer, qtbot, notes):
    """Edits made with napari's own mouse tools (select-drag, rectangle tool) reach the table."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import (
        mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks,
    )

    f = Factory()
    viewer, w = make(make_napari_viewer, f)
    layer = detect(qtbot, w)
    w.table.click_row(w.table.ids.index(1))  # slice 6, select mode
    assert layer.mode == "select"
    layer.selected_data = set()

    def gesture(start, end):
        kw = {"dims_displayed": [1, 2]}
        mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=start, **kw))
        for p in (start, end):
            mouse_move_callbacks(layer, read_only_mouse_event(type="mouse_move", is_dragging=True,
                                                              position=p, **kw))
        mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", is_dragging=True,
                                                             position=end, **kw))

    j = [i for i, (nid, k) in enumerate(zip(layer.features["id"], layer.features["slice"]))
         if nid == 1 and k == 6][0]
    centre = layer.data_to_world(layer.data[j].mean(0))
    gesture(tuple(centre), tuple(centre + np.array([0, 3 * CT_SPACING[1], 0])))
    _wait_sync(qtbot, w)
    t = w.nodules
    np.testing.assert_allclose(t.boxes[t.index_of(1)], [4.2, 13, 12, 8.6, 23, 24], atol=1e-6)
    assert len(layer.data) == 5  # regenerated: still one rectangle per slice

    layer.mode = "add_rectangle"
    a = layer.data_to_world(np.array([6, 40, 5]))
    b = layer.data_to_world(np.array([6, 48, 13]))
    gesture(tuple(a), tuple(b))
    _wait_sync(qtbot, w)
    t = w.nodules
    assert len(t) == 4 and t.source[t.index_of(4)] == "user"
    np.testing.assert_allclose(t.boxes[t.index_of(4)][[1, 2, 4, 5]], [40, 5, 48, 13], atol=1e-6)
    assert 6 in t.slices(t.index_of(4))
    assert notes["error"] == []
