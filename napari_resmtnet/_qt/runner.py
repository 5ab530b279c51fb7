"""Running the predictor off the GUI thread: the job, its outcome, and a progress relay."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal

from ..errors import Cancelled, one_line


@dataclass
class Outcome:
    """What a detection job ended with; handled on the GUI thread."""

    kind: str  # "ok" | "cancelled" | "error"
    detections: Any = None
    threshold: float | None = None
    model_info: dict | None = None
    message: str = ""
    context: dict = field(default_factory=dict)


class ProgressRelay(QObject):
    """Carries ``(fraction, stage)`` from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(float, str)

    def __call__(self, fraction: float, stage: str = "") -> None:
        try:
            f = float(fraction)
        except (TypeError, ValueError):
            f = 0.0
        self.progressed.emit(min(max(f, 0.0), 1.0), str(stage or ""))


def _is_cancelled_error(exc: BaseException) -> bool:
    return isinstance(exc, Cancelled)


def run_detection(
    get_predictor: Callable,
    scan,
    modality: str,
    device: str,
    cancel: threading.Event,
    progress: Callable,
    context: dict,
) -> Outcome:
    """Load (or reuse) the predictor and run it on ``scan``. Runs in a worker thread; never
    raises: failures come back as an ``Outcome`` for the GUI thread to report."""
    try:
        progress(0.0, "loading model")
        predictor = get_predictor(modality, device)
        if cancel.is_set():
            return Outcome("cancelled", context=context)
        det = predictor.predict(scan, progress=progress, cancel=cancel)
        if cancel.is_set():
            return Outcome("cancelled", context=context)
        info = getattr(predictor, "model_info", None)
        thr = getattr(predictor, "threshold", None)
        return Outcome(
            "ok",
            detections=det,
            threshold=None if thr is None else float(thr),
            model_info=dict(info) if info else None,
            context=context,
        )
    except Exception as exc:  # the thread boundary: report every failure, never crash the viewer
        if cancel.is_set() or _is_cancelled_error(exc):
            return Outcome("cancelled", context=context)
        msg = one_line(exc)
        if isinstance(exc, ImportError):
            msg = f"the Res-MTNet model is not available ({msg})"
        return Outcome("error", message=msg, context=context)
