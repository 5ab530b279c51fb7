"""The box convention: conversions, IoU and NMS."""

import numpy as np
import pytest
import torch

from napari_resmtnet import boxes as B
from napari_resmtnet.scan import Scan


def test_centre_size_round_trip():
    c = np.array([[10.0, 20.0, 30.0], [1.5, 2.5, 3.5]])
    s = np.array([4.0, 6.0])
    b = B.centers_sizes_to_boxes(c, s)
    c2, s2 = B.boxes_to_centers_sizes(b)
    assert np.allclose(c, c2) and np.allclose(s2, s[:, None])


def test_world_round_trip_with_flipped_direction():
    d = np.diag([-1.0, 1.0, -1.0])
    scan = Scan(np.zeros((5, 6, 7)), spacing=(2.5, 0.7, 0.8), origin=(-100, 20, 300), direction=d, modality="CT")
    boxes = np.array([[1.0, 2.0, 3.0, 3.0, 4.0, 6.0]])
    c, s = B.voxel_boxes_to_world(boxes, scan)
    assert np.allclose(s, [[5.0, 1.4, 2.4]])
    assert np.allclose(c, scan.index_to_world([[2.0, 3.0, 4.5]]))
    back = B.world_to_voxel_boxes(c, s, scan)
    assert np.allclose(back, boxes)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_nms_matches_greedy_reference(lib):
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 30, (60, 3))
    b = B.centers_sizes_to_boxes(c, rng.uniform(3, 10, 60))
    s = rng.uniform(0, 1, 60)
    # greedy reference
    order = list(np.argsort(-s))
    ref = []
    iou = B.box_iou(b, b)
    while order:
        i = order.pop(0)
        ref.append(i)
        order = [j for j in order if iou[i, j] <= 0.1]
    if lib == "torch":
        keep = B.nms(torch.tensor(b), torch.tensor(s), 0.1).tolist()
    else:
        keep = B.nms(b, s, 0.1).tolist()
    assert keep == ref


def test_box_iou_identity_and_disjoint():
    a = np.array([[0, 0, 2, 2], [5, 5, 6, 6]], float)
    iou = B.box_iou(a, a)
    assert np.allclose(np.diag(iou), 1) and iou[0, 1] == 0
    with pytest.raises(ValueError):
        B.box_iou(np.zeros((1, 5)), np.zeros((1, 5)))
