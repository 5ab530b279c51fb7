"""Training CLI on real cubes, the LUNA16 layout, the split, resuming and DDP on 2 CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_resmtnet.training.datasets import (
    CubeRecord,
    load_ct_records,
    rating_to_label,
    rating_to_score,
    split_by_series,
)
from napari_resmtnet.training.train import TrainConfig, main as train_main
from napari_resmtnet.inference.weights import load_checkpoint, sha256_of

from conftest import REPO, data_path

TINY = [
    "network.widths=[8,8,16,16]",
    "network.blocks=[1,1,1]",
    "network.head_width=8",
    "batch_size=2",
    "augment.out_size=24",
    "warmup_steps=1",
]


def test_split_is_patient_disjoint_and_deterministic():
    uids = [f"1.2.{i}" for i in range(50)] * 2
    tr, va = split_by_series(uids, 0.2, seed=0)
    assert not set(tr) & set(va) and len(va) == 10 and len(tr) == 40
    assert split_by_series(list(reversed(uids)), 0.2, seed=0) == (tr, va)
    assert split_by_series(uids, 0.2, seed=1) != (tr, va)


def test_rating_labels():
    assert [rating_to_label(r) for r in (1, 2, 3, 4, 5, "", None)] == [0, 0, -1, 1, 1, -1, -1]


def test_rating_targets_are_soft_and_keep_the_binary_order():
    assert [rating_to_score(r) for r in (1, 2, 3, 4, 5, "", None, 0, 7, float("nan"))] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        -1.0,
        -1.0,
        -1.0,
        -1.0,
        -1.0,
    ]
    rec = CubeRecord(
        name="c",
        seriesuid="s",
        array=np.zeros((50, 50, 50), np.int16),
        centers=np.array([[25.0, 25, 25], [10, 10, 10], [40, 40, 40]]),
        diameters=np.array([8.0, 5, 12]),
        malignant=np.array([1, -1, 0]),
        ratings=np.array([4.0, 3.0, np.nan]),
    )
    assert rec.target()["malignant"].tolist() == [1, -1, 0]
    soft = rec.target("rating")["malignant"]
    assert soft.tolist() == [0.75, 0.5, -1.0]  # unknown rating: masked, even where a binary label exists
    # the binary label and the soft score agree on which side of 0.5 a labelled nodule lies
    for r in (1, 2, 4, 5):
        assert (rating_to_score(r) > 0.5) == bool(rating_to_label(r))
    with pytest.raises(ValueError, match="malignancy target"):
        rec.target("ordinal")


def test_malignancy_target_config_is_checked(tmp_path):
    cfg = json.loads((REPO / "configs" / "ct.json").read_text())
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**cfg, "malignancy_target": "soft"}))
    with pytest.raises(ValueError, match="malignancy_target"):
        TrainConfig.from_file(p)
    p.write_text(json.dumps({**json.loads((REPO / "configs" / "cxr.json").read_text()), "malignancy_target": "rating"}))
    with pytest.raises(ValueError, match="CT only"):
        TrainConfig.from_file(p)


@pytest.mark.data
def test_a_few_steps_on_four_real_cubes(tmp_path):
    cubes = data_path("ct_nodule_cubes")
    out = tmp_path / "run"
    rc = train_main(
        [
            "--config",
            str(REPO / "configs" / "ct.json"),
            "--data",
            str(cubes),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "limit=4",
            "max_steps=3",
            "val_fraction=0.25",
            *TINY,
        ]
    )
    assert rc == 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r[k]) for r in log for k in ("heatmap", "size", "offset", "malignancy", "loss"))
    ck = load_checkpoint(out / "model.pt", sha256_of(out / "model.pt"))
    assert ck["split"]["val"] and not set(ck["split"]["val"]) & set(ck["split"]["train"])
    # resume continues from the checkpoint instead of starting again
    rc = train_main(
        [
            "--config",
            str(REPO / "configs" / "ct.json"),
            "--data",
            str(cubes),
            "--out",
            str(out),
            "--no-progress",
            "--resume",
            "--set",
            "limit=4",
            "max_steps=5",
            "val_fraction=0.25",
            *TINY,
        ]
    )
    assert rc == 0
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def _write_luna(root: Path):
    """A tiny LUNA16 layout: one scan with a bright nodule + annotations + malignancy CSV."""
    (root / "subset0").mkdir(parents=True)
    uid = "1.3.6.1.4.1.99.1"
    arr = np.full((40, 64, 64), -850, np.int16)
    zz, yy, xx = np.mgrid[:40, :64, :64]
    arr[((zz - 20) * 2.0) ** 2 + ((yy - 30) * 0.8) ** 2 + ((xx - 33) * 0.8) ** 2 <= 25] = 60
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.0))
    img.SetOrigin((-10.0, 5.0, -100.0))
    sitk.WriteImage(img, str(root / "subset0" / f"{uid}.mhd"))
    world = (-10 + 33 * 0.8, 5 + 30 * 0.8, -100 + 20 * 2.0)
    (root / "annotations.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},{world[0]},{world[1]},{world[2]},10.0\n"
    )
    (root / "malignancy.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,malignancy_rating\n{uid},{world[0]},{world[1]},{world[2] + 1},5\n"
    )
    return uid


def test_luna16_layout_is_read_through_the_same_path(tmp_path):
    uid = _write_luna(tmp_path)
    recs = load_ct_records(tmp_path, malignancy_csv=tmp_path / "malignancy.csv")
    assert len(recs) == 1
    r = recs[0]
    assert r.seriesuid == uid and r.array.shape == (50, 50, 50) and r.label == 1
    assert np.allclose(r.centers[0], [25, 25, 25])
    assert r.array[25, 25, 25] > 0 and r.array[25, 25, 5] < -500  # nodule at the centre, lung around


@pytest.mark.slow
def test_distributed_training_two_cpu_processes(tmp_path):
    root = tmp_path / "luna"
    _write_luna(root)
    cfg = json.loads((REPO / "configs" / "ct.json").read_text())
    cfg.update(
        data=str(root),
        out=str(tmp_path / "ddp"),
        max_steps=2,
        val_fraction=0.0,
        threads=1,
        batch_size=2,
        warmup_steps=1,
    )
    cfg["network"].update(widths=[8, 8, 16, 16], blocks=[1, 1, 1], head_width=8)
    cfg["augment"]["out_size"] = 24
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    env = dict(os.environ, MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            env["MASTER_PORT"],
            "-m",
            "napari_resmtnet.training.train",
            "--config",
            str(tmp_path / "c.json"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ddp" / "model.pt").exists()
    steps = [json.loads(l)["step"] for l in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_bad_config_gives_one_line(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"modality": "CT", "nonsense": 1}))
    assert train_main(["--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "nonsense" in err and "\n" not in err


def test_config_names_its_base_instead_of_copying_it(tmp_path):
    from napari_resmtnet.training.train import TrainConfig

    (tmp_path / "a.json").write_text(
        json.dumps({"name": "a", "epochs": 80, "lr": 0.002, "augment": {"aniso_prob": 0.3, "noise_std": 0.03}})
    )
    (tmp_path / "b.json").write_text(json.dumps({"base": "a.json", "epochs": 15, "augment": {"aniso_prob": 0.6}}))
    cfg = TrainConfig.from_file(tmp_path / "b.json", ["lr=0.0005"])
    assert cfg.name == "a" and cfg.epochs == 15 and cfg.lr == 0.0005
    assert cfg.augment == {"aniso_prob": 0.6, "noise_std": 0.03}
    (tmp_path / "c.json").write_text(json.dumps({"base": "b.json", "typo_key": 1}))
    with pytest.raises(ValueError, match="typo_key"):
        TrainConfig.from_file(tmp_path / "c.json")


def test_shipped_fine_tune_configs_resolve():
    from napari_resmtnet.training.train import TrainConfig

    for name in ("ct_finetune_thick.json", "ct_wholescan.json", "ct_fpr.json"):
        cfg = TrainConfig.from_file(REPO / "configs" / name)
        assert cfg.init and cfg.network["widths"] == [16, 32, 64, 96]
    fpr = TrainConfig.from_file(REPO / "configs" / "ct_fpr.json")
    assert fpr.network_config().fpr and fpr.network_config().size_per_axis and fpr.fpr["steps"] > 0
