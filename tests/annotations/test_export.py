"""CSV + JSON export/import of nodule tables, atomic writes, and the napari writer. No Qt."""

import csv
import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from napari_resmtnet import files
from napari_resmtnet.annotations import export as E
from napari_resmtnet._writer import write_nodules
from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import NoduleTable, image_identity
from napari_resmtnet.layers import detections_to_layer_data
from napari_resmtnet.scan import Scan

MODEL = {"name": "resmtnet", "version": "0.1.0", "sha256": "0123abcd"}


def ct_table():
    scan = Scan(
        np.zeros((20, 64, 64), np.int16),
        (2.0, 0.7, 0.7),
        (-100.0, 10.0, -50.0),
        np.eye(3),
        "CT",
        path="/data/ct.mhd",
        seriesuid="1.2.840.1",
    )
    det = Detections(
        [[4.2, 10, 12, 8.6, 20, 24], [10.0, 30, 30, 12.0, 36, 40], [15.1, 40, 40, 15.3, 44, 44]],
        [0.9, 0.3, 0.7],
        [0.87, 0.2, 0.6],
        Detections.geometry_of(scan),
    )
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.5, model_info=MODEL)
    t = t.flipped([3]).with_reviewed([1], True)
    t, _ = t.added([12.5, 50, 50, 13.5, 55.5, 56.25], label="malignant")
    return scan, t


def cxr_table():
    scan = Scan(np.zeros((100, 120), np.uint16), (0.5, 0.25), (3.0, -7.0), np.eye(2), "CXR", seriesuid="cxr-1")
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
    np.testing.assert_allclose(
        [float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])], [-50 + 0.7 * cx, 10 + 0.7 * cy, -100 + 2 * cz]
    )
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

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
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

    monkeypatch.setattr(files.os, "replace", replace_once)
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


@pytest.mark.parametrize(
    "change",
    [
        lambda n: n.update(id=None),
        lambda n: n.update(box_voxel=5),
        lambda n: n.update(box_voxel=["a", 1, 2, 3, 4, 5]),
        lambda n: n.update(probability="xyz"),
        lambda n: n.update(malignancy=float("nan")),
    ],
)
def test_json_with_bad_values_is_a_message_not_a_traceback(tmp_path, change):
    scan, t = ct_table()
    _, json_path = E.export_nodules(tmp_path / "out.json", t)
    d = json.loads(open(json_path).read())
    change(d["nodules"][0])
    with open(json_path, "w") as f:
        json.dump(d, f)
    with pytest.raises(E.NoduleFileError, match="nodule 1"):
        E.read_nodules_json(json_path)


@pytest.mark.parametrize(
    "body",
    [
        b"seriesuid,coordX,coordY,coordZ,diameter_mm,malignancy\n1.2.840.1,1,2,3,5,abc\n",
        b"seriesuid,coordX,coordY,coordZ,diameter_mm,probability\n1.2.840.1,1,2,3,5,nan\n",
        b"seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.840.1,1,2,3,5\xff\n",
    ],
)
def test_csv_with_bad_values_or_bytes_is_a_message(tmp_path, body):
    scan, t = ct_table()
    p = tmp_path / "bad.csv"
    p.write_bytes(body)
    with pytest.raises(E.NoduleFileError, match="bad.csv"):
        E.read_nodules_csv(p, image_identity(scan))


# --- output safety -----------------------------------------------------------------------------


def test_csv_formula_cells_are_neutralised_and_read_back_intact(tmp_path):
    scan, t = ct_table()
    evil = "=cmd|' -C calc'!A0"
    scan.seriesuid = evil
    t.image = image_identity(scan)
    csv_path, _ = E.export_nodules(tmp_path / "x.csv", t)
    rows = list(csv.reader(open(csv_path, newline="")))
    assert all(r[0] == "'" + evil for r in rows[1:])
    for r in rows:  # no cell a spreadsheet would run
        assert not any(c.startswith(("=", "+", "@", "\t", "\r")) for c in r)
    back = E.import_nodules(csv_path, image_identity(scan))
    assert len(back) == 3 and back.image["seriesuid"] == evil
    # the escape is exactly reversible, also for text that starts with the escape itself
    for text in ["=1+1", "+x", "-2", "@a", "\tz", "\rz", "'=x", "''", "'a", "a=b", "", "-"]:
        assert E.read_cell(E.safe_cell(text)) == text


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda d: (os.mkfifo(d / "out.csv"), d / "out.csv")[1], "FIFO"),
        (lambda d: Path("/dev/null"), "device"),
        (lambda d: (os.symlink("/dev/full", d / "out.csv"), d / "out.csv")[1], "link to a device"),
        (lambda d: ((d / "out.csv").mkdir(), d / "out.csv")[1], "folder"),
    ],
)
def test_export_refuses_non_regular_targets(tmp_path, make, kind):
    _, t = ct_table()
    target = make(tmp_path)
    with pytest.raises(E.NoduleFileError, match=kind):
        E.atomic_write_texts({target: E.csv_text(t)})
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    if target == Path("/dev/null"):
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_export_through_a_link_to_a_regular_file_keeps_the_link(tmp_path):
    _, t = ct_table()
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    os.symlink(real, link)
    E.atomic_write_texts({link: E.csv_text(t)})
    assert os.path.islink(link) and real.read_text().startswith("seriesuid,")


def test_interrupted_write_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch):
    _, t = ct_table()
    target = tmp_path / "out.csv"
    target.write_text("previous\n")

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        E.atomic_write_texts({target: E.csv_text(t)})
    assert target.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["out.csv"]


# --- strict import -----------------------------------------------------------------------------


def _exported(tmp_path, change=None, table=None):
    scan, t = ct_table() if table is None else table
    _, json_path = E.export_nodules(tmp_path / "n.json", t)
    if change is not None:
        d = json.loads(open(json_path).read())
        change(d)
        with open(json_path, "w") as f:
            f.write(json.dumps(d) if not isinstance(d, str) else d)
    return scan, json_path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(nodules=None), r"nodules must be a list"),
        (lambda d: d.update(image="1.2.3"), r"image: must be an object"),
        (lambda d: d.update(threshold=float("nan")), r"threshold must be a finite number"),
        (lambda d: d["nodules"][0].update(reviewed="false"), r"nodule \d+: reviewed must be true or false"),
        (lambda d: d["nodules"][0].update(box_voxel=[9, 10, 12, 4, 20, 24]), r"negative size"),
        (lambda d: d["nodules"][0].update(probability=1.5), r"probability must be in \[0, 1\]"),
        (lambda d: d["nodules"][0].update(id=True), r"id must be a whole number"),
        (lambda d: d["nodules"][1].update(id=d["nodules"][0]["id"]), r"used twice"),
        (lambda d: d["image"].update(shape=[20, 64, "64"]), r"shape must be"),
        (lambda d: d.update(format_version=99), r"format_version 99"),
        (lambda d: d.update(model={"name": [[[[[1]]]]]}), r"model field"),
        (lambda d: d.update(model={"auc": float("inf")}), r"model field"),
    ],
)
def test_json_schema_refusals_are_one_line(tmp_path, change, message):
    scan, p = _exported(tmp_path, change)
    with pytest.raises(E.NoduleFileError, match=message) as err:
        E.import_nodules(p, image_identity(scan))
    assert "\n" not in str(err.value) and str(p) in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format": "resmtnet-nodules", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", r"nested too deeply|not valid"),
        ('{"format": "resmtnet-nodules", "threshold": 1' + "0" * 400 + "}", r"."),
        ('{"format": "resmtnet-nodules", "threshold": 1e400, "image": {}}', r"."),
        ("\ufeff" + '{"format": "other"}', r"not a nodule file"),
    ],
)
def test_hostile_json_is_one_line(tmp_path, text, message):
    scan, _ = ct_table()
    p = tmp_path / "h.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(E.NoduleFileError, match=message) as err:
        E.import_nodules(p, image_identity(scan))
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_json_of_another_image_without_seriesuid_is_refused_by_its_origin(tmp_path):
    def move(d):
        del d["image"]["seriesuid"]
        d["image"]["origin"][2] += 500.0

    scan, p = _exported(tmp_path, move)
    with pytest.raises(E.NoduleFileError, match=r"belongs to another image \(origin"):
        E.import_nodules(p, image_identity(scan))


def test_excel_csv_with_bom_is_checked_like_any_csv(tmp_path):
    scan, t = ct_table()
    csv_path, _ = E.export_nodules(tmp_path / "x.csv", t)
    text = open(csv_path, encoding="utf-8").read()
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert len(E.import_nodules(bom, image_identity(scan))) == 3
    other = image_identity(scan)
    other["seriesuid"] = "9.9.9"
    with pytest.raises(E.NoduleFileError, match="another image"):
        E.import_nodules(bom, other)


@pytest.mark.parametrize(
    "row, message",
    [
        ("1.2.840.1,-30,25,-85,5,,,,\u00b2,,", r"id must be a whole number"),
        ("1.2.840.1,-30,25,-85,-5,,,,,,", r"diameter_mm must be more than 0"),
        ("1.2.840.1,-30,25,-85,5,,,,,,maybe", r"reviewed must be true or false"),
        ("1.2.840.1,-30,25,-85,5,,,purple,,,", r"label must be one of"),
        ("1.2.840.1,-30,25,1e400,5,,,,,,", r"coordZ must be a finite number"),
        ("1.2.840.1,-30,25,415,5,,,,,,", r"the nodule at .* lies outside this image"),
        (",-30,25,,5,,,,,,", r"coordZ is empty"),
    ],
)
def test_csv_schema_refusals_name_the_line(tmp_path, row, message):
    scan, _ = ct_table()
    p = tmp_path / "r.csv"
    p.write_text(",".join(E.CSV_COLUMNS) + "\n" + row + "\n")
    with pytest.raises(E.NoduleFileError, match=r"r\.csv line 2: " + message):
        E.import_nodules(p, image_identity(scan))


@pytest.mark.slow  # a subprocess or a large input: several seconds, not in `make test-fast`
def test_csv_import_is_linear_100000_rows(tmp_path, monkeypatch):
    scan, _ = ct_table()
    p = tmp_path / "many.csv"
    row = "1.2.840.1,-30.0,25.0,-85.0,3.0,0.9,0.2,benign,,model,false\n"
    p.write_text(",".join(E.CSV_COLUMNS) + "\n" + row * 100_000)
    # linear: one vectorised conversion for all rows, no table copied per row
    calls = []
    real = E.B.world_to_voxel_boxes
    monkeypatch.setattr(E.B, "world_to_voxel_boxes", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(NoduleTable, "added", lambda *a, **k: pytest.fail("per-row copy"))
    t0 = time.perf_counter()
    t = E.import_nodules(p, image_identity(scan))
    elapsed = time.perf_counter() - t0
    assert len(t) == 100_000 and t.ids.tolist()[:3] == [1, 2, 3] and len(set(t.ids.tolist())) == 100_000
    assert calls == [1]
    assert elapsed < 120, f"{elapsed:.1f} s"
    p.write_text(",".join(E.CSV_COLUMNS) + "\n" + row * (E.MAX_NODULES + 1))
    with pytest.raises(E.NoduleFileError, match="more than 100000 rows"):
        E.import_nodules(p, image_identity(scan))


def test_import_from_a_fifo_does_not_block(tmp_path):
    scan, _ = ct_table()
    p = tmp_path / "n.json"
    os.mkfifo(p)
    with pytest.raises(E.NoduleFileError, match="FIFO"):
        E.import_nodules(p, image_identity(scan))


def test_json_keeps_the_review_state_and_old_files_still_import(tmp_path):
    """Rejected nodules stay rejected through a JSON file (and the autosave, which is one);
    a file from before review states (only ``reviewed``) reads as accepted / unreviewed."""
    scan, t = ct_table()
    t = t.with_review([2], "rejected")
    _, json_path = E.export_nodules(tmp_path / "out.json", t)
    d = json.loads(open(json_path).read())
    states = {n["id"]: n["review"] for n in d["nodules"] + d["hidden"]}
    assert states[1] == "accepted" and states[2] == "rejected" and states[3] == "unreviewed"
    back = E.import_nodules(json_path, image_identity(scan))
    assert back.equals(t) and list(back.review) == list(t.review)
    for n in d["nodules"] + d["hidden"]:
        del n["review"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    back = E.import_nodules(old, image_identity(scan))
    assert dict(zip(back.ids, back.review))[1] == "accepted" and dict(zip(back.ids, back.review))[2] == "unreviewed"
    d["nodules"][0]["review"] = "rejected"  # contradicts reviewed=true
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(E.NoduleFileError, match="contradicts"):
        E.import_nodules(bad, image_identity(scan))
