"""Intensity normalisation and augmentation shared by training and inference.

Everything works on torch tensors in array order ((N, C, z, y, x) or (N, C, y, x)); targets
follow `napari_resmtnet.model.losses` (centres and diameters in input voxels). Augmentation
is one random affine per sample (90° turns and flips in the axial plane, small rotation and
scaling, translation) applied with a single ``grid_sample``, then anisotropic-spacing
simulation, intensity window jitter and noise. Deterministic under a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    out_size: int = 40  # side of the training crop, voxels/pixels
    max_shift: float = 10.0  # random translation of the crop centre (voxels)
    flip: bool = True  # flips in the axial plane (y, x)
    rot90: bool = True  # 90° turns in the axial plane
    rotate_deg: float = 10.0  # small rotation in the axial plane
    scale: tuple = (0.9, 1.1)  # isotropic zoom
    aniso_prob: float = 0.3  # CT: simulate a coarser slice spacing
    aniso_factor: tuple = (1.5, 2.5)
    window_jitter: float = 0.05  # additive/multiplicative intensity jitter (normalised units)
    noise_std: float = 0.03

    def to_dict(self):
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["aniso_factor"] = list(self.aniso_factor)
        return d


def _rand(g, lo=0.0, hi=1.0):
    return float(torch.rand((), generator=g)) * (hi - lo) + lo


def random_affine(nd: int, in_size, cfg: AugmentConfig, g: torch.Generator, center=None):
    """Matrix (nd, nd) and offset (nd,) mapping output voxel -> input voxel (array order).

    The output crop of side ``cfg.out_size`` is centred on ``center`` (default: the input
    centre) shifted by up to ``max_shift``.
    """
    A = torch.eye(nd, dtype=torch.float64)
    plane = (nd - 2, nd - 1)  # axial plane (y, x)
    if cfg.rot90:
        k = int(torch.randint(0, 4, (), generator=g))
        for _ in range(k):
            R = torch.eye(nd, dtype=torch.float64)
            R[plane[0], plane[0]], R[plane[0], plane[1]] = 0, -1
            R[plane[1], plane[0]], R[plane[1], plane[1]] = 1, 0
            A = R @ A
    if cfg.rotate_deg:
        t = math.radians(_rand(g, -cfg.rotate_deg, cfg.rotate_deg))
        R = torch.eye(nd, dtype=torch.float64)
        R[plane[0], plane[0]], R[plane[0], plane[1]] = math.cos(t), -math.sin(t)
        R[plane[1], plane[0]], R[plane[1], plane[1]] = math.sin(t), math.cos(t)
        A = R @ A
    if cfg.flip:
        for ax in plane:
            if _rand(g) < 0.5:
                Fm = torch.eye(nd, dtype=torch.float64)
                Fm[ax, ax] = -1
                A = Fm @ A
    s = _rand(g, *cfg.scale)
    A = A / s  # output voxel step = 1/s input voxels: zoom by s
    in_c = torch.as_tensor(center if center is not None else [(n - 1) / 2 for n in in_size], dtype=torch.float64)
    shift = torch.tensor([_rand(g, -cfg.max_shift, cfg.max_shift) for _ in range(nd)], dtype=torch.float64)
    out_c = torch.full((nd,), (cfg.out_size - 1) / 2, dtype=torch.float64)
    t = in_c + shift - A @ out_c
    return A, t, s


def _theta(A, t, in_size, out_size):
    """Voxel-space affine (array order) -> affine_grid theta (normalised, x-first order)."""
    nd = A.shape[0]
    S_in = torch.as_tensor(in_size, dtype=torch.float64)
    S_out = torch.full((nd,), float(out_size), dtype=torch.float64)
    L = torch.diag(2 / S_in) @ A @ torch.diag(S_out / 2)
    off = torch.diag(2 / S_in) @ (A @ ((S_out - 1) / 2) + t) + 1 / S_in - 1
    L = L.flip(0).flip(1)
    off = off.flip(0)
    return torch.cat([L, off[:, None]], dim=1).float()


def augment_batch(images, targets, cfg: AugmentConfig, g: torch.Generator, modality="CT", centers=None, aux=None):
    """Random crops + augmentation of a batch of equally sized normalised images.

    images : (N, 1, *S) float tensor; targets : list of dicts (centers, diameters, malignant).
    ``centers`` optionally gives, per image, the point to centre the crop on (array order).
    ``aux`` optionally gives per image ``None`` or a dict of label volumes shaped like the
    image (e.g. ``mask``, ``ignore``); they follow the same crop and affine (bilinear, so
    they become soft) but no intensity change, and are returned in that image's target.
    Returns (N, 1, out, ..., out) tensor and transformed targets (nodules outside dropped).
    """
    N, nd = images.shape[0], images.dim() - 2
    in_size = images.shape[2:]
    thetas, new_targets = [], []
    for i in range(N):
        A, t, s = random_affine(nd, in_size, cfg, g, None if centers is None else centers[i])
        thetas.append(_theta(A, t, in_size, cfg.out_size))
        tg = targets[i]
        c_in = torch.as_tensor(np.asarray(tg["centers"], dtype=np.float64).reshape(-1, nd))
        c_out = torch.linalg.solve(A, (c_in - t).T).T
        inside = ((c_out >= 0) & (c_out <= cfg.out_size - 1)).all(1)
        nt = {
            "centers": c_out[inside].float(),
            "diameters": torch.as_tensor(np.asarray(tg["diameters"], dtype=np.float32).reshape(-1))[inside] * s,
            "malignant": torch.as_tensor(
                np.asarray(tg.get("malignant", [-1] * len(c_in)), dtype=np.float32).reshape(-1)
            )[inside],
        }
        if tg.get("extents") is not None:  # per-axis extents follow the affine: |A^-1| e
            e = torch.as_tensor(np.asarray(tg["extents"], dtype=np.float64).reshape(-1, nd))
            nt["extents"] = (e @ torch.linalg.inv(A).abs().T)[inside].float()
        if tg.get("attributes") is not None:  # per-nodule labels: unchanged by the affine
            nt["attributes"] = torch.as_tensor(np.asarray(tg["attributes"], dtype=np.float32).reshape(-1, 4))[inside]
        new_targets.append(nt)
    theta = torch.stack(thetas)
    size = (N, 1) + (cfg.out_size,) * nd
    grid = F.affine_grid(theta, size, align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if aux is not None:
        for i, a in enumerate(aux):
            if not a:
                continue
            names = sorted(a)
            vol = torch.stack([torch.as_tensor(np.asarray(a[k]), dtype=torch.float32) for k in names])[None]
            warped = F.grid_sample(vol, grid[i : i + 1], mode="bilinear", padding_mode="zeros", align_corners=False)[0]
            new_targets[i].update({k: warped[j] for j, k in enumerate(names)})
    if modality == "CT" and nd == 3 and cfg.aniso_prob > 0:
        for i in range(N):
            if _rand(g) < cfg.aniso_prob:
                f = _rand(g, *cfg.aniso_factor)
                z = max(2, int(round(cfg.out_size / f)))
                low = F.interpolate(
                    out[i : i + 1], size=(z, cfg.out_size, cfg.out_size), mode="trilinear", align_corners=False
                )
                out[i : i + 1] = F.interpolate(low, size=out.shape[2:], mode="trilinear", align_corners=False)
    if cfg.window_jitter:
        a = 1 + (torch.rand((N,) + (1,) * (nd + 1), generator=g) * 2 - 1) * cfg.window_jitter
        b = (torch.rand((N,) + (1,) * (nd + 1), generator=g) * 2 - 1) * cfg.window_jitter
        out = out * a + b
    if cfg.noise_std:
        out = out + torch.randn(out.shape, generator=g) * cfg.noise_std
    return out, new_targets
