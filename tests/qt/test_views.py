"""What the 3D view shows: a rough lung mask and nodule spheres (Qt-free)."""

import numpy as np

from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import NoduleTable, image_identity
from napari_resmtnet.scan import Scan
from napari_resmtnet.views import lung_mask, nodule_spheres


def phantom(lungs_to_the_ends=False):
    ct = np.full((30, 80, 80), -1000, np.int16)  # air around the patient
    ct[:, 8:72, 8:72] = 40  # the body, cut by the first and last slice
    z = slice(0, 30) if lungs_to_the_ends else slice(5, 25)
    ct[z, 20:60, 16:36] = -850
    ct[z, 20:60, 44:64] = -850
    return ct


def test_lung_mask_keeps_lungs_drops_outside_air():
    for ends in (False, True):
        mask, step = lung_mask(phantom(ends), (2.0, 1.0, 1.0))
        assert mask.shape == tuple(int(np.ceil(n / s)) for n, s in zip((30, 80, 80), step))
        assert mask.any()
        big = np.kron(mask, np.ones(step, np.uint8))[:30, :80, :80].astype(bool)
        assert not big[:, :4].any() and not big[:, :, :4].any()  # no outside air
        assert big[15, 40, 25] and big[15, 40, 55]  # both lungs
    assert not lung_mask(np.zeros((10, 40, 40), np.int16), (2.0, 1.0, 1.0))[0].any()


def test_nodule_spheres_leave_out_hidden_and_rejected():
    scan = Scan(phantom(), (2.0, 1.0, 1.0), (-30.0, 0.0, 0.0), np.eye(3), "CT")
    det = Detections(
        [[5, 30, 20, 9, 34, 24], [10, 40, 50, 12, 44, 54], [20, 25, 25, 21, 27, 27]],
        [0.9, 0.8, 0.1],
        [0.9, 0.1, 0.5],
        Detections.geometry_of(scan),
    )
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.5).with_review([2], "rejected")
    centres, diam, colors, ids = nodule_spheres(t)
    assert ids.tolist() == [1] and colors.shape == (1, 4)
    np.testing.assert_allclose(centres[0], [-30 + 7 * 2.0, 32, 22])
    np.testing.assert_allclose(diam, t.diameter_mm()[:1])


# --- three planes, windows, positions, 3D boxes ----------------------------------------------
from napari_resmtnet.views import (  # noqa: E402
    WINDOW_PRESETS,
    box_edges_world,
    box_span,
    cursor_lines,
    display_box,
    nodule_boxes_3d,
    plane_marks,
    plane_positions,
    plane_rectangle,
    point_to_voxel,
    positions_text,
    voxel_to_point,
    window_limits,
    window_of,
)

GEO = {"spacing": [5.0, 0.5, 0.5], "origin": [-777.5, -215.5, -134.0], "direction": np.eye(3).tolist()}


def table3(boxes, prob=(0.9, 0.8, 0.1)):
    scan = Scan(np.zeros((48, 64, 64), np.int16), GEO["spacing"], GEO["origin"], np.eye(3), "CT")
    det = Detections(boxes, list(prob[: len(boxes)]), [0.9] * len(boxes), Detections.geometry_of(scan))
    return NoduleTable.from_detections(det, image_identity(scan), threshold=0.5)


def test_window_presets_are_the_radiologists_windows():
    assert window_limits("lung") == (-1350.0, 150.0)
    assert window_limits("mediastinum") == (-135.0, 215.0)
    assert window_limits("bone") == (-500.0, 1500.0)
    assert set(WINDOW_PRESETS) == {"lung", "mediastinum", "bone"}
    assert window_of((-1350, 150)) == "lung" and window_of((0, 100)) is None


def test_box_span_and_display_box_follow_the_axial_slices():
    box = [4.2, 10, 12, 8.6, 20, 24]
    assert list(box_span(box, 0, 48)) == [5, 6, 7, 8]  # the slices that show it
    assert list(box_span(box, 1, 64)) == list(range(10, 20))
    assert list(box_span([15.1, 0, 0, 15.3, 1, 1], 0, 48)) == [15]  # thinner than a slice
    assert list(box_span([-3, 0, 0, 2, 1, 1], 0, 48)) == [0, 1]  # clipped to the image
    np.testing.assert_allclose(display_box(box, (48, 64, 64)), [4.5, 10, 12, 8.5, 20, 24])


def test_plane_rectangles_show_the_z_extent_in_coronal_and_sagittal():
    box = [4.2, 10, 12, 8.6, 20, 24]
    cor = plane_rectangle(box, 1, 15, (48, 64, 64))
    assert (cor[:, 1] == 15).all()
    np.testing.assert_allclose(cor[:, [0, 2]].min(0), [4.5, 12])
    np.testing.assert_allclose(cor[:, [0, 2]].max(0), [8.5, 24])
    sag = plane_rectangle(box, 2, 20, (48, 64, 64))
    assert (sag[:, 2] == 20).all()
    np.testing.assert_allclose(sag[:, :2].min(0), [4.5, 10])
    np.testing.assert_allclose(sag[:, :2].max(0), [8.5, 20])


def test_plane_marks_only_on_planes_the_box_reaches():
    t = table3([[4.2, 10, 12, 8.6, 20, 24], [30, 40, 40, 32, 44, 44], [1, 1, 1, 2, 2, 2]])
    rects, ids, edge, tcol, texts = plane_marks(t, 1, 15)
    assert ids.tolist() == [1] and len(rects) == 1 and edge.shape == (1, 4) and texts == ["malignant 0.90"]
    assert plane_marks(t, 1, 42)[1].tolist() == [2]
    assert plane_marks(t, 2, 30)[1].tolist() == []
    assert plane_marks(t, 0, 1)[1].tolist() == []  # nodule 3 is below the threshold
    assert plane_marks(t.with_review([1], "accepted"), 1, 15)[4] == ["malignant 0.90 \u2713"]


def test_slice_index_and_mm_round_trip():
    # lung1's geometry: slice 29 lies at -777.5 + 5 * 29 mm, which napari may read as 29.000000000000014
    p = [-777.5 + 5 * 29 + 1e-12, -215.5 + 0.5 * 10, -134.0 + 0.5 * 63.6]
    v = point_to_voxel(p, GEO, (48, 64, 64))
    assert v.tolist() == [29, 10, 63]
    np.testing.assert_allclose(voxel_to_point(v, GEO), [-632.5, -210.5, -102.5])
    pos = plane_positions(p, GEO, (48, 64, 64))
    assert pos == {"axial": (29, -632.5), "coronal": (10, -210.5), "sagittal": (63, -102.5)}
    assert positions_text(p, GEO, (48, 64, 64)).startswith("axial 29/47 z -632.5 mm")
    assert point_to_voxel([1e6, -1e6, 0], GEO, (48, 64, 64)).tolist() == [47, 0, 63]  # clipped
    # a tilted image: the slice is found through its direction
    d = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
    geo = dict(GEO, direction=d.tolist())
    w = voxel_to_point([3, 4, 5], geo)
    assert point_to_voxel(w, geo, (48, 64, 64)).tolist() == [3, 4, 5]


def test_cursor_lines_cross_the_plane_at_the_other_planes():
    lines = cursor_lines(1, [10, 20, 30], (48, 64, 64))  # the coronal plane y = 20
    assert set(lines) == {"axial", "sagittal"}
    np.testing.assert_allclose(lines["axial"], [[10, 20, -0.5], [10, 20, 63.5]])  # along x at z = 10
    np.testing.assert_allclose(lines["sagittal"], [[-0.5, 20, 30], [47.5, 20, 30]])  # along z at x = 30


def test_3d_boxes_are_wire_boxes_with_one_label_each():
    t = table3([[4.2, 10, 12, 8.6, 20, 24], [30, 40, 40, 32, 44, 44]]).with_review([2], "rejected")
    vec, col, anchors, texts, ids = nodule_boxes_3d(t)
    assert ids.tolist() == [1] and vec.shape == (12, 2, 3) and col.shape == (12, 4) and texts == ["malignant 0.90"]
    ends = np.concatenate([vec[:, 0], vec[:, 0] + vec[:, 1]])
    lo = voxel_to_point([4.5, 10, 12], GEO)
    hi = voxel_to_point([8.5, 20, 24], GEO)
    np.testing.assert_allclose(ends.min(0), lo)
    np.testing.assert_allclose(ends.max(0), hi)
    assert len(np.unique(np.round(ends, 6), axis=0)) == 8  # the 8 corners
    lengths = np.sort(np.linalg.norm(vec[:, 1], axis=1))
    np.testing.assert_allclose(lengths, np.repeat(np.sort(hi - lo), 4))  # 4 edges per axis
    np.testing.assert_allclose(anchors[0], voxel_to_point([8.5, 10, 12], GEO))
    assert box_edges_world([4.2, 10, 12, 8.6, 20, 24], GEO, (48, 64, 64)).shape == (12, 2, 3)
    assert nodule_boxes_3d(None)[0].shape == (0, 2, 3)
