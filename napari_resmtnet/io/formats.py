"""Read chest CT volumes and chest radiographs into a `Scan` (Qt-free, no torch).

``load_scan(path)`` reads

* CT: LUNA16 MetaImage (``.mhd`` + ``.raw``), ``.mha``, NRRD (``.nrrd``/``.nhdr``), NIfTI
  (``.nii``/``.nii.gz``), a DICOM series folder (nested folders are searched; slices are
  ordered by position, not by file name) or one DICOM file;
* chest X-ray: JSRT ``.IMG`` (2048 x 2048 big-endian 12-bit raw, 0.175 mm/px), PNG, JPEG,
  TIFF, a DICOM radiograph (MONOCHROME1 shown as MONOCHROME2) and 2D ``.mha``/``.nrrd``.

All medical formats go through SimpleITK. Geometry is converted to **array order**
((z, y, x) / (y, x)): ITK's spacing and origin are reversed and its direction matrix is
reversed in rows and columns. The modality is decided from the data: a volume with more
than one slice is "CT", a 2D image (or a volume with one slice) is "CXR".

A file this module claims but cannot read raises `ScanReadError`, whose message is one
line ``"<path>: <problem>"``. What the reader repaired or assumed is listed in
``scan.warnings``.

Radiographs without a physical pixel size (PNG/JPEG, a DICOM without pixel spacing, a file
whose spacing is exactly 1.0 or a 72/96 dpi software default) get an assumed pixel size:
the image's longer side is taken to span ``DEFAULT_CXR_FIELD_MM`` (350 mm, the width of a
standard 35 x 43 cm / 14 x 17 inch chest detector and of the JSRT films), i.e.
``spacing = 350 mm / max(rows, columns)``. This stays right within about 25 % whether the
picture is a full-resolution radiograph (2048 px -> 0.171 mm, JSRT's true 0.175 mm) or a
downsampled copy (224 px -> 1.56 mm, JSRT's true 1.6 mm), which a fixed mm/px default
could not. The assumption is stated in ``scan.warnings``.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ResMTNetError
from ..paths import escape_text, file_kind, inside_folder, read_head, shown
from ..scan import Scan

__all__ = [
    "load_scan",
    "can_read",
    "ScanReadError",
    "DEFAULT_CXR_FIELD_MM",
    "default_cxr_spacing",
    "JSRT_SPACING_MM",
    "MAX_IMAGE_BYTES",
    "strip_image_suffix",
]

#: Assumed field of view (mm) across the longer side of a radiograph without pixel size.
DEFAULT_CXR_FIELD_MM = 350.0
#: JSRT database: 2048 x 2048 pixels of 0.175 mm, 12 bit, big-endian, no header.
JSRT_SHAPE = (2048, 2048)
JSRT_SPACING_MM = 0.175
JSRT_NBYTES = JSRT_SHAPE[0] * JSRT_SHAPE[1] * 2
#: Images larger than this (or than 80 % of the free memory) are refused before reading.
MAX_IMAGE_BYTES = 8 * 1024**3
#: Spacing beyond this (mm) is not a medical image.
MAX_SPACING_MM = 1e4
#: Spacing below this (mm; 10 micrometres) is not a chest CT or radiograph either.
MIN_SPACING_MM = 1e-2
#: A MetaImage/NRRD header (the text before the pixel data) longer than this is refused.
MAX_HEADER_BYTES = 1 << 20
#: Colour radiographs are reduced to grey in row blocks of at most this many bytes of float32.
_GREY_BLOCK_BYTES = 64 << 20
#: A header may name at most this many data files (a slice pattern or a LIST).
MAX_DATA_FILES = 100_000
#: Screen/print resolutions that image software writes by default (not a detector pitch).
_SOFTWARE_DPI = (72.0, 96.0)

# Name endings, longest first so ".nii.gz" wins over ".gz".
_SUFFIX_KIND = [
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".mhd", "metaimage"),
    (".mha", "metaimage"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".dcm", "dicom"),
    (".dicom", "dicom"),
    (".img", "img"),
    (".png", "png"),
    (".jpg", "jpeg"),
    (".jpeg", "jpeg"),
    (".tif", "tiff"),
    (".tiff", "tiff"),
]
_FORMAT_NAME = {
    "nifti": "NIfTI",
    "metaimage": "MetaImage",
    "nrrd": "NRRD",
    "dicom": "DICOM",
    "png": "PNG",
    "jpeg": "JPEG",
    "tiff": "TIFF",
    "jsrt": "JSRT .IMG",
    "analyze": "Analyze 7.5",
}
#: DICOM modalities of projection radiographs: a series of them is not a volume.
_PROJECTION_MODALITIES = ("CR", "DX", "DR", "RF", "XA", "MG", "PX", "IO")
#: Formats that carry no trustworthy physical pixel size for a radiograph.
_RASTER_KINDS = ("png", "jpeg", "tiff")
# MetaIO element sizes (bytes).
_MET_SIZES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


class ScanReadError(ResMTNetError):
    """A file or folder that looks like a scan but cannot be read; ``str()`` is one line."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = escape_text(" ".join(str(problem).split()))
        super().__init__(f"{shown(self.path)}: {self.problem}")


# --------------------------------------------------------------------------- helpers


def strip_image_suffix(name: str) -> str:
    """File name without its image extension(s): ``a.nii.gz`` -> ``a``; ``1.2.3.mhd`` -> ``1.2.3``."""
    low = name.lower()
    for suf, _ in _SUFFIX_KIND + [(".raw", ""), (".gz", ""), (".zraw", "")]:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def _kind_from_name(path: Path) -> str | None:
    low = path.name.lower()
    for suf, kind in _SUFFIX_KIND:
        if low.endswith(suf):
            return kind
    return None


def _head(path: Path, n: int = 512) -> bytes:
    """The first ``n`` bytes of a regular file (never blocks on a FIFO or device)."""
    return read_head(path, n)


def _is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _magic_ok(path: Path, kind: str) -> bool:
    """Does the file start like a ``kind`` file? (cheap; reads at most 512 bytes)."""
    head = _head(path)
    if kind == "metaimage":
        text = head.decode("latin-1", "replace")
        return "NDims" in text or "ObjectType" in text or "DimSize" in text
    if kind == "nrrd":
        return head.startswith(b"NRRD")
    if kind == "nifti":
        if head[:2] == b"\x1f\x8b":
            try:
                with gzip.open(path, "rb") as f:
                    head = f.read(352)
            except (OSError, EOFError):
                return False
        if len(head) < 348:
            return False
        n1 = int.from_bytes(head[:4], "little")
        return n1 in (348, 540) or int.from_bytes(head[:4], "big") in (348, 540)
    if kind == "dicom":
        return _is_dicom_bytes(head)
    if kind == "png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if kind == "jpeg":
        return head.startswith(b"\xff\xd8\xff")
    if kind == "tiff":
        return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if kind == "jsrt":
        return _file_size(path) == JSRT_NBYTES
    if kind == "analyze":
        return _analyze_header(path) is not None
    return False


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _analyze_header(path: Path) -> Path | None:
    for suf in (".hdr", ".HDR", ".Hdr"):
        hdr = path.with_suffix(suf)
        if hdr.is_file():
            return hdr
    return None


def _resolve_img(path: Path) -> str | None:
    """``.img`` is JSRT (exact size, no header) or Analyze (a ``.hdr`` beside it)."""
    if _analyze_header(path) is not None:
        return "analyze"
    if _file_size(path) == JSRT_NBYTES:
        return "jsrt"
    return None


def _dir_has_dicom(path: Path, max_files: int = 200, max_depth: int = 3) -> bool:
    """Cheap: is there a DICOM file (``.dcm`` name or ``DICM`` magic) in or below ``path``?"""
    seen = 0
    base_depth = len(path.parts)
    for root, dirs, files in os.walk(path):
        if len(Path(root).parts) - base_depth >= max_depth:
            dirs[:] = []
        dirs.sort()
        for name in sorted(files):
            if _looks_dicom(Path(root) / name, path):
                return True
            seen += 1
            if seen >= max_files:
                return False
    return False


def can_read(path) -> bool:
    """Cheap sniff: does ``path`` look like a scan `load_scan` reads?

    By extension and magic bytes (reads at most a few hundred bytes per file; a folder is
    claimed when it holds a DICOM file within three levels). No SimpleITK import.
    """
    try:
        p = Path(os.fspath(path))
    except TypeError:
        return False
    if p.is_dir():
        return _dir_has_dicom(p)
    if not p.is_file():
        return False
    kind = _kind_from_name(p)
    if kind == "img":
        kind = _resolve_img(p)
        if kind is None:
            return False
    if kind is None:
        # DICOM files often have no extension (IM0001, 1.2.840...)
        return _is_dicom_bytes(_head(p, 132))
    return _magic_ok(p, kind)


def _one_line_itk(err: Exception, path=None) -> str:
    """SimpleITK's multi-line C++ exception -> one informative line (no source paths)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    lines = [
        ln
        for ln in lines
        if not ln.startswith("Exception thrown in SimpleITK")
        and not ((".cxx:" in ln or ".hxx:" in ln or ".h:" in ln) and ln.endswith(":"))
    ]
    msg = ""
    for i, line in enumerate(lines):
        if "ITK ERROR" in line:
            msg = line.split("):", 1)[-1].strip()
            rest = lines[i + 1 :]
            if rest and (not msg or msg.endswith(":")):
                msg = f"{msg} {rest[-1]}".strip()  # the innermost cause comes last
            break
    if not msg:
        msg = lines[-1] if lines else type(err).__name__
    if path is not None:
        msg = msg.replace(str(path), Path(path).name)
    return msg[:300]


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(nbytes: int) -> str:
    gb = nbytes / 1e9
    return f"{gb:.1f}" if gb >= 0.1 else f"{gb:.2g}"


def _read_peak_bytes(size, ncomp: int, bytes_per_comp: int) -> tuple[int, int]:
    """(image bytes, peak bytes while reading): the pixel buffer ITK decodes into, plus the
    numpy array made from it (one grey channel; colour is reduced to grey in row blocks of
    at most `_GREY_BLOCK_BYTES`), plus a float32 copy when wide pixels are narrowed."""
    n = math.prod(size)
    image = n * max(ncomp, 1) * bytes_per_comp
    peak = image + n * bytes_per_comp
    if ncomp > 1:
        peak += _GREY_BLOCK_BYTES
    if bytes_per_comp >= 4:
        peak += n * 4
    return image, peak


def _check_size(path, size_xyz, ncomp: int, bytes_per_comp: int, what: str = "image"):
    """Refuse, before any pixel is read, an image larger than `MAX_IMAGE_BYTES` or whose
    reading would need more than 80 % of the free memory (all copies counted)."""
    size = [int(s) for s in size_xyz]
    if any(s <= 0 for s in size):
        raise ScanReadError(path, f"{what} has a zero-size dimension (size {tuple(size)} in x, y, z order)")
    nbytes, peak = _read_peak_bytes(size, ncomp, bytes_per_comp)
    avail = _available_memory()
    why = None
    if nbytes > MAX_IMAGE_BYTES:
        why = f"more than the {_gb(MAX_IMAGE_BYTES)} GB limit"
    elif avail is not None and peak > 0.8 * avail:
        why = (
            f"reading it needs about {_gb(peak)} GB with its copies, more than {_gb(int(0.8 * avail))} "
            "GB, 80 % of the free memory"
        )
    if why:
        dims = " x ".join(str(s) for s in size)
        raise ScanReadError(
            path,
            f"header claims a {_gb(nbytes)} GB {what} ({dims} voxels, {bytes_per_comp * 8}-bit"
            f"{'' if ncomp <= 1 else f' x {ncomp} channels'}); refused before reading ({why})",
        )


def _bytes_per_component(pixel_string: str) -> int:
    for token in pixel_string.replace("-", " ").split():
        if token.isdigit():
            return max(int(token) // 8, 1)
    return 8


def _check_spacing(path, spacing_xyz, warnings: list):
    sp = [float(s) for s in spacing_xyz]
    bad = [s for s in sp if not math.isfinite(s) or abs(s) < MIN_SPACING_MM or abs(s) > MAX_SPACING_MM]
    if bad:
        values = tuple(float(f"{s:.6g}") for s in sp[::-1])
        raise ScanReadError(
            path,
            f"voxel spacing {values} mm (array order) is not usable: expected finite values "
            f"from {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm",
        )
    if any(s < 0 for s in sp):
        warnings.append(f"negative voxel spacing {tuple(sp[::-1])} mm in the file was read as a flipped axis")


# --------------------------------------------------------------------------- format checks
#
# The path policy: every data file a header names (one file, a printf-style slice pattern,
# or a LIST) is resolved here, symbolic links included, and must be a regular file inside
# the header's folder; patterns must expand to a bounded list of plain names. SimpleITK is
# never handed a MetaImage or NRRD header that has not passed these checks.

#: one integer conversion of a slice pattern (``%d``, ``%03d``, ``%i``, ``%u``) or ``%%``
_PATTERN_SPEC = re.compile(r"%(%|0?\d{0,3}[diu])")


def _header_int(path, key: str, text: str, minimum: int | None = None) -> int:
    """A whole number from a header field, or a one-line refusal (never inf/nan/"auto")."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ScanReadError(path, f"header field {key} = {text!r} is not a number") from None
    if not math.isfinite(v) or v != int(v) or abs(v) > 2**62:
        raise ScanReadError(path, f"header field {key} = {text!r} is not a usable whole number")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ScanReadError(path, f"header field {key} = {text!r} must be at least {minimum}")
    return v


def _read_header_text(path: Path) -> bytes:
    data = _head(path, MAX_HEADER_BYTES + 1)
    if not data and file_kind(path) != "file":
        raise ScanReadError(path, f"is a {file_kind(path)}, not a regular file")
    return data


def _parse_metaimage_header(path: Path) -> tuple[dict, int]:
    """MetaImage header fields and the header's byte length (for ``LOCAL`` data).

    Reads up to `MAX_HEADER_BYTES`; the header ends at ``ElementDataFile`` (as in MetaIO).
    A field spelled ``ElementDataFile`` in another case is refused, so that no reader can
    take a data file name this check did not see."""
    fields: dict[str, str] = {}
    raw = _read_header_text(path)
    pos = 0
    for line in raw.splitlines(keepends=True):
        pos += len(line)
        text = line.decode("latin-1").strip()
        if "=" not in text:
            continue
        key, val = (t.strip() for t in text.split("=", 1))
        if key.lower() == "elementdatafile":
            if key != "ElementDataFile":
                raise ScanReadError(path, f"header field {key!r} is not spelled ElementDataFile; refused")
            fields[key] = val
            return fields, pos
        fields[key] = val
        if pos > MAX_HEADER_BYTES:
            break
    if len(raw) > MAX_HEADER_BYTES:
        raise ScanReadError(
            path, f"MetaImage header longer than {MAX_HEADER_BYTES} bytes without an ElementDataFile field; refused"
        )
    return fields, pos


def _check_data_file(header: Path, name: str, what: str = "data file") -> Path:
    """A data file a header names: inside the header's folder (``..``, absolute paths and
    symbolic links resolved) and a regular file; returns its path. Otherwise refused.

    A downloaded header with ``ElementDataFile = ../../etc/passwd``, an absolute path or a
    link to a file elsewhere would make the viewer read, show and export any file of the
    user's; a FIFO or device would block or never end."""
    if not name or "\x00" in name:
        raise ScanReadError(header, f"{what} named in the header is empty or not a plain name")
    inside, target = inside_folder(header.parent, name)
    if not inside and os.path.islink(header):
        # a header that is itself a link (a folder of links into a dataset): its data may
        # also lie in the folder the header really is in
        inside, target = inside_folder(os.path.dirname(os.path.realpath(header)), name)
        inside = inside and os.path.realpath(os.path.join(header.parent, name)) == target
    if not inside:
        raise ScanReadError(
            header,
            f"{what} '{name}' named in the header is outside the header's folder (it "
            "resolves elsewhere, links followed); refused for safety (put the data file next "
            "to the header and name it without a folder)",
        )
    kind = file_kind(target)
    if kind == "missing":
        raise ScanReadError(header, f"{what} '{name}' named in the header does not exist")
    if kind != "file":
        raise ScanReadError(header, f"{what} '{name}' named in the header is a {kind}, not a regular file; refused")
    return Path(target)


def _expand_pattern(header: Path, pattern: str, first: int, last: int, step: int, fmt: str) -> list[str]:
    """File names of a printf-style slice pattern, or a refusal (bounded, integers only)."""
    specs = list(_PATTERN_SPEC.finditer(pattern))
    if pattern.count("%") != sum(m.group(0).count("%") for m in specs) or sum(m.group(1) != "%" for m in specs) != 1:
        raise ScanReadError(
            header,
            f"{fmt} slice pattern {pattern!r} must hold exactly one integer field "
            "(%d, %03d...) and no other % conversions; refused",
        )
    if step == 0:
        raise ScanReadError(header, f"{fmt} slice pattern {pattern!r} has a step of 0")
    count = (last - first) // step + 1
    if count < 1 or count > MAX_DATA_FILES:
        raise ScanReadError(
            header,
            f"{fmt} slice pattern {pattern!r} from {first} to {last} step {step} "
            f"names {max(count, 0)} files (1 to {MAX_DATA_FILES} allowed)",
        )
    return [pattern % i for i in range(first, first + count * step, step)]


def _list_names(header: Path, data: bytes, fmt: str) -> list[str]:
    names = [ln.strip() for ln in data.decode("latin-1").splitlines() if ln.strip()]
    if len(names) > MAX_DATA_FILES:
        raise ScanReadError(header, f"{fmt} LIST names {len(names)} files (at most {MAX_DATA_FILES})")
    return names


def _metaimage_data_names(path: Path, datafile: str, header_len: int, dims: list[int]) -> list[str]:
    """The file names a MetaImage header reads its data from (LIST, pattern or one file)."""
    if datafile.upper() == "LOCAL":
        return []
    if datafile.startswith("LIST"):
        data = _head(path, MAX_HEADER_BYTES + header_len + 1)
        if len(data) > MAX_HEADER_BYTES + header_len:
            raise ScanReadError(path, f"MetaImage LIST longer than {MAX_HEADER_BYTES} bytes; refused")
        # MetaIO reads the names as words
        return [w for ln in _list_names(path, data[header_len:], "MetaImage") for w in ln.split()]
    if "%" in datafile:  # "slice%03d.raw [first [last [step]]]", as MetaIO reads it
        words = datafile.split()
        nums = [_header_int(path, "ElementDataFile", w) for w in words[1:4]]
        first = nums[0] if len(nums) > 0 else 1
        last = nums[1] if len(nums) > 1 else (dims[-1] if dims else 1)
        step = nums[2] if len(nums) > 2 else 1
        return _expand_pattern(path, words[0], first, last, step, "MetaImage")
    return [datafile]


def _metaimage_dims(path: Path, fields: dict) -> list[int]:
    words = fields["DimSize"].split()
    if not words:
        raise ScanReadError(path, "MetaImage DimSize is empty")
    return [_header_int(path, "DimSize", w) for w in words]


def _check_metaimage(path: Path):
    fields, header_len = _parse_metaimage_header(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise ScanReadError(path, f"not a valid MetaImage header: no '{key}' field")
    # a negative NDims sends ITK's MetaIO into a loop it does not leave (found by fuzzing)
    _header_int(path, "NDims", fields["NDims"], 1)
    dims = _metaimage_dims(path, fields)
    datafile = fields["ElementDataFile"]
    names = _metaimage_data_names(path, datafile, header_len, dims)
    data_paths = [_check_data_file(path, name) for name in names]
    nchan = _header_int(path, "ElementNumberOfChannels", fields.get("ElementNumberOfChannels", "1"), 1)
    skip = _header_int(path, "HeaderSize", fields.get("HeaderSize", "0"), -1)
    compressed = fields.get("CompressedData", "False").lower() == "true"
    csize = _header_int(path, "CompressedDataSize", fields.get("CompressedDataSize", "-1")) if compressed else -1
    etype = fields["ElementType"].upper()
    if etype in _MET_SIZES and dims and all(d > 0 for d in dims):
        # a header claiming more than memory allows is refused before anything else
        _check_size(path, dims, nchan, _MET_SIZES[etype])
    if compressed:
        _check_compressed_metaimage(path, datafile, data_paths, csize, header_len)
        return
    if fields.get("BinaryData", "True").lower() == "false":
        return
    if etype not in _MET_SIZES:
        return
    if any(d <= 0 for d in dims):
        raise ScanReadError(path, f"image has a zero-size dimension (DimSize {' '.join(map(str, dims))})")
    expected = math.prod(dims) * nchan * _MET_SIZES[etype]
    if datafile.upper() == "LOCAL":
        avail = _file_size(path) - header_len
        source = "the file"
    elif len(data_paths) != 1:
        return  # a list/pattern of slice files, each checked above: sizes left to ITK
    else:
        avail = _file_size(data_paths[0])
        if skip > 0:
            avail -= skip
        elif skip == 0 and avail > expected:
            raise ScanReadError(
                path,
                f"header and data do not match: '{datafile}' holds {avail} bytes but the header "
                f"(DimSize {' '.join(map(str, dims))}, {etype}) describes {expected} bytes",
            )
        source = f"'{datafile}'"
    if avail < expected:
        raise ScanReadError(
            path,
            f"image data is truncated: {source} holds {max(avail, 0)} bytes of pixel data but the "
            f"header (DimSize {' '.join(map(str, dims))}, {etype}) needs {expected} bytes",
        )


def _check_compressed_metaimage(path: Path, datafile: str, data_paths: list, csize: int, header_len: int):
    """zlib-compressed MetaImage: the header states the compressed size; ITK does not check it."""
    if csize <= 0:
        return
    if datafile.upper() == "LOCAL":
        avail, source = _file_size(path) - header_len, "the file"
    elif len(data_paths) != 1:
        return
    else:
        avail, source = _file_size(data_paths[0]), f"'{datafile}'"
    if avail < csize:
        raise ScanReadError(
            path,
            f"image data is truncated: {source} holds {max(avail, 0)} bytes of compressed data, "
            f"the header's CompressedDataSize is {csize}",
        )


def _gzip_payload_size(path: Path) -> int | None:
    """Uncompressed size of a gzip file, or None when the stream is cut short or corrupt."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                n += len(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return n


def _nifti_affines(head: bytes, order: str):
    """(qform_code, qform 3x4, sform_code, sform 3x4) of a NIfTI-1 header, RAS millimetres."""
    f4 = lambda off, n=1: np.frombuffer(head[off : off + 4 * n], order + "f4").astype(float)  # noqa: E731
    qcode = int(np.frombuffer(head[252:254], order + "i2")[0])
    scode = int(np.frombuffer(head[254:256], order + "i2")[0])
    pixdim = f4(76, 8)
    b, c, d = f4(256, 3)
    qoff = f4(268, 3)
    a2 = 1.0 - (b * b + c * c + d * d)
    a = math.sqrt(a2) if a2 > 0 else 0.0
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    scale = np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
    q = np.hstack([r * scale[None, :], qoff[:, None]])
    s = np.vstack([f4(280, 4), f4(296, 4), f4(312, 4)])
    return qcode, q, scode, s


def _nifti_form_note(head: bytes, order: str) -> dict | None:
    """When qform and sform are both set and disagree: their origins (LPS) for a warning."""
    try:
        qcode, q, scode, s = _nifti_affines(head, order)
    except (ValueError, IndexError):
        return None
    if qcode <= 0 or scode <= 0 or not (np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        return None
    scale = max(float(np.abs(s[:, :3]).max()), 1e-6)
    if np.allclose(q[:, :3], s[:, :3], atol=1e-3 * scale) and np.allclose(q[:, 3], s[:, 3], atol=0.1):
        return None
    lps = np.array([-1.0, -1.0, 1.0])
    return {
        "qform_origin": (q[:, 3] * lps).tolist(),
        "sform_origin": (s[:, 3] * lps).tolist(),
        "qform": q.tolist(),
        "sform": s.tolist(),
    }


def _check_nifti(path: Path) -> dict | None:
    """Size and truncation checks before ITK reads; returns a note when qform and sform disagree."""
    gz = path.name.lower().endswith(".gz")
    if gz:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(348)
        except (OSError, EOFError, zlib.error):
            raise ScanReadError(
                path, "not a valid gzip-compressed NIfTI file (the compressed stream is corrupt)"
            ) from None
    else:
        head = _head(path, 348)
    if len(head) < 348:
        raise ScanReadError(path, f"NIfTI header is truncated ({len(head)} of 348 bytes)")
    for order in ("<", ">"):
        if int(np.frombuffer(head[:4], order + "i4")[0]) == 348:
            break
    else:
        return None  # NIfTI-2 or unusual: left to ITK
    dim = np.frombuffer(head[40:56], order + "i2").astype(int)
    bitpix = int(np.frombuffer(head[72:74], order + "i2")[0])
    vox = float(np.frombuffer(head[108:112], order + "f4")[0])
    nd = int(dim[0])
    if not 1 <= nd <= 7 or bitpix <= 0:
        return None
    if not math.isfinite(vox) or vox < 0 or vox > 2**40:
        raise ScanReadError(path, f"NIfTI vox_offset {vox!r} is not a usable byte offset")
    vox_offset = int(vox)
    dims = [int(d) for d in dim[1 : nd + 1]]
    if any(d <= 0 for d in dims):
        raise ScanReadError(path, f"image has a zero-size dimension (dim {dims})")
    _check_size(path, dims, 1, max(bitpix // 8, 1))
    note = _nifti_form_note(head, order)
    expected = max(vox_offset, 348) + math.prod(dims) * bitpix // 8
    if gz:
        # The gzip trailer holds the uncompressed size (mod 2**32): a cheap first test;
        # only when it disagrees is the stream decompressed to be sure.
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize == expected % 2**32:
            return note
        size = _gzip_payload_size(path)
        if size is None:
            raise ScanReadError(path, "image data is truncated: the gzip stream ends early or is corrupt")
        if size < expected:
            raise ScanReadError(
                path,
                f"image data is truncated: {size} bytes after decompression, the NIfTI header "
                f"(dim {dims}, {bitpix} bits) needs {expected}",
            )
        return note
    size = _file_size(path)
    if size < expected:
        raise ScanReadError(
            path,
            f"image data is truncated: file has {size} bytes, the NIfTI header (dim {dims}, "
            f"{bitpix} bits) needs {expected}",
        )
    return note


_NRRD_DATAFILE = re.compile(r"^\s*data\s*file\s*:(?!=)(.*)$", re.IGNORECASE)


def _check_nrrd(path: Path):
    """Every ``data file`` field anywhere in the NRRD header (up to its blank line, at most
    `MAX_HEADER_BYTES`): one name, a slice pattern or a LIST, each checked like MetaImage's."""
    data = _read_header_text(path)
    end = len(data)
    for sep in (b"\n\n", b"\r\n\r\n"):
        i = data.find(sep)
        if i >= 0:
            end = min(end, i)
    if end == len(data) and len(data) > MAX_HEADER_BYTES:
        raise ScanReadError(path, f"NRRD header longer than {MAX_HEADER_BYTES} bytes (no blank line ends it); refused")
    lines = data[:end].decode("latin-1").splitlines()
    found = [(i, m.group(1).strip()) for i, ln in enumerate(lines) if (m := _NRRD_DATAFILE.match(ln))]
    if len(found) > 1:
        raise ScanReadError(path, f"NRRD header has {len(found)} 'data file' fields; refused")
    if not found:
        return
    i, value = found[0]
    words = value.split()
    if words and words[0].upper() == "LIST":
        if len(data) > MAX_HEADER_BYTES:
            raise ScanReadError(path, f"NRRD LIST longer than {MAX_HEADER_BYTES} bytes; refused")
        rest = "\n".join(data.decode("latin-1").splitlines()[i + 1 :])
        names = _list_names(path, rest.encode("latin-1"), "NRRD")
    elif len(words) >= 4 and all(re.fullmatch(r"[-+]?\d+", w) for w in words[1:4]):
        first, last, step = (int(w) for w in words[1:4])
        names = _expand_pattern(path, words[0], first, last, step, "NRRD")
    elif "%" in value:
        raise ScanReadError(
            path, f"NRRD data file {value!r} looks like a slice pattern without '<first> <last> <step>'; refused"
        )
    else:
        names = [value]
    for name in names:
        _check_data_file(path, name)


def _check_analyze(path: Path):
    """Analyze 7.5 / NIfTI pair: the ``.hdr`` and the ``.img`` both inside the folder."""
    hdr = _analyze_header(path)
    for p in (path, hdr):
        if p is not None:
            _check_data_file(path, p.name, "file")


# --------------------------------------------------------------------------- readers


def load_scan(path) -> Scan:
    """Read a chest CT (volume) or chest X-ray (2D) from a file or DICOM folder.

    Raises `ScanReadError` (one-line message naming the file and the problem) for a file
    or folder that cannot be read as a scan. ITK's own console warnings are silenced
    while reading; what matters is in the error message or ``scan.warnings``.
    """
    with _quiet_itk():
        try:
            return _load_scan(path)
        except ScanReadError:
            raise
        except MemoryError:
            raise ScanReadError(_path_text(path), "not enough memory to read this scan") from None
        except RecursionError:
            raise ScanReadError(_path_text(path), "could not be read (nested too deeply)") from None
        except (OSError, ValueError, OverflowError, TypeError, IndexError, KeyError, UnicodeError) as e:
            # anything unforeseen is still one line naming the file, never a traceback
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ScanReadError(_path_text(path), f"could not be read ({type(e).__name__}: {why})") from None


def _path_text(path) -> str:
    try:
        return os.fspath(path)
    except TypeError:
        return repr(path)


@contextmanager
def _quiet_itk():
    po = _sitk().ProcessObject
    old = po.GetGlobalWarningDisplay()
    po.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        po.SetGlobalWarningDisplay(old)


def _load_scan(path) -> Scan:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise ScanReadError(repr(path), "expected a file or folder path") from None
    kind = file_kind(p)
    if kind == "missing":
        raise ScanReadError(p, "no such file or folder")
    if kind == "folder":
        return _load_dicom_folder(p)
    if kind != "file":
        raise ScanReadError(p, f"is a {kind}, not a regular file or a folder; refused")
    kind = _kind_from_name(p)
    if kind == "img":
        kind = _resolve_img(p)
        if kind is None:
            raise ScanReadError(
                p,
                f"not a JSRT .IMG radiograph (expected exactly {JSRT_NBYTES} bytes = 2048 x 2048 "
                f"x 16 bit, got {_file_size(p)}) and no .hdr file beside it for Analyze",
            )
    if kind is None:
        if _is_dicom_bytes(_head(p, 132)):
            kind = "dicom"
        else:
            supported = ", ".join(s for s, _ in _SUFFIX_KIND)
            raise ScanReadError(p, f"unsupported file type '{p.suffix}' (supported: {supported}, DICOM folders)")
    if _file_size(p) == 0:
        raise ScanReadError(p, "file is empty (0 bytes)")
    if kind == "dicom" and not _magic_ok(p, "dicom"):
        # Old ACR-NEMA files have no 'DICM' preamble: let GDCM try before refusing.
        pass
    elif not _magic_ok(p, kind):
        raise ScanReadError(p, f"not a {_FORMAT_NAME[kind]} file (its first bytes do not match the format)")
    if kind == "jsrt":
        return _load_jsrt(p)
    if kind == "dicom":
        return _load_dicom_file(p)
    return _load_sitk_file(p, kind)


def _sitk():
    import SimpleITK as sitk

    return sitk


def _read_info(p: Path, kind: str):
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    if kind == "dicom":
        reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        name = _FORMAT_NAME.get(kind, kind)
        raise ScanReadError(p, f"cannot read the {name} header: {_one_line_itk(e, p)}") from None
    return reader


def _check_info(p: Path, reader, warnings: list):
    sitk = _sitk()
    dim = reader.GetDimension()
    size = list(reader.GetSize())
    if dim == 1 or (dim >= 2 and sum(s > 1 for s in size) <= 1 and math.prod(size) > 0):
        raise ScanReadError(p, f"1D data (size {tuple(size)}): expected a 2D radiograph or a 3D volume")
    if dim >= 4 and any(s > 1 for s in size[3:]):
        raise ScanReadError(
            p,
            f"{dim}D data (size {tuple(size)} in x, y, z, t order): expected a 2D radiograph or a "
            "3D volume, not a time series or multi-volume file",
        )
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelIDValue())
    _check_pixel_type(p, pixel)
    _check_size(p, size, reader.GetNumberOfComponents(), _bytes_per_component(pixel))
    _check_spacing(p, reader.GetSpacing(), warnings)
    d = np.asarray(reader.GetDirection(), float)
    n = int(round(math.sqrt(d.size)))
    if n * n == d.size and n >= 2:
        d = d.reshape(n, n)
        if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
            raise ScanReadError(
                p,
                f"direction matrix {np.round(d, 4).tolist()} (x, y, z order) is singular: the "
                "image axes are not independent",
            )


def _check_pixel_type(p, pixel: str) -> None:
    if "complex" in pixel.lower():
        raise ScanReadError(
            p,
            f"voxels are complex numbers ({pixel}); a CT or radiograph has real "
            "values (the imaginary part would be lost); refused",
        )


def _execute(reader, p: Path, kind: str):
    try:
        return reader.Execute()
    except RuntimeError as e:
        name = _FORMAT_NAME.get(kind, kind)
        raise ScanReadError(p, f"cannot read the {name} image data: {_one_line_itk(e, p)}") from None
    except MemoryError:
        raise ScanReadError(p, "not enough memory to read the image") from None


def _load_sitk_file(p: Path, kind: str) -> Scan:
    if kind == "metaimage":
        _check_metaimage(p)
    elif kind == "nrrd":
        _check_nrrd(p)
    elif kind == "analyze":
        _check_analyze(p)
    note = _check_nifti(p) if kind == "nifti" else None
    warnings: list[str] = []
    reader = _read_info(p, kind)
    _check_info(p, reader, warnings)
    img = _execute(reader, p, kind)
    meta = {"format": kind}
    if note is not None:
        _warn_forms(note, img, warnings, meta)
    return _scan_from_image(img, p, kind, warnings, meta, seriesuid=strip_image_suffix(p.name))


def _warn_forms(note: dict, img, warnings: list, meta: dict) -> None:
    """NIfTI qform and sform disagree: say so, and which one placed the image."""
    origin = np.asarray(img.GetOrigin(), float)[:3]
    q, s = np.asarray(note["qform_origin"]), np.asarray(note["sform_origin"])
    used = "sform" if np.linalg.norm(origin - s) <= np.linalg.norm(origin - q) else "qform"
    fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
    warnings.append(
        f"the NIfTI qform and sform disagree (origins {fmt(q)} vs {fmt(s)} mm, LPS x/y/z); the image "
        f"is placed by the {used}: check its position before comparing with other software"
    )
    meta["nifti_forms"] = {**note, "used": used}


def _load_jsrt(p: Path) -> Scan:
    try:
        raw = np.fromfile(p, dtype=">u2")
    except OSError as e:
        raise ScanReadError(p, f"cannot read the file: {e.strerror or e}") from None
    if raw.size != JSRT_SHAPE[0] * JSRT_SHAPE[1]:
        raise ScanReadError(p, f"JSRT .IMG must hold {JSRT_NBYTES} bytes, got {raw.size * 2}")
    raw = raw.reshape(JSRT_SHAPE)
    warnings: list[str] = []
    over = int((raw > 4095).sum())
    if over:
        warnings.append(f"{over} pixels above the 12-bit maximum 4095 were clipped")
    # JSRT stores optical density (lungs bright); invert to the usual display (lungs dark).
    arr = (4095 - np.minimum(raw, 4095)).astype(np.uint16)
    meta = {
        "format": "jsrt",
        "original_dtype": ">u2",
        "bits_stored": 12,
        "inverted": True,
        "photometric": "MONOCHROME1",
    }
    return Scan(
        arr,
        (JSRT_SPACING_MM, JSRT_SPACING_MM),
        (0.0, 0.0),
        np.eye(2),
        "CXR",
        path=str(p),
        seriesuid=strip_image_suffix(p.name),
        warnings=warnings,
        metadata=meta,
    )


# --------------------------------------------------------------------------- DICOM


def _dicom_tag(reader_or_img, key: str, index: int | None = None) -> str | None:
    try:
        if index is None:
            if reader_or_img.HasMetaDataKey(key):
                return reader_or_img.GetMetaData(key).strip()
        elif reader_or_img.HasMetaDataKey(index, key):
            return reader_or_img.GetMetaData(index, key).strip()
    except (RuntimeError, UnicodeDecodeError):
        return None
    return None


def _parse_floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        vals = [float(v) for v in text.replace("\\", " ").split()]
    except ValueError:
        return None
    return vals or None


def _folder_files(root: Path, top: Path) -> tuple[list[str], list[str]]:
    """(names of regular files in ``root`` that lie inside ``top``, notes on the entries left
    out): FIFOs, devices, sockets, dangling links, link loops and links leading out of
    ``top`` are never opened (a FIFO would block a reader forever)."""
    good, skipped = [], []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return good, skipped
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            pass
        kind = file_kind(e.path)
        if kind == "folder":
            continue
        if kind != "file":
            skipped.append(f"{escape_text(e.name)} ({kind})")
        elif e.is_symlink() and not inside_folder(top, os.path.relpath(e.path, top))[0]:
            skipped.append(f"{escape_text(e.name)} (link out of the folder)")
        else:
            good.append(e.name)
    return good, skipped


@contextmanager
def _gdcm_folder(root: Path, top: Path, skipped_out: list | None = None):
    """A folder GDCM may scan for ``root``'s series, and a map back to ``root``'s files.

    When ``root`` holds anything but plain files (see `_folder_files`), GDCM scans a
    temporary folder of links to the plain files only; otherwise ``root`` itself."""
    good, skipped = _folder_files(root, top)
    if skipped_out is not None:
        rel = os.path.relpath(root, top)
        skipped_out.extend(s if rel == "." else f"{escape_text(rel)}/{s}" for s in skipped)
    if not skipped:
        yield str(root), (lambda name: name)
        return
    tmp = tempfile.mkdtemp(prefix="resmtnet-dicom-")
    try:
        for name in good:
            os.symlink(os.path.realpath(os.path.join(root, name)), os.path.join(tmp, name))
        yield tmp, (lambda name: os.path.join(str(root), os.path.basename(name)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gdcm_series_files(root: Path, uid: str, top: Path) -> list[str]:
    """``GetGDCMSeriesFileNames(root, uid)`` that never opens a non-regular file."""
    sitk = _sitk()
    with _gdcm_folder(root, top) as (where, back):
        try:
            return [back(n) for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(where, uid)]
        except RuntimeError:
            return []


def _dicom_series_in(
    folder: Path, max_dirs: int = 500, skipped: list | None = None
) -> list[tuple[Path, str, list[str]]]:
    """All DICOM series in ``folder`` and below: (folder, series uid, files sorted by position).

    Entries that are not plain files inside ``folder`` are left out and listed in ``skipped``."""
    sitk = _sitk()
    found = []
    ndirs = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        ndirs += 1
        if ndirs > max_dirs:
            break
        if not files:
            continue
        with _gdcm_folder(Path(root), folder, skipped) as (where, back):
            try:
                ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(where)
            except RuntimeError:
                continue
            for uid in ids:
                try:
                    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(where, uid)
                except RuntimeError:
                    continue
                if names:
                    found.append((Path(root), uid, [back(n) for n in names]))
    return found


def _looks_dicom(p: Path, top: Path | None = None) -> bool:
    """A plain file (inside ``top`` when given, links resolved) named or starting like DICOM."""
    if file_kind(p) != "file":
        return False
    if top is not None and not inside_folder(top, os.path.relpath(p, top))[0]:
        return False
    return p.name.lower().endswith((".dcm", ".dicom")) or _is_dicom_bytes(_head(p, 132))


def _count_dicom_files(folder: Path, max_files: int = 5000) -> int:
    n = seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            seen += 1
            if seen > max_files:
                return n
            if _looks_dicom(Path(root) / name, folder):
                n += 1
    return n


def _dicom_files_outside_series(root: Path, series, max_files: int = 5000) -> list[str]:
    """DICOM files in ``root`` that no series found there lists (GDCM skips broken files)."""
    listed = {os.path.normcase(os.path.abspath(f)) for r, _, fs in series if r == root for f in fs}
    out = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)[:max_files]
    except OSError:
        return out
    for e in entries:
        if file_kind(e.path) != "file" or e.name.upper() == "DICOMDIR":
            continue
        if os.path.normcase(os.path.abspath(e.path)) in listed:
            continue
        if _looks_dicom(Path(e.path), root):
            out.append(e.name)
    return out


def _load_dicom_folder(folder: Path, opened_file: Path | None = None) -> Scan:
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise ScanReadError(folder, f"cannot list the folder: {e.strerror or e}") from None
    if not entries:
        raise ScanReadError(folder, "folder is empty: expected a DICOM series")
    skipped: list[str] = []
    series = _dicom_series_in(folder, skipped=skipped)
    if not series:
        n = _count_dicom_files(folder)
        if n:
            raise ScanReadError(
                folder,
                f"{n} DICOM file(s) found but none holds a readable image (no pixel data, "
                "damaged files, or non-image objects such as reports)",
            )
        raise ScanReadError(folder, "no DICOM series found in this folder or its sub-folders")
    series.sort(key=lambda s: len(s[2]), reverse=True)
    root, uid, files = series[0]
    warnings: list[str] = []
    if skipped:
        listed = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.append(
            f"{len(skipped)} entries of the folder are not plain files inside it and were not opened: {listed}"
        )
    left_out = _dicom_files_outside_series(root, series)
    if left_out:
        listed = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        warnings.append(
            f"{len(left_out)} DICOM file(s) in {escape_text(root.name or str(root))} are not part of any "
            f"image series (damaged, without pixel data, or not images) and were left out: {listed}"
        )
    if len(series) > 1:
        others = ", ".join(f"{u} ({len(f)} files)" for _, u, f in series[1:6])
        more = f" and {len(series) - 6} more" if len(series) > 6 else ""
        warnings.append(
            f"the folder holds {len(series)} DICOM series; opened the largest, {uid} "
            f"({len(files)} files); not opened: {others}{more}"
        )
    return _read_dicom_files(folder, files, uid, warnings, opened_file)


def _read_dicom_files(where: Path, files: list[str], uid: str, warnings: list, opened_file=None) -> Scan:
    sitk = _sitk()
    first = _read_info(Path(files[0]), "dicom")
    size = list(first.GetSize())
    if len(size) == 3 and size[2] == 1:
        size[2] = len(files)
    pixel = sitk.GetPixelIDValueAsString(first.GetPixelIDValue())
    _check_pixel_type(where, pixel)
    _check_size(where, size, first.GetNumberOfComponents(), max(_bytes_per_component(pixel), 2))
    modality = (_dicom_tag(first, "0008|0060") or "").upper()
    if len(files) > 1 and modality in _PROJECTION_MODALITIES:
        # a series of radiographs (e.g. PA + lateral) is not a volume
        warnings.append(
            f"the {modality} series {uid} holds {len(files)} radiographs; opened the first, {Path(files[0]).name}"
        )
        files = files[:1]
    if len(files) == 1:
        return _load_dicom_file(Path(files[0]), warnings, path_for_scan=where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ScanReadError(where, f"cannot read the DICOM series {uid}: {_one_line_itk(e, where)}") from None
    except MemoryError:
        raise ScanReadError(where, "not enough memory to read the DICOM series") from None
    kept = _one_orientation(where, reader, files, uid, warnings)
    if kept is not None:  # slices of several orientations: read the largest group alone
        return _read_dicom_files(where, kept, uid, warnings, opened_file)
    _check_spacing(where, img.GetSpacing(), warnings)
    _check_slice_positions(reader, len(files), img, warnings)
    series_uid = _dicom_tag(reader, "0020|000e", 0) or uid
    meta = {
        "format": "dicom-series",
        "n_files": len(files),
        "dicom_modality": _dicom_tag(reader, "0008|0060", 0) or "",
        "series_description": _dicom_tag(reader, "0008|103e", 0) or "",
        "photometric": _dicom_tag(reader, "0028|0004", 0) or "",
        "files": [files[0], files[-1]],
    }
    if opened_file is not None:
        meta["opened_file"] = str(opened_file)
    return _scan_from_image(img, where, "dicom", warnings, meta, seriesuid=series_uid)


def _one_orientation(where: Path, reader, files: list[str], uid: str, warnings: list) -> list[str] | None:
    """None when all slices share one orientation (Image Orientation (Patient)); else the
    files of the largest orientation group, ordered along its own slice normal, with a
    warning (axial and sagittal slices of one series must not be stacked into one volume)."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(files)):
        v = _parse_floats(_dicom_tag(reader, "0020|0037", i))
        key = tuple(round(x, 2) + 0.0 for x in v) if v and len(v) == 6 else ()
        groups.setdefault(key, []).append(i)
    if len(groups) <= 1:
        return None
    ranked = sorted(groups.items(), key=lambda kv: len(kv[1]), reverse=True)
    key, kept = ranked[0]
    if len(kept) < 2 or len(kept) == len(ranked[1][1]) or not key:
        raise ScanReadError(
            where,
            f"the DICOM series {uid} mixes slices of {len(groups)} orientations "
            f"({', '.join(str(len(v)) for _, v in ranked)} slices) and none is the majority; "
            "refused (they cannot be stacked into one volume)",
        )
    normal = np.cross(np.asarray(key[:3]), np.asarray(key[3:]))

    def position(i: int) -> float:
        v = _parse_floats(_dicom_tag(reader, "0020|0032", i))
        return float(np.dot(v, normal)) if v and len(v) == 3 else float(i)

    kept = sorted(kept, key=position)
    warnings.append(
        f"the DICOM series {uid} mixes slices of {len(groups)} orientations; opened the {len(kept)} "
        f"slices with orientation {list(key)}, left out {len(files) - len(kept)}"
    )
    return [files[i] for i in kept]


def _check_slice_positions(reader, n: int, img, warnings: list):
    """Warn about missing/duplicate slices: position gaps along the slice normal."""
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    normal = d[:, 2]
    pos = []
    for i in range(n):
        v = _parse_floats(_dicom_tag(reader, "0020|0032", i))
        if v is None or len(v) != 3:
            return
        pos.append(float(np.dot(v, normal)))
    gaps = np.diff(np.asarray(pos))
    if gaps.size == 0:
        return
    med = float(np.median(np.abs(gaps)))
    if med <= 0:
        warnings.append("DICOM slices share one position: the volume's slice order is unreliable")
        return
    if np.any(np.abs(np.abs(gaps) - med) > 0.1 * med + 1e-3):
        warnings.append(
            f"slice spacing is not uniform (gaps {np.abs(gaps).min():.3g} to {np.abs(gaps).max():.3g} mm, "
            f"median {med:.3g} mm): missing or duplicate slices; geometry uses {img.GetSpacing()[2]:.3g} mm"
        )


def _load_dicom_file(p: Path, warnings: list | None = None, path_for_scan: Path | None = None) -> Scan:
    warnings = [] if warnings is None else warnings
    reader = _read_info(p, "dicom")
    size = reader.GetSize()
    modality = (_dicom_tag(reader, "0008|0060") or "").upper()
    single_slice = len(size) == 2 or (len(size) == 3 and size[2] == 1)
    if single_slice and modality in ("CT", "PT", "MR"):
        uid = _dicom_tag(reader, "0020|000e")
        names: list[str] = []
        if uid:
            names = _gdcm_series_files(p.parent, uid, p.parent)
        if len(names) > 1 and path_for_scan is None:
            warnings.append(
                f"{p.name} is one slice of a {modality} series; opened the whole series "
                f"({len(names)} slices) from its folder"
            )
            return _read_dicom_files(p.parent, names, uid, warnings, opened_file=p)
        raise ScanReadError(
            path_for_scan or p,
            f"holds a single {modality} slice; a chest CT needs the whole series: "
            "open the folder that holds all its slices",
        )
    return _load_dicom_single(p, warnings, path_for_scan=path_for_scan)


def _load_dicom_single(p: Path, warnings: list, path_for_scan: Path | None = None) -> Scan:
    reader = _read_info(p, "dicom")
    _check_info(p, reader, warnings)
    img = _execute(reader, p, "dicom")
    meta = {
        "format": "dicom",
        "dicom_modality": _dicom_tag(reader, "0008|0060") or "",
        "photometric": _dicom_tag(reader, "0028|0004") or "",
        "series_description": _dicom_tag(reader, "0008|103e") or "",
    }
    spacing_tags = {
        "pixel_spacing": _parse_floats(_dicom_tag(reader, "0028|0030")),
        "imager_pixel_spacing": _parse_floats(_dicom_tag(reader, "0018|1164")),
    }
    uid = _dicom_tag(reader, "0020|000e") or strip_image_suffix(p.name)
    where = path_for_scan or p
    return _scan_from_image(img, where, "dicom", warnings, meta, seriesuid=uid, dicom_spacing=spacing_tags)


# --------------------------------------------------------------------------- to Scan


def default_cxr_spacing(shape) -> float:
    """Assumed mm/px for a radiograph of ``shape`` without pixel size (see module doc)."""
    return DEFAULT_CXR_FIELD_MM / float(max(shape))


def _to_grey(img, p: Path, warnings: list):
    """Vector (RGB/RGBA/grey+alpha) 2D image -> grey numpy array (y, x).

    Works on a view of ITK's buffer, in row blocks (at most `_GREY_BLOCK_BYTES` of float32
    at a time), so that the peak memory is the decoded image plus its grey result."""
    sitk = _sitk()
    view = sitk.GetArrayViewFromImage(img)
    nc = view.shape[-1]
    if nc not in (2, 3, 4):
        raise ScanReadError(p, f"image has {nc} channels per pixel: expected grey, RGB or RGBA")
    dtype = view.dtype
    is_int = np.issubdtype(dtype, np.integer)
    out = np.empty(view.shape[:-1], dtype if is_int else np.float32)
    rows = max(1, _GREY_BLOCK_BYTES // max(1, view.shape[1] * 4 * 4))
    luma = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
    equal = True
    for r0 in range(0, view.shape[0], rows):
        block = view[r0 : r0 + rows]
        if nc == 2:
            out[r0 : r0 + rows] = block[..., 0]
            continue
        rgb = block[..., :3].astype(np.float32)
        same = np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 1], rgb[..., 2])
        equal &= same
        grey = rgb[..., 0] if same else rgb @ luma
        if is_int:
            info = np.iinfo(dtype)
            grey = np.clip(np.rint(grey), info.min, info.max)
        out[r0 : r0 + rows] = grey
    kind = "RGBA" if nc == 4 else "RGB"
    if nc == 2:
        warnings.append("grey + alpha image: alpha channel ignored")
    elif equal:
        warnings.append(f"{kind} image with equal channels read as grey")
    else:
        warnings.append(
            f"colour ({kind}) image reduced to grey (luma 0.299 R + 0.587 G + 0.114 B); a "
            "radiograph is normally stored grey"
        )
    if nc == 4:
        warnings[-1] += "; alpha channel ignored"
    return out


def _orthonormal(d: np.ndarray, p: Path, warnings: list, tol: float = 1e-3) -> np.ndarray:
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise ScanReadError(p, f"direction matrix {np.round(d, 4).tolist()} is singular or not finite")
    if np.allclose(d.T @ d, np.eye(len(d)), atol=tol):
        return d
    u, _, vt = np.linalg.svd(d)
    fixed = u @ vt
    warnings.append(
        f"direction matrix {np.round(d, 4).tolist()} is not orthonormal (sheared); replaced by the "
        f"nearest rotation {np.round(fixed, 4).tolist()}"
    )
    return fixed


def _fix_nonfinite(arr: np.ndarray, p: Path, warnings: list) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating):
        return arr
    bad = ~np.isfinite(arr)
    nbad = int(bad.sum())
    if not nbad:
        return arr
    if nbad == arr.size:
        raise ScanReadError(p, "image holds no finite values (all NaN or infinite)")
    fill = float(arr[~bad].min())
    arr = arr.copy()
    arr[bad] = fill
    warnings.append(f"{nbad} NaN/infinite voxels replaced by the image minimum {fill:g}")
    return arr


def _ct_dtype(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # values beyond float32 are refused by the caller
        return _ct_dtype_(arr)


def _ct_dtype_(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.int16 or arr.dtype == np.float32:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= -32768 and hi <= 32767:
            return arr.astype(np.int16)
    return arr.astype(np.float32)


def _cxr_dtype(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # values beyond float32 are refused by the caller
        return _cxr_dtype_(arr)


def _cxr_dtype_(arr: np.ndarray) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16, np.int16, np.float32):
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            return arr.astype(np.uint16)
        if lo >= -32768 and hi <= 32767:
            return arr.astype(np.int16)
    return arr.astype(np.float32)


def _itk_inverts_monochrome1() -> bool:
    """ITK >= 5.3 (SimpleITK >= 2.2) shows MONOCHROME1 DICOM as MONOCHROME2 itself."""
    sitk = _sitk()
    try:
        ver = (int(sitk.Version.ITKMajorVersion()), int(sitk.Version.ITKMinorVersion()))
    except (AttributeError, ValueError):
        return True
    return ver >= (5, 3)


def _scan_from_image(
    img, p: Path, kind: str, warnings: list, meta: dict, seriesuid: str, dicom_spacing: dict | None = None
) -> Scan:
    sitk = _sitk()
    dim = img.GetDimension()
    if dim == 4:
        img = img[:, :, :, 0]
        dim = 3
    size = list(img.GetSize())
    spacing = np.asarray(img.GetSpacing(), float)
    origin = np.asarray(img.GetOrigin(), float)
    direction = np.asarray(img.GetDirection(), float).reshape(dim, dim)
    meta.setdefault("original_dtype", img.GetPixelIDTypeAsString())
    ncomp = img.GetNumberOfComponentsPerPixel()

    if dim == 3 and size[2] == 1:
        # one slice: a radiograph stored as a volume (e.g. DICOM DX, 3D .mha with one slice)
        img = img[:, :, 0]
        dim = 2
        plane = direction[:2, :2]
        if np.allclose(plane.T @ plane, np.eye(2), atol=1e-3):
            direction, origin = plane, origin[:2]
        else:
            meta["direction_3d"] = direction.tolist()
            meta["origin_3d"] = origin.tolist()
            direction, origin = np.eye(2), np.zeros(2)
        spacing = spacing[:2]
    if dim == 3 and ncomp > 1:
        raise ScanReadError(p, f"volume has {ncomp} values per voxel: expected a grey (single-channel) CT")
    if dim == 2 and ncomp > 1:
        arr = _to_grey(img, p, warnings)
    else:
        arr = sitk.GetArrayFromImage(img)
    if arr.ndim != dim:
        raise ScanReadError(p, f"unexpected image layout: array shape {arr.shape} for a {dim}D image")
    if any(s < 2 for s in arr.shape):
        raise ScanReadError(p, f"degenerate image of shape {arr.shape}: expected a 2D radiograph or a 3D volume")

    # ITK (x, y, z) -> array order (z, y, x)
    spacing_a = spacing[::-1].copy()
    origin_a = origin[::-1].copy()
    direction_a = _orthonormal(direction[::-1, ::-1].copy(), p, warnings)
    if np.iscomplexobj(arr):
        _check_pixel_type(p, f"complex {arr.dtype}")
    arr = _fix_nonfinite(arr, p, warnings)
    wide = arr.dtype.kind == "f" and arr.dtype.itemsize > 4

    if dim == 3:
        modality = "CT"
        arr = _ct_dtype(arr)
    else:
        modality = "CXR"
        photometric = (meta.get("photometric") or "").upper()
        if photometric == "MONOCHROME1":
            if _itk_inverts_monochrome1():
                meta["inverted"] = True  # done by ITK's DICOM reader
            else:
                arr = arr.max() + arr.min() - arr
                meta["inverted"] = True
        arr = _cxr_dtype(arr)
        spacing_a = _cxr_spacing(arr.shape, spacing_a, kind, warnings, meta, dicom_spacing)
    if wide and not np.all(np.isfinite(arr)):
        raise ScanReadError(
            p,
            "voxel values exceed the float32 range (about +/-3.4e38) the plugin works "
            "in; refused rather than turned into infinities",
        )

    return Scan(
        arr,
        tuple(spacing_a),
        tuple(origin_a),
        direction_a,
        modality,
        path=str(p),
        seriesuid=seriesuid,
        warnings=warnings,
        metadata=meta,
    )


def _cxr_spacing(shape, spacing_a, kind: str, warnings: list, meta: dict, dicom_spacing) -> np.ndarray:
    """The pixel size of a radiograph, or the stated default when the file has none."""
    sp = np.asarray(spacing_a, float)
    if kind == "dicom" and np.allclose(sp, 1.0) and dicom_spacing:
        # GDCM ignores Pixel Spacing for some modalities (DX): read the tags directly.
        for tag in ("pixel_spacing", "imager_pixel_spacing"):
            v = dicom_spacing.get(tag)
            if v and len(v) >= 2 and all(math.isfinite(x) and 0 < x <= MAX_SPACING_MM for x in v[:2]):
                meta["spacing_source"] = tag
                return np.asarray(v[:2], float)
    why = None
    if kind == "jpeg":
        why = "JPEG files carry no pixel size"
    elif np.allclose(sp, 1.0, rtol=0, atol=1e-9):
        why = (
            "the file gives no pixel size"
            if kind in _RASTER_KINDS or kind == "dicom"
            else "the file's pixel size of exactly 1.0 mm looks like a placeholder"
        )
    elif kind in _RASTER_KINDS:
        for dpi in _SOFTWARE_DPI:
            if np.allclose(sp, 25.4 / dpi, rtol=1e-4):
                why = f"the file's {dpi:g} dpi is a software default, not a detector pixel size"
                break
    if why is None:
        meta["spacing_source"] = "file"
        return sp
    s = default_cxr_spacing(shape)
    meta["spacing_source"] = "assumed"
    warnings.append(
        f"{why}: assumed {s:.4g} mm/px (the longer side, {max(shape)} px, taken as "
        f"{DEFAULT_CXR_FIELD_MM:g} mm); sizes in mm are approximate"
    )
    return np.array([s, s])
