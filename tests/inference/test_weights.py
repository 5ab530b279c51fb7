"""Safe weights: sha256 first, weights_only loading, format and config checks."""

import pytest
import torch

from napari_resmtnet.model import ResMTNet
from napari_resmtnet.training.train import TrainConfig, export_weights
from napari_resmtnet.inference.weights import WeightsError, load_checkpoint, load_model, registry, sha256_of


@pytest.fixture
def weights_file(tmp_path):
    cfg = TrainConfig(network={"widths": [8, 8, 16, 16], "blocks": [1, 1, 1], "head_width": 8})
    model = ResMTNet(cfg.network_config())
    p = export_weights(model, cfg, {"train": ["a"], "val": ["b"]}, tmp_path / "w.pt")
    (tmp_path / "w.pt.sha256").write_text(sha256_of(p) + "  w.pt\n")
    return p


def test_good_file_loads_and_predicts(weights_file):
    model, info = load_model("CT", weights=weights_file)
    assert info["sha256"] == sha256_of(weights_file) and info["modality"] == "CT"
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 24, 24, 24))
    assert len(out) == 1


def test_one_corrupted_byte_is_refused(weights_file):
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_model("CT", weights=weights_file)


def test_truncated_file_is_refused_even_with_matching_hash(weights_file):
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a safe weights file"):
        load_checkpoint(weights_file, sha256_of(weights_file))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"format": "resmtnet-weights/1", "payload": _Evil()}, p)
    with pytest.raises(WeightsError, match="not a safe weights file"):
        load_checkpoint(p, sha256_of(p))
    assert "must never run" not in capsys.readouterr().out


def test_unverified_user_file_and_wrong_modality_and_foreign_format(tmp_path, weights_file):
    other = tmp_path / "copy.pt"
    other.write_bytes(weights_file.read_bytes())
    with pytest.raises(WeightsError, match="refusing unverified"):
        load_model("CT", weights=other)
    with pytest.raises(WeightsError, match="not CXR"):
        load_model("CXR", weights=weights_file)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_checkpoint(plain, sha256_of(plain))


def test_network_mismatch_is_a_message(tmp_path, weights_file):
    ck = torch.load(weights_file, weights_only=True)
    ck["network"]["widths"] = [16, 16, 32, 32]
    p = tmp_path / "mismatch.pt"
    torch.save(ck, p)
    with pytest.raises(WeightsError, match="does not match"):
        load_model("CT", weights=p, sha256=sha256_of(p))


@pytest.mark.parametrize("modality", ["CT", "CXR"])
def test_bundled_weights_match_their_recorded_sha256(modality):
    reg = registry()
    if modality not in reg:
        pytest.skip(f"no bundled {modality} weights in this checkout")
    model, info = load_model(modality)
    assert info["sha256"] == reg[modality]["sha256"]
    assert 0 < info["threshold"] < 1


def test_empty_sha256_sidecar_is_a_message(weights_file):
    (weights_file.parent / "w.pt.sha256").write_text("")
    with pytest.raises(WeightsError, match="empty"):
        load_checkpoint(weights_file)


def _rewritten(weights_file, change):
    obj = torch.load(weights_file, map_location="cpu", weights_only=True)
    change(obj)
    p = weights_file.with_name("changed.pt")
    torch.save(obj, p)
    p.with_name(p.name + ".sha256").write_text(sha256_of(p) + "\n")
    return p


def test_sha256_sidecar_that_is_a_fifo_does_not_block(tmp_path, weights_file):
    import os

    other = tmp_path / "fifo.pt"
    other.write_bytes(weights_file.read_bytes())
    os.mkfifo(tmp_path / "fifo.pt.sha256")
    with pytest.raises(WeightsError, match=r"fifo\.pt\.sha256: is a FIFO"):
        load_checkpoint(other)
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(WeightsError, match=r"pipe\.pt: is a FIFO, not a regular weights file"):
        load_checkpoint(tmp_path / "pipe.pt", "0" * 64)


def test_non_finite_weights_are_refused(weights_file):
    def poison(obj):
        name = next(k for k, v in obj["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
        obj["state_dict"][name] = obj["state_dict"][name].clone()
        obj["state_dict"][name].view(-1)[0] = float("nan")

    p = _rewritten(weights_file, poison)
    with pytest.raises(WeightsError, match="holds NaN or infinite values"):
        load_checkpoint(p)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda net: net.update(widths=[8, 8, 16, 10**6]), r"widths must be whole numbers from 1 to 2048"),
        (lambda net: net.update(blocks=[1, 1, 10**9]), r"blocks must be whole numbers"),
        (lambda net: net.update(widths=[8, 8, 16, 32]), r"config and the tensors disagree"),
    ],
)
def test_absurd_or_mismatched_network_config_refused_before_building(weights_file, monkeypatch, change, message):
    import napari_resmtnet.model as model_pkg

    p = _rewritten(weights_file, lambda obj: change(obj["network"]))
    built = []
    real = model_pkg.ResMTNet

    def spy(cfg):
        built.append(str(torch.get_default_device()) if hasattr(torch, "get_default_device") else "?")
        return real(cfg)

    monkeypatch.setattr(model_pkg, "ResMTNet", spy)
    with pytest.raises(WeightsError, match=message):
        load_model("CT", weights=p)
    assert all(d == "meta" for d in built), built  # never allocated for real
