"""napari sample data: a real chest CT, a LUNA16 nodule cube and a real chest X-ray.

The files live in ``resources/samples/`` (installed as ``napari_resmtnet.resources``);
see the README there for sources and licences. Every sample goes through the same code
path as the reader (`napari_resmtnet.io.formats.load_scan` + `napari_resmtnet._reader.scan_layer_data`).
"""

from __future__ import annotations

from pathlib import Path

from ._reader import scan_layer_data
from .io.formats import load_scan
from .inference.predictor import Predictor
from .layers import detections_to_layer_data

#: sample key -> file name in resources/samples/
SAMPLE_FILES = {
    "lung1": "lung1.mha",
    "lung1_label": "lung1_label.mha",
    "cube": "1.3.6.1.4.1.14519.5.2.1.6279.6001.109002525524522225658609808059_dcm_1.mha",
    "cxr": "node21_3.mha",
}


def sample_path(key: str) -> Path:
    """Path of a bundled sample file: ``"lung1"``, ``"lung1_label"``, ``"cube"`` or ``"cxr"``."""
    from importlib.resources import files

    if key not in SAMPLE_FILES:
        raise KeyError(f"unknown sample {key!r}; expected one of {sorted(SAMPLE_FILES)}")
    p = Path(str(files("napari_resmtnet.resources") / "samples" / SAMPLE_FILES[key]))
    if not p.is_file():
        raise FileNotFoundError(f"{p}: bundled sample file is missing; reinstall napari-resmtnet")
    return p


def _sample(key: str, name: str):
    return scan_layer_data(load_scan(sample_path(key)), name=name)


def sample_ct():
    """Whole chest CT (lung1, pyradiomics test data), cropped around the thorax."""
    return _sample("lung1", "lung1 chest CT")


def sample_cube():
    """A 50 mm LUNA16 cube around a malignant (LIDC rating 5), spiculated 16 mm nodule."""
    return _sample("cube", "LUNA16 nodule cube")


def sample_cxr():
    """A full-resolution frontal chest X-ray from NODE21 (1024 x 1024, 0.269 mm/px)."""
    return _sample("cxr", "NODE21 chest X-ray")


def sample_ct_detect():
    """The sample chest CT plus the nodules Res-MTNet finds in it (one layer each kind)."""
    scan = load_scan(sample_path("lung1"))
    try:
        predictor = Predictor(modality="CT")
    except ImportError as e:
        raise RuntimeError(
            f"nodule detection is not available in this installation ({e}); "
            "load the 'lung1' sample without detection instead"
        ) from e
    detections = predictor.predict(scan)
    return scan_layer_data(scan, name="lung1 chest CT") + list(
        detections_to_layer_data(detections, scan, predictor.threshold)
    )
