"""load_scan: every format round-trips geometry in array order; bad files give one clear line."""

from __future__ import annotations

import gzip
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_resmtnet.io.formats import (  # noqa: E402
    DEFAULT_CXR_FIELD_MM,
    JSRT_SPACING_MM,
    ScanReadError,
    can_read,
    default_cxr_spacing,
    load_scan,
    strip_image_suffix,
)

DATA = Path(os.environ.get("RESMTNET_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


# --------------------------------------------------------------------------- helpers


def rotation3(ax=0.3, ay=-0.2, az=0.5) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation2(a=0.4) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def make_ct(
    shape=(6, 7, 8), spacing_xyz=(0.7, 0.8, 2.5), origin_xyz=(-120.5, 33.25, -310.0), direction=None, dtype=np.int16
):
    """A small CT volume with a distinct value per voxel (to catch axis mix-ups)."""
    arr = (np.arange(np.prod(shape)).reshape(shape) % 3000 - 1024).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin_xyz)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return arr, img


def check_geometry(scan, img, arr, atol=1e-5):
    """Scan geometry (array order) equals the ITK image's, voxel by voxel."""
    nd = img.GetDimension()
    assert scan.array.shape == arr.shape
    np.testing.assert_allclose(scan.spacing, img.GetSpacing()[::-1], rtol=1e-5)
    np.testing.assert_allclose(scan.origin, img.GetOrigin()[::-1], atol=atol)
    d = np.asarray(img.GetDirection()).reshape(nd, nd)
    np.testing.assert_allclose(scan.direction, d[::-1, ::-1], atol=atol)
    # the strongest check: a voxel's world position agrees with ITK's
    idx = tuple(int(s) - 2 for s in arr.shape)  # array order
    world_itk = np.asarray(img.TransformIndexToPhysicalPoint(idx[::-1]))
    np.testing.assert_allclose(scan.index_to_world(idx)[0], world_itk[::-1], atol=1e-3)
    np.testing.assert_allclose(scan.index_to_world_xyz(idx)[0], world_itk, atol=1e-3)


def one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# --------------------------------------------------------------------------- CT round trips


@pytest.mark.parametrize("name", ["vol.mha", "vol.mhd", "vol.nrrd", "vol.nii", "vol.nii.gz", "vol.nhdr"])
def test_ct_roundtrip_with_rotation(tmp_path, name):
    arr, img = make_ct(direction=rotation3())
    p = tmp_path / name
    sitk.WriteImage(img, str(p))
    scan = load_scan(p)
    assert scan.modality == "CT"
    assert scan.array.dtype == np.int16
    np.testing.assert_array_equal(scan.array, arr)
    check_geometry(scan, img, arr)
    assert scan.seriesuid == "vol"
    assert scan.path == str(p)
    assert scan.warnings == []
    assert can_read(p)


def test_mhd_writes_raw_and_luna16_name(tmp_path):
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    arr, img = make_ct(spacing_xyz=(0.65, 0.65, 1.25))
    p = tmp_path / f"{uid}.mhd"
    sitk.WriteImage(img, str(p))
    assert (tmp_path / f"{uid}.raw").is_file()
    scan = load_scan(p)
    assert scan.seriesuid == uid  # dots of the UID are not extensions
    np.testing.assert_allclose(scan.spacing, (1.25, 0.65, 0.65))


def test_float_ct_and_compressed_mha(tmp_path):
    arr, img = make_ct(dtype=np.float32)
    p = tmp_path / "f.mha"
    sitk.WriteImage(img, str(p), True)
    scan = load_scan(p)
    assert scan.array.dtype == np.float32
    np.testing.assert_array_equal(scan.array, arr)


def test_uint16_ct_becomes_int16(tmp_path):
    arr = np.full((3, 4, 5), 1000, np.uint16)
    p = tmp_path / "u.mha"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    scan = load_scan(p)
    assert scan.array.dtype == np.int16 and scan.array.max() == 1000


def write_dicom_series(
    folder: Path, img, series_uid="1.2.826.0.1.3680043.2.1125.1.42", shuffle=True, name_fmt="IM{:04d}"
):
    """Write ``img`` (3D int16, any rotation) as a CT DICOM series, one file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    iop = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    n = img.GetDepth()
    order = list(range(n))
    if shuffle:
        random.Random(3).shuffle(order)
    for i in range(n):
        s = img[:, :, i]
        for tag, val in [
            ("0008|0060", "CT"),
            ("0020|000e", series_uid),
            ("0020|0037", iop),
            ("0008|103e", "chest"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.7"),
            ("0020|0032", "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, i)))),
            ("0020|0013", str(i + 1)),
            ("0008|0018", f"{series_uid}.{i + 1}"),
            ("0018|0050", str(img.GetSpacing()[2])),
        ]:
            s.SetMetaData(tag, val)
        writer.SetFileName(str(folder / (name_fmt.format(order[i]) + ".dcm")))
        writer.Execute(s)
    return [folder / (name_fmt.format(order[i]) + ".dcm") for i in range(n)]


def test_dicom_series_sorted_by_position_not_name(tmp_path):
    arr, img = make_ct(shape=(7, 10, 9), spacing_xyz=(0.6, 0.7, 2.0), direction=rotation3(0.0, 0.0, 0.35))
    files = write_dicom_series(tmp_path / "series", img)
    names_in_z_order = [f.name for f in files]
    assert names_in_z_order != sorted(names_in_z_order)  # the test is meaningful
    scan = load_scan(tmp_path / "series")
    assert scan.modality == "CT"
    np.testing.assert_array_equal(scan.array, arr)
    check_geometry(scan, img, arr, atol=1e-4)
    assert scan.seriesuid == "1.2.826.0.1.3680043.2.1125.1.42"
    assert scan.warnings == []
    assert can_read(tmp_path / "series")


def test_dicom_series_in_nested_folder_and_several_series(tmp_path):
    _, big = make_ct(shape=(6, 8, 8))
    _, small = make_ct(shape=(3, 8, 8), origin_xyz=(0.0, 0.0, 500.0))
    write_dicom_series(tmp_path / "patient" / "study" / "a", big, series_uid="1.2.3.111")
    write_dicom_series(tmp_path / "patient" / "study" / "b", small, series_uid="1.2.3.222")
    scan = load_scan(tmp_path / "patient")
    assert scan.shape == (6, 8, 8)
    assert scan.seriesuid == "1.2.3.111"
    assert len(scan.warnings) == 1
    w = scan.warnings[0]
    assert "1.2.3.111" in w and "1.2.3.222" in w and "2 DICOM series" in w


def test_single_dicom_file_of_a_series_opens_the_series(tmp_path):
    arr, img = make_ct(shape=(5, 8, 9))
    files = write_dicom_series(tmp_path / "s", img)
    scan = load_scan(files[2])
    assert scan.modality == "CT"
    np.testing.assert_array_equal(scan.array, arr)
    assert any("whole series" in w for w in scan.warnings)


def test_lone_ct_slice_is_refused(tmp_path):
    _, img = make_ct(shape=(1, 8, 9))
    files = write_dicom_series(tmp_path / "one", img, shuffle=False)
    with pytest.raises(ScanReadError) as e:
        load_scan(files[0])
    assert "single CT slice" in one_line_error(e, files[0])


def test_dicom_files_without_extension_and_ct_rescale(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder = tmp_path / "noext"
    folder.mkdir()
    raw = np.arange(4 * 6 * 5).reshape(4, 6, 5).astype(np.uint16) * 10
    for k in range(4):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"1.2.3.9.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.8", "1.2.3.9"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100, -50, 20 + 3 * k]
        ds.PixelSpacing = [0.8, 0.9]
        ds.SliceThickness = 3
        ds.Rows, ds.Columns = 6, 5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = raw[k].tobytes()
        ds.save_as(folder / f"{900 - k}", enforce_file_format=True)  # names in reverse z order
    assert can_read(folder / "900")
    scan = load_scan(folder)
    np.testing.assert_array_equal(scan.array, raw.astype(np.int32) - 1024)  # HU
    np.testing.assert_allclose(scan.spacing, (3.0, 0.8, 0.9))
    np.testing.assert_allclose(scan.origin, (20.0, -50.0, -100.0))
    assert scan.seriesuid == "1.2.3.9"
    assert pydicom  # used


def test_2d_mha_with_rotation_is_cxr(tmp_path):
    arr = (np.arange(30 * 40).reshape(30, 40) % 4096).astype(np.uint16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.15, 0.16))
    img.SetOrigin((12.0, -7.5))
    img.SetDirection(tuple(rotation2().ravel()))
    p = tmp_path / "cxr.mha"
    sitk.WriteImage(img, str(p))
    scan = load_scan(p)
    assert scan.modality == "CXR"
    assert scan.array.dtype == np.uint16
    check_geometry(scan, img, arr)
    assert scan.warnings == []


def test_3d_file_with_one_slice_is_squeezed_to_cxr(tmp_path):
    arr = np.arange(20 * 30, dtype=np.uint16).reshape(1, 20, 30)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.2, 0.3, 1.0))
    img.SetOrigin((4.0, 5.0, 6.0))
    p = tmp_path / "one.nrrd"
    sitk.WriteImage(img, str(p))
    scan = load_scan(p)
    assert scan.modality == "CXR" and scan.shape == (20, 30)
    np.testing.assert_allclose(scan.spacing, (0.3, 0.2))
    np.testing.assert_allclose(scan.origin, (5.0, 4.0))
    np.testing.assert_array_equal(scan.array, arr[0])


# --------------------------------------------------------------------------- radiographs


def write_dx(path, arr, photometric="MONOCHROME2", spacing=(0.15, 0.16), tag="ImagerPixelSpacing", number=1):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = f"1.2.3.4.5.6.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if spacing is not None:
        setattr(ds, tag, [str(s) for s in spacing])
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("tag", ["ImagerPixelSpacing", "PixelSpacing"])
def test_dicom_radiograph_monochrome2(tmp_path, tag):
    raw = (np.arange(40 * 50).reshape(40, 50) % 4096).astype(np.uint16)
    p = tmp_path / "dx.dcm"
    write_dx(p, raw, spacing=(0.15, 0.16), tag=tag)
    scan = load_scan(p)
    assert scan.modality == "CXR" and scan.shape == (40, 50)
    np.testing.assert_array_equal(scan.array, raw)
    np.testing.assert_allclose(scan.spacing, (0.15, 0.16))  # (row, column) = (y, x)
    assert scan.seriesuid == "1.2.3.4.5.6"
    assert scan.warnings == []


def test_dicom_radiograph_monochrome1_is_inverted(tmp_path):
    raw = (np.arange(40 * 50).reshape(40, 50) % 4096).astype(np.uint16)
    p = tmp_path / "m1.dcm"
    write_dx(p, raw, photometric="MONOCHROME1")
    scan = load_scan(p)
    a = scan.array.astype(float)
    # brighter where the stored value is lower: an exact decreasing linear map
    assert np.corrcoef(a.ravel(), raw.ravel())[0, 1] < -0.999
    assert a[raw == raw.min()].min() == a.max()
    assert scan.metadata["inverted"] is True


def test_dicom_radiograph_without_spacing_gets_default(tmp_path):
    raw = np.full((40, 80), 100, np.uint16)
    p = tmp_path / "nospacing.dcm"
    write_dx(p, raw, spacing=None)
    scan = load_scan(p)
    np.testing.assert_allclose(scan.spacing, (DEFAULT_CXR_FIELD_MM / 80,) * 2)
    assert len(scan.warnings) == 1 and "assumed" in scan.warnings[0]


def test_folder_with_a_series_of_radiographs_opens_one(tmp_path):
    folder = tmp_path / "dx"
    folder.mkdir()
    for k in (1, 2):
        write_dx(folder / f"view{k}.dcm", np.full((30, 40), 100 * k, np.uint16), number=k)
    scan = load_scan(folder)
    assert scan.modality == "CXR" and scan.shape == (30, 40)
    assert any("holds 2 radiographs" in w for w in scan.warnings)


def test_jsrt_img_big_endian(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, size=(2048, 2048), dtype=np.uint16)
    raw[0, :3] = (0, 1, 4095)
    p = tmp_path / "JPCLN001.IMG"
    raw.astype(">u2").tofile(p)
    assert can_read(p)
    scan = load_scan(p)
    assert scan.modality == "CXR" and scan.shape == (2048, 2048)
    assert scan.spacing == (JSRT_SPACING_MM, JSRT_SPACING_MM)
    # big-endian read, then inverted (JSRT stores optical density: lungs bright)
    assert tuple(scan.array[0, :3]) == (4095, 4094, 0)
    np.testing.assert_array_equal(scan.array, 4095 - raw)
    assert scan.seriesuid == "JPCLN001"
    assert scan.warnings == []


def test_img_of_wrong_size_is_not_jsrt(tmp_path):
    p = tmp_path / "x.img"
    p.write_bytes(b"\0" * 1000)
    assert not can_read(p)
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "JSRT" in one_line_error(e, p)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_with_spacing(tmp_path, dtype):
    arr = (np.arange(30 * 40).reshape(30, 40) % 200).astype(dtype) * (1 if dtype == np.uint8 else 300)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.3, 0.25))  # PNG pHYs chunk
    p = tmp_path / "a.png"
    sitk.WriteImage(img, str(p))
    scan = load_scan(p)
    assert scan.modality == "CXR" and scan.array.dtype == dtype
    np.testing.assert_array_equal(scan.array, arr)
    np.testing.assert_allclose(scan.spacing, (0.25, 0.3), rtol=1e-3)
    assert scan.warnings == []


def test_png_without_spacing_gets_stated_default(tmp_path):
    from PIL import Image

    arr = np.zeros((224, 200), np.uint8)
    p = tmp_path / "JPCNN001.png"
    Image.fromarray(arr).save(p)
    scan = load_scan(p)
    assert scan.spacing == pytest.approx((350 / 224, 350 / 224))
    assert default_cxr_spacing((2048, 2048)) == pytest.approx(0.1709, abs=1e-4)
    assert len(scan.warnings) == 1
    assert "assumed 1.562 mm/px" in scan.warnings[0]
    assert scan.metadata["spacing_source"] == "assumed"


def test_rgb_and_rgba_png_reduced_to_grey(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    p = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(p))
    scan = load_scan(p)
    assert scan.shape == (20, 30) and scan.array.dtype == np.uint8
    assert int(scan.array[0, 0]) == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)
    assert any("reduced to grey" in w for w in scan.warnings)

    from PIL import Image

    rgba = np.dstack([np.full((20, 30), v, np.uint8) for v in (70, 70, 70, 255)])
    p2 = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p2)
    scan2 = load_scan(p2)
    assert scan2.shape == (20, 30) and int(scan2.array[0, 0]) == 70
    assert any("alpha" in w for w in scan2.warnings)


def test_jpeg_gets_default_spacing(tmp_path):
    arr = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    p = tmp_path / "x.jpg"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    scan = load_scan(p)
    assert scan.modality == "CXR" and scan.shape == (48, 64)
    assert np.abs(scan.array.astype(int) - arr).max() < 12  # lossy
    assert scan.spacing == pytest.approx((350 / 64,) * 2)
    assert any("JPEG" in w for w in scan.warnings)


def test_tiff_16bit_with_spacing_and_72dpi_default(tmp_path):
    arr = (np.arange(30 * 40).reshape(30, 40) * 3).astype(np.uint16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.14, 0.15))
    p = tmp_path / "a.tif"
    sitk.WriteImage(img, str(p))
    scan = load_scan(p)
    np.testing.assert_array_equal(scan.array, arr)
    np.testing.assert_allclose(scan.spacing, (0.15, 0.14), rtol=1e-4)
    assert scan.warnings == []

    from PIL import Image

    p2 = tmp_path / "b.tiff"
    Image.fromarray(arr).save(p2, dpi=(72, 72))
    scan2 = load_scan(p2)
    assert scan2.spacing == pytest.approx((350 / 40,) * 2)
    assert "72 dpi" in scan2.warnings[0]


def test_2d_spacing_of_exactly_one_is_a_placeholder(tmp_path):
    p = tmp_path / "plain.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((100, 50), np.uint16)), str(p))
    scan = load_scan(p)
    assert scan.spacing == pytest.approx((3.5, 3.5))
    assert "placeholder" in scan.warnings[0]


def test_strip_image_suffix():
    assert strip_image_suffix("a.nii.gz") == "a"
    assert strip_image_suffix("1.2.840.113.mhd") == "1.2.840.113"
    assert strip_image_suffix("JPCLN001.IMG") == "JPCLN001"
    assert strip_image_suffix("1.2.840.113") == "1.2.840.113"


# --------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_lung1_ct():
    p = DATA / "ct_scans" / "lung1_image.nrrd"
    if not p.is_file():
        pytest.skip(f"real data not found at {p} (set RESMTNET_DATA)")
    scan = load_scan(p)
    assert scan.modality == "CT" and scan.shape == (48, 512, 512)
    assert scan.spacing == pytest.approx((5.0, 0.5703125, 0.5703125))
    assert scan.array.dtype == np.int16 and scan.array.min() == -1024
    assert scan.origin == pytest.approx((-777.5, -325.0, -146.0))


@pytest.mark.data
def test_real_node21_cxr():
    p = DATA / "cxr" / "node21_3.mha"
    if not p.is_file():
        pytest.skip(f"real data not found at {p} (set RESMTNET_DATA)")
    scan = load_scan(p)
    assert scan.modality == "CXR" and scan.shape == (1024, 1024)
    assert scan.spacing == pytest.approx((0.2693, 0.2692), abs=1e-4)
    assert scan.warnings == []
    assert scan.seriesuid == "node21_3"


# --------------------------------------------------------------------------- bad files


def write_mhd(tmp_path, name="v.mhd", shape=(4, 5, 6)):
    arr = np.ones(shape, np.int16)
    p = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    return p


def edit_header(p: Path, old: str, new: str):
    data = p.read_bytes()
    assert old.encode() in data
    p.write_bytes(data.replace(old.encode(), new.encode(), 1))


@pytest.mark.robustness
def test_truncated_raw(tmp_path):
    p = write_mhd(tmp_path)
    raw = tmp_path / "v.raw"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    msg = one_line_error(e, p)
    assert "truncated" in msg and "230" in msg and "240" in msg


@pytest.mark.robustness
def test_raw_larger_than_header(tmp_path):
    p = write_mhd(tmp_path)
    edit_header(p, "DimSize = 6 5 4", "DimSize = 6 5 3")
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "do not match" in one_line_error(e, p)


@pytest.mark.robustness
def test_missing_raw(tmp_path):
    p = write_mhd(tmp_path)
    (tmp_path / "v.raw").unlink()
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "v.raw" in one_line_error(e, p) and "does not exist" in str(e.value)


@pytest.mark.robustness
def test_truncated_mha(tmp_path):
    p = tmp_path / "t.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.int16)), str(p))
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "truncated" in one_line_error(e, p)


@pytest.mark.robustness
@pytest.mark.parametrize("name", ["t.nii", "t.nii.gz"])
def test_truncated_nifti(tmp_path, name):
    p = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(8, 9, 10)).astype(np.float32)), str(p))
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    one_line_error(e, p)


@pytest.mark.robustness
def test_4d_refused(tmp_path):
    img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))] * 2)
    p = tmp_path / "four.nii.gz"
    sitk.WriteImage(img, str(p))
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "4D" in one_line_error(e, p)


@pytest.mark.robustness
def test_1d_refused(tmp_path):
    p = tmp_path / "line.mha"
    p.write_text("ObjectType = Image\nNDims = 1\nDimSize = 10\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    with open(p, "ab") as f:
        f.write(b"\0" * 20)
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "1D" in one_line_error(e, p)
    p2 = tmp_path / "row.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 50), np.uint8)), str(p2))
    with pytest.raises(ScanReadError) as e:
        load_scan(p2)
    assert "1D" in one_line_error(e, p2)


@pytest.mark.robustness
def test_zero_size_dimension(tmp_path):
    p = tmp_path / "z.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    edit_header(p, "DimSize = 6 5 4", "DimSize = 6 0 4")
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "zero-size" in one_line_error(e, p)


@pytest.mark.robustness
def test_empty_folder_and_folder_without_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScanReadError) as e:
        load_scan(empty)
    assert "empty" in one_line_error(e, empty)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("hello")
    with pytest.raises(ScanReadError) as e:
        load_scan(other)
    assert "no DICOM" in one_line_error(e, other)
    assert not can_read(other) and not can_read(empty)


@pytest.mark.robustness
@pytest.mark.parametrize(
    "name", ["fake.png", "fake.mha", "fake.nii.gz", "fake.nrrd", "fake.jpg", "fake.tif", "fake.nii"]
)
def test_non_image_with_image_extension(tmp_path, name):
    p = tmp_path / name
    p.write_text("<html>404 not found</html>\n" * 30)
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "not a" in one_line_error(e, p)
    assert not can_read(p)


@pytest.mark.robustness
def test_corrupt_png_body(tmp_path):
    p = tmp_path / "cut.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), str(p))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    one_line_error(e, p)


@pytest.mark.robustness
def test_empty_file_missing_file_unknown_extension(tmp_path):
    p = tmp_path / "zero.mha"
    p.write_bytes(b"")
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "empty" in one_line_error(e, p)
    with pytest.raises(ScanReadError) as e:
        load_scan(tmp_path / "nope.mha")
    assert "no such file" in one_line_error(e, tmp_path / "nope.mha")
    q = tmp_path / "table.csv"
    q.write_text("a,b\n1,2\n")
    with pytest.raises(ScanReadError) as e:
        load_scan(q)
    assert "unsupported file type" in one_line_error(e, q)


@pytest.mark.robustness
def test_nan_and_inf_voxels_repaired(tmp_path):
    arr = np.full((3, 4, 5), -500.0, np.float32)
    arr[0, 0, 0], arr[1, 1, 1], arr[2, 2, 2] = np.nan, np.inf, -np.inf
    arr[2, 3, 4] = -1000.0
    p = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    scan = load_scan(p)
    assert np.isfinite(scan.array).all()
    assert scan.array[0, 0, 0] == -1000.0 and scan.array[1, 1, 1] == -1000.0
    assert any("3 NaN/infinite" in w for w in scan.warnings)
    p2 = tmp_path / "allnan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), np.nan, np.float32)), str(p2))
    with pytest.raises(ScanReadError) as e:
        load_scan(p2)
    assert "no finite" in one_line_error(e, p2)


@pytest.mark.robustness
@pytest.mark.parametrize("spacing", ["0 1 1", "nan 1 1", "1 1 20000"])
def test_absurd_spacing_refused(tmp_path, spacing):
    p = tmp_path / "s.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    edit_header(p, "ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}")
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert "spacing" in one_line_error(e, p)


@pytest.mark.robustness
def test_negative_spacing_read_as_flip(tmp_path):
    p = tmp_path / "neg.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    edit_header(p, "ElementSpacing = 1 1 1", "ElementSpacing = -2 1 1")
    scan = load_scan(p)
    assert scan.spacing == (1.0, 1.0, 2.0)
    assert scan.direction[2, 2] == -1.0
    assert any("negative" in w for w in scan.warnings)


@pytest.mark.robustness
def test_huge_header_refused_before_allocation(tmp_path):
    p = tmp_path / "huge.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p), True)
    edit_header(p, "DimSize = 6 5 4", "DimSize = 60000 50000 4000")
    t = time.perf_counter()
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert time.perf_counter() - t < 5
    msg = one_line_error(e, p)
    assert "24000.0 GB" in msg and "refused before reading" in msg


@pytest.mark.robustness
@pytest.mark.parametrize("ndims", ["-1", "-13727", "0"])
def test_metaimage_without_a_positive_ndims_is_refused_at_once(tmp_path, ndims):
    """ITK's MetaIO never returns from a negative NDims (it spun for hours under fuzzing):
    the header is refused before ITK reads it."""
    p = tmp_path / "bad.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    edit_header(p, "NDims = 3", f"NDims = {ndims}")
    t = time.perf_counter()
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    assert time.perf_counter() - t < 5
    assert f"NDims = '{ndims}' must be at least 1" in one_line_error(e, p)


@pytest.mark.robustness
def test_huge_dicom_series_refused(tmp_path, monkeypatch):
    import napari_resmtnet.io.formats as io

    _, img = make_ct(shape=(4, 8, 8))
    write_dicom_series(tmp_path / "s", img)
    monkeypatch.setattr(io, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ScanReadError) as e:
        load_scan(tmp_path / "s")
    assert "GB" in one_line_error(e, tmp_path / "s")


@pytest.mark.robustness
def test_non_orthogonal_direction_orthonormalised(tmp_path):
    p = tmp_path / "shear.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    edit_header(p, "TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0.3 0 0 1 0 0 0 1")
    scan = load_scan(p)
    np.testing.assert_allclose(scan.direction.T @ scan.direction, np.eye(3), atol=1e-9)
    assert any("not orthonormal" in w for w in scan.warnings)


@pytest.mark.robustness
def test_singular_direction_refused(tmp_path):
    p = tmp_path / "sing.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    edit_header(p, "TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0 0 1 0 0 0 0 1")
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    one_line_error(e, p)


@pytest.mark.robustness
def test_gzip_nifti_with_garbage_payload(tmp_path):
    p = tmp_path / "g.nii.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x5c\x01\x00\x00" + b"\0" * 400)  # sizeof_hdr 348, nothing valid after
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    one_line_error(e, p)


@pytest.mark.robustness
@pytest.mark.parametrize("name", ["c.mha", "c.nrrd"])
def test_truncated_compressed(tmp_path, name):
    p = tmp_path / name
    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(8, 9, 10)).astype(np.float32)), str(p), True
    )
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(ScanReadError) as e:
        load_scan(p)
    one_line_error(e, p)
