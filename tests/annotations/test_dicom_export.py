"""DICOM SR (TID 1500) + SEG of the accepted nodules: they read back with highdicom, reference
the source series, and map to the same world-mm centres; sent to the local Orthanc (STOW-RS)
and queried back (QIDO-RS) after a detection on a series opened through WADO-RS."""

from __future__ import annotations

import numpy as np
import pytest

from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.dicom_export import DicomExportError, report_objects, source_headers
from napari_resmtnet.io.formats import load_scan
from napari_resmtnet.annotations.table import NoduleTable, image_identity
from napari_resmtnet.scan import geometry_dict
from pacs_fixtures import dicom_files, new_uid, orthanc_address, write_ct_series

hd = pytest.importorskip("highdicom")


def _table(scan, boxes, reviewed):
    det = Detections(boxes, [0.9] * len(boxes), [0.2, 0.8, 0.5][: len(boxes)], geometry_dict(scan))
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.5)
    return t.with_reviewed([i + 1 for i, r in enumerate(reviewed) if r], True)


def check_objects(seg, sr, table, ct_series_uid, ct_sop_uids):
    """SEG and SR read back, reference the CT series, and give the table's centres."""
    seg = hd.seg.Segmentation.from_dataset(seg)
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series_uid
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= set(ct_sop_uids) and refs
    evidence = {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert ct_series_uid in evidence and seg.SeriesInstanceUID in evidence
    groups = sr.content.get_volumetric_roi_measurement_groups()
    accepted = np.flatnonzero(table.reviewed)
    want = table.centers_world_xyz()[accepted]
    assert len(groups) == seg.number_of_segments == len(accepted)
    for j, g in enumerate(groups):
        ellipsoid = np.asarray(g.roi.graphic_data, float)
        np.testing.assert_allclose(ellipsoid.mean(axis=0), want[j], atol=1e-3)
        names = [m.name.meaning for m in g.get_measurements()]
        assert {"Diameter", "Volume", "Probability of malignancy"} <= set(names)
        # the SEG segment with the same tracking UID has its centroid at the same place
        seg_no = [d.SegmentNumber for d in seg.SegmentSequence if d.TrackingUID == g.tracking_uid]
        assert len(seg_no) == 1
        vol = seg.get_volume(segment_numbers=seg_no, combine_segments=False)
        ijk = np.argwhere(np.asarray(vol.array)[..., 0] > 0).mean(axis=0)
        xyz = (vol.affine @ np.r_[ijk, 1.0])[:3]
        np.testing.assert_allclose(xyz, want[j], atol=1.5)


def test_sr_seg_round_trip_on_files(tmp_path):
    info = write_ct_series(tmp_path / "ct", seed=4)
    scan = load_scan(info["folder"])
    table = _table(scan, [[5, 10, 12, 10, 20, 22], [3, 30, 30, 6, 36, 38], [8, 5, 5, 9, 9, 9]], [True, True, False])
    headers = source_headers(info["folder"], scan.seriesuid)
    seg, sr = report_objects(table, headers)
    assert (seg.Modality, sr.Modality) == ("SEG", "SR")
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == info["study_uid"]
    assert seg.FrameOfReferenceUID == info["frame_uid"]
    check_objects(seg, sr, table, info["series_uid"], [h.SOPInstanceUID for h in headers])
    # unreviewed candidates only when asked
    seg_all, _ = report_objects(table, headers, include_unreviewed=True)
    assert len(seg_all.SegmentSequence) == 3
    assert report_objects(table.with_reviewed([1, 2], False), headers) is None


def test_sr_carries_the_findings_and_the_readers_type(tmp_path):
    """Axes, the mask's volume, the effective type and the Lung-RADS category go into the SR."""
    info = write_ct_series(tmp_path / "ct", seed=5)
    scan = load_scan(info["folder"])
    f = {"texture": "solid", "long_axis_mm": 9.0, "short_axis_mm": 7.0, "mean_diameter_mm": 8.0, "volume_mm3": 250.0}
    det = Detections([[5, 10, 12, 10, 20, 22]], [0.9], [0.3], geometry_dict(scan), findings=[f])
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.5).with_reviewed([1], True)
    t = t.with_texture([1], "ground-glass")
    _, sr = report_objects(t, source_headers(info["folder"], scan.seriesuid))
    g = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()[0]
    m = {x.name.meaning: x.value for x in g.get_measurements()}
    assert m["Long axis"] == 9.0 and m["Short axis"] == 7.0 and m["Volume"] == 250.0
    q = {e.name.meaning: e.value.meaning for e in g.get_qualitative_evaluations()}
    assert q["Nodule type (reader)"] == "Ground-glass"
    assert q["Lung-RADS v2022 category (decision support)"] == "Lung-RADS 2"  # ground-glass < 30 mm


def test_dicom_report_files_read_back(tmp_path):
    from napari_resmtnet.annotations.dicom_export import write_dicom_report

    info = write_ct_series(tmp_path / "ct", seed=6)
    scan = load_scan(info["folder"])
    table = _table(scan, [[5, 10, 12, 10, 20, 22], [3, 30, 30, 6, 36, 38]], [True, False])
    seg_path, sr_path = write_dicom_report(table, info["folder"], tmp_path / "report.html")
    assert (seg_path.name, sr_path.name) == ("report_seg.dcm", "report_sr.dcm")
    import pydicom

    headers = source_headers(info["folder"], scan.seriesuid)
    check_objects(
        pydicom.dcmread(seg_path),
        pydicom.dcmread(sr_path),
        table,
        info["series_uid"],
        [h.SOPInstanceUID for h in headers],
    )
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(DicomExportError, match="no accepted nodule"):
        write_dicom_report(table.with_reviewed([1], False), info["folder"], tmp_path / "none")


def test_refuses_another_series(tmp_path):
    a = write_ct_series(tmp_path / "a", seed=1)
    b = write_ct_series(tmp_path / "b", seed=1, origin=(0.0, 0.0, 50.0))
    scan = load_scan(a["folder"])
    table = _table(scan, [[5, 10, 12, 10, 20, 22]], [True])
    with pytest.raises(DicomExportError, match="belong to series"):
        report_objects(table, source_headers(b["folder"]))
    moved = dict(table.image, seriesuid="")
    table.image = moved
    with pytest.raises(DicomExportError, match="slice positions do not match"):
        report_objects(table, source_headers(b["folder"]))


@pytest.mark.slow
def test_detect_send_and_query_back_through_orthanc(tmp_path, monkeypatch):
    """Open through WADO-RS, detect with the bundled model, accept, send SR + SEG (STOW-RS),
    find them with QIDO-RS, read them back: they reference the series and the centres."""
    url, cred = orthanc_address()
    monkeypatch.setenv("RESMTNET_PACS_TOKEN_FILE", str(cred))
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.io.pacs import Pacs

    pacs = Pacs(url)
    info = write_ct_series(tmp_path / "ct", seed=5, shape=(24, 64, 64), patient_id=f"SR-{new_uid()[-8:]}")
    pacs.store(dicom_files(info["folder"]))
    scan = pacs.load_series(info["study_uid"], info["series_uid"])
    pred = Predictor("CT", threads=1)
    det = pred.predict(scan)
    table = NoduleTable.from_detections(det, image_identity(scan), threshold=pred.threshold, model_info=pred.model_info)
    assert table.visible_mask().any(), "the bundled model found nothing on the test CT"
    top = int(table.ids[int(np.argmax(table.probability))])
    table = table.with_reviewed([top], True)
    headers = pacs.series_headers(info["study_uid"], info["series_uid"])
    objs = report_objects(table, headers)
    stored = pacs.store(objs)
    assert pacs.confirm_stored(info["study_uid"], stored) == []

    found = {s.modality: s for s in pacs.search_series(info["study_uid"])}
    assert {"CT", "SEG", "SR"} <= set(found)
    back = {}
    for mod in ("SEG", "SR"):
        back[mod] = list(pacs.client.retrieve_series(info["study_uid"], found[mod].series_uid))
        assert len(back[mod]) == 1
    check_objects(back["SEG"][0], back["SR"][0], table, info["series_uid"], [h.SOPInstanceUID for h in headers])
