"""``resmtnet predict INPUT... --out detections.csv``: detect nodules in many scans at once.

Every INPUT is a file or DICOM folder that `napari_resmtnet.io.formats.load_scan` reads (CT or chest
radiograph; the modality comes from the image). The scans run one after the other with a
progress bar; an input that cannot be read or run is reported on stderr in one line and
skipped, the others' results are still written. Exit status: 0 all inputs done, 1 some
failed (or the output could not be written), 2 usage error.

Output, written atomically (temporary file + ``os.replace``) by `napari_resmtnet.annotations.export`:

* ``--out`` CSV, LUNA16 style, one row per nodule at or above the threshold:
  ``seriesuid,coordX,coordY,coordZ,diameter_mm,probability,malignancy,label,id,source,reviewed``
  (world mm, LPS, x/y/z; ``coordZ`` empty for radiographs; ``probability`` = detection
  confidence, ``malignancy`` = P(malignant), ``label`` benign/malignant).
* ``--json`` (optional): per scan the image identity, model, threshold, every nodule with
  its box in voxels and world centre, and the candidates below the threshold (``hidden``),
  in the format of the plugin's nodule export; plus the inputs that failed.

The default threshold is the operating point recorded with the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..errors import one_line
from ..paths import OutputPathError, check_output, escape_text, shown
from ..inference.weights import WeightsError, load_checkpoint
from ..inference.predictor import DeviceError, Predictor, resolve_device
from ..annotations.export import CSV_COLUMNS, NoduleFileError, csv_text, json_dict
from ..files import atomic_write_texts
from ..io.formats import ScanReadError, load_scan, strip_image_suffix
from ..measurements import MIN_NODULE_MM
from ..annotations.table import NoduleTable, image_identity

PROG = "resmtnet predict"
JSON_FORMAT = "resmtnet-predictions"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Detect and grade lung nodules in chest CT scans and radiographs; write a "
        "LUNA16-style CSV (and optionally JSON).",
        epilog="Exit status: 0 all inputs done, 1 some inputs failed, 2 usage error.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file or DICOM folder (.mhd, .mha, .nrrd, .nii[.gz], DICOM, JSRT .IMG, PNG, JPEG...)",
    )
    p.add_argument("--out", required=True, metavar="CSV", help="CSV file to write (one row per nodule)")
    p.add_argument(
        "--json", metavar="JSON", help="also write all results (incl. candidates below the threshold) as JSON"
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="detection probability threshold for the CSV (default: the operating point of the weights)",
    )
    p.add_argument(
        "--device", default="auto", metavar="DEV", help="auto (default: CUDA when available), cpu or cuda[:N]"
    )
    p.add_argument(
        "--spacing",
        type=float,
        metavar="MM",
        help="pixel spacing (mm) of radiographs, replacing the file's or the assumed one "
        "(e.g. for PNG/JPEG without a pixel size); CT volumes keep their own",
    )
    p.add_argument(
        "--min-nodule-mm",
        type=float,
        default=MIN_NODULE_MM,
        metavar="MM",
        help="CT: drop candidates whose segmented mask is smaller than a sphere of this diameter "
        "(default: %(default)g, the LIDC definition of a nodule; 0 keeps micronodules)",
    )
    p.add_argument("--weights", metavar="PATH", help="weights file (default: the bundled weights for each modality)")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of --weights (default: read from PATH.sha256)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the network (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {escape_text(msg)}", file=sys.stderr)
    return 2


def _one_line(exc: BaseException, where) -> str:
    """One line for a failed input, naming it first; control characters escaped."""
    text = escape_text(one_line(exc))
    name = shown(where)
    if name not in text:
        text = f"{name}: {text}"
    return text


def _interrupted(done: int, total: int) -> int:
    print(f"{PROG}: interrupted after {done} of {total} scan(s); nothing written", file=sys.stderr)
    return 130


def main(argv=None) -> int:
    """Exit status 0, 1 or 2 (see the epilog); 130 after Ctrl-C, with one line and no output
    file written (partial temporary files are removed)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)

    # -- usage checks, before any work -------------------------------------------------------
    if args.threshold is not None and not (0.0 <= args.threshold <= 1.0):
        return _fail(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.threads is not None and args.threads < 1:
        return _fail(f"--threads must be at least 1, got {args.threads}")
    if not (0.0 <= args.min_nodule_mm <= 30.0):
        return _fail(f"--min-nodule-mm must be in [0, 30] mm, got {args.min_nodule_mm:g}")
    if args.spacing is not None and not (0.0 < args.spacing < 1e4):
        return _fail(f"--spacing must be a positive number of mm, got {args.spacing}")
    out_csv = Path(args.out)
    out_json = Path(args.json) if args.json else None
    for p in (out_csv, out_json):
        if p is None:
            continue
        try:  # a regular file or a new one in a writable folder; never a device, FIFO, folder
            check_output(p)
        except OutputPathError as e:
            return _fail(f"output {e}")
    if out_json is not None and out_json.resolve() == out_csv.resolve():
        return _fail("--out and --json name the same file")
    if args.weights is not None:
        try:  # verified once here, so a bad file is one line, not one per input
            load_checkpoint(args.weights, args.sha256)
        except WeightsError as e:
            return _fail(str(e))

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        return _fail(str(e))

    return _run(args, device, out_csv, out_json)


def _run(args, device, out_csv: Path, out_json: Path | None) -> int:
    import numpy as np
    from tqdm import tqdm

    predictors: dict = {}  # modality -> Predictor or the one-line reason it cannot be built

    def predictor_for(modality: str):
        if modality not in predictors:
            try:
                kw: dict = {"threads": args.threads} if args.threads else {}
                if modality == "CT":
                    kw["min_nodule_mm"] = args.min_nodule_mm
                if args.threshold is not None:  # keep candidates down to a lower --threshold
                    kw["score_floor"] = min(0.05, float(args.threshold))
                predictors[modality] = Predictor(
                    modality, weights=args.weights, sha256=args.sha256, device=device, **kw
                )
            except (WeightsError, ValueError, OSError, RuntimeError) as e:
                predictors[modality] = f"cannot load the {modality} model: {one_line(e)}"
        return predictors[modality]

    csv_parts: list[str] = []
    scans_json: list[dict] = []
    failed: list[dict] = []
    n_rows = 0
    bar = tqdm(args.inputs, desc=PROG, unit="scan", disable=True if args.quiet else None, file=sys.stderr)
    try:
        for inp in bar:
            bar.set_postfix_str(shown(Path(inp).name)[-40:], refresh=False)
            try:
                scan = load_scan(inp)
                if not scan.seriesuid:
                    scan.seriesuid = strip_image_suffix(Path(inp).name)
                if args.spacing is not None and scan.ndim == 2:
                    scan.spacing = (float(args.spacing),) * 2
                pred = predictor_for(scan.modality)
                if isinstance(pred, str):
                    raise RuntimeError(pred)
                det = pred.predict(scan)
                thr = pred.threshold if args.threshold is None else float(args.threshold)
                table = NoduleTable.from_detections(
                    det, image_identity(scan), threshold=thr, model_info=pred.model_info
                )
                text = csv_text(table)
                csv_parts.append(text if not csv_parts else text.split("\n", 1)[1])
                d = json_dict(table)
                d["warnings"] = list(scan.warnings)
                d["timings"] = det.meta.get("timings", {})
                d["lung_mask"] = det.meta.get("lung_mask", {})
                d["below_min_size"] = int(det.meta.get("below_min_size", 0))
                scans_json.append(d)
                n_rows += int(np.count_nonzero(table.visible_mask()))
            except (ScanReadError, WeightsError, ValueError, OSError, RuntimeError, MemoryError) as e:
                line = _one_line(e, inp)
                failed.append({"input": str(inp), "error": line})
                tqdm.write(f"{PROG}: skipped {line}", file=sys.stderr)
    except KeyboardInterrupt:
        bar.close()
        return _interrupted(len(scans_json), len(args.inputs))
    finally:
        bar.close()

    if not csv_parts:  # header only
        csv_parts.append(",".join(CSV_COLUMNS) + "\n")
    files = {out_csv: "".join(csv_parts)}
    if out_json is not None:
        doc = {
            "format": JSON_FORMAT,
            "format_version": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "threshold": args.threshold,
            "threshold_note": "per scan: the 'threshold' of each entry (the weights' operating point unless --threshold)",
            "scans": scans_json,
            "failed": failed,
        }
        try:
            files[out_json] = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        except ValueError as e:
            print(f"{PROG}: error: could not write {shown(out_json)}: {e}", file=sys.stderr)
            return 1
    try:
        atomic_write_texts(files)
    except NoduleFileError as e:
        print(f"{PROG}: error: {escape_text(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the temporary files are gone; no output was replaced
        return _interrupted(len(scans_json), len(args.inputs))
    done = len(scans_json)
    summary = (
        f"{done} of {len(args.inputs)} scan(s) done, {n_rows} nodule(s) at or above the threshold -> {shown(out_csv)}"
    )
    if out_json is not None:
        summary += f", {shown(out_json)}"
    if failed:
        summary += f"; {len(failed)} failed"
    print(summary)
    return 1 if failed else 0
