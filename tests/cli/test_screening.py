"""``resmtnet screen``: studies from files and DICOMweb, per-study outputs, failures as one
line, resume; and (slow) a 2-worker Dask cluster losing a worker mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from napari_resmtnet.cli import screening
from napari_resmtnet.detections import Detections
from napari_resmtnet.scan import geometry_dict
from pacs_fixtures import dicom_files, new_uid, orthanc_address, write_ct_series


class _FakePredictor:
    """A stand-in for the network in the fast tests: one box at the volume's brightest voxel."""

    threshold = 0.5
    model_info = {"name": "fake", "version": "0", "sha256": ""}

    def predict(self, scan):
        c = np.unravel_index(int(np.argmax(scan.array)), scan.shape)
        box = [v - 2 for v in c] + [v + 2 for v in c]
        return Detections([box], [0.9], [0.2], geometry_dict(scan))


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(screening, "_predictor", lambda modality, opts: _FakePredictor())


def _summary(out):
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_files_failures_and_resume(tmp_path, fake_model, capsys):
    ins = [str(write_ct_series(tmp_path / f"s{i}", seed=i)["folder"]) for i in range(2)]
    bad = tmp_path / "broken.mhd"
    bad.write_text("not a header")
    out = tmp_path / "out"
    assert screening.main([*ins, str(bad), "--out", str(out), "--workers", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("failed") == 1 and "broken.mhd" in err and "Traceback" not in err
    s = _summary(out)
    assert (s["done"], s["failed"], s["skipped"]) == (2, 1, 0)
    failed = [r for r in s["results"] if r["status"] == "failed"][0]
    assert "broken.mhd" in failed["error"] and "\n" not in failed["error"]
    for r in s["results"][:2]:
        d = json.loads((out / f"{r['key']}.json").read_text(encoding="utf-8"))
        assert d["format"] == "resmtnet-nodules" and len(d["nodules"]) == 1
    rows = (out / "nodules.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and rows[0].startswith("seriesuid,")
    # resume: the finished studies are skipped, the broken one is tried again
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("s[0-9]*.json")}
    assert screening.main([*ins, str(bad), "--out", str(out), "--workers", "0", "--quiet"]) == 1
    s = _summary(out)
    assert (s["done"], s["failed"], s["skipped"]) == (0, 1, 2)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("s[0-9]*.json")}
    assert len((out / "nodules.csv").read_text(encoding="utf-8").splitlines()) == 3


def test_half_written_study_is_run_again(tmp_path, fake_model):
    ins = [str(write_ct_series(tmp_path / "s0", seed=0)["folder"])]
    out = tmp_path / "out"
    key = screening.file_study(ins[0])["key"]
    out.mkdir()
    (out / f"{key}.csv").write_text("partial")
    (out / f"{key}.json").write_text('{"format": "resmtnet-nod')  # cut off
    assert screening.main([*ins, "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert _summary(out)["done"] == 1 and screening.is_done(out, key)


def test_usage_errors(tmp_path, capsys):
    assert screening.main(["--out", str(tmp_path)]) == 2
    assert screening.main(["x", "--out", str(tmp_path), "--threshold", "2"]) == 2
    assert screening.main(["https://h/dicom-web/studies/1.2", "--out", str(tmp_path)]) == 2
    assert screening.main(["x", "--out", str(tmp_path), "--send-unreviewed"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("resmtnet screen: error:") == 4


def test_pacs_down_is_one_line(tmp_path, capsys):
    code = screening.main(["--pacs", "http://127.0.0.1:9/dicom-web", "--retries", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "connection refused" in err


def test_query_from_orthanc(tmp_path, monkeypatch, fake_model):
    url, cred = orthanc_address()
    monkeypatch.setenv("RESMTNET_PACS_TOKEN_FILE", str(cred))
    from napari_resmtnet.io.pacs import Pacs

    pacs = Pacs(url)
    pid = f"SCR-{new_uid()[-10:]}"
    uids = []
    for i in range(2):
        info = write_ct_series(tmp_path / f"p{i}", seed=10 + i, patient_id=pid)
        pacs.store(dicom_files(info["folder"]))
        uids.append(info["study_uid"])
    out = tmp_path / "out"
    assert screening.main(["--pacs", url, "--patient-id", pid, "--out", str(out), "--workers", "0", "--quiet"]) == 0
    s = _summary(out)
    assert s["done"] == 2 and sorted(r["key"] for r in s["results"]) == sorted(uids)
    d = json.loads((out / f"{uids[0]}.json").read_text(encoding="utf-8"))
    assert d["dicomweb"]["study_uid"] == uids[0] and d["image"]["path"].startswith(url)


def test_send_sr_seg_back_to_orthanc(tmp_path, monkeypatch, fake_model):
    url, cred = orthanc_address()
    monkeypatch.setenv("RESMTNET_PACS_TOKEN_FILE", str(cred))
    from napari_resmtnet.io.pacs import Pacs, series_address

    pacs = Pacs(url)
    info = write_ct_series(tmp_path / "ct", seed=30, patient_id=f"SND-{new_uid()[-8:]}")
    pacs.store(dicom_files(info["folder"]))
    address = series_address(url, info["study_uid"], info["series_uid"])
    out = tmp_path / "out"
    # screening findings are unreviewed: --send alone sends nothing
    assert screening.main([address, "--out", str(out), "--workers", "0", "--quiet", "--send"]) == 0
    assert _summary(out)["results"][0]["sent"] == {"stored": [], "note": "no findings to send"}
    out2 = tmp_path / "out2"
    assert (
        screening.main([address, "--out", str(out2), "--workers", "0", "--quiet", "--send", "--send-unreviewed"]) == 0
    )
    sent = _summary(out2)["results"][0]["sent"]["stored"]
    assert len(sent) == 2
    assert {s.modality for s in pacs.search_series(info["study_uid"])} >= {"CT", "SR", "SEG"}
    # a study from files is sent to --send-to, referencing its own series
    out3 = tmp_path / "out3"
    assert (
        screening.main(
            [
                str(info["folder"]),
                "--out",
                str(out3),
                "--workers",
                "0",
                "--quiet",
                "--send",
                "--send-unreviewed",
                "--send-to",
                url,
            ]
        )
        == 0
    )
    assert len(_summary(out3)["results"][0]["sent"]["stored"]) == 2


# --------------------------------------------------------------------------- the real cluster


def _kill_a_busy_worker(scheduler: str, done: threading.Event, killed: list):
    """Once a worker is running a study, kill its process (SIGKILL); the nanny starts a new one."""
    from distributed import Client

    with Client(scheduler, timeout="30s") as c:
        pids = c.run(os.getpid)
        while not done.is_set():
            busy = {w: ks for w, ks in c.processing().items() if ks}
            if busy and len(busy) == len(pids):  # both working: one study is mid-run on each
                w, keys = next(iter(busy.items()))
                time.sleep(1.0)
                os.kill(pids[w], signal.SIGKILL)
                killed.append((w, list(keys)))
                return
            time.sleep(0.2)


@pytest.mark.slow
def test_dask_two_workers_one_killed_equals_sequential(tmp_path, monkeypatch):
    """6 studies (3 folders, and 3 DICOMweb series when the local Orthanc runs) on a 2-worker
    local cluster; one worker is killed mid-study: every study finishes exactly once and the
    outputs equal the sequential run's."""
    from distributed import LocalCluster

    inputs = [str(write_ct_series(tmp_path / f"f{i}", seed=i)["folder"]) for i in range(3)]
    try:
        url, cred = orthanc_address()
    except pytest.skip.Exception:
        url = None
    if url:
        monkeypatch.setenv("RESMTNET_PACS_TOKEN_FILE", str(cred))
        from napari_resmtnet.io.pacs import Pacs, series_address

        pacs = Pacs(url)
        for i in range(3):
            info = write_ct_series(tmp_path / f"w{i}", seed=20 + i)
            pacs.store(dicom_files(info["folder"]))
            inputs.append(series_address(url, info["study_uid"], info["series_uid"]))
    else:
        inputs += [str(write_ct_series(tmp_path / f"f{i}", seed=i)["folder"]) for i in range(3, 6)]

    seq = tmp_path / "seq"
    assert screening.main([*inputs, "--out", str(seq), "--workers", "0", "--quiet"]) == 0

    out = tmp_path / "dask"
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=50,
        env={"OMP_NUM_THREADS": "1"},
    ) as cluster:
        done, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_a_busy_worker, args=(cluster.scheduler_address, done, killed))
        killer.start()
        try:
            code = screening.main([*inputs, "--out", str(out), "--scheduler", cluster.scheduler_address, "--quiet"])
        finally:
            done.set()
            killer.join(60)
    assert killed, "no worker was busy long enough to be killed"
    assert code == 0
    s, ref = _summary(out), _summary(seq)
    keys = [r["key"] for r in s["results"]]
    assert len(keys) == 6 and len(set(keys)) == 6 and keys == [r["key"] for r in ref["results"]]
    assert all(r["status"] == "done" for r in s["results"])
    assert len({r["worker"] for r in s["results"]}) >= 2  # the replacement worker took over
    for k in keys:
        a = json.loads((out / f"{k}.json").read_text(encoding="utf-8"))
        b = json.loads((seq / f"{k}.json").read_text(encoding="utf-8"))
        for part in ("image", "model", "threshold", "nodules", "hidden"):
            assert a[part] == b[part], (k, part)
        assert (out / f"{k}.csv").read_text(encoding="utf-8") == (seq / f"{k}.csv").read_text(encoding="utf-8")
    assert (out / "nodules.csv").read_text(encoding="utf-8") == (seq / "nodules.csv").read_text(encoding="utf-8")
