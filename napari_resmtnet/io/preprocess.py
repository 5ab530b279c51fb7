"""Model input preprocessing, numpy only: CT intensity normalisation, radiograph resampling
to the model's pixel spacing and normalisation, and the model <-> input pixel coordinate map.

Shared by inference (what the network is given) and training (what it learns from), so the
two cannot drift apart. Light: no torch (a torch tensor is accepted where torch is loaded).
"""

from __future__ import annotations

import math
import sys

import numpy as np

#: The model's radiograph pixel spacing (mm/px).
MODEL_SPACING_MM = 1.6

# CT: Hounsfield units clipped to a wide lung window and scaled to about [-1, 1].
CT_WINDOW = (-1200.0, 600.0)


def normalize_ct(hu, window=CT_WINDOW, out=None):
    """HU (numpy or torch) -> float32 in about [-1, 1] over ``window``. ``out``: a float32
    array of ``hu``'s shape to write into (numpy only), for a whole scan without a second
    full-size temporary."""
    lo, hi = window
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded; never import it here
    if torch is not None and isinstance(hu, torch.Tensor):
        return (hu.float().clamp(lo, hi) - lo) / (hi - lo) * 2 - 1
    if out is None:
        out = np.empty(np.shape(hu), np.float32)
    np.clip(hu, lo, hi, out=out)
    out -= lo
    out *= 2.0 / (hi - lo)
    out -= 1.0
    return out


def normalize_cxr(img, lung_mask=None):
    """Radiograph -> float32 standardised by robust percentiles (1..99 %) to about [-1, 1]."""
    a = np.asarray(img, dtype=np.float32)
    ref = a[lung_mask > 0] if lung_mask is not None and np.any(lung_mask) else a
    lo, hi = np.percentile(ref, [1, 99]) if ref.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), -0.5, 1.5) * 2 - 1).astype(np.float32)


# --- radiograph preprocessing ----------------------------------------------------------------


def _lin_axis(n_in: int, n_out: int, zoom: float, k: int):
    """Source indices/weights (on a k-block-averaged axis) for output pixels of ``zoom``."""
    o = np.arange(n_out, dtype=np.float64)
    src = (o + 0.5) / zoom - 0.5  # input pixel coordinate of each output centre
    b = (src - (k - 1) / 2) / k  # coordinate on the block-averaged axis
    n_b = -(-n_in // k)
    b = np.clip(b, 0, n_b - 1)
    i0 = np.minimum(np.floor(b).astype(np.int64), max(n_b - 2, 0))
    w = (b - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_b - 1)
    return i0, i1, w


def resample_to_spacing(array, spacing_mm, target_mm: float = MODEL_SPACING_MM):
    """Resample a 2D image to ``target_mm`` pixels: (float32 image, zoom).

    ``zoom`` = output pixels per input pixel (``spacing / target``, a float; with different
    row/column spacings a pair). Output pixel ``o`` is centred on input coordinate
    ``(o + 0.5) / zoom - 0.5`` (so input = (output + 0.5) / zoom - 0.5, both in pixel
    index coordinates, array order). Downsampling averages k x k blocks (anti-aliasing, k =
    floor(1 / zoom)), then interpolates linearly the remaining factor; a 2048 x 2048 film
    takes a few tens of milliseconds.
    """
    a = np.asarray(array, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2D radiograph, got an array of shape {a.shape}")
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (2,))
    if not (np.all(np.isfinite(sp)) and np.all(sp > 0)):
        raise ValueError(f"pixel spacing must be positive, got {tuple(sp)}")
    zooms = sp / float(target_mm)
    ks = [max(1, int(math.floor(1.0 / z + 1e-6))) for z in zooms]
    if ks[0] > 1 or ks[1] > 1:
        ny, nx = a.shape
        py, px = (-ny) % ks[0], (-nx) % ks[1]
        if py or px:
            a = np.pad(a, ((0, py), (0, px)), mode="edge")
        a = a.reshape(a.shape[0] // ks[0], ks[0], a.shape[1] // ks[1], ks[1]).mean(axis=(1, 3), dtype=np.float32)
        a = a.astype(np.float32, copy=False)
        shape_in = (ny, nx)
    else:
        shape_in = a.shape
    out_shape = [max(1, int(math.ceil(n * z - 1e-6))) for n, z in zip(shape_in, zooms)]
    if out_shape == list(a.shape) and all(abs(z * k - 1) < 1e-9 for z, k in zip(zooms, ks)):
        out = a  # already at the target spacing (e.g. block mean by an exact integer factor)
    else:
        r0, r1, wr = _lin_axis(shape_in[0], out_shape[0], zooms[0], ks[0])
        c0, c1, wc = _lin_axis(shape_in[1], out_shape[1], zooms[1], ks[1])
        rows = a[r0] * (1 - wr)[:, None] + a[r1] * wr[:, None]
        out = rows[:, c0] * (1 - wc)[None, :] + rows[:, c1] * wc[None, :]
    zoom = float(zooms[0]) if zooms[0] == zooms[1] else (float(zooms[0]), float(zooms[1]))
    return np.ascontiguousarray(out, dtype=np.float32), zoom


def preprocess_radiograph(array, spacing_mm, lung_mask=None):
    """Radiograph (display convention: lungs dark, bone bright) -> model input.

    Returns ``(image, zoom)``: the float32 image at ``MODEL_SPACING_MM`` (1.6 mm/px),
    normalised by `normalize_cxr` (robust 1..99 % percentiles to about [-1, 1]), and the
    zoom of `resample_to_spacing` (model pixel ``o`` <-> input pixel ``(o + 0.5) / zoom -
    0.5``). ``spacing_mm``: mm per pixel, one number or (row, col).
    """
    img, zoom = resample_to_spacing(array, spacing_mm)
    return normalize_cxr(img, lung_mask), zoom


def model_to_input_coords(coords, zoom):
    """Model-grid pixel coordinates (..., 2) -> input pixel coordinates (array order)."""
    z = np.broadcast_to(np.asarray(zoom, dtype=np.float64), (2,))
    c = np.asarray(coords, dtype=np.float64)
    return (c + 0.5) / z - 0.5


def input_to_model_coords(coords, zoom):
    z = np.broadcast_to(np.asarray(zoom, dtype=np.float64), (2,))
    c = np.asarray(coords, dtype=np.float64)
    return (c + 0.5) * z - 0.5
