"""Reader-characteristic heads, the full-resolution mask decoder, their losses and targets, and
the per-nodule findings the Predictor reports (sizes, solid component, Lung-RADS)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_resmtnet.inference import characterise as C
from napari_resmtnet.training.datasets import attribute_row
from napari_resmtnet.model import ResMTNet, ResMTNetConfig
from napari_resmtnet.model.losses import attribute_loss, attribute_targets, fine_segmentation_loss
from napari_resmtnet.model.network import ATTRIBUTE_CHANNELS, PATCH

SMALL = dict(widths=(8, 8, 16, 16), blocks=(1, 1, 1), head_width=8)


def _net(**kw):
    torch.manual_seed(0)
    return ResMTNet(ResMTNetConfig(spatial_dims=3, attributes=True, fine_segmentation=True, **SMALL, **kw))


def test_attribute_row_from_reader_labels():
    lab = SimpleNamespace(texture="part-solid", calcified=False, spiculation=3, margin=4)
    assert attribute_row(lab) == [1.0, 0.0, 1.0, 0.0]
    lab = SimpleNamespace(texture=None, calcified=None, spiculation=2, margin=3)
    assert attribute_row(lab) == [-1.0, -1.0, 0.0, 1.0]
    assert attribute_row(None) == [-1.0] * 4


def test_heads_shapes_and_full_resolution_only_on_request():
    net = _net().eval()
    x = torch.randn(2, 1, 32, 32, 32)
    maps = net.forward_maps(x)
    assert maps["attributes"].shape == (2, ATTRIBUTE_CHANNELS, 8, 8, 8)
    assert "mask" not in maps  # never over whole scans
    maps = net.forward_maps(x, full_resolution=True)
    assert maps["mask"].shape == (2, 1, 32, 32, 32)


def test_training_step_has_every_term_and_reaches_the_new_heads():
    net = _net().train()
    x = torch.randn(2, 1, 32, 32, 32)
    mask = torch.zeros(32, 32, 32)
    mask[10:15, 10:15, 10:15] = 1
    tg = [
        {
            "centers": [[12.0] * 3],
            "diameters": [5.0],
            "malignant": [1.0],
            "attributes": [[2, 0, 1, -1]],
            "mask": mask,
            "ignore": torch.zeros_like(mask),
        },
        {"centers": [[20.0] * 3], "diameters": [8.0], "malignant": [0.0]},
    ]
    losses = net(x, tg)
    assert {"attributes", "fine_segmentation"} <= set(losses)
    assert float(losses["attributes"].detach()) > 0 and float(losses["fine_segmentation"].detach()) > 0
    losses["loss"].backward()
    assert net.attribute_head.weight.grad.abs().sum() > 0
    assert net.seg_decoder.out.weight.grad.abs().sum() > 0


def test_decoder_detail_path_sees_the_image_and_warm_starts_fresh():
    """``seg_detail``: a full-resolution path on the input; a model grown from one without it
    keeps every other weight and starts its decoder afresh."""
    from napari_resmtnet.training.train import warm_start

    base = _net()
    net = _net(seg_detail=4)
    assert net.seg_decoder.detail is not None and base.seg_decoder.detail is None
    x = torch.randn(1, 1, 32, 32, 32)
    assert net.forward_maps(x, full_resolution=True)["mask"].shape == (1, 1, 32, 32, 32)
    init = {"network": base.config.to_dict(), "state_dict": base.state_dict()}
    fresh = warm_start(net, init, net.config)
    assert fresh and all(k.startswith("seg_decoder.") for k in fresh)
    assert any(k.startswith("seg_decoder.detail.") for k in fresh) and "seg_decoder.up1.0.weight" in fresh
    assert torch.equal(net.malignancy_head.weight, base.malignancy_head.weight)
    # the detail path's output reaches the mask: a gradient flows into it
    net.train()
    net.forward_maps(x, full_resolution=True)["mask"].sum().backward()
    assert net.seg_decoder.detail[0].weight.grad.abs().sum() > 0


def test_attribute_targets_on_the_core_and_unknowns_left_out():
    cfg = ResMTNetConfig(spatial_dims=3)
    tg = [
        {"centers": [[16.0, 16.0, 16.0]], "diameters": [8.0], "attributes": [[0, -1, 1, 0]]},
        {"centers": [[8.0, 8.0, 8.0]], "diameters": [8.0]},
    ]
    tex, flags = attribute_targets(tg, (8, 8, 8), cfg, "cpu")
    assert tex[0, 4, 4, 4] == 0 and (tex[1] == -1).all()
    assert (flags[0, 0] == -1).all()  # calcification unknown: nowhere a target
    assert flags[0, 1, 4, 4, 4] == 1 and flags[0, 2, 4, 4, 4] == 0
    assert tex[0, 0, 0, 0] == -1  # far from the nodule: no target
    none = attribute_targets([tg[1]], (8, 8, 8), cfg, "cpu")
    assert attribute_loss(torch.zeros(1, 6, 8, 8, 8), *none) is None


def test_fine_segmentation_loss_prefers_the_right_mask():
    mask = torch.zeros(16, 16, 16)
    mask[4:10, 4:10, 4:10] = 1
    tg = [{"mask": mask}]
    good = fine_segmentation_loss((mask * 20 - 10)[None, None], tg)
    bad = fine_segmentation_loss((10 - mask * 20)[None, None], tg)
    assert float(good) < 0.05 < 1.0 < float(bad)
    ignore = torch.ones_like(mask)  # everything ignored: only the Dice term can remain
    assert float(fine_segmentation_loss((10 - mask * 20)[None, None], [{"mask": mask, "ignore": ignore}])) <= 1.0 + 1e-6


def _ellipsoid(shape, centre, radii):
    g = np.indices(shape, dtype=float)
    return (
        ((g - np.asarray(centre, float)[:, None, None, None]) / np.asarray(radii, float)[:, None, None, None]) ** 2
    ).sum(0) <= 1


def test_measure_a_part_solid_nodule():
    """A 14 x 10 mm (axial) ground-glass ellipsoid with a 6 mm solid core: caliper axes, volume
    and the solid component's mean diameter."""
    shape = (PATCH,) * 3
    c = (24, 24, 24)
    mask = _ellipsoid(shape, c, (4, 7, 5))
    hu = np.full(shape, -850.0)
    hu[mask] = -600.0
    core = _ellipsoid(shape, c, (3, 3, 3))
    hu[core] = 20.0
    f = C._measure(mask, hu, (1.0, 1.0, 1.0))
    assert f["long_axis_mm"] == pytest.approx(14, abs=1.0)
    assert f["short_axis_mm"] == pytest.approx(10, abs=1.0)
    assert f["volume_mm3"] == pytest.approx(4 / 3 * np.pi * 4 * 7 * 5, rel=0.1)
    assert f["solid_mean_diameter_mm"] == pytest.approx(6, abs=1.0)
    assert f["mask_extent_mm"] == pytest.approx([9, 15, 11], abs=1.0)
    r = C._lungrads({**f, "texture": "part-solid"})
    assert r["lungrads"] == "4A"  # >= 6 mm total, solid component >= 6 to < 8 mm
    assert C._lungrads({**f, "texture": "ground-glass"})["lungrads"] == "2"


def test_only_the_central_component_is_measured():
    shape = (PATCH,) * 3
    mask = _ellipsoid(shape, (24, 24, 24), (3, 3, 3)) | _ellipsoid(shape, (24, 24, 40), (4, 4, 4))
    f = C._measure(mask, np.zeros(shape), (1.0, 1.0, 1.0))
    assert f["long_axis_mm"] == pytest.approx(6, abs=1.0)


def test_characterise_gives_every_field_or_nothing():
    net = _net().eval()
    vol = torch.full((40, 40, 40), -1.0)
    out = C.characterise(net, vol, [(20.0, 20.0, 20.0), (5.0, 35.0, 20.0)], 1.0)
    assert len(out) == 2
    f = out[0]
    assert f["texture"] in ("solid", "part-solid", "ground-glass")
    assert sum(f["texture_probability"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= f[k] <= 1 for k in ("calcified", "spiculated", "ill_defined_margin"))
    plain = ResMTNet(ResMTNetConfig(spatial_dims=3, **SMALL)).eval()
    assert C.characterise(plain, vol, [(20.0, 20.0, 20.0)], 1.0) == [{}]


@pytest.mark.slow  # a subprocess or a large input: several seconds, not in `make test-fast`
def test_predictor_reports_findings_for_each_detection():
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.scan import Scan

    net = _net()
    with torch.no_grad():
        net.heatmap.bias.fill_(0.0)  # plenty of candidates
    arr = np.full((40, 48, 48), -900, np.int16)
    arr[16:24, 20:28, 20:28] = 40
    scan = Scan(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT", seriesuid="t")
    det = Predictor(  # a random decoder's masks: keep the tiny ones (the size rule is tested below)
        "CT", model=net, info={"spacing_mm": 1.0, "threshold": 0.4}, device="cpu", window=48, overlap=8, min_nodule_mm=0
    ).predict(scan)
    assert len(det) > 0 and len(det.findings) == len(det)
    n = min(int((det.probability >= 0.4).sum()), C.MAX_CHARACTERISED)
    assert n > 0 and not any(det.findings[n:])  # below the operating point: no patch pass
    assert all("texture" in f for f in det.findings[:n])
    above = det.above(0.5)
    assert len(above.findings) == len(above)


def test_boxes_follow_the_segmented_mask(monkeypatch):
    """Where the mask decoder outlines a nodule, the box is the mask's box (centre and extent,
    in the scan's millimetres); candidates without a mask keep the size head's box."""
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.scan import Scan

    net = _net()
    with torch.no_grad():
        net.heatmap.bias.fill_(0.0)

    def fake(model, volume, centres, spacing_mm, window=None):
        return [{"mask_extent_mm": [6.0, 8.0, 10.0], "mask_centre_offset_mm": [1.0, 0.0, -2.0]}] + [
            {} for _ in centres[1:]
        ]

    monkeypatch.setattr("napari_resmtnet.inference.predictor.characterise", fake)
    arr = np.full((40, 48, 48), -900, np.int16)
    scan = Scan(arr, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT", seriesuid="t")
    p = Predictor("CT", model=net, info={"spacing_mm": 1.0, "threshold": 0.4}, device="cpu", window=48, overlap=8)
    det = p.predict(scan)
    assert len(det) > 1
    np.testing.assert_allclose(det.sizes_mm()[0], [6.0, 8.0, 10.0], atol=1e-6)
    assert det.findings[0]["box_from"] == "mask" and "box_from" not in det.findings[1]
    monkeypatch.setattr("napari_resmtnet.inference.predictor.characterise", lambda m, v, c, s, w=None: [{} for _ in c])
    plain = p.predict(scan)
    shift = det.centers_world()[0] - plain.centers_world()[0]
    np.testing.assert_allclose(shift, [1.0, 0.0, -2.0], atol=1e-6)


def test_type_from_the_masks_solid_fraction():
    lo, hi = C.TEXTURE_SOLID_FRACTION
    assert C.texture_from_fraction(0.0) == "ground-glass"
    assert C.texture_from_fraction((lo + hi) / 2) == "part-solid"
    assert C.texture_from_fraction(0.9) == "solid"
    shape = (PATCH,) * 3
    mask = _ellipsoid(shape, (24, 24, 24), (4, 6, 6))
    hu = np.full(shape, -850.0)
    hu[mask] = -650.0  # a pure ground-glass nodule
    f = C._measure(mask, hu, (1.0, 1.0, 1.0))
    assert f["solid_fraction"] == 0.0 and C.texture_from_fraction(f["solid_fraction"]) == "ground-glass"


def test_characterise_keeps_the_heads_call_beside_the_masks():
    net = _net().eval()
    f = C.characterise(net, torch.full((40, 40, 40), -1.0), [(20.0, 20.0, 20.0)], 1.0)[0]
    if "solid_fraction" in f:  # the random decoder segmented something
        assert f["texture"] == C.texture_from_fraction(f["solid_fraction"])
        assert f["texture_head"] in ("solid", "part-solid", "ground-glass")


def test_candidates_smaller_than_a_nodule_are_dropped(monkeypatch):
    """A candidate at the operating point whose own mask is under a 3 mm sphere (14.1 mm³) is
    no nodule by the LIDC definition: the Predictor drops it and says how many went; one
    without a mask, or `min_nodule_mm=0`, keeps everything."""
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.scan import Scan

    net = _net()
    with torch.no_grad():
        net.heatmap.bias.fill_(0.0)
    volumes = [200.0, 10.0, None, 14.2]

    def fake(model, volume, centres, spacing_mm, window=None):
        return [({"volume_mm3": v} if v is not None else {}) for v, _ in zip(volumes + [500.0] * len(centres), centres)]

    monkeypatch.setattr("napari_resmtnet.inference.predictor.characterise", fake)
    scan = Scan(np.full((40, 48, 48), -900, np.int16), (1.0,) * 3, (0.0,) * 3, np.eye(3), "CT", seriesuid="t")
    kw = dict(model=net, info={"spacing_mm": 1.0, "threshold": 0.4}, device="cpu", window=48, overlap=8)
    everything = Predictor("CT", min_nodule_mm=0, **kw).predict(scan)
    assert (everything.probability >= 0.4).sum() >= 4 and "below_min_size" not in everything.meta
    det = Predictor("CT", **kw).predict(scan)
    assert len(det) == len(everything) - 1 and det.meta["below_min_size"] == 1
    assert [f.get("volume_mm3") for f in det.findings[:3]] == [200.0, None, 14.2]
    np.testing.assert_allclose(det.probability[0], everything.probability[0])
    np.testing.assert_allclose(det.probability[1:3], everything.probability[2:4])
    with pytest.raises(Exception, match="min_nodule_mm"):
        Predictor("CT", min_nodule_mm=-1, **kw)


def test_aligned_decoder_puts_each_coarse_cell_on_its_voxel():
    """`upsample_2x_aligned`: a point seen through a 3x3 stride-2 convolution (twice: the
    stride-4 features) comes back on the same voxel; plain interpolation puts it half a
    voxel (1.5 voxels) off, the shift the mask decoder learned before."""
    import torch.nn.functional as F

    from napari_resmtnet.model.network import upsample_2x_aligned

    conv = torch.nn.Conv3d(1, 1, 3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 1] = 1.0  # a sampling convolution: cell i is voxel 2i
    img = torch.zeros(1, 1, 40, 40, 40)
    img[0, 0, 20, 16, 8] = 1.0
    with torch.no_grad():
        s2 = conv(img)
    back = upsample_2x_aligned(s2, (40, 40, 40), "trilinear")
    assert back[0, 0, 20, 16, 8] == 1.0 and back.sum() > 1  # spread around, peaked on the voxel
    plain = F.interpolate(s2, size=(40, 40, 40), mode="trilinear", align_corners=False)
    centroid = lambda v: (torch.nonzero(v[0, 0] > 0).float() * v[0, 0][v[0, 0] > 0][:, None]).sum(0) / v.sum()
    np.testing.assert_allclose(centroid(back).numpy(), [20, 16, 8], atol=1e-4)
    np.testing.assert_allclose(centroid(plain).numpy(), [20.5, 16.5, 8.5], atol=1e-4)
    # odd sizes: 2n - 1 needs no edge plane; smaller than that is refused
    assert upsample_2x_aligned(torch.randn(1, 2, 5, 6, 7), (9, 12, 13), "trilinear").shape == (1, 2, 9, 12, 13)
    with pytest.raises(ValueError, match="smaller"):
        upsample_2x_aligned(torch.randn(1, 2, 5, 6, 7), (8, 12, 13), "trilinear")
    # the config switch reaches the decoder and keeps the old decoder's weights loadable
    old, new = _net(seg_detail=4), _net(seg_detail=4, seg_aligned=True)
    assert new.seg_decoder.aligned and not old.seg_decoder.aligned
    new.load_state_dict(old.state_dict())
