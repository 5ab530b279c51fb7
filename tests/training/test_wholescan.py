"""Whole-scan detection: the lung mask that follows the pleura, cube geometry through the
header, per-axis sizes, the second stage, hard-negative crops, whole-scan matching and split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_resmtnet.training.datasets import CubeRecord, _nodules_in_cube, mask_extent
from napari_resmtnet.inference.predictor import lung_mask_cells, scan_lung_mask
from napari_resmtnet.model import ResMTNet, ResMTNetConfig, decode
from napari_resmtnet.model.network import candidate_patches
from napari_resmtnet.scan import Scan
from napari_resmtnet.training.wholescan import Lesion, NegativeScan, match_scan, negative_crop, scan_split

from conftest import data_path

CELL_MM = 4.0


def chest_cells(juxta=True):
    """A chest on the 4 mm cell grid (z, y, x): air outside, a 40 HU body ellipse, two -850 HU
    lungs, a 40 HU mediastinum between them, and a 12 mm soft-tissue nodule sitting on the
    lateral pleura of the right lung (half in the chest wall's dent). Returns (HU, points)."""
    shape = (40, 80, 96)  # 160 x 320 x 384 mm
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * CELL_MM for n in shape], indexing="ij", sparse=True)
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.broadcast_to((y / 130.0) ** 2 + (x / 170.0) ** 2 <= 1, shape)] = 40
    lungs = np.zeros(shape, bool)
    for cx in (-80.0, 80.0):
        lungs |= ((z / 75.0) ** 2 + (y / 100.0) ** 2 + ((x - cx) / 60.0) ** 2) <= 1
    hu[lungs] = -850
    pts = {
        "lung": (0.0, 0.0, -80.0),
        "mediastinum": (0.0, 0.0, 0.0),
        "chest_wall": (0.0, 0.0, -155.0),
        "outside": (0.0, 0.0, -185.0),
        "anterior_wall": (0.0, -118.0, -60.0),
    }
    if juxta:
        c = np.array([0.0, 0.0, -134.0])  # lung's lateral wall at x = -140: the nodule sits on it
        ball = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= 6.0**2
        hu[ball] = 40
        pts["juxta_pleural"] = tuple(c)
    return hu, pts


def cell(p, shape):
    return tuple(int(round(v / CELL_MM + (n - 1) / 2)) for v, n in zip(p, shape))


def test_lung_mask_follows_the_pleura():
    hu, pts = chest_cells()
    mask, info = lung_mask_cells(hu, CELL_MM, (320.0, 384.0), axial_axis=0)
    assert info["used"], info
    assert mask[cell(pts["lung"], hu.shape)]
    assert mask[cell(pts["juxta_pleural"], hu.shape)], "a nodule on the pleura must keep its centre in the mask"
    for name in ("mediastinum", "chest_wall", "outside", "anterior_wall"):
        assert not mask[cell(pts[name], hu.shape)], name
    # tight: the mask is the lungs plus a few millimetres, not a 20 mm halo
    lungs = hu < -400
    assert mask.sum() < 1.35 * lungs.sum()


def chest_with_airways():
    """`chest_cells` (z = array axis 0, head at the last index) with a 16 mm trachea down the
    midline from the head end to the middle, where a main bronchus runs to the right lung."""
    hu, pts = chest_cells()
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * CELL_MM for n in hu.shape], indexing="ij", sparse=True)
    trachea = np.broadcast_to(((y + 20.0) ** 2 + x**2 <= 8.0**2) & (z >= 0), hu.shape)
    bronchus = np.broadcast_to(((y + 20.0) ** 2 + z**2 <= 6.0**2) & (x <= 0) & (x >= -90), hu.shape)
    hu[trachea | bronchus] = -1000
    pts["trachea_lumen"] = (40.0, -20.0, 0.0)
    pts["paratracheal"] = (40.0, -20.0, 11.0)  # 3 mm outside the trachea's wall: within the 4 mm margin
    return hu, pts


def test_lung_mask_leaves_out_the_large_airways():
    hu, pts = chest_with_airways()
    for head_last in (True, None):
        mask, info = lung_mask_cells(hu, CELL_MM, (320.0, 384.0), axial_axis=0, head_last=head_last, lr_axis=2)
        assert info["used"] and "large airways" in info["reason"], info
        for name in ("trachea_lumen", "paratracheal", "mediastinum", "chest_wall"):
            assert not mask[cell(pts[name], hu.shape)], name
        for name in ("lung", "juxta_pleural"):
            assert mask[cell(pts[name], hu.shape)], name
    # the same chest seen feet first: the trachea is found at the other end
    flipped, info = lung_mask_cells(hu[::-1], CELL_MM, (320.0, 384.0), axial_axis=0, head_last=False, lr_axis=2)
    assert "large airways" in info["reason"]
    c = cell(pts["paratracheal"], hu.shape)
    assert not flipped[hu.shape[0] - 1 - c[0], c[1], c[2]]
    # told the wrong end, it finds no trachea there and leaves the mask as it was
    wrong, info = lung_mask_cells(hu, CELL_MM, (320.0, 384.0), axial_axis=0, head_last=False, lr_axis=2)
    assert "no trachea" in info["reason"]


def test_lung_mask_on_thick_slices_and_partial_field():
    hu, pts = chest_cells()
    thick = hu[::2]  # 8 mm slices
    mask, info = lung_mask_cells(thick, (8.0, CELL_MM, CELL_MM), (320.0, 384.0), axial_axis=0)
    assert info["used"]
    c = cell(pts["juxta_pleural"], hu.shape)
    assert mask[c[0] // 2, c[1], c[2]]
    assert not mask[c[0] // 2, c[1], cell(pts["mediastinum"], hu.shape)[2]]
    narrow, info = lung_mask_cells(hu[:, :, 40:56], CELL_MM, (320.0, 64.0), axial_axis=0)
    assert narrow is None and "field of view" in info["reason"]


def test_flipped_cube_maps_nodules_through_its_header():
    """A cube stored with direction (-1, -1, 1): world = origin - index in x and y."""
    origin = np.array([100.0, 50.0, -200.0])
    direction = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    centre_world = origin + np.array([-25.0, -25.0, 25.0])
    other_world = origin + np.array([-10.0, -40.0, 30.0])
    v, inside = _nodules_in_cube(np.stack([centre_world, other_world]), origin, (50, 50, 50), direction=direction)
    assert inside.all()
    np.testing.assert_allclose(v[0], [25, 25, 25])
    np.testing.assert_allclose(v[1], [30, 40, 10])  # z, y, x voxels
    v_wrong, inside_wrong = _nodules_in_cube(np.stack([centre_world]), origin, (50, 50, 50))
    assert not inside_wrong.all()  # origin + index would put it outside the cube


def test_real_flipped_cubes_have_their_nodule_at_the_centre():
    from napari_resmtnet.training.datasets import load_cube_folder

    root = data_path("ct_nodule_cubes")
    import csv

    rows = list(csv.DictReader(open(root / "nodules.csv")))
    uids = {r["seriesuid"] for r in rows}
    import SimpleITK as sitk

    flipped = [
        u
        for u in sorted(uids)[:200]
        if sitk.ReadImage(str(root / "images" / next(r["cube"] for r in rows if r["seriesuid"] == u))).GetDirection()[0]
        < 0
    ]
    if not flipped:
        pytest.skip("no flipped cube among the first series")
    for rec in load_cube_folder(root, seriesuids=flipped[:2]):
        np.testing.assert_allclose(rec.centers[rec.main], [25, 25, 25], atol=0.6)


def test_mask_extent_and_record_extents():
    m = np.zeros((50, 50, 50), np.uint8)
    m[20:31, 18:33, 22:29] = 1
    m[2, 2, 2] = 1  # a stray voxel: not the nodule
    np.testing.assert_array_equal(mask_extent(m), [11, 15, 7])
    rec = CubeRecord(
        "c",
        "u",
        np.zeros((50, 50, 50), np.int16),
        np.array([[25.0, 25, 25], [5, 5, 5]]),
        np.array([12.0, 6.0]),
        np.array([1, -1]),
        mask=m,
    )
    ext = rec.extents()
    np.testing.assert_array_equal(ext[0], [11, 15, 7])
    np.testing.assert_array_equal(ext[1], [6, 6, 6])
    assert rec.target()["extents"].shape == (2, 3)


def test_per_axis_size_head_trains_and_decodes_boxes_per_axis():
    torch.manual_seed(0)
    cfg = ResMTNetConfig(widths=(8, 8, 16, 16), head_width=8, size_per_axis=True)
    net = ResMTNet(cfg)
    x = torch.randn(2, 1, 32, 32, 32)
    tg = [
        {
            "centers": np.array([[16.0, 16, 16]]),
            "diameters": np.array([10.0]),
            "malignant": np.array([1.0]),
            "extents": np.array([[6.0, 12.0, 9.0]]),
        },
        {"centers": np.zeros((0, 3)), "diameters": np.zeros(0)},
    ]
    losses = net(x, tg)
    assert torch.isfinite(losses["loss"]) and losses["size"] > 0
    losses["loss"].backward()
    maps = net.forward_maps(x)
    assert maps["size"].shape[1] == 3
    maps["size"] = torch.zeros_like(maps["size"])
    maps["size"][:, 0], maps["size"][:, 1], maps["size"][:, 2] = np.log(1.5), np.log(3.0), np.log(2.25)
    d = decode(maps, score_floor=0.0, max_detections=1)[0]
    size = (d["boxes"][0, 3:] - d["boxes"][0, :3]).numpy()
    np.testing.assert_allclose(size, [6.0, 12.0, 9.0], rtol=1e-5)


def test_warm_start_grows_the_size_head_and_adds_the_second_stage():
    from napari_resmtnet.training.train import warm_start

    base_cfg = ResMTNetConfig(widths=(8, 8, 16, 16), head_width=8)
    base = ResMTNet(base_cfg)
    init = {"network": base_cfg.to_dict(), "state_dict": base.state_dict()}
    cfg = ResMTNetConfig(widths=(8, 8, 16, 16), head_width=8, size_per_axis=True, fpr=True)
    model = ResMTNet(cfg)
    fresh = warm_start(model, init, cfg)
    assert fresh and all(k.startswith("fpr.") for k in fresh)
    for k in range(3):
        assert torch.equal(model.size.weight[k], base.size.weight[0])
    torch.testing.assert_close(model.backbone.stem[0].weight, base.backbone.stem[0].weight)
    other = ResMTNetConfig(widths=(8, 8, 16, 32), head_width=8)
    with pytest.raises(RuntimeError, match="widths"):
        warm_start(ResMTNet(other), init, other)


def test_second_stage_rescores_candidates_from_patches():
    cfg = ResMTNetConfig(widths=(8, 8, 16, 16), head_width=8, fpr=True, fpr_patch=16, fpr_width=4)
    net = ResMTNet(cfg).eval()
    vol = torch.randn(40, 40, 40)
    p = net.rescore(vol, np.array([[20.0, 20, 20], [0.0, 39, 2]]))
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    combined = net.combine(torch.tensor([0.9, 0.9]), p)
    torch.testing.assert_close(combined, (0.9 * p) ** 0.5)


def test_candidate_patches_replicate_the_edge():
    vol = torch.arange(10 * 10 * 10, dtype=torch.float32).reshape(10, 10, 10)
    p = candidate_patches(vol, np.array([[5.0, 5, 5], [0.0, 0, 9]]), side=4)
    assert p.shape == (2, 1, 4, 4, 4)
    torch.testing.assert_close(p[0, 0], vol[3:7, 3:7, 3:7])
    assert p[1, 0, 0, 0, 0] == vol[0, 0, 7] and p[1, 0, 0, 0, -1] == vol[0, 0, 9]  # clamped at the border


def test_negative_crop_keeps_lesions_as_positives():
    hu = np.zeros((60, 80, 80), np.int16)
    neg = NegativeScan("s", hu, np.array([[30.0, 40, 40]]), np.array([[30.0, 50, 45]]), np.array([[8.0, 10, 9]]))
    crop, lc, le = negative_crop(neg, [30, 40, 40], side=50)
    assert crop.shape == (50, 50, 50)
    np.testing.assert_allclose(lc, [[25, 35, 30]])
    np.testing.assert_allclose(le, [[8, 10, 9]])
    crop, lc, le = negative_crop(neg, [30, 10, 10], side=50)
    assert len(lc) == 0


def test_whole_scan_matching():
    les = [Lesion(np.array([10.0, 20.0, 30.0]), np.array([20.0, 20.0, 10.0]), "tumour_box")]
    m = match_scan(np.array([[10.0, 20.0, 30.0], [24.0, 20.0, 30.0], [10.0, 20.0, 60.0]]), les)
    np.testing.assert_array_equal(m, [0, 0, -1])


def test_split_keeps_lidc_slabs_with_their_cubes():
    split = {"train": ["1.2.3"], "val": ["4.5.6"]}
    assert scan_split("lidc_0001_slab.nii.gz", "1.2.3", split) == "train"
    assert scan_split("lidc_0009_slab.nii.gz", "4.5.6", split) == "val"
    assert scan_split("lidc_0002_slab.nii.gz", "7.8.9", split) == "val"  # no cubes: never trained on
    assert scan_split("lung1_image.nrrd", "x", split) == "test"
    assert scan_split("ricord_419639-000082.nii.gz", "x", split) == "train"


def test_lung1_mask_keeps_its_nodule():
    """The bundled sample: the labelled nodule's centre lies in the lung mask."""
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.io.formats import load_scan
    from napari_resmtnet.resources import __file__ as res_file
    from pathlib import Path

    samples = Path(res_file).parent / "samples"
    scan = load_scan(samples / "lung1.mha")
    label = load_scan(samples / "lung1_label.mha")
    pred = Predictor("CT", device="cpu")
    vol, hu_cells, _ = pred._preprocess(scan)
    mask, info = scan_lung_mask(scan, hu_cells, 4.0)
    assert info["used"], info
    idx = np.argwhere(label.array > 0).mean(0)
    c = np.round(idx * np.asarray(scan.spacing) / 4.0).astype(int)
    assert mask[tuple(c)]
    assert isinstance(scan, Scan)
