"""``resmtnet demo``: napari with the bundled chest CT (or X-ray) and nodule detection run on it.

    resmtnet demo [--sample lung1|cxr|cube] [--screenshot FILE]

Opens the sample through the plugin's reader, docks the *Detect nodules* widget and presses
its button. With ``--screenshot`` the window is captured once detection has finished and the
program exits (for headless machines: run it under ``xvfb-run``).
"""

from __future__ import annotations

import argparse
import sys
from .._sample_data import sample_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="resmtnet demo", description=__doc__.split("\n")[0])
    p.add_argument("--sample", default="lung1", choices=["lung1", "cxr", "cube"])
    p.add_argument("--screenshot", help="save a screenshot of the window here and exit")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for detection with --screenshot")
    a = p.parse_args(argv)

    import napari
    from qtpy.QtCore import QTimer

    from .._widget import NoduleWidget  # lazy: the widget imports napari and Qt

    viewer = napari.Viewer(title="napari-resmtnet demo")
    qt_window = getattr(viewer.window, "_qt_window", None)
    if qt_window is not None:
        qt_window.resize(1280, 900)
    viewer.open(str(sample_path(a.sample)), plugin="napari-resmtnet")
    widget = NoduleWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Detect nodules", area="right")
    image = viewer.layers[0]
    if image.ndim == 3:
        viewer.dims.set_point(
            0, viewer.dims.range[0].start + (viewer.dims.range[0].stop - viewer.dims.range[0].start) / 2
        )

    state = {"started": False, "waited": 0.0}

    def start():
        widget.detect()
        state["started"] = True

    def poll():
        if not state["started"]:
            return
        state["waited"] += 0.5
        if widget.is_running and state["waited"] < a.timeout:
            return
        timer.stop()
        table = widget.nodules
        if table is not None and len(table):
            shown = table.ids[table.visible_mask()]
            if len(shown):  # the most probable nodule first
                best = shown[int(table.probability[table.visible_mask()].argmax())]
                widget.focus_nodule(int(best))
        if a.screenshot:
            QTimer.singleShot(1500, shoot)

    def shoot():
        viewer.screenshot(a.screenshot, canvas_only=False)
        print(f"screenshot saved to {a.screenshot}")
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
