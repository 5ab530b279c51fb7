"""Benchmark whole-scan inference, side by side with MONAI's RetinaNet lung-nodule detector.

Measures, on one synthetic 512 x 512 x 300 chest CT at 0.7 x 0.7 x 1.25 mm and one
2048 x 2048 radiograph at 0.175 mm (see `synthetic.py`), each repeat in a fresh process:
reading (`load_scan` of a .nrrd / .mha written to a temporary folder), preprocessing
(resampling, HU window, lung mask), network (sliding windows), postprocessing (decode,
NMS, mapping to scan voxels), end to end (read + all of these; the model is built before),
and the process's peak resident memory (``VmHWM``, which counts torch's allocations that
tracemalloc does not see). Also the peak memory for a 512 x 512 x 600 CT. The MONAI
reference (``monai_retinanet.py``, run in its own environment) is run once -- it takes
about 20 minutes on 2 cores -- or its earlier result on the same file (same sha256) is
reused with ``--monai-result``.

Usage::

    .venv/bin/python benchmarks/bench_inference.py                 # ours + MONAI (if its venv exists)
    .venv/bin/python benchmarks/bench_inference.py --no-monai
    .venv/bin/python benchmarks/bench_inference.py --monai-result benchmarks/results/monai_retinanet.json

Writes ``benchmarks/results/inference.json`` and the table in ``benchmarks/README.md``, and
prints one JSON line with the medians, MONAI's time and the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MONAI_PYTHON = Path(".venv-monai/bin/python")

CT_SHAPE = (300, 512, 512)
CT_SPACING = (1.25, 0.7, 0.7)
CT600_SHAPE = (600, 512, 512)
CXR_SIZE = 2048
CXR_SPACING = 0.175

README_COMMAND = (
    "python3 -m venv .venv-monai && .venv-monai/bin/pip install torch==2.14.1 torchvision==0.29.1 \\\n"
    "  && .venv-monai/bin/pip install monai SimpleITK numpy nibabel   # MONAI reference, separate venv\n"
    "DATA=/tmp/resmtnet-bench-data   # the synthetic images are written here once\n"
    ".venv/bin/python benchmarks/bench_inference.py --data $DATA --make-data\n"
    "# MONAI once (about 25 min on 2 cores), in the background:\n"
    "nohup .venv-monai/bin/python benchmarks/monai_retinanet.py $DATA/chest_512x512x300.nrrd \\\n"
    "  --out benchmarks/results/monai_retinanet.json > monai.log 2>&1 &\n"
    "# ours, 5 runs each, reusing that result (same file, checked by sha256):\n"
    ".venv/bin/python benchmarks/bench_inference.py --repeats 5 --data $DATA \\\n"
    "  --monai-result benchmarks/results/monai_retinanet.json\n"
    "# or both in one go: .venv/bin/python benchmarks/bench_inference.py --repeats 5"
)
BARS = {"ct_end_to_end_s": 30.0, "speedup_vs_monai": 3.0, "ct600_peak_rss_mb": 4096.0, "cxr_end_to_end_s": 1.0}


# --- data ------------------------------------------------------------------------------------

from napari_resmtnet.inference.weights import sha256_of  # noqa: E402  (the project's one file hash)

sys.path.insert(0, str(HERE))
from procstat import other_load, peak_rss_mb  # noqa: E402


def make_data(folder: Path) -> dict:
    """Write the synthetic images (once; deterministic) and return their paths."""
    import SimpleITK as sitk

    from synthetic import synthetic_chest_ct, synthetic_radiograph

    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": folder / "chest_512x512x300.nrrd",
        "ct600": folder / "chest_512x512x600.nrrd",
        "cxr": folder / "film_2048.mha",
    }
    for key, shape in (("ct", CT_SHAPE), ("ct600", CT600_SHAPE)):
        if not paths[key].exists():
            arr, sp, _ = synthetic_chest_ct(shape, CT_SPACING)
            img = sitk.GetImageFromArray(arr)
            del arr
            img.SetSpacing(tuple(float(s) for s in sp[::-1]))
            img.SetOrigin((-179.0, -179.0, -float(shape[0]) * sp[0]))
            tmp = paths[key].with_suffix(".tmp.nrrd")
            sitk.WriteImage(img, str(tmp))
            os.replace(tmp, paths[key])
    if not paths["cxr"].exists():
        img = sitk.GetImageFromArray(synthetic_radiograph(CXR_SIZE))
        img.SetSpacing((CXR_SPACING, CXR_SPACING))
        tmp = paths["cxr"].with_suffix(".tmp.mha")
        sitk.WriteImage(img, str(tmp))
        os.replace(tmp, paths["cxr"])
    return {k: str(v) for k, v in paths.items()}


# --- one measurement in a fresh process ------------------------------------------------------


def worker(kind: str, path: str, weights: str) -> dict:
    t0 = time.perf_counter()
    import torch

    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.io.formats import load_scan

    t_import = time.perf_counter() - t0
    modality = "CT" if kind.startswith("ct") else "CXR"
    t0 = time.perf_counter()
    source = weights
    if weights == "auto":
        from napari_resmtnet.inference.weights import registry

        source = "bundled" if modality in registry() else "random"
    if source == "bundled":
        pred = Predictor(modality, device="cpu")
    else:
        from napari_resmtnet.model.network import ResMTNet, ResMTNetConfig

        torch.manual_seed(0)
        net = ResMTNet(ResMTNetConfig(spatial_dims=3 if modality == "CT" else 2))
        pred = Predictor(
            modality,
            device="cpu",
            model=net,
            info={"name": "random", "spacing_mm": 1.0 if modality == "CT" else 1.6, "threshold": 0.5},
        )
    t_model = time.perf_counter() - t0

    t0 = time.perf_counter()
    scan = load_scan(path)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    det = pred.predict(scan)
    t_predict = time.perf_counter() - t0
    tm = det.meta["timings"]
    return {
        "kind": kind,
        "weights": source,
        "threads": torch.get_num_threads(),
        "shape": list(scan.shape),
        "import_s": t_import,
        "model_s": t_model,
        "read_s": t_read,
        "preprocessing_s": tm["preprocessing"] + tm.get("lung_mask", 0.0),
        "network_s": tm["network"],
        "postprocessing_s": tm["postprocessing"],
        "predict_s": t_predict,
        "end_to_end_s": t_read + t_predict,
        "windows": det.meta["windows"],
        "lung_mask": det.meta["lung_mask"],
        "detections": len(det),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(kind: str, path: str, weights: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, path, "--weights", weights],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"{kind} worker failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
        )
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- machine and contention ------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# --- summary ---------------------------------------------------------------------------------

STAGES = ("read_s", "preprocessing_s", "network_s", "postprocessing_s", "end_to_end_s")


def summarise(runs: list[dict]) -> dict:
    out = {}
    for k in STAGES + ("peak_rss_mb",):
        v = [r[k] for r in runs]
        out[k] = {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
    return out


def fmt(s: dict, k: str, unit: str = "s") -> str:
    m = s[k]
    if unit == "MB":
        return f"{m['median']:.0f} ({m['min']:.0f}–{m['max']:.0f})"
    return f"{m['median']:.2f} ({m['min']:.2f}–{m['max']:.2f})"


def write_readme(result: dict, command: str) -> None:
    ct, cxr, ct600 = result["ct"]["summary"], result["cxr"]["summary"], result["ct600"]["summary"]
    mo = result.get("monai")
    mach = result["machine"]
    n = result["repeats"]
    lines = [
        "# Inference benchmark",
        "",
        "Whole-scan inference of `napari_resmtnet.inference.predictor.Predictor` against MONAI's RetinaNet",
        "lung-nodule detector (the `lung_nodule_ct_detection` model-zoo bundle's network and",
        "sliding-window settings, random weights) on the same synthetic chest CT and machine.",
        "Generated by `benchmarks/bench_inference.py`; raw numbers in `results/inference.json`",
        "(and `results/monai_retinanet.json`).",
        "",
        "Reproduce (from the repository root):",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GB RAM, {mach['os']}, "
        f"Python {mach['python']}, torch {mach['torch']} ({mach['torch_threads']} threads), "
        f"GPU: {mach['gpu'] or 'none (CPU only)'}.",
        f"Run at {result['date']}; weights: {result['ct']['runs'][0]['weights']} "
        "(the time of a dense network does not depend on its weights' values).",
        f"Background load: before {result['load_before']}, after {result['load_after']}"
        + (
            " -- model training was running beside the benchmark, so these times are pessimistic."
            if max(result["load_before"]["training_processes"], result["load_after"]["training_processes"])
            else "."
        ),
        "",
        f"Seconds (and MB), median of {n} runs, each in a fresh process, with (min–max):",
        "",
        "| input | read | preprocessing | network | postprocessing | end to end | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| CT 512×512×300, 0.7×0.7×1.25 mm (.nrrd) | {fmt(ct, 'read_s')} | {fmt(ct, 'preprocessing_s')} | "
        f"{fmt(ct, 'network_s')} | {fmt(ct, 'postprocessing_s')} | **{fmt(ct, 'end_to_end_s')}** | {fmt(ct, 'peak_rss_mb', 'MB')} |",
        f"| CT 512×512×600, same spacing (1 run) | {fmt(ct600, 'read_s')} | {fmt(ct600, 'preprocessing_s')} | "
        f"{fmt(ct600, 'network_s')} | {fmt(ct600, 'postprocessing_s')} | {fmt(ct600, 'end_to_end_s')} | "
        f"**{fmt(ct600, 'peak_rss_mb', 'MB')}** |",
        f"| radiograph 2048×2048, 0.175 mm (.mha) | {fmt(cxr, 'read_s')} | {fmt(cxr, 'preprocessing_s')} | "
        f"{fmt(cxr, 'network_s')} | {fmt(cxr, 'postprocessing_s')} | **{fmt(cxr, 'end_to_end_s')}** | {fmt(cxr, 'peak_rss_mb', 'MB')} |",
    ]
    if mo:
        lines.append(
            f"| MONAI RetinaNet, CT 512×512×300 (1 run) | {mo['read_s']:.2f} | {mo['preprocessing_s']:.2f} | "
            f"{mo['network_s']:.1f} (incl. box selection) | – | **{mo['end_to_end_s']:.1f}** | {mo['peak_rss_mb']:.0f} |"
        )
    w = result["ct"]["runs"][0]["windows"]
    lm = result["ct"]["runs"][0]["lung_mask"]
    lines += [
        "",
        f"Res-MTNet on the CT: model grid {w['grid']} voxels at 1 mm, lung mask {lm.get('volume_ml')} mL "
        f"-> {w['run']} windows of {w['window']} (overlap {w['overlap']}) over the lungs' bounding box {w['region']}.",
    ]
    if mo:
        lines.append(
            f"MONAI: input {mo['input_shape']} after resampling to 0.703×0.703×1.25 mm, windows 512×512×192, overlap 0.25, "
            f"{mo['params'] / 1e6:.1f} M parameters, torch {mo['torch']} (CUDA build, run on the CPU), {mo['threads']} "
            f"threads; run once ({mo['end_to_end_s'] / 60:.0f} minutes), not repeated; background load "
            f"{mo.get('load_before')} before, {mo.get('load_after')} after."
        )
    lines += [
        "",
        "Notes: times are wall-clock seconds in a fresh process per run (model built before the clock",
        "starts; `import_s`/`model_s` are in the JSON). Small inputs (radiographs, cubes) run the",
        "network on one CPU thread: with 2 threads and other processes on the 2 cores, OpenMP",
        "synchronisation made a 224×224 forward take 1.3 s instead of 0.02 s. When training shares",
        "the machine, large 3D windows are also slower on 2 threads than on 1 (`--threads 1`).",
    ]
    lines += ["", "Bars (2-core CPU, medians):", "", "| bar | target | measured | met |", "|---|---|---|---|"]
    for name, target, value, ok in result["bars"]:
        lines.append(f"| {name} | {target} | {value} | {'yes' if ok else 'NO'} |")
    lines.append("")
    text = "\n".join(lines)
    tmp = HERE / "README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, HERE / "README.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="auto", choices=["auto", "bundled", "random"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", help="folder for the synthetic images (default: a temporary folder)")
    ap.add_argument("--no-monai", action="store_true")
    ap.add_argument("--monai-python", default=str(MONAI_PYTHON))
    ap.add_argument("--monai-result", help="reuse this earlier MONAI result (same image sha256)")
    ap.add_argument("--readme-only", action="store_true", help="rewrite README.md from results/inference.json")
    ap.add_argument("--make-data", action="store_true", help="only write the synthetic images to --data")
    args = ap.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads((RESULTS / "inference.json").read_text()), README_COMMAND)
        return 0

    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.weights)))
        return 0

    tmpdir = None
    if args.data:
        folder = Path(args.data)
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="resmtnet-bench-")
        folder = Path(tmpdir.name)
    paths = make_data(folder)
    if args.make_data:
        print(json.dumps(paths))
        return 0
    ct_sha = sha256_of(paths["ct"])
    load_before = other_load()
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": args.repeats,
        "ct_sha256": ct_sha,
        "load_before": load_before,
    }
    for kind, reps in (("ct", args.repeats), ("cxr", args.repeats), ("ct600", 1)):
        runs = [run_worker(kind, paths[kind], args.weights) for _ in range(reps)]
        res[kind] = {"path": Path(paths[kind]).name, "runs": runs, "summary": summarise(runs)}
        print(f"{kind}: end to end {res[kind]['summary']['end_to_end_s']}", file=sys.stderr)
    res["load_after"] = other_load()

    monai = None
    if args.monai_result:
        monai = json.loads(Path(args.monai_result).read_text())
        if monai.get("image_sha256") != ct_sha:
            print(f"MONAI result {args.monai_result} was made on another image; ignored", file=sys.stderr)
            monai = None
    elif not args.no_monai and Path(args.monai_python).exists():
        out = RESULTS / "monai_retinanet.json"
        RESULTS.mkdir(exist_ok=True)
        r = subprocess.run(
            [args.monai_python, str(HERE / "monai_retinanet.py"), paths["ct"], "--out", str(out)],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            monai = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            print(
                f"MONAI run failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
                file=sys.stderr,
            )
    res["monai"] = monai

    ct_e2e = res["ct"]["summary"]["end_to_end_s"]["median"]
    cxr_e2e = res["cxr"]["summary"]["end_to_end_s"]["median"]
    peak600 = res["ct600"]["summary"]["peak_rss_mb"]["max"]
    ratio = round(monai["end_to_end_s"] / ct_e2e, 1) if monai else None
    res["bars"] = [
        (
            "CT 512×512×300 end to end",
            f"≤ {BARS['ct_end_to_end_s']:.0f} s",
            f"{ct_e2e:.2f} s",
            ct_e2e <= BARS["ct_end_to_end_s"],
        ),
        (
            "faster than MONAI RetinaNet",
            f"≥ {BARS['speedup_vs_monai']:.0f}×",
            f"{ratio}×" if ratio else "not run",
            bool(ratio and ratio >= BARS["speedup_vs_monai"]),
        ),
        ("peak memory CT 512×512×600", "≤ 4096 MB", f"{peak600:.0f} MB", peak600 <= BARS["ct600_peak_rss_mb"]),
        (
            "radiograph 2048×2048 end to end",
            f"≤ {BARS['cxr_end_to_end_s']:.0f} s",
            f"{cxr_e2e:.3f} s",
            cxr_e2e <= BARS["cxr_end_to_end_s"],
        ),
    ]
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "inference.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, RESULTS / "inference.json")
    write_readme(res, README_COMMAND)
    line = {
        "ct_end_to_end_s": ct_e2e,
        "ct_end_to_end_range_s": [
            res["ct"]["summary"]["end_to_end_s"]["min"],
            res["ct"]["summary"]["end_to_end_s"]["max"],
        ],
        "ct_stages_median_s": {k: res["ct"]["summary"][k]["median"] for k in STAGES},
        "cxr_end_to_end_s": cxr_e2e,
        "ct600_peak_rss_mb": round(peak600),
        "ct_peak_rss_mb": round(res["ct"]["summary"]["peak_rss_mb"]["max"]),
        "monai_end_to_end_s": monai["end_to_end_s"] if monai else None,
        "speedup_vs_monai": ratio,
        "bars_met": all(b[3] for b in res["bars"]),
        "load": [load_before, res["load_after"]],
    }
    print(json.dumps(line))
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
