"""Synthetic sweeps: determinism, sweep structure, class statistics, and writing to disk / S3."""

from __future__ import annotations

import io

import av
import numpy as np
import pandas as pd
import pytest

from clman import storage
from clman.data.synth import SynthConfig, generate_case, plan_cases, sample_case, write_dataset

TINY = SynthConfig(size=64, frames=16)


def _best_threshold_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Best accuracy of one feature with one threshold, either direction."""
    best = 0.0
    for thr in np.unique(x):
        for sign in (1, -1):
            best = max(best, float(np.mean((sign * x >= sign * thr) == (y == 1))))
    return best


def test_deterministic_and_shapes():
    a = generate_case(3, 5, 1, TINY)
    b = generate_case(3, 5, 1, TINY)
    assert a.frames.shape == (16, 64, 64) and a.frames.dtype == np.uint8
    assert a.visible.shape == (16,) and a.visible.dtype == bool and a.signs.shape == (16,)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert not np.array_equal(a.frames, generate_case(3, 6, 1, TINY).frames)
    assert not np.array_equal(a.frames, generate_case(4, 5, 1, TINY).frames)


def test_sweep_enters_and_leaves_the_lesion():
    for index in range(4):
        case = generate_case(0, index, index % 2, TINY)
        assert not case.visible[0] and not case.visible[-1], "the sweep starts and ends outside the lesion"
        assert case.visible.sum() >= 3
        # Lesion frames are darker where the lesion sits than lesion-free frames there.
        assert case.frames[case.visible].mean() < case.frames[~case.visible].mean() + 5


def test_speckle_decorrelates_partly_between_frames():
    case = generate_case(0, 1, 0, SynthConfig(size=64, frames=16, jitter_px=0.0))
    f = case.frames.astype(np.float64)
    r = np.corrcoef(f[2].ravel(), f[3].ravel())[0, 1]
    assert 0.3 < r < 0.97, f"frame-to-frame correlation {r:.2f}: speckle should be neither frozen nor fresh"


def test_focal_malignant_signs_in_few_frames():
    cfg = SynthConfig(size=64, frames=32, focal_fraction=1.0)
    case = generate_case(0, 0, 1, cfg)
    assert case.params.focal
    assert 0 < case.signs.sum() <= 0.4 * case.visible.sum()
    plain = generate_case(0, 0, 1, SynthConfig(size=64, frames=32, focal_fraction=0.0))
    assert np.array_equal(plain.signs, plain.visible)
    assert not generate_case(0, 0, 0, cfg).signs.any()


def test_class_shapes_and_overlap():
    cfg = SynthConfig(size=64, frames=8)
    plans = plan_cases(48, 0, cfg)
    stats = pd.DataFrame([generate_case(0, p.index, p.label, cfg).stats for p in plans])
    benign, malignant = stats[stats.label == 0], stats[stats.label == 1]
    # Benign wider-than-tall, malignant taller-than-wide, on average.
    assert benign.aspect_ratio.mean() < 1.0 < malignant.aspect_ratio.mean()
    labels = stats.label.to_numpy()
    for name in ("aspect_ratio", "posterior"):
        acc = _best_threshold_accuracy(stats[name].to_numpy(), labels)
        assert acc < 1.0, f"{name} alone separates the classes"

    # Per-case features come from overlapping class distributions: informative, never decisive alone.
    draws = [sample_case(i % 2, np.random.default_rng([1, i]), SynthConfig()) for i in range(400)]
    y = np.array([p.label for p in draws])
    for name in ("aspect", "posterior", "edge_px", "heterogeneity", "level"):
        acc = _best_threshold_accuracy(np.array([getattr(p, name) for p in draws]), y)
        assert 0.6 < acc < 0.95, f"{name}: single-threshold accuracy {acc:.2f}"


def test_plan_balance_and_patients():
    plans = plan_cases(268, 0, SynthConfig())
    assert sum(p.label for p in plans) == 152
    assert plans[0].video == "case_0001.mp4" and plans[-1].video == "case_0268.mp4"
    patients = [p.patient_id for p in plans]
    assert patients[0] == "P0001" and all(len(pid) == 5 and pid.startswith("P") for pid in patients)
    assert 200 < len(set(patients)) < 268, "some patients have more than one case"
    assert plan_cases(268, 0, SynthConfig()) == plans


def test_config_validation():
    with pytest.raises(ValueError, match="SynthConfig.size=63"):
        SynthConfig(size=63)
    with pytest.raises(ValueError, match="SynthConfig.focal_fraction"):
        SynthConfig(focal_fraction=1.5)


def _check_dataset(base: str, n: int, cfg: SynthConfig) -> pd.DataFrame:
    labels = pd.read_csv(io.StringIO(storage.read_text(storage.join(base, "labels.csv"))), dtype={"label": int})
    assert list(labels.columns) == ["video", "label", "patient_id"]
    assert len(labels) == n and labels.label.isin([0, 1]).all()
    videos = storage.list_uris(base, suffix=".mp4")
    assert [v.rsplit("/", 1)[-1] for v in videos] == sorted(labels.video)
    with av.open(io.BytesIO(storage.read_bytes(videos[0]))) as container:
        frames = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    assert len(frames) == cfg.frames and frames[0].shape == (cfg.size, cfg.size)
    return labels


def test_write_dataset_local(tmp_path):
    out = str(tmp_path / "synth")
    rows = write_dataset(out, 8, seed=1, cfg=TINY, workers=1, progress=False)
    labels = _check_dataset(out, 8, TINY)
    assert labels.label.tolist() == [r["label"] for r in rows]
    stats = pd.read_csv(tmp_path / "synth" / "synth_cases.csv")
    assert {"focal", "aspect_ratio", "visible_frames", "sign_frames"} <= set(stats.columns)
    # The mp4 holds the generated frames (lossy, but close).
    case = generate_case(1, 0, rows[0]["label"], TINY)
    with av.open(str(tmp_path / "synth" / "case_0001.mp4")) as container:
        decoded = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    assert np.abs(decoded.astype(int) - case.frames).mean() < 8


def test_write_dataset_s3_with_workers(bucket, tmp_path):
    out = storage.join(bucket, "synth")
    write_dataset(out, 8, seed=1, cfg=TINY, workers=2, progress=False)
    _check_dataset(out, 8, TINY)
    local = str(tmp_path / "local")
    write_dataset(local, 8, seed=1, cfg=TINY, workers=1, progress=False)
    for name in ("labels.csv", "synth_cases.csv"):
        assert storage.read_text(storage.join(out, name)) == storage.read_text(storage.join(local, name))
