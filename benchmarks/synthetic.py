"""Deterministic synthetic test images for the benchmarks (no patient data).

``synthetic_chest_ct``: a plausible chest CT in Hounsfield units -- air outside (-1000), a
body ellipse (+40 HU, noise), a spine and sternum (+400 HU), two lung ellipsoids (-850 HU)
in the upper part of the volume with vessel-like tubes and small spheres (+40 HU) and a few
nodules; ``synthetic_radiograph``: a 2048 x 2048 uint16 frontal chest film (dark lungs,
bright mediastinum and ribs). Built slab by slab so that a 512 x 512 x 600 volume needs
little more memory than its int16 array.
"""

from __future__ import annotations

import numpy as np


def synthetic_chest_ct(shape=(300, 512, 512), spacing=(1.25, 0.7, 0.7), seed: int = 0, slab: int = 16):
    """(int16 HU array (z, y, x), spacing (z, y, x), nodule centres in mm from the volume
    centre (z, y, x) with radii)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sz, sy, sx = spacing
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[:, None]
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[None, :]
    z_all = (np.arange(nz) - (nz - 1) / 2) * sz
    extent_z = nz * sz
    # lungs fill the upper ~2/3 of the field (a chest CT that includes the upper abdomen)
    lung_c = [(+0.12 * extent_z, -5.0, -78.0), (+0.12 * extent_z, -5.0, 78.0)]
    lung_r = (min(125.0, 0.34 * extent_z), 90.0, 60.0)
    body = (y / 120.0) ** 2 + (x / 165.0) ** 2 <= 1
    spine = ((y - 85.0) / 18.0) ** 2 + (x / 16.0) ** 2 <= 1
    sternum = ((y + 105.0) / 6.0) ** 2 + (x / 14.0) ** 2 <= 1
    # vessels: random line segments inside the lungs; balls: vessel cross-sections + nodules
    n_tubes, n_balls = 160, 400
    tubes = []
    for _ in range(n_tubes):
        c = np.array(lung_c[rng.integers(2)]) + rng.uniform(-0.6, 0.6, 3) * np.array(lung_r)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        tubes.append((c, d, rng.uniform(15, 60), rng.uniform(0.8, 2.5)))
    balls = []
    for _ in range(n_balls):
        c = np.array(lung_c[rng.integers(2)]) + rng.uniform(-0.7, 0.7, 3) * np.array(lung_r)
        balls.append((c, rng.uniform(0.8, 2.5)))
    nodules = []
    for k in range(6):
        c = np.array(lung_c[k % 2]) + rng.uniform(-0.5, 0.5, 3) * np.array(lung_r)
        r = float(rng.uniform(2.5, 12.0))
        nodules.append((c, r))
    out = np.empty(shape, np.int16)
    for z0 in range(0, nz, slab):
        zs = z_all[z0 : z0 + slab][:, None, None]
        hu = np.full((len(zs), ny, nx), -1000.0, np.float32)
        hu[np.broadcast_to(body, hu.shape)] = 40.0
        for cz, cy, cx in lung_c:
            lung = ((zs - cz) / lung_r[0]) ** 2 + ((y - cy) / lung_r[1]) ** 2 + ((x - cx) / lung_r[2]) ** 2 <= 1
            hu[lung] = -850.0
        hu[np.broadcast_to(spine, hu.shape)] = 400.0
        hu[np.broadcast_to(sternum, hu.shape)] = 400.0
        zlo, zhi = float(zs.min()), float(zs.max())
        for c, d, length, r in tubes:
            ends = np.array([c - d * length / 2, c + d * length / 2])
            if ends[:, 0].max() + r < zlo or ends[:, 0].min() - r > zhi:
                continue
            # distance from each voxel to the segment, on the bounding box only
            lo = ends.min(0) - r
            hi = ends.max(0) + r
            iy = slice(max(0, int((lo[1] / sy) + (ny - 1) / 2)), min(ny, int((hi[1] / sy) + (ny - 1) / 2) + 2))
            ix = slice(max(0, int((lo[2] / sx) + (nx - 1) / 2)), min(nx, int((hi[2] / sx) + (nx - 1) / 2) + 2))
            pz, py, px = zs, y[iy], x[:, ix]
            rel = [pz - ends[0][0], py - ends[0][1], px - ends[0][2]]
            seg = ends[1] - ends[0]
            t = np.clip((rel[0] * seg[0] + rel[1] * seg[1] + rel[2] * seg[2]) / (seg @ seg), 0, 1)
            dist2 = (rel[0] - t * seg[0]) ** 2 + (rel[1] - t * seg[1]) ** 2 + (rel[2] - t * seg[2]) ** 2
            sub = hu[:, iy, ix]
            sub[(dist2 <= r * r) & (sub < -500)] = 40.0
        for c, r in balls + nodules:
            if c[0] + r < zlo or c[0] - r > zhi:
                continue
            d2 = (zs - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
            hu[d2 <= r * r] = 40.0
        hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
        out[z0 : z0 + slab] = np.clip(hu, -1024, 3071).astype(np.int16)
    return out, tuple(spacing), [(tuple(map(float, c)), r) for c, r in nodules]


def synthetic_radiograph(size: int = 2048, seed: int = 0):
    """uint16 (size, size) frontal chest film, display convention (lungs dark), 12 bit."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img = np.full((size, size), 3000.0, np.float32)
    body = (yy / 0.48) ** 2 + (xx / 0.42) ** 2 <= 1
    img[body] = 2600
    for cx in (-0.18, 0.18):
        lung = ((yy + 0.02) / 0.3) ** 2 + ((xx - cx) / 0.14) ** 2 <= 1
        img[lung] = 900
    img[np.abs(xx) < 0.06] = 2800  # mediastinum and spine
    for k in range(10):  # ribs
        rib = np.abs(yy + 0.28 - k * 0.06 - 0.08 * xx**2 * 8) < 0.008
        img[rib & body] += 500
    d2 = (yy + 0.1) ** 2 + (xx - 0.2) ** 2
    img[d2 <= 0.012**2] += 700  # a nodule
    img += rng.normal(0, 40, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)
