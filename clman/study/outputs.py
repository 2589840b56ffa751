"""Write a study's outputs from its trials' results: study.md, summary.json, study.parquet, predictions.parquet,
roc.png (and label_efficiency.png for a ``--label-fractions`` study).

Every file goes through ``clman.storage`` (local path or s3://), one atomic write each, so a
crashed writer never leaves a half file that looks complete. summary.json holds every row's
numbers behind study.md (``summary_dict``), with what each interval and test is, and the extra
per-video DeLong p (``p_auc_delong_per_video``) that study.md leaves out; NaN is written as null.
(``study.json`` beside it is the driver's record of what was asked, not numbers.)
A ``--label-fractions`` study's tables carry a ``fraction`` column (a trial per (row, fold, seed, fraction));
the paper's tables and roc.png are made from its fraction-1 trials, the curve (``clman.study.curve``) from all.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from clman import storage
from clman.evaluate import report
from clman.study import curve, stats, tables
from clman.study.rows import REFERENCE, ROWS, table_rows
from clman.study.stats import RowSummary

OUTPUTS = ("study.md", "summary.json", "study.parquet", "predictions.parquet", "roc.png")
SUMMARY_VERSION = 1


def _per_fraction(table, check) -> pd.DataFrame:
    """``check`` (stats.check_results / check_predictions) on each fraction's lines, when there is a ``fraction``
    column: a trial is one per (row, fold, seed) at each fraction, not over them."""
    df = curve.frame(table)
    if curve.FRACTION not in df.columns:
        return check(df)
    df = df.assign(**{curve.FRACTION: curve.fractions_of(df)})
    return pd.concat([check(part) for _, part in df.groupby(curve.FRACTION, sort=True)], ignore_index=True)


def results_table(results) -> pa.Table:
    """study.parquet: one line per trial (row, fold, seed[, fraction], every metric), in the paper's row order."""
    df = _per_fraction(results, stats.check_results)
    if curve.FRACTION in df.columns:
        order = {r.name: i for i, r in enumerate(ROWS)}
        df = (
            df.assign(_o=df["row"].map(order))
            .sort_values(["_o", curve.FRACTION, "fold", "seed"], kind="stable")
            .drop(columns="_o")
            .reset_index(drop=True)
        )
    df = df.astype({"row": str, "fold": np.int32, "seed": np.int32})
    return pa.Table.from_pandas(df, preserve_index=False)


def predictions_table(predictions) -> pa.Table:
    """predictions.parquet: every video's out-of-fold score per row and seed (and fraction)."""
    df = _per_fraction(predictions, stats.check_predictions)
    order = {r.name: i for i, r in enumerate(ROWS)}
    keys = ["_o", *([curve.FRACTION] if curve.FRACTION in df.columns else []), "seed", "fold", "video_id"]
    df = df.assign(_o=df["row"].map(order)).sort_values(keys, kind="stable").drop(columns="_o").reset_index(drop=True)
    df = df.astype(
        {
            "row": str,
            "fold": np.int32,
            "seed": np.int32,
            "video_id": str,
            "patient_id": str,
            "label": np.int8,
            "score": np.float64,
        }
    )
    return pa.Table.from_pandas(df, preserve_index=False)


def roc_curves(summary: Mapping[str, RowSummary], predictions) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """The paper's Figure 5: CLMAN and the Table 4 methods of the study (every row when it has none).

    Pooled out-of-fold scores, one per video (mean over seeds), named as in Table 4.
    """
    preds = stats.check_predictions(predictions)
    fig5 = [r for r in table_rows(4) if r.name in summary]
    chosen = fig5 if any(r.name != REFERENCE for r in fig5) else [s.row for s in summary.values()]
    curves = {}
    for r in chosen:
        p = stats.pooled_scores(preds, r.name)
        if p.empty:
            continue
        name = r.title(4) if 4 in r.tables else r.title(r.tables[-1])
        curves[name] = (
            p["score"].to_numpy(np.float64),
            p["label"].to_numpy(np.int64),
            summary[r.name].pooled.get("auc"),
        )
    return curves


def _num(x):
    """A JSON number: NaN / inf as None (null); numpy scalars as Python ones."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summary_dict(summary: Mapping[str, RowSummary], *, n_boot: int, seed: int, threshold: float) -> dict:
    """summary.json: each row's means over runs, pooled metrics and paired test, each labelled with its method."""
    rows = []
    for s in summary.values():
        ref = s.row.name == REFERENCE
        rows.append(
            {
                "row": s.row.name,
                "runs": s.runs,
                "folds": s.folds,
                "seeds": s.seeds,
                "means": {
                    "interval": s.interval,  # cv_corrected_t | seeds_t_one_split | none
                    "interval_note": stats.interval_note(s),
                    "test_train_ratio": _num(s.test_train_ratio),
                    "ratio_source": s.ratio_source or None,
                    "cells": {
                        k: {"mean": _num(m), "lo": _num(lo), "hi": _num(hi), "runs_defined": n}
                        for k, (m, lo, hi, n) in s.cells.items()
                    },
                },
                "pooled": {
                    "videos": s.videos,
                    "patients": s.patients,
                    "metrics": {k: _num(v) for k, v in s.pooled.items()},
                    "ci95_patient_bootstrap": {k: [_num(lo), _num(hi)] for k, (lo, hi) in s.pooled_ci.items()},
                },
                "vs_reference": None
                if ref
                else {
                    "reference": REFERENCE,
                    "test": "paired patient bootstrap of the pooled AUC difference",
                    "auc_diff": _num(s.auc_diff),
                    "auc_diff_ci95": [_num(s.auc_diff_ci[0]), _num(s.auc_diff_ci[1])],
                    "p_auc": _num(s.p_auc),
                    "resamples": s.paired_resamples,
                    "p_auc_delong_per_video": _num(s.p_auc_delong_per_video),  # extra: videos taken as independent
                    "paired_videos": s.paired_videos,
                    "paired_patients": s.paired_patients,
                },
            }
        )
    return {
        "version": SUMMARY_VERSION,
        "reference": REFERENCE,
        "n_boot": n_boot,
        "seed": seed,
        "threshold": threshold,
        "p_auc": "two-sided p of the paired patient bootstrap of AUC(row) - AUC(reference): "
        "2 min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1)), at most 1",
        "p_auc_delong_per_video": "paired DeLong test on the same videos, taking the videos as independent "
        "(a patient's videos are not): an extra, not the table's p",
        "rows": rows,
    }


def write_study(
    out_dir: str,
    results,
    predictions,
    *,
    tables_shown: Iterable[int] | None = None,
    title: str = "CLMAN study",
    protocol: str = "",
    command: str = "",
    config: Mapping | None = None,
    run_time_s: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
    notes: Sequence[str] = (),
    label_fractions: Sequence[float] | None = None,
) -> dict[str, RowSummary]:
    """Summarize the trials and write the five outputs (``OUTPUTS``) under ``out_dir``; returns the summaries.

    results / predictions: see ``clman.study.stats``. tables_shown: the tables of study.md (None:
    those with a row of the study besides CLMAN). protocol: one line saying what was split how
    (``FoldPlan.describe()``); command, config, run_time_s: what ran, for the Run section.
    label_fractions: a ``--label-fractions`` study's fractions (with 1): the curve section of study.md and
    summary.json, and ``label_efficiency.png``; the tables, roc.png and the returned summaries are the
    fraction-1 trials'.
    """
    full_results, full_predictions = curve.at_fraction(results, 1.0), curve.at_fraction(predictions, 1.0)
    summary = stats.summarize(full_results, full_predictions, n_boot=n_boot, seed=seed, threshold=threshold)
    points = None
    if label_fractions is not None:
        points = curve.summarize_curve(
            results, predictions, fractions=label_fractions, n_boot=n_boot, seed=seed, threshold=threshold
        )
    storage.write_parquet(results_table(results), storage.join(out_dir, "study.parquet"))
    storage.write_parquet(predictions_table(predictions), storage.join(out_dir, "predictions.parquet"))
    storage.write_bytes(
        storage.join(out_dir, "roc.png"),
        report.roc_png(roc_curves(summary, full_predictions), title="ROC curves, pooled out of fold", size=5.0),
    )
    if points is not None:
        storage.write_bytes(storage.join(out_dir, curve.PNG), curve.curve_png(points))
    record = summary_dict(summary, n_boot=n_boot, seed=seed, threshold=threshold)
    if points is not None:
        record["label_efficiency"] = curve.curve_dict(points, results)
    storage.write_text(storage.join(out_dir, "summary.json"), json.dumps(record, indent=1, allow_nan=False) + "\n")
    text = tables.markdown(
        summary,
        tables=tables_shown,
        title=title,
        protocol=protocol,
        command=command,
        config=config,
        run_time_s=run_time_s,
        n_boot=n_boot,
        threshold=threshold,
        notes=notes,
        curve=points,
        results=results,
    )
    storage.write_text(storage.join(out_dir, "study.md"), text)  # last: its presence marks a complete write
    return summary


def read_results(out_dir: str) -> pd.DataFrame:
    """study.parquet back as a DataFrame (e.g. to add trials and rewrite)."""
    return storage.read_parquet(storage.join(out_dir, "study.parquet")).to_pandas()
