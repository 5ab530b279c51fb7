"""The bundled CT weights on five fixed real validation cubes (never seen in training)."""

import numpy as np
import pytest

from conftest import data_path

P = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
# cube file -> expected label; obvious cases: rating 5 and >= 20 mm, or rating 1 and <= 6 mm
CUBES = {
    P + "102681962408431413578140925249_dcm_0.mha": "malignant",  # 23 mm
    P + "107109359065300889765026303943_dcm_0.mha": "malignant",  # 31 mm
    P + "163901773171373940247829492387_dcm_0.mha": "malignant",  # 24 mm
    P + "107351566259572521472765997306_dcm_1.mha": "benign",  # 5 mm
    P + "121824995088859376862458155637_dcm_0.mha": "benign",  # 6 mm
}


@pytest.fixture(scope="module")
def bundled():
    from napari_resmtnet.inference.weights import bundled_entry, load_checkpoint, registry

    if "CT" not in registry():
        pytest.skip("no bundled CT weights in this checkout")
    e = bundled_entry("CT")
    return load_checkpoint(e["path"], e["sha256"])


@pytest.mark.data
@pytest.mark.parametrize("cube", sorted(CUBES))
def test_bundled_weights_find_and_grade_real_nodules(cube, bundled):
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.io.formats import load_scan

    path = data_path("ct_nodule_cubes", "images", cube)
    uid = cube.split("_dcm_")[0]
    assert uid in bundled["split"]["val"], "test cubes must come from the validation split"
    scan = load_scan(path)
    det = Predictor("CT", device="cpu").predict(scan)
    above = det.above(det.meta["threshold"])
    assert len(above) >= 1
    best = int(np.argmax(above.probability))
    centre = scan.index_to_world([[25, 25, 25]])[0]  # cube files are centred on their nodule
    assert np.linalg.norm(above.centers_world()[best] - centre) <= 6.0
    assert above.labels[best] == CUBES[cube]


def structure_free_phantom(shape=(300, 512, 512), spacing=(1.25, 0.7, 0.7), seed=0):
    """Two ellipsoidal lungs of -860 HU with Gaussian noise (sigma 20 HU) in a 40 HU body
    ellipse, air outside: nothing a detector should call a nodule."""
    from napari_resmtnet.scan import Scan

    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)], indexing="ij", sparse=True)
    arr = np.full(shape, -1000, np.int16)
    body = np.broadcast_to((y / 150.0) ** 2 + (x / 170.0) ** 2 <= 1, shape)
    arr[body] = 40
    for cx in (-75.0, 75.0):
        lung = (z / 170.0) ** 2 + (y / 110.0) ** 2 + ((x - cx) / 60.0) ** 2 <= 1
        arr[lung] = -860
    noise = rng.normal(0, 20, size=shape).astype(np.float32)
    arr = np.where(body, arr + noise, arr).astype(np.int16)
    origin = tuple(-(np.asarray(shape) - 1) / 2 * sp)
    return Scan(arr, spacing, origin, np.eye(3), "CT", seriesuid="phantom")


@pytest.mark.slow
def test_structure_free_phantom_has_no_detection(bundled):
    from napari_resmtnet.inference.predictor import Predictor

    det = Predictor("CT", device="cpu").predict(structure_free_phantom())
    assert det.meta["lung_mask"]["used"], det.meta["lung_mask"]
    above = det.above(det.meta["threshold"])
    assert len(above) == 0, (above.probability, above.centers_world())


def _lung1():
    from pathlib import Path

    from napari_resmtnet.io.formats import load_scan
    from napari_resmtnet.resources import __file__ as res
    from napari_resmtnet.training.wholescan import _lung1_lesion

    samples = Path(res).parent / "samples"
    return load_scan(samples / "lung1.mha"), _lung1_lesion(samples / "lung1_label.mha")


@pytest.fixture(scope="module")
def lung1_detections(bundled):
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.training.wholescan import match_scan

    scan, lesion = _lung1()
    det = Predictor("CT", device="cpu").predict(scan)
    above = det.above(det.meta["threshold"])
    return above, match_scan(above.centers_world_xyz(), [lesion]), lesion


@pytest.mark.slow
def test_lung1_nodule_found_with_at_most_two_others(lung1_detections):
    """The bundled sample (a test scan no training or threshold choice read): the labelled
    nodule is found and there are at most 2 other detections at the default threshold."""
    above, m, _ = lung1_detections
    assert (m == 0).any(), "the lung1 nodule is not found"
    assert int((m < 0).sum()) <= 2, f"{int((m < 0).sum())} other detections (at most 2)"
    best = int(np.argmax(above.probability))
    assert m[best] == 0, "the nodule is not the most probable detection"


@pytest.mark.slow
def test_lung1_box_follows_the_label(lung1_detections):
    """The box comes from the nodule's segmented mask (5 mm slices): within 5 mm of the
    label's extent on each axis (the size head alone gave about 30 x 30 x 20 mm)."""
    above, m, lesion = lung1_detections
    best = int(np.argmax(np.where(m == 0, above.probability, -1)))
    size_xyz = above.sizes_mm()[best][::-1]
    assert np.all(np.abs(size_xyz - lesion.size_xyz) <= 5.0), (size_xyz, lesion.size_xyz)


@pytest.mark.data
def test_bundled_boxes_follow_the_nodule_size(bundled):
    """On the same validation cubes (5 to 31 mm): the box's mean extent (from the nodule's
    segmented mask) is within 20 % of the annotated diameter in the median (measured 10 %)
    and within 40 % on every cube, so small nodules get small boxes and large ones large
    boxes. The worst is the 31 mm nodule, whose mask falls 37 % short (model card, 'Sizes';
    the size head alone: within 35 %, but 30 mm boxes for lung1's 14 mm nodule)."""
    import csv

    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.io.formats import load_scan

    root = data_path("ct_nodule_cubes")
    diam = {r["cube"]: float(r["diameter_mm"]) for r in csv.DictReader(open(root / "nodules.csv"))}
    pred = Predictor("CT", device="cpu")
    rel = []
    for cube in sorted(CUBES):
        scan = load_scan(root / "images" / cube)
        det = pred.predict(scan)
        centre = scan.index_to_world([[25, 25, 25]])[0]
        k = int(np.argmin(np.linalg.norm(det.centers_world() - centre, axis=1)))
        rel.append(abs(det.sizes_mm()[k].mean() - diam[cube]) / diam[cube])
    assert np.median(rel) <= 0.20 and max(rel) <= 0.40, rel
