"""The nodule table: one row per shown nodule; a click (or moving the current row with the
arrow keys) selects the nodule and shows its slice; the review keys work here as on the canvas.

The findings columns show the nodule type (the reader's override marked "reader", with the
model's call beside it, or the model's call marked "model"), the model's long x short axis
and volume, and the Lung-RADS category (decision support; `NoduleTable.grade`), with where
its size came from and the model's calcification flag. The reader sets the type in the
table: double-click (or F2 on) a type cell for a list, or right-click rows for a menu (all
selected rows). The view does not change the table itself: it emits
``texture_overridden(nodule_id, texture)`` and whoever owns the table applies it
(`NoduleTable.with_texture`) and calls `set_table` again."""

from __future__ import annotations

from qtpy.QtCore import QTimer, Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHeaderView,
    QMenu,
    QStyledItemDelegate,
    QTableWidget,
    QTableWidgetItem,
)

from ..annotations.table import LABEL_RGB, REJECTED_RGB, NoduleTable, axes_text, grade_text, texture_text, volume_text
from ..lungrads import DECISION_SUPPORT, NODULE_TYPES
from ..annotations.review import reading_order

COLUMNS = (
    "id",
    "label",
    "malignancy",
    "probability",
    "diameter (mm)",
    "slice",
    "source",
    "review",
    "type",
    "long \u00d7 short (mm)",
    "volume (mm\u00b3)",
    f"Lung-RADS ({DECISION_SUPPORT})",
)
#: the column of the nodule type, which the reader can set
TYPE_COLUMN = COLUMNS.index("type")
#: the choice that removes the reader's override (the model's call stands again)
MODEL_CALL = "model's call"


class _TypeDelegate(QStyledItemDelegate):
    """A list of types in the type cell; choosing one asks the view to emit the override."""

    def __init__(self, view: "NoduleTableView"):
        super().__init__(view)
        self._view = view

    def createEditor(self, parent, option, index):  # noqa: N802 (Qt name)
        combo = QComboBox(parent)
        combo.addItems([*NODULE_TYPES, MODEL_CALL])
        combo.activated.connect(lambda _i, c=combo: (self.commitData.emit(c), self.closeEditor.emit(c)))
        return combo

    def setEditorData(self, editor, index):  # noqa: N802 (Qt name)
        nid = index.data(Qt.UserRole)
        current = self._view.override_of(nid) if nid is not None else ""
        editor.setCurrentIndex(editor.findText(current or MODEL_CALL))

    def setModelData(self, editor, model, index):  # noqa: N802 (Qt name)
        nid = index.data(Qt.UserRole)
        if nid is None:
            return
        choice = editor.currentText()
        texture = "" if choice == MODEL_CALL else choice
        # after the editor has closed: the owner rebuilds the rows in answer to the signal
        QTimer.singleShot(0, lambda: self._view.override_texture(int(nid), texture))


class NoduleTableView(QTableWidget):
    """Rows show ``NoduleTable`` nodules visible at its threshold, ordered by probability.

    ``nodule_clicked(id)`` is emitted when the user clicks a row; ``select_ids`` mirrors a
    selection made elsewhere (the layer) without emitting it.
    """

    nodule_clicked = Signal(int)
    #: the reader chose a nodule type in the table: (nodule id, texture), texture one of
    #: "solid", "part-solid", "ground-glass", or "" to remove the override (the model's call)
    texture_overridden = Signal(int, str)
    #: a review/edit key pressed while the table has the focus (the key's text, e.g. "m")
    key_pressed = Signal(str)
    #: keys handed to ``key_pressed`` rather than used by the table
    FORWARD_KEYS = frozenset("mraxun.,[]")

    def __init__(self, parent=None):
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.ExtendedSelection)
        # only the type cells are editable (their items' flags); a double-click or F2 opens the list
        self.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed)
        self.setItemDelegateForColumn(TYPE_COLUMN, _TypeDelegate(self))
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.setMinimumHeight(160)
        self._ids: list[int] = []
        self._override: dict[int, str] = {}
        self.cellClicked.connect(self._clicked)
        self.setContextMenuPolicy(Qt.CustomContextMenu)
        self.customContextMenuRequested.connect(self._context_menu)

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
                self._override = {}
                return
            order = [table.index_of(nid) for nid in reading_order(table)]
            diam = table.diameter_mm()
            self.setRowCount(len(order))
            self._ids = [int(table.ids[i]) for i in order]
            self._override = {int(table.ids[i]): str(table.texture_override[i]) for i in order}
            for r, i in enumerate(order):
                lab = str(table.label[i])
                f = table.findings[i]
                cells = (
                    str(int(table.ids[i])),
                    lab,
                    f"{table.malignancy[i]:.2f}",
                    f"{table.probability[i]:.2f}",
                    f"{diam[i]:.1f}",
                    str(table.center_slice(i)) if table.ndim == 3 else "-",
                    str(table.source[i]),
                    "" if table.review[i] == "unreviewed" else str(table.review[i]),
                    texture_text(table, i),
                    axes_text(f),
                    volume_text(f),
                    grade_text(table, i),
                )
                tips = {TYPE_COLUMN: _type_tip(f), len(cells) - 1: _grade_tip(table, i)}
                for c, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    item.setData(Qt.UserRole, int(table.ids[i]))
                    flags = item.flags() & ~Qt.ItemIsEditable
                    item.setFlags(flags | Qt.ItemIsEditable if c == TYPE_COLUMN else flags)
                    if c in tips:
                        item.setToolTip(tips[c])
                    if c == 1:
                        item.setForeground(QColor.fromRgbF(*LABEL_RGB.get(lab, (1, 1, 1))))
                    if table.review[i] == "rejected":
                        item.setForeground(QColor.fromRgbF(*REJECTED_RGB))
                    self.setItem(r, c, item)
        finally:
            self.blockSignals(False)

    def override_of(self, nodule_id: int) -> str:
        """The reader's type of a shown nodule ("" when the model's call stands)."""
        return self._override.get(int(nodule_id), "")

    def override_texture(self, nodule_id: int, texture: str) -> bool:
        """What choosing ``texture`` ("" or `MODEL_CALL`: the model's call) for a nodule in
        the table does: emit ``texture_overridden`` unless it is already so. True if emitted."""
        texture = "" if texture in ("", MODEL_CALL) else texture
        if texture and texture not in NODULE_TYPES:
            raise ValueError(f"nodule type must be one of {', '.join(NODULE_TYPES)} or '', got {texture!r}")
        nid = int(nodule_id)
        if nid not in self._override or self._override[nid] == texture:
            return False
        self._override[nid] = texture  # until the owner calls set_table again
        self.texture_overridden.emit(nid, texture)
        return True

    def texture_menu(self, ids) -> QMenu:
        """The right-click menu: set the type of the nodules ``ids`` (or back to the model's call)."""
        menu = QMenu("Nodule type", self)
        ids = [int(n) for n in ids]
        for choice in (*NODULE_TYPES, MODEL_CALL):
            act = menu.addAction(f"Type: {choice}" if choice != MODEL_CALL else "Type: the model's call")
            act.setCheckable(True)
            act.setChecked(
                bool(ids) and all(self.override_of(n) == ("" if choice == MODEL_CALL else choice) for n in ids)
            )
            act.triggered.connect(lambda _=False, c=choice: [self.override_texture(n, c) for n in ids])
        return menu

    def _context_menu(self, pos) -> None:
        row = self.rowAt(pos.y())
        ids = self.selected_ids()
        if 0 <= row < len(self._ids) and self._ids[row] not in ids:
            ids = [self._ids[row]]
        if ids:
            self.texture_menu(ids).exec_(self.viewport().mapToGlobal(pos))

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


def _type_tip(findings: dict) -> str:
    probs = findings.get("texture_probability") or {}
    model = ", ".join(f"{k} {v:.2f}" for k, v in probs.items())
    return (
        f"model: {model}\n" if model else ""
    ) + "Double-click (or right-click) to set the nodule type; the Lung-RADS category follows."


def _grade_tip(table: NoduleTable, i: int) -> str:
    return f"{table.grade(i).reason}\n{DECISION_SUPPORT.capitalize()}: the reader confirms the type and the size."
