"""The plugin's one exception hierarchy (numpy-free, Qt-free, torch-free).

Every error the plugin raises on purpose derives from `ResMTNetError`, and its ``str()`` is
one line that says what went wrong and why, ready for a napari notification or the CLI's
``resmtnet COMMAND: message`` line; `one_line` turns any other exception into such a line.
Cancellation is a type (`Cancelled`), not a class name to compare.

    ResMTNetError
    ├── InputError (also a ValueError: bad input the user can fix)
    │   ├── PredictionError ── DeviceError       (inference)
    │   ├── NoduleFileError                      (export / import)
    │   ├── OutputPathError                      (paths)
    │   └── DicomExportError                     (dicom_export)
    ├── ScanReadError                            (io)
    ├── WeightsError                             (weights)
    ├── PacsError                                (pacs)
    └── Cancelled                                (a user's Cancel, any long task)

The ``ValueError`` base of `InputError` keeps ``except ValueError`` callers (argument
checking in scripts, tests) working.
"""

from __future__ import annotations


class ResMTNetError(Exception):
    """Base of the plugin's errors; ``str()`` is one line."""


class InputError(ResMTNetError, ValueError):
    """Input that cannot be used as given (a scan, a file, a path, a setting)."""


class Cancelled(ResMTNetError):
    """A long task stopped because the user cancelled it."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message's first non-empty line, else its class name."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
