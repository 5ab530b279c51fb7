"""Property tests (hypothesis): box geometry round trips, export/import identity, NMS invariants.

Random spacings, origins and direction matrices (random rotations, with or without a flip);
random nodule sets; random boxes and scores. ``max_examples`` is kept moderate so that the
module runs in a few seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from napari_resmtnet import boxes as B  # noqa: E402
from napari_resmtnet.annotations import export as E  # noqa: E402
from napari_resmtnet.annotations.table import LABELS, SOURCES, NoduleTable  # noqa: E402
from napari_resmtnet.scan import Scan  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def directions(draw, nd: int):
    """A random orthonormal matrix: QR of a Gaussian matrix (a uniform rotation), then an
    optional flip of one axis (determinant -1), then an optional axis permutation."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(nd, nd)))
    q = q @ np.diag(np.sign(np.diag(r)))  # unique, uniformly distributed rotation/reflection
    if draw(st.booleans()):
        q[:, draw(st.integers(0, nd - 1))] *= -1.0
    if draw(st.booleans()):
        q = q[:, rng.permutation(nd)]
    if draw(st.booleans()):  # also the common exact cases: identity and axis flips
        q = np.diag(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=nd, max_size=nd)))
    return q


@st.composite
def geometries(draw, nd: int | None = None):
    nd = nd or draw(st.sampled_from([2, 3]))
    spacing = draw(st.lists(st.floats(0.05, 10.0, **finite), min_size=nd, max_size=nd))
    origin = draw(st.lists(st.floats(-1000.0, 1000.0, **finite), min_size=nd, max_size=nd))
    shape = draw(st.lists(st.integers(2, 600), min_size=nd, max_size=nd))
    return {
        "spacing": tuple(spacing),
        "origin": tuple(origin),
        "direction": draw(directions(nd)),
        "shape": tuple(shape),
    }


@st.composite
def voxel_boxes(draw, nd: int, n_max: int = 20, min_size: float = 0.5, extent: float = 500.0):
    n = draw(st.integers(0, n_max))
    lo = draw(arrays(np.float64, (n, nd), elements=st.floats(-extent / 10, extent, **finite)))
    size = draw(arrays(np.float64, (n, nd), elements=st.floats(min_size, 80.0, **finite)))
    return np.concatenate([lo, lo + size], axis=1)


# --------------------------------------------------------------------------- voxel <-> world


@SETTINGS
@given(data=st.data())
def test_voxel_world_round_trip_points_and_boxes(data):
    g = data.draw(geometries())
    nd = len(g["spacing"])
    boxes = data.draw(voxel_boxes(nd))
    pts = boxes[:, :nd] if len(boxes) else np.zeros((0, nd))
    w = B.voxel_to_world_points(pts, g)
    np.testing.assert_allclose(B.world_to_voxel_points(w, g), pts, atol=1e-6 * (1 + np.abs(pts).max(initial=0)))
    centres, sizes = B.voxel_boxes_to_world(boxes, g) if len(boxes) else (np.zeros((0, nd)), np.zeros((0, nd)))
    if len(boxes):
        back = B.world_to_voxel_boxes(centres, sizes, g)
        np.testing.assert_allclose(back, boxes, atol=1e-6 * (1 + np.abs(boxes).max()))
        # physical size along each array axis is voxels * spacing, whatever the direction
        np.testing.assert_allclose(sizes, (boxes[:, nd:] - boxes[:, :nd]) * np.asarray(g["spacing"]), rtol=1e-9)


@SETTINGS
@given(data=st.data())
def test_scan_boxes_and_napari_transform_agree(data):
    """Scan.index_to_world, boxes.voxel_to_world_points and napari's data->world transform
    (affine @ (translate + scale * i)) are the same map; world distances are isotropic mm."""
    g = data.draw(geometries())
    nd = len(g["spacing"])
    scan = Scan(np.zeros((2,) * nd, np.int16), g["spacing"], g["origin"], g["direction"], "CT" if nd == 3 else "CXR")
    idx = data.draw(arrays(np.float64, (5, nd), elements=st.floats(-50, 700, **finite)))
    w_scan = scan.index_to_world(idx)
    np.testing.assert_allclose(w_scan, B.voxel_to_world_points(idx, g), atol=1e-6)
    np.testing.assert_allclose(scan.world_to_index(w_scan), idx, atol=1e-6)
    kw = scan.napari_kwargs()
    aff = kw.get("affine", np.eye(nd + 1))
    lin, shift = np.asarray(aff)[:nd, :nd], np.asarray(aff)[:nd, nd]
    w_napari = (np.asarray(kw["translate"]) + np.asarray(kw["scale"]) * idx) @ lin.T + shift
    np.testing.assert_allclose(w_napari, w_scan, atol=1e-6)
    # rigid: the distance between two voxels is their spacing-scaled index distance
    d_idx = np.linalg.norm((idx[0] - idx[1]) * np.asarray(g["spacing"]))
    np.testing.assert_allclose(np.linalg.norm(w_scan[0] - w_scan[1]), d_idx, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- export / import


@st.composite
def nodule_tables(draw):
    g = draw(geometries())
    nd = len(g["spacing"])
    boxes = np.asarray(draw(voxel_boxes(nd, n_max=15, min_size=0.25)), float).reshape(-1, 2 * nd)
    # every box the plugin makes or imports has its centre on its image (a CSV whose centres
    # lie off the image is refused as another image's), so centres are moved into the image
    shape = np.asarray(g["shape"], float)
    mid = (boxes[:, :nd] + boxes[:, nd:]) / 2
    shift = np.mod(mid + 0.5, shape) - 0.5 - mid
    boxes = boxes + np.concatenate([shift, shift], axis=1)
    n = len(boxes)
    unit = st.floats(0.0, 1.0, **finite)
    # ids ascend in table order, as every table the plugin makes has them (detections are
    # numbered in order, new nodules get the next id); the JSON keeps rows in id order
    ids = sorted(draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True)))
    uid = draw(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40))
    image = {
        "path": draw(st.sampled_from(["", "/data/scan 1.mhd", "C:\\scans\\Müller\\ct.nii.gz"])),
        "seriesuid": uid,
        "modality": "CT" if nd == 3 else "CXR",
        "shape": [int(s) for s in g["shape"]],
        "spacing": [float(s) for s in g["spacing"]],
        "origin": [float(o) for o in g["origin"]],
        "direction": np.asarray(g["direction"], float).tolist(),
    }
    model = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {
                    "name": st.text(max_size=10),
                    "version": st.text(max_size=5),
                    "sha256": st.text("0123456789abcdef", max_size=64),
                }
            ),
        )
    )
    return NoduleTable(
        boxes=boxes,
        ids=ids,
        probability=draw(st.lists(unit, min_size=n, max_size=n)),
        malignancy=draw(st.lists(unit, min_size=n, max_size=n)),
        label=draw(st.lists(st.sampled_from(LABELS), min_size=n, max_size=n)),
        source=draw(st.lists(st.sampled_from(SOURCES), min_size=n, max_size=n)),
        reviewed=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        image=image,
        threshold=draw(unit),
        model_info=model,
    )


@SETTINGS
@given(table=nodule_tables())
def test_export_then_import_is_the_identity(table):
    with tempfile.TemporaryDirectory() as d:
        csv_path, json_path = E.export_nodules(Path(d) / "nodules.csv", table)
        back = E.import_nodules(json_path, dict(table.image))
        assert back.equals(table)
        # JSON -> table -> JSON is stable too (text identical but for nothing)
        assert E.json_text(back, "t") == E.json_text(table, "t")
        # the CSV re-imports the shown nodules at the same world centres
        vis = table.visible_mask()
        if table.image["seriesuid"].strip() == table.image["seriesuid"] and "\r" not in table.image["seriesuid"]:
            from_csv = E.import_nodules(csv_path, dict(table.image))
            assert len(from_csv) == int(vis.sum())
            if len(from_csv):
                np.testing.assert_allclose(
                    from_csv.centers_world(),
                    table.centers_world()[vis],
                    atol=1e-6 * (1 + np.abs(table.centers_world()).max()),
                )


@SETTINGS
@given(table=nodule_tables())
def test_json_dict_round_trip_without_files(table):
    back = E.table_from_json_dict(E.json_dict(table))
    assert back.equals(table)


# --------------------------------------------------------------------------- NMS


def greedy_nms_reference(boxes, scores, t):
    """The textbook loop, one box at a time."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    for i in order:
        if all(B.box_iou(boxes[[i]], boxes[[j]])[0, 0] <= t for j in keep):
            keep.append(i)
    return np.asarray(keep, int)


@st.composite
def nms_inputs(draw):
    nd = draw(st.sampled_from([2, 3]))
    boxes = draw(voxel_boxes(nd, n_max=30, min_size=1.0, extent=60.0))
    n = len(boxes)
    # few distinct score values, so that ties happen
    scores = np.asarray(
        draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]) | st.floats(0, 1, **finite), min_size=n, max_size=n)),
        float,
    )
    t = draw(st.floats(0.0, 0.9, **finite))
    return boxes, scores, t


@SETTINGS
@given(inp=nms_inputs())
def test_nms_invariants(inp):
    boxes, scores, t = inp
    keep = B.nms(boxes, scores, t)
    n = len(boxes)
    assert keep.dtype.kind == "i" and len(set(keep.tolist())) == len(keep)
    if n == 0:
        assert len(keep) == 0
        return
    # the top-scored box (first in a stable sort) is always kept, and kept boxes come by score
    assert keep[0] == np.argsort(-scores, kind="stable")[0]
    assert np.all(np.diff(scores[keep]) <= 0)
    # kept boxes overlap pairwise at most t
    iou = B.box_iou(boxes[keep], boxes[keep])
    off = iou[~np.eye(len(keep), dtype=bool)]
    assert np.all(off <= t + 1e-12)
    # every dropped box overlaps some kept box of higher (or equal, earlier) rank by more than t
    rank = np.empty(n, int)
    rank[np.argsort(-scores, kind="stable")] = np.arange(n)
    for i in set(range(n)) - set(keep.tolist()):
        over = B.box_iou(boxes[[i]], boxes[keep])[0] > t
        assert np.any(over & (rank[keep] < rank[i]))
    # idempotent: NMS of the kept boxes keeps them all
    again = B.nms(boxes[keep], scores[keep], t)
    assert np.array_equal(np.sort(keep[again]), np.sort(keep))
    # the vectorised fixed point equals the textbook greedy loop
    assert np.array_equal(keep, greedy_nms_reference(boxes, scores, t))


@SETTINGS
@given(inp=nms_inputs())
def test_nms_numpy_and_torch_agree(inp):
    torch = pytest.importorskip("torch")
    boxes, scores, t = inp
    keep_np = B.nms(boxes, scores, t)
    keep_t = B.nms(torch.from_numpy(boxes), torch.from_numpy(scores), t)
    assert keep_t.dtype == torch.long
    assert keep_np.tolist() == keep_t.tolist()
    # float32 (what the model produces): same result unless an IoU sits at the threshold
    b32, s32 = torch.from_numpy(boxes).float(), torch.from_numpy(scores).float()
    iou = B.box_iou(boxes, boxes)
    near = np.abs(iou - t) < 1e-5
    assume(not near[~np.eye(len(boxes), dtype=bool)].any())
    assume(len(set(s32.tolist())) == len(set(scores.tolist())))  # no ties created by rounding
    assert B.nms(b32, s32, t).tolist() == keep_np.tolist()
