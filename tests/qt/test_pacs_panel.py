"""The Open-from-PACS panel, driven by mouse clicks in a headless napari: against the local
Orthanc (search, open identical to the files, send SR + SEG, query back) and against a PACS
that is down or offers non-image series."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qtpy")
napari = pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402

from napari_resmtnet._qt.pacs_panel import PacsPanel  # noqa: E402
from napari_resmtnet.io.pacs import Pacs, PacsError, SeriesInfo, StudyInfo  # noqa: E402
from pacs_fixtures import dicom_files, new_uid, orthanc_address, write_ct_series  # noqa: E402

pytestmark = pytest.mark.gui


def click(qtbot, widget):
    qtbot.mouseClick(widget, Qt.LeftButton)


def click_row(qtbot, table, row, double=False):
    rect = table.visualItemRect(table.item(row, 0))
    (qtbot.mouseDClick if double else qtbot.mouseClick)(table.viewport(), Qt.LeftButton, pos=rect.center())


def wait_idle(qtbot, panel, timeout=60000):
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=timeout)


@pytest.fixture
def notes(monkeypatch):
    from napari_resmtnet._qt import pacs_panel

    got = []
    monkeypatch.setattr(pacs_panel, "_notify_error", got.append)
    return got


def test_open_from_orthanc_identical_to_files_then_send(make_napari_viewer, qtbot, tmp_path, monkeypatch, notes):
    url, cred = orthanc_address()
    monkeypatch.delenv("RESMTNET_PACS_TOKEN", raising=False)
    info = write_ct_series(tmp_path / "ct", seed=7, patient_id=f"GUI-{new_uid()[-8:]}")
    monkeypatch.setenv("RESMTNET_PACS_TOKEN_FILE", str(cred))
    Pacs(url).store(dicom_files(info["folder"]))

    viewer = make_napari_viewer()
    panel = PacsPanel(viewer)
    viewer.window.add_dock_widget(panel)
    panel.url_edit.setText(url)
    panel.token_edit.setText(str(cred))
    qtbot.keyClicks(panel.patient_id_edit, info["patient_id"])
    click(qtbot, panel.search_button)
    wait_idle(qtbot, panel)
    assert panel.study_table.rowCount() == 1, panel.status_label.text()
    click_row(qtbot, panel.study_table, 0)
    wait_idle(qtbot, panel)
    assert panel.series_table.rowCount() == 1
    click_row(qtbot, panel.series_table, 0)
    assert panel.open_button.isEnabled()
    click(qtbot, panel.open_button)
    wait_idle(qtbot, panel)
    assert len(viewer.layers) == 1, panel.status_label.text()
    layer = viewer.layers[0]

    from napari_resmtnet._reader import read_scan

    data, kw, _ = read_scan(str(info["folder"]))[0]
    np.testing.assert_array_equal(layer.data, data)
    np.testing.assert_allclose(layer.scale, kw["scale"])
    np.testing.assert_allclose(layer.translate, kw["translate"])
    np.testing.assert_allclose(layer.affine.affine_matrix, kw["affine"])
    assert layer.metadata["seriesuid"] == info["series_uid"]

    # nodules on it (from the bundled model), one accepted, then Send
    from napari_resmtnet.inference.predictor import Predictor
    from napari_resmtnet.annotations.table import META_KEY, NoduleTable, image_identity

    scan = Pacs(url).load_series(info["study_uid"], info["series_uid"])
    pred = Predictor("CT", threads=1)
    table = NoduleTable.from_detections(
        pred.predict(scan), image_identity(scan), threshold=pred.threshold, model_info=pred.model_info
    )
    assert len(table), "the bundled model found nothing on the test CT"
    top = int(table.ids[int(np.argmax(table.probability))])
    table = table.with_reviewed([top], True)
    viewer.add_shapes(name="nodules", metadata={META_KEY: table, "image_layer": layer.name})
    viewer.layers.selection.active = layer
    click(qtbot, panel.send_button)
    wait_idle(qtbot, panel)
    assert panel.status_label.text().startswith("Sent and confirmed"), panel.status_label.text()
    mods = {s.modality for s in Pacs(url).search_series(info["study_uid"])}
    assert {"CT", "SEG", "SR"} <= mods
    assert notes == []


class FakePacs:
    def __init__(self, down=False):
        self.down = down

    def search_studies(self, **kw):
        if self.down:
            raise PacsError(
                "PACS http://127.0.0.1:9/dicom-web: study search: connection refused (after 4 tries): "
                "is the PACS running at this address?"
            )
        return [StudyInfo("1.2.3", "P1", "Doe^J", "20240101", "chest", ("CT", "SR"))]

    def search_series(self, study_uid):
        return [
            SeriesInfo("1.2.3", "1.2.3.1", "SR", "report", 9, 1),
            SeriesInfo("1.2.3", "1.2.3.2", "CT", "chest", 2, 40),
        ]

    def load_series(self, study, series, progress=None, cancel=None):
        import time

        for i in range(200):
            if cancel():
                from napari_resmtnet.io.pacs import Cancelled

                raise Cancelled()
            progress(i / 200, f"{i} of 200 images")
            time.sleep(0.02)
        raise AssertionError("not cancelled")


def test_pacs_down_is_one_line(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer()
    panel = PacsPanel(viewer, pacs_factory=lambda url, tok: FakePacs(down=True))
    panel.url_edit.setText("http://127.0.0.1:9/dicom-web")
    click(qtbot, panel.search_button)
    wait_idle(qtbot, panel, 10000)
    assert "connection refused" in panel.status_label.text() and "\n" not in panel.status_label.text()
    assert len(notes) == 1


def test_non_image_series_greyed_and_cancel(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer()
    panel = PacsPanel(viewer, pacs_factory=lambda url, tok: FakePacs())
    panel.url_edit.setText("http://127.0.0.1:9/dicom-web")
    click(qtbot, panel.search_button)
    wait_idle(qtbot, panel, 10000)
    click_row(qtbot, panel.study_table, 0)
    wait_idle(qtbot, panel, 10000)
    assert panel.series_table.rowCount() == 2
    click_row(qtbot, panel.series_table, 0)  # the SR: cannot be selected
    assert panel.selected_series() is None and not panel.open_button.isEnabled()
    click_row(qtbot, panel.series_table, 1)
    assert panel.selected_series().modality == "CT" and panel.open_button.isEnabled()
    click(qtbot, panel.open_button)
    qtbot.waitUntil(lambda: panel.progress_bar.value() > 0, timeout=5000)
    click(qtbot, panel.cancel_button)
    wait_idle(qtbot, panel, 10000)
    assert panel.status_label.text() == "Cancelled." and len(viewer.layers) == 0
    assert notes == []
