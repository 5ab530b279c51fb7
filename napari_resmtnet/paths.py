"""The path policy of every reader and writer (Qt-free, standard library only).

* **Reading:** a header (MetaImage, NRRD) may name data files only inside its own folder
  (or below), after symbolic links are resolved; every data file must be a regular file
  (not a FIFO, device, socket or folder). Files are opened without blocking, so that a FIFO
  can never hang a reader.
* **Writing:** an output is a regular file or a new file in an existing folder; devices,
  FIFOs, folders and links to them are refused. A link to a regular file is written through
  (the file it points to is replaced, the link stays).
* **Names in messages:** `shown` escapes control characters (newlines, ANSI escapes) so that
  a file name cannot garble a one-line message or a terminal.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

from .errors import InputError

__all__ = [
    "shown",
    "escape_text",
    "file_kind",
    "is_regular",
    "read_head",
    "inside_folder",
    "check_output",
    "OutputPathError",
]


def escape_text(text: str) -> str:
    """``text`` with control and format characters (newline, ESC, bidi overrides...) written
    as escapes (``\\n``, ``\\x1b``, ``\\u202e``); printable text, unicode included, unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == " " or (ch.isprintable() and unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")):
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1] if ch != "\\" else ch)
    return "".join(out)


def shown(path) -> str:
    """A path as it may appear in a one-line message: control characters escaped."""
    try:
        return escape_text(os.fspath(path))
    except TypeError:
        return escape_text(repr(path))


def file_kind(path) -> str:
    """``"file"``, ``"folder"``, ``"FIFO"``, ``"device"``, ``"socket"``, ``"missing"``,
    ``"link loop"`` or ``"unreadable"`` (symbolic links followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        import errno

        return "link loop" if exc.errno == errno.ELOOP else "unreadable"
    except ValueError:  # embedded NUL
        return "unreadable"
    m = st.st_mode
    if stat.S_ISREG(m):
        return "file"
    if stat.S_ISDIR(m):
        return "folder"
    if stat.S_ISFIFO(m):
        return "FIFO"
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "device"
    if stat.S_ISSOCK(m):
        return "socket"
    return "special file"


def is_regular(path) -> bool:
    return file_kind(path) == "file"


def read_head(path, n: int) -> bytes:
    """Up to ``n`` bytes from the start of a regular file; ``b""`` for anything else.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor, so a FIFO
    or device never blocks and a file swapped after a check is still not read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        chunks, left = [], n
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    except OSError:
        return b""
    finally:
        os.close(fd)


def inside_folder(folder, name: str) -> tuple[bool, str]:
    """(inside, resolved path): does ``name`` (relative to ``folder``, or absolute) lead, once
    ``..`` and symbolic links are resolved, to a path inside ``folder`` (itself resolved)?"""
    base = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(base, name))
    try:
        inside = os.path.commonpath([base, target]) == base
    except ValueError:  # different drives (Windows)
        inside = False
    return inside, target


class OutputPathError(InputError):
    """An output path that is not a regular file or a new file in a writable folder."""


def check_output(path) -> Path:
    """The file to write for the output ``path``, or `OutputPathError` (one line).

    Allowed: an existing regular file, a link to one (the returned path is the link's
    target, so the link stays), or a new name in an existing writable folder. Refused:
    folders, FIFOs, devices, sockets, links to them, dangling links and link loops."""
    p = Path(os.fspath(path))
    name = shown(p)
    if os.path.islink(p):
        kind = file_kind(p)
        if kind == "missing":
            raise OutputPathError(f"{name} is a link to a missing file; refused (give a plain file name)")
        if kind != "file":
            raise OutputPathError(f"{name} is a link to a {kind}, not a regular file; refused")
        p = Path(os.path.realpath(p))
    kind = file_kind(p)
    if kind == "folder":
        raise OutputPathError(f"{name} is a folder; give a file name")
    if kind not in ("file", "missing"):
        raise OutputPathError(
            f"{name} is a {kind}, not a regular file; refused (outputs are written to regular files only)"
        )
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{name}: folder {shown(folder)} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name}: folder {shown(folder)} is not writable")
    return p
