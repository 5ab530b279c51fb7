"""The Qt-free reading session: every edit with undo/redo, the threshold, review states,
navigation, the re-detect merge, the type override, layer edits and the autosave's
bookkeeping -- without Qt or a viewer."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import NoduleTable
from napari_resmtnet.annotations.session import AutosaveQueue, Event, ReviewSession, complete_csv_table

sys.path.insert(0, str(Path(__file__).parent))
from test_review import ct_table  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """The session's events as a list, as the widget hears them."""

    def __init__(self, session):
        self.changed, self.messages = [], []
        session.changed.connect(self.changed.append)
        session.message.connect(lambda kind, text: self.messages.append((kind, text)))


def session(threshold=0.5):
    s = ReviewSession()
    s.attach(ct_table(threshold), key="layer 1")
    return s, Recorder(s)


def test_the_session_needs_no_qt_and_no_napari():
    code = (
        "import sys, napari_resmtnet.annotations.session as S; s = S.ReviewSession(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
        "'napari', 'magicgui')]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr


def test_event_calls_every_callback_once_and_disconnects():
    e, got = Event(), []
    cb = e.connect(lambda *a: got.append(a))
    e.connect(lambda *a: got.append(("second",) + a))
    e.emit(1, "x")
    assert got == [(1, "x"), ("second", 1, "x")]
    e.disconnect(cb)
    e.disconnect(cb)  # twice is fine
    e.emit(2)
    assert got[-1] == ("second", 2) and len(got) == 3


def test_every_review_edit_is_one_undoable_change_on_the_selection():
    s, rec = session()
    assert not s.can_undo and not s.can_redo
    s.select([3])
    assert s.accept() and s.table.review[s.table.index_of(3)] == "accepted"
    assert s.selected == (3,)  # the edited nodule stays selected
    assert s.reject([1]) and s.table.review[0] == "rejected" and s.selected == (1,)
    assert s.unreview([1]) and s.table.review[0] == "unreviewed"
    assert s.toggle_accepted([1]) and s.table.reviewed[0]
    assert s.toggle_accepted([1]) and not s.table.reviewed[0]  # all accepted: back to unreviewed
    assert s.flip([1]) and s.table.label[0] == "benign"
    assert s.relabel("malignant", [1, 2]) and list(s.table.label[:2]) == ["malignant", "malignant"]
    assert len(rec.changed) == 7 and rec.changed[-1] is s.table
    # undo walks back through every one of them, redo forward again
    for _ in range(7):
        assert s.undo()
    assert s.table.equals(ct_table()) and not s.can_undo and s.can_redo
    assert not s.undo() and rec.messages[-1] == ("info", "Nothing to undo.")
    for _ in range(7):
        assert s.redo()
    assert s.table.equals(rec.changed[6]) and not s.redo()
    assert rec.messages[-1] == ("info", "Nothing to redo.")


def test_edits_need_nodules_and_a_selection_and_refuse_bad_ones():
    s = ReviewSession()
    rec = Recorder(s)
    assert not s.accept() and "No nodules yet" in rec.messages[-1][1]
    s, rec = session()
    assert not s.flip() and "Select one or more nodules" in rec.messages[-1][1] and "flip" in rec.messages[-1][1]
    assert not s.accept([99]) and rec.messages[-1][0] == "error" and rec.messages[-1][1].startswith("Cannot accept")
    assert not s.relabel("maybe", [1]) and rec.messages[-1][0] == "error"
    assert rec.changed == [] and not s.can_undo  # nothing changed, nothing to undo
    s.select([7])  # a selection of nodules that no longer exist selects nothing
    assert not s.delete() and "Select" in rec.messages[-1][1]


def test_delete_move_resize_and_add_with_undo():
    s, rec = session()
    before = s.table
    s.select([1])
    assert s.delete() and 1 not in s.table and s.selected == ()
    assert s.undo() and 1 in s.table and s.table.equals(before)
    assert s.move(3, [0, 2, -1])
    np.testing.assert_allclose(s.table.boxes[s.table.index_of(3)], before.boxes[2] + [0, 2, -1, 0, 2, -1])
    assert s.resize(3, [15, 40, 40, 16, 50, 52])
    np.testing.assert_allclose(s.table.boxes[s.table.index_of(3)], [15, 40, 40, 16, 50, 52])
    nid = s.add([2.5, 50, 50, 3.5, 58, 58], label="malignant")
    i = s.table.index_of(nid)
    assert nid == 4 and (s.table.source[i], s.table.label[i], s.table.probability[i]) == ("user", "malignant", 1.0)
    assert s.undo() and nid not in s.table
    assert s.undo() and s.undo()
    assert s.table.equals(before)
    assert s.redo() and s.redo() and s.redo() and nid in s.table
    # a new edit clears what could be redone
    s.undo()
    s.flip([1])
    assert not s.can_redo


def test_z_extent_from_the_slice_shown():
    s, rec = session()
    s.select([1])
    assert s.set_extent(3, first=True) and list(s.table.slices(0)) == [3, 4, 5, 6, 7, 8]
    assert s.set_extent(4, first=False) and list(s.table.slices(0)) == [3, 4]
    assert s.undo() and list(s.table.slices(0)) == [3, 4, 5, 6, 7, 8]
    assert not s.set_extent(None, first=True) and rec.messages[-1][1] == "Only a CT nodule has slices to set."


def test_type_override_is_undoable_and_the_category_follows():
    from test_findings import ct_table as findings_table

    _, t = findings_table()
    s = ReviewSession()
    s.attach(t, key=1)
    before = t.grade(0)
    assert before.nodule_type == "solid" and before.category == "3"
    assert s.override_type(1, "ground-glass")
    g = s.table.grade(0)
    assert (g.nodule_type, g.type_from, g.category) == ("ground-glass", "reader", "2")
    assert s.override_type(1, "") and s.table.grade(0) == before  # the model's call again
    assert s.undo() and s.table.texture_override[0] == "ground-glass"
    assert s.undo() and s.table.grade(0) == before
    assert not s.override_type(99, "solid")  # no such nodule: nothing happens


def test_threshold_shows_and_hides_without_undo_and_undo_keeps_it():
    s, rec = session()
    assert s.shown() == 2 and s.counts_text().startswith("2 of 3 nodules shown")
    assert s.set_threshold(0.2) == 0.2 and s.shown() == 3 and len(rec.changed) == 1
    assert not s.can_undo  # the threshold is a view, not an edit
    assert s.set_threshold(0.2) == 0.2 and len(rec.changed) == 1  # unchanged: no event
    assert s.set_threshold(7) == 1.0 and s.set_threshold(-1) == 0.0
    s.set_threshold(0.8)
    s.flip([1])
    s.set_threshold(0.25)
    assert s.undo() and s.table.threshold == 0.25 and s.table.label[0] == "malignant"
    assert "3 candidates, 3 shown at threshold 0.25 (slice 6)." == s.status_text(6)


def test_model_threshold_from_the_model_else_the_bundled_one(monkeypatch):
    import napari_resmtnet.annotations.session as S

    monkeypatch.setattr(S, "operating_point", lambda modality: {"CT": 0.42, "CXR": 0.61}[modality])
    s = ReviewSession()
    assert s.model_threshold() == 0.42 and s.model_threshold("CXR") == 0.61
    s.attach(ct_table(), key=1)
    assert s.model_threshold("CXR") == 0.42  # the nodules' modality wins
    t = ct_table()
    t.meta["model_threshold"] = 0.33
    s.attach(t, key=2)
    assert s.model_threshold() == 0.33
    t2 = ct_table()
    t2.model_info = {"threshold": 0.27}
    s.attach(t2, key=3)
    assert s.model_threshold() == 0.27


def test_review_counts_and_next_unreviewed_in_reading_order():
    s, rec = session(threshold=0.2)
    assert s.next_unreviewed() == 1  # nothing selected: the most probable first
    s.select([1])
    s.accept()
    assert s.next_unreviewed() == 3 and s.next_unreviewed(-1) == 2
    s.accept([2, 3])
    c = s.counts()
    assert (c["accepted"], c["unreviewed"], c["rejected"], c["shown"]) == (3, 0, 0, 3)
    assert s.next_unreviewed() is None
    assert rec.messages[-1] == ("info", "No unreviewed nodule left: 3 accepted, 0 rejected.")
    assert s.counts_text() == "3 of 3 nodules shown: 0 unreviewed, 3 accepted, 0 rejected"


def test_histories_are_per_document_and_detach_forgets():
    s, rec = session()
    s.flip([1])
    other = ct_table(0.3)
    s.attach(other, key="layer 2")
    assert s.table is other and s.selected == () and not s.can_undo
    s.attach(rec.changed[-1], key="layer 1")
    assert s.can_undo and s.undo() and s.table.label[0] == "malignant"
    s.detach()
    assert s.table is None and s.key is None
    s.attach(ct_table(), key="layer 1")
    assert not s.can_undo and not s.can_redo


def test_redetect_merge_keeps_the_readers_work_once_confirmed_and_is_undoable():
    s, rec = session(threshold=0.2)
    new = ct_table()
    assert s.merge_question(s.table, "layer 1") == 0  # nothing of the reader's: no question
    s.accept([1])
    s.reject([3])
    nid = s.add([1.5, 50, 50, 2.5, 56, 56], label="malignant")
    assert s.merge_question(s.table, "layer 1") == 3
    s.confirm_merge("layer 1")
    assert s.merge_question(s.table, "layer 1") == 0 and s.merge_question(s.table, "layer 2") == 3
    before = s.table
    det = Detections([[4.0, 11, 12, 8.0, 21, 24], [2.0, 2, 2, 4.0, 8, 8]], [0.95, 0.6], [0.9, 0.1], before.geometry)
    new = NoduleTable.from_detections(det, before.image, threshold=0.33, model_info={"name": "m"})
    new.meta["model_threshold"] = 0.33
    text = s.merge_run(new)
    assert text.startswith("3 reviewed or drawn nodule(s) kept, 1 unreviewed candidate(s) replaced by 1 new one(s)")
    assert s.last_merge == text
    t = s.table
    assert t.ids.tolist() == [1, 3, nid, nid + 1] and list(t.review) == [
        "accepted",
        "rejected",
        "unreviewed",
        "unreviewed",
    ]
    np.testing.assert_array_equal(t.boxes[0], before.boxes[0])  # the reader's box, not the new run's
    assert t.threshold == 0.33 and t.meta["model_threshold"] == 0.33 and t.model_info == {"name": "m"}
    assert s.undo()
    back = s.table.copy()
    back.threshold = before.threshold  # undo keeps the threshold shown
    assert back.equals(before) and s.table.threshold == 0.33
    # a run without the reader's work just replaces (still undoable)
    s2, _ = session()
    assert s2.merge_run(new) == "" and s2.table.equals(new) and s2.can_undo


def test_layer_edits_fold_into_the_table_as_one_edit():
    s, rec = session()
    t = s.table
    # nodule 1's rectangle on slice 6 moved by (+3, -2); nodule 3 untouched
    shapes = [np.array([[13, 10], [13, 22], [23, 22], [23, 10]], float)]
    assert s.apply_layer_edit(shapes, {"id": [1], "slice": [6]}, slice_index=6, selected=[1])
    np.testing.assert_allclose(s.table.boxes[0], [4.2, 13, 10, 8.6, 23, 22])
    assert s.selected == (1,) and len(rec.changed) == 1
    assert not s.apply_layer_edit([s for s in shapes], {"id": [1], "slice": [6]}, slice_index=6)  # unchanged
    # a box drawn on slice 12 is a new nodule of the reader's, selected
    drawn = [np.array([[50, 50], [50, 57], [57, 57], [57, 50]], float)]
    assert s.apply_layer_edit(drawn, {"id": [-1], "slice": [12]}, new_label="malignant", slice_index=12)
    assert s.selected == (4,) and s.table.label[-1] == "malignant" and 12 in s.table.slices(3)
    # deleting a rectangle deletes the nodule
    assert s.apply_layer_edit([], {"id": [], "slice": []}, removed=[1], slice_index=7)
    assert 1 not in s.table
    assert s.undo() and s.undo() and s.undo() and s.table.equals(t)


def test_csv_import_keeps_every_row_shown_and_the_model():
    t = ct_table(threshold=0.5)
    current = ct_table(threshold=0.6)
    current.model_info = {"name": "m"}
    out = complete_csv_table(t, current, 0.5)
    assert out.threshold == 0.3 and out.model_info == {"name": "m"} and int(out.visible_mask().sum()) == 3
    assert complete_csv_table(t, None, None).threshold == 0.3
    assert t.threshold == 0.5  # the table given is not changed


def test_autosave_queue_debounces_writes_once_and_reports_a_failure_once(tmp_path, monkeypatch):
    from napari_resmtnet.annotations import autosave as A
    from napari_resmtnet.files import NoduleFileError

    now = [100.0]
    q = AutosaveQueue(max_delay_s=10, clock=lambda: now[0])
    assert not q.add(None) and q.flush() == ([], "")
    t = ct_table()
    assert not q.add(t)  # the first change: wait for more
    now[0] += 9
    assert not q.add(t.flipped([1]))
    now[0] += 1.5
    assert q.add(t.flipped([1]))  # 10 s after the first unsaved change: due now
    written, error = q.flush()
    assert len(written) == 1 and error == "" and A.load(t.image).equals(t.flipped([1]))
    assert q.flush() == ([], "") and q.since is None
    # a failing writer: one report while the same failure persists
    monkeypatch.setattr(A, "save", lambda table: (_ for _ in ()).throw(NoduleFileError("disk full")))
    q.add(t)
    assert q.flush() == ([], "Autosave failed: disk full (export your nodules to keep them)")
    q.add(t)
    assert q.flush() == ([], "")
    # each image is offered its autosave once, again after the layer that showed it closed
    assert q.offer("k", owner=1) and not q.offer("k", owner=2)
    q.forget(1)
    assert q.offer("k", owner=3)


@pytest.mark.parametrize("method", ["flip", "accept", "reject", "delete", "toggle_accepted"])
def test_each_edit_changes_exactly_the_nodules_given(method):
    s, rec = session()
    before = s.table
    assert getattr(s, method)([3])
    after = s.table
    for nid in (1, 2):
        i, j = before.index_of(nid), after.index_of(nid)
        assert before.row(i) == after.row(j)
    assert (3 not in after) if method == "delete" else (after.row(after.index_of(3)) != before.row(2))
