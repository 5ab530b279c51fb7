"""A refused nodule import changes nothing: the nodule layer, the table and the autosave stay
exactly as they were, and the user sees one error notification (never a traceback)."""

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("qtpy")
pytest.importorskip("napari")

sys.path.insert(0, str(Path(__file__).parent))
from test_widget import Factory, detect, make, notes  # noqa: E402,F401

pytestmark = pytest.mark.gui


def _hostile_files(d: Path, exported_json: Path) -> dict:
    good = json.loads(exported_json.read_text())
    files = {}

    def variant(name, change):
        doc = json.loads(json.dumps(good))
        change(doc)
        p = d / name
        p.write_text(json.dumps(doc))
        files[name] = p

    variant("nan_threshold.json", lambda doc: doc.update(threshold=float("nan")))
    variant("reviewed_text.json", lambda doc: doc["nodules"][0].update(reviewed="false"))
    variant("negative_size.json", lambda doc: doc["nodules"][0].update(box_voxel=[9, 9, 9, 1, 1, 1]))
    variant("nodules_null.json", lambda doc: doc.update(nodules=None))
    variant("image_text.json", lambda doc: doc.update(image="ct"))
    variant("moved_origin.json", lambda doc: doc["image"]["origin"].__setitem__(0, doc["image"]["origin"][0] + 500))
    deep = d / "deep.json"
    deep.write_text('{"format": "resmtnet-nodules", "image": ' + "[" * 50_000 + "]" * 50_000 + "}")
    files["deep.json"] = deep
    huge = d / "huge.json"
    huge.write_text(exported_json.read_text().replace('"threshold": 0.5', '"threshold": 1' + "0" * 400))
    files["huge.json"] = huge
    bom = d / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbfseriesuid,coordX,coordY,coordZ,diameter_mm\r\nother,900,900,900,5\r\n")
    files["excel.csv"] = bom
    sup = d / "superscript.csv"
    sup.write_text("coordX,coordY,coordZ,diameter_mm,id\n-40,20,-90,5,\u00b2\n")
    files["superscript.csv"] = sup
    fifo = d / "fifo.json"
    os.mkfifo(fifo)
    files["fifo.json"] = fifo
    return files


def test_refused_imports_leave_layer_table_and_autosave_untouched(
    make_napari_viewer,
    qtbot,
    notes,  # noqa: F811
    tmp_path,
):
    from napari_resmtnet.annotations import autosave

    viewer, w = make(make_napari_viewer, Factory())
    layer = detect(qtbot, w)
    w.mark_reviewed()
    w.flush_autosave()
    saved = autosave.autosave_path(w.nodules.image)
    assert saved.is_file()
    saved_bytes = saved.read_bytes()
    before = w.nodules.copy()
    layer_data = [b.copy() for b in layer.data]
    paths = w.export_panel.export_nodules(tmp_path / "case.csv")
    files = _hostile_files(tmp_path, Path(paths[1]))
    n_info = len(notes["info"])
    for name, p in files.items():
        n_errors = len(notes["error"])
        assert w.export_panel.import_nodules(p) is None, name
        assert len(notes["error"]) == n_errors + 1, name
        msg = notes["error"][-1]
        assert "\n" not in msg and "Traceback" not in msg, msg
        assert w.nodules.equals(before), name
        assert w.nodule_layer is layer and len(layer.data) == len(layer_data), name
        w.flush_autosave()
        assert saved.read_bytes() == saved_bytes, name
    assert not any("Imported" in m for m in notes["info"][n_info:])
