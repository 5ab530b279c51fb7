"""Second stage of Res-MTNet: false-positive reduction by a candidate classifier.

The detector proposes candidates (heatmap peaks); the candidate classifier
(`napari_resmtnet.model.network.CandidateClassifier`, part of the same network and the same
weights file) re-scores each from a patch centred on it. It is trained here, with the
detector frozen, on the detector's *own* candidates (hard-negative mining):

* on the training cubes: every candidate that hits no annotated nodule is a negative, the
  annotated nodules (and candidates on them) are positives;
* on the training whole scans (`napari_resmtnet.training.wholescan`): every candidate off the labelled
  lesions is a negative (mediastinum edges, hila, vessels, fissures, airways, ground glass),
  plus points of dense structure inside the lung mask;
* structure-free lung (noise only), so that noise blobs never pass.

Augmentation: flips and 90° turns, a shift of up to 2 voxels, thick-slice simulation (the
hard case of vessels on 5-8 mm slices), optionally intravenous contrast (`enhance`) and a
sharp kernel's noise, intensity jitter and noise. Batches are balanced
between positives and negatives; ``scan_negatives`` can fix the share of negatives drawn from
the whole scans (by default every negative candidate is equally likely: a fixed half did not
help on the validation scans). The final detection probability is
``p_det ** (1 - w) * p_fpr ** w`` with ``w = fpr_weight`` from the network config.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io.preprocess import CT_WINDOW, normalize_ct
from ..metrics import match_detections
from ..model import decode
from . import wholescan
from ..model.network import candidate_patches
from ..inference.predictor import Predictor

DEFAULTS = {
    "steps": 1500,
    "batch_size": 64,
    "lr": 1e-3,
    "floor": 0.02,
    "pos_fraction": 0.5,
    "shift": 2,
    "thick_prob": 0.5,
    "thick_factor": [1.5, 6.0],
    "noise_negatives": 0.05,
    "scan_negatives": None,
    "contrast_prob": 0.0,
    "contrast_hu": [250.0, 60.0],
    "noise_hu": 0.0,
}


@dataclass
class Sample:
    volume: int  # index into the list of normalised volumes
    centre: np.ndarray  # voxel (z, y, x)
    label: int
    scan: bool = False  # from a whole scan (not a cube)


def cube_candidates(model, records, floor: float, batch: int = 16):
    """Detector candidates on cubes: (volumes, samples). Positives: annotated nodules and the
    candidates hitting them; negatives: the other candidates."""

    vols, samples = [], []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            x = torch.from_numpy(np.stack([normalize_ct(r.array) for r in chunk]))[:, None]
            dets = decode(model.forward_maps(x), score_floor=floor, max_detections=30)
            for b, d in enumerate(dets):
                r = chunk[b]
                v = len(vols)
                vols.append(x[b, 0].clone())
                c = ((d["boxes"][:, :3] + d["boxes"][:, 3:]) / 2).numpy()
                m = match_detections(c, d["scores"].numpy(), r.centers, r.diameters)
                for k in range(len(c)):
                    if m[k] == -1:
                        samples.append(Sample(v, c[k], 0))
                    elif m[k] >= 0:
                        samples.append(Sample(v, c[k], 1))
                for cc in r.centers:
                    samples.append(Sample(v, np.asarray(cc, float), 1))
    return vols, samples


def scan_candidates(predictor, scans, spacing_mm: float, floor: float, n_dense: int = 300, seed: int = 0):
    """Detector candidates on whole training scans: (volumes, samples) on the model grid."""

    vols, samples = [], []
    pool = wholescan.negative_pool(scans, spacing_mm, None, n_random=n_dense, seed=seed)
    for ws, neg in zip(scans, pool):
        scan = ws.load()
        det = predictor.predict(scan).above(floor)
        c = det.centers_world_xyz() if len(det) else np.zeros((0, 3))
        m = wholescan.match_scan(c, ws.lesions)
        a = spacing_mm / np.asarray(scan.spacing, float)  # scan voxel = a * model voxel
        vox = scan.world_to_index(c[:, ::-1]) / a if len(c) else np.zeros((0, 3))
        v = len(vols)
        vols.append(torch.from_numpy(normalize_ct(neg.hu)))
        for k in range(len(vox)):
            samples.append(Sample(v, vox[k], int(m[k] >= 0)))
        for p in neg.points:
            if not len(neg.lesion_centres) or np.min(np.linalg.norm(neg.lesion_centres - p, axis=1)) > 20:
                samples.append(Sample(v, np.asarray(p, float), 0))
        for lc in neg.lesion_centres:
            samples.append(Sample(v, lc, 1))
    return vols, samples


def noise_patch(side: int, g: torch.Generator) -> torch.Tensor:
    """Structure-free lung: -860 HU with Gaussian noise (sigma 10-30 HU), sometimes against
    soft tissue (40 HU) along a random plane, normalised like CT input."""
    sigma = 10 + 20 * float(torch.rand((), generator=g))
    hu = -860 + sigma * torch.randn((side,) * 3, generator=g)
    if float(torch.rand((), generator=g)) < 0.5:
        n = torch.randn(3, generator=g)
        grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=torch.float32) - side / 2] * 3, indexing="ij"), -1)
        off = (float(torch.rand((), generator=g)) - 0.5) * side
        hu = torch.where(grid @ n / n.norm() > off, 40 + sigma * torch.randn((side,) * 3, generator=g), hu)
    return normalize_ct(hu)


#: One Hounsfield unit in the network's normalised input.
HU_UNIT = 2.0 / (CT_WINDOW[1] - CT_WINDOW[0])


def enhance(x: torch.Tensor, labels, opts: dict, g: torch.Generator) -> None:
    """Intravenous contrast, in place, on a share ``contrast_prob`` of the patches: soft tissue
    (a smooth step at -100 HU) gains up to ``contrast_hu[0]`` HU on a negative (vessels, the
    heart and the hila enhance by 150-300 HU) and up to ``contrast_hu[1]`` on a nodule (a
    nodule enhances by tens of HU), so that brightness alone does not tell the two apart but
    an enhanced vessel's shape seen end-on does not pass as a nodule. Calcified nodules stay
    positives, bright as they are."""
    step = float(normalize_ct(np.float32(-100.0)))  # -100 HU, normalised
    for i in range(len(x)):
        if float(torch.rand((), generator=g)) >= opts["contrast_prob"]:
            continue
        top = opts["contrast_hu"][1] if labels[i] == 1 else opts["contrast_hu"][0]
        gain = float(torch.rand((), generator=g)) * top * HU_UNIT
        soft = torch.sigmoid((x[i] - step) / (30.0 * HU_UNIT))
        x[i] = (x[i] + gain * soft).clamp(max=1.0)


def make_fpr_batch(vols, samples, pos, neg, n: int, side: int, opts: dict, g: torch.Generator):
    """Balanced, augmented batch of candidate patches: (N, 1, side^3) tensor, (N,) labels."""

    n_pos = int(round(opts["pos_fraction"] * n))
    n_noise = int(round(opts["noise_negatives"] * n))
    n_neg = n - n_pos - n_noise
    pick = [pos[int(torch.randint(len(pos), (), generator=g))] for _ in range(n_pos)]
    if opts["scan_negatives"] is None:  # every negative candidate equally likely
        every = neg["cube"] + neg["scan"]
        pick += [every[int(torch.randint(len(every), (), generator=g))] for _ in range(n_neg)]
    else:  # this share of the negatives from the whole scans
        n_scan = (
            int(round(opts["scan_negatives"] * n_neg)) if neg["scan"] and neg["cube"] else (n_neg if neg["scan"] else 0)
        )
        pick += [neg["scan"][int(torch.randint(len(neg["scan"]), (), generator=g))] for _ in range(n_scan)]
        pick += [neg["cube"][int(torch.randint(len(neg["cube"]), (), generator=g))] for _ in range(n_neg - n_scan)]
    patches, labels = [], []
    for s in pick:
        shift = (torch.rand(3, generator=g).numpy() * 2 - 1) * opts["shift"]
        patches.append(candidate_patches(vols[s.volume], [s.centre + shift], side)[0])
        labels.append(s.label)
    for _ in range(n_noise):
        patches.append(noise_patch(side, g)[None])
        labels.append(0)
    x = torch.stack(patches)
    for i in range(len(x)):  # flips and 90° turns in the axial plane, flip along z
        k = int(torch.randint(4, (), generator=g))
        xi = torch.rot90(x[i], k, dims=(2, 3))
        for ax in (1, 2, 3):
            if float(torch.rand((), generator=g)) < 0.5:
                xi = torch.flip(xi, (ax,))
        x[i] = xi
        if float(torch.rand((), generator=g)) < opts["thick_prob"]:
            f = (
                float(torch.rand((), generator=g)) * (opts["thick_factor"][1] - opts["thick_factor"][0])
                + opts["thick_factor"][0]
            )
            z = max(2, int(round(side / f)))
            low = F.interpolate(x[i : i + 1], size=(z, side, side), mode="area")
            x[i : i + 1] = F.interpolate(low, size=(side,) * 3, mode="trilinear", align_corners=False)
    if opts["contrast_prob"] > 0:
        enhance(x, labels, opts, g)
    if opts["noise_hu"] > 0:  # a sharp kernel's noise, up to noise_hu (sigma, HU) per patch
        sigma = torch.rand((len(x), 1, 1, 1, 1), generator=g) * opts["noise_hu"] * HU_UNIT
        x = x + torch.randn(x.shape, generator=g) * sigma
    a = 1 + (torch.rand((len(x), 1, 1, 1, 1), generator=g) * 2 - 1) * 0.05
    b = (torch.rand((len(x), 1, 1, 1, 1), generator=g) * 2 - 1) * 0.05
    x = x * a + b + torch.randn(x.shape, generator=g) * 0.02
    return x, torch.tensor(labels, dtype=torch.float32)


def train_fpr(cfg, model, train_recs, split: dict, out: Path, progress: bool = True) -> None:
    """Train ``model.fpr`` (the detector frozen) per ``cfg.fpr``; logs to ``out/log_fpr.jsonl``."""

    opts = {**DEFAULTS, **cfg.fpr}
    unknown = set(cfg.fpr) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fpr settings {sorted(unknown)}")
    g = torch.Generator().manual_seed(cfg.seed + 17)
    t0 = time.time()
    vols, samples = cube_candidates(model, train_recs, opts["floor"])
    neg_cfg = cfg.negatives or {}
    if neg_cfg.get("scans"):
        scans = wholescan.whole_scans(neg_cfg["scans"], split, splits=("train",))
        pred = Predictor(
            "CT",
            model=model,
            info={"threshold": opts["floor"], "spacing_mm": cfg.spacing_mm},
            score_floor=opts["floor"],
            max_detections=300,
            detector_only=True,
        )
        v2, s2 = scan_candidates(pred, scans, cfg.spacing_mm, opts["floor"], seed=cfg.seed)
        base = len(vols)
        vols += v2
        samples += [Sample(s.volume + base, s.centre, s.label, True) for s in s2]
    pos = [s for s in samples if s.label == 1]
    neg = {
        "scan": [s for s in samples if s.label == 0 and s.scan],
        "cube": [s for s in samples if s.label == 0 and not s.scan],
    }
    print(
        f"fpr: {len(pos)} positive, {len(neg['cube'])} cube and {len(neg['scan'])} whole-scan negative candidates "
        f"({time.time() - t0:.0f} s)",
        file=sys.stderr,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.fpr.parameters():
        p.requires_grad_(True)
    params = list(model.fpr.parameters())
    opt = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=1e-4)
    total = int(opts["steps"])
    side = model.config.fpr_patch
    log = open(out / "log_fpr.jsonl", "a")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="fpr", unit="step", file=sys.stderr)
    model.eval()
    model.fpr.to(memory_format=torch.channels_last_3d)
    model.fpr.train()
    for step in range(total):
        lr = opts["lr"] * (step + 1) / 50 if step < 50 else opts["lr"] * 0.5 * (1 + math.cos(math.pi * step / total))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = make_fpr_batch(vols, samples, pos, neg, int(opts["batch_size"]), side, opts, g)
        logit = model.fpr(x.contiguous(memory_format=torch.channels_last_3d))
        loss = F.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = float(((logit > 0).float() == y).float().mean())
        log.write(
            json.dumps(
                {
                    "step": step + 1,
                    "lr": lr,
                    "loss": round(float(loss.detach()), 5),
                    "acc": round(acc, 4),
                    "time": round(time.time() - t0, 1),
                }
            )
            + "\n"
        )
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.2f}")
    if bar:
        bar.close()
    log.close()
    model.fpr.to(memory_format=torch.contiguous_format)
    model.eval()
