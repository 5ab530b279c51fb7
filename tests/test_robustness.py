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

import csv
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_resmtnet.io import ScanReadError, load_scan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 60

# --------------------------------------------------------------------------- no hangs


@pytest.fixture(autouse=True)
def _alarm():
    """Fail (not hang) a test that runs longer than CASE_TIMEOUT_S."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test ran longer than {CASE_TIMEOUT_S} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- summary table

#: case -> {path: outcome text}; printed by `_summary` when the module's tests are done
RESULTS: dict[str, dict[str, str]] = {}
PATHS = ("load_scan", "reader", "predict", "gui")


def record(case: str, path: str, outcome: str) -> None:
    RESULTS.setdefault(case, {})[path] = " ".join(outcome.split())


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not RESULTS:
        return
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"bad-input corpus: {len(RESULTS)} cases"]
    counts: dict[str, int] = {}
    width = max(len(c) for c in RESULTS)
    for case in sorted(RESULTS):
        r = RESULTS[case]
        main = r.get("load_scan", "")
        kind = main.split(":", 1)[0] if main else "-"
        counts[kind] = counts.get(kind, 0) + 1
        others = ", ".join(f"{p}={r[p].split(':', 1)[0]}" for p in PATHS[1:] if p in r)
        lines.append(f"  {case:<{width}}  {main[:150]}" + (f"  [{others}]" if others else ""))
    lines.append("  outcomes (load_scan): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    text = "\n".join(lines)
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
    a[:, y // 4: 3 * y // 4, x // 4: 3 * x // 4] = 40
    a += rng.integers(-20, 20, shape, dtype=np.int16)
    return a


def edit_header(p: Path, old: str, new: str) -> None:
    data = p.read_bytes()
    if old.encode() not in data:
        raise AssertionError(f"{old!r} not in the header of {p}")
    p.write_bytes(data.replace(old.encode(), new.encode(), 1))


def write_mhd(folder: Path, name="scan", shape=(6, 8, 10), etype="MET_SHORT", dtype=np.int16,
              datafile=None, header_shape=None, extra="") -> Path:
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
        "ElementSpacing = 0.7 0.7 2.5\n" + extra +
        f"DimSize = {hs[2]} {hs[1]} {hs[0]}\nElementType = {etype}\n"
        f"ElementDataFile = {datafile or raw.name}\n")
    return mhd


def dicom_slice(path: Path, pixels, z: float, series_uid: str, instance: int, modality="CT",
                spacing=(0.7, 0.7), thickness=2.5, with_pixels=True, orientation=(1, 0, 0, 0, 1, 0)):
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
    expect: str                   # "loaded" | "warning" | "refused"
    match: str = ""               # regex the message (refused) or the warnings must contain
    gui: bool = False             # also opened with viewer.open + the widget (slow-ish)


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
    p.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 10 8 6\nspacings: 0.7 0.7 2.5\n"
                 f"endian: little\nencoding: raw\ndata file: ../{s.name}\n\n")
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
    p.write_bytes(b"ObjectType = Image\nNDims = 1\nDimSize = 64\nElementType = MET_SHORT\n"
                  b"ElementDataFile = LOCAL\n" + b"\0" * 128)
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
    return write_image(d / "oblique.nii.gz", ct_array((8, 24, 24)), spacing=(0.8, 0.8, 2.0),
                       direction=[[c, -s, 0], [s, c, 0], [0, 0, 1]])


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
    p.write_text("ObjectType = Image\nNDims = 3\nBinaryData = True\nCompressedData = False\n"
                 "ElementSpacing = 0.7 0.7 0.7\nDimSize = 5000 5000 1000\nElementType = MET_SHORT\n"
                 "ElementDataFile = huge.raw\n")
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
    return write_image(d / "Müller José 测试" / "scan with spaces é.nrrd", ct_array((10, 32, 32)),
                       spacing=(0.8, 0.8, 2.0), origin=(-10, 20, -300))


def _unicode_dicom(d):
    return dicom_series(d / "Patiënt ø" / "série 1", [0, 2.5, 5, 7.5, 10])


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
    record(case.name, "load_scan", f"{'loaded with warning' if kind == 'warning' else kind}: "
           + text.replace(str(path), path.name))
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
        record(case.name, "reader", f"refused: one error notification")
        assert out == [(None,)], "nothing to add, and no exception"
        assert notes["error"] == [text] and notes["warning"] == []
        return
    record(case.name, "reader", f"{'loaded with warning' if kind == 'warning' else 'loaded'}: "
           f"{len(notes['warning'])} warning notification(s)")
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
def tiny_nets():
    """Small random Res-MTNets (the real network code, random weights)."""
    return {"CT": _tiny_net(3), "CXR": _tiny_net(2)}


TINY_INFO = {"name": "tiny-random", "version": "0", "sha256": "0" * 64, "threshold": 0.5}


def tiny_predictor(tiny_nets, modality: str):
    from napari_resmtnet.inference import Predictor

    spacing = 1.0 if modality == "CT" else 1.6
    return Predictor(modality, model=tiny_nets[modality], device="cpu", info=dict(TINY_INFO, spacing_mm=spacing))


@pytest.fixture
def tiny_cli_predictor(monkeypatch, tiny_nets):
    """`resmtnet predict` builds its Predictor through inference.Predictor: give it the tiny
    networks (a user ``--weights`` file still goes through the real loading and checks)."""
    import napari_resmtnet.inference as inference

    real = inference.Predictor

    def make(modality, weights=None, sha256=None, device="auto", **kw):
        if weights is not None:
            return real(modality, weights=weights, sha256=sha256, device=device, **kw)
        spacing = 1.0 if modality == "CT" else 1.6
        return real(modality, model=tiny_nets[modality], device="cpu", info=dict(TINY_INFO, spacing_mm=spacing), **kw)

    monkeypatch.setattr(inference, "Predictor", make)


def run_predict(argv, capsys):
    from napari_resmtnet.cli import main

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
def test_predict_subprocess_bad_files_one_line_each(tmp_path):
    """The installed command path (``python -m napari_resmtnet predict``), no in-process help:
    three bad inputs, three lines, each naming its file; exit status 1."""
    bad = [build(c, tmp_path) for c in CASES if c.name in ("truncated_raw", "text_as_mha", "header_claims_50GB_mhd")]
    out = tmp_path / "o.csv"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "napari_resmtnet", "predict", *map(str, bad), "--out", str(out),
                        "--quiet"], capture_output=True, text=True, env=env, timeout=120)
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
