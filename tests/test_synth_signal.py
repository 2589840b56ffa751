"""The synthetic sweeps carry the signal the method is about (tracker requirement).

A small model trained briefly on single frames of 200 cases is clearly above
chance, and worse than the same model pooling all frames of the sweep on the
malignant cases whose signs show in few frames ("focal", see clman.data.synth).

Both variants are one `VideoClassifier` (tiny GN ResNet-18 encoder, mma
aggregator, linear head) from the same initial weights, trained for the same
optimiser steps on the same 128 frames per step: the single-frame variant on
random frames as clips of one frame (mma over one frame is the identity), the
pooled one on 16 half-sweeps (8 random frames in order). At test time the
single-frame variant reads one frame per case, the middle one — the widest
section, a sonographer's key frame — and the pooled one reads the whole sweep.

Measured (AUC single-frame all / single focal / pooled focal, data seed d, training seed t):
  d0 t0  0.740 / 0.702 / 0.772     d1 t1  0.777 / 0.655 / 0.838
  d0 t10 0.803 / 0.690 / 0.908     d2 t2  0.756 / 0.630 / 0.820
  d0 t11 0.722 / 0.595 / 0.775     d3 t3  0.857 / 0.753 / 0.863
About 45 s on 2 idle cores (8 s of it rendering the 400 sweeps).

The same seeds do not give the same numbers on every CPU: d0 t0 gave 0.740 / 0.702 / 0.772 where the
table above was measured and 0.742 / 0.695 / 0.735 on the 2-core CI machine of 2026-12-06 (torch
2.14.1 both; the CPU's kernels round differently over 200 steps). The pooled-over-single margin
asked for is therefore 0.03, under the smallest gap measured anywhere (0.040).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clman.data.synth import SynthConfig, generate_case, plan_cases
from clman.metrics import compute_metrics
from clman.models import LinearHead, VideoClassifier, build_aggregator, build_encoder
from clman.optim import warmup_cosine

SEED = 0
CFG = SynthConfig(size=64, frames=16)
TRAIN_CASES = 200
# Held-out: more cases, and half of the malignant ones focal (default 30 %), so the
# focal-vs-benign AUC rests on ~55 focal cases rather than ~34. Training keeps the default mix.
HELD_OUT_CASES = 200
HELD_OUT_CFG = dataclasses.replace(CFG, focal_fraction=0.5)
STEPS = 200
LR = 2e-3
CLIPS_PER_STEP = 8  # 8 x 16 = 128 frames a step: single frames, or 16 half-sweeps for pooling


def _data(n: int, seed: int, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, T, H, W) uint8 frames, (N,) labels, (N,) focal flags."""
    cases = [generate_case(seed, p.index, p.label, cfg) for p in plan_cases(n, seed, cfg)]
    frames = np.stack([c.frames for c in cases])
    labels = np.array([c.params.label for c in cases])
    focal = np.array([c.params.focal for c in cases])
    return frames, labels, focal


def _to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W) -> float (..., 1, H, W), roughly zero mean and unit spread."""
    return (torch.from_numpy(frames).float().unsqueeze(-3) - 100.0) / 60.0


def _model(seed: int) -> VideoClassifier:
    torch.manual_seed(seed)  # same initial weights for both variants
    encoder = build_encoder(norm="group", nonlocal_stages=(), width=0.125, in_channels=1)
    return VideoClassifier(encoder, build_aggregator("mma", encoder.out_dim), LinearHead(encoder.out_dim, 2))


def _train(model: VideoClassifier, frames: np.ndarray, labels: np.ndarray, pooled: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, t = frames.shape[:2]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    model.train()
    for step in range(STEPS):
        for group in opt.param_groups:  # cosine to 0: the last weights are not one noisy step
            group["lr"] = warmup_cosine(step, STEPS, LR, warmup_steps=10)
        if pooled:
            # Half of each sweep's frames (kept in order), twice the clips: the same 128 frames a
            # step but 16 labels, not 8. Whole 8-clip batches trained unstably (one training
            # seed of three ended at pooled AUC 0.73). Scoring pools all T frames.
            idx = rng.integers(0, n, 2 * CLIPS_PER_STEP)
            keep = np.sort(rng.random((len(idx), t)).argsort(axis=1)[:, : t // 2], axis=1)
            x = _to_input(frames[idx[:, None], keep])  # (16, T/2, 1, H, W)
        else:
            idx = rng.integers(0, n, CLIPS_PER_STEP * t)
            x = _to_input(frames[idx, rng.integers(0, t, len(idx))])[:, None]  # (128, 1, 1, H, W)
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5).view(-1, 1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)  # lateral flips: a mirrored sweep is as plausible
        loss = F.cross_entropy(model(x), torch.from_numpy(labels[idx]))
        assert torch.isfinite(loss), f"non-finite loss at step {step} ({'pooled' if pooled else 'single-frame'})"
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _scores(model: VideoClassifier, frames: np.ndarray, pooled: bool) -> np.ndarray:
    """P(malignant) per case: from the whole sweep (pooled) or from its middle frame."""
    t = frames.shape[1]
    out = []
    for i in range(0, len(frames), 25):
        x = _to_input(frames[i : i + 25])  # (B, T, 1, H, W)
        if not pooled:
            x = x[:, t // 2 : t // 2 + 1]  # (B, 1, 1, H, W)
        out.append(torch.softmax(model(x), dim=1)[:, 1])
    return torch.cat(out).numpy()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic sums, and fair to the other tests sharing the CPU
    yield
    torch.set_num_threads(threads)


def test_single_frame_beats_chance_and_pooling_beats_it_on_focal_cases(one_thread):
    t0 = time.perf_counter()
    x_train, y_train, _ = _data(TRAIN_CASES, 1000 + SEED, CFG)
    x_test, y_test, focal = _data(HELD_OUT_CASES, 2000 + SEED, HELD_OUT_CFG)
    t_data = time.perf_counter() - t0
    focal_subset = focal | (y_test == 0)  # focal malignant + all benign
    assert focal.sum() >= 40 and (y_test == 0).sum() >= 60, "too few held-out cases for a stable focal AUC"

    auc = {}
    for pooled in (False, True):
        name = "pooled" if pooled else "single"
        model = _model(SEED)
        _train(model, x_train, y_train, pooled, SEED)
        s = _scores(model, x_test, pooled)
        auc[name] = compute_metrics(s, y_test)["auc"]
        auc[name + "_focal"] = compute_metrics(s[focal_subset], y_test[focal_subset])["auc"]
        auc[name + "_plain"] = compute_metrics(s[~focal], y_test[~focal])["auc"]
    print(
        f"\nsynth signal (seed {SEED}, {focal.sum()} focal / {(y_test == 1).sum()} malignant / "
        f"{(y_test == 0).sum()} benign held-out): AUC all / focal+benign / non-focal+benign\n"
        f"  single frame  {auc['single']:.3f} / {auc['single_focal']:.3f} / {auc['single_plain']:.3f}\n"
        f"  pooled (mma)  {auc['pooled']:.3f} / {auc['pooled_focal']:.3f} / {auc['pooled_plain']:.3f}\n"
        f"  data {t_data:.1f} s, total {time.perf_counter() - t0:.1f} s"
    )
    # Six seed pairs (docstring) gave single-frame AUC >= 0.72 and pooled - single >= 0.04 on focal cases.
    assert auc["single"] > 0.65, f"single-frame AUC {auc['single']:.3f}: the frames should carry the class"
    assert auc["pooled_focal"] > auc["single_focal"] + 0.03, (
        f"focal cases: pooled AUC {auc['pooled_focal']:.3f} vs single-frame {auc['single_focal']:.3f}; "
        "pooling the sweep should find signs that one frame misses"
    )
