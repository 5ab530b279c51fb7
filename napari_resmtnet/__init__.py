"""napari-resmtnet: find and grade lung nodules in chest CT and X-ray with Res-MTNet.

Importing this package is cheap: torch, SimpleITK and Qt load only when used.
Public API: `load_scan`, `Scan`, `Detections`, `predict`, `Predictor`, `sample_path`.
"""

# The one place the version is written: setup.py reads it, `resmtnet --version` prints it.
__version__ = "0.1.0"

__all__ = ["Detections", "Predictor", "Scan", "__version__", "load_scan", "predict", "sample_path"]


def __getattr__(name):
    if name == "load_scan":
        from .io.formats import load_scan  # lazy: the package import stays light (PEP 562 re-export)

        return load_scan
    if name == "Scan":
        from .scan import Scan  # lazy: the package import stays light (PEP 562 re-export)

        return Scan
    if name == "Detections":
        from .detections import Detections  # lazy: the package import stays light (PEP 562 re-export)

        return Detections
    if name in ("predict", "Predictor"):
        from .inference import predictor  # lazy: the package import stays light (PEP 562 re-export)

        return getattr(predictor, name)
    if name == "sample_path":
        from ._sample_data import sample_path  # lazy: the package import stays light (PEP 562 re-export)

        return sample_path
    raise AttributeError(f"module 'napari_resmtnet' has no attribute {name!r}")
