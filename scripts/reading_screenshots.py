"""Screenshots of the reading workflow on the bundled lung1 CT, for the README.

    xvfb-run -a python scripts/reading_screenshots.py [--out docs]

Opens lung1 through the plugin's reader, runs the bundled Res-MTNet in the widget, accepts
the most probable nodule, rejects the next one, moves to the next unreviewed nodule and
saves ``screenshot_review.png`` (the review state in the canvas, table and counts), then
switches to 3D and saves ``screenshot_3d.png`` (lung surface, nodules as spheres).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs")
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args(argv)
    os.environ["RESMTNET_AUTOSAVE_RESTORE"] = "never"

    import napari
    from qtpy.QtCore import QTimer

    from napari_resmtnet._sample_data import sample_path
    from napari_resmtnet._widget import NoduleWidget
    from napari_resmtnet.review import reading_order

    viewer = napari.Viewer(title="napari-resmtnet: reading lung1")
    viewer.window._qt_window.resize(1400, 950)
    viewer.open(str(sample_path("lung1")), plugin="napari-resmtnet")
    w = NoduleWidget(viewer)
    viewer.window.add_dock_widget(w, name="Detect nodules", area="right")
    state = {"waited": 0.0, "step": 0}

    def start():
        w.detect()
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
            print("no nodules found:", w.status_label.text(), file=sys.stderr)
            viewer.close()
            return
        order = reading_order(t)
        w.focus_nodule(order[0])
        w.accept_selected()
        if len(order) > 1:
            w.focus_nodule(order[1])
            w.reject_selected()
        w.focus_nodule(order[0])
        QTimer.singleShot(1500, shoot_review)

    def shoot_review():
        viewer.screenshot(os.path.join(a.out, "screenshot_review.png"), canvas_only=False)
        viewer.dims.ndisplay = 3
        viewer.scene.camera.angles = (0, 30, 80)
        QTimer.singleShot(1000, wait_lungs)

    def wait_lungs():
        if w._lung_worker is not None and state["step"] < 600:
            state["step"] += 1
            QTimer.singleShot(500, wait_lungs)
            return
        viewer.reset_view()
        QTimer.singleShot(1500, shoot_3d)

    def shoot_3d():
        viewer.screenshot(os.path.join(a.out, "screenshot_3d.png"), canvas_only=False)
        print("screenshots saved to", a.out)
        viewer.close()

    QTimer.singleShot(500, start)
    timer = QTimer()
    timer.setInterval(500)
    timer.timeout.connect(poll)
    timer.start()
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
