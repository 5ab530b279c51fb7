"""The wheel ships the manifest and the samples; the installed manifest validates."""
from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_source(dst: Path) -> Path:
    """The files setup.py builds from, copied so the build leaves the checkout untouched."""
    src = dst / "src"
    src.mkdir()
    for name in ("setup.py", "README.md", "napari.yaml"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "napari_resmtnet", src / "napari_resmtnet", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "resources", src / "resources", symlinks=True, ignore=ignore)
    return src


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), "-q"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheels = list((tmp / "dist").glob("napari_resmtnet-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.mark.slow
def test_wheel_contains_manifest_and_samples(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = z.getinfo("napari_resmtnet/napari.yaml")
        mode = info.external_attr >> 16
        assert not stat.S_ISLNK(mode), "napari.yaml is packed as a symbolic link"
        manifest = z.read("napari_resmtnet/napari.yaml").decode()
        assert manifest.startswith("name: napari-resmtnet")
        for key in ("napari_resmtnet._reader:napari_get_reader", "napari_resmtnet._sample_data:sample_ct"):
            assert key in manifest
        samples = {n for n in names if n.startswith("napari_resmtnet/resources/samples/")}
        for f in ("lung1.mha", "lung1_label.mha", "node21_3.mha", "README.md"):
            assert f"napari_resmtnet/resources/samples/{f}" in samples
        assert any(n.endswith("_dcm_1.mha") for n in samples)
        ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "napari-resmtnet = napari_resmtnet:napari.yaml" in z.read(ep).decode()


@pytest.mark.slow
def test_installed_wheel_reads_its_own_samples(wheel, tmp_path):
    """Installed (not editable) copy: samples and manifest resolve inside the install."""
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    code = textwrap.dedent(
        f"""
        import napari_resmtnet, pathlib
        from napari_resmtnet._sample_data import sample_path, sample_cxr
        from npe2 import PluginManifest
        root = pathlib.Path({str(target)!r})
        assert pathlib.Path(napari_resmtnet.__file__).is_relative_to(root), napari_resmtnet.__file__
        assert sample_path("lung1").is_relative_to(root)
        (data, kw, _), = sample_cxr()
        assert data.shape == (1024, 1024)
        yaml = root / "napari_resmtnet" / "napari.yaml"
        assert yaml.is_file() and not yaml.is_symlink()
        PluginManifest.from_file(yaml)
        print("ok")
        """
    )
    env = {"PYTHONPATH": str(target), "PATH": str(BIN)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env,
                         cwd=tmp_path)  # not the checkout: "" on sys.path would import it
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_npe2_validate_installed_plugin():
    npe2 = shutil.which("npe2", path=str(BIN)) or shutil.which("npe2")
    if npe2 is None:
        pytest.skip("npe2 command not found")
    out = subprocess.run([npe2, "validate", "napari-resmtnet"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "valid" in out.stdout
