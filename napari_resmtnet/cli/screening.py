"""``resmtnet screen``: detect nodules in an archive of studies on a Dask cluster.

    resmtnet screen scans/*.mhd dicom_folders/ --out results/             # local cluster
    resmtnet screen --pacs https://pacs/dicom-web --modality CT --date-from 2024-01-01 --out results/
    resmtnet screen ... --scheduler tcp://10.0.0.5:8786                   # an existing cluster

One study is one task on a ``dask.distributed`` cluster: a local one (``--workers N``
processes, one thread each) unless ``--scheduler ADDRESS`` names a running scheduler;
``--workers 0`` runs the studies one after the other in this process (no cluster). Each
worker process loads the model once (a per-process cache) and keeps it for all its studies.

Studies come from files and DICOM folders (``load_scan``), DICOMweb series addresses
(``https://HOST/PATH/studies/S/series/R``) and a DICOMweb query (``--pacs URL`` with
``--patient-id``, ``--patient-name``, ``--date-from/--date-to``, ``--modality``): of each study
found, the image series (CT, CR, DX) with the most images is read. Credentials are read by
each worker from its own ``$RESMTNET_PACS_TOKEN_FILE`` / ``$RESMTNET_PACS_TOKEN`` (see
`napari_resmtnet.io.pacs`); they never travel with the tasks.

Per study, in ``--out``: ``KEY.csv`` (LUNA16-style rows at or above the threshold) and
``KEY.json`` (the plugin's nodule file with image identity, model, every candidate), written
atomically, JSON last: a study whose JSON exists is finished and is skipped when the
command runs again (resumable). With ``--send``, the accepted findings go back to the
PACS as DICOM SR + SEG (`napari_resmtnet.annotations.dicom_export`) -- in screening no reader has
reviewed them, so ``--send`` sends the model's findings above the threshold as unreviewed
candidates only with ``--send-unreviewed``.

A worker that dies takes its study with it; the scheduler gives the study to another worker
(``--allowed-failures`` deaths per study, default 3). A study that fails (unreadable file,
PACS error, model error) is one line in the summary and never stops the batch. At the end:
``summary.json`` (every study: status, nodules, seconds, worker, error), ``nodules.csv``
(all studies' rows, in input order), and the throughput in studies per hour.

Exit status: 0 all studies done, 1 some failed, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from ..io.formats import load_scan, strip_image_suffix
from ..io.pacs import Pacs, PacsError, parse_series_address, series_address
from ..inference.predictor import Predictor
from ..paths import escape_text
from ..annotations.export import CSV_COLUMNS, csv_text, json_dict
from ..annotations.table import NoduleTable, image_identity
from ..files import atomic_write_texts
from ..annotations import dicom_export
from ..inference.weights import WeightsError, load_checkpoint

PROG = "resmtnet screen"
SUMMARY_FORMAT = "resmtnet-screening"

#: per worker process: (modality, weights, threshold, threads) -> Predictor
_PREDICTORS: dict = {}


# --------------------------------------------------------------------------- studies


def _safe(text: str, n: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:n] or "study"


def file_study(path) -> dict:
    p = Path(path).resolve()

    digest = hashlib.sha256(str(p).encode()).hexdigest()[:8]
    return {"kind": "file", "source": str(path), "path": str(p), "key": f"{_safe(strip_image_suffix(p.name))}-{digest}"}


def dicomweb_study(base: str, study_uid: str, series_uid: str, patient_id: str = "") -> dict:
    return {
        "kind": "dicomweb",
        "source": series_address(base, study_uid, series_uid),
        "url": base,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "patient_id": patient_id,
        "key": _safe(study_uid, 70),
    }


def studies_from_query(
    pacs, patient_id=None, patient_name=None, date_from=None, date_to=None, modality=None, limit=10000
) -> tuple[list[dict], list[dict]]:
    """(studies to run, studies without an image series) for a QIDO query."""
    found, without = [], []
    for st in pacs.search_studies(
        patient_id=patient_id,
        patient_name=patient_name,
        date_from=date_from,
        date_to=date_to,
        modality=modality,
        limit=limit,
    ):
        series = [
            s
            for s in pacs.search_series(st.study_uid)
            if s.is_image and (not modality or s.modality.upper() == modality.upper())
        ]
        if not series:
            without.append(
                {
                    "key": _safe(st.study_uid, 70),
                    "source": st.study_uid,
                    "status": "failed",
                    "error": f"study {st.study_uid}: no image series ({', '.join(st.modalities) or 'none'})",
                }
            )
            continue
        best = max(series, key=lambda s: (s.n_instances or 0, -(s.number or 0)))
        found.append(dicomweb_study(pacs.url, st.study_uid, best.series_uid, st.patient_id))
    return found, without


def output_paths(out_dir, key: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{key}.csv", out / f"{key}.json"


def is_done(out_dir, key: str) -> bool:
    """A study is finished when its JSON (written last) is a complete nodule file."""
    _, js = output_paths(out_dir, key)
    try:
        return json.loads(js.read_text(encoding="utf-8")).get("format") == "resmtnet-nodules"
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- one study (runs on a worker)


def _predictor(modality: str, opts: dict):
    key = (modality, opts.get("weights"), opts.get("threshold"), opts.get("threads"))
    if key not in _PREDICTORS:
        kw = {"threads": opts["threads"]} if opts.get("threads") else {}
        if opts.get("threshold") is not None:
            kw["score_floor"] = min(0.05, float(opts["threshold"]))
        _PREDICTORS[key] = Predictor(
            modality, weights=opts.get("weights"), sha256=opts.get("sha256"), device=opts.get("device", "cpu"), **kw
        )
    return _PREDICTORS[key]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"local:{os.getpid()}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return escape_text(" ".join(text.splitlines()[0].split()) if text else type(exc).__name__)


def screen_one(study: dict, out_dir: str, opts: dict) -> dict:
    """Detect nodules in one study and write its CSV and JSON; never raises for a bad study
    (the failure is returned as one line). Skips a study whose output is complete."""

    t0 = time.perf_counter()
    rec = {"key": study["key"], "source": study["source"], "worker": _worker_name()}
    if is_done(out_dir, study["key"]):
        return {**rec, "status": "skipped", "seconds": 0.0}
    try:
        scan = _load(study, opts)
        pred = _predictor(scan.modality, opts)
        det = pred.predict(scan)

        thr = pred.threshold if opts.get("threshold") is None else float(opts["threshold"])
        table = NoduleTable.from_detections(det, image_identity(scan), threshold=thr, model_info=pred.model_info)
        d = json_dict(table)
        d["warnings"] = list(scan.warnings)
        if study["kind"] == "dicomweb":
            d["dicomweb"] = {k: study[k] for k in ("url", "study_uid", "series_uid")}
        sent = None
        if opts.get("send"):
            sent = _send(scan, table, study, opts)
            d["sent"] = sent
        csv_path, json_path = output_paths(out_dir, study["key"])
        _write(csv_path, csv_text(table))
        _write(json_path, json.dumps(d, indent=2, allow_nan=False) + "\n")  # last: marks the study done
        n = int(table.visible_mask().sum())
        return {
            **rec,
            "status": "done",
            "nodules": n,
            "seconds": round(time.perf_counter() - t0, 3),
            **({"sent": sent} if sent is not None else {}),
        }
    except MemoryError:
        return {
            **rec,
            "status": "failed",
            "error": f"{study['source']}: not enough memory",
            "seconds": round(time.perf_counter() - t0, 3),
        }
    except Exception as e:  # noqa: BLE001 -- any failure of one study is one line in the summary
        line = _one_line(e)
        if study["source"] not in line and study.get("study_uid", "@") not in line:
            line = f"{study['source']}: {line}"
        return {**rec, "status": "failed", "error": line, "seconds": round(time.perf_counter() - t0, 3)}


def _write(path: Path, text: str) -> None:
    atomic_write_texts({path: text})


def _pacs(opts: dict, url: str):
    return Pacs(
        url,
        token_file=opts.get("token_file"),
        verify=opts.get("verify"),
        timeout=tuple(opts.get("timeout") or (5.0, 60.0)),
        retries=int(opts.get("retries", 3)),
    )


def _load(study: dict, opts: dict):
    if study["kind"] == "file":
        return load_scan(study["path"])
    return _pacs(opts, study["url"]).load_series(study["study_uid"], study["series_uid"])


def _send(scan, table, study: dict, opts: dict) -> dict:
    """SR + SEG of the findings to the PACS the study came from (or ``opts['send_url']``)."""

    url = opts.get("send_url") or study.get("url")
    if not url:
        raise ValueError("--send needs a PACS: the study is a file and --send-to is not given")
    pacs = _pacs(opts, url)
    if study["kind"] == "dicomweb":
        headers = pacs.series_headers(study["study_uid"], study["series_uid"])
    else:
        headers = dicom_export.source_headers(study["path"])
    objs = dicom_export.report_objects(table, headers, include_unreviewed=bool(opts.get("send_unreviewed")))
    if objs is None:
        return {"stored": [], "note": "no findings to send"}
    stored = pacs.store(objs)
    missing = pacs.confirm_stored(str(headers[0].StudyInstanceUID), stored)
    if missing:
        raise RuntimeError(f"the PACS accepted but does not list {len(missing)} stored object(s)")
    return {"stored": stored}


# --------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Detect and grade lung nodules in many studies (files, DICOM folders, DICOMweb) on a Dask "
        "cluster; one CSV + JSON per study in --out; resumable.",
        epilog="Exit status: 0 all studies done, 1 some failed, 2 usage error, 130 interrupted. "
        "PACS credentials: $RESMTNET_PACS_TOKEN_FILE or $RESMTNET_PACS_TOKEN (never on the command line).",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="scan file, DICOM folder or DICOMweb series address")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the per-study results and summary.json")
    q = p.add_argument_group("studies from a PACS (DICOMweb QIDO-RS)")
    q.add_argument("--pacs", metavar="URL", help="DICOMweb base address to query for studies")
    q.add_argument("--patient-id", help="QIDO PatientID")
    q.add_argument("--patient-name", help="QIDO PatientName (* wildcards)")
    q.add_argument("--date-from", help="first study date (YYYY-MM-DD)")
    q.add_argument("--date-to", help="last study date (YYYY-MM-DD)")
    q.add_argument("--modality", default=None, help="CT, CR or DX (default: any image series)")
    q.add_argument("--limit", type=int, default=10000, help="most studies a query returns (default: %(default)s)")
    q.add_argument("--send", action="store_true", help="store the findings as DICOM SR + SEG in the PACS")
    q.add_argument(
        "--send-unreviewed",
        action="store_true",
        help="with --send: also send candidates no reader accepted (screening findings are unreviewed)",
    )
    q.add_argument("--send-to", metavar="URL", help="DICOMweb address to send to (default: where the study came from)")
    q.add_argument("--ca-bundle", metavar="PEM", help="CA certificates for the PACS's HTTPS (default: the system's)")
    q.add_argument("--timeout", type=float, default=60.0, metavar="S", help="PACS read timeout, seconds (default 60)")
    q.add_argument("--retries", type=int, default=3, help="PACS retries per request (default 3)")
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--scheduler", metavar="ADDRESS", help="a running dask scheduler (tcp://HOST:8786); default: a local cluster"
    )
    c.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local cluster: worker processes (default: CPU cores // 2, at least 1); 0: no cluster",
    )
    c.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    c.add_argument("--memory-limit", default="auto", help="local cluster: memory per worker (default: auto)")
    c.add_argument(
        "--allowed-failures",
        type=int,
        default=3,
        help="times a study may take a worker down with it before it is given up (default 3)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--threshold", type=float, metavar="T", help="detection threshold (default: the weights')")
    m.add_argument("--weights", metavar="PATH", help="weights file (default: bundled); must be readable by workers")
    m.add_argument("--sha256", metavar="HEX", help="expected sha256 of --weights")
    m.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] on the workers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {escape_text(msg)}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished studies are kept in --out and skipped next time", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    if not args.inputs and not args.pacs:
        return _fail("give INPUT files/folders/series addresses, or --pacs URL with a query")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return _fail(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.workers is not None and args.workers < 0:
        return _fail("--workers must be 0 or more")
    if args.threads < 1 or args.retries < 0 or args.timeout <= 0 or args.allowed_failures < 0:
        return _fail("--threads must be >= 1, --retries and --allowed-failures >= 0, --timeout > 0")
    if args.send_unreviewed and not args.send:
        return _fail("--send-unreviewed needs --send")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot make --out {out}: {e.strerror or e}")
    if not os.access(out, os.W_OK):
        return _fail(f"--out {out} is not writable")
    opts = {
        "threshold": args.threshold,
        "weights": args.weights,
        "sha256": args.sha256,
        "device": args.device,
        "threads": args.threads,
        "verify": args.ca_bundle or None,
        "timeout": (5.0, args.timeout),
        "retries": args.retries,
        "send": args.send,
        "send_unreviewed": args.send_unreviewed,
        "send_url": args.send_to,
    }
    if args.weights is not None:
        try:
            load_checkpoint(args.weights, args.sha256)
        except WeightsError as e:
            return _fail(str(e))

    # -- the studies ----------------------------------------------------------------------------

    studies: list[dict] = []
    pre_failed: list[dict] = []
    for inp in args.inputs:
        if str(inp).startswith(("http://", "https://")):
            try:
                base, st, se = parse_series_address(inp)
            except PacsError as e:
                return _fail(str(e))
            studies.append(dicomweb_study(base, st, se))
        else:
            studies.append(file_study(inp))
    if args.pacs:
        try:
            found, without = studies_from_query(
                _pacs(opts, args.pacs),
                args.patient_id,
                args.patient_name,
                args.date_from,
                args.date_to,
                args.modality,
                args.limit,
            )
        except PacsError as e:
            return _fail(str(e), 1)
        studies += found
        pre_failed += without
    seen: set = set()
    unique = []
    for s in studies:  # the same study twice is run once
        if s["key"] not in seen:
            seen.add(s["key"])
            unique.append(s)
    studies = unique
    return _run(args, opts, out, studies, pre_failed)


def _run(args, opts: dict, out: Path, studies: list[dict], pre_failed: list[dict]) -> int:
    from tqdm import tqdm

    todo = [s for s in studies if not is_done(out, s["key"])]
    records = {
        s["key"]: {"key": s["key"], "source": s["source"], "status": "skipped", "seconds": 0.0}
        for s in studies
        if s not in todo
    }
    bar = tqdm(total=len(todo), desc=PROG, unit="study", disable=True if args.quiet else None, file=sys.stderr)
    t0 = time.perf_counter()
    n_workers = 0
    if args.workers == 0 and not args.scheduler:
        n_workers = 1
        for s in todo:
            rec = screen_one(s, str(out), opts)
            records[s["key"]] = rec
            _report(bar, rec)
    else:
        n_workers = _run_dask(args, opts, out, todo, records, bar)
        if n_workers < 0:
            return 1
    bar.close()
    wall = time.perf_counter() - t0
    return _finish(out, studies, records, pre_failed, wall, n_workers)


def _report(bar, rec: dict) -> None:
    from tqdm import tqdm

    if rec["status"] == "failed":
        tqdm.write(f"{PROG}: failed {rec['error']}", file=sys.stderr)
    bar.update(1)


def _run_dask(args, opts, out: Path, todo: list[dict], records: dict, bar) -> int:
    """Run ``todo`` on the cluster; returns the number of workers (-1 when none could be reached)."""
    import dask
    from distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    cluster = None
    with dask.config.set(
        {"distributed.scheduler.allowed-failures": args.allowed_failures, "distributed.worker.daemon": False}
    ):
        try:
            if args.scheduler:
                client = Client(args.scheduler, timeout="20s")
            else:
                n = args.workers or max(1, (os.cpu_count() or 2) // 2)
                cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    memory_limit=args.memory_limit,
                    dashboard_address="127.0.0.1:0",
                    silence_logs=50,
                    env={"OMP_NUM_THREADS": str(args.threads)},
                )
                client = Client(cluster)
        except (OSError, TimeoutError, ValueError) as e:
            print(
                f"{PROG}: error: cannot reach the Dask scheduler {args.scheduler or ''}: {_one_line(e)}",
                file=sys.stderr,
            )
            return -1
        try:
            n_workers = len(client.scheduler_info().get("workers", {}))
            import importlib.util

            board = (
                f"dashboard {client.dashboard_link}"
                if importlib.util.find_spec("bokeh") is not None
                else "no dashboard (install bokeh for Dask's dashboard)"
            )
            tqdm.write(f"{PROG}: {len(todo)} study(ies) on {n_workers} Dask worker(s); {board}", file=sys.stderr)
            futures = {}
            run = uuid.uuid4().hex[:8]  # keys of this run only: a shared scheduler may remember older ones
            for s in todo:
                f = client.submit(screen_one, s, str(out.resolve()), opts, key=f"screen-{s['key']}-{run}")
                futures[f] = s
            for f in as_completed(futures):
                s = futures[f]
                try:
                    rec = f.result()
                except Exception as e:  # noqa: BLE001 -- e.g. KilledWorker: the study took workers down
                    rec = {
                        "key": s["key"],
                        "source": s["source"],
                        "status": "failed",
                        "error": f"{s['source']}: {type(e).__name__}: {_one_line(e)}",
                    }
                if rec.get("status") == "skipped":  # an earlier attempt wrote it, then its worker died
                    rec = {**rec, "status": "done", "note": "finished by an earlier attempt"}
                records[s["key"]] = rec
                _report(bar, rec)
            return max(n_workers, len(client.scheduler_info().get("workers", {})))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _finish(out: Path, studies, records: dict, pre_failed: list[dict], wall: float, n_workers: int) -> int:
    ordered = [records[s["key"]] for s in studies] + pre_failed
    done = [r for r in ordered if r["status"] == "done"]
    failed = [r for r in ordered if r["status"] == "failed"]
    skipped = [r for r in ordered if r["status"] == "skipped"]
    rate = len(done) / wall * 3600 if wall > 0 and done else 0.0
    csv_parts = [",".join(CSV_COLUMNS) + "\n"]
    for s in studies:
        p = output_paths(out, s["key"])[0]
        if records[s["key"]]["status"] != "failed" and p.is_file():
            text = p.read_text(encoding="utf-8")
            csv_parts.append(text.split("\n", 1)[1] if "\n" in text else "")
    summary = {
        "format": SUMMARY_FORMAT,
        "format_version": 1,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "studies": len(ordered),
        "done": len(done),
        "skipped": len(skipped),
        "failed": len(failed),
        "wall_seconds": round(wall, 2),
        "workers": n_workers,
        "studies_per_hour": round(rate, 1),
        "results": ordered,
    }
    atomic_write_texts(
        {out / "summary.json": json.dumps(summary, indent=2) + "\n", out / "nodules.csv": "".join(csv_parts)}
    )
    print(
        f"{len(done)} done, {len(skipped)} already done, {len(failed)} failed of {len(ordered)} study(ies) in "
        f"{wall:.1f} s on {n_workers} worker(s): {rate:.0f} studies/hour -> {out / 'summary.json'}"
    )
    return 1 if failed else 0
