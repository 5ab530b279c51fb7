"""Property (fuzz) tests: generated MetaImage/NRRD headers and nodule files.

Whatever the header or annotation file holds, the outcome is a result or one line
(`ScanReadError` / `NoduleFileError`), never another exception, a crash or a hang; a
header never makes the reader return the pixels of a file outside its folder; the CSV
escape of formula cells always reads back exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napari_resmtnet.annotations import export as E  # noqa: E402
from napari_resmtnet.detections import Detections  # noqa: E402
from napari_resmtnet.io.formats import ScanReadError, load_scan  # noqa: E402
from napari_resmtnet.annotations.table import NoduleTable, image_identity  # noqa: E402
from napari_resmtnet.paths import escape_text  # noqa: E402
from napari_resmtnet.scan import Scan  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("RESMTNET_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SECRET_VALUE = 12345  # every voxel of the file outside the header's folder
SHAPE = (4, 6, 5)  # z, y, x of the good data file inside the folder

numbers = st.one_of(
    st.integers(-5, 12).map(str),
    st.integers(-(2**64), 2**64).map(str),
    st.sampled_from(["inf", "-inf", "nan", "auto", "1e400", "", "1.5", "0x10", "6 5 4", "\u00b2"]),
)
data_names = st.one_of(
    st.sampled_from(
        [
            "data.raw",
            "LOCAL",
            "LIST",
            "LIST 2D",
            "../secret.raw",
            "/etc/passwd",
            "%s 1 1 1",
            "%1$cetc%1$cpasswd 47 47 1",
            "s%d.raw 0 3 1",
            "s%d.raw 0 3 0",
            "s%d.raw 1 999999999 1",
            "sub/../data.raw",
            "sub/../../secret.raw",
            "link.raw",
            "data.raw 1 2",
            "fifo.raw",
            "%%d%d 1 1 1",
            "s%03d.raw",
            "./data.raw",
            "data.raw\x00x",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
)


def _folder(tmp: Path) -> Path:
    """tmp/secret.raw (outside), tmp/scan/{data.raw, s0..s3.raw, link.raw -> ../secret.raw, fifo.raw}."""
    d = tmp / "scan"
    d.mkdir()
    (tmp / "secret.raw").write_bytes(np.full(SHAPE, SECRET_VALUE, np.int16).tobytes())
    data = np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16)
    (d / "data.raw").write_bytes(data.tobytes())
    for k in range(SHAPE[0]):
        (d / f"s{k}.raw").write_bytes(data[k].tobytes())
    os.symlink("../secret.raw", d / "link.raw")
    os.mkfifo(d / "fifo.raw")
    (d / "sub").mkdir()
    return d


def _check_outcome(path: Path):
    try:
        scan = load_scan(path)
    except ScanReadError as e:
        text = str(e)
        assert "\n" not in text and "\x1b" not in text and len(text) < 1000, text
        return None
    arr = np.asarray(scan.array)
    assert not (arr == SECRET_VALUE).all(), "pixels of a file outside the header's folder were returned"
    assert np.all(np.isfinite(arr))
    return scan


@FUZZ
@given(
    ndims=numbers,
    dims=numbers,
    etype=st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_BOGUS", "met_short", ""]),
    header_size=st.one_of(st.none(), numbers),
    channels=st.one_of(st.none(), numbers),
    compressed=st.sampled_from([None, "True", "False"]),
    csize=st.one_of(st.none(), numbers),
    datafile=data_names,
    key=st.sampled_from(["ElementDataFile", "elementdatafile", "ElementDataFile "]),
    tail=st.sampled_from(["", "data.raw\n", "s0.raw s1.raw\ns2.raw\ns3.raw\n", "../secret.raw\n", "fifo.raw\n"]),
)
def test_metaimage_headers(ndims, dims, etype, header_size, channels, compressed, csize, datafile, key, tail):
    with tempfile.TemporaryDirectory() as tmp:
        d = _folder(Path(tmp))
        lines = [
            "ObjectType = Image",
            f"NDims = {ndims}",
            f"DimSize = {dims}",
            "ElementSpacing = 0.7 0.7 2.5",
            f"ElementType = {etype}",
        ]
        if header_size is not None:
            lines.append(f"HeaderSize = {header_size}")
        if channels is not None:
            lines.append(f"ElementNumberOfChannels = {channels}")
        if compressed is not None:
            lines.append(f"CompressedData = {compressed}")
        if csize is not None:
            lines.append(f"CompressedDataSize = {csize}")
        lines.append(f"{key}= {datafile}")
        p = d / "scan.mhd"
        p.write_bytes(("\n".join(lines) + "\n" + tail).encode("utf-8", "surrogatepass"))
        _check_outcome(p)


@FUZZ
@given(
    sizes=numbers,
    encoding=st.sampled_from(["raw", "gzip", "ascii", "bogus"]),
    comments=st.integers(0, 600),
    datafile=data_names,
    field=st.sampled_from(["data file", "datafile", "DATA FILE", "data  file", "data file:"]),
    tail=st.sampled_from(["", "data.raw\n", "s0.raw\ns1.raw\ns2.raw\ns3.raw\n", "../secret.raw\n"]),
)
def test_nrrd_headers(sizes, encoding, comments, datafile, field, tail):
    with tempfile.TemporaryDirectory() as tmp:
        d = _folder(Path(tmp))
        p = d / "scan.nhdr"
        text = (
            "NRRD0004\ntype: short\ndimension: 3\n" + f"sizes: 5 6 {sizes}\n" + "endian: little\n"
            f"encoding: {encoding}\n"
            + "# a comment line to push the data file field down\n" * comments
            + f"{field}: {datafile}\n"
            + tail
        )
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
        _check_outcome(p)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_a_metaimage_start(blob):
    with tempfile.TemporaryDirectory() as tmp:
        d = _folder(Path(tmp))
        p = d / "x.mha"
        p.write_bytes(b"ObjectType = Image\nNDims = 3\n" + blob)
        _check_outcome(p)


# --- nodule files ----------------------------------------------------------------------------


def _table():
    scan = Scan(
        np.zeros((20, 64, 64), np.int16), (2.0, 0.7, 0.7), (-100.0, 10.0, -50.0), np.eye(3), "CT", seriesuid="1.2.3"
    )
    det = Detections(
        [[4.2, 10, 12, 8.6, 20, 24], [10.0, 30, 30, 12.0, 36, 40]], [0.9, 0.3], [0.8, 0.2], Detections.geometry_of(scan)
    )
    return scan, NoduleTable.from_detections(det, image_identity(scan), threshold=0.5)


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True), st.text(max_size=10)
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
PLACES = [
    ("threshold",),
    ("image",),
    ("image", "shape"),
    ("image", "spacing"),
    ("image", "origin"),
    ("image", "direction"),
    ("image", "seriesuid"),
    ("nodules",),
    ("hidden",),
    ("model",),
    ("nodules", 0),
    ("nodules", 0, "id"),
    ("nodules", 0, "box_voxel"),
    ("nodules", 0, "label"),
    ("nodules", 0, "reviewed"),
    ("nodules", 0, "probability"),
    ("nodules", 0, "malignancy"),
    ("nodules", 0, "source"),
    ("format_version",),
]


@FUZZ
@given(place=st.sampled_from(PLACES), value=json_values)
def test_nodule_json_with_any_value_anywhere(place, value):
    scan, t = _table()
    d = E.json_dict(t)
    target = d
    for k in place[:-1]:
        target = target[k]
    target[place[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "n.json"
        p.write_text(json.dumps(d, allow_nan=True))
        try:
            back = E.import_nodules(p, image_identity(scan))
        except E.NoduleFileError as e:
            assert "\n" not in str(e)
            return
        # what is accepted is valid: it can be exported again
        E.json_text(back)
        assert np.all(np.isfinite(back.boxes)) and 0 <= back.threshold <= 1


csv_cells = st.one_of(
    st.sampled_from(
        [
            "",
            "1.2.3",
            "nan",
            "inf",
            "-1e400",
            "1e400",
            "\u00b2",
            "true",
            "maybe",
            "benign",
            "malignant",
            "model",
            "'=x",
            "=1+1",
            "0",
            "-0",
            "5",
        ]
    ),
    st.text(max_size=8),
    st.floats(allow_nan=True).map(repr),
)


@FUZZ
@given(rows=st.lists(st.lists(csv_cells, min_size=0, max_size=12), max_size=6), bom=st.booleans())
def test_nodule_csv_with_any_cells(rows, bom):
    import csv
    import io

    scan, _ = _table()
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(E.CSV_COLUMNS)
    w.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "n.csv"
        p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + out.getvalue().encode("utf-8", "surrogatepass"))
        try:
            back = E.import_nodules(p, image_identity(scan))
        except E.NoduleFileError as e:
            assert "\n" not in str(e)
            return
        assert np.all(np.isfinite(back.boxes)) and len(set(back.ids.tolist())) == len(back)
        E.csv_text(back)


@given(st.text())
def test_formula_escape_round_trips_and_is_never_a_formula(text):
    cell = E.safe_cell(text)
    assert E.read_cell(cell) == text
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


@given(st.text())
def test_escaped_text_is_one_printable_line(text):
    out = escape_text(text)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert all(ch.isprintable() for ch in out)
