"""`make pacs`: store the bundled chest CT (lung1) as a DICOM series in the local Orthanc that
``scripts/orthanc.sh start`` runs, and say how to open it from napari or screen it.

    scripts/orthanc.sh start && .venv/bin/python scripts/pacs_demo.py [--copies N]

``--copies N`` stores N studies (new patient and UIDs each; the same pixels) to have an archive
to screen (benchmarks/screening.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ORTHANC_DIR = Path(
    os.environ.get("RESMTNET_ORTHANC_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "resmtnet-orthanc"
)


def scan_datasets(scan, patient_id: str, description: str = "lung1 sample chest CT"):
    """A CT `Scan` as one pydicom dataset per slice (signed 16 bit HU, its full geometry)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    d = np.asarray(scan.direction, float)  # array order: rows world (z, y, x), columns index (z, y, x)
    row_dir, col_dir = d[::-1, 2], d[::-1, 1]  # world x, y, z of the column (x) and row (y) index axes
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    vol = np.clip(np.round(np.asarray(scan.array, np.float32)), -32768, 32767).astype(np.int16)
    out = []
    for k in range(vol.shape[0]):
        pos = scan.index_to_world(np.array([[k, 0.0, 0.0]]))[0][::-1]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer = "CT", "napari-resmtnet sample"
        ds.PatientID, ds.PatientName = patient_id, "Sample^Lung1"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "090000", "1", ""
        ds.StudyDescription, ds.SeriesDescription = "chest CT", description
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = [float(scan.spacing[1]), float(scan.spacing[2])]
        ds.SliceThickness = float(scan.spacing[0])
        ds.PositionReferenceIndicator = ""
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = vol[k].tobytes()
        out.append(ds)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=1, help="studies to store (default 1)")
    a = p.parse_args(argv)
    url_file, cred = ORTHANC_DIR / "url", ORTHANC_DIR / "credentials"
    if not url_file.is_file():
        print("pacs_demo: no local Orthanc; run scripts/orthanc.sh start first", file=sys.stderr)
        return 1
    url = url_file.read_text().strip()
    os.environ["RESMTNET_PACS_TOKEN_FILE"] = str(cred)
    from napari_resmtnet import load_scan, sample_path
    from napari_resmtnet.io.formats import ScanReadError
    from napari_resmtnet.io.pacs import Pacs, PacsError

    try:
        scan = load_scan(sample_path("lung1"))
        pacs = Pacs(url)
        for i in range(a.copies):
            pacs.store(scan_datasets(scan, patient_id=f"LUNG1-{i + 1:04d}"))
    except (PacsError, ScanReadError) as e:
        print(f"pacs_demo: {e}", file=sys.stderr)
        return 1
    print(f"The sample chest CT is in the local PACS ({a.copies} study(ies), patient IDs LUNG1-0001...).")
    print(f"  napari: Plugins > Open from PACS (DICOMweb); URL {url}; credentials {cred}; Search, open the CT")
    print(f"  screen: RESMTNET_PACS_TOKEN_FILE={cred} .venv/bin/resmtnet screen --pacs {url} --out screening/")
    print("  stop:   scripts/orthanc.sh stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
