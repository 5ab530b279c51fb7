"""Reading a scan: review states, undo/redo, navigation and re-detection merging. Qt-free.

The widget keeps a `NoduleTable` (`napari_resmtnet.layers`) as the truth; everything here
is a pure function of tables (or a small history of them), so it is tested without a
viewer.

Review states: every nodule is ``unreviewed`` (a candidate), ``accepted`` (the reader
confirms it) or ``rejected`` (the reader dismisses it; kept and shown grey, so that a new
detection run does not bring it back). Files store ``reviewed`` = accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import boxes as B
from .table import REVIEW_STATES, NoduleTable

#: a new candidate overlapping a kept nodule this much (IoU) is the same nodule
MERGE_IOU = 0.1


class History:
    """Undo and redo of table snapshots (tables are never changed in place, so a snapshot
    is just a reference). ``push(old)`` before every change; a new change clears redo."""

    def __init__(self, depth: int = 50):
        self.depth = int(depth)
        self._undo: list = []
        self._redo: list = []

    def push(self, old) -> None:
        self._undo.append(old)
        del self._undo[: -self.depth]
        self._redo.clear()

    def undo(self, current):
        """The table before the last change (None when there is none); ``current`` goes
        onto the redo stack."""
        if not self._undo:
            return None
        self._redo.append(current)
        return self._undo.pop()

    def redo(self, current):
        """The table the last undo went back from (None when there is none)."""
        if not self._redo:
            return None
        self._undo.append(current)
        return self._redo.pop()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()


def counts(table: NoduleTable | None) -> dict:
    """Nodules shown at the table's threshold, by review state, and the total kept."""
    out = {s: 0 for s in REVIEW_STATES}
    out.update(shown=0, total=0)
    if table is None:
        return out
    vis = table.visible_mask()
    out["shown"], out["total"] = int(vis.sum()), len(table)
    for s in REVIEW_STATES:
        out[s] = int(np.sum(vis & (table.review == s)))
    return out


def reading_order(table: NoduleTable) -> list[int]:
    """Ids of the shown nodules in the order a reader goes through them (and the widget's
    table lists them): highest detection probability first."""
    vis = table.visible_mask()
    order = sorted((i for i in range(len(table)) if vis[i]), key=lambda i: (-table.probability[i], int(table.ids[i])))
    return [int(table.ids[i]) for i in order]


def next_nodule(table: NoduleTable, current: int | None, step: int = 1, unreviewed_only: bool = True) -> int | None:
    """The id of the next (``step`` +1) or previous (-1) shown nodule after ``current`` in
    reading order, wrapping around; only unreviewed ones when ``unreviewed_only``. None
    when there is none (e.g. everything is reviewed)."""
    order = reading_order(table)
    if unreviewed_only:
        state = dict(zip(table.ids.tolist(), table.review.tolist()))
        candidates = [i for i in order if state[i] == "unreviewed"]
    else:
        candidates = order
    if not candidates:
        return None
    if current is None or int(current) not in order:
        return candidates[0] if step > 0 else candidates[-1]
    pos = order.index(int(current))
    n = len(order)
    for d in range(1, n + 1):
        nid = order[(pos + step * d) % n]
        if nid in candidates:
            return nid
    return None


@dataclass
class MergeSummary:
    """What `merge_detections` did, for the question asked before and the message after."""

    kept: int = 0  # reviewed (accepted/rejected) or drawn nodules kept as they are
    replaced: int = 0  # unreviewed model candidates of the old table dropped
    added: int = 0  # new candidates added
    duplicates: int = 0  # new candidates dropped because they overlap a kept nodule

    def text(self) -> str:
        return (
            f"{self.kept} reviewed or drawn nodule(s) kept, {self.replaced} unreviewed "
            f"candidate(s) replaced by {self.added} new one(s)"
            + (f" ({self.duplicates} already marked)" if self.duplicates else "")
        )


def reader_work(table: NoduleTable | None) -> int:
    """How many nodules carry the reader's work (accepted, rejected or drawn): what a new
    detection run must keep, and why the widget asks before running one."""
    if table is None:
        return 0
    return int(np.sum((table.review != "unreviewed") | (table.source == "user")))


def merge_detections(old: NoduleTable | None, new: NoduleTable, iou: float = MERGE_IOU):
    """A new detection run merged into the reader's work.

    Kept as they are (findings and the reader's texture override included): every nodule of
    ``old`` the reader accepted, rejected or drew. Dropped:
    ``old``'s unreviewed model candidates (the new run replaces them). Added: the new run's
    candidates, except those overlapping (IoU > ``iou``, or one's centre inside the other)
    a kept nodule -- the reader already decided on those. New candidates get fresh ids
    after the old ones, so ids stay unique and stable. The threshold and model information
    are the new run's.

    Returns ``(table, MergeSummary)``.
    """
    if old is None or len(old) == 0:
        return new.copy(), MergeSummary(added=len(new))
    keep = (old.review != "unreviewed") | (old.source == "user")
    kept = old.taken(np.flatnonzero(keep))
    dup = np.zeros(len(new), bool)
    if len(kept) and len(new):
        ov = B.box_iou(new.boxes, kept.boxes) > iou
        cn, _ = B.boxes_to_centers_sizes(new.boxes)
        ck, _ = B.boxes_to_centers_sizes(kept.boxes)
        d = new.ndim
        inside_k = np.all((cn[:, None, :] >= kept.boxes[None, :, :d]) & (cn[:, None, :] <= kept.boxes[None, :, d:]), -1)
        inside_n = np.all((ck[None, :, :] >= new.boxes[:, None, :d]) & (ck[None, :, :] <= new.boxes[:, None, d:]), -1)
        dup = np.any(ov | inside_k | inside_n, axis=1)
    fresh = new.taken(np.flatnonzero(~dup))
    start = max(int(old.ids.max()) + 1 if len(old) else 1, 1)
    fresh.ids = np.arange(start, start + len(fresh), dtype=np.int64)
    out = NoduleTable(
        np.concatenate([kept.boxes, fresh.boxes]),
        np.concatenate([kept.ids, fresh.ids]),
        np.concatenate([kept.probability, fresh.probability]),
        np.concatenate([kept.malignancy, fresh.malignancy]),
        list(kept.label) + list(fresh.label),
        list(kept.source) + list(fresh.source),
        np.concatenate([kept.reviewed, fresh.reviewed]),
        dict(new.image),
        threshold=new.threshold,
        model_info=new.model_info,
        review=list(kept.review) + list(fresh.review),
        findings=list(kept.findings) + list(fresh.findings),
        texture_override=list(kept.texture_override) + list(fresh.texture_override),
    )
    return out, MergeSummary(kept=len(kept), replaced=int(np.sum(~keep)), added=len(fresh), duplicates=int(dup.sum()))
