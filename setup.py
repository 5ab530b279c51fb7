"""napari-resmtnet: lung nodule detection and malignancy grading in napari (Res-MTNet)."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def version():
    for line in (HERE / "napari_resmtnet" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("no __version__")


setup(
    name="napari-resmtnet",
    version=version(),
    description="Find and grade lung nodules in chest CT and X-ray with Res-MTNet, in napari",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=[
        "napari_resmtnet",
        "napari_resmtnet._qt",
        "napari_resmtnet.annotations",
        "napari_resmtnet.cli",
        "napari_resmtnet.evaluation",
        "napari_resmtnet.inference",
        "napari_resmtnet.io",
        "napari_resmtnet.model",
        "napari_resmtnet.resources",
        "napari_resmtnet.training",
    ],
    # resources/ lives at the top of the repository and is installed as a sub-package,
    # so importlib.resources finds it in editable installs and in wheels alike.
    package_dir={"napari_resmtnet.resources": "resources"},
    package_data={
        "napari_resmtnet": ["napari.yaml"],
        "napari_resmtnet.resources": ["*.md", "*.json", "*.png", "samples/*", "weights/*"],
    },
    include_package_data=False,
    install_requires=[
        "numpy",
        "scipy",
        "pandas",
        "napari>=0.5",
        "magicgui",
        "qtpy",
        "npe2",
        "torch>=2.1",
        "SimpleITK>=2.2",
        "scikit-image",
        "platformdirs",
        "tqdm",
        "dicomweb-client>=0.59",
        "pydicom>=2.4",
        "highdicom>=0.22",
        "dask[distributed]>=2024.1",
    ],
    extras_require={
        "pyqt5": ["PyQt5"],
        "testing": ["pytest", "pytest-qt", "hypothesis", "pydicom", "ruff>=0.17,<0.18", "mypy>=2.4"],
    },
    entry_points={
        "napari.manifest": ["napari-resmtnet = napari_resmtnet:napari.yaml"],
        "console_scripts": [
            "resmtnet = napari_resmtnet.cli.main:main",
            "resmtnet-train = napari_resmtnet.cli.main:train_main",
            "resmtnet-evaluate = napari_resmtnet.cli.main:evaluate_main",
        ],
    },
    classifiers=[
        "Framework :: napari",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Intended Audience :: Science/Research",
    ],
)
