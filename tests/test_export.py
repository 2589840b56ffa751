"""A deployable model: jobs.export round-trips (ONNX / TorchScript program and safetensors weights score a
clip as model.pt does), and jobs.predict applies the threshold model.pt stores (0.5, said so, without one).

No Ray: a tiny random CLMAN checkpoint (32 px, T = 4), written as the finetune loop writes one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clman import cli
from clman import config as C
from clman import export as E
from clman.evaluate import inference
from clman.checkpoint import load_checkpoint, save_checkpoint
from clman.models.build import classifier_from
from jobs import export, predict
from tests.media import frames, pyav_mp4

TINY = ["model.width=0.125", "model.gn_groups=4", "data.size=32", "data.num_frames=4", "evaluate.clips=2"]
# what the finetune loop stores for a validated epoch (clman.evaluate.inference.choose_threshold's record)
RECORD = {
    "value": 0.4321,
    "chosen_on": "validation",
    "target_sensitivity": 0.95,
    "videos": 6,
    "malignant": 3,
    "sensitivity": 1.0,
    "specificity": 0.667,
}


def _checkpoint(path, threshold: dict | None, seed: int = 0) -> str:
    cfg = C.load("finetune", None, TINY)
    torch.manual_seed(seed)
    extra = {"preprocessing": inference.preprocessing(cfg)} | ({"threshold": threshold} if threshold else {})
    save_checkpoint(
        str(path), classifier_from(cfg.model), kind="classifier", config=C.to_dict(cfg), step=1, extra=extra
    )
    return str(path)


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> str:
    return _checkpoint(tmp_path_factory.mktemp("deploy") / "model.pt", RECORD)


def _clip(size=32, t=4, seed=1) -> torch.Tensor:
    """One preprocessed clip batch (2, T, 3, size, size), from uint8 frames as decoding stores them."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (2, t, 1, 37, 37), generator=g, dtype=torch.uint8)
    return inference.resize_clips(u8, size)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_scores_a_clip_as_the_checkpoint(model_pt, tmp_path, fmt, capsys):
    out = tmp_path / "deploy"
    assert export.main(["--model", model_pt, "--out", str(out), "--format", fmt]) == 0
    assert "threshold 0.4321: chosen on the 6 validation videos" in capsys.readouterr().out
    deploy = json.loads((out / "deploy.json").read_text())
    assert deploy["threshold"] == RECORD and deploy["program"]["format"] == fmt
    prep = deploy["preprocessing"]
    assert (prep["size"], prep["num_frames"], prep["clips"], prep["frames"]) == (32, 4, 2, "clips")
    assert deploy["program"]["max_abs_diff_vs_checkpoint"] <= E.TOLERANCE

    model, _ = inference.load_classifier(model_pt)
    clip = _clip()
    with torch.no_grad():
        want = torch.softmax(model(clip, None), dim=1)[:, 1].numpy()  # (2,)
    program = (out / E.FILES[fmt]).read_bytes()
    got = E.run_program(program, fmt, clip)
    assert got.shape == (2,) and np.allclose(got, want, atol=1e-5), (got, want)
    if fmt == "onnx":  # run by onnxruntime alone, as a server without clman would
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        assert np.allclose(session.run(None, {"clips": clip.numpy()})[0], want, atol=1e-5)

    # the safetensors weights rebuild the model exactly: the same outputs, bit for bit
    fresh = E.load_safetensors((out / E.WEIGHTS).read_bytes())
    with torch.no_grad():
        assert torch.equal(fresh(clip, None), model(clip, None))
    state = load_checkpoint(model_pt)["model"]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_export_check_catches_a_program_that_scores_otherwise(model_pt):
    """The pre-write check fails when the program is not the model (another seed's weights)."""
    model, _ = inference.load_classifier(model_pt)
    other, _ = inference.load_classifier(_checkpoint(model_pt.replace("model.pt", "other.pt"), None, seed=5))
    module, wrong = inference.ClipProbability(model).eval(), inference.ClipProbability(other).eval()
    program = E.program_bytes(wrong, _clip(), "torchscript", dynamic_frames=False)
    with pytest.raises(E.JobError, match=r"^export: the torchscript program scores clips .* away from the "):
        E.check_program(program, "torchscript", module, [(2, 4, 3, 32, 32)])


@pytest.mark.parametrize(
    "args,line",
    [
        (["--format", "tflite"], "error: --format: 'tflite' is not one of onnx, torchscript"),
        ([], "error: checkpoint not found: {missing}"),
    ],
)
def test_export_bad_input_is_one_line_exit_2(tmp_path, capsys, args, line):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(export.main, ["--model", missing, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == line.format(missing=missing)
    assert not (tmp_path / "out").exists()


def test_safetensors_without_config_is_refused(tmp_path):
    from safetensors.torch import save

    with pytest.raises(E.ckpt.CheckpointError, match=r"^w.safetensors: no clman config in its metadata"):
        E.load_safetensors(save({"x": torch.zeros(1)}), where="w.safetensors")


# ---------------------------------------------------------------- predict: the stored threshold


def _predict(model: str, video, tmp_path, capsys, *extra) -> tuple[str, dict]:
    out = tmp_path / "pred.json"
    capsys.readouterr()
    assert predict.main(["--checkpoint", model, str(video), "--json", str(out), *extra]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_predict_uses_the_stored_threshold(model_pt, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    video.write_bytes(pyav_mp4(frames(10)))
    printed, written = _predict(model_pt, video, tmp_path, capsys)
    assert printed.splitlines()[0] == inference.describe_threshold(RECORD)
    assert "not on the test split" in printed.splitlines()[0]
    pred = written["predictions"][0]
    assert written["threshold"]["value"] == pred["threshold"] == RECORD["value"]
    assert pred["label"] == ("malignant" if pred["probability_malignant"] >= RECORD["value"] else "benign")
    # scored as validation scored it: the stored K = 2 clips of T = 4 (8 distinct frames of 10)
    assert pred["frames_scored"] == 8

    # a threshold on either side of the score flips the label: --threshold overrides the stored one
    p = pred["probability_malignant"]
    for threshold, label in ((max(p - 0.01, 0.0), "malignant"), (min(p + 0.01, 1.0), "benign")):
        printed, written = _predict(model_pt, video, tmp_path, capsys, "--threshold", str(threshold))
        assert printed.splitlines()[0] == f"threshold {threshold:g}: from --threshold"
        assert written["predictions"][0]["label"] == label and written["predictions"][0]["threshold"] == threshold


def test_predict_falls_back_to_half_for_an_old_model(tmp_path, capsys):
    """A model.pt written before thresholds were stored (no extra): 0.5, and one line says so."""
    cfg = C.load("finetune", None, TINY)
    old = tmp_path / "old.pt"
    save_checkpoint(str(old), classifier_from(cfg.model), kind="classifier", config=C.to_dict(cfg), step=0)
    video = tmp_path / "clip.mp4"
    video.write_bytes(pyav_mp4(frames(10)))
    printed, written = _predict(str(old), video, tmp_path, capsys)
    assert printed.splitlines()[0].startswith("threshold 0.5: the default; this model.pt stores no threshold")
    assert written["predictions"][0]["threshold"] == 0.5
    # its preprocessing is derived from its config
    assert inference.stored_preprocessing(load_checkpoint(str(old))) == inference.preprocessing(cfg)
