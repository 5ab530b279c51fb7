"""DICOMweb: search, open, store against the local Orthanc (scripts/orthanc.sh start), and a
PACS that is down, slow, failing, untrusted or holds non-image series: one line, no hang."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_resmtnet.io.formats import load_scan
from napari_resmtnet.io.pacs import (
    Pacs,
    PacsError,
    open_series,
    parse_series_address,
    read_credentials,
    series_address,
)
from pacs_fixtures import dicom_files, new_uid, orthanc_address, write_ct_series


@pytest.fixture
def orthanc(monkeypatch):
    url, cred = orthanc_address()
    monkeypatch.setenv("RESMTNET_PACS_TOKEN_FILE", str(cred))
    monkeypatch.delenv("RESMTNET_PACS_TOKEN", raising=False)
    return Pacs(url)


@pytest.fixture
def stored_ct(orthanc, tmp_path):
    """A tilted CT series written here and stored in Orthanc."""
    info = write_ct_series(tmp_path / "ct", seed=3, patient_id=f"RT-{new_uid()[-8:]}")
    orthanc.store(dicom_files(info["folder"]))
    return info


# --------------------------------------------------------------------------- real Orthanc


def test_search_open_identical_to_files(orthanc, stored_ct):
    studies = orthanc.search_studies(
        patient_id=stored_ct["patient_id"], date_from="2024-01-01", date_to="2024-01-31", modality="CT"
    )
    assert [s.study_uid for s in studies] == [stored_ct["study_uid"]]
    assert studies[0].patient_name == "Test^Patient" and "CT" in studies[0].modalities
    assert orthanc.search_studies(patient_id=stored_ct["patient_id"], date_from="2025-01-01") == []
    series = orthanc.search_series(stored_ct["study_uid"])
    assert [(s.series_uid, s.modality, s.description, s.n_instances) for s in series] == [
        (stored_ct["series_uid"], "CT", "chest CT", 16)
    ]

    seen = []
    scan = orthanc.load_series(stored_ct["study_uid"], stored_ct["series_uid"], progress=lambda f, s: seen.append(f))
    ref = load_scan(stored_ct["folder"])
    np.testing.assert_array_equal(scan.array, ref.array)
    assert scan.array.dtype == ref.array.dtype and scan.modality == ref.modality == "CT"
    assert scan.spacing == ref.spacing and scan.origin == ref.origin
    np.testing.assert_array_equal(scan.direction, ref.direction)
    assert not np.allclose(scan.direction, np.eye(3))  # the tilt came through
    assert scan.seriesuid == stored_ct["series_uid"]
    assert scan.path == series_address(orthanc.url, stored_ct["study_uid"], stored_ct["series_uid"])
    assert scan.metadata["dicomweb"]["study_uid"] == stored_ct["study_uid"]
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)

    # the same through one explicit function on the series address
    again = open_series(scan.path)
    np.testing.assert_array_equal(again.array, ref.array)
    assert again.origin == ref.origin


def test_cancel_stops_the_download(orthanc, stored_ct):
    from napari_resmtnet.io.pacs import Cancelled

    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        orthanc.load_series(stored_ct["study_uid"], stored_ct["series_uid"], cancel=cancel)


def test_non_image_series_is_one_line(orthanc, stored_ct):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = stored_ct["study_uid"], new_uid()
    ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = stored_ct["patient_id"], "SR", 9, 1
    ds.SeriesDescription = "a note"
    orthanc.store([ds])
    series = {s.series_uid: s for s in orthanc.search_series(stored_ct["study_uid"])}
    assert not series[ds.SeriesInstanceUID].is_image and series[stored_ct["series_uid"]].is_image
    with pytest.raises(PacsError, match=r"the series is SR, not an image \(CT, CR, DX\)") as e:
        orthanc.load_series(stored_ct["study_uid"], ds.SeriesInstanceUID)
    assert "\n" not in str(e.value)
    with pytest.raises(PacsError, match="no series"):
        orthanc.load_series(stored_ct["study_uid"], "1.2.3.4.5")


def test_store_is_confirmed_by_a_query(orthanc, stored_ct):
    uids = [str(d.SOPInstanceUID) for d in dicom_files(stored_ct["folder"])]
    assert orthanc.confirm_stored(stored_ct["study_uid"], uids) == []
    assert orthanc.confirm_stored(stored_ct["study_uid"], ["1.2.3.999"]) == ["1.2.3.999"]


def test_datasets_made_in_memory_are_stored_as_dicom_files(orthanc, tmp_path):
    """Datasets without the PS3.10 preamble (made in memory) still come back through WADO-RS."""
    info = write_ct_series(tmp_path / "ct", seed=8)
    datasets = dicom_files(info["folder"])
    for ds in datasets:
        ds.preamble = None
    orthanc.store(datasets)
    scan = orthanc.load_series(info["study_uid"], info["series_uid"])
    np.testing.assert_array_equal(scan.array, load_scan(info["folder"]).array)


def test_wrong_or_missing_credentials_are_one_line(orthanc, monkeypatch, tmp_path):
    monkeypatch.delenv("RESMTNET_PACS_TOKEN_FILE")
    with pytest.raises(PacsError, match="HTTP 401.*check the credentials"):
        Pacs(orthanc.url, retries=0).search_studies()
    bad = tmp_path / "cred"
    bad.write_text("basic resmtnet:not-the-password\n")
    with pytest.raises(PacsError, match="HTTP 401") as e:
        Pacs(orthanc.url, token_file=bad, retries=0).search_studies()
    assert "not-the-password" not in str(e.value)


# --------------------------------------------------------------------------- credentials


def test_credentials_sources_and_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("RESMTNET_PACS_TOKEN_FILE", raising=False)
    monkeypatch.delenv("RESMTNET_PACS_TOKEN", raising=False)
    assert read_credentials() is None
    f = tmp_path / "tok"
    f.write_text("Bearer abc.def\n")
    auth = read_credentials(f)
    assert "abc" not in repr(auth)
    import requests

    req = requests.Request("GET", "https://x/").prepare()
    assert auth(req).headers["Authorization"] == "Bearer abc.def"
    monkeypatch.setenv("RESMTNET_PACS_TOKEN", "xyz")
    assert read_credentials()(requests.Request("GET", "https://x/").prepare()).headers["Authorization"] == "Bearer xyz"
    f.write_text("basic alice:s3cret:with:colons")
    assert read_credentials(f).password == "s3cret:with:colons"
    f.write_text("two\nlines")
    with pytest.raises(PacsError, match="one line"):
        read_credentials(f)
    with pytest.raises(PacsError, match="not a file"):
        read_credentials(tmp_path / "missing")
    # credentials never go over plain HTTP to another machine, nor in the address
    with pytest.raises(PacsError, match="plain HTTP"):
        Pacs("http://pacs.example.org/dicom-web")
    monkeypatch.delenv("RESMTNET_PACS_TOKEN")
    Pacs("http://pacs.example.org/dicom-web")  # no credentials: allowed
    with pytest.raises(PacsError, match="must not hold a user or password") as e:
        Pacs("https://bob:pw@pacs.example.org/dicom-web")
    assert "pw" not in str(e.value).replace("password", "")
    with pytest.raises(PacsError, match="not a DICOMweb address"):
        Pacs("ftp://pacs/x")


def test_series_address_round_trip():
    a = series_address("https://h:8443/dicom-web/", "1.2.3", "1.2.3.4")
    assert a == "https://h:8443/dicom-web/studies/1.2.3/series/1.2.3.4"
    assert parse_series_address(a) == ("https://h:8443/dicom-web", "1.2.3", "1.2.3.4")
    with pytest.raises(PacsError, match="not a DICOMweb series address"):
        parse_series_address("https://h/dicom-web/studies/1.2.3")


def test_bad_inputs_are_refused_before_any_request():
    p = Pacs("http://127.0.0.1:9/dicom-web")
    with pytest.raises(PacsError, match="date"):
        p.search_studies(date_from="yesterday")
    with pytest.raises(PacsError, match="not a DICOM UID"):
        p.search_series("1.2.3/../../x")


# --------------------------------------------------------------------------- a bad PACS


class _Server:
    """A local HTTP server answering every request with ``handler(self_request)``."""

    def __init__(self, respond, tls_context=None):
        hits = self.hits = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                respond(self)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(code, body=b"[]", ctype="application/dicom+json"):
    def respond(h):
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return respond


def test_pacs_down_is_one_line_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(PacsError, match=r"connection refused \(after 3 tries\)") as e:
        Pacs(f"http://127.0.0.1:{port}/dicom-web", retries=2, backoff=0.05).search_studies()
    assert time.monotonic() - t < 10
    assert str(e.value).startswith(f"PACS http://127.0.0.1:{port}/dicom-web: study search:")


def test_slow_pacs_times_out_instead_of_hanging():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never answers
    port = server.getsockname()[1]
    try:
        t = time.monotonic()
        with pytest.raises(PacsError, match=r"no answer within 0.5 s \(after 2 tries\)"):
            Pacs(f"http://127.0.0.1:{port}/dicom-web", timeout=(0.5, 0.5), retries=1, backoff=0.01).search_studies()
        assert time.monotonic() - t < 6
    finally:
        server.close()


def test_server_errors_are_retried_then_reported():
    srv = _Server(_answer(503, b"busy", "text/plain"))
    try:
        with pytest.raises(PacsError, match="HTTP 503 .*the server failed"):
            Pacs(f"http://127.0.0.1:{srv.port}/dicom-web", retries=2, backoff=0.01).search_studies()
        assert len(srv.hits) == 3
    finally:
        srv.close()
    flaky = []

    def respond(h):  # fails twice, then answers
        flaky.append(1)
        (_answer(502, b"", "text/plain") if len(flaky) <= 2 else _answer(200, json.dumps([]).encode()))(h)

    srv = _Server(respond)
    try:
        assert Pacs(f"http://127.0.0.1:{srv.port}/dicom-web", retries=3, backoff=0.01).search_studies() == []
    finally:
        srv.close()


def test_garbage_answer_is_one_line():
    srv = _Server(_answer(200, b"<html>not json</html>", "text/html"))
    try:
        with pytest.raises(PacsError, match="study search") as e:
            Pacs(f"http://127.0.0.1:{srv.port}/dicom-web", retries=0).search_studies()
        assert "\n" not in str(e.value)
    finally:
        srv.close()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(d / "key.pem"),
                "-out",
                str(d / "cert.pem"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    return d / "cert.pem", d / "key.pem"


def test_https_is_verified_by_default(self_signed):
    cert, key = self_signed
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = _Server(_answer(200), tls_context=ctx)
    url = f"https://127.0.0.1:{srv.port}/dicom-web"
    try:
        with pytest.raises(PacsError, match="certificate is not trusted"):
            Pacs(url, retries=0).search_studies()
        assert Pacs(url, verify=str(cert)).search_studies() == []  # its CA given: trusted
        off = Pacs(url, verify=False)
        assert off.warnings and "not verified" in off.warnings[0]
    finally:
        srv.close()
    assert isinstance(Path(cert), Path)
