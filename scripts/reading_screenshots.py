"""The README's screenshots of the reading workflow on the bundled lung1 CT.

    xvfb-run -a -s '-screen 0 1280x1024x24' python scripts/reading_screenshots.py [--out docs/screenshots]

Opens lung1 through the plugin's reader, presses the widget's "Detect nodules" button (the
bundled Res-MTNet), centres the view on the most probable nodule, opens the three planes
("Three planes" button) and saves ``three_planes.png``: the axial view with the coronal and
sagittal ones below, each at the nodule, and the nodule table with all its columns (the
model's findings: type, long x short axis, volume, Lung-RADS) -- the dock is widened so they
fit. It then closes the planes, switches to 3D, waits for the lung surface and saves
``view_3d.png`` (the lungs as a translucent surface, the nodule as a wire box).

Run with QT_QPA_PLATFORM unset or ``xcb`` (software OpenGL under Xvfb renders napari's
volumes); the window is larger than the Xvfb screen, which the window grab does not mind.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import warnings

#: window size and width of the widget's dock (pixels)
WINDOW = (1900, 1180)
DOCK_WIDTH = 1150
#: the 3D camera (napari's Euler angles, degrees) and its zoom relative to reset_view's
ANGLES = tuple(float(v) for v in os.environ.get("SHOT_ANGLES", "0,-20,70").split(","))
ZOOM = 0.85


def _close_toasts(viewer) -> None:
    """Close napari's notification pop-ups (they would cover the canvas)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for n in viewer.window._qt_window.findChildren(NapariQtNotification):
        n.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("docs", "screenshots"))
    p.add_argument("--timeout", type=float, default=1200, help="longest wait for the detection (s)")
    a = p.parse_args(argv)
    faulthandler.enable()
    os.environ["RESMTNET_AUTOSAVE_RESTORE"] = "never"
    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    os.makedirs(a.out, exist_ok=True)

    import napari
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_resmtnet._sample_data import sample_path
    from napari_resmtnet._widget import NoduleWidget
    from napari_resmtnet.annotations.review import reading_order

    viewer = napari.Viewer(title="napari-resmtnet: reading lung1")
    qt_window = viewer.window._qt_window
    qt_window.resize(*WINDOW)
    viewer.open(str(sample_path("lung1")), plugin="napari-resmtnet")
    w = NoduleWidget(viewer)
    dock = viewer.window.add_dock_widget(w, name="Detect nodules", area="right")
    # the layer controls and list are napari's, not the reading's: their width goes to the
    # canvas and the nodule table
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)
    viewer.window._qt_viewer.dockLayerList.setVisible(False)
    qt_window.resizeDocks([dock], [DOCK_WIDTH], Qt.Horizontal)
    state = {"waited": 0.0, "step": 0, "result": 1}

    def start():
        w.detect_panel.detect_button.click()  # the real button: the same path as a reader's click
        state["started"] = True

    def poll():
        if not state.get("started"):
            return
        state["waited"] += 0.5
        if w.is_running and state["waited"] < a.timeout:
            return
        timer.stop()
        t = w.nodules
        if t is None or not len(t):
            print("no nodules found:", w.detect_panel.status_label.text(), file=sys.stderr)
            viewer.close()
            return
        print(w.detect_panel.status_label.text())
        w.views_panel.planes_button.click()  # "Three planes"
        w.focus_nodule(reading_order(t)[0])
        QTimer.singleShot(2000, shoot_planes)

    def shoot_planes():
        _close_toasts(viewer)
        qt_window.resizeDocks([dock], [DOCK_WIDTH], Qt.Horizontal)
        w.review_panel.table.resizeColumnsToContents()
        QTimer.singleShot(1000, shoot_planes_now)

    def shoot_planes_now():
        # the table's last columns (the model's findings) in view, should the dock be narrower
        w.review_panel.table.scrollToItem(w.review_panel.table.item(0, w.review_panel.table.columnCount() - 1))
        QApplication.processEvents()
        viewer.screenshot(os.path.join(a.out, "three_planes.png"), canvas_only=False)
        w.views_panel.planes_button.click()  # close the planes: the 3D view gets the whole height
        viewer.dims.ndisplay = 3
        QTimer.singleShot(1000, wait_lungs)

    def wait_lungs():
        lungs = [ly for ly in viewer.layers if (ly.metadata or {}).get("resmtnet_3d") == "lungs"]
        if not lungs and state["step"] < 600:
            state["step"] += 1
            QTimer.singleShot(500, wait_lungs)
            return
        if not lungs:
            print("warning: no lung surface", file=sys.stderr)
        viewer.reset_view()
        viewer.scene.camera.angles = ANGLES
        viewer.scene.camera.zoom *= ZOOM
        viewer.layers.selection.active = lungs[0] if lungs else None
        QTimer.singleShot(1500, shoot_3d)

    def shoot_3d():
        _close_toasts(viewer)
        viewer.screenshot(os.path.join(a.out, "view_3d.png"), canvas_only=False)
        print("screenshots saved to", a.out)
        state["result"] = 0
        viewer.close()

    QTimer.singleShot(500, start)
    timer = QTimer()
    timer.setInterval(500)
    timer.timeout.connect(poll)
    timer.start()
    napari.run()
    return state["result"]


if __name__ == "__main__":
    sys.exit(main())
