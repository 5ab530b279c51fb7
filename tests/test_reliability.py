"""The second bad-input corpus: files built to read outside the scan's folder, crash, hang or
pass wrong data silently. Each case goes through `load_scan`, the napari reader check and
``resmtnet predict`` (refused cases need no model); every outcome is "loaded", "loaded with
a warning" or "refused" in one line naming the file, within a time limit.

The cases are made here, in temporary folders, from a few lines of numpy/SimpleITK/pydicom.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import hang_alarm

sitk = pytest.importorskip("SimpleITK")

from napari_resmtnet.io import formats as sio  # noqa: E402
from napari_resmtnet.io.formats import ScanReadError, can_read, load_scan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def _alarm():
    """Fail (not hang) a test that runs longer than CASE_TIMEOUT_S."""
    with hang_alarm(CASE_TIMEOUT_S):
        yield


# --------------------------------------------------------------------------- builders


def ct(shape=(6, 8, 10), seed=0):
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000, np.int16)
    a[:, 2:6, 2:8] = 40
    return a + rng.integers(-20, 20, shape, dtype=np.int16)


def mhd(d: Path, datafile: str, shape=(6, 8, 10), extra: str = "", raw: bool = True, name="scan") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if raw:
        (d / f"{name}.raw").write_bytes(ct(shape).tobytes())
    p = d / f"{name}.mhd"
    p.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "ElementSpacing = 0.7 0.7 2.5\n"
        + extra
        + f"DimSize = {shape[2]} {shape[1]} {shape[0]}\nElementType = MET_SHORT\n"
        f"ElementDataFile = {datafile}\n"
    )
    return p


def secret(d: Path) -> Path:
    """A file outside the scan's folder that must never be read."""
    s = d.parent / f"{d.name}_secret.raw"
    d.parent.mkdir(parents=True, exist_ok=True)
    s.write_bytes(ct((6, 8, 10), seed=9).tobytes())
    return s


def _pattern_printf_escape(d):
    return mhd(d, "%1$cetc%1$cpasswd 47 47 1", raw=False)


def _pattern_percent_s(d):
    return mhd(d, "%s 1 1 1", raw=False)


def _pattern_two_fields(d):
    return mhd(d, "s%d_%d.raw 1 6 1", raw=False)


def _pattern_step_zero(d):
    return mhd(d, "slice%02d.raw 0 5 0", raw=False)


def _pattern_billion_files(d):
    return mhd(d, "slice%d.raw 1 1000000000 1", raw=False)


def _pattern_outside(d):
    s = secret(d)
    return mhd(d, f"../{s.stem[:-1]}%d.raw 0 0 1", raw=False, shape=(1, 8, 10))


def _pattern_good(d):
    d.mkdir(parents=True, exist_ok=True)
    a = ct()
    for k in range(a.shape[0]):
        (d / f"slice{k:02d}.raw").write_bytes(a[k].tobytes())
    return mhd(d, "slice%02d.raw 0 5 1", raw=False)


def _list_fifo(d):
    p = mhd(d, "LIST 2D", raw=False, shape=(2, 8, 10))
    (d / "s0.raw").write_bytes(ct((1, 8, 10)).tobytes())
    os.mkfifo(d / "s1.raw")
    with open(p, "a") as f:
        f.write("s0.raw\ns1.raw\n")
    return p


def _list_outside(d):
    s = secret(d)
    p = mhd(d, "LIST 2D", raw=False, shape=(1, 8, 10))
    with open(p, "a") as f:
        f.write(f"../{s.name}\n")
    return p


def _raw_symlink_out(d):
    s = secret(d)
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(s, d / "scan.raw")
    return mhd(d, "scan.raw", raw=False)


def _raw_symlink_in(d):
    p = mhd(d, "link.raw")
    os.symlink("scan.raw", d / "link.raw")
    return p


def _raw_fifo(d):
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "scan.raw")
    return mhd(d, "scan.raw", raw=False)


def _raw_is_folder(d):
    (d / "scan.raw").mkdir(parents=True)
    return mhd(d, "scan.raw", raw=False)


def _raw_dev_zero(d):
    return mhd(d, "/dev/zero", raw=False)


def _lowercase_key(d):
    s = secret(d)
    p = mhd(d, "scan.raw")
    text = p.read_text().replace("ElementDataFile = scan.raw", f"elementdatafile = ../{s.name}")
    p.write_text(text)
    return p


def _nrrd(d: Path, extra_header: str, datafile: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "scan.nhdr"
    p.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 10 8 6\nendian: little\n"
        "encoding: raw\nspace directions: (0.7,0,0) (0,0.7,0) (0,0,2.5)\n" + extra_header + f"data file: {datafile}\n"
    )
    return p


def _nrrd_datafile_after_comments(d):
    s = secret(d)
    return _nrrd(d, "# padding comment line, long enough to push the field far down\n" * 400, f"../{s.name}")


def _nrrd_pattern_escape(d):
    return _nrrd(d, "", "%1$cetc%1$cpasswd 47 47 1")


def _nrrd_list_outside(d):
    s = secret(d)
    return _nrrd(d, "", f"LIST 2\n../{s.name}")


def _nrrd_two_datafiles(d):
    (d).mkdir(parents=True, exist_ok=True)
    (d / "a.raw").write_bytes(ct().tobytes())
    return _nrrd(d, "data file: a.raw\n", "a.raw")


def _mhd_field(field: str, value: str):
    def make(d):
        return mhd(d, "scan.raw", extra=f"{field} = {value}\n")

    return make


def _dimsize(value: str):
    def make(d):
        p = mhd(d, "scan.raw")
        p.write_text(p.read_text().replace("DimSize = 10 8 6", f"DimSize = {value}"))
        return p

    return make


def _compressed_size_nan(d):
    d.mkdir(parents=True, exist_ok=True)
    raw = zlib.compress(ct().tobytes())
    (d / "scan.zraw").write_bytes(raw)
    return mhd(d, "scan.zraw", raw=False, extra="CompressedData = True\nCompressedDataSize = nan\n")


def _nifti_vox_offset(value: float):
    def make(d):
        d.mkdir(parents=True, exist_ok=True)
        p = d / "scan.nii"
        sitk.WriteImage(sitk.GetImageFromArray(ct()), str(p))
        data = bytearray(p.read_bytes())
        data[108:112] = struct.pack("<f", value)
        p.write_bytes(bytes(data))
        return p

    return make


def _nifti_forms_disagree(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "forms.nii"
    img = sitk.GetImageFromArray(ct())
    img.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(img, str(p))
    data = bytearray(p.read_bytes())
    qcode, scode = struct.unpack("<hh", bytes(data[252:256]))
    assert qcode > 0 and scode > 0
    # move the sform's origin by 500 mm in x; the qform stays
    x = struct.unpack("<f", bytes(data[292:296]))[0]
    data[292:296] = struct.pack("<f", x + 500.0)
    p.write_bytes(bytes(data))
    return p


def _fifo_as_scan(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "scan.mha"
    os.mkfifo(p)
    return p


def _complex_voxels(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "complex.mha"
    a = ct().astype(np.float32)
    img = sitk.RealAndImaginaryToComplex(sitk.GetImageFromArray(a), sitk.GetImageFromArray(a * 0.5))
    sitk.WriteImage(img, str(p))
    return p


def _float64_huge(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "huge.nii.gz"
    a = ct().astype(np.float64)
    a[0, 0, 0] = 1e300
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return p


def _micro_spacing(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "micro.mha"
    img = sitk.GetImageFromArray(ct())
    img.SetSpacing((1e-6, 1e-6, 1e-6))
    sitk.WriteImage(img, str(p))
    return p


def _escape_name(d):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "evil\nname\x1b[31m.mha"
    p.write_text("not an image at all\n")
    return p


def dicom_series(
    d: Path, n=5, orientation=(1, 0, 0, 0, 1, 0), uid="1.2.826.0.1.3680043.8.498.77", start=0, name="IM{:04d}.dcm"
):
    from test_robustness import dicom_slice

    d.mkdir(parents=True, exist_ok=True)
    a = ct((n, 16, 16))
    return [
        dicom_slice(
            d / name.format(start + k), a[k], z=2.5 * k, series_uid=uid, instance=start + k + 1, orientation=orientation
        )
        for k in range(n)
    ]


def _dicom_with_fifo_and_links(d):
    dicom_series(d, n=5)
    os.mkfifo(d / "IM9999.dcm")
    os.symlink("loop", d / "loop")
    s = secret(d)
    os.symlink(s, d / "IM8888.dcm")
    return d


def _dicom_mixed_orientation(d):
    dicom_series(d, n=5)
    dicom_series(d, n=2, orientation=(0, 1, 0, 0, 0, -1), start=5)
    return d


def _dicom_orientations_tied(d):
    dicom_series(d, n=2)
    dicom_series(d, n=2, orientation=(0, 1, 0, 0, 0, -1), start=2)
    return d


@dataclass
class Case:
    name: str
    make: Callable[[Path], Path]
    expect: str  # loaded | warning | refused
    match: str = ""
    shape: tuple | None = None


CASES = [
    Case("mhd_pattern_printf_escape", _pattern_printf_escape, "refused", r"slice pattern .* one integer field"),
    Case("mhd_pattern_percent_s", _pattern_percent_s, "refused", r"slice pattern"),
    Case("mhd_pattern_two_fields", _pattern_two_fields, "refused", r"exactly one integer field"),
    Case("mhd_pattern_step_zero", _pattern_step_zero, "refused", r"step of 0"),
    Case("mhd_pattern_billion_files", _pattern_billion_files, "refused", r"names 1000000000 files"),
    Case("mhd_pattern_outside", _pattern_outside, "refused", r"outside the header's folder"),
    Case("mhd_pattern_good", _pattern_good, "loaded", shape=(6, 8, 10)),
    Case("mhd_list_fifo", _list_fifo, "refused", r"'s1\.raw'.* is a FIFO"),
    Case("mhd_list_outside", _list_outside, "refused", r"outside the header's folder"),
    Case("mhd_raw_symlink_out", _raw_symlink_out, "refused", r"outside the header's folder"),
    Case("mhd_raw_symlink_in", _raw_symlink_in, "loaded", shape=(6, 8, 10)),
    Case("mhd_raw_fifo", _raw_fifo, "refused", r"is a FIFO, not a regular file"),
    Case("mhd_raw_is_folder", _raw_is_folder, "refused", r"is a folder, not a regular file"),
    Case("mhd_raw_dev_zero", _raw_dev_zero, "refused", r"outside the header's folder"),
    Case("mhd_lowercase_datafile_key", _lowercase_key, "refused", r"not spelled ElementDataFile"),
    Case("nrrd_datafile_after_20kb", _nrrd_datafile_after_comments, "refused", r"outside the header's folder"),
    Case("nrrd_pattern_printf_escape", _nrrd_pattern_escape, "refused", r"slice pattern"),
    Case("nrrd_list_outside", _nrrd_list_outside, "refused", r"outside the header's folder"),
    Case("nrrd_two_datafile_fields", _nrrd_two_datafiles, "refused", r"2 'data file' fields"),
    Case("mhd_dimsize_inf", _dimsize("10 8 inf"), "refused", r"DimSize = 'inf' is not a usable whole number"),
    Case("mhd_dimsize_nan", _dimsize("10 nan 6"), "refused", r"DimSize = 'nan'"),
    Case("mhd_dimsize_auto", _dimsize("auto 8 6"), "refused", r"DimSize = 'auto' is not a number"),
    Case("mhd_headersize_inf", _mhd_field("HeaderSize", "inf"), "refused", r"HeaderSize = 'inf'"),
    Case("mhd_channels_nan", _mhd_field("ElementNumberOfChannels", "nan"), "refused", r"ElementNumberOfChannels"),
    Case("mhd_compressed_size_nan", _compressed_size_nan, "refused", r"CompressedDataSize = 'nan'"),
    Case("nifti_vox_offset_inf", _nifti_vox_offset(float("inf")), "refused", r"vox_offset inf"),
    Case("nifti_vox_offset_nan", _nifti_vox_offset(float("nan")), "refused", r"vox_offset nan"),
    Case("nifti_qform_sform_disagree", _nifti_forms_disagree, "warning", r"qform and sform disagree"),
    Case("fifo_as_scan", _fifo_as_scan, "refused", r"is a FIFO, not a regular file"),
    Case("complex_voxels", _complex_voxels, "refused", r"complex"),
    Case("float64_beyond_float32", _float64_huge, "refused", r"float32 range"),
    Case("spacing_1e-6_mm", _micro_spacing, "refused", r"spacing .* not usable"),
    Case("control_chars_in_name", _escape_name, "refused", r"not a MetaImage"),
    Case(
        "dicom_fifo_loop_and_link_out",
        _dicom_with_fifo_and_links,
        "warning",
        r"3 entries .* not plain files.*IM8888\.dcm \(link out of the folder\).*IM9999\.dcm \(FIFO\).*loop \(link loop\)",
        shape=(5, 16, 16),
    ),
    Case(
        "dicom_mixed_orientation",
        _dicom_mixed_orientation,
        "warning",
        r"mixes slices of 2 orientations",
        shape=(5, 16, 16),
    ),
    Case("dicom_orientations_tied", _dicom_orientations_tied, "refused", r"none is the majority"),
]
IDS = [c.name for c in CASES]
assert len(set(IDS)) == len(IDS)


def outcome(path):
    try:
        scan = load_scan(path)
    except ScanReadError as e:
        return "refused", str(e), None
    return ("warning" if scan.warnings else "loaded"), "; ".join(scan.warnings), scan


@pytest.mark.robustness
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_scan(case, tmp_path):
    path = case.make(tmp_path / "corpus" / case.name)
    t = time.perf_counter()
    kind, text, scan = outcome(path)
    assert time.perf_counter() - t < 20
    assert kind == case.expect, f"{case.name}: expected {case.expect}, got {kind}: {text}"
    assert re.search(case.match, text), f"{text!r} does not match {case.match!r}"
    if kind == "refused":
        assert "\n" not in text and "\x1b" not in text and len(text) < 600, text
        assert text.startswith(sio.shown(path) + ": ")
    else:
        assert np.all(np.isfinite(scan.array))
        if case.shape:
            assert scan.shape == case.shape


@pytest.mark.robustness
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_napari_reader_check_and_read(case, tmp_path, monkeypatch):
    """napari's reader check (can_read / napari_get_reader) never blocks; reading gives one
    notification (refused) or a layer."""
    from napari_resmtnet import _reader

    path = case.make(tmp_path / "corpus" / case.name)
    t = time.perf_counter()
    reader = _reader.napari_get_reader(str(path))
    assert time.perf_counter() - t < 10
    shown = []
    monkeypatch.setattr(_reader, "_notify", lambda kind, msg: shown.append((kind, msg)))
    if reader is None:
        assert case.expect == "refused"
        return
    out = reader(str(path))
    if case.expect == "refused":
        assert out == [(None,)]
        assert [k for k, _ in shown] == ["error"]
        assert "\n" not in shown[0][1] and "\x1b" not in shown[0][1]
    else:
        assert out[0][0] is not None and out[0][2] == "image"


@pytest.mark.robustness
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.expect == "refused"], ids=[c.name for c in CASES if c.expect == "refused"]
)
def test_predict_cli_refuses_in_one_line(case, tmp_path, capsys):
    from napari_resmtnet.cli.main import main

    path = case.make(tmp_path / "corpus" / case.name)
    out = tmp_path / "out.csv"
    rc = main(["predict", str(path), "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 1
    assert len(err) == 1 and "Traceback" not in cap.err and "\x1b" not in cap.err, cap.err
    assert err[0].startswith("resmtnet predict: skipped ")
    from napari_resmtnet.annotations.export import CSV_COLUMNS

    assert out.read_text(encoding="utf-8").splitlines() == [",".join(CSV_COLUMNS)]


def test_pattern_and_percent_s_do_not_crash_a_fresh_process(tmp_path):
    """The ``%s`` pattern crashed ITK (exit 139); now: one line, exit 1, in every entry point."""
    p = _pattern_percent_s(tmp_path / "c")
    code = (
        "import sys; from napari_resmtnet.io.formats import load_scan, ScanReadError\n"
        "from napari_resmtnet._reader import napari_get_reader\n"
        f"p = {str(p)!r}\n"
        "r = napari_get_reader(p)\n"
        "try:\n    load_scan(p)\nexcept ScanReadError as e:\n    print(e); sys.exit(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert "slice pattern" in r.stdout and "Traceback" not in r.stderr


def test_dicom_folder_with_fifo_is_claimed_quickly_and_loses_no_slice(tmp_path):
    d = tmp_path / "series"
    _dicom_with_fifo_and_links(d)
    t = time.perf_counter()
    assert can_read(d)
    assert time.perf_counter() - t < 5
    scan = load_scan(d)
    assert scan.shape[0] == 5
    # the fifo was never opened: a writer on it would still be waiting
    assert (d / "IM9999.dcm").exists()


def test_colour_conversion_is_in_the_memory_budget(tmp_path, monkeypatch):
    """A 20000 x 20000 RGBA PNG header: 1.6 GB decoded, 2.1 GB with its grey copy. With
    2.2 GB free (80 %: 1.76 GB) the image alone would fit; with its copies it does not."""
    p = tmp_path / "big.png"

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 6, 0, 0, 0)
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    monkeypatch.setattr(sio, "_available_memory", lambda: int(2.2e9))
    with pytest.raises(ScanReadError, match=r"1\.6 GB image .*reading it needs about 2\.\d GB with its copies"):
        load_scan(p)
    image, peak = sio._read_peak_bytes((20000, 20000), 4, 1)
    assert image == 1_600_000_000 and image < 0.8 * 2.2e9 < peak


def test_colour_to_grey_in_blocks_matches_luma(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "_GREY_BLOCK_BYTES", 4096)  # many blocks
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (70, 50, 3)).astype(np.uint8)
    p = tmp_path / "c.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(p))
    scan = load_scan(p)
    want = np.clip(np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)), 0, 255)
    np.testing.assert_array_equal(scan.array, want.astype(np.uint8))


def test_pattern_names_are_checked_one_by_one(tmp_path):
    """Expanded pattern names are checked one by one: one missing slice is named."""
    d = tmp_path / "p"
    _pattern_good(d)
    (d / "slice03.raw").unlink()
    with pytest.raises(ScanReadError, match=r"'slice03\.raw' named in the header does not exist"):
        load_scan(d / "scan.mhd")


def test_dicom_folder_of_links_out_is_not_read(tmp_path):
    """Links to DICOM files outside the opened folder are neither sniffed nor read."""
    files = dicom_series(tmp_path / "elsewhere", n=3)
    d = tmp_path / "opened"
    d.mkdir()
    for f in files:
        os.symlink(f, d / f.name)
    assert not can_read(d)
    with pytest.raises(ScanReadError, match="no DICOM series found"):
        load_scan(d)


def test_a_folder_of_links_into_a_dataset_still_opens(tmp_path):
    """A header that is itself a link may read data from the folder it really lies in; a
    plain header may not follow a data link out of its folder."""
    data = tmp_path / "dataset"
    mhd(data, "scan.raw")
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(data / "scan.mhd", links / "scan.mhd")
    os.symlink(data / "scan.raw", links / "scan.raw")
    assert load_scan(links / "scan.mhd").shape == (6, 8, 10)
    (links / "plain.mhd").write_text((data / "scan.mhd").read_text())
    with pytest.raises(ScanReadError, match="outside the header's folder"):
        load_scan(links / "plain.mhd")
