"""Bundle trained CT weights with the metrics of their evaluation.

    .venv/bin/resmtnet evaluate --modality CT --weights new=runs/X/model.pt --threshold T --json runs/X_eval.json
    .venv/bin/python scripts/bundle_ct.py runs/X/model.pt runs/X_eval.json --version 0.4.0 --rule "..."

The weights are stored as float16 in resources/weights/resmtnet_ct.pt and recorded (sha256,
threshold, metrics) in registry.json. Evaluate the bundled file afterwards
(``resmtnet evaluate --modality CT``) and put those numbers in the model card: they are what
the plugin runs.
"""

from __future__ import annotations

import argparse
import json

from napari_resmtnet.inference.weights import bundle


def metrics_of(result: dict) -> dict:
    """The registry's metrics from one model of a `resmtnet evaluate --json` result."""
    (m,) = result["models"].values()
    det, op = m["detection"], m["detection"]["operating_point"]
    out = {
        "cpm": det["cpm"],
        "cube_sensitivity_at_threshold": op["recall"],
        "fp_per_cube_at_threshold": op["fp_per_image"],
        "sensitivity_at_fp_per_cube": {str(r): s for r, s in zip(det["fp_rates"], det["sensitivity"])},
        "median_rel_diameter_error": det["sizes"]["median_rel_diameter_error"],
        "malignancy_accuracy": m["malignancy"]["accuracy"],
        "malignancy_auc": m["malignancy"]["auc"],
        "malignancy_readers_mean_accuracy": m["malignancy_readers_mean"]["accuracy"],
        "malignancy_readers_mean_auc": m["malignancy_readers_mean"]["auc"],
        "val_cubes": result["n_val_images"],
    }
    f = m.get("findings") or {}
    for name, c in (f.get("characteristics") or {}).items():
        out[f"{name}_accuracy"] = c["accuracy"]
    seg = f.get("segmentation") or {}
    if seg:
        out["segmentation_median_dice"] = seg["median_dice"]
        out["segmentation_median_volume_error"] = seg["median_volume_error"]
    ws = (m.get("whole_scans") or {}).get("val")
    if ws:
        key = f"at_{m['threshold']:.4f}"
        others = [s[key]["other"] for s in ws["scans"].values() if key in s]
        if others:
            out["whole_scan_val_fp_per_scan_at_threshold"] = sum(others) / len(others)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("weights")
    p.add_argument("evaluation", help="the --json of `resmtnet evaluate` for these weights (one model)")
    p.add_argument("--version", required=True)
    p.add_argument("--rule", required=True, help="how the threshold was chosen (recorded in the registry)")
    a = p.parse_args(argv)
    result = json.loads(open(a.evaluation, encoding="utf-8").read())
    (m,) = result["models"].values()
    metrics = {**metrics_of(result), "threshold_rule": a.rule}
    entry = bundle(a.weights, "CT", m["threshold"], metrics=metrics, half=True, extra={"version": a.version})
    print(json.dumps({k: entry[k] for k in ("file", "sha256", "version", "threshold")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
