"""Evaluation on the validation split: FROC/CPM detection, malignancy metrics, baselines.

    resmtnet-evaluate [--modality CT] [--weights W ...] [--data D] [--json out.json] [--markdown out.md]

Without ``--weights`` the bundled weights of the modality are evaluated. The validation split
is the one recorded in the (first) weights file, so the numbers are on series the model never
saw. Several ``--weights`` give one row each (the ablation); all must share the split.

Detection: a prediction *hits* a true nodule when its centre lies within max(radius, 5 mm)
of the true centre; each true nodule is counted once (further hits on it are neither true nor
false positives, as in the LUNA16 evaluation). Sensitivity is read at 1/8, 1/4, ..., 8 false
positives per image (cube or radiograph); the CPM-style score is their mean.

Malignancy (benign = LIDC 1-2, malignant = 4-5): accuracy at p = 0.5, ROC AUC and the
confusion matrix on the labelled nodules that are hit at the operating threshold. A model
without a detection head is read at the true centres instead. Baselines on the same split:
the diameter-only rule (threshold chosen on the train split) and the majority class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..metrics import (
    detection_f1,
    diameter_rule,
    froc,
    malignancy_metrics,
    match_detections,
    roc_auc,
    threshold_at_fp,
)
from ..io.preprocess import normalize_ct
from ..inference.characterise import MAX_CHARACTERISED, characterise_patches
from ..measurements import MIN_NODULE_MM, dice, smaller_than_nodule
from ..training import readers as R
from ..training.wholescan import evaluate_scans, fp_per_scan_at, whole_scans
from ..inference.predictor import Predictor
from ..inference.weights import build_model, bundled_entry, load_checkpoint, sha256_of
from ..files import NoduleFileError, atomic_write_texts

# --- running a model over records ------------------------------------------------------------


def _spacing(rec) -> float:
    return float(getattr(rec, "spacing", 1.0))


def model_outputs(model, records, modality: str, batch_size: int = 8, tta: bool = False, tta_floor: float = 0.05):
    """Raw maps decoded per record: list of dict(centres, scores, malignancy, mal_map, mal_truth).

    CT records are whole 50 mm cubes (1 mm); CXR records provide ``model_input()``. With
    ``tta`` the malignancy of each detection scoring at least ``tta_floor`` (and the value at
    the true centre) is re-read with `model.malignancy_tta` (flip-averaged, patch centred on
    the detection). This is an analysis option; the `Predictor` reads the map once.
    """
    import torch

    from ..model import centre_patches, decode, malignancy_tta  # lazy: the network imports torch

    outs = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            if modality == "CT":
                x = torch.from_numpy(np.stack([normalize_ct(r.array) for r in chunk]))[:, None]
            else:
                x = torch.from_numpy(np.stack([r.model_input() for r in chunk]))[:, None]
            maps = model.forward_maps(x)
            dets = decode(maps, score_floor=0.01, max_detections=50)
            second = bool(getattr(model.config, "fpr", False))
            for b, d in enumerate(dets):
                nd = x.dim() - 2
                rec = chunk[b]
                c = ((d["boxes"][:, :nd] + d["boxes"][:, nd:]) / 2).numpy()
                sizes = (d["boxes"][:, nd:] - d["boxes"][:, :nd]).numpy()
                stages = None
                if second and len(c):  # the second stage re-scores every candidate, as the Predictor does
                    p_fpr = model.rescore(x[b, 0], c)
                    stages = {"detector": d["scores"].numpy(), "second_stage": p_fpr.numpy()}
                    d["scores"] = model.combine(d["scores"], p_fpr)
                mal = d["malignancy"].numpy().copy()
                mal_map = torch.sigmoid(maps["malignancy"][b, 0]).numpy()
                truth = rec.centers[rec.main] if len(rec.centers) else None
                mal_truth = mal_at(mal_map, truth) if truth is not None else float("nan")
                if tta:
                    sel = np.nonzero(d["scores"].numpy() >= tta_floor)[0]
                    pts = [c[k] for k in sel] + ([truth] if truth is not None else [])
                    if pts:
                        probs = malignancy_tta(model, centre_patches(x[b, 0], pts)).numpy()
                        mal[sel] = probs[: len(sel)]
                        if truth is not None:
                            mal_truth = float(probs[-1])
                outs.append(
                    {
                        "centres": c,
                        "sizes": sizes,
                        "scores": d["scores"].numpy(),
                        "malignancy": mal,
                        "stages": stages,
                        "mal_map": mal_map,
                        "mal_truth": mal_truth,
                    }
                )
    return outs


def drop_smaller_than_nodules(model, records, outs, threshold: float, min_nodule_mm: float = MIN_NODULE_MM):
    """``outs`` without the candidates at or above ``threshold`` whose segmented mask is
    smaller than a ``min_nodule_mm`` sphere, as `Predictor` drops them; and how many went
    (``{"true": .., "false": ..}`` positives by `match_detections`), or None (no mask decoder)."""
    import torch

    from ..model.network import centre_patches  # lazy: the network imports torch

    if not getattr(model.config, "fine_segmentation", False) or min_nodule_mm <= 0:
        return outs, None
    new, gone = [], {"true": 0, "false": 0}
    for r, o in zip(records, outs):
        sel = np.nonzero(o["scores"] >= threshold)[0][:MAX_CHARACTERISED]
        if not len(sel):
            new.append(o)
            continue
        cs = [o["centres"][k] for k in sel]
        with torch.inference_mode():
            found, _ = characterise_patches(model, centre_patches(torch.from_numpy(normalize_ct(r.array)), cs), cs, 1.0)
        small = [k for k, f in zip(sel, found) if smaller_than_nodule(f.get("volume_mm3"), min_nodule_mm)]
        if not small:
            new.append(o)
            continue
        sp = _spacing(r)
        m = match_detections(o["centres"] * sp, o["scores"], r.centers * sp, np.asarray(r.diameters) * sp)
        for k in small:
            gone["true" if m[k] >= 0 else "false"] += 1
        keep = np.setdiff1d(np.arange(len(o["scores"])), small)
        kept = {key: o[key][keep] for key in ("centres", "sizes", "scores", "malignancy")}
        if o.get("stages"):
            kept["stages"] = {name: v[keep] for name, v in o["stages"].items()}
        new.append({**o, **kept})
    return new, gone


def mal_at(mal_map, centre_vox, stride=4):
    cell = np.clip(np.round(np.asarray(centre_vox) / stride).astype(int), 0, np.array(mal_map.shape) - 1)
    return float(mal_map[tuple(cell)])


def evaluate_model(
    model, cfg_net: dict, records, modality: str, threshold: float | None = None, tta: bool = False
) -> dict:
    """Detection and malignancy metrics of one model on ``records``."""
    outs = model_outputs(model, records, modality, tta=tta)
    res: dict = {"n_images": len(records)}
    labelled = [(k, r) for k, r in enumerate(records) if r.label in (0, 1)]
    if cfg_net.get("detection", True):
        per_image, n_truth = _per_image(records, outs)
        fr = froc(per_image, n_truth)
        if threshold is None:
            threshold = threshold_at_fp(fr, 0.25)
        res["detection"] = {k: v for k, v in fr.items() if k != "curve"}
        res["detection"]["n_nodules"] = n_truth
        # the operating point as the plugin shows it: candidates whose own mask is smaller
        # than a nodule are dropped there (`Predictor(min_nodule_mm=...)`); the FROC above is
        # the network's scores alone
        outs, dropped = drop_smaller_than_nodules(model, records, outs, threshold) if modality == "CT" else (outs, None)
        if dropped is not None:
            per_image, _ = _per_image(records, outs)
        res["detection"]["operating_point"] = detection_f1(per_image, n_truth, threshold)
        if dropped is not None:
            res["detection"]["operating_point"]["below_min_size"] = dropped
        res["threshold"] = threshold
        res["detection"]["sizes"] = size_errors(records, outs, per_image, threshold)
        if cfg_net.get("malignancy", True):
            res["malignancy"] = _malignancy_on_hits(records, outs, per_image, threshold, "label")
            if any(getattr(r, "reader_means", None) is not None for r in records):
                res["malignancy_readers_mean"] = _malignancy_on_hits(records, outs, per_image, threshold, "label_mean")
    elif cfg_net.get("malignancy", True):
        ys = [r.label for _, r in labelled]
        ps = [outs[k]["mal_truth"] for k, r in labelled]
        res["malignancy"] = malignancy_metrics(ys, ps)
        res["malignancy"]["read_at"] = "true nodule centres (no detection head)"
    return res


def _malignancy_on_hits(records, outs, per_image, threshold: float, label: str) -> dict:
    """Malignancy metrics on the labelled main nodules detected at ``threshold``; ``label``:
    the record attribute holding the truth ("label": LIDC max vote 1-2 vs 4-5; "label_mean":
    the readers' mean < 3 vs > 3)."""
    ys, ps, n_missed = [], [], 0
    for k, r in enumerate(records):
        y = getattr(r, label, -1)
        if y not in (0, 1):
            continue
        s, m = per_image[k]
        hit = np.nonzero((m == r.main) & (s >= threshold))[0]
        if len(hit) == 0:
            n_missed += 1
            continue
        ys.append(y)
        ps.append(float(outs[k]["malignancy"][hit[np.argmax(s[hit])]]))
    res = malignancy_metrics(ys, ps)
    res["labelled_missed"] = n_missed
    res["read_at"] = "detected nodules (hits at the operating threshold)"
    res["labels"] = {
        "label": "LIDC max vote, 1-2 benign vs 4-5 malignant",
        "label_mean": "every reader's mean, < 3 benign vs > 3 malignant",
    }[label]
    return res


def size_errors(records, outs, per_image, threshold: float) -> dict:
    """Box size against the truth for each main nodule detected at ``threshold``: relative
    error of the diameter (mean of the box's extents, as the nodule table shows it) against
    the annotated diameter, and per-axis error (mm) against the extent of the nodule's mask."""
    rel, axis_err = [], []
    for r, o, (s, m) in zip(records, outs, per_image):
        if not hasattr(r, "extents"):  # radiographs: no masks, no per-axis truth
            continue
        hit = np.nonzero((m == r.main) & (s >= threshold))[0]
        if not len(hit):
            continue
        k = hit[np.argmax(s[hit])]
        sz = np.asarray(o["sizes"][k], float) * _spacing(r)
        rel.append(abs(sz.mean() - r.diameter) / r.diameter)
        ext = r.extents()[r.main] if hasattr(r, "extents") else None
        if ext is not None and r.mask is not None:
            axis_err.append(np.abs(sz - ext))
    ae = np.asarray(axis_err).reshape(-1, 3) if axis_err else np.zeros((0, 3))
    return {
        "n": len(rel),
        "median_rel_diameter_error": float(np.median(rel)) if rel else float("nan"),
        "within_20pct": float(np.mean(np.asarray(rel) <= 0.2)) if rel else float("nan"),
        "median_abs_extent_error_mm_zyx": np.median(ae, 0).round(2).tolist() if len(ae) else [],
    }


def truth_patch(record, centre) -> np.ndarray:
    """A cube's nodule mask on the patch grid the mask decoder reads around ``centre`` (model
    voxels; `model.network.centre_patches`), as a bool array; outside the cube: not nodule."""
    import torch

    from ..model.network import centre_patches  # lazy: the network imports torch

    mask = torch.from_numpy((record.mask > 0).astype(np.float32))
    return centre_patches(mask, [centre], pad_value=0.0)[0, 0].numpy() > 0


def findings_metrics(model, records, data=None, tta: bool = False) -> dict | None:
    """Characteristics and segmentation of a CT model with those heads, on the validation
    cubes, read at each cube's true main-nodule centre (so detection misses do not mix in):
    * each characteristic's accuracy against the readers' majority (texture: 3 classes;
      calcified, spiculated >= 3, ill-defined margin <= 3: binary, with the AUC and the
      balanced accuracy since positives are rare), beside the inter-reader agreement on the
      same cubes (how often one reader agrees with the others' majority, `readers`);
    * the mask: Dice against the cube's nodule mask, relative volume error, and the diameter
      error of the mask's mean extent against the annotated diameter (what a box sized from
      the mask would show).
    Returns None for a model without the heads."""
    from ..model.network import BINARY_ATTRIBUTES, TEXTURE_CLASSES, centre_patches  # lazy: the network imports torch

    cfg = model.config
    if cfg.spatial_dims != 3 or not (cfg.attributes or cfg.fine_segmentation):
        return None
    import torch

    model.eval()
    truth_att, pred_att, dices, vol_err, diam_err = [], [], [], [], []
    for r in records:
        if not len(r.centers):
            continue
        c = np.asarray(r.centers[r.main], float)
        vol = torch.from_numpy(normalize_ct(r.array))
        findings, nodules = characterise_patches(model, centre_patches(vol, [c]), [c], 1.0, tta=tta)
        f = findings[0]
        if cfg.attributes and r.attributes is not None:
            truth_att.append(r.attributes[r.main])
            head = f.get("texture_head", f["texture"])
            pred_att.append(
                [TEXTURE_CLASSES.index(f["texture"])]
                + [f[k] for k in BINARY_ATTRIBUTES]
                + [TEXTURE_CLASSES.index(head)]
            )
        if nodules is not None and r.mask is not None:
            pm = nodules[0]
            truth = truth_patch(r, c)
            if not truth.any():
                continue
            dices.append(dice(pm, truth))
            vol_err.append(abs(float(pm.sum()) - float(truth.sum())) / float(truth.sum()))
            if "mask_extent_mm" in f:
                diam_err.append(abs(np.mean(f["mask_extent_mm"]) - r.diameter) / r.diameter)
    out: dict = {"read_at": "true main-nodule centres of the validation cubes", "tta": bool(tta)}
    if truth_att:
        t, pr = np.asarray(truth_att, float), np.asarray(pred_att, float)
        heads = {}
        k = t[:, 0] >= 0
        heads["texture_head"] = {
            "n": int(k.sum()),
            "accuracy": float((pr[k, 4] == t[k, 0]).mean()),
            "majority_class_accuracy": float(np.mean(t[k, 0] == np.bincount(t[k, 0].astype(int)).argmax())),
            "note": "the texture head's own call; 'texture' is the plugin's (from the mask's solid fraction "
            "where the model segments)",
        }
        heads["texture"] = {
            "n": int(k.sum()),
            "accuracy": float((pr[k, 0] == t[k, 0]).mean()),
            "confusion": [[int(((t[k, 0] == i) & (pr[k, 0] == j)).sum()) for j in range(3)] for i in range(3)],
            "classes": list(TEXTURE_CLASSES),
            "majority_class_accuracy": float(np.mean(t[k, 0] == np.bincount(t[k, 0].astype(int)).argmax())),
        }
        for j, name in enumerate(BINARY_ATTRIBUTES):
            k = t[:, 1 + j] >= 0
            y, p = t[k, 1 + j], pr[k, 1 + j]
            yh = p >= 0.5
            heads[name] = {
                "n": int(k.sum()),
                "positives": int(y.sum()),
                "accuracy": float((yh == (y > 0.5)).mean()),
                "balanced_accuracy": float(
                    np.nanmean(
                        [
                            np.mean(yh[y > 0.5]) if (y > 0.5).any() else np.nan,
                            np.mean(~yh[y < 0.5]) if (y < 0.5).any() else np.nan,
                        ]
                    )
                ),
                "auc": roc_auc(y, p),
                "majority_class_accuracy": float(max(y.mean(), 1 - y.mean())),
            }
        out["characteristics"] = heads
        out["inter_reader_agreement"] = _agreement_on(records, data)
    if dices:
        out["segmentation"] = {
            "n": len(dices),
            "median_dice": float(np.median(dices)),
            "mean_dice": float(np.mean(dices)),
            "median_volume_error": float(np.median(vol_err)),
            "median_rel_diameter_error_mask_extent": float(np.median(diam_err)) if diam_err else None,
        }
    return out


def _agreement_on(records, data) -> dict | None:
    """Inter-reader agreement on the characteristics the heads learn, over ``records``' cubes."""

    root = Path(data) if data else None
    path = root / "reader_ratings.csv" if root else None
    if path is None or not path.exists():
        return None
    cubes = R.read_reader_ratings(path)
    names = {r.name for r in records}
    sub = {k: v for k, v in cubes.items() if k in names}
    tasks = (
        R.Task("texture", "texture", R.texture_class),
        R.Task("calcified", "calcification", lambda v: v != R.CALCIFICATION_ABSENT),
        R.Task("spiculated", "spiculation", lambda v: v >= 3),
        R.Task("ill_defined_margin", "margin", lambda v: v <= 3),
    )
    return {k: round(a.rate, 4) for k, a in R.agreement_rates(sub, tasks).items()}


def thick_slices(record, slice_mm: float):
    """A copy of a 1 mm CT cube as if scanned with ``slice_mm`` slices (box-averaged along z,
    then linearly interpolated back to 1 mm, as the Predictor resamples thick-slice scans)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    a = torch.from_numpy(record.array.astype(np.float32))[None, None]
    z = max(2, int(round(a.shape[2] / slice_mm)))
    low = F.interpolate(a, size=(z, a.shape[3], a.shape[4]), mode="area")
    back = F.interpolate(low, size=a.shape[2:], mode="trilinear", align_corners=False)
    return dataclasses.replace(record, array=np.round(back[0, 0].numpy()).astype(np.int16))


def baselines(train_recs, val_recs, label: str = "label") -> dict:
    """Diameter-only rule (threshold chosen on the train split) and majority class, for the
    labels in attribute ``label`` (see `_malignancy_on_hits`)."""
    tr = [r for r in train_recs if getattr(r, label, -1) in (0, 1)]
    va = [r for r in val_recs if getattr(r, label, -1) in (0, 1)]
    out = {
        "diameter_rule": diameter_rule(
            [r.diameter for r in tr],
            [getattr(r, label) for r in tr],
            [r.diameter for r in va],
            [getattr(r, label) for r in va],
        )
    }
    maj = int(np.mean([getattr(r, label) for r in tr]) >= 0.5) if tr else 0
    yv = np.array([getattr(r, label) for r in va])
    out["majority_class"] = {
        "predicts": "malignant" if maj else "benign",
        "accuracy": float((yv == maj).mean()) if len(yv) else float("nan"),
    }
    return out


# --- report ----------------------------------------------------------------------------------


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def markdown_table(result: dict) -> str:
    rows = [
        "| model | sens @1/8 | @1/4 | @1/2 | @1 | @2 | @4 | @8 FP | CPM | det. F1 | mal. acc | mal. AUC | n mal. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        d = r.get("detection")
        m = r.get("malignancy")
        sens = [_fmt(s) for s in d["sensitivity"]] if d else ["–"] * 7
        rows.append(
            f"| {name} | " + " | ".join(sens) + f" | {_fmt(d['cpm']) if d else '–'} | "
            f"{_fmt(d['operating_point']['f1']) if d else '–'} | {_fmt(m['accuracy'], True) if m else '–'} | "
            f"{_fmt(m['auc']) if m else '–'} | {m['n'] if m else '–'} |"
        )
    b = result["baselines"]
    dr = b["diameter_rule"]
    rows.append(
        f"| diameter rule (≥ {dr['threshold_mm']:g} mm) | – | – | – | – | – | – | – | – | – | "
        f"{_fmt(dr['accuracy'], True)} | {_fmt(dr['auc'])} | {dr['n']} |"
    )
    rows.append(
        f"| majority class ({b['majority_class']['predicts']}) | – | – | – | – | – | – | – | – | – | "
        f"{_fmt(b['majority_class']['accuracy'], True)} | – | – |"
    )
    rm = result.get("baselines_readers_mean")
    for name, r in result["models"].items():
        m = r.get("malignancy_readers_mean")
        if m and rm:
            dr = rm["diameter_rule"]
            rows += [
                "",
                f"Malignancy by the readers' mean (< 3 benign, > 3 malignant), {name}: accuracy "
                f"{_fmt(m['accuracy'], True)}, AUC {_fmt(m['auc'])} (n {m['n']}); diameter rule "
                f"(≥ {dr['threshold_mm']:g} mm, chosen on train) {_fmt(dr['accuracy'], True)}, AUC {_fmt(dr['auc'])}.",
            ]
        f = r.get("findings")
        if f and f.get("characteristics"):
            agree = f.get("inter_reader_agreement") or {}
            rows += [
                "",
                f"| {name}: characteristic (readers' majority) | n | accuracy | balanced acc. | AUC | "
                "majority class | inter-reader agreement |",
                "|---|---|---|---|---|---|---|",
            ]
            for k, h in f["characteristics"].items():
                rows.append(
                    f"| {k} | {h['n']} | {_fmt(h['accuracy'], True)} | {_fmt(h.get('balanced_accuracy'), True)} | "
                    f"{_fmt(h.get('auc'))} | {_fmt(h['majority_class_accuracy'], True)} | "
                    f"{_fmt(agree.get(k), True)} |"
                )
        if f and f.get("segmentation"):
            sg = f["segmentation"]
            rows += [
                "",
                f"Segmentation ({name}, {sg['n']} validation nodules): median Dice {_fmt(sg['median_dice'])}, "
                f"median volume error {_fmt(sg['median_volume_error'], True)}, diameter from the mask's extent: "
                f"median error {_fmt(sg.get('median_rel_diameter_error_mask_extent'), True)}.",
            ]
    ws = [(name, r["whole_scans"]) for name, r in result["models"].items() if r.get("whole_scans")]
    if ws:
        rows += [
            "",
            "| model | whole scan | split | lesions found | other detections | best hit (rank, score) | "
            "box size x/y/z mm (lesion) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, w in ws:
            thr = result["models"][name]["threshold"]
            for part in ("val", "test"):
                if not w.get(part):
                    continue
                for f, e in w[part]["scans"].items():
                    at = e.get(f"at_{thr:.4f}", {})
                    bh = e.get("best_hit")
                    rows.append(
                        f"| {name} | {f} | {part} | {at.get('found', 0)}/{e['n_lesions']} | {at.get('other', 0)} | "
                        + (
                            f"{bh['rank']}, {bh['score']:.3f} | {'/'.join(f'{v:g}' for v in bh['size_xyz_mm'])} "
                            f"({'/'.join(f'{v:g}' for v in bh['lesion_size_xyz_mm'])}) |"
                            if bh
                            else "– | – |"
                        )
                    )
            fr = w["val"]["froc_per_scan"]
            rows.append(
                f"| {name} | FROC per scan (val, {fr['n_lesions']} lesions in {fr['n_scans']} scans) | | "
                + " / ".join(f"{s:.2f}@{r:g}" for s, r in zip(fr["sensitivity"], fr["fp_rates"]))
                + " | | | |"
            )
    return "\n".join(rows) + "\n"


def _scans_dir(scans, cube_data):
    """The whole-scan folder: given, else ``ct_scans`` beside the cube folder, else None."""
    if scans:
        return Path(scans)
    p = Path(cube_data).parent / "ct_scans"
    return p if (p / "scans.csv").exists() else None


def _per_image(records, outs):
    per_image, n_truth = [], 0
    for r, o in zip(records, outs):
        sp = _spacing(r)
        per_image.append(
            (
                o["scores"],
                match_detections(o["centres"] * sp, o["scores"], r.centers * sp, np.asarray(r.diameters) * sp),
            )
        )
        n_truth += len(r.centers)
    return per_image, n_truth


def _load_val(ck, data, modality):
    from ..training.train import TrainConfig, load_records  # lazy: training imports torch

    tc = TrainConfig(**{**ck["train_config"], "data": data or ck["train_config"]["data"], "limit": 0})
    records = load_records(tc)
    val, train = set(ck["split"]["val"]), set(ck["split"]["train"])
    return [r for r in records if r.seriesuid in train], [r for r in records if r.seriesuid in val]


#: Cube sensitivity the operating point must keep: 0.90, and no more than 0.05 below the
#: 0.964 of the weights before whole-scan training.
MIN_CUBE_SENSITIVITY = 0.915


def choose_threshold(
    cube_per_image,
    n_truth: int,
    scan_result: dict,
    max_fp_per_scan: float = 1.0,
    min_sensitivity: float = MIN_CUBE_SENSITIVITY,
) -> dict:
    """The operating point: the lowest threshold at which the whole validation scans have at
    most ``max_fp_per_scan`` false positives per scan, provided the validation cubes keep a
    sensitivity of at least ``min_sensitivity`` there; otherwise the highest threshold that
    keeps that sensitivity (and the per-scan target is reported as missed)."""

    cands = np.unique(
        np.concatenate(
            [
                np.asarray(scan_result["curve"]["scores"], float),
                np.concatenate([s for s, _ in cube_per_image]) if cube_per_image else [],
            ]
        )
    )
    cands = cands[(cands >= 0.05) & (cands < 1.0)]
    best = None
    for t in np.sort(cands):
        if fp_per_scan_at(scan_result, t) <= max_fp_per_scan:
            best = float(t)
            break
    sens = lambda t: detection_f1(cube_per_image, n_truth, t)["recall"]
    if best is not None and sens(best) >= min_sensitivity:
        return {
            "threshold": best,
            "rule": f"lowest threshold with <= {max_fp_per_scan:g} false positives per whole validation scan",
            "cube_sensitivity": sens(best),
            "fp_per_scan": fp_per_scan_at(scan_result, best),
            "met": True,
        }
    ok = [float(t) for t in np.sort(cands) if sens(t) >= min_sensitivity]
    t = ok[-1] if ok else 0.05
    return {
        "threshold": t,
        "rule": f"highest threshold keeping cube sensitivity >= {min_sensitivity:g} (the "
        f"<= {max_fp_per_scan:g} FP per scan target is not reachable there)",
        "cube_sensitivity": sens(t),
        "fp_per_scan": fp_per_scan_at(scan_result, t),
        "met": False,
    }


def evaluate_whole_scans(model, info: dict, split: dict, scans_dir, threshold: float, splits=("val", "test")) -> dict:
    """Per-scan false positives and lesions found on the whole validation (and test) scans."""

    scans = whole_scans(scans_dir, split, splits=splits)
    pred = Predictor("CT", model=model, info={**info, "threshold": threshold}, device="cpu")
    val = evaluate_scans(pred, [s for s in scans if s.split == "val"], thresholds=[threshold])
    test = (
        evaluate_scans(pred, [s for s in scans if s.split == "test"], thresholds=[threshold])
        if "test" in splits
        else None
    )
    return {"val": val, "test": test}


def evaluate(
    weights_list, modality="CT", data=None, threshold=None, tta=None, slice_mm=None, scans=None, choose: bool = False
) -> dict:
    entries = []
    if not weights_list:
        e = bundled_entry(modality)
        entries.append((f"Res-MTNet (bundled {modality})", load_checkpoint(e["path"], e["sha256"]), e.get("threshold")))
    for w in weights_list:
        label, _, path = w.rpartition("=") if "=" in w else ("", "", w)
        ck = load_checkpoint(path, sha256_of(path))
        entries.append((label or Path(path).parent.name, ck, ck.get("threshold")))
    first = entries[0][1]
    train_recs, val_recs = _load_val(first, data, modality)
    if slice_mm:
        if modality != "CT":
            raise ValueError("--slice-mm applies to CT only")
        val_recs = [thick_slices(r, slice_mm) for r in val_recs]
    result = {
        "modality": modality,
        "data": data or first["train_config"]["data"],
        "n_val_images": len(val_recs),
        "n_val_series": len(first["split"]["val"]),
        "slice_mm": slice_mm,
        "models": {},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for name, ck, thr in entries:
        if ck["split"]["val"] != first["split"]["val"]:
            raise ValueError(f"{ck['path']}: its validation split differs from {first['path']}'s")
        model = build_model(ck)
        r = evaluate_model(
            model,
            ck["network"],
            val_recs,
            modality,
            threshold=threshold if threshold is not None else thr,
            tta=bool(tta),
        )
        r["malignancy_tta"] = bool(tta)
        scans_dir = (
            _scans_dir(scans, data or first["train_config"]["data"]) if modality == "CT" and not slice_mm else None
        )
        if scans_dir is not None:
            info = {
                "name": ck.get("name"),
                "version": ck.get("version"),
                "sha256": ck["sha256"],
                "spacing_mm": ck.get("spacing_mm", 1.0),
            }
            if choose:
                ws = evaluate_whole_scans(model, info, ck["split"], scans_dir, r["threshold"], splits=("val",))
                outs = model_outputs(model, val_recs, modality)
                per_image, n_truth = _per_image(val_recs, outs)
                op = choose_threshold(per_image, n_truth, ws["val"])
                r = evaluate_model(model, ck["network"], val_recs, modality, threshold=op["threshold"], tta=bool(tta))
                r["malignancy_tta"] = bool(tta)
                r["operating_point_choice"] = op
            r["whole_scans"] = evaluate_whole_scans(model, info, ck["split"], scans_dir, r["threshold"])
        if modality == "CT" and not slice_mm:
            fm = findings_metrics(model, val_recs, data or first["train_config"]["data"], tta=bool(tta))
            if fm is not None:
                r["findings"] = fm
        r["weights"] = {"path": ck["path"], "sha256": ck["sha256"]}
        result["models"][name] = r
    result["baselines"] = baselines(train_recs, val_recs)
    if modality == "CT" and any(getattr(r, "reader_means", None) is not None for r in val_recs):
        result["baselines_readers_mean"] = baselines(train_recs, val_recs, "label_mean")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="resmtnet-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--modality", default="CT", choices=["CT", "CXR"])
    p.add_argument("--weights", nargs="*", default=[], help="weights files, optionally NAME=PATH (default: bundled)")
    p.add_argument("--data", help="data folder (default: the one recorded in the weights)")
    p.add_argument("--threshold", type=float, help="operating threshold (default: recorded, else 0.25 FP/image on val)")
    p.add_argument(
        "--tta",
        dest="tta",
        action="store_true",
        default=False,
        help="flip-averaged malignancy at each detection (an analysis; the plugin does not use it)",
    )
    p.add_argument("--no-tta", dest="tta", action="store_false")
    p.add_argument(
        "--slice-mm", type=float, help="CT: evaluate on the validation cubes re-sampled through this slice thickness"
    )
    p.add_argument("--scans", help="CT: folder of whole scans (default: ct_scans beside the cube folder, if present)")
    p.add_argument(
        "--choose-threshold",
        action="store_true",
        help="CT: choose the operating point on the whole validation scans (<= 1 FP per scan, cube "
        "sensitivity >= 0.90) instead of using the recorded one",
    )
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--markdown", help="write the Markdown table here")
    a = p.parse_args(argv)
    try:
        res = evaluate(a.weights, a.modality, a.data, a.threshold, a.tta, a.slice_mm, a.scans, a.choose_threshold)
    except Exception as e:  # report any failure as one line: this is a command-line edge
        print(f"resmtnet-evaluate: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    table = markdown_table(res)
    print(table)
    for name, r in res["models"].items():
        print(
            f"{name}: threshold={r.get('threshold')}, "
            + json.dumps({k: r[k] for k in ("detection", "malignancy") if k in r})[:600]
        )

    files = {Path(a.json): json.dumps(res, indent=1)} if a.json else {}
    if a.markdown:
        files[Path(a.markdown)] = table
    try:
        atomic_write_texts(files)
    except NoduleFileError as e:
        print(f"resmtnet-evaluate: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
