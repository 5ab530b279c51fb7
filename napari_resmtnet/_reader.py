"""napari reader: chest CT volumes and chest radiographs as image layers in world millimetres.

napari imports this module at startup, so it imports nothing heavy at module level;
SimpleITK and napari load when a file is actually read.

Behaviour on errors: for a path it does not recognise, ``napari_get_reader`` returns None
(napari then tries other readers). For a path it claims but cannot read, the reader
function shows one error notification (``"<path>: <problem>"``, no traceback) and returns
napari's "nothing to add" sentinel ``[(None,)]``. Returning ``[]`` or raising would make
napari raise "Reader ... returned no data" / open its reader-choice dialog with a
traceback on top of our message. What the reader repaired or assumed (``scan.warnings``)
is shown as warning notifications.
"""

from __future__ import annotations

import os
from pathlib import Path
from .io.formats import ScanReadError, can_read, load_scan, strip_image_suffix
from .scan import geometry_dict as geometry
from .paths import escape_text, shown

#: Lung window (W 1500 / L -600 HU) for CT.
CT_CONTRAST_LIMITS = (-1350.0, 150.0)
#: Percentiles of the radiograph's grey values used as its contrast limits.
CXR_PERCENTILES = (1.0, 99.0)

# Formats no generic image reader handles: claimed by name even when the file is broken,
# so that the user gets our one-line explanation instead of "no reader found".
_MEDICAL_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".dcm", ".dicom")


def _single_path(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return os.fspath(path)
    except TypeError:
        return None


def _claims(path: str) -> bool:
    if path.lower().endswith(_MEDICAL_SUFFIXES) and os.path.isfile(path):
        return True
    return can_read(path)


def napari_get_reader(path):
    """Return a reader function for a scan file/DICOM folder, or None for anything else."""
    p = _single_path(path)
    if p is None or not _claims(p):
        return None
    return read_scan


def display_name(path) -> str:
    """Layer name: the file name without its image extension(s), or the folder's name."""

    p = Path(path)
    return strip_image_suffix(p.name) if p.name else str(p)


def contrast_limits(scan) -> tuple[float, float]:
    import numpy as np

    if scan.modality == "CT":
        return CT_CONTRAST_LIMITS
    a = np.asarray(scan.array)
    step = max(1, int(np.sqrt(a.size / 250_000)))  # percentiles of a subsample: fast
    sub = a[::step, ::step].astype(np.float32).ravel()
    # Leave out padding and saturation (pixels at the exact minimum/maximum), which can
    # cover more than 1 % of a radiograph and would swallow the percentiles.
    inner = sub[(sub > sub.min()) & (sub < sub.max())]
    if inner.size >= 0.01 * sub.size and inner.size > 0:
        sub = inner
    lo, hi = (float(v) for v in np.percentile(sub, CXR_PERCENTILES))
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
        if not hi > lo:
            hi = lo + 1.0
    return (lo, hi)


def geometry_dict(scan) -> dict:
    """JSON-able geometry of a scan (array order) for layer metadata: `scan.geometry_dict`
    plus the array shape and the modality."""

    return {**geometry(scan), "shape": [int(s) for s in scan.shape], "modality": scan.modality}


def scan_layer_data(scan, name: str | None = None) -> list[tuple]:
    """``[(array, kwargs, "image")]`` for a `Scan`: the one place layer kwargs are made.

    Used by the reader and the sample-data commands; ``kwargs`` holds ``scale``,
    ``translate`` (and ``affine`` when the direction is not the identity) from
    ``scan.napari_kwargs()``, a grey colormap, contrast limits (CT: lung window; CXR: 1-99
    percentiles) and ``metadata = {"scan": geometry, "path", "seriesuid", "modality",
    "warnings", "scan_metadata"}``.
    """
    kwargs = dict(scan.napari_kwargs())
    kwargs.update(
        name=name or (display_name(scan.path) if scan.path else scan.name),
        colormap="gray",
        contrast_limits=contrast_limits(scan),
        metadata={
            "scan": geometry_dict(scan),
            "path": scan.path,
            "seriesuid": scan.seriesuid,
            "modality": scan.modality,
            "warnings": list(scan.warnings),
            "scan_metadata": _jsonable(scan.metadata),
        },
    )
    return [(scan.array, kwargs, "image")]


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _notify(kind: str, message: str):
    try:
        from napari.utils import notifications
    except ImportError:  # used outside napari
        import sys

        print(message, file=sys.stderr)
        return
    getattr(notifications, f"show_{kind}")(message)


def read_scan(path, **_ignored):
    """napari reader function: load one scan; errors become one notification, not a traceback."""

    p = _single_path(path)
    try:
        scan = load_scan(p)
    except ScanReadError as e:
        _notify("error", str(e))
        return [(None,)]
    except MemoryError:
        _notify("error", f"{shown(p)}: not enough memory to read this scan")
        return [(None,)]
    except (OSError, RuntimeError, ValueError) as e:  # unexpected: still one line, no traceback
        _notify("error", f"{shown(p)}: could not be read ({type(e).__name__}: {escape_text(' '.join(str(e).split()))})")
        return [(None,)]
    for w in scan.warnings:
        _notify("warning", f"{shown(display_name(p))}: {w}")
    return scan_layer_data(scan)
