"""Nodules <-> napari layer data: pure functions, no Qt."""

import numpy as np
import pytest

from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import FEATURE_COLUMNS, LABEL_RGB, NoduleTable, box_slices, image_identity
from napari_resmtnet.annotations.table import reconcile
from napari_resmtnet.layers import (
    detections_to_layer_data,
    layer_to_nodules,
    scan_for_layer,
    table_to_layer_data,
    table_to_shapes,
)
from napari_resmtnet.scan import Scan


def ct_scan(shape=(20, 64, 64), spacing=(2.0, 0.7, 0.7), origin=(-100.0, 10.0, -50.0)):
    return Scan(np.zeros(shape, np.int16), spacing, origin, np.eye(3), "CT", path="/x/ct.mhd", seriesuid="1.2.3")


def cxr_scan():
    return Scan(np.zeros((100, 120), np.uint16), (0.5, 0.5), (0.0, 0.0), np.eye(2), "CXR", seriesuid="cxr-1")


def ct_detections(scan):
    boxes = [
        [4.2, 10, 12, 8.6, 20, 24],  # slices 5..8
        [10.0, 30, 30, 12.0, 36, 40],  # slices 10, 11
        [15.1, 40, 40, 15.3, 44, 44],
    ]  # thinner than a slice: nearest slice 15
    return Detections(
        boxes,
        [0.9, 0.3, 0.7],
        [0.87, 0.2, 0.6],
        Detections.geometry_of(scan),
        {"model_info": {"name": "resmtnet", "version": "1", "sha256": "ab"}},
    )


def test_box_slices_half_open_and_clipped():
    assert list(box_slices([4.2, 0, 0, 8.6, 1, 1], 20)) == [5, 6, 7, 8]
    assert list(box_slices([10.0, 0, 0, 12.0, 1, 1], 20)) == [10, 11]
    assert list(box_slices([15.1, 0, 0, 15.3, 1, 1], 20)) == [15]
    assert list(box_slices([-3, 0, 0, 1.5, 1, 1], 20)) == [0, 1]
    assert list(box_slices([18.5, 0, 0, 25, 1, 1], 20)) == [19]


def test_ct_layer_has_one_rectangle_per_slice_with_features():
    scan = ct_scan()
    det = ct_detections(scan)
    ((data, kw, kind),) = detections_to_layer_data(det, scan, threshold=0.5)
    assert kind == "shapes"
    # nodule 1 on 4 slices, nodule 3 on one; nodule 2 (p=0.3) hidden
    assert len(data) == 5
    feats = {k: v.tolist() for k, v in kw["features"].items()}
    assert set(FEATURE_COLUMNS) <= set(feats)
    assert feats["id"] == [1, 1, 1, 1, 3]
    assert feats["slice"] == [5, 6, 7, 8, 15]
    assert feats["label"][0] == "malignant" and feats["source"][0] == "model"
    assert feats["reviewed"] == [False] * 5
    np.testing.assert_allclose(data[0][:, 0], 5)
    np.testing.assert_allclose(data[0][:, 1:].min(0), [10, 12])
    np.testing.assert_allclose(data[0][:, 1:].max(0), [20, 24])
    # same geometry as the image
    assert kw["scale"] == scan.spacing and tuple(kw["translate"]) == scan.origin
    # colour by label, opacity by confidence
    np.testing.assert_allclose(kw["edge_color"][0][:3], LABEL_RGB["malignant"])
    assert kw["edge_color"][0][3] > kw["edge_color"][4][3]  # 0.9 more opaque than 0.7
    # box text: label and detection probability (malignancy is in the table), review mark
    assert kw["text"]["string"] == "{label} {probability:.2f}{mark}"
    assert feats["mark"] == [""] * 5 and feats["review"] == ["unreviewed"] * 5
    # every candidate is kept in the table
    table = kw["metadata"]["nodules"]
    assert len(table) == 3 and table.model_info["sha256"] == "ab"


def test_threshold_filters_without_losing_candidates():
    scan = ct_scan()
    table = NoduleTable.from_detections(ct_detections(scan), image_identity(scan), threshold=0.5)
    assert len(table_to_shapes(table, 0.2)[0]) == 4 + 2 + 1
    assert len(table_to_shapes(table, 0.8)[0]) == 4
    assert len(table_to_shapes(table, 0.95)[0]) == 0
    t2, _ = table.added([3, 1, 1, 4, 5, 5], label="malignant")
    assert len(table_to_shapes(t2, 0.99)[0]) == 1  # the user's nodule is always shown


def test_cxr_layer_and_round_trip():
    scan = cxr_scan()
    det = Detections([[10, 20, 30, 40], [50, 50, 60, 64]], [0.8, 0.6], [0.1, 0.9], Detections.geometry_of(scan))
    ((data, kw, _),) = detections_to_layer_data(det, scan, threshold=0.5)
    assert len(data) == 2 and data[0].shape == (4, 2)
    assert kw["features"]["slice"].tolist() == [-1, -1]
    back = layer_to_nodules((data, kw, "shapes"))
    np.testing.assert_array_equal(back.boxes, det.boxes)
    np.testing.assert_array_equal(back.probability, det.probability)
    assert list(back.label) == ["benign", "malignant"]


def test_layer_to_nodules_from_plain_shapes_groups_slices_by_id():
    # a shapes layer without our table: features give ids, slices are grouped
    rects = [np.array([[z, 10, 10], [z, 10, 20], [z, 18, 20], [z, 18, 10]], float) for z in (3, 4, 5)]
    rects.append(np.array([[9, 30, 30], [9, 30, 34], [9, 34, 34], [9, 34, 30]], float))
    feats = {"id": [7, 7, 7, 8], "label": ["malignant"] * 3 + ["benign"], "probability": [0.9] * 3 + [0.4]}
    t = layer_to_nodules((rects, {"features": feats, "scale": (2, 1, 1), "translate": (0, 0, 0)}, "shapes"))
    assert t.ids.tolist() == [7, 8]
    assert list(t.slices(0)) == [3, 4, 5] and list(t.slices(1)) == [9]
    np.testing.assert_allclose(t.boxes[0, [1, 2, 4, 5]], [10, 10, 18, 20])
    assert list(t.label) == ["malignant", "benign"] and t.probability.tolist() == [0.9, 0.4]
    assert t.spacing.tolist() == [2, 1, 1]


def test_layer_to_nodules_points():
    pts = np.array([[5.0, 20.0, 30.0]])
    t = layer_to_nodules((pts, {"size": np.array([6.0]), "scale": (1, 1, 1)}, "points"))
    np.testing.assert_allclose(t.boxes[0], [2, 17, 27, 8, 23, 33])


def test_reconcile_move_on_one_slice_updates_3d_box():
    scan = ct_scan()
    table = NoduleTable.from_detections(ct_detections(scan), image_identity(scan), threshold=0.5)
    data, feats, _, _ = table_to_shapes(table)
    data[1] = data[1] + np.array([0, 3.0, -2.0])  # move slice-6 rectangle of nodule 1
    new, changed, added = reconcile(table, data, feats)
    assert changed and not added
    np.testing.assert_allclose(new.boxes[0], [4.2, 13, 10, 8.6, 23, 22])  # z kept
    np.testing.assert_array_equal(table.boxes[0], [4.2, 10, 12, 8.6, 20, 24])  # original untouched
    # regenerated shapes all follow the edit
    d2, f2, _, _ = table_to_shapes(new)
    for s, nid in zip(d2, f2["id"]):
        if nid == 1:
            np.testing.assert_allclose(s[:, 1:].min(0), [13, 10])


def test_reconcile_resize_delete_and_add():
    scan = ct_scan()
    table = NoduleTable.from_detections(ct_detections(scan), image_identity(scan), threshold=0.5)
    data, feats, _, _ = table_to_shapes(table)
    # resize nodule 3
    data[4] = np.array([[15, 40, 40], [15, 40, 50], [15, 48, 50], [15, 48, 40]], float)
    new, changed, _ = reconcile(table, data, feats)
    np.testing.assert_allclose(new.boxes[2, [1, 2, 4, 5]], [40, 40, 48, 50])
    # delete one slice of nodule 1 -> nodule 1 gone
    keep = [i for i in range(len(data)) if i != 2]
    d2 = [data[i] for i in keep]
    f2 = {k: [v[i] for i in keep] for k, v in feats.items()}
    new, changed, _ = reconcile(table, d2, f2, removed_ids=[1])
    assert changed and 1 not in new and len(new) == 2
    # add a rectangle drawn on slice 12 (no id)
    d3 = list(data) + [np.array([[12, 50, 50], [12, 50, 57], [12, 57, 57], [12, 57, 50]], float)]
    f3 = {k: list(v) + [-1 if k == "id" else None] for k, v in feats.items()}
    new, changed, added = reconcile(table, d3, f3, new_label="malignant")
    assert added == [4]
    i = new.index_of(4)
    assert new.source[i] == "user" and new.probability[i] == 1.0 and new.label[i] == "malignant"
    # z extent ~ in-plane size: 7 vox * 0.7 mm = 4.9 mm -> 2.45 slices of 2 mm, centred on 12
    assert new.center_slice(i) == 12 and 12 in new.slices(i)
    # nothing changed -> unchanged
    data, feats, _, _ = table_to_shapes(table)
    same, changed, _ = reconcile(table, data, feats)
    assert not changed and same.equals(table)


def test_table_edits_flip_reviewed_and_bad_label():
    scan = ct_scan()
    table = NoduleTable.from_detections(ct_detections(scan), image_identity(scan))
    f = table.flipped([1])
    assert f.label[0] == "benign" and table.label[0] == "malignant"
    r = table.with_reviewed([1, 3])
    assert r.reviewed.tolist() == [True, False, True]
    assert r.with_reviewed([1, 3]).reviewed.tolist() == [False, False, False]  # toggles
    with pytest.raises(ValueError, match="label must be one of"):
        table.with_label([1], "maybe")
    with pytest.raises(KeyError):
        table.flipped([99])


def test_scan_for_layer_from_scale_translate_and_metadata():
    class L:
        name = "img"
        data = np.zeros((5, 8, 9), np.int16)
        scale = (2.5, 0.7, 0.7)
        translate = (-10.0, 1.0, 2.0)
        metadata = {}
        rgb = False
        multiscale = False

        class affine:
            affine_matrix = np.eye(4)

    s = scan_for_layer(L)
    assert s.modality == "CT" and s.spacing == (2.5, 0.7, 0.7) and s.origin == (-10, 1, 2)
    L.metadata = {
        "scan": {"spacing": (1, 2, 3), "origin": (4, 5, 6), "direction": np.eye(3), "seriesuid": "abc", "path": "/p"},
        "modality": "CT",
    }
    s = scan_for_layer(L)
    assert s.spacing == (1, 2, 3) and s.seriesuid == "abc" and s.path == "/p"
    with pytest.raises(ValueError, match="CXR model needs a 2D image"):
        scan_for_layer(L, modality="CXR")
    L.data = np.zeros((2, 3, 4, 5))
    with pytest.raises(ValueError, match="expected a 2D radiograph or a 3D CT"):
        scan_for_layer(L)


def test_layer_data_builds_a_napari_layer():
    napari = pytest.importorskip("napari")
    scan = ct_scan()
    data, kw, kind = detections_to_layer_data(ct_detections(scan), scan, threshold=0.5)[0]
    layer = napari.layers.Layer.create(data, kw, kind)
    assert len(layer.data) == 5
    assert layer.features["id"].tolist() == [1, 1, 1, 1, 3]
    t = layer_to_nodules(layer)
    assert t.equals(kw["metadata"]["nodules"])
    assert table_to_layer_data(t)[0][0].shape == (4, 3)


def test_reconcile_ignores_float32_rounding_of_napari_vertices():
    scan = Scan(np.zeros((400, 512, 512), np.int16), (0.6, 0.7, 0.7), (0, 0, 0), np.eye(3), "CT")
    det = Detections([[301.3, 400.1, 450.7, 309.9, 411.3, 461.9]], [0.9], [0.8], Detections.geometry_of(scan))
    table = NoduleTable.from_detections(det, image_identity(scan))
    data, feats, _, _ = table_to_shapes(table)
    as_napari = [d.astype(np.float32) for d in data]
    same, changed, _ = reconcile(table, as_napari, feats)
    assert not changed and same.equals(table)
