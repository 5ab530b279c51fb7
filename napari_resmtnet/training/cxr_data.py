"""Chest X-ray training data: the JSRT database, radiograph preprocessing and nodule
implantation from CT.

Two JSRT layouts, one code path (`load_cxr_records`):

* the original distribution: ``*.IMG`` files (2048 x 2048, 12 bit, big-endian, no header,
  0.175 mm/px; anywhere below the folder) and the clinical tables ``CLNDAT_EN.txt`` (nodule
  images: file name, subtlety 1-5, size mm, age, sex, x, y, benign/malignant, position,
  diagnosis; x = column, y = row in the 2048-px image) and ``CNNDAT_EN.txt`` (no nodule).
  Optional lung masks: ``masks/<name>.png|.gif`` or the SCR ``left lung``/``right lung``
  folders. Each image is resampled to the model spacing with `preprocess_radiograph`.
* the downsampled PNG layout: ``jsrt.csv`` + ``images/*.png`` (+ ``masks/*.png``), 224 px
  at 1.6 mm/px, nodule centre ``x_px, y_px`` (column, row) and ``diameter_px``.

Either way a `CXRRecord` holds the normalised image at ``MODEL_SPACING_MM`` (1.6 mm/px,
224 px for a full JSRT film), the lung mask on the same grid, and its nodule in pixels of
that grid (array order: row, col). Every image is its own patient (``seriesuid`` = image
name), so the patient-disjoint split is an image split.

Nodule implantation (the NODE21 generation approach): real CT nodules of the LUNA16 cubes
(train split of the CT data only) are projected along the antero-posterior axis (HU excess
over the surrounding lung, inside the nodule mask, summed along cube axis y), resampled to
1.6 mm and added to the lung field of radiographs without a nodule, with an attenuation
gain calibrated on the real JSRT nodules. The implant carries the cube's LIDC malignancy
(rating 1-2 benign, 4-5 malignant).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.formats import JSRT_NBYTES, JSRT_SHAPE, JSRT_SPACING_MM
from ..io.preprocess import MODEL_SPACING_MM, input_to_model_coords, preprocess_radiograph, resample_to_spacing
from .datasets import rating_to_label, split_by_series

#: SCR mask labels in the PNG layout: 150 right lung, 200 left lung, 250 heart.
LUNG_LABELS = (150, 200)

# Normalised-image contrast per mm of water-equivalent excess thickness of an implant,
# used when no calibration on real nodules is possible (see `calibrate_gain`).
DEFAULT_GAIN = 0.012


# --- records ---------------------------------------------------------------------------------


@dataclass
class CXRRecord:
    name: str
    seriesuid: str  # = name: each radiograph is its own patient
    image: np.ndarray  # (y, x) float32, normalised (`normalize_cxr`), model spacing
    centers: np.ndarray  # (K, 2) nodule centres, pixels of ``image`` (row, col)
    diameters: np.ndarray  # (K,) pixels of ``image``
    malignant: np.ndarray  # (K,) 1 / 0 / -1
    lung: np.ndarray | None = None  # (y, x) bool lung-field mask, or None
    spacing: float = MODEL_SPACING_MM  # mm per pixel of ``image``
    subtlety: int = 0  # JSRT 1 (extremely subtle) .. 5 (obvious); 0 no nodule
    main: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> int:
        return int(self.malignant[self.main]) if len(self.malignant) else -1

    @property
    def diameter(self) -> float:
        """Diameter of the main nodule in mm (nan without a nodule)."""
        return float(self.diameters[self.main]) * self.spacing if len(self.diameters) else float("nan")

    def target(self) -> dict:
        return {"centers": self.centers, "diameters": self.diameters, "malignant": self.malignant}

    def model_input(self) -> np.ndarray:
        return self.image


def _state_to_label(state: str) -> int:
    s = (state or "").strip().lower()
    if s.startswith("malig"):
        return 1
    if s.startswith("benign"):
        return 0
    return -1


# --- lung masks ------------------------------------------------------------------------------


def lung_from_labels(mask) -> np.ndarray:
    """Lung-field mask from an SCR label image (150/200 lungs, 250 heart) or a binary mask."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    vals = set(np.unique(m).tolist())
    if vals & set(LUNG_LABELS) and vals <= {0, *LUNG_LABELS, 250}:
        return np.isin(m, LUNG_LABELS)
    return m > 0


def _resize_mask(mask, shape):
    from skimage.transform import resize

    if mask.shape == tuple(shape):
        return mask.astype(bool)
    return resize(mask.astype(np.float32), shape, order=1, anti_aliasing=False, mode="edge") >= 0.5


def rough_lung_mask(image) -> np.ndarray:
    """Approximate lung fields of a normalised radiograph (no segmentation model).

    The darker 35 % of the inner 84 % of the image (smoothed), opened, the one or two
    largest components (a second only if at least a fifth of the first), holes filled.
    Dice about 0.8 against the SCR masks of JSRT: good enough to place implants where no
    mask is available, not a segmentation.
    """
    from scipy import ndimage

    s = ndimage.gaussian_filter(np.asarray(image, np.float32), 2)
    h, w = s.shape
    inner = np.zeros(s.shape, bool)
    inner[int(0.08 * h) : int(0.92 * h), int(0.08 * w) : int(0.92 * w)] = True
    m = (s < np.percentile(s[inner], 35)) & inner
    m = ndimage.binary_opening(m, iterations=2)
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = ndimage.sum(m, lab, range(1, n + 1))
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1] + ([order[1] + 1] if n > 1 and sizes[order[1]] > 0.2 * sizes[order[0]] else [])
    return ndimage.binary_fill_holes(np.isin(lab, keep))


# --- JSRT original distribution ----------------------------------------------------------------


def read_jsrt_img(path) -> np.ndarray:
    """A JSRT ``.IMG`` file -> (2048, 2048) uint16 in display convention (lungs dark).

    The file holds optical density (12 bit, big-endian, no header): it is inverted.
    """
    p = Path(path)
    size = p.stat().st_size
    if size != JSRT_NBYTES:
        raise ValueError(f"{p}: a JSRT .IMG must hold {JSRT_NBYTES} bytes (2048 x 2048 x 16 bit), got {size}")
    raw = np.fromfile(p, dtype=">u2").reshape(JSRT_SHAPE)
    return (4095 - np.minimum(raw, 4095)).astype(np.uint16)


_IMG_NAME = re.compile(r"(JPC[LN]N\d{3}\.IMG)", re.IGNORECASE)


def _num(tok, cast=float):
    try:
        return cast(tok)
    except (TypeError, ValueError):
        return None


def parse_clinical_table(text: str) -> dict:
    """Parse JSRT ``CLNDAT_EN.txt`` / ``CNNDAT_EN.txt`` text -> {stem: info dict}.

    CLNDAT rows: file name, subtlety (1-5), size (mm), age, sex, x, y (2048-px image,
    column, row), benign/malignant, position, diagnosis; tab-separated (whitespace in some
    copies; some copies run records together on one line, so records are split at the file
    names). CNNDAT rows (no nodule) hold file name, age, sex and a remark.
    """
    parts = _IMG_NAME.split(text)
    out = {}
    for i in range(1, len(parts), 2):
        name = parts[i]
        body = parts[i + 1].strip("\r\n")
        toks = [t.strip() for t in (body.split("\t") if "\t" in body else body.split())]
        toks = [t for t in toks if t != ""]
        stem = Path(name).stem.upper()
        info = {"file": name, "has_nodule": False}
        if stem.startswith("JPCLN") and len(toks) >= 7:
            info.update(
                has_nodule=True,
                subtlety=_num(toks[0], int) or 0,
                size_mm=_num(toks[1]),
                age=_num(toks[2], int),
                sex=toks[3],
                x=_num(toks[4]),
                y=_num(toks[5]),
                state=toks[6].lower(),
                position=toks[7] if len(toks) > 7 else "",
                diagnosis=" ".join(toks[8:]) if len(toks) > 8 else "",
            )
            if info["x"] is None or info["y"] is None:
                raise ValueError(f"{name}: nodule position is not numeric ({toks[4]!r}, {toks[5]!r})")
        out[stem] = info
    return out


def _find_file(root: Path, name: str):
    hits = [p for p in root.rglob("*") if p.is_file() and p.name.lower() == name.lower()]
    return sorted(hits)[0] if hits else None


def _jsrt_mask(root: Path, stem: str):
    from skimage.io import imread

    for sub in ("masks", "mask"):
        for ext in (".png", ".gif", ".PNG", ".GIF"):
            p = root / sub / f"{stem}{ext}"
            if p.exists():
                return lung_from_labels(imread(p))
    parts = []
    for side in ("left lung", "right lung"):
        hits = [p for p in root.rglob(f"{stem}.gif") if p.parent.name.lower() == side]
        if hits:
            parts.append(imread(hits[0]) > 0)
    if parts:
        m = parts[0]
        for q in parts[1:]:
            m = m | q
        return m
    return None


DEFAULT_NODULE_MM = 15.0  # JSRT median size, for the few rows whose size is unknown ("?")


def load_jsrt_img(root, limit: int | None = None) -> list[CXRRecord]:
    """The original JSRT distribution below ``root`` (``*.IMG`` + ``CLNDAT_EN.txt``)."""
    root = Path(root)
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() == ".img" and p.is_file()), key=lambda p: p.name.upper()
    )
    if not files:
        raise FileNotFoundError(f"{root}: no JSRT .IMG files found")
    info = {}
    for table in ("CLNDAT_EN.txt", "CNNDAT_EN.txt"):
        p = _find_file(root, table)
        if p is not None:
            info.update(parse_clinical_table(p.read_text(encoding="utf-8", errors="replace")))
    if not any(v["has_nodule"] for v in info.values()) and any(f.stem.upper().startswith("JPCLN") for f in files):
        raise FileNotFoundError(f"{root}: nodule images found but no clinical table CLNDAT_EN.txt with their positions")
    if limit:
        files = files[:limit]
    records = []
    for f in files:
        stem = f.stem.upper()
        img, zoom = preprocess_radiograph(read_jsrt_img(f), JSRT_SPACING_MM)
        lung = _jsrt_mask(root, f.stem)
        lung_source = "mask file"
        if lung is not None:
            lung = _resize_mask(lung, img.shape)
        else:
            lung, lung_source = rough_lung_mask(img), "threshold (no mask file)"
        it = info.get(stem, {"has_nodule": False})
        if it["has_nodule"]:
            size = it["size_mm"] if it["size_mm"] else DEFAULT_NODULE_MM
            c = input_to_model_coords([[it["y"], it["x"]]], zoom)
            d = np.array([size / MODEL_SPACING_MM])
            mal = np.array([_state_to_label(it["state"])])
        else:
            c, d, mal = np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=int)
        records.append(
            CXRRecord(
                name=stem,
                seriesuid=stem,
                image=img,
                centers=np.asarray(c, float),
                diameters=d,
                malignant=mal,
                lung=lung,
                subtlety=int(it.get("subtlety", 0) or 0),
                extra={
                    "path": str(f),
                    "layout": "img",
                    "lung_source": lung_source,
                    "size_known": bool(it.get("size_mm")) if it["has_nodule"] else None,
                },
            )
        )
    return records


# --- downsampled PNG layout --------------------------------------------------------------------


def load_jsrt_png(root, limit: int | None = None) -> list[CXRRecord]:
    """``jsrt.csv`` + ``images/*.png`` (+ ``masks/*.png``): 224 px at 1.6 mm/px."""
    from skimage.io import imread

    root = Path(root)
    with open(root / "jsrt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if limit:
        rows = rows[:limit]
    records = []
    for r in rows:
        stem = Path(r["image"]).stem.upper()
        arr = imread(root / "images" / r["image"])
        if arr.ndim == 3:
            arr = arr[..., 0]
        # The PNGs are at 1.6 mm/px already; resampling is a no-op there.
        img, _ = preprocess_radiograph(arr, MODEL_SPACING_MM)
        mpath = root / "masks" / r["image"]
        lung = _resize_mask(lung_from_labels(imread(mpath)), img.shape) if mpath.exists() else rough_lung_mask(img)
        if str(r.get("has_nodule", "0")).strip() in ("1", "True", "true"):
            d_px = float(r["diameter_px"]) if r.get("diameter_px") else float(r["diameter_mm"]) / MODEL_SPACING_MM
            c = np.array([[float(r["y_px"]), float(r["x_px"])]])
            d = np.array([d_px])
            mal = np.array([_state_to_label(r.get("state", ""))])
            sub = int(float(r.get("subtlety") or 0))
        else:
            c, d, mal, sub = np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=int), 0
        records.append(
            CXRRecord(
                name=stem,
                seriesuid=stem,
                image=img,
                centers=c,
                diameters=d,
                malignant=mal,
                lung=lung,
                subtlety=sub,
                extra={"path": str(root / "images" / r["image"]), "layout": "png"},
            )
        )
    return records


def load_cxr_records(path, limit: int | None = None) -> list[CXRRecord]:
    """Either JSRT layout, chosen from what the folder holds."""
    p = Path(path)
    if (p / "jsrt.csv").exists() and (p / "images").is_dir():
        return load_jsrt_png(p, limit=limit)
    if p.is_dir() and any(q.suffix.lower() == ".img" for q in p.rglob("*")):
        return load_jsrt_img(p, limit=limit)
    raise FileNotFoundError(
        f"{p}: expected a JSRT folder: jsrt.csv + images/*.png, or the original *.IMG files + CLNDAT_EN.txt"
    )


# --- nodule implantation -----------------------------------------------------------------------


@dataclass
class Implant:
    projection: np.ndarray  # (h, w) float32, mm of water-equivalent excess thickness, 1.6 mm/px
    diameter_px: float  # nodule diameter in model pixels
    malignant: int  # 1 / 0
    name: str = ""


def project_cube(hu, mask, spacing_mm: float = 1.0, target_mm: float = MODEL_SPACING_MM) -> np.ndarray:
    """A CT nodule (cube in HU, array order z, y, x, and its mask) -> frontal projection.

    The HU excess of the nodule over its surrounding lung (median of the lung voxels in
    the cube) is summed along the antero-posterior axis (array axis 1, y) and expressed as
    mm of water-equivalent thickness (HU / 1000 ~ relative attenuation). Rows are flipped
    so that cranial is up (z increases cranially), columns stay (patient right on the
    image left, as in a PA radiograph). Resampled to ``target_mm`` and cropped to the nodule.
    """
    from scipy import ndimage

    hu = np.asarray(hu, dtype=np.float32)
    m = np.asarray(mask) > 0
    if not m.any():
        return np.zeros((1, 1), np.float32)
    near = ndimage.binary_dilation(m, iterations=3)
    lung_vox = hu[(~near) & (hu < -400)]
    bg = float(np.median(lung_vox)) if lung_vox.size > 50 else -850.0
    excess = np.clip(hu - bg, 0, None) * m
    proj = excess.sum(axis=1) * spacing_mm / 1000.0  # (z, x), mm water-equivalent
    proj = proj[::-1, :]
    zoom = spacing_mm / target_mm
    proj, _ = resample_to_spacing(proj, spacing_mm, target_mm) if zoom < 1 else (proj, zoom)
    nz = np.argwhere(proj > 0.02 * proj.max())
    (r0, c0), (r1, c1) = nz.min(0), nz.max(0) + 1
    proj = proj[max(r0 - 1, 0) : r1 + 1, max(c0 - 1, 0) : c1 + 1]
    return np.ascontiguousarray(proj, dtype=np.float32)


def build_implant_bank(
    cube_root, seriesuids=None, min_diameter_mm: float = 8.0, max_items: int | None = None
) -> list[Implant]:
    """Projections of the labelled (benign/malignant) CT cubes of ``seriesuids``."""
    import SimpleITK as sitk

    root = Path(cube_root)
    with open(root / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = set(seriesuids) if seriesuids is not None else None
    bank = []
    for r in rows:
        lab = rating_to_label(r.get("malignancy_rating"))
        if lab not in (0, 1) or float(r["diameter_mm"]) < min_diameter_mm:
            continue
        if keep is not None and r["seriesuid"] not in keep:
            continue
        img = sitk.ReadImage(str(root / "images" / r["cube"]))
        mpath = root / "masks" / r["cube"].replace("_dcm_", "_seg_")
        if not mpath.exists():
            continue
        hu = sitk.GetArrayFromImage(img)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mpath)))
        proj = project_cube(hu, mask, float(img.GetSpacing()[0]))
        if proj.max() <= 0:
            continue
        bank.append(Implant(proj, float(r["diameter_mm"]) / MODEL_SPACING_MM, lab, r["cube"]))
        if max_items and len(bank) >= max_items:
            break
    return bank


def nodule_contrast(image, center, diameter_px) -> float:
    """Mean of the central disc (radius d/4) minus the mean of the ring [0.75 d, 1.25 d]."""
    yy, xx = np.indices(image.shape)
    r = np.hypot(yy - center[0], xx - center[1])
    core = r <= max(diameter_px / 4, 1.0)
    ring = (r >= 0.75 * diameter_px) & (r <= max(1.25 * diameter_px, 0.75 * diameter_px + 2))
    if not core.any() or not ring.any():
        return float("nan")
    return float(image[core].mean() - image[ring].mean())


def calibrate_gain(records, bank, clip=(0.002, 0.05), seed: int = 0) -> dict:
    """Gain (normalised contrast per mm water-equivalent) matching implants to real nodules.

    Contrast is measured as core-minus-ring (`nodule_contrast`). The nodules' own share of
    it is the median contrast of the real training nodules minus the median contrast of
    the same measure at random lung positions of the training radiographs without a nodule
    (same diameters; anatomy such as ribs and the lung border gives a non-zero background).
    Divided by the contrast of the CT projections at gain 1 (same measure, median over the
    bank), this is a model-free calibration of the implant attenuation to the radiographs.
    """
    from scipy import ndimage

    real = [(nodule_contrast(r.image, r.centers[0], r.diameters[0]), r.diameters[0]) for r in records if len(r.centers)]
    real = [(c, d) for c, d in real if np.isfinite(c)]
    negs = [r for r in records if not len(r.centers) and r.lung is not None and r.lung.any()]
    if not real or not bank or not negs:
        return {"gain": DEFAULT_GAIN, "n_real": len(real), "source": "default"}
    rng = np.random.default_rng(seed)
    dists = [ndimage.distance_transform_edt(r.lung) for r in negs]
    bg = []
    for _, d in real:
        for _ in range(4):
            k = int(rng.integers(len(negs)))
            ok = np.argwhere(dists[k] >= max(d / 3, 2.0))
            if len(ok):
                bg.append(nodule_contrast(negs[k].image, ok[int(rng.integers(len(ok)))], d))
    bg_med = float(np.nanmedian(bg)) if bg else 0.0
    per_mm = []  # contrast of a CT projection per mm of diameter at gain 1
    for im in bank:
        h, w = im.projection.shape
        pad = 2 * int(im.diameter_px) + 4
        canvas = np.pad(im.projection, pad)
        cen = np.array(np.unravel_index(np.argmax(_smooth(canvas)), canvas.shape), float)
        per_mm.append(nodule_contrast(canvas, cen, im.diameter_px) / (im.diameter_px * MODEL_SPACING_MM))
    ct_per_mm = float(np.nanmedian(per_mm))
    real_c = np.array([c for c, _ in real])
    real_d = np.array([d for _, d in real]) * MODEL_SPACING_MM
    excess = real_c - bg_med
    ratios = excess / (real_d * ct_per_mm)
    gain = float(np.clip(np.median(ratios), *clip))
    return {
        "gain": gain,
        "gain_p25": float(np.percentile(ratios, 25)),
        "gain_p75": float(np.percentile(ratios, 75)),
        "real_contrast_median": float(np.median(real_c)),
        "background_contrast_median": bg_med,
        "n_real": len(real),
        "n_bank": len(bank),
        "source": "calibrated on the real training nodules",
    }


def _smooth(a, sigma=1.0):
    from scipy import ndimage

    return ndimage.gaussian_filter(a, sigma)


def _uniform(g, lo=0.0, hi=1.0) -> float:
    import torch

    return float(torch.rand((), generator=g)) * (hi - lo) + lo


def _randint(g, n: int) -> int:
    import torch

    return int(torch.randint(0, n, (), generator=g))


def implant_nodule(image, lung, implant: Implant, gain: float, g, flip_lr: bool | None = None, blur_sigma: float = 0.6):
    """Add one CT-nodule projection to ``image`` inside ``lung``.

    The centre is drawn among the lung pixels whose distance to the lung border is at least
    a third of the nodule diameter (falls back to any lung pixel). The result is clipped to
    the input range. Returns (new image, centre (row, col), diameter px) or None when the
    lung mask is empty.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if lung is None or not np.any(lung):
        return None
    proj = implant.projection
    if flip_lr if flip_lr is not None else _uniform(g) < 0.5:
        proj = proj[:, ::-1]
    if _uniform(g) < 0.5:
        proj = np.rot90(proj, 2)
    if blur_sigma:
        proj = ndimage.gaussian_filter(np.pad(proj, 2), blur_sigma)
    dist = ndimage.distance_transform_edt(lung)
    ok = np.argwhere(dist >= max(implant.diameter_px / 3, 2.0))
    if len(ok) == 0:
        ok = np.argwhere(lung)
    cy, cx = ok[_randint(g, len(ok))]
    h, w = proj.shape
    # place the projection's intensity-weighted centre on (cy, cx)
    ys, xs = np.indices(proj.shape)
    tot = float(proj.sum())
    py, px = (float((ys * proj).sum() / tot), float((xs * proj).sum() / tot)) if tot > 0 else ((h - 1) / 2, (w - 1) / 2)
    r0, c0 = int(round(cy - py)), int(round(cx - px))
    out = img.copy()
    ir0, ic0 = max(r0, 0), max(c0, 0)
    ir1, ic1 = min(r0 + h, img.shape[0]), min(c0 + w, img.shape[1])
    if ir1 <= ir0 or ic1 <= ic0:
        return None
    patch = proj[ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0]
    out[ir0:ir1, ic0:ic1] += gain * patch
    lo, hi = float(img.min()), float(img.max())
    np.clip(out, lo, hi, out=out)
    centre = np.array([r0 + py, c0 + px])
    return out, centre, float(implant.diameter_px)


# --- training hooks (called by napari_resmtnet.training.train) -------------------------------------


def _implant_settings(cfg) -> dict:
    d = {
        "enabled": False,
        "prob": 0.5,
        "max_per_image": 2,
        "min_diameter_mm": 8.0,
        "gain": None,
        "gain_range": [0.6, 1.6],
        "cubes": None,
        "ct_val_fraction": 0.2,
        "ct_seed": 0,
        "flip_lr": True,
    }
    d.update(dict(cfg.implant or {}))
    return d


def training_context(cfg, train_recs) -> dict:
    """Built once before training: the implant bank (CT train split only) and its gain."""
    s = _implant_settings(cfg)
    ctx = {"implant": s, "bank": [], "gain": None}
    if not s["enabled"]:
        return ctx

    cubes = Path(s["cubes"]) if s["cubes"] else Path(cfg.data).parent / "ct_nodule_cubes"
    if not (cubes / "nodules.csv").exists():
        raise FileNotFoundError(f"{cubes}: CT nodule cubes for implantation not found (set implant.cubes)")
    with open(cubes / "nodules.csv", newline="") as f:
        uids = [r["seriesuid"] for r in csv.DictReader(f)]
    ct_train, _ = split_by_series(uids, s["ct_val_fraction"], s["ct_seed"])
    bank = build_implant_bank(cubes, ct_train, s["min_diameter_mm"])
    if not bank:
        raise RuntimeError(f"{cubes}: no labelled CT nodules of at least {s['min_diameter_mm']} mm to implant")
    cal = calibrate_gain(train_recs, bank) if s["gain"] is None else {"gain": float(s["gain"]), "source": "config"}
    ctx.update(bank=bank, gain=cal["gain"], calibration=cal)
    return ctx


def implant_record_arrays(rec: CXRRecord, ctx: dict, g):
    """(image, target) of ``rec``, with implanted nodules when the settings say so."""
    s = ctx["implant"] if ctx else {"enabled": False}
    img = rec.image
    centers = np.asarray(rec.centers, float).reshape(-1, 2)
    diams = np.asarray(rec.diameters, float).reshape(-1)
    mal = np.asarray(rec.malignant, float).reshape(-1)
    if s.get("enabled") and ctx.get("bank") and len(centers) == 0 and rec.lung is not None and _uniform(g) < s["prob"]:
        n = 1 + _randint(g, int(s["max_per_image"]))
        c_new, d_new, m_new = [], [], []
        for _ in range(n):
            im = ctx["bank"][_randint(g, len(ctx["bank"]))]
            gain = ctx["gain"] * _uniform(g, *s["gain_range"])
            res = implant_nodule(img, rec.lung, im, gain, g)
            if res is None:
                continue
            img, c, d = res
            c_new.append(c)
            d_new.append(d)
            m_new.append(im.malignant)
        if c_new:
            centers = np.concatenate([centers, np.array(c_new)])
            diams = np.concatenate([diams, d_new])
            mal = np.concatenate([mal, m_new])
    return img, {"centers": centers, "diameters": diams, "malignant": mal}


def make_cxr_batch(records, cfg, aug, g, context=None):
    """Training batch of radiographs: implantation, left-right flip, then `augment_batch`."""
    import torch

    from .augment import augment_batch  # lazy: augment imports torch; record loading stays light

    s = _implant_settings(cfg)
    imgs, targets = [], []
    for r in records:
        img, t = implant_record_arrays(r, context, g)
        if s.get("flip_lr", True) and _uniform(g) < 0.5:
            img = img[:, ::-1]
            t = dict(t)
            c = t["centers"].copy()
            c[:, 1] = img.shape[1] - 1 - c[:, 1]
            t["centers"] = c
        imgs.append(np.ascontiguousarray(img, dtype=np.float32))
        targets.append(t)
    x = torch.from_numpy(np.stack(imgs))[:, None]
    return augment_batch(x, targets, aug, g, "CXR")
