"""Bundled sample data: files present and small, read through the reader's code path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from napari_resmtnet._sample_data import (
    SAMPLE_FILES,
    sample_ct,
    sample_cube,
    sample_cxr,
    sample_path,
)

DATA = Path(os.environ.get("RESMTNET_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def test_sample_paths_exist_and_budget():
    total = 0
    for key in SAMPLE_FILES:
        p = sample_path(key)
        assert p.is_file() and p.stat().st_size > 0
        total += p.stat().st_size
    assert total < 11e6, f"samples take {total / 1e6:.1f} MB; keep them small"
    with pytest.raises(KeyError):
        sample_path("nope")
    readme = (sample_path("lung1").parent / "README.md").read_text()
    for word in ("BSD-3", "CC BY 4.0", "CC BY 3.0", "Apache-2.0", "lung1", "node21_3"):
        assert word in readme


def test_sample_ct():
    ((data, kw, kind),) = sample_ct()
    assert kind == "image" and data.ndim == 3 and data.dtype == np.int16
    assert data.shape == (48, 313, 471)
    assert kw["scale"] == pytest.approx((5.0, 0.5703125, 0.5703125))
    assert kw["translate"] == pytest.approx((-777.5, -215.5, -134.0234375))
    assert kw["metadata"]["modality"] == "CT"
    assert kw["contrast_limits"] == (-1350.0, 150.0)
    assert data.min() == -1024 and data.max() > 1000  # real HU (air, bone)


def test_sample_label_on_the_same_grid_marks_a_nodule():
    from napari_resmtnet.io.formats import load_scan

    ct = load_scan(sample_path("lung1"))
    lab = load_scan(sample_path("lung1_label"))
    assert lab.shape == ct.shape and lab.spacing == ct.spacing and lab.origin == ct.origin
    mask = lab.array > 0
    assert mask.sum() == 837
    # a soft-tissue nodule: its voxels are much denser than lung air
    assert np.median(ct.array[mask]) > -300


def test_sample_cube():
    ((data, kw, _),) = sample_cube()
    assert data.shape == (50, 50, 50) and data.dtype == np.int16
    assert kw["scale"] == pytest.approx((1.0, 1.0, 1.0))
    assert kw["metadata"]["seriesuid"].startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.109002525524522225658609808059")
    assert data[25, 25, 25] > -300  # the nodule is at the centre


def test_sample_cxr():
    ((data, kw, _),) = sample_cxr()
    assert data.shape == (1024, 1024) and data.dtype == np.uint16
    assert kw["scale"] == pytest.approx((0.2693, 0.2692), abs=1e-4)
    assert kw["metadata"]["modality"] == "CXR" and kw["metadata"]["warnings"] == []


@pytest.mark.data
def test_sample_ct_is_an_exact_crop_of_lung1():
    src = DATA / "ct_scans" / "lung1_image.nrrd"
    if not src.is_file():
        pytest.skip(f"real data not found at {src} (set RESMTNET_DATA)")
    from napari_resmtnet.io.formats import load_scan

    full, crop = load_scan(src), load_scan(sample_path("lung1"))
    z, y, x = np.round(full.world_to_index(crop.origin)[0]).astype(int)
    assert z == 0
    np.testing.assert_array_equal(crop.array, full.array[:, y : y + crop.shape[1], x : x + crop.shape[2]])


# --------------------------------------------------------------------------- in napari


@pytest.mark.gui
@pytest.mark.parametrize("key,ndim", [("lung1", 3), ("cube", 3), ("cxr", 2)])
def test_open_sample(make_napari_viewer, key, ndim):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-resmtnet", key)
    assert len(layers) == 1
    assert layers[0].ndim == ndim and layers[0].metadata["path"].endswith(SAMPLE_FILES[key])


@pytest.mark.gui
@pytest.mark.slow
def test_open_sample_with_detection(make_napari_viewer):
    for mod in ("napari_resmtnet.inference.predictor", "napari_resmtnet.layers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not available yet")
    from napari_resmtnet.inference import predictor as inference
    from napari_resmtnet import layers as layers_mod

    if not hasattr(layers_mod, "detections_to_layer_data"):
        pytest.skip("napari_resmtnet.layers.detections_to_layer_data is not available yet")
    try:
        inference.Predictor(modality="CT")
    except Exception as e:  # no bundled weights yet: nothing to detect with
        pytest.skip(f"CT predictor unavailable: {e}")
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-resmtnet", "lung1_detect")
    assert len(layers) >= 1 and layers[0].metadata["modality"] == "CT"


def test_sample_ct_detect_without_detection_modules_says_so(monkeypatch):
    from napari_resmtnet import _sample_data

    def no_torch(*args, **kwargs):
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(_sample_data, "Predictor", no_torch)  # an installation without torch
    with pytest.raises(RuntimeError, match="nodule detection is not available"):
        _sample_data.sample_ct_detect()
