"""Calibration (Brier, ECE, reliability bins) with patient-bootstrap CIs, the ROC's bootstrap band and operating
point, the threshold chosen on validation, and evaluate's outputs written from scores (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clman.evaluate import calibration as K
from clman import config as C
from clman.evaluate import inference, report
from clman.metrics import bootstrap_indices, compute_metrics, specificity_at_sensitivity
from clman.models.build import classifier_from


def _scores(n=80, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return s, y, np.repeat([f"p{i:02d}" for i in range(n // 2)], 2)  # two videos per patient


def test_brier_and_ece_known_values():
    y = np.array([0, 1, 0, 1])
    assert K.brier_score(np.full(4, 0.5), y) == 0.25
    assert K.calibration_error(np.full(4, 0.5), y) == pytest.approx(0.0)  # 0.5 said, half malignant
    assert K.brier_score(np.full(4, 0.9), np.zeros(4, int)) == pytest.approx(0.81)
    assert K.calibration_error(np.full(4, 0.9), np.zeros(4, int)) == pytest.approx(0.9)
    # two bins: 0.2 said of 1 in 2 (gap 0.3), 0.8 said of 2 in 2 (gap 0.2): (2 * 0.3 + 2 * 0.2) / 4
    s, y = np.array([0.2, 0.2, 0.8, 0.8]), np.array([0, 1, 1, 1])
    assert K.calibration_error(s, y) == pytest.approx(0.25)
    bins = K.reliability_bins(s, y)
    assert bins["count"][2] == 2 and bins["count"][8] == 2 and sum(bins["count"]) == 4
    assert bins["mean_score"][2] == pytest.approx(0.2) and bins["fraction_malignant"][8] == 1.0
    assert bins["mean_score"][0] is None  # an empty bin


def test_ece_of_the_bootstrap_equals_torchmetrics_on_every_resample():
    """The numpy ECE of the resamples (fast) is torchmetrics' ECE, scores of exactly 0 and 1 included."""
    s, y, patients = _scores()
    s[:3], s[3] = 1.0, 0.0
    which, gap = K._ece_parts(s, y.astype(float), K.N_BINS)
    for idx in bootstrap_indices(len(y), 20, seed=3, groups=patients):
        mine = np.abs(np.bincount(which[idx], weights=gap[idx], minlength=K.N_BINS + 1)).sum() / len(idx)
        assert mine == pytest.approx(K.calibration_error(s[idx], y[idx]), abs=1e-6)


def test_calibration_cis_resample_patients_and_repeat_by_seed():
    s, y, patients = _scores()
    a = K.calibration(s, y, n_boot=200, seed=1, groups=patients)
    assert a == K.calibration(s, y, n_boot=200, seed=1, groups=patients)
    for key in ("brier", "ece"):
        lo, hi = a["ci95"][key]
        assert lo < a[key] < hi, key
    assert K.calibration(s, y, n_boot=200, seed=1)["ci95"] != a["ci95"]  # videos, not patients
    assert K.calibration(s, y, n_boot=0)["ci95"] == {} and a["ece_bins"] == 10


def test_roc_band_brackets_the_curve_and_repeats():
    s, y, patients = _scores(120)
    grid, lo, hi = report.roc_band(s, y, n_boot=300, seed=0, groups=patients)
    fpr, tpr = report.roc_points(s, y)
    at = tpr[np.searchsorted(fpr, grid, side="right") - 1]  # the drawn step ROC on the grid
    assert np.all(lo <= hi) and np.all((lo >= 0) & (hi <= 1)) and hi[-1] == 1.0
    assert np.mean((lo <= at) & (at <= hi)) > 0.95  # pointwise 95% band around the full-sample curve
    assert np.mean(hi - lo) > 0.05  # not a line
    assert np.array_equal(report.roc_band(s, y, n_boot=300, seed=0, groups=patients)[1], lo)
    perfect = report.roc_band(np.r_[np.zeros(10), np.ones(10)], np.r_[np.zeros(10), np.ones(10)], n_boot=50)
    assert np.all(perfect[1] == 1.0)


def test_choose_threshold_reaches_the_target_on_validation():
    s, y, _ = _scores(60, seed=4)
    record = inference.choose_threshold(s, y, 0.9)
    spec, thr = specificity_at_sensitivity(s, y, sensitivity=0.9)
    assert record["value"] == thr and record["specificity"] == spec and record["chosen_on"] == "validation"
    assert record["sensitivity"] >= 0.9 and record["sensitivity"] == compute_metrics(s, y, threshold=thr)["sensitivity"]
    assert (record["videos"], record["malignant"]) == (60, int(y.sum()))
    assert inference.choose_threshold(s, np.zeros(60, int), 0.9) is None  # one class: no threshold


def test_finetune_validate_returns_the_threshold_of_its_scores():
    """finetune.validate's ``threshold`` is choose_threshold of the very scores it validated on."""
    from clman.train import finetune

    cfg = C.load("finetune", None, ["model.width=0.125", "model.gn_groups=4", "data.size=32", "data.num_frames=4"])
    torch.manual_seed(0)
    model = classifier_from(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (6, 4, 1, 37, 37), generator=g, dtype=torch.uint8)  # (B, K * T), K = 1
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    batches = [{"frames": frames[:3], "label": labels[:3]}, {"frames": frames[3:], "label": labels[3:]}]
    out = finetune.validate(model, batches, torch.device("cpu"), 32, target_sensitivity=0.95)
    with torch.no_grad():
        scores = torch.softmax(model(inference.resize_clips(frames, 32), None), dim=1)[:, 1].numpy()
    want = inference.choose_threshold(scores, labels.numpy(), 0.95)
    assert out["threshold"]["value"] == pytest.approx(want["value"], abs=1e-6)
    assert out["threshold"]["specificity"] == want["specificity"]
    assert "threshold" not in finetune.validate(model, batches, torch.device("cpu"), 32)


def test_write_evaluation_reports_calibration_and_the_validation_operating_point(tmp_path):
    s, y, patients = _scores(60, seed=2)
    scored = {
        "video_id": [f"v{i}" for i in range(60)],
        "patient_id": list(patients),
        "label": y.tolist(),
        "score": s.tolist(),
        "top_frames": [[0, 1]] * 60,
    }
    record = {
        "value": 0.41,
        "chosen_on": "validation",
        "target_sensitivity": 0.95,
        "videos": 20,
        "malignant": 9,
        "sensitivity": 1.0,
        "specificity": 0.55,
    }
    cfg = C.load("evaluate", None, ["evaluate.bootstrap=100"])
    out = str(tmp_path / "eval")
    result = report.write_evaluation(
        out, "CLMAN", scored, cfg, record, notes=[f"Deployed threshold: {inference.describe_threshold(record)}."]
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    at = compute_metrics(s, y, threshold=0.41)
    op = metrics["operating_point"]
    assert op["threshold"] == 0.41 and op["validation"] == record
    assert op["sensitivity"] == pytest.approx(at["sensitivity"]) and op["specificity"] == pytest.approx(
        at["specificity"]
    )
    cal = metrics["calibration"]
    assert cal["brier"] == pytest.approx(K.brier_score(s, y)) and cal["ece"] == pytest.approx(K.calibration_error(s, y))
    assert cal["ci95"]["brier"][0] < cal["brier"] < cal["ci95"]["brier"][1]
    assert metrics["metrics"] == result["metrics"] and metrics["threshold"] == 0.5  # the table stays at 0.5
    for png in ("roc.png", "reliability.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "deployed operating point: threshold 0.41, chosen on the 20 validation videos (9 malignant)" in md
    assert "not on this split" in md and "not on the test split" in md
    assert "Brier score" in md and "ECE" in md and "over 10 equal-width bins" in md
    assert "![roc](roc.png)" in md and "![reliability](reliability.png)" in md
    assert "descriptive, not a threshold to deploy" in md

    # no stored threshold: no operating point from validation; the ROC marks evaluate.threshold's
    result = report.write_evaluation(str(tmp_path / "old"), "CLMAN", scored, cfg)
    assert (
        result["operating_point"] is None
        and "deployed operating point" not in (tmp_path / "old" / "report.md").read_text()
    )
