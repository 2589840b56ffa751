"""Checkpoint format: weights_only round trip, refusals, strict loading, atomic writes."""

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from clman.checkpoint import (
    FORMAT,
    CheckpointError,
    encoder_state_dict,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)


class TinySimCLR(nn.Module):
    """Stands in for SimCLRModel: the same `.encoder` / `.projector` attribute names."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3), nn.GroupNorm(2, width))
        self.projector = nn.Linear(width, 2)


def test_round_trip_loads_with_weights_only(tmp_path):
    model = TinySimCLR()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.projector(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "runs" / "last.pt"  # parent folders are created
    config = {"lr": 0.1, "stages": (3, 4), "name": "demo", "nested": {"t": 0.5, "ok": True, "none": None}}
    save_checkpoint(path, model, kind="simclr", config=config, step=7, epoch=2, optimizer=opt, extra={"loss": 1.5})

    raw = torch.load(path, weights_only=True)  # the contract: plain tensors and Python values only
    assert raw["format"] == FORMAT
    ckpt = load_checkpoint(path)
    assert (ckpt["kind"], ckpt["step"], ckpt["epoch"], ckpt["config"], ckpt["extra"]) == (
        "simclr",
        7,
        2,
        config,
        {"loss": 1.5},
    )
    assert ckpt["optimizer"]["state"]  # momentum buffers came along

    fresh = TinySimCLR()
    load_model_state(fresh, ckpt)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    assert [f.name for f in tmp_path.joinpath("runs").iterdir()] == ["last.pt"]  # no temp file left


def test_wrappers_are_unwrapped(tmp_path):
    model = TinySimCLR()
    wrapped = torch.compile(nn.DataParallel(model))  # DDP needs a process group; DataParallel has the same `.module`
    save_checkpoint(tmp_path / "c.pt", wrapped, kind="simclr", config={}, step=0)
    keys = list(load_checkpoint(tmp_path / "c.pt")["model"])
    assert keys == list(model.state_dict())
    load_model_state(wrapped, load_checkpoint(tmp_path / "c.pt"))


def test_encoder_state_dict_strips_prefix(tmp_path):
    simclr = TinySimCLR()
    save_checkpoint(tmp_path / "s.pt", simclr, kind="simclr", config={}, step=1)
    enc = encoder_state_dict(load_checkpoint(tmp_path / "s.pt"))
    assert list(enc) == list(simclr.encoder.state_dict())
    target = TinySimCLR().encoder
    load_model_state(target, enc, what="encoder checkpoint")
    assert torch.equal(target[0].weight, simclr.encoder[0].weight)
    save_checkpoint(tmp_path / "e.pt", simclr.encoder, kind="encoder", config={}, step=1)
    assert list(encoder_state_dict(load_checkpoint(tmp_path / "e.pt"))) == list(enc)


def test_mismatched_architecture_is_one_line(tmp_path):
    save_checkpoint(tmp_path / "s.pt", TinySimCLR(width=4), kind="simclr", config={}, step=1)
    enc = encoder_state_dict(load_checkpoint(tmp_path / "s.pt"))
    with pytest.raises(CheckpointError) as err:
        load_model_state(TinySimCLR(width=8).encoder, enc, what=f"encoder checkpoint {tmp_path / 's.pt'}")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"encoder checkpoint {tmp_path / 's.pt'} does not match this architecture: ")
    assert "0.weight (4, 3, 3, 3) vs (8, 3, 3, 3)" in msg
    with pytest.raises(CheckpointError, match="missing keys 2.weight; unexpected keys 1.weight, 1.bias"):
        load_model_state(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Linear(1, 1, bias=False)), enc)


def _make_marker(path):
    open(path, "w").close()


class Malicious:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (self.marker,))


def test_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "kind": "simclr", "model": {}, "payload": Malicious(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt is not a clman checkpoint .*weights_only") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content, match",
    [
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), "format None"),
        (lambda p: p.write_bytes(b"definitely not a zip file"), "not a clman checkpoint"),
        (lambda p: p.write_bytes(pickle.dumps({"a": 1})), "not a clman checkpoint"),
        (lambda p: torch.save({"format": FORMAT, "kind": "simclr"}, p), "damaged .* missing model"),
    ],
)
def test_foreign_files_are_refused(tmp_path, content, match):
    path = tmp_path / "x.pt"
    content(path)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value) and "weights_only=False" not in str(err.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'nope.pt'}"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, TinySimCLR(), kind="simclr", config={}, step=1)
    before = path.read_bytes()
    for bad in ({"lr": np.float64(0.1)}, {"opt": {"betas": [0.9, np.float32(0.99)]}}):
        with pytest.raises(CheckpointError, match=r"config\.(lr|opt\.betas\[1\]) is a numpy"):
            save_checkpoint(path, TinySimCLR(), kind="simclr", config=bad, step=2)

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, TinySimCLR(), kind="simclr", config={}, step=3)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(CheckpointError, match="kind must be one of"):
        save_checkpoint(path, TinySimCLR(), kind="resnet", config={}, step=1)


def test_s3_round_trip(bucket):
    uri = f"{bucket}/runs/pretrain/last.pt"
    model = TinySimCLR()
    save_checkpoint(uri, model, kind="simclr", config={"lr": 9e-3}, step=5)
    ckpt = load_checkpoint(uri)
    assert ckpt["step"] == 5 and ckpt["config"] == {"lr": 9e-3}
    assert torch.equal(encoder_state_dict(ckpt)["0.weight"], model.encoder[0].weight)
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {bucket}/runs/none.pt"):
        load_checkpoint(f"{bucket}/runs/none.pt")
