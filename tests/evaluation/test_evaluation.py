"""Evaluation metrics: hit matching, FROC/CPM, AUC, the diameter rule."""

import numpy as np
import pytest

from napari_resmtnet.metrics import (
    detection_f1,
    diameter_rule,
    froc,
    malignancy_metrics,
    match_detections,
    roc_auc,
    threshold_at_fp,
)


def test_hit_radius_is_max_of_radius_and_5mm_and_each_nodule_counts_once():
    truth = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
    diam = np.array([4.0, 20.0])
    pred = np.array([[4.9, 0, 0], [0, 5.1, 0], [109, 0, 0], [100, 1, 0]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    m = match_detections(pred, scores, truth, diam)
    # 4.9 mm hits the 4 mm nodule (5 mm floor); 5.1 mm misses it; 9 mm hits the 20 mm one,
    # but that nodule was already claimed by the 0.95 prediction -> ignored (-2)
    assert m.tolist() == [0, -1, -2, 1]


def test_froc_counts_sensitivity_at_fp_rates():
    # 4 images, 4 nodules; predictions: hits at 0.9, 0.8, 0.3; FPs at 0.85, 0.5, 0.2
    per_image = [
        (np.array([0.9, 0.85]), np.array([0, -1])),
        (np.array([0.8]), np.array([0])),
        (np.array([0.5, 0.3]), np.array([-1, 0])),
        (np.array([0.2]), np.array([-1])),
    ]
    r = froc(per_image, n_truth=4, fp_rates=(0.25, 0.5, 1.0))
    # at <= 1 FP (0.25/img): 0.9 hit, 0.85 FP, 0.8 hit -> 2/4 ; <= 2 FP: + 0.5 FP, 0.3 hit -> 3/4
    assert r["sensitivity"] == [0.5, 0.75, 0.75]
    assert r["cpm"] == pytest.approx(2.0 / 3)
    t = threshold_at_fp(r, 0.25)
    assert t == pytest.approx(0.8)
    f1 = detection_f1(per_image, 4, 0.8)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (2, 1, 2)


def test_auc_and_confusion():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    m = malignancy_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2])
    assert m["confusion"] == [[1, 1], [1, 1]] and m["accuracy"] == 0.5


def test_diameter_rule_threshold_comes_from_train_only():
    r = diameter_rule([5, 6, 20, 25], [0, 0, 1, 1], [7, 30, 15], [0, 1, 1])
    assert 6 < r["threshold_mm"] <= 20
    assert r["accuracy"] == pytest.approx(2 / 3)  # 15 mm is called benign with t = 20


def test_operating_point_drops_candidates_smaller_than_a_nodule(monkeypatch):
    """The cube evaluation's operating point drops what the Predictor drops: candidates at or
    above the threshold whose mask is under a 3 mm sphere, counted as true or false positives."""
    from types import SimpleNamespace

    from napari_resmtnet.evaluation import evaluate as E

    def fake(model, patches, centres, spacing_mm):
        return [{"volume_mm3": 5.0 if c[0] > 30 else 100.0} for c in centres], None

    monkeypatch.setattr(E, "characterise_patches", fake)
    model = SimpleNamespace(config=SimpleNamespace(fine_segmentation=True))
    rec = SimpleNamespace(array=np.zeros((50, 50, 50), np.int16), centers=np.array([[25.0, 25, 25]]), diameters=[8.0])
    out = {
        "centres": np.array([[25.0, 25, 25], [40.0, 10, 10], [45.0, 40, 40], [20.0, 5, 5]]),
        "sizes": np.ones((4, 3)),
        "scores": np.array([0.9, 0.8, 0.7, 0.2]),
        "malignancy": np.zeros(4),
        "stages": {"detector": np.arange(4.0)},
    }
    new, gone = E.drop_smaller_than_nodules(model, [rec], [out], threshold=0.5)
    assert gone == {"true": 0, "false": 2}
    np.testing.assert_array_equal(new[0]["scores"], [0.9, 0.2])  # below the threshold: never measured
    np.testing.assert_array_equal(new[0]["stages"]["detector"], [0.0, 3.0])
    assert E.drop_smaller_than_nodules(model, [rec], [out], 0.5, min_nodule_mm=0)[1] is None
    plain = SimpleNamespace(config=SimpleNamespace(fine_segmentation=False))
    assert E.drop_smaller_than_nodules(plain, [rec], [out], 0.5) == ([out], None)
