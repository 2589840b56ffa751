"""From the trials' results to each row's numbers: means over runs, pooled out-of-fold metrics, paired tests.

Two plain tables come in (pandas DataFrames or Arrow tables):
- results: one line per trial — ``row``, ``fold``, ``seed`` and the six metrics on its test
  videos (:func:`trial_metrics` makes them), optionally the ``op_*`` operating point at the
  threshold chosen on its validation videos, ``n_train`` / ``n_test`` (the videos of its
  training folds, train + validation carve, and of its test fold) and any other numbers (kept
  in study.parquet);
- predictions: one line per test video per trial — ``row``, ``fold``, ``seed``, ``video_id``,
  ``patient_id``, ``label``, ``score`` (P(malignant)). Out of fold: a video is tested once per
  (row, seed).

Per row (:func:`summarize`):
- ``cells``: each metric's mean over the runs, seeds averaged within each fold first (the seeds
  of a fold share its test videos: they are not independent runs), then the mean of the K fold
  means, with a 95 % interval whose kind is ``interval``:
  ``cv_corrected_t`` (K > 1 folds): the corrected resampled t of Nadeau & Bengio (2003),
  m ± t(K−1, 0.975) · sqrt((1/K + n_test/n_train) · s²) over the fold means, n_test/n_train from
  the results' ``n_test`` / ``n_train`` when every trial of the row has them, else 1/(K−1)
  (``ratio_source`` says which);
  ``seeds_t_one_split`` (one fold: the fixed holdout split): the t-interval over the seeds, the
  seed-to-seed variation of training only, not the sampling variability of the one test set
  (that is the pooled patient-bootstrap CI);
  ``none``: one run.
- ``pooled``: the metrics of the pooled out-of-fold predictions, one score per video (its mean
  over seeds, so a video counts once however many seeds ran), with a 95 % percentile CI from a
  bootstrap that resamples patients, a patient's videos together;
- ``p_auc``: the paired patient bootstrap of AUC(row) − AUC(CLMAN) on the videos both were tested
  on (pooled scores; each resample draws patients with replacement and scores both rows on the
  same videos): ``auc_diff``, its 95 % percentile CI ``auc_diff_ci`` and the two-sided p
  = 2 · min(P*(d ≤ 0), P*(d ≥ 0)), each (1 + count) / (B + 1) (:func:`clman.metrics.paired_bootstrap_auc`),
  drawn from ``seed``, so the same inputs give the same p. ``p_auc_delong_per_video``: the paired
  DeLong test on the same videos, kept as a labelled extra (summary.json): it takes the videos as
  independent, and a patient's videos are not.

Facts that shaped this module
- Issue 23's review simulated the old mean ± t over all (fold, seed) runs: a nominal 95 %
  interval covered the true mean 71–82 % of the time, since the seeds of a fold share its test
  set and the folds share training data. tests/test_study_stats.py simulates 5 folds × 3 seeds
  with fold effects correlated as Nadeau & Bengio model them and checks both intervals.
- The bootstrap's p-value inverts the percentile CI (rather than shifting the bootstrap
  distribution to the null), so p < 0.05 goes with a CI of the difference that leaves out 0 (up
  to the +1 correction and the percentile's interpolation); with B resamples p cannot go below
  2 / (B + 1) (0.002 at B = 1000: the table shows "<0.001" only from B = 2000 on).
- The paired test uses ``seed`` itself, as the pooled CIs do: rows tested on the same videos are
  compared on the same patient resamples.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from clman.metrics import (
    METRIC_NAMES,
    UndefinedMetricWarning,
    bootstrap_ci,
    compute_metrics,
    corrected_t_ci,
    delong_covariance,
    delong_test,
    mean_ci,
    paired_bootstrap_auc,
    specificity_at_sensitivity,
)
from clman.study.rows import BY_NAME, REFERENCE, ROWS, Row, StudyError

KEYS = ("row", "fold", "seed")
PREDICTION_COLUMNS = (*KEYS, "video_id", "patient_id", "label", "score")
# The deployable operating point (issue 12, item 7): the threshold chosen on the validation
# videos for a target sensitivity, and the metrics it gives on the test videos.
OP_COLUMNS = ("op_threshold", "op_accuracy", "op_sensitivity", "op_specificity", "op_f1")


def trial_metrics(
    scores, labels, *, threshold: float = 0.5, val_scores=None, val_labels=None, target_sensitivity: float = 0.95
) -> dict[str, float]:
    """One results line: the six metrics of a trial's test scores at ``threshold``.

    With the validation scores, also ``op_*``: the test metrics at the threshold that gives
    ``target_sensitivity`` on the validation videos (what a clinic would deploy).
    """
    out = dict(compute_metrics(scores, labels, threshold=threshold))
    if val_scores is not None:
        _, thr = specificity_at_sensitivity(val_scores, val_labels, sensitivity=target_sensitivity)
        out["op_threshold"] = thr
        if math.isnan(thr):
            out.update({c: float("nan") for c in OP_COLUMNS[1:]})
        else:
            at = compute_metrics(scores, labels, threshold=thr)
            out.update({f"op_{k}": at[k] for k in ("accuracy", "sensitivity", "specificity", "f1")})
    return out


def _frame(table, what: str, columns) -> pd.DataFrame:
    df = table.to_pandas() if isinstance(table, pa.Table) else pd.DataFrame(table)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StudyError(f"{what}: missing columns {missing}; expected at least {list(columns)}")
    unknown = sorted(set(df["row"]) - set(BY_NAME))
    if unknown:
        raise StudyError(f"{what}: unknown row {unknown[0]!r}; valid: {', '.join(BY_NAME)}")
    return df.reset_index(drop=True)


def check_results(results) -> pd.DataFrame:
    """The results table as a DataFrame sorted by (row in paper order, fold, seed); one line per trial."""
    df = _frame(results, "results", (*KEYS, *METRIC_NAMES))
    dup = df.duplicated(list(KEYS))
    if dup.any():
        r = df[dup].iloc[0]
        raise StudyError(f"results: trial (row {r['row']}, fold {r['fold']}, seed {r['seed']}) appears twice")
    order = {r.name: i for i, r in enumerate(ROWS)}
    df = df.assign(_o=df["row"].map(order)).sort_values(["_o", "fold", "seed"], kind="stable")
    return df.drop(columns="_o").reset_index(drop=True)


def check_predictions(predictions) -> pd.DataFrame:
    """The predictions table as a DataFrame; a video at most once per (row, seed) (out of fold)."""
    df = _frame(predictions, "predictions", PREDICTION_COLUMNS)
    dup = df.duplicated(["row", "seed", "video_id"])
    if dup.any():
        r = df[dup].iloc[0]
        raise StudyError(
            f"predictions: video {r['video_id']!r} is scored twice for row {r['row']}, "
            f"seed {r['seed']}; out-of-fold predictions test each video once per (row, seed)"
        )
    return df


def pooled_scores(predictions: pd.DataFrame, row: str) -> pd.DataFrame:
    """One line per video tested for ``row``: video_id, patient_id, label, score (mean over seeds), seeds."""
    df = predictions[predictions["row"] == row]
    g = df.groupby("video_id", sort=True)
    out = g.agg(
        patient_id=("patient_id", "first"), label=("label", "first"), score=("score", "mean"), seeds=("seed", "nunique")
    )
    return out.reset_index()


# The kinds of interval of the cells (RowSummary.interval).
INTERVAL_CV = "cv_corrected_t"
INTERVAL_SEEDS = "seeds_t_one_split"
INTERVAL_NONE = "none"
SIZE_COLUMNS = ("n_train", "n_test")
RATIO_DEFAULT = "1/(K-1)"  # RowSummary.ratio_source without sizes in the results


@dataclass
class RowSummary:
    row: Row
    runs: int  # (fold, seed) trials in the results
    cells: dict[str, tuple[float, float, float, int]]  # metric -> (mean, lo, hi, runs where defined)
    folds: int = 0  # distinct folds of the runs (1: one fixed split)
    seeds: int = 0  # distinct seeds
    interval: str = INTERVAL_NONE  # the kind of the cells' interval: INTERVAL_CV, INTERVAL_SEEDS or INTERVAL_NONE
    test_train_ratio: float = float("nan")  # n_test/n_train of the corrected t (INTERVAL_CV only)
    ratio_source: str = ""  # "results" (their n_test / n_train) or RATIO_DEFAULT
    videos: int = 0  # pooled out-of-fold videos
    patients: int = 0
    pooled: dict[str, float] = field(default_factory=dict)
    pooled_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    p_auc: float | None = None  # paired patient bootstrap vs CLMAN; None for CLMAN; NaN when not tested
    auc_diff: float | None = None  # pooled AUC(row) - AUC(CLMAN) on the paired videos
    auc_diff_ci: tuple[float, float] = (float("nan"), float("nan"))  # its 95 % percentile CI (bootstrap)
    p_auc_delong_per_video: float | None = None  # extra: DeLong on the same videos, taken as independent
    paired_videos: int = 0  # videos both this row and CLMAN were tested on
    paired_patients: int = 0
    paired_resamples: int = 0  # bootstrap resamples of the paired test that held both classes


def mean_over_runs(
    values, folds, *, n_folds: int | None = None, test_train_ratio: float | None = None, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean, lo, hi) of one metric over (fold, seed) runs: seeds averaged within each fold first.

    values, folds: one per run; non-finite values (undefined in that run) are left out, and a fold
    without any is dropped. n_folds: the folds of the design (default: the distinct folds given).
    More than one: the corrected resampled t over the fold means (:func:`clman.metrics.corrected_t_ci`;
    test_train_ratio None: 1/(n_folds - 1)). One (a single fixed split): the t-interval over the
    seeds, i.e. the seed-to-seed variation of training only. NaN bounds where it cannot be had.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    f = np.asarray(folds).ravel()
    if v.shape != f.shape:
        raise ValueError(f"values and folds differ in length: {v.size} vs {f.size}")
    n_folds = len(np.unique(f)) if n_folds is None else n_folds
    keep = np.isfinite(v)
    v, f = v[keep], f[keep]
    if n_folds <= 1:
        return mean_ci(v, alpha)
    if test_train_ratio is None:
        test_train_ratio = 1.0 / (n_folds - 1)
    _, inverse = np.unique(f, return_inverse=True)
    fold_means = np.bincount(inverse, weights=v) / np.bincount(inverse)  # (K,): a fold's seeds averaged
    return corrected_t_ci(fold_means, test_train_ratio, alpha)


def _ratio(df: pd.DataFrame, n_folds: int) -> tuple[float, str]:
    """(n_test/n_train, where it came from) of a row's runs: their sizes when all carry them, else 1/(K-1)."""
    if n_folds <= 1:
        return float("nan"), ""
    if all(c in df.columns for c in SIZE_COLUMNS):
        n_train = pd.to_numeric(df["n_train"], errors="coerce").to_numpy(np.float64)
        n_test = pd.to_numeric(df["n_test"], errors="coerce").to_numpy(np.float64)
        if np.isfinite(n_train).all() and np.isfinite(n_test).all() and (n_train > 0).all():
            return float(n_test.sum() / n_train.sum()), "results"
    return 1.0 / (n_folds - 1), RATIO_DEFAULT


def _cells(df: pd.DataFrame, n_folds: int, ratio: float) -> dict[str, tuple[float, float, float, int]]:
    cells = {}
    ratio = ratio if n_folds > 1 else None
    for col in (*METRIC_NAMES, *(c for c in OP_COLUMNS if c in df.columns)):
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        cells[col] = (
            *mean_over_runs(v, df["fold"].to_numpy(), n_folds=n_folds, test_train_ratio=ratio),
            int(np.isfinite(v).sum()),
        )
    return cells


def interval_note(s: RowSummary) -> str:
    """One sentence: what the interval of a row's cells is (study.md, summary.json)."""
    if s.interval == INTERVAL_CV:
        src = (
            "from the trials' n_test / n_train"
            if s.ratio_source == "results"
            else "1/(K−1), the K-fold value: the results carry no n_test / n_train"
        )
        return (
            f"the corrected resampled t of Nadeau & Bengio (2003) over the {s.folds} fold means (the seeds of "
            f"a fold averaged first): m ± t(K−1, 0.975) · sqrt((1/K + n_test/n_train) · s²), "
            f"n_test/n_train = {s.test_train_ratio:.3f} ({src})"
        )
    if s.interval == INTERVAL_SEEDS:
        return (
            f"one fixed test split, so the t-interval over the {s.seeds} seeds: the seed-to-seed variation of "
            "training only, not the sampling variability of the test set (for that, see ↳ pooled's "
            "patient-bootstrap CI)"
        )
    return "no interval: one run (for the sampling variability of the test set, see ↳ pooled's patient-bootstrap CI)"


def _interval_kind(n_folds: int, n_seeds: int) -> str:
    if n_folds > 1:
        return INTERVAL_CV
    return INTERVAL_SEEDS if n_seeds > 1 else INTERVAL_NONE


def summarize(
    results, predictions=None, *, n_boot: int = 1000, seed: int = 0, threshold: float = 0.5
) -> dict[str, RowSummary]:
    """Each row's summary (see the module docstring), keyed by row name, in the paper's order.

    n_boot: patient-level bootstrap resamples for the pooled CIs and the paired test against
    CLMAN (0: none, and p_auc is NaN); seed: their draw. Without predictions only the means over
    runs are filled in.
    """
    res = check_results(results)
    preds = None if predictions is None else check_predictions(predictions)
    out: dict[str, RowSummary] = {}
    pooled: dict[str, pd.DataFrame] = {}
    for name, df in res.groupby("row", sort=False):
        n_folds, n_seeds = int(df["fold"].nunique()), int(df["seed"].nunique())
        ratio, source = _ratio(df, n_folds)
        s = RowSummary(
            BY_NAME[name],
            len(df),
            _cells(df, n_folds, ratio),
            folds=n_folds,
            seeds=n_seeds,
            interval=_interval_kind(n_folds, n_seeds),
            test_train_ratio=ratio,
            ratio_source=source,
        )
        out[name] = s
        if preds is None:
            continue
        p = pooled[name] = pooled_scores(preds, name)
        if p.empty:
            continue
        s.videos, s.patients = len(p), int(p["patient_id"].nunique())
        scores, labels = p["score"].to_numpy(np.float64), p["label"].to_numpy(np.int64)
        s.pooled = compute_metrics(scores, labels, threshold=threshold)
        if n_boot:
            s.pooled_ci = bootstrap_ci(
                scores,
                labels,
                n_boot=n_boot,
                seed=seed,
                threshold=threshold,
                groups=p["patient_id"].astype(str).to_numpy(),
            )
    ref = pooled.get(REFERENCE)
    for name, s in out.items():
        if name == REFERENCE or name not in pooled:
            continue
        s.p_auc = s.p_auc_delong_per_video = float("nan")
        if ref is None:
            continue
        both = pooled[name].merge(ref, on="video_id", suffixes=("", "_ref"))
        s.paired_videos, s.paired_patients = len(both), int(both["patient_id"].nunique())
        clash = both[(both["label"] != both["label_ref"]) | (both["patient_id"] != both["patient_id_ref"])]
        if len(clash):
            raise StudyError(
                f"predictions: video {clash['video_id'].iloc[0]!r} has another label or patient in "
                f"row {name} than in row {REFERENCE}"
            )
        counts = both["label"].value_counts()
        if not (counts.get(0, 0) >= 2 and counts.get(1, 0) >= 2):
            warnings.warn(
                f"row {name}: {len(both)} videos shared with {REFERENCE} hold fewer than 2 of a class; no paired test",
                UndefinedMetricWarning,
                stacklevel=2,
            )
            continue
        a, b = both["score"].to_numpy(np.float64), both["score_ref"].to_numpy(np.float64)
        y = both["label"].to_numpy(np.int64)
        s.p_auc_delong_per_video = delong_test(a, b, y)
        if n_boot:
            test = paired_bootstrap_auc(
                a, b, y, groups=both["patient_id"].astype(str).to_numpy(), n_boot=n_boot, seed=seed
            )
            s.auc_diff, s.auc_diff_ci, s.p_auc = test.diff, (test.lo, test.hi), test.p
            s.paired_resamples = test.resamples
        else:  # no resamples: the difference alone
            aucs, _ = delong_covariance(np.stack([a, b]), y)
            s.auc_diff = float(aucs[0] - aucs[1])
    return out
