"""Write a study's outputs from its trials' results: study.md, study.parquet, predictions.parquet, roc.png.

Every file goes through ``clman.storage`` (local path or s3://), one atomic write each, so a
crashed writer never leaves a half file that looks complete.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from clman import report, storage
from clman.study import stats, tables
from clman.study.rows import REFERENCE, ROWS, table_rows
from clman.study.stats import RowSummary

OUTPUTS = ("study.md", "study.parquet", "predictions.parquet", "roc.png")


def results_table(results) -> pa.Table:
    """study.parquet: one line per trial (row, fold, seed, every metric), in the paper's row order."""
    df = stats.check_results(results)
    df = df.astype({"row": str, "fold": np.int32, "seed": np.int32})
    return pa.Table.from_pandas(df, preserve_index=False)


def predictions_table(predictions) -> pa.Table:
    """predictions.parquet: every video's out-of-fold score per row and seed."""
    df = stats.check_predictions(predictions)
    order = {r.name: i for i, r in enumerate(ROWS)}
    df = (df.assign(_o=df["row"].map(order)).sort_values(["_o", "seed", "fold", "video_id"], kind="stable")
          .drop(columns="_o").reset_index(drop=True))
    df = df.astype({"row": str, "fold": np.int32, "seed": np.int32, "video_id": str, "patient_id": str,
                    "label": np.int8, "score": np.float64})
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
        curves[name] = (p["score"].to_numpy(np.float64), p["label"].to_numpy(np.int64),
                        summary[r.name].pooled.get("auc"))
    return curves


def write_study(out_dir: str, results, predictions, *, tables_shown: Iterable[int] | None = None,
                title: str = "CLMAN study", protocol: str = "", command: str = "", config: Mapping | None = None,
                run_time_s: float | None = None, n_boot: int = 1000, seed: int = 0, threshold: float = 0.5,
                notes: Sequence[str] = ()) -> dict[str, RowSummary]:
    """Summarize the trials and write the four outputs under ``out_dir``; returns the summaries.

    results / predictions: see ``clman.study.stats``. tables_shown: the tables of study.md (None:
    those with a row of the study besides CLMAN). protocol: one line saying what was split how
    (``FoldPlan.describe()``); command, config, run_time_s: what ran, for the Run section.
    """
    summary = stats.summarize(results, predictions, n_boot=n_boot, seed=seed, threshold=threshold)
    storage.write_parquet(results_table(results), storage.join(out_dir, "study.parquet"))
    storage.write_parquet(predictions_table(predictions), storage.join(out_dir, "predictions.parquet"))
    storage.write_bytes(storage.join(out_dir, "roc.png"),
                        report.roc_png(roc_curves(summary, predictions), title="ROC curves, pooled out of fold",
                                       size=5.0))
    text = tables.markdown(summary, tables=tables_shown, title=title, protocol=protocol, command=command,
                           config=config, run_time_s=run_time_s, n_boot=n_boot, threshold=threshold, notes=notes)
    storage.write_text(storage.join(out_dir, "study.md"), text)  # last: its presence marks a complete write
    return summary


def read_results(out_dir: str) -> pd.DataFrame:
    """study.parquet back as a DataFrame (e.g. to add trials and rewrite)."""
    return storage.read_parquet(storage.join(out_dir, "study.parquet")).to_pandas()
