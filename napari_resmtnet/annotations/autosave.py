"""Autosave of nodule annotations, so that no review work is lost. Qt-free.

Every change of an image's nodules is written (by the widget, debounced about one second)
to ``<cache>/autosave/<key>.json`` in the format of `napari_resmtnet.annotations.export` (the nodule
JSON: every nodule with its box in voxels, label, review state, the model's findings and the
reader's texture override, and the hidden candidates),
atomically through `napari_resmtnet.files.atomic_write_texts` -- a crash or a kill during
the write leaves the previous autosave whole.

``<key>`` identifies the image: a hash of its seriesuid, shape, spacing and origin (not its
path, so that a moved or copied scan still finds its autosave). When the image is opened
again, the widget offers to restore the autosaved nodules.

``<cache>`` is ``platformdirs.user_cache_dir("napari-resmtnet")`` unless the environment
variable ``RESMTNET_AUTOSAVE_DIR`` names another folder. ``RESMTNET_AUTOSAVE_RESTORE``
(``ask`` (default), ``always`` or ``never``) decides what happens when an autosave exists,
for scripted sessions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .export import NoduleFileError, check_same_image, json_text, read_nodules_json
from ..files import atomic_write_texts
from .table import NoduleTable

__all__ = [
    "ENV_DIR",
    "ENV_RESTORE",
    "AutosaveInfo",
    "autosave_dir",
    "image_key",
    "autosave_path",
    "save",
    "peek",
    "load",
    "discard",
    "restore_policy",
]

ENV_DIR = "RESMTNET_AUTOSAVE_DIR"
ENV_RESTORE = "RESMTNET_AUTOSAVE_RESTORE"
RESTORE_POLICIES = ("ask", "always", "never")
#: temporary files of writes that were killed are removed after this long (s)
STALE_TEMP_S = 3600.0
#: autosaves not touched for this long (s) are removed (90 days)
MAX_AGE_S = 90 * 24 * 3600.0


@dataclass(frozen=True)
class AutosaveInfo:
    path: Path
    n_nodules: int
    n_shown: int
    saved_at: str


def autosave_dir() -> Path:
    """Where autosaves live: ``$RESMTNET_AUTOSAVE_DIR`` or the user cache folder."""
    env = os.environ.get(ENV_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-resmtnet")) / "autosave"


def image_key(image: dict) -> str:
    """Stable key of an image identity (`napari_resmtnet.annotations.table.image_identity`):
    seriesuid + shape + spacing + origin (rounded so that float noise does not matter)."""
    ident = {
        "seriesuid": str(image.get("seriesuid") or ""),
        "shape": [int(s) for s in image["shape"]],
        "spacing": [round(float(s), 6) for s in image["spacing"]],
        "origin": [round(float(o), 4) + 0.0 for o in image["origin"]],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def autosave_path(image: dict) -> Path:
    return autosave_dir() / f"{image_key(image)}.json"


def restore_policy() -> str:
    """``ask`` | ``always`` | ``never`` from ``$RESMTNET_AUTOSAVE_RESTORE`` (default ask)."""
    v = os.environ.get(ENV_RESTORE, "").strip().lower()
    return v if v in RESTORE_POLICIES else "ask"


def save(table: NoduleTable) -> Path:
    """Write the autosave of ``table``'s image (atomically); returns its path.

    Raises `NoduleFileError` (one line naming the file) when it cannot be written.
    """
    folder = autosave_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # annotations of patients' scans
    except OSError as exc:
        raise NoduleFileError(f"could not create the autosave folder {folder}: {exc.strerror or exc}") from exc
    path = folder / f"{image_key(table.image)}.json"
    saved_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        text = json_text(table, exported_at=saved_at)
    except (ValueError, TypeError) as exc:  # e.g. a non-finite value: refuse, as export does
        raise NoduleFileError(f"could not autosave to {path}: {exc}") from None
    atomic_write_texts({path: text})
    _tidy(folder, keep=path)
    return path


def peek(image: dict) -> AutosaveInfo | None:
    """What the autosave of ``image`` holds (None when there is none).

    Raises `NoduleFileError` when the file exists but is unreadable or of another image.
    """
    path = autosave_path(image)
    if not path.is_file():
        return None
    table = read_nodules_json(path)
    check_same_image(table.image, image, path)
    try:
        saved_at = str(json.loads(path.read_text(encoding="utf-8")).get("exported_at", ""))
    except (OSError, ValueError):
        saved_at = ""
    return AutosaveInfo(path, len(table), int(table.visible_mask().sum()), saved_at)


def load(image: dict) -> NoduleTable | None:
    """The autosaved nodules of ``image`` (exactly as saved; the identity is ``image``'s)."""
    path = autosave_path(image)
    if not path.is_file():
        return None
    table = read_nodules_json(path)
    check_same_image(table.image, image, path)
    table.image = dict(image)
    return table


def discard(image: dict) -> bool:
    """Remove the autosave of ``image``; True when there was one."""
    try:
        autosave_path(image).unlink()
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True


def _tidy(folder: Path, keep: Path) -> None:
    """Remove temporary files left by killed writes and autosaves untouched for months."""
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        try:
            if not e.is_file() or e.path == str(keep):
                continue
            age = now - e.stat().st_mtime
            if (e.name.startswith(".") and e.name.endswith(".tmp") and age > STALE_TEMP_S) or (
                e.name.endswith(".json") and age > MAX_AGE_S
            ):
                os.unlink(e.path)
        except OSError:
            continue
