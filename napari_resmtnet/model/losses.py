"""The joint loss of Res-MTNet: one weighted sum, every term reported.

Targets, one dict per image (input-voxel units, array order):
``centers`` (K, nd) float, ``diameters`` (K,) float, ``malignant`` (K,) float target in
[0, 1] (1 = malignant, 0 = benign, or a soft score from the LIDC rating) and -1 = unknown
(detection only, masked out of the malignancy term). Optional ``mask`` (*S) nodule mask and
``ignore`` (*S) region without a mask (other nodules), both in input voxels, for the
auxiliary segmentation term.

Terms: ``heatmap`` (penalty-reduced focal loss on the Gaussian centre heatmap, CenterNet),
``size`` (L1 on log-diameter at centre cells), ``offset`` (L1 on the sub-cell offset at
centre cells), ``malignancy`` (binary cross-entropy on the cells within the nodule's core,
labelled nodules only), ``segmentation`` (binary cross-entropy between the segmentation
logit and the fraction of each stride-4 cell inside the nodule mask, images with a mask
only, cells touching ``ignore`` left out), ``attributes`` (cross-entropy of the texture
logits plus binary cross-entropy of each binary characteristic, on the cells within the
nodule's core, where the readers gave the characteristic: a target's ``attributes`` is a
(K, 4) array of texture class index and three 0/1 flags, -1 unknown) and
``fine_segmentation`` (binary cross-entropy plus soft Dice between the full-resolution mask
logit and the warped nodule mask, ``ignore`` left out). ``loss`` = sum of ``w_<term> * term`` over the enabled heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import STRIDE


def _grid(grid_shape, device) -> torch.Tensor:
    """(*G, nd) cell coordinates of a stride-4 grid."""
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in grid_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _nodules_on_grid(t: dict, grid: torch.Tensor, cfg):
    """Each nodule of target ``t`` whose centre cell lies on ``grid``: its index ``k``, centre
    and diameter (cells), centre cell, and the Gaussian of the centre heatmap around it."""
    nd = grid.shape[-1]
    device = grid.device
    centres = torch.as_tensor(t["centers"], dtype=torch.float32, device=device).reshape(-1, nd) / STRIDE
    diams = torch.as_tensor(t["diameters"], dtype=torch.float32, device=device).reshape(-1) / STRIDE
    shape = torch.tensor(grid.shape[:-1], device=device)
    for k, (c, d) in enumerate(zip(centres, diams)):
        cell = torch.round(c).long()
        if (cell < 0).any() or (cell >= shape).any():
            continue
        sigma = max(cfg.min_sigma, float(d) / 4)
        yield k, c, d, cell, torch.exp(-((grid - c) ** 2).sum(-1) / (2 * sigma**2))


def _core(g: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """A nodule's core cells (its heatmap Gaussian >= 0.5, the centre cell included): where
    the per-nodule labels (malignancy, characteristics) are taught."""
    core = g >= 0.5
    core[tuple(cell.tolist())] = True
    return core


def attribute_targets(targets, grid_shape, cfg, device):
    """Dense stride-4 attribute targets: texture class (B, *G) long and binary flags
    (B, 3, *G) float, -1 where unknown, on each labelled nodule's core cells (as malignancy)."""
    B = len(targets)
    grid = _grid(grid_shape, device)
    tex = torch.full((B, *grid_shape), -1, dtype=torch.long, device=device)
    flags = torch.full((B, 3, *grid_shape), -1.0, device=device)
    for b, t in enumerate(targets):
        att = t.get("attributes")
        if att is None:
            continue
        att = torch.as_tensor(att, dtype=torch.float32, device=device).reshape(-1, 4)
        for k, _, _, cell, g in _nodules_on_grid(t, grid, cfg):
            a = att[k]
            if (a < 0).all():
                continue
            core = _core(g, cell)
            if a[0] >= 0:
                tex[b][core] = int(a[0])
            for j in range(3):
                if a[1 + j] >= 0:
                    flags[b, j][core] = a[1 + j]
    return tex, flags


def attribute_loss(
    logits: torch.Tensor, tex: torch.Tensor, flags: torch.Tensor, texture_weights=None
) -> torch.Tensor | None:
    terms = []
    lg = logits.float()
    known = tex >= 0
    if known.any():
        w = None if texture_weights is None else torch.as_tensor(texture_weights, dtype=torch.float32, device=lg.device)
        terms.append(F.cross_entropy(lg[:, :3].movedim(1, -1)[known], tex[known], weight=w))
    for j in range(3):
        k = flags[:, j] >= 0
        if k.any():
            terms.append(F.binary_cross_entropy_with_logits(lg[:, 3 + j][k], flags[:, j][k]))
    return sum(terms) / len(terms) if terms else None


def _mask_targets(targets: list, device):
    """The images with a nodule mask: their indices, (n, 1, *S) masks and the (n, 1, *S)
    regions to leave out (``ignore``, zeros where absent); None when no image has a mask."""
    have = [i for i, t in enumerate(targets) if t.get("mask") is not None]
    if not have:
        return None
    mask = torch.stack([torch.as_tensor(targets[i]["mask"], dtype=torch.float32) for i in have])[:, None]
    ign = torch.stack(
        [torch.as_tensor(targets[i].get("ignore", torch.zeros_like(mask[0, 0])), dtype=torch.float32) for i in have]
    )[:, None]
    return have, mask.to(device), ign.to(device)


def fine_segmentation_loss(logits: torch.Tensor, targets: list) -> torch.Tensor | None:
    """BCE + soft Dice of the full-resolution mask logit against each image's warped mask."""
    got = _mask_targets(targets, logits.device)
    if got is None:
        return None
    have, mask, ign = got
    mask = mask.clamp(0, 1)
    lg = logits[have].float()
    if lg.shape != mask.shape:
        raise ValueError(f"mask target {tuple(mask.shape)} does not match the mask map {tuple(lg.shape)}")
    keep = (ign < 0.5).float()
    bce = (F.binary_cross_entropy_with_logits(lg, mask, reduction="none") * keep).sum() / keep.sum().clamp(min=1.0)
    p = torch.sigmoid(lg) * keep
    dims = tuple(range(1, lg.dim()))
    inter = (p * mask).sum(dims)
    dice = 1 - (2 * inter + 1) / (p.sum(dims) + (mask * keep).sum(dims) + 1)
    return bce + dice.mean()


def build_targets(targets, grid_shape, cfg, device):
    """Dense stride-4 targets for a batch: heatmap, positive mask, size, offset, malignancy."""
    nd = len(grid_shape)
    B = len(targets)
    grid = _grid(grid_shape, device)
    heat = torch.zeros((B, *grid_shape), device=device)
    pos = torch.zeros((B, *grid_shape), dtype=torch.bool, device=device)
    per_axis = getattr(cfg, "size_per_axis", False)
    size = torch.zeros((B, nd, *grid_shape) if per_axis else (B, *grid_shape), device=device)
    offset = torch.zeros((B, nd, *grid_shape), device=device)
    mal = torch.full((B, *grid_shape), -1.0, device=device)
    for b, t in enumerate(targets):
        n = len(torch.as_tensor(t["diameters"]).reshape(-1))
        malig = torch.as_tensor(t.get("malignant", [-1] * n), dtype=torch.float32, device=device).reshape(-1)
        ext = t.get("extents")
        ext = (
            torch.as_tensor(ext, dtype=torch.float32, device=device).reshape(-1, nd) / STRIDE
            if ext is not None
            else None
        )
        for k, c, d, cell, g in _nodules_on_grid(t, grid, cfg):
            heat[b] = torch.maximum(heat[b], g)
            sel = (b,) + tuple(cell.tolist())
            heat[sel] = 1.0
            pos[sel] = True
            if per_axis:
                e = ext[k] if ext is not None else d.expand(nd)
                size[(b, slice(None)) + tuple(cell.tolist())] = torch.log(e.clamp(min=0.25))
            else:
                size[sel] = torch.log(d.clamp(min=0.25))
            offset[(b, slice(None)) + tuple(cell.tolist())] = c - cell.float()
            if malig[k] >= 0:
                mal[b][_core(g, cell)] = malig[k]
    return heat, pos, size, offset, mal


def focal_heatmap_loss(logits, heat, alpha=2.0, beta=4.0):
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg = 1 - pos
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p**alpha * (1 - heat) ** beta * neg
    n = pos.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n


def _per_cell(x: torch.Tensor, how: str) -> torch.Tensor:
    """(N, 1, *S) -> (N, 1, *ceil(S/4)): ``how`` ("avg" or "max") over the input voxels
    4j-2 .. 4j+2 of each stride-4 cell j (the cell is centred on voxel 4j)."""
    nd = x.dim() - 2
    pool = getattr(F, f"{how}_pool{nd}d")
    return pool(x, 2 * (STRIDE // 2) + 1, STRIDE, STRIDE // 2)


def occupancy(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, *S) mask -> fraction of each stride-4 cell inside it (see `_per_cell`)."""
    return _per_cell(mask, "avg")


def segmentation_loss(logits: torch.Tensor, targets: list) -> torch.Tensor | None:
    got = _mask_targets(targets, logits.device)
    if got is None:
        return None
    have, mask, ign = got
    occ = occupancy(mask.clamp(0, 1))
    keep = 1.0 - (_per_cell(ign, "max") > 0.01).float()
    lg = logits[have].float()
    if occ.shape != lg.shape:
        raise ValueError(f"segmentation target {tuple(occ.shape)} does not match the map {tuple(lg.shape)}")
    bce = F.binary_cross_entropy_with_logits(lg, occ, reduction="none")
    return (bce * keep).sum() / keep.sum().clamp(min=1.0)


def compute_loss(maps: dict, targets: list, cfg, input_shape) -> dict:
    """Dict of named loss terms and the joint ``loss``; disabled heads contribute zero."""
    hm = maps["heatmap"]
    grid_shape = tuple(hm.shape[2:])
    heat, pos, size_t, off_t, mal_t = build_targets(targets, grid_shape, cfg, hm.device)
    # every output stays in the graph (gradient 0 when a term is empty or disabled), so that
    # DistributedDataParallel sees all parameters used on every step
    zero = sum(m.sum() for m in maps.values()) * 0.0
    losses = {"heatmap": zero, "size": zero, "offset": zero, "malignancy": zero}
    if cfg.segmentation:
        losses["segmentation"] = zero
    if getattr(cfg, "attributes", False):
        losses["attributes"] = zero
    if getattr(cfg, "fine_segmentation", False):
        losses["fine_segmentation"] = zero
    if cfg.detection:
        losses["heatmap"] = focal_heatmap_loss(hm[:, 0].float(), heat, cfg.focal_alpha, cfg.focal_beta)
        if pos.any():
            if getattr(cfg, "size_per_axis", False):
                losses["size"] = F.l1_loss(maps["size"].float().movedim(1, -1)[pos], size_t.movedim(1, -1)[pos])
            else:
                losses["size"] = F.l1_loss(maps["size"][:, 0].float()[pos], size_t[pos])
            off_pred = maps["offset"].float().movedim(1, -1)[pos]
            losses["offset"] = F.l1_loss(off_pred, off_t.movedim(1, -1)[pos])
    if cfg.malignancy:
        known = mal_t >= 0
        if known.any():
            losses["malignancy"] = F.binary_cross_entropy_with_logits(
                maps["malignancy"][:, 0].float()[known], mal_t[known]
            )
    if cfg.segmentation:
        seg = segmentation_loss(maps["segmentation"], targets)
        if seg is not None:
            losses["segmentation"] = seg
    if getattr(cfg, "attributes", False):
        att = attribute_loss(
            maps["attributes"],
            *attribute_targets(targets, grid_shape, cfg, hm.device),
            texture_weights=cfg.texture_weights,
        )
        if att is not None:
            losses["attributes"] = att
    if getattr(cfg, "fine_segmentation", False) and "mask" in maps:
        fs = fine_segmentation_loss(maps["mask"], targets)
        if fs is not None:
            losses["fine_segmentation"] = fs
    losses["loss"] = (
        cfg.w_heatmap * losses["heatmap"]
        + cfg.w_size * losses["size"]
        + cfg.w_offset * losses["offset"]
        + cfg.w_malignancy * losses["malignancy"]
        + (cfg.w_segmentation * losses["segmentation"] if cfg.segmentation else 0.0)
        + (cfg.w_attributes * losses["attributes"] if "attributes" in losses else 0.0)
        + (cfg.w_fine_segmentation * losses["fine_segmentation"] if "fine_segmentation" in losses else 0.0)
    )
    return losses
