"""What Res-MTNet says about each detected CT nodule beyond box and malignancy. Qt-free.

For a model with the reader-characteristic heads (``attributes``) and the full-resolution
mask decoder (``fine_segmentation``), each candidate gets one network pass on a 49-voxel
patch centred on it (at the model spacing, so 49 mm at 1 mm), averaged over the 2^3 flips
when ``tta`` is set. From that pass:

* **characteristics**: the texture softmax (ground-glass / part-solid / solid) and the
  calcified, spiculated and ill-defined-margin probabilities, read at the patch's centre
  cell exactly as the malignancy logit is read at a detection's centre;
* **the nodule's mask**: the decoder's probability > 0.5, reduced to the connected component
  at (or nearest to) the patch centre, so a touching vessel or a neighbouring nodule does not
  count;
* **sizes** from that mask (`measurements.measure_nodule`: long and short axis on the axial
  slice of the largest long axis, their mean, the volume) and the **solid component** (the
  mask's voxels above -300 HU, the usual CT definition of the solid part of a subsolid
  nodule), measured the same way;
* the **type**: from the mask's composition (its solid fraction, `texture_from_fraction`),
  which agrees with the readers more often than the texture head; the head's call is kept
  as ``texture_head`` and its probabilities as ``texture_probability`` (a model without the
  mask decoder gives the head's call);
* a **Lung-RADS v2022** baseline category from the model's type and the measured mean
  diameters (`lungrads.lung_rads`), decision support only: the model's calcification head
  is "any calcification", while category 1 needs a *benign pattern*, so it is not fed to the
  table; the reader sees the flag and may override the type.

Nothing here changes a detection's box or score; `mask_extent_mm` is returned so that a
caller may size boxes from the mask.
"""

from __future__ import annotations

import math

import numpy as np

from .. import lungrads
from ..measurements import measure_nodule

#: Mask probability above which a voxel belongs to the nodule.
MASK_LEVEL = 0.5
#: Hounsfield units above which a voxel of a nodule counts as its solid component.
SOLID_HU = -300.0
#: The nodule's type from its segmented mask's composition (the radiological definition:
#: how much of the nodule is solid): the fraction of the mask above `SOLID_HU` at most the
#: first value -> ground-glass, at least the second -> solid, in between -> part-solid.
#: Fitted on the training cubes against the readers' majority (`scripts/fit_texture_rule.py`:
#: 83.1 % there; 81.9 % on the validation cubes, where the texture head alone reads 73.9 %).
#: The masks are loose (they take in some lung around the nodule), hence the low fractions.
TEXTURE_SOLID_FRACTION = (0.025, 0.05)


def texture_from_fraction(solid_fraction: float) -> str:
    """Nodule type from the solid fraction of its mask (see `TEXTURE_SOLID_FRACTION`)."""
    lo, hi = TEXTURE_SOLID_FRACTION
    return "ground-glass" if solid_fraction <= lo else ("solid" if solid_fraction >= hi else "part-solid")


#: At most this many candidates per scan are characterised: those at or above the operating
#: threshold, the most probable first (candidates below it, shown when a reader lowers the
#: threshold, keep box and malignancy only).
MAX_CHARACTERISED = 20


def _centre_component(mask: np.ndarray) -> np.ndarray:
    from skimage.measure import label

    lab = label(mask, connectivity=1)
    if lab.max() == 0:
        return mask
    c = tuple(s // 2 for s in mask.shape)
    k = lab[c]
    if k == 0:  # nearest component to the centre
        idx = np.argwhere(lab > 0)
        k = lab[tuple(idx[np.argmin(((idx - np.asarray(c)) ** 2).sum(1))])]
    return lab == k


def _patch_outputs(model, patches, tta: bool):
    """(N, 1, P, P, P) patches -> attribute probabilities (N, 6) or None and mask
    probabilities (N, P, P, P) or None, averaged over flips when ``tta``."""
    import torch

    from ..model.network import PATCH, STRIDE, TEXTURE_CLASSES, _flip_sets  # lazy: the network imports torch

    cfg = model.config
    c = (PATCH // 2) // STRIDE
    flips = _flip_sets(3) if tta else [[]]
    att, masks = [], []
    with torch.inference_mode():
        for axes in flips:
            x = torch.flip(patches, axes) if axes else patches
            maps = model.forward_maps(x, full_resolution=bool(cfg.fine_segmentation))
            if cfg.attributes:
                att.append(maps["attributes"][:, :, c, c, c].float())
            if cfg.fine_segmentation:
                m = torch.sigmoid(maps["mask"][:, 0].float())
                masks.append(torch.flip(m, [a - 1 for a in axes]) if axes else m)
    probs = None
    if att:
        lg = torch.stack(att).mean(0)
        nt = len(TEXTURE_CLASSES)
        probs = torch.cat([torch.softmax(lg[:, :nt], 1), torch.sigmoid(lg[:, nt:])], 1).cpu().numpy()
    mask = torch.stack(masks).mean(0).cpu().numpy() if masks else None
    return probs, mask


def characterise(
    model, volume, centres_vox, spacing_mm: float, hu_window=(-1000.0, 400.0), tta: bool = False, batch: int = 8
) -> list[dict]:
    """One findings dict (see `Detections.findings`) per centre (model voxels, array order)
    of a normalised model-grid ``volume``; empty dicts when the model has neither head."""
    from ..model.network import centre_patches  # lazy: the network imports torch

    cfg = getattr(model, "config", None)
    if cfg is None or cfg.spatial_dims != 3 or not (cfg.attributes or cfg.fine_segmentation):
        return [{} for _ in centres_vox]
    out: list[dict] = []
    dev = next(model.parameters()).device
    for i in range(0, len(centres_vox), batch):
        chunk = centres_vox[i : i + batch]
        out += characterise_patches(model, centre_patches(volume, chunk).to(dev), chunk, spacing_mm, hu_window, tta)[0]
    return out


def characterise_patches(model, patches, centres_vox, spacing_mm: float, hu_window=(-1000.0, 400.0), tta=False):
    """Findings of the nodules at the centres of ``patches`` (`model.network.centre_patches`
    around ``centres_vox``) and their masks: (list of findings dicts, (N, P, P, P) bool
    arrays of each nodule's connected mask, or None for a model without the mask decoder)."""
    from ..model.network import BINARY_ATTRIBUTES, TEXTURE_CLASSES  # lazy: the network imports torch

    lo, hi = hu_window
    sp = (float(spacing_mm),) * 3
    probs, masks = _patch_outputs(model, patches, tta)
    hu = (patches[:, 0].float().cpu().numpy() + 1.0) / 2.0 * (hi - lo) + lo
    nodules = None if masks is None else np.stack([_centre_component(m > MASK_LEVEL) for m in masks])
    out = []
    for k in range(len(patches)):
        f: dict = {}
        if probs is not None:
            tex = {name: float(p) for name, p in zip(TEXTURE_CLASSES, probs[k, : len(TEXTURE_CLASSES)])}
            f["texture"] = max(tex, key=lambda name: tex[name])
            f["texture_probability"] = tex
            for name, p in zip(BINARY_ATTRIBUTES, probs[k, len(TEXTURE_CLASSES) :]):
                f[name] = float(p)
        if nodules is not None:
            f.update(_measure_component(nodules[k], hu[k], sp))
            if "mask_centre_offset_mm" in f:  # the patch is centred on the rounded centre
                shift = [int(round(float(v))) - float(v) for v in centres_vox[k]]
                f["mask_centre_offset_mm"] = [o + d * sp[0] for o, d in zip(f["mask_centre_offset_mm"], shift)]
        if "solid_fraction" in f:  # the type from the mask's composition, the head's call kept
            if "texture" in f:
                f["texture_head"] = f["texture"]
            f["texture"] = texture_from_fraction(f["solid_fraction"])
        if "texture" in f and "mean_diameter_mm" in f:
            f.update(_lungrads(f))
        out.append(f)
    return out, nodules


def _measure(mask: np.ndarray, hu: np.ndarray, spacing) -> dict:
    """Measurements of the connected part of ``mask`` at (or nearest to) the patch centre."""
    return _measure_component(_centre_component(mask), hu, spacing)


def _measure_component(mask: np.ndarray, hu: np.ndarray, spacing) -> dict:
    if not mask.any():
        return {}
    size = measure_nodule(mask, spacing)
    f: dict = {
        "long_axis_mm": size.long_axis_mm,
        "short_axis_mm": size.short_axis_mm,
        "mean_diameter_mm": size.mean_diameter_mm,
        "volume_mm3": size.volume_mm3,
    }
    idx = np.argwhere(mask)
    f["mask_extent_mm"] = [float(v) for v in (idx.max(0) - idx.min(0) + 1) * np.asarray(spacing)]
    f["mask_centre_offset_mm"] = [
        float(v) for v in ((idx.max(0) + idx.min(0)) / 2 - np.asarray(mask.shape) // 2) * np.asarray(spacing)
    ]
    f["solid_fraction"] = float((hu[mask] > SOLID_HU).mean())
    solid = mask & (hu > SOLID_HU)
    if solid.any():
        s = measure_nodule(_centre_component(solid) if solid[tuple(np.asarray(mask.shape) // 2)] else solid, spacing)
        f["solid_mean_diameter_mm"] = min(s.mean_diameter_mm, size.mean_diameter_mm)
    else:
        f["solid_mean_diameter_mm"] = 0.0
    return f


def _lungrads(f: dict) -> dict:
    d = f["mean_diameter_mm"]
    if not (math.isfinite(d) and d > 0):
        return {}
    solid = f.get("solid_mean_diameter_mm")
    try:
        r = lungrads.lung_rads(f["texture"], d, solid if solid and solid > 0 else None)
    except ValueError:  # e.g. a part-solid nodule >= 6 mm without a measurable solid component
        return {}
    return {"lungrads": r.category, "lungrads_reason": r.reason}
