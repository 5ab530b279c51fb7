"""Nodule findings as DICOM objects a PACS accepts, written with ``highdicom``:

* a **Segmentation** (SEG, binary) with one segment per nodule: the ellipsoid inscribed in the
  nodule's box on the CT's own slices (the detector gives boxes, not outlines; this says so
  in the segment's algorithm and label);
* a **Comprehensive 3D SR** with the TID 1500 measurement report: per nodule a volumetric
  measurement group (TID 1411) with the same ellipsoid as a 3D volume surface in the CT's
  frame of reference (world mm), finding "Nodule" in "Lung", diameter (mm), volume (mm3), the
  detection probability and the probability of malignancy, the label, the algorithm and a
  tracking identifier shared with the nodule's SEG segment; where the model measured the
  nodule (`Detections.findings`), also its long and short axis (mm), the volume of its mask,
  its type (the reader's override or the model's call) and the Lung-RADS v2022 category
  (decision support).

Both reference the source CT series (its study, series, instances and frame of reference) and
go into the source study as new series. Only nodules the reader **accepted** are included
unless ``include_unreviewed=True`` (then every nodule at or above the table's threshold, as
the model found them). Qt-free; imports highdicom only when called.

Source headers come from the files (`source_headers`) or the PACS
(`napari_resmtnet.io.pacs.Pacs.series_headers`); the table must belong to that series (the CT's
SeriesInstanceUID and geometry are checked). Failures are one `DicomExportError` line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..paths import escape_text
from ..boxes import voxel_to_world_points, world_to_voxel_points

__all__ = [
    "DicomExportError",
    "report_objects",
    "source_headers",
    "nodule_ellipsoids",
    "write_dicom_report",
    "MANUFACTURER",
]

MANUFACTURER = "napari-resmtnet"
#: Local codes (a "99" coding scheme is the DICOM way to name concepts no standard one has).
_SCHEME = "99RESMTNET"


class DicomExportError(InputError):
    """SR/SEG cannot be made for this table and series; ``str()`` is one line."""

    def __init__(self, message: str):
        super().__init__(escape_text(" ".join(str(message).split())))


def source_headers(path, seriesuid: str | None = None) -> list:
    """pydicom headers (no pixel data) of the DICOM series in a file's folder or a folder,
    the one with ``seriesuid`` when given (else the largest)."""
    import pydicom

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    by_series: dict[str, list] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, TypeError, EOFError):
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if uid and hasattr(ds, "ImagePositionPatient"):
            by_series.setdefault(uid, []).append(ds)
    if seriesuid:
        if seriesuid not in by_series:
            raise DicomExportError(f"{folder}: no DICOM series {seriesuid} here (the scan did not come from DICOM?)")
        return by_series[seriesuid]
    if not by_series:
        raise DicomExportError(f"{folder}: no DICOM image series here; DICOM SR/SEG need a DICOM source")
    return max(by_series.values(), key=len)


def _selected(table, include_unreviewed: bool) -> np.ndarray:
    vis = table.visible_mask()
    acc = np.asarray(table.reviewed, bool)
    return np.flatnonzero(acc | vis) if include_unreviewed else np.flatnonzero(acc)


def nodule_ellipsoids(table, index) -> np.ndarray:
    """(3, 2, 3) per nodule: the three axis end-point pairs of the box's inscribed ellipsoid
    in LPS world mm (x, y, z), the SCOORD3D ELLIPSOID graphic data."""

    geom = table.geometry
    b = np.asarray(table.boxes[index], float)
    lo, hi = b[:3], b[3:]
    c = (lo + hi) / 2
    out = np.zeros((3, 2, 3))
    for ax in range(3):
        a, z = c.copy(), c.copy()
        a[ax], z[ax] = lo[ax], hi[ax]
        w = voxel_to_world_points(np.stack([a, z]), geom)
        out[ax] = w[:, ::-1]
    # major axis first (the DICOM ELLIPSOID order: major, minor, third)
    lengths = np.linalg.norm(out[:, 0] - out[:, 1], axis=1)
    return out[np.argsort(-lengths, kind="stable")]


def _slice_index(headers, table) -> list[int]:
    """For every source header, the index of its slice in the table's image (array z)."""

    pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])  # x, y, z
    idx = world_to_voxel_points(pos[:, ::-1], table.geometry)  # -> (z, y, x) voxels
    if np.abs(idx[:, 1:]).max() > 0.01 or np.abs(idx[:, 0] - np.round(idx[:, 0])).max() > 0.01:
        raise DicomExportError(
            "the source series' slice positions do not match the image the nodules were marked "
            "on (another series, or resampled?)"
        )
    k = np.round(idx[:, 0]).astype(int)
    nz = int(table.shape[0])
    if k.min() < 0 or k.max() >= nz or len(set(k.tolist())) != len(k):
        raise DicomExportError("the source series' slices do not map one-to-one onto the image's slices")
    return k.tolist()


def _masks(table, index, nz_ny_nx) -> np.ndarray:
    """(nz, ny, nx, n) bool: ellipsoid inscribed in each selected box (voxel centres inside)."""
    nz, ny, nx = nz_ny_nx
    out = np.zeros((nz, ny, nx, len(index)), bool)
    for j, i in enumerate(index):
        b = np.asarray(table.boxes[i], float)
        c, r = (b[:3] + b[3:]) / 2, np.maximum((b[3:] - b[:3]) / 2, 0.5)
        lo = np.clip(np.floor(c - r).astype(int), 0, [nz - 1, ny - 1, nx - 1])
        hi = np.clip(np.ceil(c + r).astype(int) + 1, 1, [nz, ny, nx])
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0
        if not inside.any():  # a box smaller than a voxel: its centre voxel
            inside[tuple(np.clip(np.round(c).astype(int) - lo, 0, np.array(inside.shape) - 1))] = True
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2], j] = inside
    return out


def report_objects(table, headers, include_unreviewed: bool = False, series_number: int = 901):
    """``[seg, sr]`` (pydicom datasets) for the selected nodules of ``table`` on the CT series
    with ``headers``; None when no nodule is selected."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    if table.ndim != 3:
        raise DicomExportError("DICOM SR/SEG are written for CT series; this is a radiograph")
    headers = [h for h in headers if hasattr(h, "ImagePositionPatient")]
    if not headers:
        raise DicomExportError("no source CT images to reference")
    uid = table.image.get("seriesuid", "")
    if uid and str(headers[0].SeriesInstanceUID) != uid:
        raise DicomExportError(f"the nodules belong to series {uid}, not to {headers[0].SeriesInstanceUID}")
    index = _selected(table, include_unreviewed)
    if not len(index):
        return None
    ks = _slice_index(headers, table)
    order = np.argsort(ks)
    headers = [headers[i] for i in order]
    ks = [ks[i] for i in order]
    info = table.model_info or {}
    algo = hd.AlgorithmIdentificationSequence(
        name=str(info.get("name") or "Res-MTNet"),
        version=str(info.get("version") or "?"),
        family=codes.cid7162.ArtificialIntelligence,
    )
    shape = tuple(int(s) for s in table.shape)
    masks = _masks(table, index, shape)[ks]  # frames in source order
    tracking = [(f"nodule {int(table.ids[i])}", hd.UID()) for i in index]
    segments = []
    for j, i in enumerate(index):
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=j + 1,
                segment_label=f"nodule {int(table.ids[i])} ({table.label[i]}; ellipsoid in detection box)",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=(
                    hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
                    if table.reviewed[i]
                    else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
                ),
                algorithm_identification=algo,
                tracking_id=tracking[j][0],
                tracking_uid=tracking[j][1],
                anatomic_regions=[codes.SCT.Lung],
            )
        )
    try:
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="Res-MTNet",
            software_versions=str(info.get("version") or "?"),
            device_serial_number="0",
            series_description="Lung nodules (Res-MTNet)",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DicomExportError(
            f"cannot make the DICOM SEG: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None

    sr_algo = hd.sr.AlgorithmIdentification(
        name=str(info.get("name") or "Res-MTNet"), version=str(info.get("version") or "?")
    )
    frame_uid = str(headers[0].FrameOfReferenceUID)
    source_series = hd.sr.SourceSeriesForSegmentation(str(headers[0].SeriesInstanceUID))
    unity = CodedConcept("1", "UCUM", "no units")
    groups = []
    diam = table.diameter_mm()
    sizes = table.sizes_mm()
    for j, i in enumerate(index):
        ell = nodule_ellipsoids(table, i).reshape(6, 3)
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
            graphic_data=ell,
            frame_of_reference_uid=frame_uid,
            source_series=source_series,
        )
        f = table.findings[i] if i < len(table.findings) else {}
        measured = "volume_mm3" in f
        volume = float(f["volume_mm3"]) if measured else float(np.pi / 6 * np.prod(sizes[i]))
        measurements = []
        for key, code in (("long_axis_mm", codes.SCT.LongAxis), ("short_axis_mm", codes.SCT.ShortAxis)):
            if key in f:
                measurements.append(
                    hd.sr.Measurement(name=code, value=float(f[key]), unit=codes.UCUM.Millimeter, algorithm_id=sr_algo)
                )
        measurements += [
            hd.sr.Measurement(
                name=codes.SCT.Diameter, value=float(diam[i]), unit=codes.UCUM.Millimeter, algorithm_id=sr_algo
            ),
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=volume, unit=codes.UCUM.CubicMillimeter, algorithm_id=sr_algo
            ),
            hd.sr.Measurement(
                name=CodedConcept("detection-p", _SCHEME, "Probability of nodule (detection)"),
                value=float(table.probability[i]),
                unit=unity,
                algorithm_id=sr_algo,
            ),
            hd.sr.Measurement(
                name=CodedConcept("malignancy-p", _SCHEME, "Probability of malignancy"),
                value=float(table.malignancy[i]),
                unit=unity,
                algorithm_id=sr_algo,
            ),
        ]
        label = str(table.label[i])
        evaluations = [
            hd.sr.QualitativeEvaluation(
                name=CodedConcept("label", _SCHEME, "Nodule assessment"),
                value=CodedConcept(label, _SCHEME, label.capitalize()),
            )
        ]
        g = table.grade(i)
        if g.nodule_type:
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=CodedConcept("type", _SCHEME, f"Nodule type ({g.type_from})"),
                    value=CodedConcept(g.nodule_type, _SCHEME, g.nodule_type.capitalize()),
                )
            )
        if g.category:
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=CodedConcept("lungrads", _SCHEME, "Lung-RADS v2022 category (decision support)"),
                    value=CodedConcept(f"lungrads-{g.category}", _SCHEME, f"Lung-RADS {g.category}"),
                )
            )
        review = "accepted by reader" if table.reviewed[i] else "unreviewed model finding"
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=CodedConcept("review", _SCHEME, "Review state"),
                value=CodedConcept(review.split()[0], _SCHEME, review.capitalize()),
            )
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking[j][1], identifier=tracking[j][0]),
                referenced_volume_surface=surface,
                finding_type=codes.SCT.Nodule,
                algorithm_id=sr_algo,
                finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
                measurements=measurements,
                qualitative_evaluations=evaluations,
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name="Res-MTNet"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*headers, seg],
            content=report,
            series_instance_uid=hd.UID(),
            series_number=series_number + 1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description="Lung nodule report (Res-MTNet)",
            is_complete=True,
            is_final=False,
            is_verified=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DicomExportError(
            f"cannot make the DICOM SR: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return [seg, sr]


def write_dicom_report(table, source, out_base, include_unreviewed: bool = False) -> list[Path]:
    """Write the SEG and the SR of ``table``'s accepted nodules (see `report_objects`) beside
    ``out_base`` as ``<out_base>_seg.dcm`` and ``<out_base>_sr.dcm``, for the DICOM series in
    ``source`` (a folder or one of its files) that the table belongs to. Each file is written
    to a temporary name and renamed, so a failure leaves no half-written object. Returns the
    two paths; `DicomExportError` (one line) when there is nothing to report or no series."""
    import os

    import pydicom

    headers = source_headers(source, (table.image or {}).get("seriesuid") or None)
    objs = report_objects(table, headers, include_unreviewed=include_unreviewed)
    if objs is None:
        raise DicomExportError("no accepted nodule to put in a DICOM SR/SEG (accept some first)")
    base = Path(out_base)
    base = base.with_name(base.stem) if base.suffix.lower() in (".html", ".dcm") else base
    out = []
    for ds, kind in zip(objs, ("seg", "sr")):
        target = base.with_name(f"{base.name}_{kind}.dcm")
        tmp = target.with_name(target.name + ".tmp")
        try:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DicomExportError(f"cannot write {target}: {e.strerror or e}") from None
        out.append(target)
    return out
