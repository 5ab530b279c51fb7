"""The nodule table view's findings columns and the reader's type override in the table (Qt)."""

import sys
from pathlib import Path

import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox

from napari_resmtnet._qt.table import COLUMNS, MODEL_CALL, TYPE_COLUMN, NoduleTableView

sys.path.insert(0, str(Path(__file__).parents[1] / "annotations"))
from test_findings import ct_table  # noqa: E402

pytestmark = pytest.mark.gui

AXES, VOLUME, GRADE = COLUMNS.index("long × short (mm)"), COLUMNS.index("volume (mm³)"), len(COLUMNS) - 1


@pytest.fixture
def view(qtbot):
    v = NoduleTableView()
    qtbot.addWidget(v)
    v.show()
    return v


def cell(view, nid, col):
    return view.item(view.row_of(nid), col).text()


def test_findings_columns_show_type_sizes_and_lung_rads_as_decision_support(view):
    _, t = ct_table()
    view.set_table(t.with_texture([3], "solid"))
    assert COLUMNS[:8] == ("id", "label", "malignancy", "probability", "diameter (mm)", "slice", "source", "review")
    assert COLUMNS[GRADE] == "Lung-RADS (decision support)"
    assert cell(view, 1, TYPE_COLUMN) == "solid (model)"
    assert cell(view, 1, AXES) == "8.0 × 6.2" and cell(view, 1, VOLUME) == "180"
    assert cell(view, 1, GRADE) == "3 (measured 7.1 mm)"
    assert cell(view, 2, GRADE) == "4A (measured 12.0 mm); calcified? 0.81 (model)"
    assert cell(view, 3, TYPE_COLUMN) == "solid (reader)" and cell(view, 3, GRADE) == "3 (box 6.7 mm)"
    assert cell(view, 3, AXES) == "" and cell(view, 3, VOLUME) == ""
    tip = view.item(view.row_of(1), GRADE).toolTip()
    assert "Lung-RADS v2022" in tip and "Decision support" in tip
    assert "solid 0.81" in view.item(view.row_of(1), TYPE_COLUMN).toolTip()
    # only the type cells can be edited
    assert view.item(0, TYPE_COLUMN).flags() & Qt.ItemIsEditable
    assert not view.item(0, 1).flags() & Qt.ItemIsEditable


def test_choosing_a_type_in_the_table_emits_the_override(view, qtbot):
    _, t = ct_table()
    view.set_table(t)
    row = view.row_of(1)
    view.setCurrentCell(row, TYPE_COLUMN)
    view.editItem(view.item(row, TYPE_COLUMN))
    combo = view.findChild(QComboBox)
    assert combo is not None and combo.currentText() == MODEL_CALL  # no override yet
    assert [combo.itemText(k) for k in range(combo.count())] == ["solid", "part-solid", "ground-glass", MODEL_CALL]
    with qtbot.waitSignal(view.texture_overridden, timeout=2000) as sig:
        combo.setCurrentIndex(combo.findText("ground-glass"))
        combo.activated.emit(combo.currentIndex())  # what a click on the item does
    assert sig.args == [1, "ground-glass"]
    # the owner applies it and shows the table again: the category follows (7 mm solid 3 -> 2)
    t2 = t.with_texture([sig.args[0]], sig.args[1])
    view.set_table(t2)
    assert cell(view, 1, TYPE_COLUMN) == "ground-glass (reader; model: solid)"
    assert cell(view, 1, GRADE) == "2 (measured 7.1 mm)"
    # back to the model's call: an empty texture
    with qtbot.waitSignal(view.texture_overridden, timeout=2000) as sig:
        assert view.override_texture(1, MODEL_CALL)
    assert sig.args == [1, ""]


def test_the_same_type_again_emits_nothing_and_bad_types_are_refused(view, qtbot):
    _, t = ct_table()
    view.set_table(t.with_texture([2], "solid"))
    with qtbot.assertNotEmitted(view.texture_overridden):
        assert not view.override_texture(2, "solid")
        assert not view.override_texture(99, "solid")  # not shown
    with pytest.raises(ValueError):
        view.override_texture(2, "cavitary")


def test_right_click_menu_sets_the_type_of_every_selected_row(view, qtbot):
    _, t = ct_table()
    view.set_table(t)
    view.select_ids([1, 3])
    menu = view.texture_menu(view.selected_ids())
    action = next(a for a in menu.actions() if a.text() == "Type: part-solid")
    got = []
    view.texture_overridden.connect(lambda nid, tex: got.append((nid, tex)))
    action.trigger()
    assert got == [(1, "part-solid"), (3, "part-solid")]
    checked = [a.text() for a in view.texture_menu([1, 3]).actions() if a.isChecked()]
    assert checked == ["Type: part-solid"]
