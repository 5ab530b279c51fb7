"""What the 3D view shows: a rough lung mask and nodule spheres (Qt-free)."""
import numpy as np

from napari_resmtnet.detections import Detections
from napari_resmtnet.layers import NoduleTable, image_identity
from napari_resmtnet.scan import Scan
from napari_resmtnet.views import lung_mask, nodule_spheres


def phantom(lungs_to_the_ends=False):
    ct = np.full((30, 80, 80), -1000, np.int16)  # air around the patient
    ct[:, 8:72, 8:72] = 40                        # the body, cut by the first and last slice
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
        assert big[15, 40, 25] and big[15, 40, 55]                # both lungs
    assert not lung_mask(np.zeros((10, 40, 40), np.int16), (2.0, 1.0, 1.0))[0].any()


def test_nodule_spheres_leave_out_hidden_and_rejected():
    scan = Scan(phantom(), (2.0, 1.0, 1.0), (-30.0, 0.0, 0.0), np.eye(3), "CT")
    det = Detections([[5, 30, 20, 9, 34, 24], [10, 40, 50, 12, 44, 54], [20, 25, 25, 21, 27, 27]],
                     [0.9, 0.8, 0.1], [0.9, 0.1, 0.5], Detections.geometry_of(scan))
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.5).with_review([2], "rejected")
    centres, diam, colors, ids = nodule_spheres(t)
    assert ids.tolist() == [1] and colors.shape == (1, 4)
    np.testing.assert_allclose(centres[0], [-30 + 7 * 2.0, 32, 22])
    np.testing.assert_allclose(diam, t.diameter_mm()[:1])
