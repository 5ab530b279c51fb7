"""``resmtnet predict``: many inputs, LUNA16 CSV parsed back, bad inputs skipped, exit codes.

Most tests replace the bundled weights by `CentroidNet` (see test_inference.py), which
reports bright balls exactly, so that the CSV's world coordinates can be checked against
positions computed independently with SimpleITK; one test runs the real command in a
subprocess with a tiny random Res-MTNet weights file.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import napari_resmtnet.cli.predict as predict_cli
import napari_resmtnet.inference.predictor as inference
from napari_resmtnet.cli.predict import main

sys.path.insert(0, str(Path(__file__).parents[1] / "inference"))
from test_inference import AIR_BALL_LEVEL, CentroidNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def write_ball_image(
    path, shape_zyx, spacing_xyz, origin_xyz, direction_xyz, centre_zyx, radius_mm=5.0, hu=500, background=-1000
):
    """Image with a bright ball written by SimpleITK; returns the ball centre in LPS world
    mm (x, y[, z]) computed by SimpleITK itself."""
    sp = np.asarray(spacing_xyz, float)[::-1]
    grids = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij", sparse=True)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_zyx, sp))
    arr = np.where(d2 <= radius_mm**2, hu, background).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(map(float, spacing_xyz)))
    img.SetOrigin(tuple(map(float, origin_xyz)))
    img.SetDirection(tuple(np.asarray(direction_xyz, float).ravel()))
    sitk.WriteImage(img, str(path))
    return np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, centre_zyx[::-1]))))


@pytest.fixture
def centroid_predictor(monkeypatch):
    """`Predictor` as the CLI builds it, but with CentroidNet instead of bundled weights."""
    real = inference.Predictor

    def fake(modality, weights=None, sha256=None, device="auto", **kw):
        nd = 3 if modality == "CT" else 2
        level = AIR_BALL_LEVEL if nd == 3 else 0.5
        return real(
            modality,
            model=CentroidNet(nd, level),
            device=device,
            info={
                "name": "centroid",
                "version": "t",
                "sha256": "0" * 64,
                "threshold": 0.5,
                "spacing_mm": 1.0 if nd == 3 else 1.6,
            },
            **kw,
        )

    monkeypatch.setattr(predict_cli, "Predictor", fake)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_parsed_back_has_world_xyz(tmp_path, centroid_predictor, capsys):
    a = tmp_path / "scan_a.nrrd"
    b = tmp_path / "scan_b.mha"
    flip = np.diag([-1.0, 1.0, -1.0])
    wa = write_ball_image(a, (30, 60, 56), (0.8, 0.9, 2.0), (12.0, -150.5, 310.0), flip, (14.3, 33.1, 24.8))
    wb = write_ball_image(b, (40, 50, 50), (1.1, 1.0, 1.5), (-60.0, 20.0, -400.0), np.eye(3), (20.0, 19.6, 30.2))
    out, js = tmp_path / "det.csv", tmp_path / "det.json"
    assert main([str(a), str(b), "--out", str(out), "--json", str(js), "--device", "cpu", "--quiet"]) == 0
    rows = read_csv(out)
    assert list(rows[0])[:8] == [
        "seriesuid",
        "coordX",
        "coordY",
        "coordZ",
        "diameter_mm",
        "probability",
        "malignancy",
        "label",
    ]
    by_uid = {r["seriesuid"]: r for r in rows}
    assert set(by_uid) == {"scan_a", "scan_b"} and len(rows) == 2
    for uid, truth in (("scan_a", wa), ("scan_b", wb)):
        r = by_uid[uid]
        xyz = np.array([float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])])
        assert np.linalg.norm(xyz - truth) <= 1.0, (uid, xyz, truth)
        assert abs(float(r["diameter_mm"]) - 10.0) <= 1.5
        assert 0.5 <= float(r["probability"]) <= 1.0 and r["label"] in ("benign", "malignant")
    doc = json.loads(js.read_text())
    assert doc["format"] == "resmtnet-predictions" and doc["failed"] == []
    assert [s["image"]["seriesuid"] for s in doc["scans"]] == ["scan_a", "scan_b"]
    assert doc["scans"][0]["model"]["name"] == "centroid" and doc["scans"][0]["threshold"] == 0.5
    assert "2 of 2 scan(s) done, 2 nodule(s)" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_inputs_are_skipped_with_one_line_each(tmp_path, centroid_predictor, capsys):
    good = tmp_path / "good.nrrd"
    write_ball_image(good, (30, 50, 50), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3), (25, 25, 15))
    broken = tmp_path / "broken.nrrd"
    broken.write_text("NRRD0004\nthis is not an image\n")
    missing = tmp_path / "missing.mha"
    out = tmp_path / "det.csv"
    out.write_text("old content\n")
    code = main([str(broken), str(good), str(missing), "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2, err
    assert "broken.nrrd" in err[0] and "missing.mha" in err[1]
    assert all("Traceback" not in line for line in err)
    rows = read_csv(out)
    assert [r["seriesuid"] for r in rows] == ["good"]


def test_radiograph_rows_have_no_z_and_spacing_override(tmp_path, centroid_predictor):
    png_like = tmp_path / "film.nrrd"
    arr = np.linspace(0, 1000, 400, dtype=np.float32)[None, :].repeat(300, 0)
    yy, xx = np.mgrid[:300, :400]
    arr[(yy - 120.0) ** 2 + (xx - 250.0) ** 2 <= 20.0**2] = 3000  # 40 px disc
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.35, 0.35))
    sitk.WriteImage(img, str(png_like))
    out = tmp_path / "det.csv"
    assert main([str(png_like), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    (r,) = read_csv(out)
    assert r["coordZ"] == ""
    assert abs(float(r["coordX"]) - 250 * 0.35) <= 1.6 and abs(float(r["coordY"]) - 120 * 0.35) <= 1.6
    assert abs(float(r["diameter_mm"]) - 40 * 0.35) <= 3.0
    # --spacing replaces the radiograph's pixel size: the same disc is twice as far and as big
    assert main([str(png_like), "--out", str(out), "--device", "cpu", "--quiet", "--spacing", "0.7"]) == 0
    (r,) = read_csv(out)
    assert abs(float(r["coordX"]) - 250 * 0.7) <= 1.6 and abs(float(r["diameter_mm"]) - 40 * 0.7) <= 4.0


def test_threshold_option_filters_rows(tmp_path, centroid_predictor):
    f = tmp_path / "s.nrrd"
    write_ball_image(f, (30, 50, 50), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3), (25, 25, 15))
    out = tmp_path / "d.csv"
    assert main([str(f), "--out", str(out), "--threshold", "1.0", "--quiet", "--device", "cpu"]) == 0
    assert read_csv(out) == []
    assert out.read_text(encoding="utf-8").startswith(
        "seriesuid,coordX,coordY,coordZ,diameter_mm,probability,malignancy,label"
    )


def test_min_nodule_option_reaches_the_ct_predictor_and_the_json(tmp_path, centroid_predictor, monkeypatch):
    """``--min-nodule-mm`` sets the CT Predictor's size rule (default 3 mm); the JSON says how
    many candidates it dropped per scan."""
    seen = []
    fake = predict_cli.Predictor

    def spy(modality, **kw):
        seen.append((modality, kw.get("min_nodule_mm")))
        return fake(modality, **kw)

    monkeypatch.setattr(predict_cli, "Predictor", spy)
    f = tmp_path / "s.nrrd"
    write_ball_image(f, (30, 50, 50), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3), (25, 25, 15))
    out, js = tmp_path / "d.csv", tmp_path / "d.json"
    argv = [str(f), "--out", str(out), "--json", str(js), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    assert main(argv + ["--min-nodule-mm", "0"]) == 0
    assert seen == [("CT", 3.0), ("CT", 0.0)]
    assert json.loads(js.read_text(encoding="utf-8"))["scans"][0]["below_min_size"] == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "the following arguments are required"),
        (["x.nrrd"], "--out"),
        (["x.nrrd", "--out", "o.csv", "--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["x.nrrd", "--out", "no/such/folder/o.csv"], "does not exist"),
        (["x.nrrd", "--out", "o.csv", "--spacing", "-1"], "--spacing"),
        (["x.nrrd", "--out", "o.csv", "--min-nodule-mm", "-1"], "--min-nodule-mm must be in [0, 30] mm"),
        (["x.nrrd", "--out", "o.csv", "--device", "quantum"], "unknown device"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    assert main([str(tmp_path / "x.nrrd"), "--out", str(tmp_path / "o.csv"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err


def tiny_weights(path: Path, modality="CT", threshold=0.3) -> Path:
    from napari_resmtnet.model.network import ResMTNet, ResMTNetConfig
    from napari_resmtnet.inference.weights import WEIGHTS_FORMAT, sha256_of

    torch.manual_seed(0)
    cfg = ResMTNetConfig(spatial_dims=3 if modality == "CT" else 2, widths=(4, 8, 8, 8), blocks=(1, 1, 1), head_width=8)
    net = ResMTNet(cfg)
    with torch.no_grad():
        net.heatmap.bias.fill_(0.0)
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "name": "tiny",
            "version": "0",
            "modality": modality,
            "spacing_mm": 1.0,
            "threshold": threshold,
            "network": cfg.to_dict(),
            "state_dict": net.state_dict(),
        },
        path,
    )
    path.with_name(path.name + ".sha256").write_text(sha256_of(path) + "\n")
    return path


@pytest.mark.slow  # a subprocess or a large input: several seconds, not in `make test-fast`
def test_python_m_predict_with_a_weights_file(tmp_path):
    w = tiny_weights(tmp_path / "tiny.pt")
    f = tmp_path / "cube.nrrd"
    write_ball_image(f, (24, 40, 40), (1.0, 1.0, 1.2), (5, 6, 7), np.eye(3), (20, 20, 12))
    film = tmp_path / "film.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.float32)), str(film))
    out = tmp_path / "o.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_resmtnet",
            "predict",
            str(f),
            str(film),
            "--out",
            str(out),
            "--weights",
            str(w),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr  # the radiograph cannot use CT weights
    err = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(err) == 1 and "film.nrrd" in err[0] and "CXR" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    rows = read_csv(out)
    assert rows and {r["seriesuid"] for r in rows} == {"cube"}
    assert all(float(r["probability"]) >= 0.3 for r in rows)  # the weights' operating point


DATA = Path(os.environ.get("RESMTNET_DATA", ROOT.parent / "shared" / "data"))
LUNG1 = DATA / "ct_scans" / "lung1_image.nrrd"
LUNG1_LABEL = DATA / "ct_scans" / "lung1_label.nrrd"


def _bundled_ct():
    from napari_resmtnet.inference.weights import registry

    return registry().get("CT")


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.skipif(not LUNG1.exists(), reason=f"lung1 test scan not found at {LUNG1}")
def test_lung1_nodule_found_with_bundled_weights(tmp_path):
    if _bundled_ct() is None:
        pytest.skip("no bundled CT weights (resources/weights/registry.json has no 'CT')")
    out = tmp_path / "lung1.csv"
    assert main([str(LUNG1), "--out", str(out), "--quiet"]) == 0
    rows = read_csv(out)
    lab = sitk.ReadImage(str(LUNG1_LABEL))
    m = sitk.GetArrayFromImage(lab) > 0
    idx = np.argwhere(m).mean(0)[::-1]  # x, y, z index
    centre = np.array(lab.TransformContinuousIndexToPhysicalPoint(tuple(map(float, idx))))
    radius = (3 * m.sum() * np.prod(lab.GetSpacing()) / (4 * np.pi)) ** (1 / 3)
    xyz = np.array([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for r in rows]).reshape(-1, 3)
    dist = np.linalg.norm(xyz - centre, axis=1)
    hit = dist <= max(radius, 5.0)
    print(
        f"lung1: {len(rows)} detections, nearest {dist.min() if len(dist) else float('nan'):.1f} mm "
        f"(radius {radius:.1f} mm)"
    )
    assert hit.any(), f"nodule at {centre} (r {radius:.1f} mm) not found; nearest {dist.min() if len(dist) else None}"
    best = int(np.argmax([float(r["probability"]) for r in rows]))
    assert hit[best], "the most probable detection is not the labelled nodule"
    assert rows[best]["label"] in ("benign", "malignant")
    n_other = int((~hit).sum())
    assert n_other <= 2, f"{n_other} other detections above the default threshold (at most 2)"


def test_bad_weights_are_one_line_whatever_the_number_of_inputs(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not weights at all")
    (tmp_path / "w.pt.sha256").write_text("0" * 64)
    inputs = [str(tmp_path / f"scan{i}.nrrd") for i in range(3)]
    rc = main([*inputs, "--out", str(tmp_path / "o.csv"), "--weights", str(bad), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sha256 mismatch" in err[0]
    assert not (tmp_path / "o.csv").exists()


# --- output safety, Ctrl-C, escaped names --------------------------------------------------------


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda d: Path("/dev/null"), "device"),
        (lambda d: (os.mkfifo(d / "o.csv"), d / "o.csv")[1], "FIFO"),
        (lambda d: (os.symlink("/dev/full", d / "o.csv"), d / "o.csv")[1], "link to a device"),
    ],
)
def test_out_that_is_not_a_regular_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch, make, kind):

    monkeypatch.setattr(predict_cli, "load_scan", lambda p: pytest.fail("no scan may be read"))
    out = make(tmp_path)
    rc = main([str(tmp_path / "x.mha"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and kind in err[0], err
    if str(out) == "/dev/null":
        import stat

        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, centroid_predictor):

    calls = []

    def interrupt(p):
        calls.append(p)
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_cli, "load_scan", interrupt)
    out = tmp_path / "o.csv"
    out.write_text("an older result\n")
    rc = main(
        [
            str(tmp_path / "a.mha"),
            str(tmp_path / "b.mha"),
            "--out",
            str(out),
            "--json",
            str(tmp_path / "o.json"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and calls == [str(tmp_path / "a.mha")]
    assert err == ["resmtnet predict: interrupted after 0 of 2 scan(s); nothing written"]
    assert out.read_text() == "an older result\n"
    assert sorted(os.listdir(tmp_path)) == ["o.csv"]


def test_file_names_with_control_characters_are_printed_escaped(tmp_path, capsys):
    bad = tmp_path / "a\nb\x1b[2Jc.mha"
    bad.write_text("not an image\n")
    rc = main([str(bad), "--out", str(tmp_path / "o.csv"), "--quiet"])
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "\x1b" not in cap.err + cap.out and "a\\nb\\x1b[2Jc.mha" in err[0]
