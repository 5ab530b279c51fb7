"""Shared by the PACS and screening tests: small CT series written with pydicom, and the local
Orthanc that ``scripts/orthanc.sh start`` runs (tests skip with the reason when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ORTHANC_DIR = Path(
    os.environ.get("RESMTNET_ORTHANC_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "resmtnet-orthanc"
)

# A tilted CT (rotated 20 degrees about the patient's z axis): geometry must survive the PACS.
_C, _S = np.cos(np.radians(20)), np.sin(np.radians(20))
TILTED_IOP = (_C, _S, 0.0, -_S, _C, 0.0)


def orthanc_address() -> tuple[str, Path]:
    """(DICOMweb URL, credentials file) of the running local Orthanc; skips the test otherwise."""
    url_file, cred = ORTHANC_DIR / "url", ORTHANC_DIR / "credentials"
    if not url_file.is_file() or not cred.is_file():
        pytest.skip(f"no local Orthanc: start one with scripts/orthanc.sh start (nothing in {ORTHANC_DIR})")
    url = url_file.read_text().strip()
    import requests

    user, _, password = cred.read_text().strip().partition(" ")[2].partition(":")
    try:
        r = requests.get(url.rsplit("/dicom-web", 1)[0] + "/system", auth=(user, password), timeout=3)
        r.raise_for_status()
    except requests.RequestException as e:
        pytest.skip(
            f"the local Orthanc at {url} does not answer ({type(e).__name__}); start it with scripts/orthanc.sh start"
        )
    return url, cred


def new_uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def ct_volume(seed: int, shape=(16, 48, 48)) -> np.ndarray:
    """HU volume: air outside a soft-tissue body, two dark lungs, a round nodule at a
    seed-dependent place. int16."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    nz, ny, nx = shape
    vol = np.full(shape, -1000, np.float32)
    body = ((y - ny / 2) / (0.45 * ny)) ** 2 + ((x - nx / 2) / (0.48 * nx)) ** 2 < 1
    vol[body] = 40
    for cx in (0.3 * nx, 0.7 * nx):
        lung = ((y - ny / 2) / (0.32 * ny)) ** 2 + ((x - cx) / (0.16 * nx)) ** 2 < 1
        vol[lung] = -850
    c = (nz / 2, ny / 2 + rng.uniform(-4, 4), 0.3 * nx + rng.uniform(-2, 2))
    vol[((z - c[0]) * 2.5) ** 2 + ((y - c[1]) * 0.7) ** 2 + ((x - c[2]) * 0.7) ** 2 < 16] = 20
    vol += rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(vol, -1024, 3000).astype(np.int16)


def write_ct_series(
    folder: Path,
    seed: int = 0,
    shape=(16, 48, 48),
    spacing=(2.5, 0.7, 0.7),
    iop=TILTED_IOP,
    origin=(-17.0, -25.0, -120.0),
    patient_id: str = "RESMTNET-T1",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str = "20240102",
    description: str = "chest CT",
) -> dict:
    """A CT series, one file per slice (ExplicitVRLittleEndian, unsigned 12 bit + rescale).
    ``origin`` is the world (x, y, z) of the first voxel. Returns its UIDs and folder."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    frame_uid = new_uid()
    vol = ct_volume(seed, shape)
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    for k in range(shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = new_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer = "CT", "resmtnet tests"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, patient_name, "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = study_date, "101010", "1", f"A{seed}"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 2, k + 1, description
        ds.StudyDescription = "chest"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(f"{v:.10f}") for v in iop]
        pos = np.asarray(origin, float) + normal * spacing[0] * k
        ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.PositionReferenceIndicator = ""
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP = 120
        ds.PixelData = (vol[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"CT{k:04d}.dcm", enforce_file_format=True)
    return {
        "folder": folder,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_uid": frame_uid,
        "patient_id": patient_id,
    }


def dicom_files(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))]
