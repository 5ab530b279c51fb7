"""Atomic file writes: several files replaced together, or none of them.

Core (standard library only); used wherever the package writes results a reader must never see
half-written (nodule files, autosaves, weights registry, evaluation reports).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError
from .paths import OutputPathError, check_output, escape_text, file_kind, shown


class NoduleFileError(InputError):
    """A nodule file that cannot be written, read, or does not belong to the image."""

    def __init__(self, message: str):
        super().__init__(escape_text(str(message)))  # one line: control characters escaped


# --- atomic writes ---------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(target: Path) -> int:
    """Permissions the written file should have: those of the file it replaces, else what
    ``open()`` would give (0o666 minus the umask), not mkstemp's private 0o600."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_texts(files: dict) -> list[str]:
    """Write ``{path: text}`` atomically: every file goes to a temporary file in its folder
    first; only when all are written and fsynced are they moved into place.

    A path must be a regular file, a link to one (the file it points to is replaced), or a
    new file in a writable folder; anything else (device, FIFO, folder, a link to them) is
    refused before anything is written. An interruption (Ctrl-C) removes the temporary files."""
    temps: list[tuple[str, Path]] = []
    targets: list[tuple[Path, str]] = []
    current = None
    try:
        for path, text in files.items():
            current = Path(path)
            try:
                targets.append((check_output(current), text))
            except OutputPathError as exc:
                raise NoduleFileError(f"could not write {exc}") from None
        for target, text in targets:
            current = target
            folder = target.parent if str(target.parent) else Path(".")
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
            temps.append((tmp, target))
            try:
                os.fchmod(fd, _final_mode(target))
            except (OSError, AttributeError):  # e.g. Windows, some network shares
                pass
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in temps:
            current = target
            if file_kind(target) not in ("file", "missing"):  # swapped for a FIFO/device meanwhile
                raise NoduleFileError(f"could not write {shown(target)}: it is now a {file_kind(target)}")
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException as exc:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, NoduleFileError) or not isinstance(exc, (OSError, ValueError, TypeError)):
            raise
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NoduleFileError(f"could not write {shown(current)}: {why}") from exc
    return [str(p) for p in files]


# --- serialising -----------------------------------------------------------------------------
