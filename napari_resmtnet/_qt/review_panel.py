"""The review panel: threshold, counts, legend, the nodule table and the edit buttons.

A view over `napari_resmtnet.annotations.session.ReviewSession`: `ReviewPanel.refresh` shows the
session as it is; the buttons call the actions the host gives (by name), the threshold
slider calls ``set_threshold``. While the slider is dragged, the nodules are re-drawn at
most every 150 ms (many CT boxes are slow); the value is applied when it is let go.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QComboBox, QGridLayout, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from ..annotations.table import LABEL_RGB, LABELS, REJECTED_RGB
from .table import NoduleTableView

#: (attribute, text, action, tooltip, row, column, column span) of the edit buttons
BUTTONS = (
    ("add_button", "Draw new (n)", "start_drawing", "", 0, 2, 1),
    ("accept_button", "Accept (a)", "accept_selected", "Confirm the selected nodules", 1, 0, 1),
    (
        "reject_button",
        "Reject (x)",
        "reject_selected",
        "Dismiss the selected nodules (kept grey; a new detection run does not bring them back)",
        1,
        1,
        1,
    ),
    ("unreview_button", "Unreview (u)", "unreview_selected", "", 1, 2, 1),
    ("prev_button", "< Previous unreviewed (,)", "previous_unreviewed", "", 2, 0, 2),
    ("next_button", "Next unreviewed (.) >", "next_unreviewed", "", 2, 2, 1),
    ("flip_button", "Flip label (m)", "flip_selected", "", 3, 0, 1),
    ("reviewed_button", "Accepted (r)", "mark_reviewed", "Toggle accepted / unreviewed", 3, 1, 1),
    ("delete_button", "Delete", "delete_selected", "", 3, 2, 1),
    (
        "first_slice_button",
        "First slice here ([)",
        "set_first_slice",
        "The selected CT nodule starts at the slice shown",
        4,
        0,
        1,
    ),
    (
        "last_slice_button",
        "Last slice here (])",
        "set_last_slice",
        "The selected CT nodule ends at the slice shown",
        4,
        1,
        1,
    ),
    ("undo_button", "Undo (Ctrl+Z)", "undo", "", 5, 0, 1),
    ("redo_button", "Redo (Ctrl+Shift+Z)", "redo", "", 5, 1, 1),
)
#: buttons that need a CT's nodules
CT_ONLY = ("first_slice_button", "last_slice_button")


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb)


class ReviewPanel(QWidget):
    """``actions`` maps the names in `BUTTONS` to callables; ``set_threshold(value)`` applies
    the slider's value; ``model_threshold()`` gives the model's operating point (or None)."""

    def __init__(self, actions: dict, set_threshold, model_threshold, parent=None):
        super().__init__(parent)
        self._set_threshold, self._model_threshold = set_threshold, model_threshold
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        thr = QHBoxLayout()
        thr.addWidget(QLabel("threshold"))
        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(50)
        self.threshold_slider.valueChanged.connect(self._on_slider)
        self.threshold_slider.sliderReleased.connect(self._apply_slider)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(150)
        self._threshold_timer.timeout.connect(self._apply_slider)
        thr.addWidget(self.threshold_slider, 1)
        self.threshold_label = QLabel("0.50")
        thr.addWidget(self.threshold_label)
        root.addLayout(thr)
        self.count_label = QLabel("no nodules")
        root.addWidget(self.count_label)
        b, m, g = _hex(LABEL_RGB["benign"]), _hex(LABEL_RGB["malignant"]), _hex(REJECTED_RGB)
        self.legend = QLabel(
            f"<span style='color:{b}'>&#9632; benign</span> &nbsp; "
            f"<span style='color:{m}'>&#9632; malignant</span> &nbsp; "
            f"<span style='color:{g}'>&#9632; rejected</span><br>"
            "box text: label and detection probability; fainter = less sure, "
            "&#10003; accepted, &#10007; rejected"
        )
        self.legend.setWordWrap(True)
        root.addWidget(self.legend)
        self.table = NoduleTableView(self)
        root.addWidget(self.table, 1)

        grid = QGridLayout()
        grid.addWidget(QLabel("new nodule label"), 0, 0)
        self.new_label_combo = QComboBox()
        self.new_label_combo.addItems(list(LABELS))
        grid.addWidget(self.new_label_combo, 0, 1)
        self.buttons: dict[str, QPushButton] = {}
        for attr, text, action, tip, row, col, span in BUTTONS:
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, f=actions[action]: f())
            grid.addWidget(button, row, col, 1, span)
            setattr(self, attr, button)
            self.buttons[attr] = button
        root.addLayout(grid)
        self.refresh(None)

    def refresh(self, session, have_layer: bool = False) -> None:
        """Show the session as it is: counts, table, selection, which buttons work."""
        t = session.table if session is not None else None
        self.count_label.setText(session.counts_text() if session is not None else "no nodules")
        self.table.set_table(t)
        if t is not None and session.selected:
            self.table.select_ids(session.selected)
        have = have_layer and t is not None
        for attr, button in self.buttons.items():
            if attr in CT_ONLY:
                button.setEnabled(have and t.ndim == 3)
            elif attr == "undo_button":
                button.setEnabled(have and session.can_undo)
            elif attr == "redo_button":
                button.setEnabled(have and session.can_redo)
            else:
                button.setEnabled(have)

    # --- threshold ------------------------------------------------------------------------
    def set_slider(self, value: float) -> None:
        """Show ``value`` on the slider without applying it."""
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(int(round(value * 100)))
        self.threshold_slider.blockSignals(False)
        self._show_threshold(value)

    def _show_threshold(self, value: float) -> None:
        op = self._model_threshold()
        if op is not None and abs(value - op) < 0.005:
            self.threshold_label.setText(f"{value:.2f} (model's operating point)")
            self.threshold_label.setToolTip("The threshold chosen for this model on its validation data")
        else:
            self.threshold_label.setText(f"{value:.2f}" + (f" (model: {op:.2f})" if op is not None else ""))
            self.threshold_label.setToolTip("")

    def _on_slider(self, v: int) -> None:
        self._show_threshold(v / 100.0)
        if self.threshold_slider.isSliderDown():
            if not self._threshold_timer.isActive():
                self._threshold_timer.start()
        else:
            self._set_threshold(v / 100.0)

    def _apply_slider(self) -> None:
        self._threshold_timer.stop()
        self._set_threshold(self.threshold_slider.value() / 100.0)
