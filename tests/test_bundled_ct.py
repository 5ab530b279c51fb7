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
    P + "107351566259572521472765997306_dcm_1.mha": "benign",     # 5 mm
    P + "121824995088859376862458155637_dcm_0.mha": "benign",     # 6 mm
}


@pytest.fixture(scope="module")
def bundled():
    from napari_resmtnet.weights import bundled_entry, load_checkpoint, registry

    if "CT" not in registry():
        pytest.skip("no bundled CT weights in this checkout")
    e = bundled_entry("CT")
    return load_checkpoint(e["path"], e["sha256"])


@pytest.mark.data
@pytest.mark.parametrize("cube", sorted(CUBES))
def test_bundled_weights_find_and_grade_real_nodules(cube, bundled):
    from napari_resmtnet.inference import Predictor
    from napari_resmtnet.io import load_scan

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
