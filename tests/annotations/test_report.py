"""The HTML reading report: accepted nodules only (unless asked), key images, model info."""

import re

import numpy as np

from napari_resmtnet.detections import Detections
from napari_resmtnet.annotations.table import NoduleTable, image_identity
from napari_resmtnet.annotations.report import key_image, report_rows, write_html_report
from napari_resmtnet.scan import Scan


def table_and_array():
    arr = np.full((20, 64, 64), -800, np.int16)
    arr[5:9, 12:20, 14:22] = 30  # nodule 1
    scan = Scan(arr, (2.0, 0.7, 0.7), (-100.0, 10.0, -50.0), np.eye(3), "CT", seriesuid="1.2.3")
    det = Detections(
        [[4.2, 10, 12, 8.6, 20, 24], [10.0, 30, 30, 12.0, 36, 40], [15.1, 40, 40, 15.3, 44, 44]],
        [0.9, 0.3, 0.7],
        [0.87, 0.2, 0.6],
        Detections.geometry_of(scan),
        {"model_info": {"name": "resmtnet", "version": "1.0", "sha256": "ab" * 32}},
    )
    t = NoduleTable.from_detections(det, image_identity(scan), threshold=0.25)
    return t.with_review([1], "accepted").with_review([3], "rejected"), arr


def test_report_has_accepted_nodules_key_images_and_model(tmp_path):
    t, arr = table_and_array()
    assert report_rows(t) == [0]
    assert report_rows(t, ("accepted", "unreviewed", "rejected")) == [0, 2, 1]
    p = write_html_report(tmp_path / "r" / "report.html", t, arr)
    text = p.read_text(encoding="utf-8")
    assert "Research use only" in text and "resmtnet 1.0" in text and "threshold 0.25" in text
    assert text.count("<img ") == 1 and "1 nodule(s) reported of 3 kept" in text
    assert re.search(r"<td>1</td><td>1</td><td>malignant</td><td>0.87</td><td>0.90</td>", text)
    assert "rejected" not in text.split("<table>")[1]
    everything = write_html_report(tmp_path / "all.html", t, arr, states=("accepted", "unreviewed", "rejected"))
    assert everything.read_text(encoding="utf-8").count("<img ") == 3
    assert not list(tmp_path.glob("r/.report-*"))  # atomic: no temporary file left


def test_key_image_is_the_centre_slice_with_the_box():
    t, arr = table_and_array()
    img = key_image(arr, t, 0, size_px=128)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    red = (img[..., 0] > 200) & (img[..., 1] < 80)
    assert red.sum() > 100  # the malignant box is drawn
    centre = img[54:74, 54:74, 0]
    assert centre.mean() > 150  # the bright nodule is in the middle
    # near the image border the crop is padded, not shifted
    t2, _ = t.added([5, 0, 0, 6, 4, 4], label="benign")
    assert key_image(arr, t2, 3, size_px=64).shape == (64, 64, 3)
    # a radiograph
    cxr = Scan(
        np.random.default_rng(0).integers(0, 4000, (100, 120)).astype(np.uint16),
        (0.5, 0.5),
        (0, 0),
        np.eye(2),
        "CXR",
        seriesuid="c",
    )
    tc = NoduleTable.from_detections(
        Detections([[10, 20, 30, 40]], [0.8], [0.1], Detections.geometry_of(cxr)), image_identity(cxr)
    )
    assert key_image(cxr.array, tc, 0).shape == (256, 256, 3)
