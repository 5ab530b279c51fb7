"""Studies per hour of ``resmtnet screen`` with 1 and 2 local Dask workers (benchmarks/screening.md).

    .venv/bin/python benchmarks/screening_bench.py --studies 6 [--pacs] [--out benchmarks/results/screening.json]

The studies are copies of the bundled chest CT (lung1, 48 x 313 x 471, 5 mm slices) written
as DICOM series (new UIDs each, same pixels): as folders, or with ``--pacs`` stored in the
local Orthanc (scripts/orthanc.sh start) and screened through DICOMweb. Every run starts from
an empty output folder, so nothing is skipped; the cluster's start-up is part of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=6)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--pacs", action="store_true", help="through the local Orthanc (DICOMweb) instead of folders")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)

    from pacs_demo import ORTHANC_DIR, scan_datasets

    from napari_resmtnet import load_scan, sample_path
    from napari_resmtnet.cli import screening

    scan = load_scan(sample_path("lung1"))
    tmp = Path(tempfile.mkdtemp(prefix="resmtnet-bench-"))
    inputs = []
    if a.pacs:
        from napari_resmtnet.io.pacs import Pacs, series_address

        os.environ["RESMTNET_PACS_TOKEN_FILE"] = str(ORTHANC_DIR / "credentials")
        url = (ORTHANC_DIR / "url").read_text().strip()
        pacs = Pacs(url)
        for i in range(a.studies):
            ds = scan_datasets(scan, patient_id=f"BENCH-{i:04d}")
            pacs.store(ds)
            inputs.append(series_address(url, ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID))
    else:
        for i in range(a.studies):
            folder = tmp / f"study{i:03d}"
            folder.mkdir()
            for k, ds in enumerate(scan_datasets(scan, patient_id=f"BENCH-{i:04d}")):
                ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
            inputs.append(str(folder))
    results = []
    for w in [int(x) for x in a.workers.split(",")]:
        out = tmp / f"out-{w}"
        t0 = time.perf_counter()
        code = screening.main([*inputs, "--out", str(out), "--workers", str(w), "--quiet"])
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        per = [r["seconds"] for r in summary["results"] if r["status"] == "done"]
        results.append(
            {
                "workers": w,
                "exit": code,
                "studies": a.studies,
                "done": summary["done"],
                "wall_s": round(wall, 1),
                "studies_per_hour": round(3600 * summary["done"] / wall, 1),
                "median_study_s": round(sorted(per)[len(per) // 2], 1) if per else None,
                "load_average_after": os.getloadavg(),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    doc = {
        "source": "DICOMweb (local Orthanc)" if a.pacs else "DICOM folders",
        "cpu_count": os.cpu_count(),
        "sample": "lung1 (48 x 313 x 471)",
        "results": results,
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
