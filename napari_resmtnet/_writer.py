"""napari writer: nodule Shapes/Points layers -> LUNA16-style CSV + full JSON.

Imports are late: napari imports this module at startup.
"""

from __future__ import annotations
from .annotations.export import NoduleFileError, check_same_image, export_nodules
from .layers import layer_to_nodules


def write_nodules(path: str, layer_data: list) -> list[str]:
    """Write the nodules of one or more layers to ``<stem>.csv`` and ``<stem>.json``.

    ``layer_data`` is napari's list of ``(data, attributes, layer_type)``. Layers made by
    this plugin carry their full nodule table; other Shapes/Points layers are read shape by
    shape (`napari_resmtnet.layers.layer_to_nodules`). Several layers are merged when they
    belong to the same image. Returns the paths written; raises
    `napari_resmtnet.annotations.export.NoduleFileError` with a one-line message on failure.
    """

    if isinstance(layer_data, tuple) and len(layer_data) in (2, 3) and not isinstance(layer_data[0], tuple):
        layer_data = [layer_data]
    tables = []
    for item in layer_data:
        try:
            tables.append(layer_to_nodules(item))
        except (ValueError, KeyError, TypeError) as exc:
            name = (item[1] or {}).get("name", "layer") if len(item) > 1 else "layer"
            raise NoduleFileError(f"cannot write {path}: layer '{name}' is not a nodule layer ({exc})") from exc
    if not tables:
        raise NoduleFileError(f"cannot write {path}: no layer to write")
    table = tables[0]
    for other in tables[1:]:
        check_same_image(other.image, table.image, "a selected layer")
        vis = other.visible_mask(table.threshold)
        for i in range(len(other)):
            if not vis[i]:
                continue
            table, _ = table.added(
                other.boxes[i],
                label=str(other.label[i]),
                probability=float(other.probability[i]),
                malignancy=float(other.malignancy[i]),
                source=str(other.source[i]),
                reviewed=bool(other.reviewed[i]),
                review=str(other.review[i]),
                findings=other.findings[i],
                texture_override=other.texture_override[i],
            )
    return export_nodules(path, table)
