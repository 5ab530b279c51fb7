"""Whole-scan inference: geometry round trips, lung mask, stitching, cancellation, devices.

The network here is either a tiny random Res-MTNet (mechanics only) or `CentroidNet`, a
stand-in with the same ``forward_maps`` contract that puts a heatmap peak on bright blobs
and regresses their exact sub-cell centre and diameter. With it, where a synthetic sphere
is reported tests the whole geometry path (resampling, windows, stitching, decoding and the
mapping back through spacing, origin and direction) without trained weights.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_resmtnet.detections import Detections
from napari_resmtnet.inference.predictor import (
    Cancelled,
    DeviceError,
    Predictor,
    PredictionError,
    predict,
    window_starts,
)
from napari_resmtnet.scan import Scan


class CentroidNet(nn.Module):
    """Stride-4 maps from the voxels above ``level`` (normalised input) within +-r voxels of
    each cell centre: heatmap ~ their count (ties broken towards the centroid), offset = their
    centroid, size = the diameter of a ball of their volume."""

    def __init__(self, nd: int, level: float, r: int = 9):
        super().__init__()
        self.nd, self.level, self.r = nd, level, r
        self.config = SimpleNamespace(spatial_dims=nd)
        self.dummy = nn.Parameter(torch.zeros(1))  # so that .to(device) has something to move

    def _box_sum(self, w):
        """Sum over the (2r+1)^nd neighbourhood of each cell centre (separable, stride 4)."""
        nd, r = self.nd, self.r
        pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
        for a in range(nd):
            k, st, pad = [1] * nd, [1] * nd, [0] * nd
            k[a], st[a], pad[a] = 2 * r + 1, 4, r
            w = pool(w, tuple(k), tuple(st), tuple(pad), count_include_pad=True) * (2 * r + 1)
        return w

    def forward_maps(self, x):
        nd = self.nd
        w = (x > self.level).float()
        den = self._box_sum(w)
        nums = []
        for a in range(nd):  # sum of (voxel - cell centre) along axis a
            shape = [1] * (nd + 2)
            shape[2 + a] = x.shape[2 + a]
            pos = torch.arange(x.shape[2 + a], dtype=torch.float32).view(shape)
            cshape = [1] * (nd + 2)
            cshape[2 + a] = den.shape[2 + a]
            centre = (4 * torch.arange(den.shape[2 + a], dtype=torch.float32)).view(cshape)
            nums.append(self._box_sum(w * pos) - centre * den)
        off = torch.cat(nums, 1) / den.clamp(min=1) / 4
        if nd == 3:
            diam = (6 * den / math.pi) ** (1 / 3)
        else:
            diam = (4 * den / math.pi) ** 0.5
        gain = 0.01 if nd == 3 else 0.1  # a 10 mm ball ~ 520 voxels, a 14 mm disc at 1.6 mm ~ 60 px
        heat = gain * den - 2 - 2 * (off**2).sum(1, keepdim=True)
        return {
            "heatmap": heat,
            "size": torch.log(diam.clamp(min=1) / 4),
            "offset": off,
            "malignancy": torch.zeros_like(den),
        }


CT_LEVEL = 0.63  # normalised CT value of about +270 HU: only the bright test spheres exceed it
AIR_BALL_LEVEL = 0.056  # -250 HU, half way between air (-1000) and the balls (+500)


def rotation(deg):
    t = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


def sphere_scan(
    shape, spacing, origin, direction, centre_index, radius_mm, hu=500.0, background=-1000.0, modality="CT"
):
    """Scan with a bright ball of ``radius_mm`` centred at fractional index ``centre_index``."""
    sp = np.asarray(spacing, float)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_index, sp))
    arr = np.where(d2 <= radius_mm**2, hu, background).astype(np.float32 if modality == "CXR" else np.int16)
    return Scan(arr, tuple(spacing), tuple(origin), np.asarray(direction, float), modality, seriesuid="test")


def ct_predictor(level=CT_LEVEL, **kw):
    kw.setdefault("device", "cpu")
    return Predictor(
        "CT",
        model=CentroidNet(3, level),
        info={"spacing_mm": 1.0, "threshold": 0.5, "name": "centroid", "version": "test"},
        **kw,
    )


@pytest.mark.parametrize(
    "spacing,direction",
    [
        ((2.5, 0.8, 0.7), np.diag([-1.0, 1.0, -1.0])),  # flipped z and x
        ((1.25, 0.66, 0.66), rotation(25) @ np.diag([1.0, -1.0, 1.0])),  # oblique, flipped y
        ((0.6, 1.7, 1.3), np.eye(3)[[0, 2, 1]] @ np.diag([1, 1, -1.0])),  # permuted axes
    ],
)
def test_sphere_reported_at_its_world_position(spacing, direction):
    shape = (int(60 / spacing[0]), int(70 / spacing[1]), int(64 / spacing[2]))
    centre_index = np.array(shape) * np.array([0.43, 0.55, 0.61]) + 0.37
    scan = sphere_scan(shape, spacing, (-310.2, 45.5, -120.3), direction, centre_index, radius_mm=5.0)
    truth = scan.index_to_world(centre_index)[0]
    det = ct_predictor(AIR_BALL_LEVEL).predict(scan).above(0.5)
    assert len(det) == 1, det.probability
    err = np.linalg.norm(det.centers_world()[0] - truth)
    assert err <= 1.0, (det.centers_world()[0], truth, err)
    assert abs(det.diameter_mm()[0] - 10.0) <= 1.5
    assert det.geometry == Detections.geometry_of(scan)
    assert det.meta["lung_mask"]["used"] is False  # a 60-70 mm field of view: no restriction


def test_radiograph_disc_reported_at_its_world_position():
    spacing = (0.3, 0.25)
    direction = np.array([[1.0, 0.0], [0.0, -1.0]])
    shape = (900, 1100)
    centre = np.array([371.4, 702.8])
    scan = sphere_scan(
        shape, spacing, (12.5, -40.0), direction, centre, radius_mm=7.0, hu=3000.0, background=0.0, modality="CXR"
    )
    ramp = np.linspace(0.0, 1000.0, shape[1], dtype=np.float32)[None, :]  # gives the percentiles a range
    scan.array = np.where(scan.array > 0, scan.array, ramp)
    # normalised: ramp -> about [-1, 1], disc -> 2 (clipped); level 1.2 = about 1090 here
    pred = Predictor("CXR", model=CentroidNet(2, 1.2), info={"spacing_mm": 1.6, "threshold": 0.5}, device="cpu")
    det = pred.predict(scan).above(0.5)
    assert len(det) == 1
    assert np.linalg.norm(det.centers_world()[0] - scan.index_to_world(centre)[0]) <= 1.6
    assert det.boxes.shape == (1, 4)
    assert abs(det.diameter_mm()[0] - 14.0) <= 2.5
    assert det.meta["lung_mask"]["used"] is False


def synthetic_chest(shape=(56, 100, 100), spacing=(2.5, 1.6, 1.6), nodules=()):
    """A small chest and upper abdomen (140 x 160 x 160 mm): air outside, a +40 HU body
    ellipse, two -850 HU lungs (about 400 mL) in the upper 100 mm, +500 HU balls of 5 mm
    radius at world offsets (z, y, x) mm from the volume centre."""
    sp = np.asarray(spacing, float)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)], indexing="ij", sparse=True)
    arr = np.full(shape, -1000, np.int16)
    body = (y / 70.0) ** 2 + (x / 78.0) ** 2 <= 1
    arr[np.broadcast_to(body, shape)] = 40
    for cx in (-38.0, 38.0):
        lung = ((z - 25.0) / 36.0) ** 2 + (y / 48.0) ** 2 + ((x - cx) / 28.0) ** 2 <= 1
        arr[lung] = -850
    for c in nodules:
        ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 5.0**2
        arr[ball] = 500
    origin = -(np.asarray(shape) - 1) / 2 * sp
    return Scan(arr, spacing, tuple(origin), np.eye(3), "CT", seriesuid="chest")


IN_LUNG = (30.0, -15.0, 42.0)
IN_BODY = (25.0, -63.0, 0.0)  # anterior chest wall, about 30 mm from either lung


def test_whole_scan_lung_mask_restricts_and_skips_windows():
    scan = synthetic_chest(nodules=[IN_LUNG, IN_BODY])
    det = ct_predictor(window=48, overlap=16).predict(scan)
    found = det.above(0.5).centers_world()
    assert det.meta["lung_mask"]["used"] is True, det.meta["lung_mask"]
    assert 300 < det.meta["lung_mask"]["volume_ml"] < 500
    win = det.meta["windows"]
    (z0, z1), grid_z = win["region"][0], win["grid"][0]
    assert z0 >= 20 and grid_z - 12 <= z1 <= grid_z  # the abdomen below the lungs is not searched
    assert len(found) == 1 and np.linalg.norm(found[0] - np.array(IN_LUNG)) <= 1.0

    everywhere = ct_predictor(window=96, overlap=16, lung_mask=False).predict(scan).above(0.5).centers_world()
    assert len(everywhere) == 2
    assert min(np.linalg.norm(everywhere - np.array(IN_BODY), axis=1)) <= 1.0


def test_lung_mask_on_a_coronal_volume():
    """The same chest stored with the head-feet axis second (a coronal acquisition)."""
    ax = synthetic_chest(nodules=[IN_LUNG, IN_BODY])
    perm = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # array (y, z, x) -> world (z, y, x)
    cor = Scan(
        np.ascontiguousarray(ax.array.transpose(1, 0, 2)),
        (ax.spacing[1], ax.spacing[0], ax.spacing[2]),
        ax.origin,
        perm,
        "CT",
        seriesuid="coronal",
    )
    det = ct_predictor(window=96, overlap=16).predict(cor)
    assert det.meta["lung_mask"]["used"] is True, det.meta["lung_mask"]
    found = det.above(0.5).centers_world()
    assert len(found) == 1 and np.linalg.norm(found[0] - np.array(IN_LUNG)) <= 1.0


def test_cube_and_whole_scan_share_the_api():
    """A 50 mm cube cut from the chest (no restriction) finds the same nodule."""
    scan = synthetic_chest(nodules=[IN_LUNG])
    i = np.round(scan.world_to_index([IN_LUNG])[0]).astype(int)
    half = np.round(25.0 / np.asarray(scan.spacing)).astype(int)
    lo = i - half
    cube_arr = scan.array[lo[0] : i[0] + half[0], lo[1] : i[1] + half[1], lo[2] : i[2] + half[2]].copy()
    cube = Scan(cube_arr, scan.spacing, tuple(scan.index_to_world(lo)[0]), scan.direction, "CT", seriesuid="cube")
    det = predict(cube, model=CentroidNet(3, CT_LEVEL), info={"spacing_mm": 1.0, "threshold": 0.5}, device="cpu")
    assert det.meta["lung_mask"]["used"] is False
    assert det.meta["windows"]["run"] == 1
    found = det.above(0.5).centers_world()
    assert len(found) == 1 and np.linalg.norm(found[0] - np.array(IN_LUNG)) <= 1.0


def test_stitched_windows_equal_one_window():
    """The model sees +-9 voxels; with 24 voxels of overlap stitching must be exact."""
    scan = synthetic_chest(nodules=[IN_LUNG, IN_BODY, (-20.0, 25.0, -35.0)])
    many = ct_predictor(window=56, overlap=24, lung_mask=False).predict(scan)
    one = ct_predictor(window=512, lung_mask=False).predict(scan)
    assert many.meta["windows"]["run"] > 8 and one.meta["windows"]["run"] == 1
    assert len(many.above(0.5)) == 3
    np.testing.assert_allclose(many.boxes, one.boxes, atol=1e-4)
    np.testing.assert_allclose(many.probability, one.probability, atol=1e-5)


def test_cancel_stops_within_one_window():
    scan = synthetic_chest()
    cancel = threading.Event()
    after = []

    def progress(fraction, stage):
        if cancel.is_set():
            after.append(stage)
        if stage == "network" and fraction > 0.1:
            cancel.set()

    pred = ct_predictor(window=32, overlap=8, lung_mask=False)
    with pytest.raises(Cancelled):
        pred.predict(scan, progress=progress, cancel=cancel)
    assert after.count("network") <= 1
    # a callable works too, and cancels before any window
    with pytest.raises(Cancelled):
        pred.predict(scan, cancel=lambda: True)


def test_progress_is_monotonic_and_ends_at_one():
    seen = []
    ct_predictor(window=64, overlap=16).predict(synthetic_chest(), progress=lambda f, s: seen.append((f, s)))
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and fr[0] == 0.0 and fr[-1] == 1.0
    assert {"preprocessing", "lung mask", "network", "postprocessing"} <= {s for _, s in seen}


def test_random_resmtnet_runs_deterministically_on_windows():
    from napari_resmtnet.model.network import ResMTNet, ResMTNetConfig

    torch.manual_seed(0)
    net = ResMTNet(ResMTNetConfig(spatial_dims=3, widths=(4, 8, 8, 8), blocks=(1, 1, 1), head_width=8))
    with torch.no_grad():
        net.heatmap.bias.fill_(0.0)  # p = 0.5 prior: plenty of candidates to compare
    scan = sphere_scan((24, 44, 36), (1.5, 0.9, 1.1), (3.0, -2.0, 7.0), np.eye(3), (12, 22, 18), 4.0)
    p = Predictor("CT", model=net, info={"spacing_mm": 1.0, "threshold": 0.4}, device="cpu", window=32, overlap=8)
    a, b = p.predict(scan), p.predict(scan)
    assert a.meta["windows"]["run"] > 1 and len(a) > 0
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.probability, b.probability)
    assert p.threshold == 0.4 and a.meta["threshold"] == 0.4
    assert a.meta["model_info"]["name"] == "ResMTNet"
    assert (a.probability >= 0.05).all() and ((a.malignancy >= 0) & (a.malignancy <= 1)).all()
    lo, hi = a.boxes[:, :3], a.boxes[:, 3:]
    assert (hi > lo).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        ct_predictor(device="cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        ct_predictor(device="tpu-9")


def test_wrong_inputs_are_clear_errors():
    scan2d = sphere_scan((40, 40), (1, 1), (0, 0), np.eye(2), (20, 20), 3, modality="CXR")
    with pytest.raises(PredictionError, match="CXR scan given to the CT model"):
        ct_predictor().predict(scan2d)
    with pytest.raises(PredictionError, match="multiple of 4"):
        ct_predictor(window=30)
    with pytest.raises(PredictionError, match="expected a Scan or a path"):
        predict(42)


@pytest.mark.parametrize("window,overlap", [(128, 32), (64, 16), (16, 12), (48, 0)])
def test_window_starts_cover_the_range_with_overlap(window, overlap):
    for size in (16, 64, 100, 128, 132, 372, 376, 752):
        for lo, hi in ((0, size), (size // 4 // 4 * 4, size - size // 8 // 4 * 4), (0, 16)):
            starts, w = window_starts(size, window, overlap, lo, hi)
            assert w <= max(window, 16) and w % 4 == 0
            assert starts[0] <= lo and starts[-1] + w >= hi and starts[-1] + w <= size
            assert all(s % 4 == 0 for s in starts)
            assert all(b - a <= w - overlap for a, b in zip(starts, starts[1:])), (size, lo, hi, starts, w)
            if len(starts) > 1:  # no more windows than needed
                assert (len(starts) - 2) * (window - overlap) + window < hi - lo + 4 * len(starts)


def test_absurd_spacing_is_refused_before_allocating_the_grid():
    """20 mm voxels make a 64^3 volume a 1280^3 grid at 1 mm: refused with a message."""
    import numpy as np
    import pytest

    from napari_resmtnet.inference.predictor import PredictionError, Predictor
    from napari_resmtnet.model import ResMTNet, ResMTNetConfig
    from napari_resmtnet.scan import Scan

    net = ResMTNet(ResMTNetConfig(widths=(8, 8, 16, 16), blocks=(1, 1, 1), head_width=8)).eval()
    p = Predictor(
        "CT",
        model=net,
        info={"spacing_mm": 1.0, "threshold": 0.5, "name": "t", "version": "0", "sha256": ""},
        device="cpu",
    )
    scan = Scan(np.zeros((64, 64, 64), np.int16), (20.0, 20.0, 20.0), (0, 0, 0), np.eye(3), "CT", path="big.mha")
    with pytest.raises(PredictionError, match="big.mha: .*GB.*spacing"):
        p.predict(scan)
