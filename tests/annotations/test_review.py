"""The Qt-free reading model: review states, undo/redo history, navigation, merging."""

import numpy as np
import pytest

from napari_resmtnet.boxes import slice_index_of
from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import NoduleTable, image_identity
from napari_resmtnet.layers import table_to_shapes
from napari_resmtnet.annotations.review import History, counts, merge_detections, next_nodule, reader_work
from napari_resmtnet.scan import Scan


def ct_table(threshold=0.5):
    scan = Scan(
        np.zeros((20, 64, 64), np.int16), (2.0, 0.7, 0.7), (-100.0, 10.0, -50.0), np.eye(3), "CT", seriesuid="1.2.3"
    )
    det = Detections(
        [[4.2, 10, 12, 8.6, 20, 24], [10.0, 30, 30, 12.0, 36, 40], [15.1, 40, 40, 15.3, 44, 44]],
        [0.9, 0.3, 0.7],
        [0.87, 0.2, 0.6],
        Detections.geometry_of(scan),
    )
    return NoduleTable.from_detections(det, image_identity(scan), threshold=threshold)


def test_review_states_and_reviewed_column_agree():
    t = ct_table()
    assert list(t.review) == ["unreviewed"] * 3
    a = t.with_review([1], "accepted").with_review([3], "rejected")
    assert list(a.review) == ["accepted", "unreviewed", "rejected"]
    assert a.reviewed.tolist() == [True, False, False]  # files keep "reviewed" = accepted
    assert list(t.review) == ["unreviewed"] * 3  # the original is untouched
    assert a.with_reviewed([1]).review[0] == "unreviewed"  # the old toggle
    with pytest.raises(ValueError, match="review must be one of"):
        t.with_review([1], "maybe")
    # a table built from files (reviewed only) starts accepted/unreviewed
    b = NoduleTable(t.boxes, t.ids, t.probability, t.malignancy, t.label, t.source, [True, False, False], t.image)
    assert list(b.review) == ["accepted", "unreviewed", "unreviewed"]
    assert not a.equals(t) and a.copy().equals(a)
    # removing and adding keep the column aligned
    r = a.removed([1])
    assert list(r.review) == ["unreviewed", "rejected"]
    r2, nid = r.added([1, 1, 1, 3, 5, 5], review="accepted")
    assert r2.review[r2.index_of(nid)] == "accepted" and r2.reviewed[r2.index_of(nid)]


def test_counts_and_next_unreviewed_in_reading_order():
    t = ct_table(threshold=0.2).with_review([1], "accepted")
    c = counts(t)
    assert (c["shown"], c["accepted"], c["unreviewed"], c["rejected"], c["total"]) == (3, 1, 2, 0, 3)
    # reading order: by probability 1 (0.9), 3 (0.7), 2 (0.3)
    assert next_nodule(t, None) == 3
    assert next_nodule(t, 3) == 2
    assert next_nodule(t, 2) == 3  # wraps, skipping the accepted nodule 1
    assert next_nodule(t, 3, step=-1) == 2
    assert next_nodule(t, 1, unreviewed_only=False) == 3
    done = t.with_review([2, 3], "rejected")
    assert next_nodule(done, 1) is None and counts(done)["rejected"] == 2
    assert counts(None)["shown"] == 0


def test_history_undo_redo():
    h = History(depth=3)
    a, b, c = ct_table(), ct_table(0.3), ct_table(0.4)
    h.push(a)  # a -> b
    h.push(b)  # b -> c
    assert h.undo(c) is b and h.can_redo
    assert h.undo(b) is a and not h.can_undo
    assert h.undo(a) is None
    assert h.redo(a) is b and h.redo(b) is c and not h.can_redo
    h.undo(c)
    h.push(b)  # a new change clears redo
    assert not h.can_redo
    for t in range(10):
        h.push(t)
    assert len(h._undo) == 3


def test_merge_keeps_reviewed_and_drawn_and_replaces_candidates():
    old = ct_table(threshold=0.2).with_review([1], "accepted").with_review([3], "rejected")
    old, drawn = old.added([1.5, 50, 50, 2.5, 56, 56], label="malignant")
    assert reader_work(old) == 3 and reader_work(ct_table()) == 0
    # the new run finds nodule 1 again (shifted), a new one, not nodule 2, and nodule 3 again
    geom = old.geometry
    det = Detections(
        [[4.0, 11, 12, 8.0, 21, 24], [2.0, 2, 2, 4.0, 8, 8], [15.0, 41, 41, 15.4, 44, 44]],
        [0.95, 0.6, 0.8],
        [0.9, 0.1, 0.7],
        geom,
    )
    new = NoduleTable.from_detections(det, old.image, threshold=0.33, model_info={"name": "m"})
    merged, s = merge_detections(old, new)
    assert (s.kept, s.replaced, s.added, s.duplicates) == (3, 1, 1, 2)
    assert "3 reviewed or drawn nodule(s) kept" in s.text()
    assert merged.ids.tolist() == [1, 3, drawn, drawn + 1]
    assert list(merged.review) == ["accepted", "rejected", "unreviewed", "unreviewed"]
    np.testing.assert_array_equal(merged.boxes[0], old.boxes[0])  # the reader's box, not the new one
    np.testing.assert_array_equal(merged.boxes[3], det.boxes[1])
    assert merged.threshold == 0.33 and merged.model_info == {"name": "m"}
    # nothing old: the new table as it is
    m2, s2 = merge_detections(None, new)
    assert m2.equals(new) and s2.added == 3


def test_z_extent_edit():
    t = ct_table()
    assert list(t.slices(0)) == [5, 6, 7, 8]
    z = t.with_z_extent(1, first=3)
    assert list(z.slices(0)) == [3, 4, 5, 6, 7, 8]
    z = z.with_z_extent(1, last=4)
    assert list(z.slices(0)) == [3, 4]
    np.testing.assert_array_equal(z.boxes[0, [1, 2, 4, 5]], t.boxes[0, [1, 2, 4, 5]])
    assert list(t.with_z_extent(1, first=12, last=-5).slices(0)) == list(range(0, 13))


def test_slice_index_rounds_float_noise_and_current_slice_shapes():
    geom = {"spacing": (5.0, 0.57, 0.57), "origin": (-777.4999999999998, -215.5, -134.0), "direction": np.eye(3)}
    for k in range(48):
        world = -777.4999999999998 + k * 5.0
        assert slice_index_of([world, 0, 0], geom, 48) == k
        assert slice_index_of([world + 2.4, 0, 0], geom, 48) == k
    assert slice_index_of([-1e4, 0, 0], geom, 48) == 0 and slice_index_of([1e4, 0, 0], geom, 48) == 47
    t = ct_table(threshold=0.2)
    data, feats, _, _ = table_to_shapes(t, slice_index=6)
    assert feats["id"] == [1] and data[0].shape == (4, 2) and feats["slice"] == [6]
    assert table_to_shapes(t, slice_index=13)[0] == []
