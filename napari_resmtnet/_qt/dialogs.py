"""Questions the widget asks the reader without blocking the viewer (non-modal boxes)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QMessageBox


def ask(parent, title: str, question: str, on_answer) -> None:
    """A non-modal yes/no question (yes the default); calls ``on_answer(True/False)``."""
    box = QMessageBox(QMessageBox.Question, title, question, QMessageBox.Yes | QMessageBox.No, parent)
    box.setDefaultButton(QMessageBox.Yes)
    box.setWindowModality(Qt.NonModal)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.finished.connect(lambda result: on_answer(result == QMessageBox.Yes))
    box.show()


def ask_restore(parent, question: str, on_answer) -> None:
    """Whether to restore autosaved nodules. Tests and scripts replace this function (as
    ``napari_resmtnet._widget.ask_restore``)."""
    ask(parent, "Restore autosaved nodules?", question, on_answer)


def ask_merge(parent, question: str, on_answer) -> None:
    """Whether to detect again, keeping the reader's work. Tests and scripts replace this
    function (as ``napari_resmtnet._widget.ask_merge``)."""
    ask(parent, "Detect again?", question, on_answer)
