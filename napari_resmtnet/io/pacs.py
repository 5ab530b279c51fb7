"""A PACS over DICOMweb: find studies (QIDO-RS), open a series as a `Scan` (WADO-RS), store
DICOM objects (STOW-RS). Built on ``dicomweb-client`` and ``requests``; Qt-free, no torch.

    from napari_resmtnet.io.pacs import Pacs, open_series
    pacs = Pacs("https://pacs.example.org/dicom-web")      # credentials: see below
    studies = pacs.search_studies(patient_id="LIDC-0001", modality="CT")
    series = pacs.search_series(studies[0].study_uid)
    scan = pacs.load_series(series[0].study_uid, series[0].series_uid)
    scan = open_series("https://pacs.example.org/dicom-web/studies/1.2.3/series/1.2.3.4")

**Same pixels and geometry as files.** A series is streamed instance by instance into a
private temporary folder and read by `napari_resmtnet.io.formats.load_scan`, the reader every DICOM
folder goes through: slice order by position, spacing, origin, direction, rescale, the
checks and the one-line errors are the same as for the files the PACS was fed with.

**Credentials** never come from the command line and are never logged. In this order:
``token_file=`` (a path), ``$RESMTNET_PACS_TOKEN_FILE`` (a path), ``$RESMTNET_PACS_TOKEN``
(the value). The value is a bearer token (``Bearer xyz`` or just ``xyz``) or
``basic USER:PASSWORD`` for HTTP Basic (e.g. Orthanc's registered users). They are only
sent over HTTPS, or over plain HTTP to this machine (127.0.0.1, ::1, localhost); a URL
with ``user:password@`` in it is refused.

**HTTPS** certificates are verified (``verify=True``); ``verify="/path/ca.pem"`` (or
``$RESMTNET_PACS_CA_BUNDLE``, else ``$REQUESTS_CA_BUNDLE``) names a private CA;
``verify=False`` turns checks off and says so in ``Pacs.warnings``. Proxies and ``~/.netrc``
from the environment are not used (``trust_env`` off): credentials go only where they are
given.

**Failures** are one `PacsError` line each (``"PACS <url>: <what went wrong>"``): refused or
unreachable server, timeouts (connect ``timeout[0]`` s, each read ``timeout[1]`` s: never a
hang), HTTP errors with what they usually mean (401/403 credentials, 404 unknown study),
certificate problems, a series that is not an image (SR, SEG, PR...). Connection errors,
timeouts and the answers 429/500/502/503/504 are retried ``retries`` times with exponential
back-off (``backoff`` s, doubling) before they are reported.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import Cancelled, ResMTNetError
from ..paths import escape_text
from .formats import ScanReadError, load_scan

__all__ = [
    "Pacs",
    "PacsError",
    "StudyInfo",
    "SeriesInfo",
    "Cancelled",
    "open_series",
    "parse_series_address",
    "series_address",
    "read_credentials",
    "IMAGE_MODALITIES",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "CA_BUNDLE_ENV",
]

TOKEN_ENV = "RESMTNET_PACS_TOKEN"
TOKEN_FILE_ENV = "RESMTNET_PACS_TOKEN_FILE"
CA_BUNDLE_ENV = "RESMTNET_PACS_CA_BUNDLE"
#: Series modalities this plugin opens: CT volumes and projection radiographs.
IMAGE_MODALITIES = ("CT", "CR", "DX")
#: (connect, read) timeouts in seconds.
DEFAULT_TIMEOUT = (5.0, 60.0)
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
#: HTTP answers worth another try (busy or restarting server, gateway trouble).
RETRY_STATUS = (429, 500, 502, 503, 504)
#: A credentials file larger than this is not a token.
_MAX_TOKEN_BYTES = 64 * 1024

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ADDRESS = re.compile(r"^(?P<base>https?://.+?)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/?$")


class PacsError(ResMTNetError):
    """A PACS request that failed; ``str()`` is one line."""

    def __init__(self, message: str):
        super().__init__(escape_text(" ".join(str(message).split())))


@dataclass(frozen=True)
class StudyInfo:
    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    date: str = ""  # YYYYMMDD
    description: str = ""
    modalities: tuple[str, ...] = ()
    accession: str = ""
    n_series: int | None = None


@dataclass(frozen=True)
class SeriesInfo:
    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    n_instances: int | None = None

    @property
    def is_image(self) -> bool:
        return self.modality.upper() in IMAGE_MODALITIES


# --------------------------------------------------------------------------- credentials


def _bearer_auth(token: str):
    import requests

    class BearerAuth(requests.auth.AuthBase):
        def __call__(self, r):
            r.headers["Authorization"] = f"Bearer {token}"
            return r

        def __repr__(self):  # never the token
            return "BearerAuth(***)"

    return BearerAuth()


def read_credentials(token_file=None, environ=None):
    """``requests`` auth from ``token_file``, ``$RESMTNET_PACS_TOKEN_FILE`` or
    ``$RESMTNET_PACS_TOKEN`` (in that order), or None when none is set."""
    env = os.environ if environ is None else environ
    path = token_file or env.get(TOKEN_FILE_ENV)
    if path:
        p = Path(path)
        try:
            if not p.is_file():
                raise PacsError(f"credentials file {escape_text(str(p))} is not a file")
            if p.stat().st_size > _MAX_TOKEN_BYTES:
                raise PacsError(f"credentials file {escape_text(str(p))} is too large to be a token")
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PacsError(f"cannot read the credentials file {escape_text(str(p))}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PacsError(f"credentials file {escape_text(str(p))} is not text") from None
        where = f"credentials file {escape_text(str(p))}"
    elif env.get(TOKEN_ENV):
        text, where = env[TOKEN_ENV], f"${TOKEN_ENV}"
    else:
        return None
    value = text.strip()
    if not value or "\n" in value:
        raise PacsError(f"{where} must hold one line: a token, 'Bearer TOKEN' or 'basic USER:PASSWORD'")
    head, _, rest = value.partition(" ")
    if head.lower() == "basic":
        user, sep, password = rest.strip().partition(":")
        if not sep or not user:
            raise PacsError(f"{where}: 'basic' needs USER:PASSWORD")
        import requests

        return requests.auth.HTTPBasicAuth(user, password)
    if head.lower() == "bearer":
        value = rest.strip()
    if not value or any(c.isspace() for c in value):
        raise PacsError(f"{where} must hold one token without spaces")
    return _bearer_auth(value)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- addresses


def series_address(base_url: str, study_uid: str, series_uid: str) -> str:
    """The WADO-RS address of a series: ``BASE/studies/STUDY/series/SERIES``."""
    return f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"


def parse_series_address(address: str) -> tuple[str, str, str]:
    """``BASE/studies/STUDY/series/SERIES`` -> (base, study_uid, series_uid)."""
    m = _ADDRESS.match(str(address).strip())
    if not m:
        raise PacsError(
            f"{escape_text(str(address))[:200]} is not a DICOMweb series address "
            "(https://HOST/PATH/studies/STUDY_UID/series/SERIES_UID)"
        )
    return m["base"], m["study"], m["series"]


def _check_uid(uid: str, what: str) -> str:
    uid = str(uid).strip()
    if not _UID.match(uid) or len(uid) > 64:
        raise PacsError(f"{what} {escape_text(uid)[:80]!r} is not a DICOM UID")
    return uid


# --------------------------------------------------------------------------- QIDO values


def _value(item: dict, tag: str, default=""):
    """The first value of a DICOM JSON attribute (tag as 8 hex digits)."""
    v = (item.get(tag) or {}).get("Value") or []
    if not v:
        return default
    x = v[0]
    if isinstance(x, dict):  # PersonName
        return str(x.get("Alphabetic", "")) or default
    return x


def _values(item: dict, tag: str) -> tuple[str, ...]:
    return tuple(str(x) for x in ((item.get(tag) or {}).get("Value") or []))


def _int_or_none(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _date(text: str | None, what: str) -> str | None:
    """YYYYMMDD from 'YYYYMMDD' or 'YYYY-MM-DD' (None when empty)."""
    if not text:
        return None
    t = str(text).strip().replace("-", "")
    if not re.fullmatch(r"\d{8}", t):
        raise PacsError(f"{what} must be a date YYYY-MM-DD or YYYYMMDD, got {escape_text(str(text))[:40]!r}")
    return t


# --------------------------------------------------------------------------- the client


@dataclass
class Pacs:
    """A DICOMweb service (QIDO-RS, WADO-RS, STOW-RS under one base URL)."""

    url: str
    token_file: str | os.PathLike | None = None
    verify: bool | str | None = None
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        url = str(self.url).strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"{escape_text(url)[:200]} is not a DICOMweb address (http:// or https://HOST/PATH)")
        if parts.username or parts.password:
            raise PacsError(
                "the PACS address must not hold a user or password; give credentials in a file "
                f"(${TOKEN_FILE_ENV}) or ${TOKEN_ENV}"
            )
        self.url = url
        self.where = f"PACS {parts.scheme}://{parts.netloc}{parts.path}"
        if isinstance(self.timeout, (int, float)):
            self.timeout = (float(self.timeout), float(self.timeout))
        self.timeout = (float(self.timeout[0]), float(self.timeout[1]))
        if min(self.timeout) <= 0:
            raise PacsError("timeouts must be positive")
        if self.retries < 0:
            raise PacsError("retries must be 0 or more")
        auth = read_credentials(self.token_file)
        if auth is not None and parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise PacsError(
                f"{self.where}: refusing to send credentials over plain HTTP to "
                f"{escape_text(parts.hostname)}; use https://"
            )
        verify = self.verify
        if verify is None:
            # a private CA: ours first, then the one requests itself would use
            verify = os.environ.get(CA_BUNDLE_ENV) or os.environ.get("REQUESTS_CA_BUNDLE") or True
        if verify is False:
            self.warnings.append("HTTPS certificate checks are off: the PACS's identity is not verified")
        elif isinstance(verify, (str, os.PathLike)) and not Path(verify).is_file():
            raise PacsError(f"CA bundle {escape_text(str(verify))} is not a file")
        self._verify = verify
        self._auth = auth
        self._local = threading.local()

    # -- plumbing ---------------------------------------------------------------------------
    def _session(self):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        s = requests.Session()
        retry = Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=0,
            backoff_factor=self.backoff,
            status_forcelist=RETRY_STATUS,
            allowed_methods=frozenset({"GET", "POST", "HEAD"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        adapter = HTTPAdapter(max_retries=retry)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.verify = self._verify
        s.auth = self._auth
        s.trust_env = False  # no ~/.netrc credentials or proxies behind the user's back
        return s

    @property
    def client(self):
        """A ``dicomweb_client.DICOMwebClient`` for this thread (sessions are not shared)."""
        c = getattr(self._local, "client", None)
        if c is None:
            from dicomweb_client.api import DICOMwebClient

            c = DICOMwebClient(self.url, session=self._session(), timeout=self.timeout)
            c.set_http_retry_params(retry=False)  # the session retries (also connection errors)
            self._local.client = c
        return c

    def _call(self, what: str, fn: Callable, *args, **kw):
        """Run one DICOMweb call; every failure becomes one `PacsError` line."""
        try:
            return fn(*args, **kw)
        except (PacsError, Cancelled):
            raise
        except Exception as e:  # noqa: BLE001 -- mapped to one line below
            raise PacsError(f"{self.where}: {what}: {self.explain(e)}") from None

    def explain(self, exc: BaseException) -> str:
        """What a requests/urllib3/dicomweb-client error means, in a few words."""
        import requests

        tries = f" (after {self.retries + 1} tries)" if self.retries else ""
        if isinstance(exc, requests.exceptions.SSLError):
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                return (
                    "the server's HTTPS certificate is not trusted (certificate verify failed); "
                    f"give its CA with ${CA_BUNDLE_ENV}"
                )
            return f"HTTPS failed ({_first(text)})"
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return f"no connection within {self.timeout[0]:g} s{tries}"
        if isinstance(exc, (requests.exceptions.ReadTimeout,)):
            return f"no answer within {self.timeout[1]:g} s{tries}"
        if isinstance(exc, requests.exceptions.RetryError):
            return f"the server kept answering with errors{tries}: {_first(str(exc))}"
        if isinstance(exc, requests.exceptions.ConnectionError):
            text = str(exc)
            if "timed out" in text.lower() or "timeout" in text.lower():
                return f"no answer within {self.timeout[1]:g} s{tries}"
            if "refused" in text.lower():
                return f"connection refused{tries}: is the PACS running at this address?"
            if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
                return "unknown host name"
            return f"connection failed{tries}: {_first(text)}"
        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            reason = exc.response.reason or ""
            meaning = {
                400: "the PACS refused the request (bad query or object)",
                401: "not authorised: check the credentials (token file or $RESMTNET_PACS_TOKEN)",
                403: "forbidden: these credentials may not do this",
                404: "not found (unknown study/series, or the address is not the DICOMweb root)",
                409: "conflict: the PACS refused to store the object",
                413: "the upload is too large for the PACS",
                415: "the PACS does not accept this media type",
            }.get(code, "the server failed" if code >= 500 else "refused")
            return f"HTTP {code} {reason}: {meaning}".replace("  ", " ")
        if isinstance(exc, requests.exceptions.RequestException):
            return _first(str(exc)) or type(exc).__name__
        if isinstance(exc, ValueError):
            return f"unexpected answer ({_first(str(exc))})"
        return f"{type(exc).__name__}: {_first(str(exc))}"

    # -- QIDO-RS ----------------------------------------------------------------------------
    def search_studies(
        self,
        patient_id: str | None = None,
        patient_name: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        modality: str | None = None,
        limit: int = 200,
    ) -> list[StudyInfo]:
        """Studies matching all the given filters (patient name: ``*`` wildcards allowed)."""
        filters: dict[str, str] = {}
        if patient_id:
            filters["PatientID"] = str(patient_id).strip()
        if patient_name:
            filters["PatientName"] = str(patient_name).strip()
        d0, d1 = _date(date_from, "date_from"), _date(date_to, "date_to")
        if d0 or d1:
            filters["StudyDate"] = f"{d0 or ''}-{d1 or ''}"
        if modality:
            filters["ModalitiesInStudy"] = str(modality).strip().upper()
        fields = [
            "PatientID",
            "PatientName",
            "StudyDate",
            "StudyDescription",
            "ModalitiesInStudy",
            "AccessionNumber",
            "NumberOfStudyRelatedSeries",
        ]
        found = self._call(
            "study search", self.client.search_for_studies, search_filters=filters, fields=fields, limit=int(limit)
        )
        out = []
        for it in found or []:
            uid = str(_value(it, "0020000D"))
            if not uid:
                continue
            out.append(
                StudyInfo(
                    study_uid=uid,
                    patient_id=str(_value(it, "00100020")),
                    patient_name=str(_value(it, "00100010")),
                    date=str(_value(it, "00080020")),
                    description=str(_value(it, "00081030")),
                    modalities=_values(it, "00080061"),
                    accession=str(_value(it, "00080050")),
                    n_series=_int_or_none(_value(it, "00201206", None)),
                )
            )
        return sorted(out, key=lambda s: (s.date, s.study_uid), reverse=True)

    def search_series(self, study_uid: str, modality: str | None = None) -> list[SeriesInfo]:
        """The series of a study (all modalities unless ``modality``), by series number."""
        study_uid = _check_uid(study_uid, "study UID")
        filters = {"Modality": str(modality).strip().upper()} if modality else None
        fields = ["Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
        found = self._call(
            "series search",
            self.client.search_for_series,
            study_instance_uid=study_uid,
            search_filters=filters,
            fields=fields,
        )
        out = []
        for it in found or []:
            uid = str(_value(it, "0020000E"))
            if uid:
                out.append(
                    SeriesInfo(
                        study_uid=study_uid,
                        series_uid=uid,
                        modality=str(_value(it, "00080060")),
                        description=str(_value(it, "0008103E")),
                        number=_int_or_none(_value(it, "00200011", None)),
                        n_instances=_int_or_none(_value(it, "00201209", None)),
                    )
                )
        return sorted(out, key=lambda s: (s.number is None, s.number or 0, s.series_uid))

    def search_instances(
        self, study_uid: str, series_uid: str | None = None, modality: str | None = None
    ) -> list[dict]:
        """QIDO instance records (DICOM JSON) of a study or one series."""
        study_uid = _check_uid(study_uid, "study UID")
        kw: dict = {"study_instance_uid": study_uid}
        if series_uid:
            kw["series_instance_uid"] = _check_uid(series_uid, "series UID")
        if modality:
            kw["search_filters"] = {"Modality": str(modality).upper()}
        kw["fields"] = ["Modality", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"]
        return list(self._call("instance search", self.client.search_for_instances, **kw) or [])

    def series_info(self, study_uid: str, series_uid: str) -> SeriesInfo:
        for s in self.search_series(study_uid):
            if s.series_uid == series_uid:
                return s
        raise PacsError(f"{self.where}: no series {escape_text(series_uid)} in study {escape_text(study_uid)}")

    # -- WADO-RS ----------------------------------------------------------------------------
    def series_headers(self, study_uid: str, series_uid: str) -> list:
        """The series' instances as pydicom datasets without pixel data (WADO-RS metadata)."""
        import pydicom

        study_uid = _check_uid(study_uid, "study UID")
        series_uid = _check_uid(series_uid, "series UID")
        items = self._call("series metadata", self.client.retrieve_series_metadata, study_uid, series_uid)
        out = []
        for it in items or []:
            try:
                out.append(pydicom.Dataset.from_json(it, bulk_data_uri_handler=lambda *a: b""))
            except (ValueError, TypeError, KeyError) as e:
                raise PacsError(f"{self.where}: series metadata: unreadable instance ({_first(str(e))})") from None
        return out

    def download_series(
        self, study_uid: str, series_uid: str, folder, progress=None, cancel=None, expected: int | None = None
    ) -> int:
        """Stream a series' instances into ``folder`` (one file each); returns how many."""
        study_uid = _check_uid(study_uid, "study UID")
        series_uid = _check_uid(series_uid, "series UID")
        folder = Path(folder)
        report = progress or (lambda f, s: None)
        n = 0

        def run():
            nonlocal n
            for ds in self.client.iter_series(study_uid, series_uid):
                if cancel is not None and cancel():
                    raise Cancelled()
                ds.save_as(folder / f"{n:06d}.dcm", enforce_file_format=True)
                n += 1
                if expected:
                    report(min(n / expected, 1.0), f"{n} of {expected} images")
                else:
                    report(0.0, f"{n} images")

        self._call(f"series {series_uid}", run)
        return n

    def load_series(
        self,
        study_uid: str,
        series_uid: str,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        check_modality: bool = True,
    ):
        """The series as a `Scan` read by ``load_scan`` (full geometry); ``scan.path`` is the
        series' DICOMweb address, ``scan.metadata["dicomweb"]`` names base, study and series.

        ``progress(fraction, text)`` is called per image; ``cancel()`` returning True stops the
        download with `Cancelled`. Non-image series (SR, SEG, PR, ...) are refused in one line.
        """

        study_uid = _check_uid(study_uid, "study UID")
        series_uid = _check_uid(series_uid, "series UID")
        info = self.series_info(study_uid, series_uid) if check_modality else None
        address = series_address(self.url, study_uid, series_uid)
        if info is not None and not info.is_image:
            raise PacsError(
                f"{address}: the series is {info.modality or 'of no modality'}, not an image "
                f"({', '.join(IMAGE_MODALITIES)})"
            )
        tmp = tempfile.mkdtemp(prefix="resmtnet-wado-")
        try:
            n = self.download_series(
                study_uid, series_uid, tmp, progress, cancel, expected=info.n_instances if info else None
            )
            if n == 0:
                raise PacsError(f"{address}: the series has no images")
            if cancel is not None and cancel():
                raise Cancelled()
            try:
                scan = load_scan(tmp)
            except ScanReadError as e:
                raise PacsError(f"{address}: {e.problem}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        scan.path = address
        scan.metadata["dicomweb"] = {"url": self.url, "study_uid": study_uid, "series_uid": series_uid}
        return scan

    # -- STOW-RS ----------------------------------------------------------------------------
    def store(self, datasets: Iterable) -> list[str]:
        """Store DICOM datasets (STOW-RS); returns their SOP Instance UIDs. A PACS that
        refuses any of them is one `PacsError` line naming the first failure."""
        datasets = [_file_format(ds) for ds in datasets]
        if not datasets:
            return []
        answer = self._call("store", self.client.store_instances, datasets)
        failed = list(getattr(answer, "FailedSOPSequence", []) or [])
        if failed:
            f = failed[0]
            reason = getattr(f, "FailureReason", "?")
            raise PacsError(
                f"{self.where}: store: {len(failed)} of {len(datasets)} object(s) refused "
                f"(first: {getattr(f, 'ReferencedSOPInstanceUID', '?')}, reason {reason})"
            )
        return [str(ds.SOPInstanceUID) for ds in datasets]

    def confirm_stored(self, study_uid: str, sop_uids: Iterable[str]) -> list[str]:
        """The given SOP instances that a QIDO query of the study does NOT find (empty: all there)."""
        have = {str(_value(it, "00080018")) for it in self.search_instances(study_uid)}
        return [u for u in sop_uids if u not in have]


def _file_format(ds):
    """``ds`` as a DICOM file (PS3.10: preamble, 'DICM', file meta), the form STOW-RS expects
    and WADO-RS gives back; datasets made in memory often lack it."""
    if getattr(ds, "preamble", None) is not None and getattr(ds, "file_meta", None) is not None:
        return ds
    from io import BytesIO

    import pydicom

    buf = BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except (ValueError, AttributeError, TypeError) as e:
        raise PacsError(
            f"store: object {getattr(ds, 'SOPInstanceUID', '?')} is not a complete DICOM object ({_first(str(e))})"
        ) from None
    buf.seek(0)
    return pydicom.dcmread(buf)


def open_series(address: str, **pacs_kw):
    """The `Scan` at a DICOMweb series address (``BASE/studies/STUDY/series/SERIES``)."""
    base, study, series = parse_series_address(address)
    return Pacs(base, **pacs_kw).load_series(study, series)


def _first(text: str) -> str:
    text = str(text).strip()
    line = text.splitlines()[0] if text else ""
    # requests' messages repeat urllib3's object reprs; keep them short
    line = re.sub(r"<urllib3[^>]*>", "", line)
    return " ".join(line.split())[:240]
