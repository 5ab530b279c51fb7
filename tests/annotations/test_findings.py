"""Per-nodule findings (texture, probabilities, caliper sizes, volume, Lung-RADS) through the
nodule table, the reader's texture override, layer features, CSV/JSON export and import,
autosave, re-detection merging and the report. No Qt."""

import csv
import json
import math

import numpy as np
import pytest

from napari_resmtnet.annotations import autosave
from napari_resmtnet.annotations import export as E
from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import (
    FEATURE_COLUMNS,
    NoduleTable,
    clean_findings,
    grade_text,
    image_identity,
    texture_text,
)
from napari_resmtnet.annotations.table import reconcile
from napari_resmtnet.layers import layer_to_nodules, table_to_layer_data
from napari_resmtnet.annotations.report import write_html_report
from napari_resmtnet.annotations.review import merge_detections
from napari_resmtnet.scan import Scan

MODEL = {"name": "resmtnet", "version": "0.3.0", "sha256": "feedbeef"}

SOLID_7MM = {
    "texture": "solid",
    "texture_probability": {"solid": 0.81, "part-solid": 0.14, "ground-glass": 0.05},
    "calcified": 0.12,
    "spiculated": 0.33,
    "ill_defined_margin": 0.21,
    "long_axis_mm": 8.0,
    "short_axis_mm": 6.2,
    "mean_diameter_mm": 7.1,
    "volume_mm3": 180.5,
    "lungrads": "3",
    "lungrads_reason": "solid nodule ≥ 6 to < 8 mm at baseline: 7.1 mm",
}
PART_SOLID_12MM = {
    "texture": "part-solid",
    "texture_probability": {"solid": 0.2, "part-solid": 0.7, "ground-glass": 0.1},
    "calcified": 0.81,
    "long_axis_mm": 14.0,
    "short_axis_mm": 10.0,
    "mean_diameter_mm": 12.0,
    "volume_mm3": 900.0,
    "solid_mean_diameter_mm": 6.5,
}


def ct_scan():
    return Scan(
        np.zeros((20, 64, 64), np.int16),
        (2.0, 0.7, 0.7),
        (-100.0, 10.0, -50.0),
        np.eye(3),
        "CT",
        path="/data/ct.mhd",
        seriesuid="1.2.840.9",
    )


def ct_table(findings=None):
    """Three model nodules: a measured solid 7 mm one, a measured part-solid 12 mm one with a
    calcification flag, and one without findings (an older model); threshold 0.5."""
    scan = ct_scan()
    det = Detections(
        [[4.2, 10, 12, 8.6, 20, 24], [10.0, 30, 30, 12.0, 36, 40], [11.5, 40, 40, 14.5, 50, 50]],
        [0.9, 0.8, 0.7],
        [0.87, 0.2, 0.6],
        Detections.geometry_of(scan),
        findings=findings if findings is not None else [SOLID_7MM, PART_SOLID_12MM, {}],
    )
    return scan, NoduleTable.from_detections(det, image_identity(scan), threshold=0.5, model_info=MODEL)


# --- the table ---------------------------------------------------------------------------


def test_from_detections_keeps_findings_in_plain_types_and_to_detections_gives_them_back():
    scan = ct_scan()
    f = dict(SOLID_7MM, volume_mm3=np.float32(180.5), texture="Solid", calcified=np.float64(0.12))
    det = Detections([[4.2, 10, 12, 8.6, 20, 24]], [0.9], [0.87], Detections.geometry_of(scan), findings=[f])
    t = NoduleTable.from_detections(det, image_identity(scan))
    assert t.findings[0]["texture"] == "solid" and type(t.findings[0]["volume_mm3"]) is float
    assert t.findings[0]["volume_mm3"] == 180.5 and t.texture_override.tolist() == [""]
    back = t.with_texture([1], "GGN").to_detections()
    assert back.findings == [t.findings[0]] and back.meta["texture_override"] == ["ground-glass"]
    # a model without findings: every nodule has none
    plain = NoduleTable.from_detections(
        Detections([[4.2, 10, 12, 8.6, 20, 24]], [0.9], [0.87], Detections.geometry_of(scan)), image_identity(scan)
    )
    assert plain.findings.tolist() == [{}] and plain.grade(0).category == ""


def test_bad_findings_are_refused_with_the_key():
    with pytest.raises(ValueError, match="calcified"):
        clean_findings({"calcified": 1.5})
    with pytest.raises(ValueError, match="nodule type"):
        clean_findings({"texture": "cystic"})
    with pytest.raises(ValueError, match="volume_mm3"):
        clean_findings({"volume_mm3": math.nan})
    with pytest.raises(ValueError, match="lungrads"):
        clean_findings({"lungrads": "5"})
    assert clean_findings({"lobe": "RUL", "spiculated": None}) == {"lobe": "RUL"}  # unknown kept, None dropped


def test_edits_carry_findings_and_a_drawn_nodule_has_none():
    _, t = ct_table()
    t2, nid = t.added([1.5, 50, 50, 2.5, 56, 56], label="malignant")
    assert t2.findings[-1] == {} and t2.texture_override[-1] == "" and nid == 4
    assert t2.removed([1]).findings.tolist() == [PART_SOLID_12MM, {}, {}]
    taken = t2.with_texture([2], "solid").taken([1, 0])
    assert taken.findings.tolist() == [PART_SOLID_12MM, SOLID_7MM]
    assert taken.texture_override.tolist() == ["solid", ""]
    # copy / equals see findings and overrides
    assert t.copy().equals(t) and not t.with_texture([1], "ground-glass").equals(t)
    other = t.copy()
    other.findings[0] = dict(SOLID_7MM, volume_mm3=181.0)
    assert not other.equals(t)
    # the copy does not share the dicts: editing one table's findings leaves the other alone
    other.findings[1]["texture_probability"]["solid"] = 0.99
    assert t.findings[1]["texture_probability"]["solid"] == 0.2


def test_resizing_drops_the_model_sizes_moving_keeps_them():
    _, t = ct_table()
    moved = t.with_inplane(1, [12, 14, 22, 26])  # same 10 x 12 voxels, 2 voxels further
    assert moved.findings[0] == SOLID_7MM and moved.grade(0).size_from == "measured"
    resized = t.with_inplane(1, [10, 12, 30, 34])
    kept = {k: v for k, v in SOLID_7MM.items() if not k.endswith(("_mm", "_mm3")) and not k.startswith("lungrads")}
    assert resized.findings[0] == kept  # texture and probabilities stay
    g = resized.grade(0)
    assert g.size_from == "box" and g.mean_diameter_mm == round(float(resized.diameter_mm()[0]), 1)
    assert "box's diameter" in g.reason
    # z extent and whole boxes follow the same rule
    assert "volume_mm3" not in t.with_z_extent(1, 3, 9).findings[0]
    assert t.with_box(1, t.boxes[0] + 1.0).findings[0] == SOLID_7MM
    # the original is untouched (undo)
    assert t.findings[0] == SOLID_7MM


# --- texture override and Lung-RADS -----------------------------------------------------


def test_override_recomputes_lung_rads_from_the_effective_type():
    _, t = ct_table()
    g = t.grade(0)
    assert (g.category, g.nodule_type, g.type_from, g.size_from, g.mean_diameter_mm) == (
        "3",
        "solid",
        "model",
        "measured",
        7.1,
    )
    ggn = t.with_texture([1], "ground glass")
    assert ggn.texture_override[0] == "ground-glass" and ggn.findings[0]["texture"] == "solid"  # both kept
    g = ggn.grade(0)
    assert (g.category, g.nodule_type, g.type_from) == ("2", "ground-glass", "reader")
    assert "decision support" in g.reason and g.label == "Lung-RADS 2 (decision support)"
    assert texture_text(ggn, 0) == "ground-glass (reader; model: solid)" and texture_text(t, 0) == "solid (model)"
    # removing the override gives the model's call back
    assert ggn.with_texture([1], None).grade(0).category == "3"
    with pytest.raises(ValueError, match="nodule type"):
        t.with_texture([1], "cavitary")
    with pytest.raises(KeyError):
        t.with_texture([99], "solid")


def test_part_solid_needs_its_solid_component_and_calcification_is_only_flagged():
    _, t = ct_table()
    g = t.grade(1)  # part-solid 12 mm, solid component 6.5 mm, model calcified 0.81
    assert g.category == "4A" and g.calcified == 0.81
    assert "calcification" in g.reason and "reader must confirm" in g.reason
    assert grade_text(t, 1) == "4A (measured 12.0 mm); calcified? 0.81 (model)"
    # a nodule without measurements (box 6 x 7 x 7 mm: 6.7 mm), made part-solid by the reader,
    # has no solid component: undetermined, not guessed
    u = t.with_texture([3], "part-solid").grade(2)
    assert u.category == "" and u.size_from == "box" and "solid component was not measured" in u.reason
    assert grade_text(t.with_texture([3], "part-solid"), 2) == "undetermined"
    # solid from the reader, box size 6.7 mm -> 3, labelled box
    s = t.with_texture([3], "solid")
    assert s.grade(2).category == "3" and grade_text(s, 2) == "3 (box 6.7 mm)"
    # the same nodule with the solid component missing from the model
    no_solid = dict(PART_SOLID_12MM)
    del no_solid["solid_mean_diameter_mm"]
    _, t2 = ct_table([SOLID_7MM, no_solid, {}])
    assert t2.grade(1).category == "" and t2.with_texture([2], "solid").grade(1).category == "4A"


def test_radiographs_are_not_graded():
    scan = Scan(np.zeros((100, 120), np.uint16), (0.5, 0.5), (0.0, 0.0), np.eye(2), "CXR", seriesuid="c")
    det = Detections([[10, 20, 30, 40]], [0.8], [0.1], Detections.geometry_of(scan), findings=[{"texture": "solid"}])
    t = NoduleTable.from_detections(det, image_identity(scan))
    assert t.grade(0).category == "" and "radiograph" in t.grade(0).reason and grade_text(t, 0) == "-"


# --- layer features ----------------------------------------------------------------------


def test_layer_features_carry_findings_back_without_the_table():
    _, t = ct_table()
    t = t.with_texture([3], "ground-glass")
    data, kw, _ = table_to_layer_data(t)
    feats = kw["features"]
    assert set(FEATURE_COLUMNS) <= set(feats.columns)
    first = feats[feats["id"] == 1].iloc[0]
    assert first["texture"] == "solid" and first["lungrads"] == "3" and first["volume_mm3"] == 180.5
    assert math.isnan(feats[feats["id"] == 3].iloc[0]["volume_mm3"])
    # a layer whose metadata lost the table (saved elsewhere, another plugin): read from features
    back = layer_to_nodules((data, dict(kw, metadata={"image": t.image}), "shapes"))
    assert back.findings.tolist() == [
        {k: v for k, v in f.items() if not k.startswith("lungrads")} for f in t.findings
    ]  # the model's own category is derived; recomputed the same
    assert back.texture_override.tolist() == ["", "", "ground-glass"]
    assert [g.category for g in back.grades()] == [g.category for g in t.grades()]


def test_canvas_edits_keep_findings_through_reconcile():
    _, t = ct_table()
    t = t.with_texture([2], "solid")
    data, kw, _ = table_to_layer_data(t, slice_index=6)
    feats = {c: kw["features"][c].tolist() for c in ("id", "slice")}
    shapes = [np.asarray(s, float) for s in data]
    shapes[0] = shapes[0] + 1.0  # nodule 1 moved by one voxel
    new, changed, _ = reconcile(t, shapes, feats, slice_index=6)
    assert changed and new.findings[0] == SOLID_7MM and new.texture_override.tolist() == ["", "solid", ""]
    shapes[0] = np.array([[10, 12], [10, 30], [30, 30], [30, 12]], float)  # resized
    new, changed, _ = reconcile(t, shapes, feats, slice_index=6)
    assert changed and "mean_diameter_mm" not in new.findings[0] and new.findings[0]["texture"] == "solid"
    # a nodule drawn on the canvas has no findings
    shapes.append(np.array([[50, 50], [50, 56], [56, 56], [56, 50]], float))
    new, _, added = reconcile(t, shapes, {"id": feats["id"] + [-1], "slice": feats["slice"] + [6]}, slice_index=6)
    assert new.findings[new.index_of(added[0])] == {}


# --- export and import ---------------------------------------------------------------------


def test_json_round_trip_keeps_findings_and_override_exactly(tmp_path):
    scan, t = ct_table()
    t = t.with_texture([1], "ground-glass").with_review([2], "accepted")
    _, jp = E.export_nodules(tmp_path / "n", t, exported_at="2026-01-01T00:00:00+00:00")
    d = json.loads(open(jp).read())
    n1 = d["nodules"][0]
    assert n1["texture"] == "ground-glass" and n1["texture_model"] == "solid"
    assert n1["texture_override"] == "ground-glass" and n1["findings"] == SOLID_7MM
    assert n1["lungrads"]["category"] == "2" and n1["lungrads"]["note"] == "decision support"
    assert n1["lungrads"]["size_from"] == "measured" and n1["lungrads"]["mean_diameter_mm"] == 7.1
    assert d["nodules"][2]["findings"] == {} and d["nodules"][2]["texture_override"] is None
    back = E.import_nodules(jp, image_identity(scan))
    assert back.equals(t)
    assert E.json_text(back, "2026-01-01T00:00:00+00:00") == open(jp).read()  # byte for byte


def test_csv_round_trip_keeps_findings_and_override(tmp_path):
    scan, t = ct_table()
    t = t.with_texture([1], "ground-glass").with_texture([3], "part-solid")
    cp, _ = E.export_nodules(tmp_path / "n", t)
    rows = list(csv.DictReader(open(cp)))
    assert list(rows[0]) == E.CSV_COLUMNS
    r = rows[0]
    assert (r["texture"], r["texture_model"], r["texture_override"]) == ("ground-glass", "solid", "ground-glass")
    assert (r["lungrads"], r["lungrads_size_from"], r["lungrads_note"]) == ("2", "measured", "decision support")
    assert float(r["p_solid"]) == 0.81 and float(r["volume_mm3"]) == 180.5 and r["solid_mean_diameter_mm"] == ""
    assert rows[1]["lungrads"] == "4A" and float(rows[1]["solid_mean_diameter_mm"]) == 6.5
    assert rows[2]["lungrads"] == "" and rows[2]["texture_model"] == "" and rows[2]["volume_mm3"] == ""
    back = E.import_nodules(cp, image_identity(scan))
    model_keys = [{k: v for k, v in f.items() if not k.startswith("lungrads")} for f in t.findings]
    assert back.findings.tolist() == model_keys  # the CSV's category is derived, recomputed
    assert back.texture_override.tolist() == ["ground-glass", "", "part-solid"]
    assert [g.category for g in back.grades()] == ["2", "4A", ""]


OLD_JSON = """{
  "format": "resmtnet-nodules", "format_version": 1, "exported_at": "2025-06-01T10:00:00+00:00",
  "image": {"path": "/data/ct.mhd", "seriesuid": "1.2.840.9", "modality": "CT", "shape": [20, 64, 64],
            "spacing": [2.0, 0.7, 0.7], "origin": [-100.0, 10.0, -50.0],
            "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]},
  "model": {"name": "resmtnet", "version": "0.2.0", "sha256": "ab"}, "threshold": 0.5,
  "nodules": [{"id": 1, "probability": 0.9, "malignancy": 0.87, "label": "malignant", "diameter_mm": 8.0,
               "source": "model", "reviewed": true, "review": "accepted",
               "box_voxel": [4.2, 10.0, 12.0, 8.6, 20.0, 24.0]}],
  "hidden": [{"id": 2, "malignancy": 0.2, "label": "benign", "box_voxel": [10.0, 30.0, 30.0, 12.0, 36.0, 40.0],
              "probability": 0.3, "reviewed": false}]
}
"""

OLD_CSV = (
    "seriesuid,coordX,coordY,coordZ,diameter_mm,probability,malignancy,label,id,source,reviewed\n"
    "1.2.840.9,-37.4,20.5,-87.2,8.1,0.9,0.87,malignant,1,model,true\n"
    "1.2.840.9,-25.0,33.0,-78.0,6.0,0.7,0.6,malignant,3,user,false\n"
)


def test_files_written_before_findings_still_import(tmp_path):
    scan = ct_scan()
    (tmp_path / "old.json").write_text(OLD_JSON)
    (tmp_path / "old.csv").write_text(OLD_CSV)
    tj = E.import_nodules(tmp_path / "old.json", image_identity(scan))
    assert tj.ids.tolist() == [1, 2] and tj.review.tolist() == ["accepted", "unreviewed"]
    assert tj.findings.tolist() == [{}, {}] and tj.texture_override.tolist() == ["", ""]
    tc = E.import_nodules(tmp_path / "old.csv", image_identity(scan))
    assert tc.ids.tolist() == [1, 3] and tc.findings.tolist() == [{}, {}] and tc.reviewed.tolist() == [True, False]
    # and the reader can set a type on them: graded from the box
    g = tc.with_texture([1], "solid").grade(0)
    assert g.category == "4A" and g.size_from == "box"  # the CSV's cube of 8.1 mm
    # a LUNA16 file with only the required columns
    (tmp_path / "luna.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.840.9,-37.4,20.5,-87.2,8.1\n")
    assert E.import_nodules(tmp_path / "luna.csv", image_identity(scan)).findings.tolist() == [{}]


def test_a_hand_made_csv_with_only_texture_gives_the_readers_type(tmp_path):
    scan = ct_scan()
    p = tmp_path / "hand.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm,texture\n1.2.840.9,-37.4,20.5,-87.2,8.1,GGN\n")
    t = E.import_nodules(p, image_identity(scan))
    assert t.texture_override.tolist() == ["ground-glass"] and t.grade(0).category == "2"


@pytest.mark.parametrize(
    "cells, message",
    [
        ({"p_calcified": "1.5"}, r"calcified must be a finite number in \[0, 1\]"),
        ({"texture_override": "cavitary"}, r"nodule type must be one of"),
        ({"volume_mm3": "-3"}, r"volume_mm3"),
        ({"p_solid": "abc"}, r"p_solid must be a number"),
    ],
)
def test_bad_findings_cells_are_one_line_naming_the_row(tmp_path, cells, message):
    scan, t = ct_table()
    cp, _ = E.export_nodules(tmp_path / "n", t)
    rows = list(csv.DictReader(open(cp)))
    rows[1].update(cells)
    with open(cp, "w", newline="") as fh:
        w = csv.DictWriter(fh, E.CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(E.NoduleFileError, match=r"n\.csv line 3: .*" + message):
        E.import_nodules(cp, image_identity(scan))


def test_bad_findings_in_json_are_one_line_naming_the_nodule(tmp_path):
    scan, t = ct_table()
    d = E.json_dict(t)
    d["nodules"][1]["findings"]["texture_probability"] = {"solid": float("nan")}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(E.NoduleFileError, match=r"bad\.json nodule 2: finding texture_probability"):
        E.import_nodules(p, image_identity(scan))
    d["nodules"][1]["findings"] = {}
    d["nodules"][1]["texture_override"] = 3
    p.write_text(json.dumps(d))
    with pytest.raises(E.NoduleFileError, match=r"nodule 2: texture_override must be text"):
        E.import_nodules(p, image_identity(scan))


def test_autosave_keeps_findings_and_override():
    _, t = ct_table()
    t = t.with_texture([2], "solid").with_inplane(3, [40, 40, 46, 46])
    autosave.save(t)
    back = autosave.load(t.image)
    assert back.equals(t) and back.grade(1).type_from == "reader"


# --- re-detection and report --------------------------------------------------------------


def test_merge_keeps_the_readers_override_and_takes_new_findings():
    _, old = ct_table()
    old = old.with_texture([1], "part-solid").with_review([1], "accepted")
    _, new = ct_table([dict(SOLID_7MM, volume_mm3=200.0), PART_SOLID_12MM, {"texture": "ground-glass"}])
    merged, summary = merge_detections(old, new)
    assert summary.kept == 1 and summary.duplicates == 1
    assert merged.findings[0] == SOLID_7MM and merged.texture_override[0] == "part-solid"  # kept as it was
    assert merged.findings.tolist()[1:] == [PART_SOLID_12MM, {"texture": "ground-glass"}]
    assert merged.texture_override.tolist()[1:] == ["", ""]


def test_report_shows_findings_as_decision_support(tmp_path):
    _, t = ct_table()
    t = t.with_texture([1], "ground-glass").with_review([1, 2, 3], "accepted")
    arr = np.full(t.shape, -800, np.int16)
    text = write_html_report(tmp_path / "r.html", t, arr).read_text(encoding="utf-8")
    assert "Lung-RADS* (decision support)</th>" in text
    assert (
        "<td>ground-glass (reader; model: solid)</td><td>8.0 × 6.2</td><td>180</td><td>2 (measured 7.1 mm)</td>" in text
    )
    assert "<td>4A (measured 12.0 mm); calcified? 0.81 (model)</td>" in text
    assert "never makes it 1" in text
    # without findings the table is as before
    _, plain = ct_table([{}, {}, {}])
    text = write_html_report(tmp_path / "p.html", plain.with_review([1], "accepted"), arr).read_text(encoding="utf-8")
    assert "Lung-RADS" not in text


def test_writing_several_layers_keeps_each_ones_findings_and_override(tmp_path):
    from napari_resmtnet._writer import write_nodules
    from napari_resmtnet.layers import table_to_layer_data

    scan, t = ct_table()
    first = table_to_layer_data(t.taken([0]))
    second_table = t.taken([1]).with_texture([int(t.taken([1]).ids[0])], "ground-glass")
    second = table_to_layer_data(second_table)
    out = write_nodules(str(tmp_path / "both.json"), [first, second])
    nodules = json.loads(open(out[1], encoding="utf-8").read())["nodules"]
    assert len(nodules) == 2
    assert nodules[1]["findings"] == second_table.findings[0]
    assert nodules[1]["texture_override"] == "ground-glass" and not nodules[0]["texture_override"]
