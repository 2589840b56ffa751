"""The paper's six metrics (Section 4.2), operating points, bootstrap CIs (by video or by patient),
paired tests of two AUCs (a patient-level paired bootstrap; DeLong, which takes cases as independent),
t-intervals of means over runs and the corrected resampled t of cross-validation.

Malignant (label 1) is the positive class; a score is P(malignant) in [0, 1]
and a case is called malignant when score >= threshold (the same rule as the
ROC, so a threshold from `specificity_at_sensitivity` can be fed back to
`BinaryMetrics`). AUC and AP are exact (torchmetrics with thresholds=None,
equal to scikit-learn's roc_auc_score / average_precision_score, ties included).

Undefined values are NaN with an `UndefinedMetricWarning`, never a silent 0:
with no positive cases AUC, AP and sensitivity are undefined; with no negative
cases AUC, AP and specificity are (AP would be a trivial 1.0); F1 is undefined
when there are neither positive cases nor positive calls.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# torchmetrics is imported where it is used: importing it pulls in torchvision, torch._dynamo and
# scipy.signal (~2.3 s of CPU), and every Ray process that unpickles a reference to a module
# importing this one (Train's controller and helper actors, Tune trials, report writers) paid it.

log = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "ap", "sensitivity", "specificity", "f1", "auc")


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this set of cases (one class only) and reported as NaN."""


def _writable(x) -> np.ndarray:
    """An array torch can share: pandas (copy-on-write) hands out read-only views, which torch warns about."""
    a = np.asarray(x)
    return a if a.flags.writeable else a.copy()


def _check_inputs(scores, labels, allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float scores in [0, 1] and (N,) int64 labels in {0, 1}, or ValueError naming the problem."""
    s = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(_writable(scores))
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(_writable(labels))
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {tuple(s.shape)} and {tuple(y.shape)}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.shape[0] == 0 and not allow_empty:
        raise ValueError("no cases: scores and labels are empty")
    if s.dtype == torch.bool or s.is_complex():
        raise ValueError(f"scores must be real numbers in [0, 1], got dtype {s.dtype}")
    if not s.is_floating_point():
        s = s.to(torch.float64)
    bad = ~torch.isfinite(s)
    if bad.any():
        raise ValueError(
            f"scores must be finite: {int(bad.sum())} non-finite value(s), first at index {int(bad.nonzero()[0])}"
        )
    bad = (s < 0) | (s > 1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"scores must lie in [0, 1] (probabilities of malignancy): index {i} is {float(s[i])}")
    bad = (y != 0) & (y != 1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"labels must be 0 (benign) or 1 (malignant): index {i} is {y[i].item()}")
    return s, y.long()


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return float(threshold)


def _finalize(tp: int, fp: int, tn: int, fn: int, ranking, warn: bool = True) -> dict[str, float]:
    """The six metrics from the confusion counts and a callable giving (auc, ap).

    `ranking` is only called when both classes are present; undefined values are NaN.
    """
    n_pos, n_neg, n = tp + fn, tn + fp, tp + fp + tn + fn
    nan = float("nan")
    auc, ap = ranking() if n_pos and n_neg else (nan, nan)
    values = {
        "accuracy": (tp + tn) / n,
        "ap": float(ap),
        "sensitivity": tp / n_pos if n_pos else nan,
        "specificity": tn / n_neg if n_neg else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else nan,
        "auc": float(auc),
    }
    if warn:
        _warn_undefined(values, n, stacklevel=5)  # the caller of compute_metrics
    return values


def _warn_undefined(values: dict[str, float], n: int, stacklevel: int = 3) -> None:
    """One UndefinedMetricWarning naming the NaN metrics and why."""
    undefined = [name for name in METRIC_NAMES if np.isnan(values[name])]
    if not undefined:
        return
    reasons = []
    if np.isnan(values["sensitivity"]):
        reasons.append("no positive (malignant) cases")
    if np.isnan(values["specificity"]):
        reasons.append("no negative (benign) cases")
    if np.isnan(values["f1"]):
        reasons.append("no positive calls")
    warnings.warn(
        f"{', '.join(undefined)} undefined for these {n} cases ({'; '.join(reasons)}): reported as NaN",
        UndefinedMetricWarning,
        stacklevel=stacklevel,
    )


class BinaryMetrics:
    """Streaming accumulator of the six metrics, synced across workers.

    Backed by torchmetrics states (confusion counts; all scores and labels for
    exact AUC / AP). When torch.distributed is initialised, `compute()` gathers
    the states of every worker (every worker must call it) and returns the
    metrics of the union; without a process group it is local. Move it to the
    device of the scores with `.to(device)` (needed for NCCL).
    """

    def __init__(self, threshold: float = 0.5, sync_on_compute: bool = True):
        from torchmetrics import MetricCollection
        from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryStatScores

        self.threshold = _check_threshold(threshold)
        self._counts = BinaryStatScores(sync_on_compute=sync_on_compute, validate_args=False)
        self._ranking = MetricCollection(
            {
                "auc": BinaryAUROC(thresholds=None, sync_on_compute=sync_on_compute, validate_args=False),
                "ap": BinaryAveragePrecision(thresholds=None, sync_on_compute=sync_on_compute, validate_args=False),
            }
        )

    def to(self, device: torch.device | str) -> BinaryMetrics:
        self._counts.to(device)
        self._ranking.to(device)
        return self

    def update(self, scores, labels) -> None:
        """scores (N,) float P(malignant) in [0, 1]; labels (N,) in {0, 1}."""
        s, y = _check_inputs(scores, labels, allow_empty=True)
        if s.shape[0] == 0:
            return
        device = self._counts.device
        calls = (s >= self.threshold).long().to(device)  # before the cast, so a score equal to the threshold counts
        y = y.to(device)
        self._counts.update(calls, y)
        # Scores kept as float32 so every worker's list states share one dtype for the gather.
        self._ranking.update(s.to(device=device, dtype=torch.float32), y)

    def compute(self) -> dict[str, float]:
        """The six metrics over every case added (on every worker when distributed)."""
        with warnings.catch_warnings():
            # A worker that got no cases (e.g. a tiny test set) is normal here.
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
            self._seed_empty_states()
            tp, fp, tn, fn, _ = (int(v) for v in self._counts.compute().tolist())
            if tp + fp + tn + fn == 0:
                raise ValueError("BinaryMetrics.compute: no cases were added (on any worker)")

            def ranking():
                out = self._ranking.compute()
                return float(out["auc"]), float(out["ap"])

            values = _finalize(tp, fp, tn, fn, ranking, warn=False)
        _warn_undefined(values, tp + fp + tn + fn)
        return values

    def _seed_empty_states(self) -> None:
        """Give a worker without cases typed empty score/label states.

        torchmetrics would stand in float32 for both, and gloo/NCCL then gather
        the float labels against the int64 labels of the other workers.
        """
        for metric in self._ranking.values(copy_state=False):
            if len(metric.preds) == 0:
                metric.preds.append(torch.empty(0, dtype=torch.float32, device=metric.device))
                metric.target.append(torch.empty(0, dtype=torch.long, device=metric.device))

    def reset(self) -> None:
        self._counts.reset()
        self._ranking.reset()


def _compute(s: torch.Tensor, y: torch.Tensor, threshold: float, warn: bool = True) -> dict[str, float]:
    """Metrics of checked tensors, in this process only (no sync)."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_stat_scores

    tp, fp, tn, fn, _ = (int(v) for v in binary_stat_scores((s >= threshold).long(), y, validate_args=False).tolist())

    def ranking():
        auc = binary_auroc(s, y, thresholds=None, validate_args=False)
        ap = binary_average_precision(s, y, thresholds=None, validate_args=False)
        return float(auc), float(ap)

    return _finalize(tp, fp, tn, fn, ranking, warn=warn)


def compute_metrics(scores, labels, threshold: float = 0.5) -> dict[str, float]:
    """The six metrics of one set of cases (numpy arrays, lists or tensors), in this process only."""
    s, y = _check_inputs(scores, labels)
    return _compute(s.cpu(), y.cpu(), _check_threshold(threshold))


def specificity_at_sensitivity(scores, labels, sensitivity: float = 0.95) -> tuple[float, float]:
    """(specificity, threshold) of the highest-threshold ROC point with sensitivity >= `sensitivity`.

    Exact: the ROC is taken at every distinct score. Calling score >= threshold
    malignant gives at least the asked sensitivity and the best specificity
    that allows. (NaN, NaN) with an UndefinedMetricWarning for a single-class set.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    s, y = _check_inputs(scores, labels)
    s, y = s.cpu().double().numpy(), y.cpu().numpy()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        missing = "positive (malignant)" if n_pos == 0 else "negative (benign)"
        warnings.warn(
            f"specificity at sensitivity {sensitivity} undefined: no {missing} cases among {len(y)}; reported as NaN",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last case of each group of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    i = int(np.argmax(tps / n_pos >= sensitivity))  # tpr is non-decreasing and ends at 1
    return float(1.0 - fps[i] / n_neg), float(s[last[i]])


def bootstrap_indices(n: int, n_boot: int, seed: int = 0, groups=None):
    """Yield ``n_boot`` resamples of case indices, drawn with replacement from ``default_rng(seed)``.

    Without ``groups``: n cases drawn from the n. With ``groups`` ((n,) ids, e.g. patient ids):
    G groups drawn from the G distinct ids and every case of a drawn group taken, once per
    draw, so a patient's videos always travel together (a resample then holds about n cases,
    not exactly n). Indices of one group are consecutive within a resample, in case order.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, size=n)
        return
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one id per case: shape {groups.shape}, expected ({n},)")
    _, inverse = np.unique(groups, return_inverse=True)  # ids sorted: the draw does not depend on case order
    order = np.argsort(inverse, kind="stable")  # cases grouped, in case order within a group
    counts = np.bincount(inverse)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    for _ in range(n_boot):
        drawn = rng.integers(0, len(counts), size=len(counts))
        # Positions of every drawn group's cases in `order`, concatenated without a Python loop.
        sizes = counts[drawn]
        first = np.repeat(starts[drawn] - np.r_[0, np.cumsum(sizes)[:-1]], sizes)
        yield order[first + np.arange(sizes.sum())]


def bootstrap_ci(
    scores,
    labels,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
    *,
    groups=None,
    return_skipped: bool = False,
):
    """Percentile-bootstrap (1 - alpha) CIs of the six metrics: {name: (lo, hi)}.

    Cases are resampled with replacement (numpy Generator seeded with `seed`, so
    the result is reproducible). With ``groups`` (one patient id per case) whole
    patients are resampled, a patient's videos together (:func:`bootstrap_indices`):
    videos of one patient are correlated, and resampling them one by one makes
    the CI too narrow. A resample holding one class only is skipped
    and counted: the count is logged, warned about, and returned as
    `(cis, n_skipped)` when `return_skipped=True`. If every resample is
    skipped the CIs are (NaN, NaN).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    threshold = _check_threshold(threshold)
    s, y = _check_inputs(scores, labels)
    s, y = s.cpu(), y.cpu()
    n = s.shape[0]
    values: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    skipped = 0
    for idx in bootstrap_indices(n, n_boot, seed, groups):
        idx = torch.from_numpy(idx)
        yb = y[idx]
        n_pos = int(yb.sum())
        if n_pos == 0 or n_pos == len(idx):
            skipped += 1
            continue
        for name, v in _compute(s[idx], yb, threshold, warn=False).items():
            values[name].append(v)
    if skipped:
        msg = f"bootstrap: skipped {skipped} of {n_boot} resamples holding one class only"
        log.info(msg)
        warnings.warn(msg, UndefinedMetricWarning, stacklevel=2)
    lo_q, hi_q = 100 * alpha / 2, 100 * (1 - alpha / 2)
    cis: dict[str, tuple[float, float]] = {}
    for name in METRIC_NAMES:
        if values[name]:
            lo, hi = np.percentile(np.asarray(values[name]), [lo_q, hi_q])
            cis[name] = (float(lo), float(hi))
        else:
            cis[name] = (float("nan"), float("nan"))
    return (cis, skipped) if return_skipped else cis


# ---------------------------------------------------------------- paired AUC tests, means over runs


def delong_covariance(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(aucs (K,), covariance (K, K)) of K correlated AUCs on the same cases (DeLong et al. 1988).

    scores (K, N) or (N,), labels (N,). The fast algorithm of Sun & Xu (2014, IEEE SPL 21:1389):
    the placement values come from three midrankings per classifier, O(K N log N), not from
    the O(N^2) comparison of every positive with every negative; ties count one half.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    y = np.asarray(labels)
    if s.shape[1] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[1]} vs {y.shape[0]}")
    for row in s:
        _check_inputs(row, y)
    pos, neg = s[:, y == 1], s[:, y == 0]  # (K, m), (K, n)
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong: needs at least 2 malignant and 2 benign cases, got {m} and {n}")
    from scipy.stats import rankdata

    tx = rankdata(pos, axis=1)  # midranks within the positives
    ty = rankdata(neg, axis=1)  # within the negatives
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # within all cases
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # (K, m) structural components of the positives: share of negatives below
    v01 = 1.0 - (tz[:, m:] - ty) / m  # (K, n) of the negatives: share of positives above
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n
    return aucs, cov


def delong_test(scores_a, scores_b, labels) -> float:
    """Two-sided p-value of the paired DeLong test of AUC(a) = AUC(b) on the same cases.

    z = (AUC_a - AUC_b) / sqrt(var_a + var_b - 2 cov_ab) against the standard normal. Two
    classifiers whose difference has no variance (e.g. the same scores) give p = 1 when
    their AUCs are equal, 0 otherwise. Needs at least two cases of each class.
    """
    from scipy.special import ndtr

    aucs, cov = delong_covariance(
        np.stack([np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)]), labels
    )
    diff = aucs[0] - aucs[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if not var > 1e-15:  # equal rankings, or every case on the same side
        return 1.0 if abs(diff) < 1e-12 else 0.0
    z = diff / np.sqrt(var)
    return float(2 * ndtr(-abs(z)))


def mean_ci(values, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` and its (1 - alpha) Student-t interval.

    mean +- t(1 - alpha/2, n - 1) * sd / sqrt(n), sd with n - 1: right for independent values, such as
    the seeds of one fixed split. Not for (fold, seed) runs of cross-validation, whose values share
    test folds and training data: there, the seeds of a fold are averaged and the fold means go to
    :func:`corrected_t_ci`. One value gives (value, NaN, NaN); none gives NaNs. Not clipped.
    """
    from scipy.stats import t

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size and not np.isfinite(v).all():
        raise ValueError(f"mean_ci: values must be finite, got {v.tolist()}")
    nan = float("nan")
    if v.size == 0:
        return nan, nan, nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, nan, nan
    half = float(t.ppf(1 - alpha / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def corrected_t_ci(
    fold_means, test_train_ratio: float | None = None, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean, lo, hi) over K cross-validation folds: the corrected resampled t of Nadeau & Bengio (2003).

    m +- t(1 - alpha/2, K - 1) * sqrt((1/K + n_test/n_train) * s^2), with m and s^2 (ddof 1) the
    mean and sample variance of the K fold means m_k. The folds' training sets overlap, so their
    estimates are positively correlated and s^2 / K underestimates the variance of m; Nadeau and
    Bengio stand in n_test/n_train for that correlation term (exact when the correlation is
    n_test / (n_test + n_train), i.e. 1/K for K-fold). ``test_train_ratio`` None: 1/(K - 1), the
    ratio of a K-fold split. Fewer than 2 fold means give (mean, NaN, NaN); none gives NaNs.
    Nadeau & Bengio, "Inference for the generalization error", Machine Learning 52:239 (2003).
    """
    from scipy.stats import t

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = np.asarray(fold_means, dtype=np.float64).ravel()
    if v.size and not np.isfinite(v).all():
        raise ValueError(f"corrected_t_ci: fold means must be finite, got {v.tolist()}")
    if test_train_ratio is not None and not (np.isfinite(test_train_ratio) and test_train_ratio >= 0):
        raise ValueError(f"test_train_ratio must be finite and >= 0, got {test_train_ratio}")
    nan = float("nan")
    if v.size == 0:
        return nan, nan, nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, nan, nan
    k = v.size
    ratio = 1.0 / (k - 1) if test_train_ratio is None else float(test_train_ratio)
    half = float(t.ppf(1 - alpha / 2, k - 1) * np.sqrt((1.0 / k + ratio) * v.var(ddof=1)))
    return mean, mean - half, mean + half


def _auc_midrank(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(K,) AUCs of the K score rows of ``s`` (K, N) on labels ``y`` (N,): Mann-Whitney, ties count one half."""
    from scipy.stats import rankdata

    pos = y == 1
    m = int(pos.sum())
    n = y.size - m
    ranks = rankdata(s, axis=1)  # (K, N) midranks over all cases
    return (ranks[:, pos].sum(axis=1) - m * (m + 1) / 2) / (m * n)


@dataclass(frozen=True)
class PairedAUCBootstrap:
    """The paired bootstrap of AUC(a) - AUC(b) (:func:`paired_bootstrap_auc`)."""

    diff: float  # AUC(a) - AUC(b) on all the cases
    lo: float  # (1 - alpha) percentile CI of the difference
    hi: float
    p: float  # two-sided: 2 min(P*(d <= 0), P*(d >= 0)), each (1 + count) / (resamples + 1), at most 1
    resamples: int  # resamples with both classes (the others are skipped)
    skipped: int


def paired_bootstrap_auc(
    scores_a, scores_b, labels, *, groups=None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> PairedAUCBootstrap:
    """Paired percentile bootstrap of AUC(a) - AUC(b) on the same cases, resampling ``groups`` (patients).

    Each resample draws the patients with replacement (:func:`bootstrap_indices`, the draws of
    ``default_rng(seed)``: deterministic), a patient's cases together, and computes both AUCs on
    the same cases, so the correlation of a and b and of a patient's videos is kept. A resample
    holding one class only is skipped and counted. The p-value inverts the percentile interval:
    p = 2 min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1)), capped at 1, with B the
    resamples used (the choice over a bootstrap shifted to the null: it agrees with the percentile
    CI). The +1 keeps it above 0 (its floor is 2 / (B + 1)); p < alpha goes with 0 outside the
    (1 - alpha) percentile CI, up to that correction and the percentile's interpolation. Without
    ``groups`` the cases themselves are resampled. Needs both classes among the cases.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a, y = _check_inputs(scores_a, labels)
    b, _ = _check_inputs(scores_b, labels)
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b differ in length: {a.shape[0]} vs {b.shape[0]}")
    s = np.stack([a.cpu().double().numpy(), b.cpu().double().numpy()])  # (2, N)
    y = y.cpu().numpy()
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"paired bootstrap: needs both classes, got {n_pos} malignant of {y.size} cases")
    aucs = _auc_midrank(s, y)
    diffs, skipped = [], 0
    for idx in bootstrap_indices(y.size, n_boot, seed, groups):
        yb = y[idx]
        m = int(yb.sum())
        if m == 0 or m == yb.size:
            skipped += 1
            continue
        ab = _auc_midrank(s[:, idx], yb)
        diffs.append(ab[0] - ab[1])
    if skipped:
        msg = f"paired bootstrap: skipped {skipped} of {n_boot} resamples holding one class only"
        log.info(msg)
        warnings.warn(msg, UndefinedMetricWarning, stacklevel=2)
    d = np.asarray(diffs)
    nan = float("nan")
    if d.size == 0:
        return PairedAUCBootstrap(float(aucs[0] - aucs[1]), nan, nan, nan, 0, skipped)
    lo, hi = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    below, above = (1 + int((d <= 0).sum())) / (d.size + 1), (1 + int((d >= 0).sum())) / (d.size + 1)
    return PairedAUCBootstrap(
        float(aucs[0] - aucs[1]), float(lo), float(hi), float(min(1.0, 2 * min(below, above))), int(d.size), skipped
    )
