"""Res-MTNet: a residual multi-task network for nodule detection and malignancy grading.

One network for CT volumes (``spatial_dims=3``) and radiographs (``spatial_dims=2``)::
    image ─ stem(s2) ─ stage1(s4) ─ stage2(s8) ─ stage3(s16)      shared ResNet backbone
                          └────────── top-down fusion to stride 4 ──▶ F
    F ─ det block ─┬─(+ 1x1 of mal)─ det block ─ heatmap, size, offset     detection branch
                   ╳  cross-task residual connections
    F ─ mal block ─┴─(+ 1x1 of det)─ mal block ─ malignancy logit map      malignancy branch

**Why anchor-free centre heatmaps** (CenterNet/CenterPoint style) rather than anchors:
lung nodules are compact, roughly spherical objects from 3 to 30 mm, so one centre plus one
diameter describes them; a heatmap needs no anchor sizes tuned to the data, no box matching,
and its peaks give one location per nodule where the malignancy map is read, which is what
couples the two tasks. Peaks are extracted with a max-pool, so decoding is vectorised.

Outputs at stride 4 (cell ``j`` is centred on input voxel ``4 j``):
``heatmap`` (1 ch, logit of "a nodule centre is here"), ``size`` (1 ch, log of the diameter
in input voxels), ``offset`` (``spatial_dims`` ch, sub-cell centre offset in cells),
``malignancy`` (1 ch, logit of "the nodule centred here is malignant"), and with
``segmentation=True`` ``segmentation`` (1 ch, logit of the fraction of the cell inside a
nodule): an auxiliary task on the malignancy branch, trained from nodule masks, that makes
the branch see the nodule's extent and margin rather than only its centre.

Training mode (``targets`` given) returns a dict of named losses (see `losses.py`); inference
returns per image a dict with ``boxes`` (corner boxes, array order, voxels of the input, see
`napari_resmtnet.boxes`), ``scores`` (detection probability) and ``malignancy`` (probability).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from .config import STRIDE
from .losses import compute_loss

#: Channels of the attribute head (``attributes=True``), read at a nodule's centre like the
#: malignancy logit: three texture logits (softmax over TEXTURE_CLASSES, the LIDC readers'
#: majority: texture 1 ground-glass, 2-4 part-solid, 5 solid) and three binary logits from the
#: readers' majority: calcified (any LIDC calcification pattern, code != 6), spiculated (LIDC
#: spiculation >= 3) and ill-defined margin (LIDC margin <= 3).
TEXTURE_CLASSES = ("ground-glass", "part-solid", "solid")
BINARY_ATTRIBUTES = ("calcified", "spiculated", "ill_defined_margin")
ATTRIBUTE_CHANNELS = len(TEXTURE_CLASSES) + len(BINARY_ATTRIBUTES)


@dataclass
class ResMTNetConfig:
    """Hyper-parameters of the network and its joint loss (no paths here)."""

    spatial_dims: int = 3
    in_channels: int = 1
    widths: tuple = (16, 32, 64, 96)  # stem (s2), stage1 (s4), stage2 (s8), stage3 (s16)
    blocks: tuple = (1, 2, 2)  # residual blocks in stage1..3
    head_width: int = 32
    detection: bool = True  # the detection head is trained/used
    malignancy: bool = True  # the malignancy head is trained/used
    cross_task: bool = True  # cross-task residual connections between branches
    segmentation: bool = False  # auxiliary nodule-occupancy head on the malignancy branch
    size_per_axis: bool = False  # size head gives one extent per axis (boxes follow the nodule)
    attributes: bool = False  # reader-characteristic heads on the malignancy branch (ATTRIBUTES)
    fine_segmentation: bool = False  # full-resolution nodule mask decoder on the malignancy branch
    seg_detail: int = 0  # width of the decoder's full-resolution path on the input (0: none)
    seg_aligned: bool = False  # decoder upsamples with each coarse cell on the voxel it is centred on
    fpr: bool = False  # second stage: candidate classifier on a patch around each peak
    fpr_patch: int = 32  # its input side (voxels at the model spacing)
    fpr_width: int = 16
    fpr_weight: float = 0.5  # final probability = p_det ** (1 - w) * p_fpr ** w
    # joint loss: weighted sum of the terms below
    w_heatmap: float = 1.0
    w_size: float = 0.5
    w_offset: float = 0.5
    w_malignancy: float = 1.0
    w_segmentation: float = 1.0
    w_attributes: float = 0.5
    texture_weights: tuple = (1.0, 1.0, 1.0)  # class weights of the texture term (TEXTURE_CLASSES order)
    w_fine_segmentation: float = 1.0
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    min_sigma: float = 0.75  # Gaussian sigma of the centre heatmap, in cells

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["blocks"] = list(self.blocks)
        d["texture_weights"] = list(self.texture_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ResMTNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("widths", "blocks", "texture_weights"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _conv(nd):
    return nn.Conv3d if nd == 3 else nn.Conv2d


def _norm(nd, c):
    # GroupNorm: batch sizes are small on a CPU and windows differ at inference.
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    """Basic residual block (two 3x3(x3) convolutions), projection shortcut when needed."""

    def __init__(self, nd, cin, cout, stride=1):
        super().__init__()
        Conv = _conv(nd)
        self.conv1 = Conv(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(nd, cout)
        self.conv2 = Conv(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(nd, cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(Conv(cin, cout, 1, stride, bias=False), _norm(nd, cout))

    def forward(self, x):
        y = F.relu(self.n1(self.conv1(x)), inplace=True)
        y = self.n2(self.conv2(y))
        s = x if self.short is None else self.short(x)
        return F.relu(y + s, inplace=True)


class Backbone(nn.Module):
    """Shared ResNet backbone with top-down fusion to a stride-4 feature map."""

    def __init__(self, cfg: ResMTNetConfig):
        super().__init__()
        nd, w = cfg.spatial_dims, cfg.widths
        Conv = _conv(nd)
        self.stem = nn.Sequential(
            Conv(cfg.in_channels, w[0], 3, 2, 1, bias=False), _norm(nd, w[0]), nn.ReLU(inplace=True)
        )
        stages = []
        for i, nb in enumerate(cfg.blocks):
            layers = [ResBlock(nd, w[i], w[i + 1], stride=2)]
            layers += [ResBlock(nd, w[i + 1], w[i + 1]) for _ in range(nb - 1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        hw = cfg.head_width
        self.lateral = nn.ModuleList([Conv(w[i + 1], hw, 1) for i in range(len(cfg.blocks))])
        self.fuse = nn.Sequential(Conv(hw, hw, 3, 1, 1, bias=False), _norm(nd, hw), nn.ReLU(inplace=True))
        self.mode = "trilinear" if nd == 3 else "bilinear"

    def forward(self, x, with_stem: bool = False):
        x = self.stem(x)
        stem = x
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        y = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            lat = self.lateral[i](feats[i])
            y = lat + F.interpolate(y, size=lat.shape[2:], mode=self.mode, align_corners=False)
        return (self.fuse(y), stem) if with_stem else self.fuse(y)


def upsample_2x_aligned(y: torch.Tensor, size, mode: str) -> torch.Tensor:
    """Upsample stride-2 features (a 3x3 stride-2 convolution with padding 1: cell i is centred
    on fine voxel 2i) to ``size`` so that fine voxel j reads coarse position j / 2. Plain
    ``interpolate(align_corners=False)`` reads (j - 0.5) / 2, putting every coarse cell half a
    fine voxel too far along each axis (1.5 input voxels for stride-4 features): a mask decoded
    from them comes out shifted, which flip-averaging hides and measurement does not forgive.
    Linear interpolation onto 2n - 1 points with the corners aligned gives exactly j / 2; the
    last plane (when ``size`` is 2n) repeats the edge."""
    n = y.shape[2:]
    inner = [2 * k - 1 for k in n]
    if any(s < i for s, i in zip(size, inner)):
        raise ValueError(f"target size {tuple(size)} is smaller than twice the features' {tuple(n)} less one")
    out = F.interpolate(y, size=inner, mode=mode, align_corners=True)
    pad = []
    for s, i in zip(reversed(list(size)), reversed(inner)):
        pad += [0, int(s) - i]
    return F.pad(out, pad, mode="replicate") if any(pad) else out


class SegmentationDecoder(nn.Module):
    """Full-resolution nodule mask from the malignancy branch (stride 4), the backbone's stem
    (stride 2) and the input itself: two upsampling steps, each fused with the finer features
    (a U-Net's last two levels). It runs on nodule-centred patches only (see
    `ResMTNet.forward_maps`), never over a whole scan."""

    def __init__(
        self,
        nd: int,
        hw: int,
        stem_width: int,
        in_channels: int = 1,
        width: int = 32,
        detail: int = 0,
        aligned: bool = False,
    ):
        super().__init__()
        Conv = _conv(nd)
        self.mode = "trilinear" if nd == 3 else "bilinear"
        self.aligned = aligned
        self.up1 = nn.Sequential(
            Conv(hw + stem_width, width, 3, 1, 1, bias=False), _norm(nd, width), nn.ReLU(inplace=True)
        )
        # ``detail``: two 3x3 convolutions on the input at full resolution, so the last level
        # sees the nodule's edge in the image itself (a 5-voxel view), not only the
        # interpolated stride-2 features (an edge blurred over ~4 voxels)
        self.detail = None
        if detail:
            self.detail = nn.Sequential(
                Conv(in_channels, detail, 3, 1, 1, bias=False),
                _norm(nd, detail),
                nn.ReLU(inplace=True),
                Conv(detail, detail, 3, 1, 1, bias=False),
                _norm(nd, detail),
                nn.ReLU(inplace=True),
            )
        self.up2 = nn.Sequential(
            Conv(width + in_channels + detail, width // 2, 3, 1, 1, bias=False),
            _norm(nd, width // 2),
            nn.ReLU(inplace=True),
            Conv(width // 2, width // 2, 3, 1, 1, bias=False),
            _norm(nd, width // 2),
            nn.ReLU(inplace=True),
        )
        self.out = Conv(width // 2, 1, 1)

    def _up(self, y, size):
        if not self.aligned:
            return F.interpolate(y, size=size, mode=self.mode, align_corners=False)
        return upsample_2x_aligned(y, size, self.mode)

    def forward(self, m, stem, x):
        y = self._up(m, stem.shape[2:])
        y = self.up1(torch.cat([y, stem], 1))
        y = self._up(y, x.shape[2:])
        parts = [y, x] if self.detail is None else [y, x, self.detail(x)]
        return self.out(self.up2(torch.cat(parts, 1)))


class ResMTNet(nn.Module):
    """Residual multi-task network: shared backbone, detection and malignancy branches.

    Parameters
    ----------
    config : ResMTNetConfig
    backbone : nn.Module, optional
        Replaces the default `Backbone`; must map (N, C, *S) to (N, head_width, *S/4).
    """

    def __init__(self, config: ResMTNetConfig | None = None, backbone: nn.Module | None = None):
        super().__init__()
        cfg = config or ResMTNetConfig()
        if cfg.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {cfg.spatial_dims}")
        if not (cfg.detection or cfg.malignancy):
            raise ValueError("at least one of detection / malignancy must be enabled")
        self.config = cfg
        nd, hw = cfg.spatial_dims, cfg.head_width
        Conv = _conv(nd)
        self.backbone = backbone or Backbone(cfg)
        self.det1, self.det2 = ResBlock(nd, hw, hw), ResBlock(nd, hw, hw)
        self.mal1, self.mal2 = ResBlock(nd, hw, hw), ResBlock(nd, hw, hw)
        if cfg.cross_task:
            self.mal_to_det = Conv(hw, hw, 1)
            self.det_to_mal = Conv(hw, hw, 1)
            for m in (self.mal_to_det, self.det_to_mal):  # start as identity branches
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.heatmap = Conv(hw, 1, 1)
        self.size = Conv(hw, nd if cfg.size_per_axis else 1, 1)
        self.offset = Conv(hw, nd, 1)
        self.malignancy_head = Conv(hw, 1, 1)
        if cfg.segmentation:
            self.segmentation_head = Conv(hw, 1, 1)
        if cfg.attributes:
            self.attribute_head = Conv(hw, ATTRIBUTE_CHANNELS, 1)
        if cfg.fine_segmentation:
            if backbone is not None:
                raise ValueError("fine_segmentation needs the default backbone (its stem features)")
            self.seg_decoder = SegmentationDecoder(
                nd, hw, cfg.widths[0], cfg.in_channels, detail=cfg.seg_detail, aligned=cfg.seg_aligned
            )
        nn.init.constant_(self.heatmap.bias, -4.6)  # prior p = 0.01, as in focal-loss detectors
        nn.init.constant_(self.size.bias, 1.0)
        if cfg.fpr:
            self.fpr = CandidateClassifier(nd, cfg.fpr_width)

    @torch.no_grad()
    def combine(self, p_det: torch.Tensor, p_fpr: torch.Tensor) -> torch.Tensor:
        """Final detection probability from the detector's and the second stage's."""
        w = float(self.config.fpr_weight)
        return p_det.clamp_min(1e-6) ** (1 - w) * p_fpr.clamp_min(1e-6) ** w

    @torch.no_grad()
    def rescore(self, volume: torch.Tensor, centres_vox, batch: int = 64) -> torch.Tensor:
        """Second-stage probability that each candidate (centre in voxels of ``volume``,
        array order) is a nodule, from a ``fpr_patch`` patch around it; (K,) tensor.
        ``volume``: normalised (*S) or (1, *S) input at the model spacing."""
        if not self.config.fpr:
            raise RuntimeError("this model has no second stage (fpr=False)")
        out = []
        for i in range(0, len(centres_vox), batch):
            p = candidate_patches(volume, centres_vox[i : i + batch], self.config.fpr_patch)
            p = p.to(next(self.parameters()).device)
            out.append(torch.sigmoid(self.fpr(p).float()).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    # -- raw maps --------------------------------------------------------------------------
    def forward_maps(self, x: torch.Tensor, full_resolution: bool = False) -> dict:
        """(N, C, *S) -> dict of stride-4 maps: heatmap, size, offset, malignancy (logits),
        ``attributes`` when the model has them; with ``full_resolution`` (and a
        ``fine_segmentation`` model) also ``mask``, the nodule-mask logit at the input's
        resolution (for nodule-centred patches: it is not computed over whole scans)."""
        fine = full_resolution and self.config.fine_segmentation
        f = self.backbone(x, with_stem=True) if fine else self.backbone(x)
        if fine:
            f, stem = f
        d = self.det1(f)
        m = self.mal1(f)
        if self.config.cross_task:
            d, m = d + self.mal_to_det(m), m + self.det_to_mal(d)
        d = self.det2(d)
        m = self.mal2(m)
        maps = {
            "heatmap": self.heatmap(d),
            "size": self.size(d),
            "offset": self.offset(d),
            "malignancy": self.malignancy_head(m),
        }
        if self.config.segmentation:
            maps["segmentation"] = self.segmentation_head(m)
        if self.config.attributes:
            maps["attributes"] = self.attribute_head(m)
        if fine:
            maps["mask"] = self.seg_decoder(m, stem, x)
        return maps

    def forward(self, images: torch.Tensor, targets: list | None = None):
        """Training (``targets`` given): dict of named losses incl. ``loss`` (the joint sum).

        Inference: list (one per image) of dicts ``boxes`` (K, 2*nd corner boxes in input
        voxels), ``scores`` (K,), ``malignancy`` (K,).
        """
        maps = self.forward_maps(images, full_resolution=targets is not None)
        if targets is not None:
            return compute_loss(maps, targets, self.config, images.shape[2:])
        return decode(maps)

    @property
    def stride(self) -> int:
        return STRIDE


@torch.no_grad()
def decode(maps: dict, score_floor: float = 0.02, max_detections: int = 100, kernel: int = 3) -> list:
    """Peaks of the centre heatmap -> per-image detections (corner boxes in input voxels).

    A cell is a peak when it equals the max of its ``kernel``-neighbourhood (vectorised
    max-pool suppression), its probability is at least ``score_floor``; the top
    ``max_detections`` are kept.
    """
    hm = torch.sigmoid(maps["heatmap"].float())
    nd = hm.dim() - 2
    pool = F.max_pool3d if nd == 3 else F.max_pool2d
    peaks = (hm == pool(hm, kernel, 1, kernel // 2)) & (hm >= score_floor)
    out = []
    for b in range(hm.shape[0]):
        idx = peaks[b, 0].nonzero()  # (K, nd) cell indices
        scores = hm[b, 0][peaks[b, 0]]
        if len(scores) > max_detections:
            top = torch.topk(scores, max_detections).indices
            idx, scores = idx[top], scores[top]
        sel = tuple(idx.T)
        off = maps["offset"][b][(slice(None),) + sel].T.float()  # (K, nd)
        centres = (idx.float() + off) * STRIDE
        size = maps["size"][b]
        if size.shape[0] == nd:  # per-axis extents (size_per_axis)
            diam = torch.exp(size[(slice(None),) + sel].T.float()).clamp(1.0, 100.0) * STRIDE
        else:
            diam = torch.exp(size[0][sel].float()).clamp(1.0, 100.0)[:, None].expand(-1, nd) * STRIDE
        mal = torch.sigmoid(maps["malignancy"][b, 0][sel].float())
        boxes = torch.cat([centres - diam / 2, centres + diam / 2], dim=1)
        order = torch.argsort(scores, descending=True)
        out.append({"boxes": boxes[order], "scores": scores[order], "malignancy": mal[order]})
    return out


PATCH = 49  # 4k+1 voxels: flipping the input flips the stride-4 grid exactly onto itself


def _flip_sets(nd: int):
    import itertools

    axes = list(range(2, 2 + nd))
    return [list(c) for r in range(nd + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def malignancy_tta(model: "ResMTNet", patches: torch.Tensor) -> torch.Tensor:
    """Malignancy probability of the nodule at the centre of each patch, averaged over flips.

    ``patches``: (N, 1, 49, 49[, 49]) normalised input centred on the nodules (see
    `centre_patches`). The centre voxel 24 is cell 6 of the stride-4 grid, and with a side
    of 4k+1 every flip maps that cell onto itself, so the 2^nd flipped passes read the same
    location. Logits are averaged, then turned into a probability.
    """
    nd = patches.dim() - 2
    c = (PATCH // 2) // STRIDE
    logits = []
    for axes in _flip_sets(nd):
        x = torch.flip(patches, axes) if axes else patches
        m = model.forward_maps(x)["malignancy"]
        logits.append(m[(slice(None), 0) + (c,) * nd].float())
    return torch.sigmoid(torch.stack(logits).mean(0))


def centre_patches(volume: torch.Tensor, centres_vox, pad_value: float = -1.0) -> torch.Tensor:
    """(N, 1, 49, ...) patches of a normalised (1, *S) or (*S) volume around integer-rounded
    centres (array order, voxels); regions outside the volume are filled with ``pad_value``
    (air after CT normalisation)."""
    vol = volume.reshape(volume.shape[-len(centres_vox[0]) :]) if len(centres_vox) else volume
    nd = vol.dim()
    h = PATCH // 2
    padded = F.pad(vol[None, None], (h, h) * nd, value=pad_value)[0, 0]
    out = []
    for c in centres_vox:
        idx = [int(round(float(v))) for v in c]
        idx = [min(max(i, 0), s - 1) for i, s in zip(idx, vol.shape)]
        sl = tuple(slice(i, i + PATCH) for i in idx)  # padded coords: i - h + h
        out.append(padded[sl])
    if not out:
        return torch.zeros((0, 1) + (PATCH,) * nd)
    return torch.stack(out)[:, None]


class CandidateClassifier(nn.Module):
    """Second stage (false-positive reduction, as in the LUNA16 FPR track): a small residual
    network that re-scores one candidate from a patch centred on it, which sees the 3D context
    (a vessel running through, the pleura, a fissure) that the stride-4 heatmap cell judges
    only locally. Patch (N, 1, P, P[, P]) -> logit (N,)."""

    def __init__(self, nd: int, width: int = 16):
        super().__init__()
        Conv = _conv(nd)
        w = width
        self.stem = nn.Sequential(Conv(1, w, 3, 1, 1, bias=False), _norm(nd, w), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            ResBlock(nd, w, 2 * w, 2),
            ResBlock(nd, 2 * w, 4 * w, 2),
            ResBlock(nd, 4 * w, 6 * w, 2),
            ResBlock(nd, 6 * w, 6 * w),
        )
        self.head = nn.Sequential(nn.Linear(12 * w, 4 * w), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(4 * w, 1))

    def forward(self, x):
        f = self.blocks(self.stem(x)).flatten(2)
        f = torch.cat([f.mean(-1), f.amax(-1)], dim=1)
        return self.head(f)[:, 0]


def candidate_patches(volume: torch.Tensor, centres_vox, side: int = 32) -> torch.Tensor:
    """(K, 1, side, ...) patches of a normalised (*S) / (1, *S) volume, the candidate at voxel
    ``side // 2`` (rounded centres, array order); outside the volume the nearest edge value
    (replicate), as the sliding windows pad the scan."""
    nd = len(centres_vox[0]) if len(centres_vox) else volume.dim()
    vol = volume.reshape(volume.shape[-nd:])
    if not len(centres_vox):
        return torch.zeros((0, 1) + (side,) * nd)
    h = side // 2
    c = torch.as_tensor(np.asarray(centres_vox, dtype=np.float64)).round().long()
    lo = c - h
    out = torch.empty((len(c), 1) + (side,) * nd, dtype=vol.dtype)
    shape = torch.tensor(vol.shape)
    for k in range(len(c)):
        if ((lo[k] >= 0) & (lo[k] + side <= shape)).all():
            out[k, 0] = vol[tuple(slice(int(a), int(a) + side) for a in lo[k])]
        else:
            idx = [torch.clamp(torch.arange(int(a), int(a) + side), 0, int(n) - 1) for a, n in zip(lo[k], shape)]
            out[k, 0] = vol[torch.meshgrid(*idx, indexing="ij")]
    return out
