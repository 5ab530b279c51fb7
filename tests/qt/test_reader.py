"""napari reader: claims scans, refuses foreign files, one message (no traceback) on bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_resmtnet._reader import (  # noqa: E402
    CT_CONTRAST_LIMITS,
    napari_get_reader,
    read_scan,
    scan_layer_data,
)
from napari_resmtnet.io.formats import load_scan  # noqa: E402

ROT = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])  # ITK order (x, y, z)


def write_ct(path: Path, direction=None, spacing=(0.7, 0.8, 2.5), origin=(-100.0, 20.0, -300.0)):
    arr = (np.arange(5 * 6 * 7).reshape(5, 6, 7) - 1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(img, str(path))
    return arr, img


@pytest.fixture
def notifications(monkeypatch):
    """Capture napari notifications raised by the reader."""
    from napari.utils import notifications as n

    seen = {"error": [], "warning": []}
    monkeypatch.setattr(n, "show_error", lambda msg: seen["error"].append(msg))
    monkeypatch.setattr(n, "show_warning", lambda msg: seen["warning"].append(msg))
    return seen


def test_claims_scans(tmp_path):
    p = tmp_path / "ct.mha"
    write_ct(p)
    assert napari_get_reader(str(p)) is read_scan
    assert napari_get_reader([str(p)]) is read_scan  # list of one
    assert napari_get_reader(p) is read_scan  # Path ok


def test_refuses_foreign_files(tmp_path):
    csv = tmp_path / "nodules.csv"
    csv.write_text("a,b\n1,2\n")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    fake_png = tmp_path / "fake.png"
    fake_png.write_text("not a png")
    pngs = tmp_path / "photos"
    pngs.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(pngs / "a.png"))
    odd_img = tmp_path / "disk.img"
    odd_img.write_bytes(b"\0" * 4096)
    a, b = tmp_path / "a.mha", tmp_path / "b.mha"
    write_ct(a)
    write_ct(b)
    for path in (csv, txt, fake_png, pngs, odd_img, tmp_path / "missing.mha", [str(a), str(b)], []):
        assert napari_get_reader(path if isinstance(path, list) else str(path)) is None, path


def test_layer_data_identity_direction(tmp_path, notifications):
    p = tmp_path / "ct.nrrd"
    arr, img = write_ct(p)
    layers = read_scan(str(p))
    assert len(layers) == 1
    data, kw, kind = layers[0]
    assert kind == "image"
    np.testing.assert_array_equal(data, arr)
    assert kw["scale"] == pytest.approx((2.5, 0.8, 0.7))
    assert kw["translate"] == pytest.approx((-300.0, 20.0, -100.0))
    assert "affine" not in kw
    assert kw["colormap"] == "gray"
    assert kw["contrast_limits"] == CT_CONTRAST_LIMITS
    assert kw["name"] == "ct"
    md = kw["metadata"]
    assert md["modality"] == "CT" and md["seriesuid"] == "ct" and md["path"] == str(p)
    assert md["scan"]["spacing"] == pytest.approx([2.5, 0.8, 0.7])
    assert md["scan"]["shape"] == [5, 6, 7]
    assert md["warnings"] == []
    import json

    json.dumps(md)  # JSON-able
    assert notifications == {"error": [], "warning": []}


def test_layer_data_rotated_maps_voxels_to_world(tmp_path):
    p = tmp_path / "rot.mha"
    arr, img = write_ct(p, direction=ROT)
    ((data, kw, _),) = read_scan(str(p))
    assert "affine" in kw
    # napari: world = affine @ (translate + scale * i); must equal ITK's physical point
    idx = np.array([3, 4, 5])  # array order (z, y, x)
    world = kw["affine"][:3, :3] @ (np.asarray(kw["translate"]) + np.asarray(kw["scale"]) * idx)
    expected = np.asarray(img.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx[::-1])))[::-1]
    np.testing.assert_allclose(world, expected, atol=1e-6)


def test_cxr_contrast_limits_are_percentiles(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(1000, 3000, size=(200, 300)).astype(np.uint16)
    arr[:20] = 0  # black padding border (>1 % of the image)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.2, 0.2))
    p = tmp_path / "x.mha"
    sitk.WriteImage(img, str(p))
    ((_, kw, _),) = read_scan(str(p))
    lo, hi = kw["contrast_limits"]
    assert 1000 <= lo < 1050 and 2950 < hi <= 3000
    assert kw["metadata"]["modality"] == "CXR"


def test_bad_claimed_file_gives_one_error_and_no_layers(tmp_path, notifications):
    p = tmp_path / "broken.mha"
    write_ct(p)
    p.write_bytes(p.read_bytes()[:-30])
    reader = napari_get_reader(str(p))
    assert reader is read_scan  # claimed by extension, so the user hears why it failed
    result = reader(str(p))
    assert result == [(None,)]  # napari's "nothing to add" sentinel: no second error dialog
    assert len(notifications["error"]) == 1
    msg = notifications["error"][0]
    assert "\n" not in msg and str(p) in msg and "truncated" in msg


def test_garbage_mha_is_claimed_and_explained(tmp_path, notifications):
    p = tmp_path / "download.mha"
    p.write_text("<html>Access denied</html>")
    assert napari_get_reader(str(p)) is read_scan
    assert read_scan(str(p)) == [(None,)]
    assert "not a MetaImage file" in notifications["error"][0]


def test_scan_warnings_become_notifications(tmp_path, notifications):
    from PIL import Image

    p = tmp_path / "plain.png"
    Image.fromarray(np.zeros((64, 32), np.uint8)).save(p)
    ((_, kw, _),) = read_scan(str(p))
    assert kw["scale"] == pytest.approx((350 / 64, 350 / 64))
    assert len(notifications["warning"]) == 1 and "assumed" in notifications["warning"][0]
    assert kw["metadata"]["warnings"] and notifications["error"] == []


def test_scan_layer_data_name_override(tmp_path):
    p = tmp_path / "ct.mha"
    write_ct(p)
    ((_, kw, _),) = scan_layer_data(load_scan(p), name="mine")
    assert kw["name"] == "mine"


def test_import_is_light():
    """`import napari_resmtnet` (and the modules napari imports at startup) load no torch, Qt or SimpleITK."""
    code = (
        "import sys, napari_resmtnet, napari_resmtnet._reader, napari_resmtnet._sample_data, napari_resmtnet.io.formats\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'SimpleITK', 'napari'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


# --------------------------------------------------------------------------- in napari


@pytest.mark.gui
def test_viewer_open_places_layer_in_world_mm(tmp_path, make_napari_viewer):
    p = tmp_path / "rot.mha"
    _, img = write_ct(p, direction=ROT)
    viewer = make_napari_viewer()
    layers = viewer.open(str(p), plugin="napari-resmtnet")
    assert len(layers) == 1
    layer = layers[0]
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.7))
    np.testing.assert_allclose(layer.data_to_world((0, 0, 0)), np.asarray(img.GetOrigin())[::-1], atol=1e-6)
    idx = (4, 5, 6)
    np.testing.assert_allclose(
        layer.data_to_world(idx), np.asarray(img.TransformIndexToPhysicalPoint(idx[::-1]))[::-1], atol=1e-6
    )
    assert layer.metadata["modality"] == "CT"


@pytest.mark.gui
def test_viewer_open_plain_ct_scale_translate(tmp_path, make_napari_viewer):
    p = tmp_path / "ct.nii.gz"
    write_ct(p)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(p), plugin="napari-resmtnet")
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(layer.translate, (-300.0, 20.0, -100.0), atol=1e-4)
    assert tuple(layer.contrast_limits) == CT_CONTRAST_LIMITS


@pytest.mark.gui
def test_viewer_open_bad_file_no_exception(tmp_path, make_napari_viewer, notifications):
    p = tmp_path / "broken.mhd"
    write_ct(p)
    (tmp_path / "broken.raw").unlink()
    viewer = make_napari_viewer()
    layers = viewer.open(str(p), plugin="napari-resmtnet")
    assert layers == [] and len(viewer.layers) == 0
    assert len(notifications["error"]) == 1 and "does not exist" in notifications["error"][0]
