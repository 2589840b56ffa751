"""From the trials' results to each row's numbers: means over runs, pooled out-of-fold metrics, paired tests.

Two plain tables come in (pandas DataFrames or Arrow tables):
- results: one line per trial — ``row``, ``fold``, ``seed`` and the six metrics on its test
  videos (:func:`trial_metrics` makes them), optionally the ``op_*`` operating point at the
  threshold chosen on its validation videos and any other numbers (kept in study.parquet);
- predictions: one line per test video per trial — ``row``, ``fold``, ``seed``, ``video_id``,
  ``patient_id``, ``label``, ``score`` (P(malignant)). Out of fold: a video is tested once per
  (row, seed).

Per row (:func:`summarize`):
- ``cells``: each metric's mean over the (fold, seed) runs with a 95 % Student-t interval;
- ``pooled``: the metrics of the pooled out-of-fold predictions, one score per video (its mean
  over seeds, so a video counts once however many seeds ran), with a 95 % percentile CI from
  a bootstrap that resamples patients, a patient's videos together;
- ``p_auc``: the paired DeLong test of that pooled AUC against CLMAN's on the same videos.
  Videos of one patient are not independent; the test treats them as if they were.
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
    delong_test,
    mean_ci,
    specificity_at_sensitivity,
)
from clman.study.rows import BY_NAME, REFERENCE, ROWS, Row, StudyError

KEYS = ("row", "fold", "seed")
PREDICTION_COLUMNS = (*KEYS, "video_id", "patient_id", "label", "score")
# The deployable operating point (issue 12, item 7): the threshold chosen on the validation
# videos for a target sensitivity, and the metrics it gives on the test videos.
OP_COLUMNS = ("op_threshold", "op_accuracy", "op_sensitivity", "op_specificity", "op_f1")


def trial_metrics(scores, labels, *, threshold: float = 0.5, val_scores=None, val_labels=None,
                  target_sensitivity: float = 0.95) -> dict[str, float]:
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
        raise StudyError(f"predictions: video {r['video_id']!r} is scored twice for row {r['row']}, "
                         f"seed {r['seed']}; out-of-fold predictions test each video once per (row, seed)")
    return df


def pooled_scores(predictions: pd.DataFrame, row: str) -> pd.DataFrame:
    """One line per video tested for ``row``: video_id, patient_id, label, score (mean over seeds), seeds."""
    df = predictions[predictions["row"] == row]
    g = df.groupby("video_id", sort=True)
    out = g.agg(patient_id=("patient_id", "first"), label=("label", "first"), score=("score", "mean"),
                seeds=("seed", "nunique"))
    return out.reset_index()


@dataclass
class RowSummary:
    row: Row
    runs: int  # (fold, seed) trials in the results
    cells: dict[str, tuple[float, float, float, int]]  # metric -> (mean, lo, hi, runs where defined)
    videos: int = 0  # pooled out-of-fold videos
    patients: int = 0
    pooled: dict[str, float] = field(default_factory=dict)
    pooled_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    p_auc: float | None = None  # DeLong vs CLMAN; None for CLMAN itself; NaN when it cannot be tested
    paired_videos: int = 0  # videos both this row and CLMAN were tested on


def _cells(df: pd.DataFrame) -> dict[str, tuple[float, float, float, int]]:
    cells = {}
    for col in (*METRIC_NAMES, *(c for c in OP_COLUMNS if c in df.columns)):
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        cells[col] = (*mean_ci(v), int(v.size))
    return cells


def summarize(results, predictions=None, *, n_boot: int = 1000, seed: int = 0,
              threshold: float = 0.5) -> dict[str, RowSummary]:
    """Each row's summary (see the module docstring), keyed by row name, in the paper's order.

    n_boot: patient-level bootstrap resamples for the pooled CIs (0: none); seed: their draw.
    Without predictions only the means over runs are filled in.
    """
    res = check_results(results)
    preds = None if predictions is None else check_predictions(predictions)
    out: dict[str, RowSummary] = {}
    pooled: dict[str, pd.DataFrame] = {}
    for name, df in res.groupby("row", sort=False):
        s = RowSummary(BY_NAME[name], len(df), _cells(df))
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
            s.pooled_ci = bootstrap_ci(scores, labels, n_boot=n_boot, seed=seed, threshold=threshold,
                                       groups=p["patient_id"].astype(str).to_numpy())
    ref = pooled.get(REFERENCE)
    for name, s in out.items():
        if name == REFERENCE or name not in pooled:
            continue
        s.p_auc = float("nan")
        if ref is None:
            continue
        both = pooled[name].merge(ref, on="video_id", suffixes=("", "_ref"))
        s.paired_videos = len(both)
        counts = both["label"].value_counts()
        if counts.get(0, 0) >= 2 and counts.get(1, 0) >= 2:
            s.p_auc = delong_test(both["score"].to_numpy(np.float64), both["score_ref"].to_numpy(np.float64),
                                  both["label"].to_numpy(np.int64))
        else:
            warnings.warn(f"row {name}: {len(both)} videos shared with {REFERENCE} hold fewer than 2 of a class; "
                          "no DeLong test", UndefinedMetricWarning, stacklevel=2)
    return out
