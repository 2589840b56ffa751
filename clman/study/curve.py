"""The label-efficiency curve (issue 23): AUC against the share of labelled training patients, for CLMAN (with
CL), the same model without CL (``gn_nl``) and the linear probe (``linear_probe``: the CL encoder frozen).

``jobs.study --label-fractions 0.1,0.25,0.5,1`` trains the curve's rows at each fraction over the study's
folds x seeds. A trial at fraction f finetunes on f of its (fold, seed)'s training patients, per class
(``clman.train.finetune.label_subset``): nested (for one seed the 0.1 patients are among the 0.25 ones),
the same patients for the three rows of a (fold, seed) (drawn from ``finetune.seed``, which is the study's
seed for every row), so the paired tests compare the rows on the same labels. What stays fixed at every
fraction: the validation patients (carved before subsetting: the checkpoint is picked on the same videos, so
a point moves with the training labels only), the test fold, and SimCLR — one run per (fold, seed) on all of
its training videos and the unlabelled ones, shared by every fraction (pretraining reads no label: the
videos whose labels a fraction drops are still there to pretrain on, the semi-supervised setting the curve
is about).

Per fraction, that fraction's trials are summarized as a study of their own by
:func:`clman.study.stats.summarize`: each row's pooled out-of-fold AUC with its patient-bootstrap CI, and the
paired patient bootstrap of AUC(row) − AUC(CLMAN) on the same videos, shown here the other way round
(CLMAN − row; the two-sided p is the same). A results / predictions table carries the fraction of each line
in a ``fraction`` column; a table without one is all at fraction 1 (a study without ``--label-fractions``).

Facts that shaped this module
- ceil(f · n) patients per class, not round: every class keeps a patient at any f > 0, and the counts grow
  with f, so the subsets nest. At 10 % of a fold's 20 malignant patients that is 2 patients: the low end of
  the curve is noisy by design, which the pooled CIs show.
- The curve's fractions must include 1: the Tables 1-4 part of study.md and roc.png are made from the
  fraction-1 trials, and the lower fractions are read against it.
"""

from __future__ import annotations

import io
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from clman.study import stats
from clman.study.rows import BY_NAME, REFERENCE, Row, StudyError, parse_tables, select_rows
from clman.study.stats import RowSummary

FRACTION = "fraction"  # the results / predictions column
WITHOUT_CL = "gn_nl"  # Table 2's "Without CL Guided": CLMAN's model, its encoder from scratch
LINEAR_PROBE = "linear_probe"
CURVE_ROWS = (REFERENCE, WITHOUT_CL, LINEAR_PROBE)
CURVE_TABLE = 2  # the curve's rows are Table 2's (with / without CL) and the linear probe, an ablation row of it
LABELS = {REFERENCE: "With CL (CLMAN)", WITHOUT_CL: "Without CL", LINEAR_PROBE: "Linear probe (CL encoder frozen)"}
PNG = "label_efficiency.png"


def parse_fractions(text: str | Iterable[float]) -> tuple[float, ...]:
    """``"0.1,0.25,0.5,1"`` -> (0.1, 0.25, 0.5, 1.0), sorted, each once; a bad item fails in one line."""
    items = [t.strip() for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    out: list[float] = []
    for item in items:
        try:
            f = float(item)
        except (TypeError, ValueError):
            f = math.nan
        if not 0.0 < f <= 1.0:  # NaN fails too
            raise StudyError(
                f"--label-fractions: {item!r} is not a number in (0, 1] (the share of the labelled "
                "training patients, e.g. 0.1,0.25,0.5,1)"
            )
        if f not in out:
            out.append(f)
    if not out:
        raise StudyError("--label-fractions: no fraction given, e.g. 0.1,0.25,0.5,1")
    if 1.0 not in out:
        raise StudyError(
            f"--label-fractions {','.join(f'{f:g}' for f in sorted(out))}: must include 1 (every "
            "label: the tables and roc.png are made from it, and the curve is read against it)"
        )
    names = [f"{f:g}" for f in out]
    if len(set(names)) < len(names):  # trial ids carry f:g (clman.study.grid.Trial.id)
        raise StudyError(f"--label-fractions: {', '.join(map(str, out))} are too close to tell apart in trial ids")
    return tuple(sorted(out))


def curve_rows(tables: str | None = None, names: str | Sequence[str] | None = None) -> tuple[Row, ...]:
    """The rows of a ``--label-fractions`` study: ``CURVE_ROWS``, or those of them ``--rows`` names (CLMAN always
    in). ``--tables`` other than 2, or a row of no curve: refused in one line."""
    if tables is not None and parse_tables(tables) != (CURVE_TABLE,):
        raise StudyError(
            f"--label-fractions: --tables {tables} asks for other rows than the curve's (Table "
            f"{CURVE_TABLE}: {', '.join(CURVE_ROWS)}); drop --tables, or choose among them with --rows"
        )
    if names is not None:
        items = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
        for n in items:
            if n not in CURVE_ROWS:
                raise StudyError(
                    f"--label-fractions: row {n!r} is not on the label-efficiency curve; its rows: "
                    f"{', '.join(CURVE_ROWS)} (run other rows in a study without --label-fractions)"
                )
    return select_rows(str(CURVE_TABLE), list(CURVE_ROWS) if names is None else names)


def frame(table) -> pd.DataFrame:
    """A results or predictions table (DataFrame, Arrow table, list of dicts) as a DataFrame."""
    return table.to_pandas() if isinstance(table, pa.Table) else pd.DataFrame(table)


def fractions_of(table) -> pd.Series:
    """The fraction of each line: its ``fraction`` column, 1 where there is none (or it is missing)."""
    df = frame(table)
    if FRACTION not in df.columns:
        return pd.Series(1.0, index=df.index)
    return pd.to_numeric(df[FRACTION], errors="coerce").fillna(1.0).astype(np.float64)


def at_fraction(table, fraction: float) -> pd.DataFrame:
    """The lines of ``table`` at ``fraction`` (a table without a ``fraction`` column is all at 1)."""
    df = frame(table)
    return df[fractions_of(df).to_numpy() == fraction].reset_index(drop=True)


def summarize_curve(
    results,
    predictions,
    *,
    fractions: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[float, dict[str, RowSummary]]:
    """{fraction: :func:`clman.study.stats.summarize` of that fraction's trials}, fractions ascending.

    fractions: those to summarize (default: every one in ``results``); one without a trial fails in one line.
    The same ``seed`` at every fraction: each point's CIs and paired test are drawn as a study's own are.
    """
    present = sorted(set(fractions_of(results)))
    wanted = present if fractions is None else sorted(fractions)
    out = {}
    for f in wanted:
        res = at_fraction(results, f)
        if res.empty:
            shown = ", ".join(f"{p:g}" for p in present)
            raise StudyError(f"results: no trial at label fraction {f:g}; present: {shown}")
        out[f] = stats.summarize(res, at_fraction(predictions, f), n_boot=n_boot, seed=seed, threshold=threshold)
    return out


def versus_reference(s: RowSummary) -> tuple[float, tuple[float, float], float]:
    """(AUC(CLMAN) − AUC(row), its 95 % CI, p) of a row's paired test (stats gives row − CLMAN: negated)."""
    diff = -s.auc_diff if s.auc_diff is not None else math.nan
    lo, hi = s.auc_diff_ci
    return diff, (-hi, -lo), (s.p_auc if s.p_auc is not None else math.nan)


def rows_of(curve: Mapping[float, Mapping[str, RowSummary]]) -> list[str]:
    """The rows on the curve, in ``CURVE_ROWS`` order (then any other, in the paper's)."""
    seen = {name for points in curve.values() for name in points}
    return [n for n in CURVE_ROWS if n in seen] + [n for n in BY_NAME if n in seen and n not in CURVE_ROWS]


def label(name: str) -> str:
    return LABELS.get(name) or BY_NAME[name].title(BY_NAME[name].tables[-1])


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def curve_dict(curve: Mapping[float, Mapping[str, RowSummary]], results=None) -> dict:
    """summary.json's ``label_efficiency``: per fraction and row the pooled AUC with its CI, and the paired test
    of CLMAN − row. results: the trials, for the mean labelled videos per run (their ``n_labelled``)."""
    points = []
    for f, summary in curve.items():
        labelled = mean_labelled(results, f) if results is not None else math.nan
        for name in rows_of({f: summary}):
            s = summary[name]
            point = {
                "fraction": f,
                "row": name,
                "runs": s.runs,
                "videos": s.videos,
                "patients": s.patients,
                "labelled_videos_per_run": _num(labelled),
                "auc": _num(s.pooled.get("auc")),
                "auc_ci95": [_num(x) for x in s.pooled_ci.get("auc", (None, None))],
            }
            if name != REFERENCE:
                diff, (lo, hi), p = versus_reference(s)
                point["reference_minus_row"] = {
                    "auc_diff": _num(diff),
                    "auc_diff_ci95": [_num(lo), _num(hi)],
                    "p_auc": _num(p),
                    "resamples": s.paired_resamples,
                    "paired_videos": s.paired_videos,
                }
            points.append(point)
    return {
        "fractions": list(curve),
        "rows": rows_of(curve),
        "reference": REFERENCE,
        "auc": "pooled out-of-fold AUC (one score per video: its mean over seeds) with a 95 % percentile CI "
        "from a bootstrap of patients",
        "reference_minus_row": "AUC(reference) - AUC(row) on the videos both were tested on, the paired patient "
        "bootstrap of clman.study.stats (its CI and two-sided p)",
        "points": points,
    }


def mean_labelled(results, fraction: float) -> float:
    df = at_fraction(results, fraction)
    if "n_labelled" not in df.columns or df.empty:
        return math.nan
    return float(pd.to_numeric(df["n_labelled"], errors="coerce").mean())


def curve_png(
    curve: Mapping[float, Mapping[str, RowSummary]], title: str = "Label efficiency", size: float = 5.0
) -> bytes:
    """AUC (pooled out of fold) against the labelled share, one line per row, error bars its 95 % CI; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = list(curve)
    names = rows_of(curve)
    fig, ax = plt.subplots(figsize=(size * 1.3, size), dpi=120)
    for i, name in enumerate(names):
        # a small sideways shift per row (log x: a factor), so that overlapping error bars stay apart
        shift = 1.0 + 0.025 * (i - (len(names) - 1) / 2)
        xs, ys, lo, hi = [], [], [], []
        for f in fractions:
            s = curve[f].get(name)
            auc = s.pooled.get("auc", math.nan) if s is not None else math.nan
            if not math.isfinite(auc):
                continue
            a, b = s.pooled_ci.get("auc", (math.nan, math.nan))
            xs.append(f * shift)
            ys.append(auc)
            lo.append(auc - a if math.isfinite(a) else 0.0)
            hi.append(b - auc if math.isfinite(b) else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label(name))
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set(
        xlabel="labelled share of the training patients",
        ylabel="AUC (pooled out of fold)",
        title=f"{title} (95 % patient-bootstrap CI)",
    )
    ax.grid(alpha=0.3)
    if names:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
