"""The nodule table: one row per shown nodule; a click (or moving the current row with the
arrow keys) selects the nodule and shows its slice; the review keys work here as on the canvas."""
from __future__ import annotations

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from ..layers import LABEL_RGB, REJECTED_RGB, NoduleTable
from ..review import reading_order

COLUMNS = ("id", "label", "malignancy", "probability", "diameter (mm)", "slice", "source", "review")


class NoduleTableView(QTableWidget):
    """Rows show ``NoduleTable`` nodules visible at its threshold, ordered by probability.

    ``nodule_clicked(id)`` is emitted when the user clicks a row; ``select_ids`` mirrors a
    selection made elsewhere (the layer) without emitting it.
    """

    nodule_clicked = Signal(int)
    #: a review/edit key pressed while the table has the focus (the key's text, e.g. "m")
    key_pressed = Signal(str)
    #: keys handed to ``key_pressed`` rather than used by the table
    FORWARD_KEYS = frozenset("mraxun.,[]")

    def __init__(self, parent=None):
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.setMinimumHeight(160)
        self._ids: list[int] = []
        self.cellClicked.connect(self._clicked)

    @property
    def ids(self) -> list[int]:
        """Nodule ids in row order."""
        return list(self._ids)

    def set_table(self, table: NoduleTable | None) -> None:
        self.blockSignals(True)
        try:
            self.clearContents()
            if table is None:
                self.setRowCount(0)
                self._ids = []
                return
            order = [table.index_of(nid) for nid in reading_order(table)]
            diam = table.diameter_mm()
            self.setRowCount(len(order))
            self._ids = [int(table.ids[i]) for i in order]
            for r, i in enumerate(order):
                lab = str(table.label[i])
                cells = (
                    str(int(table.ids[i])), lab, f"{table.malignancy[i]:.2f}",
                    f"{table.probability[i]:.2f}", f"{diam[i]:.1f}",
                    str(table.center_slice(i)) if table.ndim == 3 else "-",
                    str(table.source[i]), "" if table.review[i] == "unreviewed" else str(table.review[i]),
                )
                for c, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    item.setData(Qt.UserRole, int(table.ids[i]))
                    if c == 1:
                        item.setForeground(QColor.fromRgbF(*LABEL_RGB.get(lab, (1, 1, 1))))
                    if table.review[i] == "rejected":
                        item.setForeground(QColor.fromRgbF(*REJECTED_RGB))
                    self.setItem(r, c, item)
        finally:
            self.blockSignals(False)

    def row_of(self, nodule_id: int) -> int:
        return self._ids.index(int(nodule_id)) if int(nodule_id) in self._ids else -1

    def selected_ids(self) -> list[int]:
        rows = sorted({i.row() for i in self.selectedIndexes()})
        return [self._ids[r] for r in rows if r < len(self._ids)]

    def select_ids(self, ids) -> None:
        """Select the rows of ``ids`` (silently: no ``nodule_clicked``)."""
        self.blockSignals(True)
        try:
            first = [self.row_of(n) for n in ids if self.row_of(n) >= 0]
            if first:
                self.setCurrentCell(first[0], max(self.currentColumn(), 0))
            self.clearSelection()
            mode = self.selectionMode()
            self.setSelectionMode(QAbstractItemView.MultiSelection)
            for nid in ids:
                r = self.row_of(nid)
                if r >= 0:
                    self.selectRow(r)
            self.setSelectionMode(mode)
            first = [self.row_of(n) for n in ids if self.row_of(n) >= 0]
            if first:
                self.scrollToItem(self.item(first[0], 0))
        finally:
            self.blockSignals(False)

    def click_row(self, row: int) -> None:
        """What a mouse click on ``row`` does (for keyboard use and tests)."""
        self.selectRow(row)
        self._clicked(row, 0)

    def _clicked(self, row: int, _col: int) -> None:
        if 0 <= row < len(self._ids):
            self.nodule_clicked.emit(self._ids[row])

    def keyPressEvent(self, event) -> None:  # noqa: N802 (Qt name)
        text = event.text()
        if text and text in self.FORWARD_KEYS and not (event.modifiers() & (Qt.ControlModifier | Qt.AltModifier)):
            self.key_pressed.emit(text)
            event.accept()
            return
        before = self.currentRow()
        super().keyPressEvent(event)
        row = self.currentRow()
        # the arrow keys (or Page Up/Down, Home/End) moved the current row: go to that nodule
        if row != before and 0 <= row < len(self._ids):
            self.nodule_clicked.emit(self._ids[row])
