"""The reading session: the nodules of a scan as the reader works on them. Qt-free.

`ReviewSession` holds what the dock widget shows and edits -- the current `NoduleTable`
(the truth), the nodules the reader selected (by id), the undo/redo history of each
nodule layer, the merge of a new detection run into the reader's work -- and offers every
edit as a method that records undo. It knows nothing of Qt or napari: it announces what
happened through plain-Python events (`Event`), ``changed(table)`` after every change of
the nodules and ``message(kind, text)`` for what the reader should be told ("info" or
"error"); the widget refreshes its views and schedules the autosave on ``changed``.

`AutosaveQueue` is the autosave's bookkeeping (what is pending, when it is due, which
failure was already reported, which images were offered their autosave); the timer that
calls `AutosaveQueue.flush` stays in the widget, the writer in `napari_resmtnet.annotations.autosave`.

The rules themselves (review states, reading order, merging) are the pure functions of
`napari_resmtnet.annotations.review`; this module keeps the state they work on.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .table import NoduleTable, reconcile
from .review import History, counts, merge_detections, next_nodule, reader_work
from . import autosave
from .autosave import image_key
from .export import NoduleFileError
from ..inference.weights import bundled_entry

UNDO_DEPTH = 50
#: autosave at the latest this long after the first unsaved change (s), during long edits
AUTOSAVE_MAX_DELAY_S = 10.0


class Event:
    """A plain-Python signal: ``connect(callback)``, ``emit(*args)`` calls each in order."""

    def __init__(self):
        self._callbacks: list[Callable] = []

    def connect(self, callback: Callable) -> Callable:
        self._callbacks.append(callback)
        return callback

    def disconnect(self, callback: Callable) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def emit(self, *args) -> None:
        for cb in list(self._callbacks):
            cb(*args)


def operating_point(modality: str) -> float | None:
    """The bundled model's operating threshold for ``modality`` (from the weights registry;
    no torch), or None when it cannot be read."""
    try:
        return float(bundled_entry(modality).get("threshold", 0.5))
    except Exception:  # a missing or broken registry: the slider just shows no model point
        return None


class ReviewSession:
    """The nodules being read and everything the reader does to them.

    One table is current at a time (``attach(table, key)``: the key names its document,
    for the widget a nodule layer); each key keeps its own undo history while the session
    lives (``detach(key)`` drops it). Every change goes through `replace`, which records
    undo (unless told not to), keeps the selection to nodules that still exist, and emits
    ``changed``. Edits act on the ids given, else on ``selected``.
    """

    def __init__(self, undo_depth: int = UNDO_DEPTH):
        self.undo_depth = int(undo_depth)
        self.table: NoduleTable | None = None
        self.key = None
        #: nodules the reader selected: kept across edits, slices and re-renders
        self.selected: tuple[int, ...] = ()
        self._histories: dict = {}
        self._merge_confirmed: set = set()
        #: what the last `merge_run` did ("" when it had nothing to merge)
        self.last_merge = ""
        #: ``changed(table)`` after every change of the nodules (edit, undo, threshold, import)
        self.changed = Event()
        #: ``message(kind, text)``: "info" or "error", for the reader
        self.message = Event()

    # --- documents ------------------------------------------------------------------------
    def attach(self, table: NoduleTable | None, key=None) -> None:
        """Make ``table`` (of document ``key``) the current one; the selection starts empty.
        Nothing changed, so no ``changed``."""
        self.table, self.key, self.selected = table, key, ()

    def detach(self, key=None) -> None:
        """Forget document ``key`` (default: the current one) and its history."""
        key = self.key if key is None else key
        self._histories.pop(key, None)
        self._merge_confirmed.discard(key)
        if key == self.key:
            self.table, self.key, self.selected = None, None, ()

    @property
    def history(self) -> History:
        return self._histories.setdefault(self.key, History(self.undo_depth))

    @property
    def can_undo(self) -> bool:
        return self.table is not None and self.history.can_undo

    @property
    def can_redo(self) -> bool:
        return self.table is not None and self.history.can_redo

    def _info(self, text: str) -> None:
        self.message.emit("info", text)

    def _error(self, text: str) -> None:
        self.message.emit("error", text)

    # --- the one way the nodules change ---------------------------------------------------
    def replace(self, table: NoduleTable, undo: bool = True) -> None:
        """``table`` becomes the current nodules (undoably unless ``undo`` is False)."""
        old = self.table
        if undo and old is not None:
            self.history.push(old)
        self.table = table
        self.selected = tuple(i for i in self.selected if i in table)
        self.changed.emit(table)

    def select(self, ids) -> None:
        self.selected = tuple(sorted({int(i) for i in ids}))

    def edit(self, fn: Callable, what: str, ids=None) -> bool:
        """Apply ``fn(table, ids)`` to the nodules ``ids`` (default: the selected ones) as one
        undoable edit; a refused edit is one error message. The edited nodules stay selected
        (none after a delete)."""
        t = self.table
        if t is None:
            self._info("No nodules yet: detect, import, or draw one first.")
            return False
        ids = [i for i in self.selected if i in t] if ids is None else [int(i) for i in ids]
        if not ids:
            self._info(f"Select one or more nodules (in the layer or the table) to {what}.")
            return False
        try:
            new = fn(t, ids)
        except (ValueError, KeyError) as exc:
            self._error(f"Cannot {what}: {exc}")
            return False
        self.selected = () if what == "delete" else tuple(ids)
        self.replace(new)
        return True

    # --- edits ----------------------------------------------------------------------------
    def flip(self, ids=None) -> bool:
        """Benign <-> malignant."""
        return self.edit(lambda t, ids: t.flipped(ids), "flip", ids)

    def toggle_accepted(self, ids=None) -> bool:
        """Accept (or back to unreviewed, when all already are)."""
        return self.edit(lambda t, ids: t.with_reviewed(ids), "mark reviewed", ids)

    def accept(self, ids=None) -> bool:
        return self.edit(lambda t, ids: t.with_review(ids, "accepted"), "accept", ids)

    def reject(self, ids=None) -> bool:
        return self.edit(lambda t, ids: t.with_review(ids, "rejected"), "reject", ids)

    def unreview(self, ids=None) -> bool:
        return self.edit(lambda t, ids: t.with_review(ids, "unreviewed"), "mark unreviewed", ids)

    def delete(self, ids=None) -> bool:
        return self.edit(lambda t, ids: t.removed(ids), "delete", ids)

    def relabel(self, label: str, ids=None) -> bool:
        return self.edit(lambda t, ids: t.with_label(ids, label), "relabel", ids)

    def move(self, nodule_id: int, delta) -> bool:
        """Shift a nodule's box by ``delta`` voxels (one value per axis)."""
        d = np.asarray(delta, float)
        return self.edit(
            lambda t, ids: t.with_box(ids[0], t.boxes[t.index_of(ids[0])] + np.concatenate([d, d])), "move", [nodule_id]
        )

    def resize(self, nodule_id: int, box) -> bool:
        """A new box (image voxels, lower then upper corner) for a nodule."""
        return self.edit(lambda t, ids: t.with_box(ids[0], box), "resize", [nodule_id])

    def set_extent(self, slice_index: int | None, first: bool, ids=None) -> bool:
        """The CT nodules start (``first``) or end at slice ``slice_index``."""
        if self.table is None or self.table.ndim != 3 or slice_index is None:
            self._info("Only a CT nodule has slices to set.")
            return False

        def fn(t, ids):
            for nid in ids:
                t = t.with_z_extent(nid, first=slice_index) if first else t.with_z_extent(nid, last=slice_index)
            return t

        return self.edit(fn, "set the " + ("first" if first else "last") + " slice of", ids)

    def override_type(self, nodule_id: int, texture: str) -> bool:
        """The reader's nodule type for one nodule ("" gives the model's call back); the
        Lung-RADS category follows."""
        if self.table is None or int(nodule_id) not in self.table:
            return False
        return self.edit(lambda t, ids: t.with_texture(ids, texture or None), "set the nodule type", [int(nodule_id)])

    def add(self, box, label: str = "benign") -> int | None:
        """A new nodule of the reader's with ``box`` in image voxels; returns its id."""
        if self.table is None:
            self._info("No nodules yet: detect, import, or draw one first.")
            return None
        t, nid = self.table.added(box, label=label)
        self.replace(t)
        return nid

    def apply_layer_edit(
        self, shapes, features: dict, removed=(), new_label: str = "benign", slice_index: int | None = None, selected=()
    ) -> bool:
        """Fold what the reader did to the shapes that show the table (moved, resized, drawn,
        deleted: `napari_resmtnet.annotations.table.reconcile`) into it as one edit; the drawn nodules,
        else the ``selected`` ones, stay selected. True when something changed."""
        if self.table is None:
            return False
        new, changed, added = reconcile(
            self.table, shapes, features, removed, new_label=new_label, slice_index=slice_index
        )
        if changed:
            self.selected = tuple(added) if added else tuple(i for i in selected if i in new)
            self.replace(new)
        return changed

    # --- undo -----------------------------------------------------------------------------
    def undo(self) -> bool:
        """Undo the last change of the nodules (the threshold stays)."""
        return self._travel(undo=True)

    def redo(self) -> bool:
        """Redo what the last undo took back (the threshold stays)."""
        return self._travel(undo=False)

    def _travel(self, undo: bool) -> bool:
        t = self.table
        target = None if t is None else (self.history.undo(t) if undo else self.history.redo(t))
        if t is None or target is None:
            self._info("Nothing to undo." if undo else "Nothing to redo.")
            return False
        target = target.copy()
        target.threshold = t.threshold
        self.replace(target, undo=False)
        return True

    # --- threshold ------------------------------------------------------------------------
    def set_threshold(self, value: float) -> float:
        """Show nodules with probability >= value (the reader's always); not undoable, no
        re-detection. Returns the threshold (clipped to 0..1)."""
        value = float(min(max(value, 0.0), 1.0))
        t = self.table
        if t is not None and t.threshold != value:
            t = t.copy()
            t.threshold = value
            self.replace(t, undo=False)
        return value

    def model_threshold(self, modality: str | None = None) -> float | None:
        """The operating point of the model behind the nodules (their model information),
        else of the bundled model for their modality (or ``modality`` without nodules)."""
        t = self.table
        info = (t.model_info or {}) if t is not None else {}
        if info.get("threshold") is not None:
            return float(info["threshold"])
        if t is not None and t.meta.get("model_threshold") is not None:
            return float(t.meta["model_threshold"])
        if t is not None:
            modality = "CT" if t.ndim == 3 else "CXR"
        return operating_point(modality or "CT")

    # --- reading --------------------------------------------------------------------------
    def counts(self) -> dict:
        return counts(self.table)

    def shown(self) -> int:
        return int(self.table.visible_mask().sum()) if self.table is not None else 0

    def counts_text(self) -> str:
        if self.table is None:
            return "no nodules"
        c = self.counts()
        return (
            f"{c['shown']} of {c['total']} nodules shown: {c['unreviewed']} unreviewed, "
            f"{c['accepted']} accepted, {c['rejected']} rejected"
        )

    def status_text(self, slice_index: int | None = None) -> str:
        t = self.table
        if t is None:
            return ""
        where = f" (slice {slice_index})" if slice_index is not None else ""
        return f"{len(t)} candidates, {self.shown()} shown at threshold {t.threshold:.2f}{where}."

    def next_unreviewed(self, step: int = 1) -> int | None:
        """The next (``step`` +1) or previous (-1) unreviewed nodule after the selected one,
        in reading order; None (and a message) when everything is reviewed."""
        t = self.table
        if t is None:
            return None
        cur = self.selected[0] if len(self.selected) == 1 else None
        nid = next_nodule(t, cur, step=step)
        if nid is None:
            c = self.counts()
            self._info(f"No unreviewed nodule left: {c['accepted']} accepted, {c['rejected']} rejected.")
        return nid

    # --- detection runs -------------------------------------------------------------------
    def merge_question(self, old: NoduleTable | None, key) -> int:
        """How many nodules of ``old`` (document ``key``) carry the reader's work, when a new
        run must ask before replacing its candidates (0: no need to ask)."""
        work = reader_work(old)
        return work if work and key not in self._merge_confirmed else 0

    def confirm_merge(self, key) -> None:
        """The reader agreed to detect again on document ``key``: not asked again."""
        self._merge_confirmed.add(key)

    def merge_run(self, new: NoduleTable) -> str:
        """A new detection run replaces the current nodules, undoably: when they carry the
        reader's work, merged into it (`napari_resmtnet.annotations.review.merge_detections`: the
        reader's nodules kept, only unreviewed candidates replaced). Returns what the merge
        did ("" when there was nothing to merge)."""
        old = self.table
        text = self.last_merge = ""
        if old is not None and reader_work(old):
            meta = dict(new.meta)
            new, summary = merge_detections(old, new)
            new.meta.update(meta)
            text = summary.text()
        self.last_merge = text
        self.replace(new)
        return text


def complete_csv_table(table: NoduleTable, current: NoduleTable | None, default_threshold) -> NoduleTable:
    """A LUNA16-style CSV lists the nodules shown when it was exported, without the threshold
    or the model: keep every row shown (threshold at most the lowest model probability in
    it) and keep the model information of the ``current`` nodules of the image, so that a
    re-import shows what was exported."""
    t = table.copy()
    thr = current.threshold if current is not None else (default_threshold or t.threshold)
    model = t.probability[t.source == "model"]
    if len(model):
        thr = min(thr, float(np.floor(model.min() * 100) / 100))
    t.threshold = float(thr)
    if current is not None and current.model_info:
        t.model_info = dict(current.model_info)
    return t


class AutosaveQueue:
    """What is waiting to be autosaved, when, and what went wrong (no timer, no Qt).

    ``add(table)`` after every change; it says whether the write is due now (the first
    unsaved change is ``max_delay_s`` old), else the caller (re)starts its debounce timer
    and calls ``flush`` when it fires. ``flush`` writes with `napari_resmtnet.annotations.autosave.save`
    and returns the paths and an error message to show -- only the first of a run of equal
    failures. ``offer(key, owner)`` is True once per image key until ``forget(owner)``."""

    def __init__(self, max_delay_s: float = AUTOSAVE_MAX_DELAY_S, clock: Callable = time.monotonic):
        self.max_delay_s = float(max_delay_s)
        self.clock = clock
        self.pending: dict = {}
        self.since: float | None = None
        self.error = ""
        self._offered: set = set()
        self._owners: dict = {}

    def add(self, table: NoduleTable | None) -> bool:
        if table is None:
            return False

        self.pending[image_key(table.image)] = table
        now = self.clock()
        if self.since is None:
            self.since = now
        return now - self.since >= self.max_delay_s

    def flush(self) -> tuple[list[str], str]:
        pending, self.pending = self.pending, {}
        self.since = None
        written: list[str] = []
        report = ""
        if not pending:
            return written, report

        for table in pending.values():
            try:
                written.append(str(autosave.save(table)))
            except NoduleFileError as exc:
                msg = f"Autosave failed: {exc}"
                if msg != self.error:
                    report = msg + " (export your nodules to keep them)"
                self.error = msg
                continue
            self.error = ""
        return written, report

    def offer(self, key: str, owner) -> bool:
        """True the first time image ``key`` (opened as ``owner``) asks to be offered."""
        if key in self._offered:
            return False
        self._offered.add(key)
        self._owners[owner] = key
        return True

    def forget(self, owner) -> None:
        """``owner`` closed: its image is offered its autosave again when opened again."""
        self._offered.discard(self._owners.pop(owner, None))
