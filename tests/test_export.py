"""CSV + JSON export/import of nodule tables, atomic writes, and the napari writer. No Qt."""
import csv
import json
import os

import numpy as np
import pytest

from napari_resmtnet import export as E
from napari_resmtnet._writer import write_nodules
from napari_resmtnet.detections import Detections
from napari_resmtnet.layers import NoduleTable, detections_to_layer_data, image_identity
from napari_resmtnet.scan import Scan

MODEL = {"name": "resmtnet", "version": "0.1.0", "sha256": "0123abcd"}


def ct_table():
    scan = Scan(np.zeros((20, 64, 64), np.int16), (2.0, 0.7, 0.7), (-100.0, 10.0, -50.0),
                np.eye(3), "CT", path="/data/ct.mhd", seriesuid="1.2.840.1")
    det = Detections([[4.2, 10, 12, 8.6, 20, 24], [10.0, 30, 30, 12.0, 36, 40],
                      [15.1, 40, 40, 15.3, 44, 44]],
                     [0.9, 0.3, 0.7], [0.87, 0.2, 0.6], Detections.geometry_of(scan))
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.5, model_info=MODEL)
    t = t.flipped([3]).with_reviewed([1], True)
    t, _ = t.added([12.5, 50, 50, 13.5, 55.5, 56.25], label="malignant")
    return scan, t


def cxr_table():
    scan = Scan(np.zeros((100, 120), np.uint16), (0.5, 0.25), (3.0, -7.0), np.eye(2), "CXR",
                seriesuid="cxr-1")
    det = Detections([[10, 20, 30, 40]], [0.8], [0.1], Detections.geometry_of(scan))
    return scan, NoduleTable.from_detections(det, image_identity(scan), threshold=0.5)


def test_csv_columns_world_xyz_and_only_shown_nodules(tmp_path):
    scan, t = ct_table()
    csv_path, json_path = E.export_nodules(tmp_path / "out.csv", t)
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == E.CSV_COLUMNS
    assert [int(r["id"]) for r in rows] == [1, 3, 4]  # nodule 2 (p=0.3) is below the threshold
    r = rows[0]
    assert r["seriesuid"] == "1.2.840.1" and r["label"] == "malignant" and r["reviewed"] == "true"
    # world centre: origin + spacing * voxel centre, written x, y, z
    cz, cy, cx = (4.2 + 8.6) / 2, 15, 18
    np.testing.assert_allclose([float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])],
                               [-50 + 0.7 * cx, 10 + 0.7 * cy, -100 + 2 * cz])
    np.testing.assert_allclose(float(r["diameter_mm"]), np.mean([4.4 * 2, 10 * 0.7, 12 * 0.7]))
    assert rows[1]["label"] == "benign" and rows[2]["source"] == "user"
    assert os.path.exists(json_path)


def test_json_has_boxes_identity_model_and_round_trips_exactly(tmp_path):
    scan, t = ct_table()
    _, json_path = E.export_nodules(tmp_path / "out.json", t, exported_at="2024-01-01T00:00:00+00:00")
    d = json.loads(open(json_path).read())
    assert d["format"] == "resmtnet-nodules" and d["exported_at"].startswith("2024")
    assert d["model"] == MODEL
    assert d["image"]["seriesuid"] == "1.2.840.1" and d["image"]["shape"] == [20, 64, 64]
    assert d["image"]["spacing"] == [2.0, 0.7, 0.7] and d["image"]["direction"] == np.eye(3).tolist()
    n1 = d["nodules"][0]
    assert n1["box_voxel"] == [4.2, 10, 12, 8.6, 20, 24] and n1["slices"] == [5, 8]
    assert len(n1["center_world_xyz"]) == 3 and len(n1["size_mm_xyz"]) == 3
    assert {"id", "probability", "malignancy", "label", "diameter_mm", "source", "reviewed"} <= set(n1)
    assert [h["id"] for h in d["hidden"]] == [2]
    back = E.import_nodules(json_path, image_identity(scan))
    assert back.equals(t)


def test_cxr_csv_has_empty_coord_z_and_round_trip(tmp_path):
    scan, t = cxr_table()
    csv_path, json_path = E.export_nodules(tmp_path / "cxr", t)
    row = next(csv.DictReader(open(csv_path)))
    assert row["coordZ"] == ""
    np.testing.assert_allclose([float(row["coordX"]), float(row["coordY"])], [-7 + 0.25 * 30, 3 + 0.5 * 20])
    assert E.import_nodules(json_path, image_identity(scan)).equals(t)
    # the CSV re-imports too (cubes of diameter_mm around the centre)
    back = E.import_nodules(csv_path, image_identity(scan))
    np.testing.assert_allclose(back.centers_world(), t.centers_world())
    assert back.ids.tolist() == [1] and back.label.tolist() == ["benign"]


def test_import_refuses_another_image(tmp_path):
    scan, t = ct_table()
    _, json_path = E.export_nodules(tmp_path / "a", t)
    other = image_identity(scan)
    other["seriesuid"] = "9.9.9"
    with pytest.raises(E.NoduleFileError, match="belongs to another image.*seriesuid"):
        E.import_nodules(json_path, other)
    other = image_identity(scan)
    other["shape"] = [21, 64, 64]
    with pytest.raises(E.NoduleFileError, match="shape"):
        E.import_nodules(json_path, other)
    other = image_identity(scan)
    other["spacing"] = [2.5, 0.7, 0.7]
    with pytest.raises(E.NoduleFileError, match="spacing"):
        E.import_nodules(json_path, other)
    csv_path = tmp_path / "a.csv"
    other = image_identity(scan)
    other["seriesuid"] = "9.9.9"
    with pytest.raises(E.NoduleFileError, match="another image"):
        E.import_nodules(csv_path, other)


def test_import_bad_files_give_one_line_messages(tmp_path):
    scan, _ = ct_table()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(E.NoduleFileError, match="not valid JSON"):
        E.import_nodules(bad, image_identity(scan))
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(E.NoduleFileError, match="not a nodule file"):
        E.import_nodules(bad, image_identity(scan))
    with pytest.raises(E.NoduleFileError, match="cannot read"):
        E.import_nodules(tmp_path / "missing.json", image_identity(scan))


def test_failed_write_leaves_previous_files_intact(tmp_path, monkeypatch):
    scan, t = ct_table()
    paths = E.export_nodules(tmp_path / "n.csv", t)
    before = {p: open(p).read() for p in paths}
    t2 = t.removed([1])

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E.os, "fsync", broken_fsync)
    with pytest.raises(E.NoduleFileError, match=r"could not write .*n\.(csv|json): No space left"):
        E.export_nodules(tmp_path / "n.csv", t2)
    monkeypatch.undo()
    assert {p: open(p).read() for p in paths} == before
    assert sorted(os.listdir(tmp_path)) == ["n.csv", "n.json"]  # no temp files left behind
    # a failing replace of the second file also leaves no temp file
    real_replace = os.replace
    calls = []

    def replace_once(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        return real_replace(a, b)

    monkeypatch.setattr(E.os, "replace", replace_once)
    with pytest.raises(E.NoduleFileError, match="Permission denied"):
        E.export_nodules(tmp_path / "n.csv", t2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["n.csv", "n.json"]
    assert open(paths[1]).read() == before[paths[1]]


def test_write_into_missing_folder_is_a_clear_error(tmp_path):
    _, t = ct_table()
    with pytest.raises(E.NoduleFileError, match="does not exist"):
        E.export_nodules(tmp_path / "nope" / "n.csv", t)


def test_napari_writer_from_layer_data(tmp_path):
    scan, t = ct_table()
    det = t.to_detections()
    layer_data = detections_to_layer_data(det, scan, threshold=0.5, model_info=MODEL)
    out = write_nodules(str(tmp_path / "w.csv"), layer_data)
    assert [os.path.basename(p) for p in out] == ["w.csv", "w.json"]
    d = json.loads(open(out[1]).read())
    assert d["model"] == MODEL and len(d["nodules"]) == 3
    # a plain shapes layer (no table) is written as well
    rect = np.array([[10, 10], [10, 20], [20, 20], [20, 10]], float)
    out = write_nodules(str(tmp_path / "plain.json"), [([rect], {"name": "s", "scale": (0.5, 0.5)}, "shapes")])
    d = json.loads(open(out[1]).read())
    assert d["nodules"][0]["box_voxel"] == [10, 10, 20, 20] and d["nodules"][0]["source"] == "user"


@pytest.mark.parametrize("change", [
    lambda n: n.update(id=None),
    lambda n: n.update(box_voxel=5),
    lambda n: n.update(box_voxel=["a", 1, 2, 3, 4, 5]),
    lambda n: n.update(probability="xyz"),
    lambda n: n.update(malignancy=float("nan")),
])
def test_json_with_bad_values_is_a_message_not_a_traceback(tmp_path, change):
    scan, t = ct_table()
    _, json_path = E.export_nodules(tmp_path / "out.json", t)
    d = json.loads(open(json_path).read())
    change(d["nodules"][0])
    with open(json_path, "w") as f:
        json.dump(d, f)
    with pytest.raises(E.NoduleFileError, match="nodule 1"):
        E.read_nodules_json(json_path)


@pytest.mark.parametrize("body", [
    b"seriesuid,coordX,coordY,coordZ,diameter_mm,malignancy\n1.2.840.1,1,2,3,5,abc\n",
    b"seriesuid,coordX,coordY,coordZ,diameter_mm,probability\n1.2.840.1,1,2,3,5,nan\n",
    b"seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.840.1,1,2,3,5\xff\n",
])
def test_csv_with_bad_values_or_bytes_is_a_message(tmp_path, body):
    scan, t = ct_table()
    p = tmp_path / "bad.csv"
    p.write_bytes(body)
    with pytest.raises(E.NoduleFileError, match="bad.csv"):
        E.read_nodules_csv(p, image_identity(scan))
