"""Detection and classification metrics: hit matching, FROC, ROC AUC, F1, baselines.

numpy-only (the core): shared by evaluation, whole-scan evaluation and training's
false-positive reduction.
"""

from __future__ import annotations

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MIN_HIT_MM = 5.0


# --- metrics -------------------------------------------------------------------------------


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    y = np.asarray(labels, int)
    s = np.asarray(scores, float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def match_detections(pred_centres_mm, pred_scores, true_centres_mm, true_diams_mm):
    """Per prediction: index of the true nodule it hits first (by score) or -1 (FP), or -2
    when it hits a nodule already claimed by a higher-scored prediction (ignored)."""
    out = np.full(len(pred_scores), -1, dtype=int)
    if len(pred_scores) == 0 or len(true_diams_mm) == 0:  # e.g. a radiograph without a nodule
        return out
    P = np.asarray(pred_centres_mm, float).reshape(len(pred_scores), -1)
    T = np.asarray(true_centres_mm, float).reshape(len(true_diams_mm), -1)
    dist = np.linalg.norm(P[:, None, :] - T[None, :, :], axis=-1)
    ok = dist <= np.maximum(np.asarray(true_diams_mm, float) / 2, MIN_HIT_MM)[None, :]
    dist = np.where(ok, dist, np.inf)
    claimed = np.zeros(len(T), bool)
    for i in np.argsort(-np.asarray(pred_scores, float), kind="stable"):
        if not ok[i].any():
            continue
        j = int(np.argmin(dist[i]))
        out[i] = -2 if claimed[j] else j
        claimed[j] = True
    return out


def froc(per_image, n_truth: int, fp_rates=FP_RATES) -> dict:
    """per_image: list of (scores, match) arrays. Returns sensitivities at fp_rates and CPM."""
    n_img = len(per_image)
    scores = np.concatenate([s for s, _ in per_image]) if per_image else np.zeros(0)
    match = np.concatenate([m for _, m in per_image]) if per_image else np.zeros(0, int)
    keep = match != -2
    scores, tp = scores[keep], (match[keep] >= 0)
    order = np.argsort(-scores, kind="stable")
    scores, tp = scores[order], tp[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    sens_curve = ctp / max(n_truth, 1)
    fp_curve = cfp / max(n_img, 1)
    sens = []
    for r in fp_rates:
        ok = fp_curve <= r
        sens.append(float(sens_curve[ok].max()) if ok.any() else 0.0)
    return {
        "fp_rates": list(fp_rates),
        "sensitivity": sens,
        "cpm": float(np.mean(sens)),
        "curve": {"scores": scores.tolist(), "sensitivity": sens_curve.tolist(), "fp_per_image": fp_curve.tolist()},
    }


def threshold_at_fp(froc_result: dict, fp_rate: float) -> float:
    """Lowest score threshold whose false positives per image stay within ``fp_rate``."""
    c = froc_result["curve"]
    s, fp = np.asarray(c["scores"]), np.asarray(c["fp_per_image"])
    ok = fp <= fp_rate
    return float(s[ok].min()) if ok.any() else 1.0


def detection_f1(per_image, n_truth: int, threshold: float) -> dict:
    tp = fp = 0
    for s, m in per_image:
        sel = (s >= threshold) & (m != -2)
        tp += int((m[sel] >= 0).sum())
        fp += int((m[sel] == -1).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / n_truth if n_truth else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "threshold": threshold,
        "tp": tp,
        "fp": fp,
        "fn": n_truth - tp,
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "fp_per_image": fp / max(len(per_image), 1),
    }


def malignancy_metrics(labels, probs) -> dict:
    y = np.asarray(labels, int)
    p = np.asarray(probs, float)
    if len(y) == 0:
        return {"n": 0, "accuracy": float("nan"), "auc": float("nan"), "confusion": [[0, 0], [0, 0]]}
    pred = (p >= 0.5).astype(int)
    conf = [[int(((y == a) & (pred == b)).sum()) for b in (0, 1)] for a in (0, 1)]  # rows: truth benign/malignant
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "auc": roc_auc(y, p),
        "confusion": conf,
        "n_benign": int((y == 0).sum()),
        "n_malignant": int((y == 1).sum()),
    }


def diameter_rule(train_diam, train_labels, val_diam, val_labels) -> dict:
    """Malignant if diameter >= t, with t the best threshold on the train split."""
    td, tl = np.asarray(train_diam, float), np.asarray(train_labels, int)
    cands = np.unique(td)
    accs = [((td >= t).astype(int) == tl).mean() for t in cands]
    t = float(cands[int(np.argmax(accs))])
    vd, vl = np.asarray(val_diam, float), np.asarray(val_labels, int)
    m = malignancy_metrics(vl, (vd >= t).astype(float))
    m["auc"] = roc_auc(vl, vd)  # the diameter itself as a score
    m["threshold_mm"] = t
    return m
