"""The bad-input corpus: every case through load_scan, the napari reader, ``resmtnet predict``
and the GUI; safe user weights in the CLI and widget; no lost work (autosave, atomic export).

Each corpus case is made here, in a temporary folder, from a few lines of numpy/SimpleITK/
pydicom. For every case the outcome must be one of

* **loaded** -- a `Scan` without warnings;
* **loaded with warning** -- a `Scan` whose ``warnings`` say what was repaired or assumed;
* **refused** -- `ScanReadError` with a one-line message that starts with the file's path.

Never a traceback, never a hang (each test runs under an alarm), never a crash of napari.
``pytest -m robustness -rA`` runs the corpus; a table "case -> outcome" is printed at the
end of this module's tests.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import hang_alarm

sitk = pytest.importorskip("SimpleITK")

from napari_resmtnet.io.formats import ScanReadError, load_scan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 60

# --------------------------------------------------------------------------- no hangs


@pytest.fixture(autouse=True)
def _alarm():
    """Fail (not hang) a test that runs longer than CASE_TIMEOUT_S."""
    with hang_alarm(CASE_TIMEOUT_S):
        yield


# --------------------------------------------------------------------------- summary table

#: case -> {path: outcome text}; printed by `_summary` when the module's tests are done
RESULTS: dict[str, dict[str, str]] = {}
PATHS = ("load_scan", "reader", "predict", "gui")


#: other robustness checks (weights, kills): name -> outcome text
NOTES: dict[str, str] = {}


def record(case: str, path: str, outcome: str) -> None:
    RESULTS.setdefault(case, {})[path] = " ".join(outcome.split())


def note(name: str, outcome: str) -> None:
    NOTES[name] = " ".join(outcome.split())


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not RESULTS and not NOTES:
        return
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"bad-input corpus: {len(RESULTS)} cases (case -> load_scan outcome [other paths])"]
    counts: dict[str, int] = {}
    width = max([len(c) for c in RESULTS] + [len(c) for c in NOTES])
    for case in sorted(RESULTS):
        r = RESULTS[case]
        main = r.get("load_scan", "")
        kind = main.split(":", 1)[0] if main else "-"
        counts[kind] = counts.get(kind, 0) + 1
        others = ", ".join(f"{p}={r[p].split(':', 1)[0]}" for p in PATHS[1:] if p in r)
        lines.append(f"  {case:<{width}}  {main[:150]}" + (f"  [{others}]" if others else ""))
    lines.append("  outcomes (load_scan): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if NOTES:
        lines.append(f"other robustness checks: {len(NOTES)}")
        lines += [f"  {k:<{width}}  {v[:170]}" for k, v in sorted(NOTES.items())]
    text = "\n".join(lines)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        if rep is not None:
            rep.write_line("")
            for ln in text.splitlines():
                rep.write_line(ln)
        else:  # pragma: no cover - without the terminal plugin
            print(text)


# --------------------------------------------------------------------------- writers


def write_image(path: Path, arr, spacing=None, origin=None, direction=None, compress=False, vector=False):
    img = sitk.GetImageFromArray(np.asarray(arr), isVector=vector)
    if spacing is not None:
        img.SetSpacing(tuple(float(s) for s in spacing))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in np.ravel(direction)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), compress)
    return path


def ct_array(shape=(12, 40, 40), seed=0):
    """Air (-1000) with a soft-tissue block and noise: a tiny chest-CT-like volume."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000, np.int16)
    z, y, x = shape
    a[:, y // 4 : 3 * y // 4, x // 4 : 3 * x // 4] = 40
    a += rng.integers(-20, 20, shape, dtype=np.int16)
    return a


def edit_header(p: Path, old: str, new: str) -> None:
    data = p.read_bytes()
    if old.encode() not in data:
        raise AssertionError(f"{old!r} not in the header of {p}")
    p.write_bytes(data.replace(old.encode(), new.encode(), 1))


def write_mhd(
    folder: Path,
    name="scan",
    shape=(6, 8, 10),
    etype="MET_SHORT",
    dtype=np.int16,
    datafile=None,
    header_shape=None,
    extra="",
) -> Path:
    """A LUNA16-style .mhd + .raw written by hand (so that header and data can disagree)."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = ct_array(shape).astype(dtype)
    raw = folder / f"{name}.raw"
    raw.write_bytes(arr.tobytes())
    hs = header_shape or shape
    mhd = folder / f"{name}.mhd"
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -100 -120 -300\n"
        "ElementSpacing = 0.7 0.7 2.5\n" + extra + f"DimSize = {hs[2]} {hs[1]} {hs[0]}\nElementType = {etype}\n"
        f"ElementDataFile = {datafile or raw.name}\n"
    )
    return mhd


def dicom_slice(
    path: Path,
    pixels,
    z: float,
    series_uid: str,
    instance: int,
    modality="CT",
    spacing=(0.7, 0.7),
    thickness=2.5,
    with_pixels=True,
    orientation=(1, 0, 0, 0, 1, 0),
):
    """One CT slice as a DICOM file (pydicom), int16 stored with rescale -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = f"{series_uid}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.PatientName = "Robustness^Test"
    ds.PatientID = "R1"
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -120.0, float(z)]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = float(thickness)
    pixels = np.asarray(pixels, np.int16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if with_pixels:
        ds.PixelData = (pixels + 1024).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dicom_series(folder: Path, zs, series_uid="1.2.826.0.1.3680043.8.498.100", shape=(24, 24), seed=0, **kw):
    rng = np.random.default_rng(seed)
    for i, z in enumerate(zs):
        px = np.full(shape, -1000, np.int16)
        px[6:18, 6:18] = 40 + i
        px += rng.integers(-10, 10, shape, dtype=np.int16)
        dicom_slice(folder / f"IM{i:04d}.dcm", px, z, series_uid, i + 1, **kw)
    return folder


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    make: Callable[[Path], Path]  # builds the case under a folder; returns the path to open
    expect: str  # "loaded" | "warning" | "refused"
    match: str = ""  # regex the message (refused) or the warnings must contain
    gui: bool = False  # also opened with viewer.open + the widget (slow-ish)


def _truncated_raw(d):
    p = write_mhd(d)
    raw = d / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:-100])
    return p


def _dims_disagree(d):  # header says fewer voxels than the .raw holds
    return write_mhd(d, header_shape=(5, 8, 10))


def _etype_bigger(d):  # header says float (4 bytes/voxel), data are 2-byte shorts
    return write_mhd(d, etype="MET_FLOAT")


def _etype_smaller(d):  # header says uchar, data are shorts: twice the bytes expected
    return write_mhd(d, etype="MET_UCHAR")


def _missing_raw(d):
    p = write_mhd(d)
    (d / "scan.raw").unlink()
    return p


def _secret(d: Path, shape=(6, 8, 10)) -> Path:
    """A file outside the case's folder, exactly as large as the header below expects."""
    s = d.parent / f"{d.name}_secret.bin"
    s.parent.mkdir(parents=True, exist_ok=True)
    s.write_bytes(ct_array(shape).tobytes())
    return s


def _datafile_parent(d):
    _secret(d)
    return write_mhd(d / "sub", datafile=f"../../{d.name}_secret.bin")


def _datafile_absolute(d):
    s = _secret(d)
    return write_mhd(d, datafile=str(s.resolve()))


def _datafile_etc_passwd(d):
    return write_mhd(d / "a" / "b", datafile="../../../../../../../../../../etc/passwd")


def _nrrd_datafile_outside(d):
    s = _secret(d)
    d.mkdir(parents=True, exist_ok=True)
    p = d / "detached.nhdr"
    p.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 10 8 6\nspacings: 0.7 0.7 2.5\n"
        f"endian: little\nencoding: raw\ndata file: ../{s.name}\n\n"
    )
    return p


def _four_d(d):
    img = sitk.JoinSeries([sitk.GetImageFromArray(ct_array((6, 10, 10)).astype(np.float32))] * 3)
    d.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(d / "fourd.nii.gz"))
    return d / "fourd.nii.gz"


def _four_d_one_timepoint(d):
    img = sitk.JoinSeries([sitk.GetImageFromArray(ct_array((6, 20, 20)))])
    d.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(d / "fourd1.mha"))
    return d / "fourd1.mha"


def _one_d(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "line.mha"
    p.write_bytes(
        b"ObjectType = Image\nNDims = 1\nDimSize = 64\nElementType = MET_SHORT\nElementDataFile = LOCAL\n" + b"\0" * 128
    )
    return p


def _row_image(d):  # a 2D file that is 1 pixel high
    return write_image(d / "row.mha", np.zeros((1, 80), np.uint8))


def _zero_size(d):
    p = write_image(d / "zero.mha", ct_array((6, 8, 10)))
    edit_header(p, "DimSize = 10 8 6", "DimSize = 10 0 6")
    return p


def _rgb_png(d):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    return write_image(d / "colour.png", rgb, vector=True)


def _rgba_png(d):
    g = np.random.default_rng(2).integers(0, 255, (64, 80), dtype=np.uint8)
    rgba = np.stack([g, g, g, np.full_like(g, 255)], -1)
    return write_image(d / "grey_rgba.png", rgba, vector=True)


def _png16(d):
    a = np.random.default_rng(3).integers(0, 4096, (96, 80), dtype=np.uint16)
    return write_image(d / "film16.png", a)


def _rgb_volume(d):
    a = np.random.default_rng(4).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    return write_image(d / "rgbvol.mha", a, vector=True)


def _nan_inf(d):
    a = ct_array((8, 24, 24)).astype(np.float32)
    a[0, 0, 0], a[3, 4, 5], a[7, 23, 23] = np.nan, np.inf, -np.inf
    return write_image(d / "naninf.nrrd", a)


def _all_nan(d):
    return write_image(d / "allnan.mha", np.full((6, 8, 10), np.nan, np.float32))


def _constant_ct(d):
    return write_image(d / "constant.mha", np.full((10, 32, 32), -1000, np.int16), spacing=(0.8, 0.8, 2.0))


def _constant_cxr(d):
    return write_image(d / "blank.mha", np.full((64, 64), 700, np.uint16), spacing=(0.2, 0.2))


def _spacing(value):
    def make(d):
        p = write_image(d / "sp.mha", ct_array((6, 16, 16)))
        edit_header(p, "ElementSpacing = 1 1 1", f"ElementSpacing = {value} 1 1")
        return p

    return make


def _shear(d):
    p = write_image(d / "shear.mha", ct_array((8, 24, 24)))
    edit_header(p, "TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0.3 0 0 1 0 0 0 1")
    return p


def _singular(d):
    p = write_image(d / "singular.mha", ct_array((6, 16, 16)))
    edit_header(p, "TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0 0 1 0 0 0 0 1")
    return p


def _oblique(d):  # a proper rotation: loads with no warning
    c, s = math.cos(0.3), math.sin(0.3)
    return write_image(
        d / "oblique.nii.gz",
        ct_array((8, 24, 24)),
        spacing=(0.8, 0.8, 2.0),
        direction=[[c, -s, 0], [s, c, 0], [0, 0, 1]],
    )


def _dicom_mixed_fix(d):
    a = dicom_series(d / "tmp_a", [0, 2.5, 5, 7.5, 10, 12.5], series_uid="1.2.826.0.1.3680043.8.498.11")
    b = dicom_series(d / "tmp_b", [100, 102.5, 105], series_uid="1.2.826.0.1.3680043.8.498.22", seed=1)
    out = d / "mixed series"
    out.mkdir(parents=True)
    for f in a.iterdir():
        f.rename(out / f"A_{f.name}")
    for f in b.iterdir():
        f.rename(out / f"B_{f.name}")
    a.rmdir()
    b.rmdir()
    return out


def _dicom_missing_slice(d):
    zs = [i * 2.5 for i in range(10) if i != 5]
    return dicom_series(d / "missing", zs)


def _dicom_duplicate(d):
    zs = [0, 2.5, 5, 5, 7.5, 10, 12.5]
    return dicom_series(d / "dup", zs)


def _dicom_unequal(d):
    zs = [0, 1, 2, 4, 6, 9, 12, 16]
    return dicom_series(d / "unequal", zs)


def _dicom_no_pixels(d):
    return dicom_series(d / "nopixels", [0, 2.5, 5, 7.5], with_pixels=False)


def _dicom_one_ct_slice(d):
    dicom_series(d / "one", [0.0])
    return d / "one" / "IM0000.dcm"


def _dicom_truncated_file(d):
    f = dicom_series(d / "cut", [0, 2.5, 5, 7.5]) / "IM0002.dcm"
    f.write_bytes(f.read_bytes()[:-300])
    return d / "cut"


def _text(name):
    def make(d):
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_text("<html><body>404 Not Found</body></html>\n" * 20)
        return p

    return make


def _garbage_bytes(name):
    def make(d):
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_bytes(np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes())
        return p

    return make


def _empty_file(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "empty.nii"
    p.write_bytes(b"")
    return p


def _empty_dir(d):
    p = d / "no images"
    p.mkdir(parents=True)
    return p


def _dir_of_text(d):
    p = d / "reports"
    p.mkdir(parents=True)
    (p / "report.txt").write_text("no nodules\n")
    (p / "notes.csv").write_text("a,b\n1,2\n")
    return p


def _jsrt_wrong_size(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "JPCLN001.IMG"
    p.write_bytes(b"\0" * 1000)
    return p


def _truncated_nii_gz(d):
    p = write_image(d / "cut.nii.gz", ct_array((10, 30, 30)))
    p.write_bytes(p.read_bytes()[:-500])
    return p


def _huge_mhd(d):
    """Header claims 50 GB (int16); the .raw is a sparse file of that size (no disk used)."""
    shape = (1000, 5000, 5000)  # z, y, x -> 25e9 voxels * 2 bytes = 50 GB
    d.mkdir(parents=True, exist_ok=True)
    sparse_file(d / "huge.raw", int(np.prod(shape, dtype=np.int64)) * 2)
    p = d / "huge.mhd"
    p.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nCompressedData = False\n"
        "ElementSpacing = 0.7 0.7 0.7\nDimSize = 5000 5000 1000\nElementType = MET_SHORT\n"
        "ElementDataFile = huge.raw\n"
    )
    return p


def _huge_mha_local(d):
    p = write_image(d / "huge.mha", ct_array((4, 5, 6)))
    edit_header(p, "DimSize = 6 5 4", "DimSize = 5000 5000 1000")
    return p


def _huge_nifti(d):
    p = write_image(d / "huge.nii", ct_array((4, 5, 6)))
    data = bytearray(p.read_bytes())
    data[40:56] = np.array([3, 5000, 5000, 1000, 1, 1, 1, 1], "<i2").tobytes()
    p.write_bytes(bytes(data))
    return p


def _unicode_path(d):
    return write_image(
        d / "Müller José 测试" / "scan with spaces é.nrrd",
        ct_array((10, 32, 32)),
        spacing=(0.8, 0.8, 2.0),
        origin=(-10, 20, -300),
    )


def _unicode_dicom(d):
    return dicom_series(d / "Patiënt ø" / "série 1", [0, 2.5, 5, 7.5, 10])


def _ct_slice_2d_file(d):  # one axial CT slice as a plain 2D file: opened as a 2D image
    return write_image(d / "axial_slice.nrrd", ct_array((1, 64, 64))[0], spacing=(0.7, 0.7))


def _ct_two_slices(d):
    return write_image(d / "thin.mha", ct_array((2, 40, 40)), spacing=(0.7, 0.7, 5.0))


def _float64_ct(d):
    return write_image(d / "f64.nii.gz", ct_array((8, 24, 24)).astype(np.float64))


def _good_cxr(d):
    a = np.random.default_rng(7).integers(0, 4000, (128, 96)).astype(np.uint16)
    return write_image(d / "film.mha", a, spacing=(0.3, 0.3))


def _good_ct(d):
    return write_mhd(d, name="1.3.6.1.4.1.14519.5.2.1.6279.6001.1", shape=(12, 40, 40))


CASES = [
    Case("good_ct_mhd", _good_ct, "loaded", gui=True),
    Case("good_cxr_mha", _good_cxr, "loaded"),
    Case("truncated_raw", _truncated_raw, "refused", r"truncated.*needs \d+ bytes", gui=True),
    Case("dimsize_disagrees", _dims_disagree, "refused", r"do not match"),
    Case("elementtype_bigger_than_data", _etype_bigger, "refused", r"truncated"),
    Case("elementtype_smaller_than_data", _etype_smaller, "refused", r"do not match"),
    Case("missing_raw", _missing_raw, "refused", r"scan\.raw.*does not exist"),
    Case("datafile_parent_traversal", _datafile_parent, "refused", r"outside"),
    Case("datafile_absolute_outside", _datafile_absolute, "refused", r"outside", gui=True),
    Case("datafile_etc_passwd", _datafile_etc_passwd, "refused", r"outside"),
    Case("nrrd_datafile_outside", _nrrd_datafile_outside, "refused", r"outside"),
    Case("4d_time_series", _four_d, "refused", r"4D"),
    Case("4d_one_timepoint", _four_d_one_timepoint, "loaded"),
    Case("1d_line", _one_d, "refused", r"1D"),
    Case("1px_high_image", _row_image, "refused", r"1D"),
    Case("zero_size_dim", _zero_size, "refused", r"zero-size"),
    Case("rgb_png", _rgb_png, "warning", r"colour \(RGB\).*grey", gui=True),
    Case("rgba_png", _rgba_png, "warning", r"RGBA.*alpha"),
    Case("png_16bit", _png16, "warning", r"assumed .* mm/px"),
    Case("rgb_volume", _rgb_volume, "refused", r"3 values per voxel"),
    Case("nan_inf_voxels", _nan_inf, "warning", r"3 NaN/infinite voxels", gui=True),
    Case("all_nan", _all_nan, "refused", r"no finite values"),
    Case("constant_ct", _constant_ct, "loaded", gui=True),
    Case("constant_cxr", _constant_cxr, "loaded"),
    Case("spacing_zero", _spacing("0"), "refused", r"spacing"),
    Case("spacing_negative", _spacing("-2"), "warning", r"negative voxel spacing"),
    Case("spacing_1e6", _spacing("1e6"), "refused", r"spacing"),
    Case("spacing_nan", _spacing("nan"), "refused", r"spacing"),
    Case("non_orthogonal_direction", _shear, "warning", r"not orthonormal", gui=True),
    Case("singular_direction", _singular, "refused", r"singular"),
    Case("oblique_rotation", _oblique, "loaded"),
    Case("dicom_mixed_series", _dicom_mixed_fix, "warning", r"2 DICOM series", gui=True),
    Case("dicom_missing_slice", _dicom_missing_slice, "warning", r"not uniform"),
    Case("dicom_duplicate_positions", _dicom_duplicate, "warning", r"duplicate"),
    Case("dicom_unequal_spacing", _dicom_unequal, "warning", r"not uniform"),
    Case("dicom_no_pixel_data", _dicom_no_pixels, "refused", r"4 DICOM file.*no pixel data", gui=True),
    Case("dicom_single_ct_slice", _dicom_one_ct_slice, "refused", r"single CT slice"),
    Case("dicom_truncated_slice", _dicom_truncated_file, "warning", r"not part of any image series.*IM0002"),
    Case("text_as_png", _text("page.png"), "refused", r"not a PNG"),
    Case("text_as_mha", _text("page.mha"), "refused", r"not a MetaImage", gui=True),
    Case("text_as_dcm", _text("page.dcm"), "refused", r""),
    Case("garbage_as_nii_gz", _garbage_bytes("noise.nii.gz"), "refused", r"NIfTI"),
    Case("empty_file", _empty_file, "refused", r"empty"),
    Case("empty_dir", _empty_dir, "refused", r"empty"),
    Case("dir_without_images", _dir_of_text, "refused", r"no DICOM"),
    Case("jsrt_img_wrong_size", _jsrt_wrong_size, "refused", r"JSRT"),
    Case("truncated_nii_gz", _truncated_nii_gz, "refused", r"truncated|corrupt"),
    Case("header_claims_50GB_mhd", _huge_mhd, "refused", r"50\.0 GB.*refused before reading", gui=True),
    Case("header_claims_50GB_mha", _huge_mha_local, "refused", r"50\.0 GB.*refused before reading"),
    Case("header_claims_50GB_nii", _huge_nifti, "refused", r"50\.0 GB.*refused before reading"),
    Case("unicode_and_spaces_path", _unicode_path, "loaded", gui=True),
    Case("unicode_dicom_folder", _unicode_dicom, "loaded"),
    Case("ct_slice_as_2d_file", _ct_slice_2d_file, "loaded"),
    Case("ct_two_slices", _ct_two_slices, "loaded"),
    Case("float64_ct", _float64_ct, "loaded"),
]
CASE_IDS = [c.name for c in CASES]
GUI_CASES = [c for c in CASES if c.gui]
assert len(set(CASE_IDS)) == len(CASE_IDS)


def build(case: Case, tmp_path: Path) -> Path:
    return case.make(tmp_path / "corpus" / case.name)


def load_outcome(path) -> tuple[str, str, object]:
    """(kind, text, scan or None): kind is loaded | warning | refused."""
    try:
        scan = load_scan(path)
    except ScanReadError as e:
        return "refused", str(e), None
    if scan.warnings:
        return "warning", "; ".join(scan.warnings), scan
    return "loaded", "", scan


def check_expected(case: Case, kind: str, text: str, path) -> None:
    assert kind == case.expect, f"{case.name}: expected {case.expect}, got {kind}: {text}"
    if case.match:
        assert re.search(case.match, text), f"{case.name}: {text!r} does not match {case.match!r}"
    if kind == "refused":
        assert "\n" not in text, text
        assert text.startswith(f"{path}: "), f"the message must name the file first: {text!r}"
        assert "Traceback" not in text and len(text) < 600


# --------------------------------------------------------------------------- load_scan


@pytest.mark.robustness
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_scan(case, tmp_path):
    path = build(case, tmp_path)
    t = time.perf_counter()
    kind, text, scan = load_outcome(path)
    elapsed = time.perf_counter() - t
    record(
        case.name,
        "load_scan",
        f"{'loaded with warning' if kind == 'warning' else kind}: " + text.replace(str(path), path.name),
    )
    check_expected(case, kind, text, path)
    assert elapsed < 20, f"{case.name} took {elapsed:.1f} s"
    if scan is not None:
        assert scan.array.ndim in (2, 3) and min(scan.shape) >= 2
        assert np.all(np.isfinite(scan.array))
        assert np.all(np.asarray(scan.spacing) > 0)
        d = np.asarray(scan.direction)
        np.testing.assert_allclose(d.T @ d, np.eye(scan.ndim), atol=1e-6)
        assert scan.path == str(path)


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    kinds = {c.expect for c in CASES}
    assert kinds == {"loaded", "warning", "refused"}


# --------------------------------------------------------------------------- napari reader


@pytest.fixture
def notes(monkeypatch):
    """napari notifications (reader and widget) captured instead of shown."""
    from napari.utils import notifications as n

    seen: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    for kind in seen:
        monkeypatch.setattr(n, f"show_{kind}", lambda m, k=kind: seen[k].append(str(m)))
    try:
        from napari_resmtnet import _widget as W
    except ImportError:  # no Qt
        return seen
    monkeypatch.setattr(W, "show_error", lambda m: seen["error"].append(str(m)))
    monkeypatch.setattr(W, "show_info", lambda m: seen["info"].append(str(m)))
    if hasattr(W, "show_warning"):
        monkeypatch.setattr(W, "show_warning", lambda m: seen["warning"].append(str(m)))
    return seen


#: refused cases that the reader does not claim: napari's other readers get them
NOT_CLAIMED = {"text_as_png", "empty_dir", "dir_without_images", "jsrt_img_wrong_size"}


@pytest.mark.robustness
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_napari_reader(case, tmp_path, notes):
    from napari_resmtnet._reader import napari_get_reader

    path = build(case, tmp_path)
    kind, text, scan = load_outcome(path)
    reader = napari_get_reader(str(path))
    if reader is None:
        record(case.name, "reader", "not claimed: left to napari's other readers")
        assert kind == "refused" and case.name in NOT_CLAIMED, f"{case.name}: a readable scan was not claimed"
        return
    assert case.name not in NOT_CLAIMED
    out = reader(str(path))
    if kind == "refused":
        record(case.name, "reader", "refused: one error notification")
        assert out == [(None,)], "nothing to add, and no exception"
        assert notes["error"] == [text] and notes["warning"] == []
        return
    record(
        case.name,
        "reader",
        f"{'loaded with warning' if kind == 'warning' else 'loaded'}: {len(notes['warning'])} warning notification(s)",
    )
    assert notes["error"] == []
    assert len(out) == 1 and out[0][2] == "image"
    data, kwargs, _ = out[0]
    np.testing.assert_array_equal(data, scan.array)
    assert len(notes["warning"]) == len(scan.warnings)
    assert all("\n" not in w for w in notes["warning"])
    np.testing.assert_allclose(kwargs["scale"], scan.spacing)


# --------------------------------------------------------------------------- resmtnet predict


def _tiny_net(nd: int):
    import torch

    from napari_resmtnet.model import ResMTNet, ResMTNetConfig

    torch.manual_seed(nd)
    cfg = ResMTNetConfig(spatial_dims=nd, widths=(8, 8, 16, 16), blocks=(1, 1, 1), head_width=8)
    return ResMTNet(cfg).eval()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: these networks are tiny, and on a busy machine more threads only
    wait for each other (10-100x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_nets(one_thread):
    """Small random Res-MTNets (the real network code, random weights)."""
    return {"CT": _tiny_net(3), "CXR": _tiny_net(2)}


TINY_INFO = {"name": "tiny-random", "version": "0", "sha256": "0" * 64, "threshold": 0.5}


def tiny_predictor(tiny_nets, modality: str):
    from napari_resmtnet.inference.predictor import Predictor

    spacing = 1.0 if modality == "CT" else 1.6
    return Predictor(modality, model=tiny_nets[modality], device="cpu", info=dict(TINY_INFO, spacing_mm=spacing))


@pytest.fixture
def tiny_cli_predictor(monkeypatch, tiny_nets):
    """`resmtnet predict` builds its Predictor through inference.Predictor: give it the tiny
    networks (a user ``--weights`` file still goes through the real loading and checks)."""
    import napari_resmtnet.inference.predictor as inference

    real = inference.Predictor

    def make(modality, weights=None, sha256=None, device="auto", **kw):
        if weights is not None:
            return real(modality, weights=weights, sha256=sha256, device=device, **kw)
        spacing = 1.0 if modality == "CT" else 1.6
        return real(modality, model=tiny_nets[modality], device="cpu", info=dict(TINY_INFO, spacing_mm=spacing), **kw)

    monkeypatch.setattr(inference, "Predictor", make)
    monkeypatch.setattr("napari_resmtnet.cli.predict.Predictor", make)


def run_predict(argv, capsys):
    from napari_resmtnet.cli.main import main

    rc = main(["predict", *map(str, argv)])
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    return rc, err, cap.out


@pytest.mark.robustness
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_predict_cli(case, tmp_path, tiny_cli_predictor, capsys):
    path = build(case, tmp_path)
    out = tmp_path / "out.csv"
    rc, err, stdout = run_predict([path, "--out", out, "--device", "cpu", "--quiet"], capsys)
    if case.expect == "refused":
        record(case.name, "predict", f"refused: exit {rc}, {len(err)} stderr line")
        assert rc != 0
        assert len(err) == 1, err
        assert str(path) in err[0], err[0]
    else:
        record(case.name, "predict", f"ran: exit {rc}")
        assert rc == 0 and err == [], err
        assert "1 of 1 scan(s) done" in stdout
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            assert math.isfinite(float(r["coordX"])) and math.isfinite(float(r["diameter_mm"]))


@pytest.mark.robustness
@pytest.mark.slow  # a subprocess or a large input: several seconds, not in `make test-fast`
def test_predict_subprocess_bad_files_one_line_each(tmp_path):
    """The installed command path (``python -m napari_resmtnet predict``), no in-process help:
    three bad inputs, three lines, each naming its file; exit status 1."""
    bad = [build(c, tmp_path) for c in CASES if c.name in ("truncated_raw", "text_as_mha", "header_claims_50GB_mhd")]
    out = tmp_path / "o.csv"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "napari_resmtnet", "predict", *map(str, bad), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, r.stderr
    assert len(err) == 3, r.stderr
    for p, line in zip(bad, err):
        assert str(p) in line
    assert "Traceback" not in r.stderr
    assert out.read_text().startswith("seriesuid,")  # the (empty) table is still written


# --------------------------------------------------------------------------- GUI


@pytest.mark.gui
@pytest.mark.robustness
@pytest.mark.parametrize("case", GUI_CASES, ids=[c.name for c in GUI_CASES])
def test_gui_open_then_detect(case, tmp_path, make_napari_viewer, qtbot, notes, monkeypatch, tiny_nets):
    """viewer.open through our reader, then "Detect nodules": a message, never an exception."""
    from napari_resmtnet import _widget as W

    monkeypatch.setenv("RESMTNET_SYNC", "1")
    monkeypatch.setenv("RESMTNET_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("RESMTNET_AUTOSAVE_RESTORE", "never")
    path = build(case, tmp_path)
    kind, text, scan = load_outcome(path)
    viewer = make_napari_viewer()
    w = W.NoduleWidget(viewer, predictor_factory=lambda m, d: tiny_predictor(tiny_nets, m))
    viewer.window.add_dock_widget(w)
    viewer.open(str(path), plugin="napari-resmtnet")
    if kind == "refused":
        assert len(viewer.layers) == 0
        assert notes["error"] == [text]
        w.detect()
        assert len(notes["error"]) == 2 and "Open a chest CT or X-ray first" in notes["error"][1]
        record(case.name, "gui", "refused: error notification, no layer")
        return
    assert len(viewer.layers) == 1 and notes["error"] == []
    assert len(notes["warning"]) == len(scan.warnings)
    w.detect()
    assert notes["error"] == [], notes["error"]
    assert w.nodule_layer is not None
    record(case.name, "gui", f"loaded: detection ran ({len(w.nodules)} candidates)")


# =========================================================================== safe weights


def weights_file(path: Path, modality="CT", nd=None, sidecar=True, **override) -> Path:
    """A small, valid Res-MTNet weights file (random weights) with ``<file>.sha256``."""
    import torch

    from napari_resmtnet.model import ResMTNet, ResMTNetConfig
    from napari_resmtnet.inference.weights import WEIGHTS_FORMAT, sha256_of

    nd = nd or (3 if modality == "CT" else 2)
    torch.manual_seed(0)
    cfg = ResMTNetConfig(spatial_dims=nd, widths=(8, 8, 16, 16), blocks=(1, 1, 1), head_width=8)
    obj = {
        "format": WEIGHTS_FORMAT,
        "name": "tiny-user",
        "version": "0.1.0",
        "modality": modality,
        "spacing_mm": 1.0 if modality == "CT" else 1.6,
        "threshold": 0.4,
        "network": cfg.to_dict(),
        "state_dict": ResMTNet(cfg).state_dict(),
    }
    obj.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    if sidecar:
        path.with_name(path.name + ".sha256").write_text(sha256_of(path) + f"  {path.name}\n")
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo PWNED > pwned.txt",))


def _bad_weights(kind: str, d: Path) -> Path:
    """Weights files that must be refused: (kind) -> path, with a sidecar hash where the
    hash would otherwise be the reason."""
    import torch

    from napari_resmtnet.inference.weights import sha256_of

    d.mkdir(parents=True, exist_ok=True)
    if kind == "altered":
        p = weights_file(d / "altered.pt")
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        return p
    if kind == "truncated":
        p = weights_file(d / "truncated.pt")
        p.write_bytes(p.read_bytes()[:2000])
        p.with_name(p.name + ".sha256").write_text(sha256_of(p) + "\n")
        return p
    if kind == "pickled_code":
        p = d / "evil.pt"
        torch.save({"format": "resmtnet-weights/1", "payload": _Evil()}, p)
        p.with_name(p.name + ".sha256").write_text(sha256_of(p) + "\n")
        return p
    if kind == "no_sidecar":
        return weights_file(d / "unverified.pt", sidecar=False)
    if kind == "wrong_network_dims":
        return weights_file(d / "dims.pt", nd=2)
    if kind == "nan_threshold":
        return weights_file(d / "nan.pt", threshold=float("nan"))
    if kind == "newer_format":
        return weights_file(d / "newer.pt", format="resmtnet-weights/2")
    if kind == "other_network":
        p = weights_file(d / "other.pt")
        ck = torch.load(p, weights_only=True)
        ck["network"]["widths"] = [16, 16, 32, 32]
        torch.save(ck, p)
        p.with_name(p.name + ".sha256").write_text(sha256_of(p) + "\n")
        return p
    if kind == "not_torch":
        p = d / "notes.pt"
        p.write_text("these are not weights\n")
        p.with_name(p.name + ".sha256").write_text(sha256_of(p) + "\n")
        return p
    raise KeyError(kind)


BAD_WEIGHTS = {
    "altered": r"sha256 mismatch",
    "truncated": r"not a safe weights file",
    "pickled_code": r"not a safe weights file",
    "no_sidecar": r"refusing unverified weights",
    "wrong_network_dims": r"need a 3D network",
    "nan_threshold": r"threshold must be a number",
    "newer_format": r"not supported by this version",
    "other_network": r"does not match this version's network",
    "not_torch": r"not a PyTorch weights file",
}


@pytest.mark.robustness
@pytest.mark.parametrize("kind", sorted(BAD_WEIGHTS))
def test_predict_cli_refuses_bad_weights_in_one_line(kind, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    w = _bad_weights(kind, tmp_path / "w")
    scan = write_image(tmp_path / "scan.mha", ct_array((10, 32, 32)))
    out = tmp_path / "out.csv"
    rc, err, _ = run_predict([scan, "--out", out, "--weights", w, "--device", "cpu", "--quiet"], capsys)
    note(f"weights_{kind}", f"predict refused: exit {rc}: {err[0] if err else ''}".replace(str(tmp_path), "."))
    assert rc != 0
    assert len(err) == 1, err
    assert str(w) in err[0] and re.search(BAD_WEIGHTS[kind], err[0]), err[0]
    assert not (tmp_path / "pwned.txt").exists(), "pickled code ran"


@pytest.mark.robustness
def test_predict_cli_user_weights_good_and_missing(tmp_path, capsys, one_thread):
    w = weights_file(tmp_path / "good.pt")
    scan = write_image(tmp_path / "scan.mha", ct_array((10, 32, 32)))
    out = tmp_path / "out.csv"
    rc, err, stdout = run_predict([scan, "--out", out, "--weights", w, "--device", "cpu", "--quiet"], capsys)
    assert rc == 0 and err == [] and "1 of 1 scan(s) done" in stdout
    rc, err, _ = run_predict([scan, "--out", out, "--weights", tmp_path / "nope.pt", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "nope.pt" in err[0] and "not found" in err[0]


# =========================================================================== GUI: weights


class FixedPredictor:
    """Stands in for Res-MTNet: two CT candidates (or two radiograph ones) at fixed boxes."""

    threshold = 0.5
    model_info = {"name": "fixed", "version": "1", "sha256": "a" * 64}

    def __init__(self, modality="CT"):
        self.modality = modality

    def predict(self, scan, progress=None, cancel=None):
        from napari_resmtnet.detections import Detections

        if scan.ndim == 3:
            boxes = [[2.2, 10, 12, 6.6, 20, 24], [5.0, 22, 20, 8.0, 30, 30]]
        else:
            boxes = [[10, 20, 30, 40], [50, 50, 60, 64]]
        return Detections(boxes, [0.9, 0.3], [0.8, 0.2], Detections.geometry_of(scan))


@pytest.fixture
def gui_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RESMTNET_SYNC", "1")
    monkeypatch.setenv("RESMTNET_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("RESMTNET_AUTOSAVE_RESTORE", "ask")
    return tmp_path / "autosave"


def open_with_widget(make_napari_viewer, path, factory=None):
    from napari_resmtnet import _widget as W

    viewer = make_napari_viewer()
    w = W.NoduleWidget(viewer, predictor_factory=factory or (lambda m, d: FixedPredictor(m)))
    viewer.window.add_dock_widget(w)
    if path is not None:
        viewer.open(str(path), plugin="napari-resmtnet")
    return viewer, w


@pytest.mark.gui
@pytest.mark.robustness
def test_widget_user_weights_checked_and_failures_notified(
    make_napari_viewer, qtbot, notes, gui_env, tmp_path, one_thread
):
    scan = write_image(tmp_path / "scan.mha", ct_array((10, 32, 32)))
    viewer, w = open_with_widget(make_napari_viewer, scan, factory=lambda m, d: pytest.fail("bundled weights used"))
    for kind in ("altered", "pickled_code", "wrong_network_dims", "no_sidecar"):
        bad = _bad_weights(kind, tmp_path / "w")
        assert w.detect_panel.set_weights(bad) is False
        assert re.search(BAD_WEIGHTS[kind], notes["error"][-1]) and str(bad) in notes["error"][-1]
        assert w.detect_panel.weights_path is None and w.detect_panel.weights_label.text() == "bundled"
    assert len(notes["error"]) == 4
    # a file picked in the panel's file field goes through the same checks
    w.detect_panel.params.weights.value = bad
    assert len(notes["error"]) == 5 and w.detect_panel.weights_path is None
    assert w.detect_panel.params.weights.line_edit.value == ""
    good = weights_file(tmp_path / "w" / "good.pt")
    w.detect_panel.params.weights.value = good
    assert w.detect_panel.weights_path == str(good) and w.detect_panel.bundled_button.isEnabled()
    assert w.detect_panel.weights_info["modality"] == "CT" and "good.pt" in w.detect_panel.weights_label.text()
    w.detect()  # the real Predictor with the user file
    assert w.nodule_layer is not None and len(notes["error"]) == 5
    # the file is altered after it was chosen: detection re-checks and says so
    w.detect_panel.predictors.clear()
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x01
    good.write_bytes(bytes(data))
    w.detect()
    assert len(notes["error"]) == 6
    assert notes["error"][-1].startswith("Nodule detection failed:") and "sha256 mismatch" in notes["error"][-1]
    w.detect_panel.bundled_button.click()  # the "Bundled" button
    assert w.detect_panel.weights_path is None and w.detect_panel.weights_label.text() == "bundled"


# =========================================================================== no lost work


def _table(n=3, seriesuid="1.2.840.113619.2.55.3", origin=(-100.0, 10.0, -50.0), seed=0):
    from napari_resmtnet.detections import Detections
    from napari_resmtnet.annotations.table import NoduleTable, image_identity
    from napari_resmtnet.scan import Scan

    rng = np.random.default_rng(seed)
    scan = Scan(
        np.zeros((20, 64, 64), np.int16),
        (2.0, 0.7, 0.7),
        origin,
        np.eye(3),
        "CT",
        seriesuid=seriesuid,
        path="/data/ct 1.mhd",
    )
    lo = rng.uniform(0, 40, (n, 3))
    boxes = np.concatenate([lo, lo + rng.uniform(1, 12, (n, 3))], 1)
    det = Detections(boxes, rng.uniform(0, 1, n), rng.uniform(0, 1, n), Detections.geometry_of(scan))
    return NoduleTable.from_detections(det, image_identity(scan), threshold=0.5, model_info={"name": "m"})


@pytest.mark.robustness
def test_autosave_round_trip_key_and_policy(tmp_path, monkeypatch):
    from napari_resmtnet.annotations import autosave as A
    from napari_resmtnet.files import NoduleFileError

    monkeypatch.setenv(A.ENV_DIR, str(tmp_path / "as"))
    t = _table(5).flipped([2]).with_reviewed([1, 3])
    assert A.peek(t.image) is None and A.load(t.image) is None
    p = A.save(t)
    assert p.parent == tmp_path / "as" and p.name == A.image_key(t.image) + ".json"
    info = A.peek(t.image)
    assert info.n_nodules == 5 and info.n_shown == int(t.visible_mask().sum()) and info.saved_at
    assert A.load(t.image).equals(t)
    # the key ignores the path (a moved scan finds its autosave) but not the geometry
    moved = dict(t.image, path="/elsewhere/ct.mhd")
    assert A.image_key(moved) == A.image_key(t.image) and A.load(moved) is not None
    assert A.image_key(dict(t.image, origin=[-100.0, 10.0, -49.0])) != A.image_key(t.image)
    assert A.image_key(dict(t.image, seriesuid="other")) != A.image_key(t.image)
    assert A.image_key(dict(t.image, spacing=[2.0, 0.7, 0.7000000001])) == A.image_key(t.image)
    # a damaged autosave is a clear error, not a crash
    p.write_text("{ not json")
    with pytest.raises(NoduleFileError, match="not valid JSON"):
        A.peek(t.image)
    assert A.discard(t.image) and not A.discard(t.image)
    for value, policy in (("", "ask"), ("ALWAYS", "always"), ("never", "never"), ("bogus", "ask")):
        monkeypatch.setenv(A.ENV_RESTORE, value)
        assert A.restore_policy() == policy
    monkeypatch.delenv(A.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert "napari-resmtnet" in str(A.autosave_dir())


@pytest.mark.robustness
def test_autosave_tidies_stale_temp_files(tmp_path, monkeypatch):
    from napari_resmtnet.annotations import autosave as A

    monkeypatch.setenv(A.ENV_DIR, str(tmp_path))
    stale = tmp_path / ".abc.json.x1.tmp"
    fresh = tmp_path / ".abc.json.x2.tmp"
    stale.write_text("half")
    fresh.write_text("half")
    old = time.time() - 2 * A.STALE_TEMP_S
    os.utime(stale, (old, old))
    A.save(_table(1))
    assert not stale.exists() and fresh.exists()


@pytest.mark.gui
@pytest.mark.robustness
def test_every_edit_is_autosaved_debounced_and_restored_on_reopen(
    make_napari_viewer, qtbot, notes, gui_env, tmp_path, monkeypatch
):
    from napari_resmtnet import _widget as W
    from napari_resmtnet.annotations import autosave as A

    scan_path = write_mhd(tmp_path / "data", name="1.3.6.1.4.1.14519.5.2.1.6279.6001.77", shape=(12, 40, 40))
    viewer, w = open_with_widget(make_napari_viewer, scan_path)
    writes = []
    real_save = A.save
    monkeypatch.setattr(A, "save", lambda table: writes.append(table) or real_save(table))
    w.detect()
    w.review_panel.table.select_ids([1])
    w.flip_selected()
    w.mark_reviewed()
    nid = w.add_nodule([3.0, 5, 5, 5.0, 9, 11], label="malignant")
    for v in (40, 35, 30, 25, 20):  # a dragged slider: many changes, one write
        w.set_threshold(v / 100)
    assert writes == []  # debounced: nothing written while the user is busy
    qtbot.waitUntil(lambda: len(writes) == 1, timeout=5000)
    qtbot.wait(1300)
    assert len(writes) == 1
    expected = w.nodules.copy()
    assert nid in expected and expected.threshold == 0.2
    image = expected.image
    assert A.load(image).equals(expected)
    # delete one more, then the viewer closes before the debounce fires: still saved
    w.review_panel.table.select_ids([2])
    w.delete_selected()
    after_delete = w.nodules.copy()
    w.close()
    assert len(writes) == 2 and A.load(image).equals(after_delete)
    viewer.close()

    # reopen the same scan in a new session: the widget asks, and restores exactly
    asked = []
    monkeypatch.setattr(W, "ask_restore", lambda parent, q, on_answer: asked.append(q) or on_answer(True))
    viewer2, w2 = open_with_widget(make_napari_viewer, scan_path)
    qtbot.waitUntil(lambda: w2.nodule_layer is not None, timeout=5000)
    assert len(asked) == 1 and "2 nodule(s)" in asked[0] and "1.3.6.1.4.1.14519.5.2.1.6279.6001.77" in asked[0]
    assert w2.nodules.equals(after_delete)
    assert any("Restored 2 autosaved nodule(s)" in m for m in notes["info"])
    shapes_before = len(w2.nodule_layer.data)
    assert shapes_before > 0
    viewer2.close()


@pytest.mark.gui
@pytest.mark.robustness
@pytest.mark.parametrize("policy", ["never", "always", "declined"])
def test_restore_policies(policy, make_napari_viewer, qtbot, notes, gui_env, tmp_path, monkeypatch):
    from napari_resmtnet import _widget as W
    from napari_resmtnet.annotations import autosave as A
    from napari_resmtnet.io.formats import load_scan
    from napari_resmtnet.annotations.table import image_identity

    scan_path = write_image(tmp_path / "d" / "case7.nrrd", ct_array((10, 32, 32)), spacing=(0.8, 0.8, 2.0))
    scan = load_scan(scan_path)
    saved = FixedPredictor()
    from napari_resmtnet.annotations.table import NoduleTable

    t = NoduleTable.from_detections(saved.predict(scan), image_identity(scan), threshold=0.5)
    A.save(t)
    asked = []
    monkeypatch.setattr(W, "ask_restore", lambda parent, q, on_answer: asked.append(q) or on_answer(False))
    monkeypatch.setenv(A.ENV_RESTORE, "ask" if policy == "declined" else policy)
    viewer, w = open_with_widget(make_napari_viewer, scan_path)
    qtbot.wait(50)
    if policy == "always":
        assert asked == [] and w.nodules.equals(t)
    elif policy == "never":
        assert asked == [] and w.nodule_layer is None
    else:
        assert len(asked) == 1 and "2 nodule(s) of case7 (1 shown)" in asked[0] and w.nodule_layer is None
    # the same image closed and opened again in this session is offered its autosave again
    viewer.layers.clear()
    viewer.open(str(scan_path), plugin="napari-resmtnet")
    qtbot.wait(50)
    assert len(asked) == (2 if policy == "declined" else 0)


@pytest.mark.gui
@pytest.mark.robustness
def test_failed_autosave_is_one_notification(make_napari_viewer, qtbot, notes, gui_env, tmp_path, monkeypatch):
    from napari_resmtnet.annotations import autosave as A

    blocker = tmp_path / "not a folder"
    blocker.write_text("x")
    monkeypatch.setenv(A.ENV_DIR, str(blocker / "autosave"))
    viewer, w = open_with_widget(make_napari_viewer, write_image(tmp_path / "s.mha", ct_array((10, 32, 32))))
    w.detect()
    assert w.flush_autosave() == []
    w.review_panel.table.select_ids([1])
    w.flip_selected()
    assert w.flush_autosave() == []
    fails = [m for m in notes["error"] if m.startswith("Autosave failed")]
    assert len(fails) == 1 and str(blocker) in fails[0]


def _make_read_only(folder: Path):
    """Make ``folder`` read-only for this process (root ignores modes: use the immutable
    flag); returns an undo function, or None when it cannot be done here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    r = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if r.returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


@pytest.mark.gui
@pytest.mark.robustness
def test_export_to_full_or_read_only_location_fails_loudly(
    make_napari_viewer, qtbot, notes, gui_env, tmp_path, monkeypatch
):
    from napari_resmtnet import files

    viewer, w = open_with_widget(make_napari_viewer, write_image(tmp_path / "s.mha", ct_array((10, 32, 32))))
    w.detect()
    out = tmp_path / "résultats Müller 测试"
    out.mkdir()
    paths = w.export_panel.export_nodules(out / "nodules.csv")
    before = {p: Path(p).read_text() for p in paths}
    assert oct(Path(paths[0]).stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    w.review_panel.table.select_ids([1])
    w.flip_selected()

    def full(fd):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files.os, "fsync", full)
        assert w.export_panel.export_nodules(out / "nodules.csv") == []
    assert "No space left on device" in notes["error"][-1] and "nodules" in notes["error"][-1]
    assert {p: Path(p).read_text() for p in paths} == before
    assert sorted(os.listdir(out)) == ["nodules.csv", "nodules.json"]

    undo = _make_read_only(out)
    if undo is None:
        pytest.skip("cannot make a folder read-only here")
    try:
        assert w.export_panel.export_nodules(out / "nodules.csv") == []
    finally:
        undo()
    assert re.search(
        r"could not write .*nodules\.(csv|json): (Operation not permitted|Permission denied|folder .* is not writable)",
        notes["error"][-1],
    ), notes["error"][-1]
    assert {p: Path(p).read_text() for p in paths} == before
    assert sorted(os.listdir(out)) == ["nodules.csv", "nodules.json"]


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


KILL_CHILD = r"""
import os, sys
from napari_resmtnet.annotations import export as E
ref, target = sys.argv[1], sys.argv[2]
tables = [E.read_nodules_json(os.path.join(ref, n)) for n in ("A.json", "B.json")]
i = 0
while True:
    E.export_nodules(target, tables[i % 2], exported_at="2024-01-01T00:00:00+00:00")
    if i == 0:
        print("ready", flush=True)
    i += 1
"""


@pytest.mark.robustness
@pytest.mark.slow  # a subprocess or a large input: several seconds, not in `make test-fast`
def test_sigkill_during_export_never_leaves_a_half_written_file(tmp_path):
    """A process exports a large nodule set (two versions, alternately) to one path in a
    loop and is killed with SIGKILL at random moments: each file is always one version,
    whole, never a mix or a prefix."""
    from napari_resmtnet.annotations import export as E

    a = _table(4000, seed=1)
    b = a.flipped(list(range(1, 4000, 7))).removed([5, 6, 7])
    ref = tmp_path / "ref"
    ref.mkdir()
    stamp = "2024-01-01T00:00:00+00:00"
    E.export_nodules(ref / "A", a, exported_at=stamp)
    E.export_nodules(ref / "B", b, exported_at=stamp)
    versions = {suffix: {(ref / f"{v}{suffix}").read_text(): v for v in "AB"} for suffix in (".csv", ".json")}
    assert len(versions[".json"]) == 2 and len((ref / "A.json").read_text()) > 1_000_000
    out = tmp_path / "out"
    out.mkdir()
    target = out / "nodules"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random(1234)
    seen, interrupted = [], 0
    for _ in range(6):
        p = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(ref), str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert p.stdout.readline().strip() == b"ready", p.stderr.read().decode()[-2000:]
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            p.kill()
            p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        for suffix in (".csv", ".json"):
            text = (out / f"nodules{suffix}").read_text()
            assert text in versions[suffix], f"nodules{suffix} is neither version (half-written?)"
            seen.append(versions[suffix][text])
        json.loads((out / "nodules.json").read_text())
        interrupted = max(interrupted, len([f for f in os.listdir(out) if f.endswith(".tmp")]))
    note(
        "sigkill_during_export",
        f"6 kills, files always whole ({''.join(seen)}); {interrupted} temp file(s) left by killed writes",
    )


MAXRSS_CHILD = r"""
import resource, sys, time
from napari_resmtnet.io.formats import ScanReadError, load_scan
import SimpleITK  # imported before the baseline, as in any session that read a scan
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
for p in sys.argv[1:]:
    try:
        load_scan(p)
        print("LOADED", p)
    except ScanReadError as e:
        print("REFUSED", e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_DELTA_KB", after - before, "SECONDS", round(time.perf_counter() - t, 3))
"""


@pytest.mark.robustness
def test_50gb_headers_refused_without_a_memory_spike(tmp_path):
    """The peak RSS of the process does not grow while the 50 GB headers are refused."""
    paths = [build(c, tmp_path) for c in CASES if c.name.startswith("header_claims_50GB")]
    assert len(paths) == 3
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-c", MAXRSS_CHILD, *map(str, paths)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    refused = [ln for ln in lines if ln.startswith("REFUSED")]
    assert len(refused) == 3 and all("50.0 GB" in ln for ln in refused), r.stdout
    delta_kb, seconds = int(lines[-1].split()[1]), float(lines[-1].split()[3])
    note(
        "header_claims_50GB_memory", f"3 headers refused in {seconds:.2f} s; peak RSS grew by {delta_kb / 1024:.1f} MB"
    )
    assert delta_kb < 50 * 1024, f"peak RSS grew by {delta_kb / 1024:.0f} MB while refusing"
    assert seconds < 10
