"""Res-MTNet network, joint loss, decoding and augmentation on tiny tensors."""

import numpy as np
import pytest
import torch

from napari_resmtnet.model import ResMTNet, ResMTNetConfig, decode
from napari_resmtnet.model.losses import build_targets
from napari_resmtnet.training.augment import AugmentConfig, augment_batch
from napari_resmtnet.io.preprocess import normalize_ct

SMALL = dict(widths=(8, 8, 16, 16), blocks=(1, 1, 1), head_width=8)


def _targets(nd, n=2):
    return [
        {"centers": [[12.0] * nd], "diameters": [6.0], "malignant": [1.0]},
        {"centers": [[20.0] * nd, [8.0] * nd], "diameters": [9.0, 4.0], "malignant": [0.0, -1.0]},
    ][:n]


@pytest.mark.parametrize("nd", [2, 3])
def test_forward_backward_and_inference_shapes(nd):
    torch.manual_seed(0)
    net = ResMTNet(ResMTNetConfig(spatial_dims=nd, **SMALL))
    x = torch.randn(2, 1, *(32,) * nd)
    net.train()
    losses = net(x, _targets(nd))
    assert set(losses) == {"heatmap", "size", "offset", "malignancy", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5])
    net.eval()
    out = net(x)
    assert len(out) == 2
    for o in out:
        assert o["boxes"].shape[1] == 2 * nd
        assert len(o["boxes"]) == len(o["scores"]) == len(o["malignancy"])
        assert torch.all(o["boxes"][:, nd:] > o["boxes"][:, :nd])
        assert torch.all((o["scores"] >= 0) & (o["scores"] <= 1))


def test_odd_input_sizes_work():
    net = ResMTNet(ResMTNetConfig(spatial_dims=3, **SMALL)).eval()
    maps = net.forward_maps(torch.randn(1, 1, 50, 37, 41))
    assert maps["heatmap"].shape[2:] == (13, 10, 11)


def test_cross_task_residuals_are_connected():
    """With cross-task residuals the malignancy output depends on the detection branch."""
    torch.manual_seed(0)
    cfg = ResMTNetConfig(spatial_dims=2, **SMALL)
    net = ResMTNet(cfg).eval()
    torch.nn.init.normal_(net.det_to_mal.weight)
    x = torch.randn(1, 1, 32, 32)
    base = net.forward_maps(x)["malignancy"].clone()
    with torch.no_grad():
        net.det1.conv1.weight.mul_(3.0)  # only the detection branch changes
    assert not torch.allclose(net.forward_maps(x)["malignancy"], base)
    no_cross = ResMTNet(ResMTNetConfig(spatial_dims=2, cross_task=False, **SMALL))
    assert not hasattr(no_cross, "det_to_mal")


def test_disabled_head_contributes_no_loss():
    net = ResMTNet(ResMTNetConfig(spatial_dims=2, malignancy=False, cross_task=False, **SMALL))
    losses = net(torch.randn(2, 1, 32, 32), _targets(2))
    assert float(losses["malignancy"]) == 0.0 and float(losses["heatmap"]) > 0
    with pytest.raises(ValueError):
        ResMTNet(ResMTNetConfig(detection=False, malignancy=False))


def test_targets_encode_and_decode_round_trip():
    """Dense targets decoded as if they were predictions give back the boxes."""
    cfg = ResMTNetConfig(spatial_dims=3)
    tg = [{"centers": [[21.0, 13.0, 30.0]], "diameters": [10.0], "malignant": [1.0]}]
    heat, pos, size, offset, mal = build_targets(tg, (12, 12, 12), cfg, "cpu")
    logit = torch.logit(heat.clamp(1e-4, 1 - 1e-4))[:, None]
    maps = {
        "heatmap": logit,
        "size": size[:, None],
        "offset": offset,
        "malignancy": torch.logit(mal.clamp(1e-4, 1 - 1e-4))[:, None],
    }
    det = decode(maps, score_floor=0.5)[0]
    assert len(det["boxes"]) == 1
    c = (det["boxes"][0, :3] + det["boxes"][0, 3:]) / 2
    assert torch.allclose(c, torch.tensor([21.0, 13.0, 30.0]), atol=1e-4)
    assert torch.allclose(det["boxes"][0, 3:] - det["boxes"][0, :3], torch.full((3,), 10.0), atol=1e-3)
    assert float(det["malignancy"][0]) > 0.99


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    net = ResMTNet(ResMTNetConfig(spatial_dims=2, **SMALL))
    x = torch.randn(2, 1, 32, 32)
    x[0, 0, 10:15, 10:15] += 3
    tg = _targets(2)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    first = None
    for _ in range(40):
        losses = net(x, tg)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first or {k: float(v) for k, v in losses.items()}
    last = {k: float(v) for k, v in net(x, tg).items()}
    for k in ("heatmap", "size", "malignancy", "loss"):
        assert last[k] < first[k], (k, first[k], last[k])


def test_augmentation_moves_targets_with_the_image_and_is_seeded():
    img = np.full((1, 1, 50, 50, 50), -900.0, np.float32)
    zz, yy, xx = np.mgrid[:50, :50, :50]
    img[0, 0][(zz - 30) ** 2 + (yy - 20) ** 2 + (xx - 27) ** 2 <= 16] = 100.0
    x = torch.from_numpy(normalize_ct(img))
    tg = [{"centers": [[30.0, 20.0, 27.0]], "diameters": [8.0], "malignant": [1.0]}]
    cfg = AugmentConfig(out_size=40, noise_std=0.0, window_jitter=0.0, aniso_prob=0.0)
    for seed in range(5):
        out, t = augment_batch(x, tg, cfg, torch.Generator().manual_seed(seed), "CT", centers=[[30, 20, 27]])
        z, y, xx_ = [int(round(float(v))) for v in t[0]["centers"][0]]
        assert float(out[0, 0, z, y, xx_]) > 0.0  # the bright sphere is where the target says
        assert 0.9 * 8 <= float(t[0]["diameters"][0]) <= 1.1 * 8
    a, _ = augment_batch(x, tg, AugmentConfig(), torch.Generator().manual_seed(3), "CT")
    b, _ = augment_batch(x, tg, AugmentConfig(), torch.Generator().manual_seed(3), "CT")
    assert torch.equal(a, b)


def test_flip_tta_reads_the_same_cell_under_every_flip():
    """A patch that is symmetric under all flips gives the plain centre-cell value."""
    from napari_resmtnet.model import PATCH, centre_patches, malignancy_tta

    torch.manual_seed(0)
    net = ResMTNet(ResMTNetConfig(spatial_dims=2, **SMALL)).eval()
    x = torch.randn(PATCH, PATCH)
    sym = (x + x.flip(0) + x.flip(1) + x.flip(0).flip(1))[None, None]
    tta = malignancy_tta(net, sym)
    c = (PATCH // 2) // 4
    plain = torch.sigmoid(net.forward_maps(sym)["malignancy"][0, 0, c, c])
    assert torch.allclose(tta[0], plain, atol=1e-5)
    # patches are centred on the requested voxel, padded with air outside the volume
    vol = torch.zeros(30, 40)
    vol[3, 35] = 7.0
    p = centre_patches(vol, [[3, 35]])
    assert p.shape == (1, 1, PATCH, PATCH) and float(p[0, 0, PATCH // 2, PATCH // 2]) == 7.0
    assert float(p[0, 0, 0, 0]) == -1.0


def test_label_volumes_follow_the_image_through_augmentation():
    img = np.full((1, 1, 50, 50, 50), -900.0, np.float32)
    zz, yy, xx = np.mgrid[:50, :50, :50]
    ball = (zz - 30) ** 2 + (yy - 20) ** 2 + (xx - 27) ** 2 <= 16
    img[0, 0][ball] = 100.0
    x = torch.from_numpy(normalize_ct(img))
    tg = [{"centers": [[30.0, 20.0, 27.0]], "diameters": [8.0], "malignant": [1.0]}]
    cfg = AugmentConfig(out_size=40, aniso_prob=0.0)  # noise and jitter must not touch the labels
    for seed in range(4):
        out, t = augment_batch(
            x,
            tg,
            cfg,
            torch.Generator().manual_seed(seed),
            "CT",
            centers=[[30, 20, 27]],
            aux=[{"mask": ball.astype(np.uint8), "ignore": np.zeros_like(ball, np.uint8)}],
        )
        m = t[0]["mask"]
        assert m.shape == (40, 40, 40) and float(m.max()) > 0.9 and float(m.min()) >= 0.0
        centroid = (torch.stack(torch.meshgrid(*[torch.arange(40.0)] * 3, indexing="ij")) * m).flatten(1).sum(
            1
        ) / m.sum()
        assert torch.allclose(centroid, t[0]["centers"][0], atol=0.6)
        assert float(out[0, 0][m > 0.5].mean()) > 0.2 > -0.4 > float(out[0, 0][m < 0.01].mean())  # labels on the ball
        assert float(t[0]["ignore"].abs().max()) == 0.0


def test_segmentation_head_is_auxiliary_and_trains():
    from napari_resmtnet.model.losses import occupancy

    m = torch.zeros(1, 1, 40, 40, 40)
    m[0, 0, 18:23, 10:15, 26:31] = 1  # 5^3 block centred on voxel (20, 12, 28) = cell (5, 3, 7)
    occ = occupancy(m)
    assert occ.shape == (1, 1, 10, 10, 10)
    assert tuple(int(i) for i in np.unravel_index(int(occ.argmax()), occ.shape[2:])) == (5, 3, 7)
    assert float(occ.max()) == pytest.approx(1.0)
    assert float(occ[0, 0, :4].sum()) == 0.0 and float(occ[0, 0, 7:].sum()) == 0.0  # nothing far from the block

    torch.manual_seed(0)
    net = ResMTNet(ResMTNetConfig(spatial_dims=3, segmentation=True, **SMALL))
    plain = ResMTNet(ResMTNetConfig(spatial_dims=3, **SMALL))
    assert set(net.state_dict()) - set(plain.state_dict()) == {"segmentation_head.weight", "segmentation_head.bias"}
    x = torch.randn(2, 1, 40, 40, 40)
    tg = [
        {
            "centers": [[20.0, 12.0, 28.0]],
            "diameters": [5.0],
            "malignant": [1.0],
            "mask": m[0, 0],
            "ignore": torch.zeros(40, 40, 40),
        },
        {"centers": [[20.0, 20.0, 20.0]], "diameters": [6.0], "malignant": [0.0]},
    ]  # no mask: no term
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    first = float(net(x, tg)["segmentation"])
    for _ in range(15):
        losses = net(x, tg)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert float(net(x, tg)["segmentation"]) < first
    assert "segmentation" not in plain(x, tg)  # the term exists only when the head does
    # ignored cells carry no loss: a target that disagrees everywhere but is ignored is free
    ign = dict(tg[0], mask=torch.ones(40, 40, 40), ignore=torch.ones(40, 40, 40))
    assert float(net(x[:1], [ign])["segmentation"]) == 0.0
    # inference output is unchanged in form
    det = net.eval()(x)
    assert set(det[0]) == {"boxes", "scores", "malignancy"}
