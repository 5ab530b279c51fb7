"""Bundled weights registry and safe loading.

``resources/weights/registry.json`` lists, per modality, the weights file, its sha256, the
model version, the input spacing and the operating threshold chosen on the validation split.
Weights are read only after their sha256 matches (bundled: the recorded one; a user file:
the ``.sha256`` file beside it, or the hash given by the caller), and only with
``torch.load(weights_only=True)``, which refuses pickled code. The file's ``format`` and
network config are validated before a model is built.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path

from ..errors import ResMTNetError, one_line
from ..paths import file_kind, read_head, shown
from ..files import atomic_write_texts

WEIGHTS_FORMAT = "resmtnet-weights/1"
MODALITIES = ("CT", "CXR")


class WeightsError(ResMTNetError):
    """The weights file is missing, altered, unsafe or of an unknown format (one line)."""


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_dir() -> Path:
    return Path(str(resources.files("napari_resmtnet.resources") / "weights"))


def registry() -> dict:
    p = weights_dir() / "registry.json"
    if not p.exists():
        return {}
    return json.loads(p.read_text())


def bundled_entry(modality: str) -> dict:
    m = modality.upper()
    reg = registry()
    if m not in reg:
        raise WeightsError(f"no bundled weights for modality {m!r} (have: {sorted(reg) or 'none'})")
    e = dict(reg[m])
    e["path"] = str(weights_dir() / e["file"])
    return e


def load_checkpoint(path, sha256: str | None = None) -> dict:
    """Verify and read a weights file; returns its dict (state_dict + metadata).

    ``sha256``: the expected hash; when None, ``<path>.sha256`` must exist beside the file.
    """
    import torch

    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise WeightsError(f"{shown(path)}: weights file not found")
    if kind != "file":
        raise WeightsError(f"{shown(path)}: is a {kind}, not a regular weights file")
    if sha256 is None:
        side = path.with_name(path.name + ".sha256")
        side_kind = file_kind(side)
        if side_kind == "missing":
            raise WeightsError(
                f"{shown(path)}: no expected sha256 given and no {shown(side.name)} beside it; "
                "refusing unverified weights"
            )
        if side_kind != "file":  # a FIFO would block forever
            raise WeightsError(f"{shown(side)}: is a {side_kind}, not a file holding the expected sha256")
        try:
            words = read_head(side, 4096).decode("ascii").split()
        except UnicodeDecodeError as exc:
            raise WeightsError(f"{shown(side)}: cannot read the expected sha256 ({exc.reason})") from None
        if not words:
            raise WeightsError(f"{shown(side)}: empty; expected the weights file's sha256")
        sha256 = words[0].strip()
    try:
        actual = sha256_of(path)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the weights file ({exc.strerror or exc})") from None
    if actual != sha256.lower():
        raise WeightsError(
            f"{path}: sha256 mismatch (expected {sha256[:12]}..., got {actual[:12]}...); the file is altered or truncated"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":  # torch.save: zip, or legacy pickle
        raise WeightsError(f"{path}: not a PyTorch weights file (expected a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = one_line(e)
        raise WeightsError(f"{path}: not a safe weights file ({first})") from None
    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        family = WEIGHTS_FORMAT.split("/")[0] + "/"
        if isinstance(got, str) and got.startswith(family):
            raise WeightsError(
                f"{path}: weights format {got!r} is not supported by this version of "
                f"napari-resmtnet (it reads {WEIGHTS_FORMAT!r}); update the plugin or "
                "export the weights again"
            )
        raise WeightsError(f"{path}: unknown weights format {got!r}, expected {WEIGHTS_FORMAT!r}")
    for key in ("network", "state_dict", "modality"):
        if key not in obj:
            raise WeightsError(f"{path}: weights lack {key!r}")
    if obj["modality"] not in MODALITIES:
        raise WeightsError(f"{path}: unknown modality {obj['modality']!r}")
    _check_metadata(path, obj)
    _check_tensors(path, obj["state_dict"])
    obj["sha256"] = actual
    obj["path"] = str(path)
    return obj


#: network dimensionality each modality needs
SPATIAL_DIMS = {"CT": 3, "CXR": 2}
#: model input spacing (mm) a weights file may declare
SPACING_RANGE_MM = (0.05, 10.0)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _check_metadata(path, obj: dict) -> None:
    """The config a weights file carries must make sense before a model is built from it:
    the network's dimensionality matches the modality; threshold and spacing are numbers in
    range; name and version are text."""
    net = obj["network"]
    if not isinstance(net, dict):
        raise WeightsError(f"{path}: network config must be a dict, got {type(net).__name__}")
    dims = net.get("spatial_dims", 3)
    want = SPATIAL_DIMS[obj["modality"]]
    if dims != want:
        raise WeightsError(f"{path}: {obj['modality']} weights need a {want}D network, the file's is {dims!r}D")
    if "threshold" in obj:
        t = _number(obj["threshold"])
        if t is None or not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise WeightsError(f"{path}: threshold must be a number in [0, 1], got {obj['threshold']!r}")
    if "spacing_mm" in obj:
        sp = _number(obj["spacing_mm"])
        lo, hi = SPACING_RANGE_MM
        if sp is None or not math.isfinite(sp) or not lo <= sp <= hi:
            raise WeightsError(
                f"{path}: spacing_mm must be a number of mm in [{lo:g}, {hi:g}], got {obj['spacing_mm']!r}"
            )
    for key in ("name", "version"):
        if key in obj and not isinstance(obj[key], str):
            raise WeightsError(f"{path}: {key} must be text, got {type(obj[key]).__name__}")


#: bounds of the network config's whole numbers (checked before any network is built)
CONFIG_INT_RANGE = {
    "in_channels": (1, 16),
    "widths": (1, 2048),
    "blocks": (0, 64),
    "head_width": (1, 2048),
    "fpr_patch": (4, 512),
    "fpr_width": (1, 2048),
}


def _check_tensors(path, state) -> None:
    """The state dict holds named tensors, and every floating tensor is finite (a file of
    NaN weights would otherwise "find 0 nodules" everywhere)."""
    import torch

    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: state_dict must be a non-empty mapping of tensors")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WeightsError(f"{path}: state_dict entry {str(name)[:60]!r} is not a named tensor")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{path}: tensor {name!r} holds NaN or infinite values; the weights are damaged")


def _check_config_ranges(path, net: dict) -> None:
    for key, (lo, hi) in CONFIG_INT_RANGE.items():
        if key not in net:
            continue
        vals = net[key] if isinstance(net[key], (list, tuple)) else [net[key]]
        if len(vals) > 16 or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in vals):
            raise WeightsError(
                f"{path}: network {key} must be whole numbers from {lo} to {hi}, got {str(net[key])[:80]}"
            )
    for key, v in net.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise WeightsError(f"{path}: network {key} must be a finite number, got {v!r}")


def build_model(ckpt: dict):
    """A ResMTNet in eval mode from a verified checkpoint dict.

    The network is first laid out on torch's "meta" device (no memory) and its tensor
    shapes compared with the file's, so that a config that does not match its weights (or
    asks for an absurd network) is refused before anything is allocated."""
    import torch

    # the registry and metadata checks stay light: the model (torch) only here
    from ..model import ResMTNet, ResMTNetConfig  # lazy: the model imports torch

    where = ckpt.get("path", "weights")
    try:
        _check_config_ranges(where, ckpt["network"])
        cfg = ResMTNetConfig.from_dict(ckpt["network"])
        with torch.device("meta"):
            layout = {k: tuple(v.shape) for k, v in ResMTNet(cfg).state_dict().items()}
        given = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
        if layout != given:
            missing = sorted(set(layout) - set(given))
            extra = sorted(set(given) - set(layout))
            wrong = sorted(k for k in set(layout) & set(given) if layout[k] != given[k])
            what = (
                f"missing {missing[:2]}"
                if missing
                else f"unexpected {extra[:2]}"
                if extra
                else f"{wrong[0]} is {list(given[wrong[0]])}, the network's is {list(layout[wrong[0]])}"
            )
            raise ValueError(f"the config and the tensors disagree: {what}")
        model = ResMTNet(cfg)
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, TypeError, RuntimeError) as e:
        first = one_line(e)
        raise WeightsError(f"{where}: does not match this version's network ({first})") from None
    return model.eval()


def load_model(modality: str = "CT", weights=None, sha256: str | None = None, device="cpu"):
    """(model, info) for bundled weights of ``modality`` or a user ``weights`` file.

    ``info``: name, version, sha256, modality, spacing_mm, threshold, path.
    """
    if weights is None:
        entry = bundled_entry(modality)
        ckpt = load_checkpoint(entry["path"], entry["sha256"])
        threshold = float(entry.get("threshold", 0.5))
    else:
        ckpt = load_checkpoint(weights, sha256)
        threshold = float(ckpt.get("threshold", 0.5))
    if ckpt["modality"] != modality.upper():
        raise WeightsError(f"{ckpt['path']}: weights are for {ckpt['modality']}, not {modality.upper()}")
    model = build_model(ckpt).to(device)
    info = {
        "name": ckpt.get("name", "resmtnet"),
        "version": ckpt.get("version", "?"),
        "sha256": ckpt["sha256"],
        "modality": ckpt["modality"],
        "spacing_mm": float(ckpt.get("spacing_mm", 1.0)),
        "threshold": threshold,
        "path": ckpt["path"],
    }
    return model, info


def bundle(
    src, modality: str, threshold: float, metrics: dict | None = None, half: bool = False, extra: dict | None = None
) -> dict:
    """Copy trained weights into resources/weights and record them in the registry.

    ``half`` stores floating tensors as float16 (half the size; they are cast back to the
    network's float32 when loaded). ``extra`` adds plain metadata to the file; the
    operating ``threshold`` is written into it as well.
    """
    import torch

    m = modality.upper()
    src_ck = load_checkpoint(src, sha256_of(src))
    obj = {k: v for k, v in src_ck.items() if k not in ("sha256", "path")}
    if half:
        obj["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in obj["state_dict"].items()}
    obj["threshold"] = float(threshold)
    obj.update(extra or {})

    dst_dir = weights_dir()  # the folder load_model reads (the source tree in an editable install)
    dst_dir.mkdir(parents=True, exist_ok=True)
    name = f"resmtnet_{m.lower()}.pt"
    tmp = dst_dir / (name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(dst_dir / name)
    reg_path = dst_dir / "registry.json"
    reg = json.loads(reg_path.read_text()) if reg_path.exists() else {}
    ck = load_checkpoint(dst_dir / name, sha256_of(dst_dir / name))
    reg[m] = {
        "file": name,
        "sha256": ck["sha256"],
        "version": ck.get("version"),
        "name": ck.get("name"),
        "spacing_mm": ck.get("spacing_mm"),
        "threshold": float(threshold),
        "metrics": metrics or {},
    }
    atomic_write_texts({reg_path: json.dumps(reg, indent=2, sort_keys=True) + "\n"})
    return reg[m]
