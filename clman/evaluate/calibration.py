"""How well P(malignant) means what it says: Brier score, expected calibration error, reliability bins.

A score is P(malignant) in [0, 1], malignant (label 1) the positive class, as in ``clman.metrics``.

- Brier score: the mean of (score - label)^2; 0 is perfect, 0.25 is a constant 0.5.
- ECE: ``N_BINS`` equal-width bins of the score over [0, 1]; the sum over bins of
  |mean score - share malignant| weighted by the bin's share of the cases (torchmetrics
  ``binary_calibration_error``, norm l1: for binary input it compares the P(positive) with
  the label, the reliability diagram's two axes).
- Both with percentile-bootstrap 95 % CIs over the resamples of ``clman.metrics.bootstrap_indices``
  (patients when given, a patient's videos together, as the six metrics' CIs). Unlike AUC, both are
  defined on a resample holding one class, so none is skipped.
"""

from __future__ import annotations

import numpy as np

from clman.metrics import _check_inputs, bootstrap_indices

N_BINS = 10  # equal-width bins of the score: 0.0-0.1, ..., 0.9-1.0 (the usual reliability diagram)


def brier_score(scores, labels) -> float:
    s, y = _check_inputs(scores, labels)
    return float(((s.double() - y.double()) ** 2).mean())


def calibration_error(scores, labels, n_bins: int = N_BINS) -> float:
    """Expected calibration error (l1) over ``n_bins`` equal-width bins (torchmetrics)."""
    from torchmetrics.functional.classification import binary_calibration_error

    s, y = _check_inputs(scores, labels)
    return float(binary_calibration_error(s.float(), y, n_bins=n_bins, norm="l1", validate_args=False))


def reliability_bins(scores, labels, n_bins: int = N_BINS) -> dict[str, list]:
    """Per equal-width bin: its edges, case count, mean score and share malignant (None when empty).

    A score on an inner edge falls in the bin above it, as in torchmetrics; a score of exactly 1.0 in
    the last bin (torchmetrics' ECE gives it a bin of its own).
    """
    s, y = _check_inputs(scores, labels)
    s, y = s.double().numpy(), y.numpy()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)  # (N,) bin of each case
    count = np.bincount(which, minlength=n_bins)
    score_sum = np.bincount(which, weights=s, minlength=n_bins)
    pos = np.bincount(which, weights=y, minlength=n_bins)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.tolist(),
        "mean_score": [float(a / c) if c else None for a, c in zip(score_sum, count)],
        "fraction_malignant": [float(p / c) if c else None for p, c in zip(pos, count)],
    }


def _ece_parts(s: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin of each case, score - label): ECE = sum over bins |sum of score - label| / N. Bins as torchmetrics
    draws them (``bucketize(right=True) - 1``: a score of exactly 1.0 gets a bin of its own)."""
    which = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1), s, side="right") - 1
    return which, s - y


def calibration(
    scores, labels, *, n_bins: int = N_BINS, n_boot: int = 1000, seed: int = 0, groups=None, alpha: float = 0.05
) -> dict:
    """{"brier", "ece", "ece_bins", "ci95": {"brier": [lo, hi], "ece": [lo, hi]}, "reliability": bins}.

    CIs: ``n_boot`` resamples from ``default_rng(seed)`` (0: none), of ``groups`` (patients) when given.
    The resamples are computed in numpy from each case's bin (equal to torchmetrics' ECE, which gives
    the point estimate; tests/test_calibration.py checks it): 1000 torchmetrics calls took ~15 s.
    """
    s, y = _check_inputs(scores, labels)
    s, y = s.double().cpu().numpy(), y.cpu().numpy().astype(np.float64)
    out = {
        "brier": brier_score(s, y),
        "ece": calibration_error(s, y, n_bins),
        "ece_bins": n_bins,
        "reliability": reliability_bins(s, y, n_bins),
        "ci95": {},
    }
    if n_boot:
        which, gap = _ece_parts(s, y, n_bins)
        values = {"brier": [], "ece": []}
        for idx in bootstrap_indices(len(y), n_boot, seed, groups):
            values["brier"].append(float(np.mean(gap[idx] ** 2)))
            values["ece"].append(
                float(np.abs(np.bincount(which[idx], weights=gap[idx], minlength=n_bins + 1)).sum() / len(idx))
            )
        q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
        out["ci95"] = {k: [float(v) for v in np.percentile(np.asarray(vals), q)] for k, vals in values.items()}
    return out
