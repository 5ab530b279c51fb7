"""The nodule table: one row per shown nodule; a click selects the nodule and shows its slice."""
from __future__ import annotations

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from ..layers import LABEL_RGB, NoduleTable

COLUMNS = ("id", "label", "malignancy", "probability", "diameter (mm)", "slice", "source", "reviewed")


class NoduleTableView(QTableWidget):
    """Rows show ``NoduleTable`` nodules visible at its threshold, ordered by probability.

    ``nodule_clicked(id)`` is emitted when the user clicks a row; ``select_ids`` mirrors a
    selection made elsewhere (the layer) without emitting it.
    """

    nodule_clicked = Signal(int)

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
            vis = table.visible_mask()
            order = sorted((i for i in range(len(table)) if vis[i]),
                           key=lambda i: (-table.probability[i], int(table.ids[i])))
            diam = table.diameter_mm()
            self.setRowCount(len(order))
            self._ids = [int(table.ids[i]) for i in order]
            for r, i in enumerate(order):
                lab = str(table.label[i])
                cells = (
                    str(int(table.ids[i])), lab, f"{table.malignancy[i]:.2f}",
                    f"{table.probability[i]:.2f}", f"{diam[i]:.1f}",
                    str(table.center_slice(i)) if table.ndim == 3 else "-",
                    str(table.source[i]), "yes" if table.reviewed[i] else "",
                )
                for c, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    item.setData(Qt.UserRole, int(table.ids[i]))
                    if c == 1:
                        item.setForeground(QColor.fromRgbF(*LABEL_RGB.get(lab, (1, 1, 1))))
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
