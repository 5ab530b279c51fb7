"""Packaging: the wheel ships the manifest, samples and licence; the installed manifest
validates; the package imports light, has one version, one manifest and one CLI convention."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

import napari_resmtnet
from napari_resmtnet.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_source(dst: Path) -> Path:
    """The files setup.py builds from, copied so the build leaves the checkout untouched."""
    src = dst / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "napari.yaml"):
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
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            "-q",
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
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
        assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names)
        ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "napari-resmtnet = napari_resmtnet:napari.yaml" in z.read(ep).decode()


@pytest.mark.slow
def test_installed_wheel_reads_its_own_samples(wheel, tmp_path):
    """Installed (not editable) copy: samples and manifest resolve inside the install."""
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
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
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        env=env,
        cwd=tmp_path,
    )  # not the checkout: "" on sys.path would import it
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_npe2_validate_installed_plugin():
    npe2 = shutil.which("npe2", path=str(BIN)) or shutil.which("npe2")
    if npe2 is None:
        pytest.skip("npe2 command not found")
    out = subprocess.run(
        [npe2, "validate", "napari-resmtnet"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "valid" in out.stdout


# -- the package itself: light import, one version, one manifest, one CLI convention ----------


def _run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


HEAVY = ("torch", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "SimpleITK", "vispy")


def test_import_loads_neither_torch_nor_qt():
    code = f"import sys, napari_resmtnet; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert _run_python(code) == "[]"


def test_cli_help_and_version_load_neither_torch_nor_qt():
    code = (
        "import sys, contextlib, io; from napari_resmtnet.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): assert main(['--help']) == 0 and main(['--version']) == 0\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert _run_python(code) == "[]"


def test_version_is_written_once():
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == napari_resmtnet.__version__
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{napari_resmtnet.__version__}]" in changelog, "CHANGELOG.md has no entry for this version"


def test_manifest_copies_are_identical():
    """napari_resmtnet/napari.yaml is the source (installed with the package, named by the
    entry point); the top-level copy is what the design asks for beside setup.py."""
    source = (REPO / "napari_resmtnet" / "napari.yaml").read_bytes()
    assert (REPO / "napari.yaml").read_bytes() == source, (
        "napari.yaml differs from napari_resmtnet/napari.yaml: edit the latter, then "
        "`cp napari_resmtnet/napari.yaml napari.yaml`"
    )


def test_public_api_is_listed_and_resolves():
    assert sorted(napari_resmtnet.__all__) == napari_resmtnet.__all__
    assert napari_resmtnet.sample_path("lung1").is_file()
    with pytest.raises(AttributeError, match="no_such_name"):
        napari_resmtnet.no_such_name  # noqa: B018


def _fake_command(monkeypatch, func):
    module = types.ModuleType("resmtnet_fake_command")
    module.main = func
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a test command"))


def _raise(exc):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    "func, code, message",
    [
        (lambda argv: 0, 0, None),
        (lambda argv: None, 0, None),
        (lambda argv: 3, 3, None),
        (_raise(SystemExit(2)), 2, None),
        (_raise(SystemExit("bad thing")), 1, "resmtnet fake: bad thing"),
        (_raise(KeyboardInterrupt()), 130, "resmtnet fake: interrupted"),
        (_raise(ValueError("first line\nsecond line")), 1, "resmtnet fake: first line"),
        (_raise(RuntimeError()), 1, "resmtnet fake: RuntimeError"),
    ],
)
def test_cli_exit_status_and_one_line_errors(monkeypatch, capsys, func, code, message):
    _fake_command(monkeypatch, func)
    assert cli.main(["fake", "--x"]) == code
    err = capsys.readouterr().err
    if message is None:
        assert err == ""
    else:
        assert err == message + "\n"


def test_cli_usage_errors(capsys):
    assert cli.main([]) == 2
    assert "usage: resmtnet COMMAND" in capsys.readouterr().err
    assert cli.main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resmtnet: unknown command 'bogus'") and err.count("\n") == 1
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip().endswith(napari_resmtnet.__version__)
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("predict", "train", "evaluate", "demo", "figure"):
        assert f"  {name} " in out


def test_cli_aliases_dispatch(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    assert cli.train_main(["--config", "c.json"]) == 0
    assert cli.evaluate_main(["--modality", "CT"]) == 0
    assert seen == [["train", "--config", "c.json"], ["evaluate", "--modality", "CT"]]


def test_cli_figure_without_data_names_the_flag_and_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESMTNET_DATA", str(tmp_path / "none"))
    assert cli.main(["figure", "--out", str(tmp_path / "f.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("resmtnet figure: ") and err.count("\n") == 1
    assert "--data" in err and "RESMTNET_DATA" in err
    assert not (tmp_path / "f.png").exists()
