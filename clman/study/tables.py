"""study.md: the paper's Tables 1-4 filled in from a study's summaries (``clman.study.stats``).

Each table keeps the paper's layout (method; Acc, AP, Sens, Spec, F1, AUC in %) with three
lines per method: the mean over the runs (seeds averaged within each fold, then the mean of the
fold means) with a 95 % interval, the pooled out-of-fold value with its patient-level bootstrap
CI, and the paper's number. One sentence under the tables says which interval the means carry
(``stats.interval_note``: the corrected resampled t over folds, or over seeds only on one fixed
split). The last column is the p-value of the paired patient bootstrap of the row's pooled AUC
against CLMAN's on the same videos; the pooled line holds that AUC difference with its CI.
A ``--label-fractions`` study adds the label-efficiency section first (:func:`curve_lines`, from
``clman.study.curve``): per labelled fraction, each curve row's pooled AUC with its CI and the paired
difference CLMAN − row with its CI and p; the paper's tables below it are the fraction-1 trials.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import yaml

from clman.evaluate.report import PAPER_COLUMNS
from clman.study import curve as curve_mod
from clman.study.rows import REFERENCE, TABLE_TITLES, TABLES, table_rows
from clman.study.stats import INTERVAL_SEEDS, OP_COLUMNS, RowSummary, interval_note

DASH = "–"


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def fmt_pct(x) -> str:
    return f"{100 * x:.2f}" if _finite(x) else "n/a"


def fmt_ci(lo, hi) -> str:
    """`` (lo–hi)`` in %, clipped to [0, 100] (a t-interval of a bounded metric can overshoot); '' when undefined."""
    if not (_finite(lo) and _finite(hi)):
        return ""
    return f" ({fmt_pct(min(max(lo, 0.0), 1.0))}{DASH}{fmt_pct(min(max(hi, 0.0), 1.0))})"


def fmt_cell(cell: tuple[float, float, float, int], runs: int) -> str:
    """mean (lo–hi) of one metric over runs; † when it is undefined in some runs."""
    mean, lo, hi, n = cell
    if n == 0:
        return "n/a"
    return fmt_pct(mean) + fmt_ci(lo, hi) + (" †" if n < runs else "")


def fmt_p(p) -> str:
    if p is None:
        return "ref."
    if not _finite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_diff(diff, ci) -> str:
    """``ΔAUC +x.xx (lo, hi)`` in AUC points (signed, not clipped; a comma, as both ends may be negative);
    '' when untested."""
    if not _finite(diff):
        return ""
    text = f"ΔAUC {100 * diff:+.2f}"
    lo, hi = ci
    return text + (f" ({100 * lo:+.2f}, {100 * hi:+.2f})" if _finite(lo) and _finite(hi) else "")


def _head(columns: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def table_lines(title_of, summaries: Sequence[RowSummary]) -> list[str]:
    """The Markdown table of ``summaries``; ``title_of(row)`` names a row as the paper's table does."""
    # One fixed split: the interval of the means is the seeds' alone; say so where the numbers are.
    method = (
        "Method (interval: seeds only, see below)" if any(s.interval == INTERVAL_SEEDS for s in summaries) else "Method"
    )
    lines = _head([method, *(h for _, h in PAPER_COLUMNS), "p (AUC vs CLMAN)"])
    for s in summaries:
        mean = [fmt_cell(s.cells[k], s.runs) for k, _ in PAPER_COLUMNS]
        p = None if s.row.name == REFERENCE else s.p_auc
        lines.append(f"| {title_of(s.row)} | " + " | ".join(mean) + f" | {fmt_p(p)} |")
        if s.pooled:
            pooled = [fmt_pct(s.pooled[k]) + fmt_ci(*s.pooled_ci.get(k, (None, None))) for k, _ in PAPER_COLUMNS]
            diff = "" if s.row.name == REFERENCE else fmt_diff(s.auc_diff, s.auc_diff_ci)
            lines.append("| ↳ pooled | " + " | ".join(pooled) + (f" | {diff} |" if diff else " | |"))
        paper = s.row.paper_metrics
        lines.append("| ↳ paper | " + " | ".join(fmt_pct(paper[k]) for k, _ in PAPER_COLUMNS) + " | |")
    return lines


def op_lines(summaries: Sequence[RowSummary]) -> list[str]:
    """The operating point chosen on the validation videos, for the rows whose results carry it."""
    rows = [s for s in summaries if "op_threshold" in s.cells]
    if not rows:
        return []
    heads = {
        "op_threshold": "Threshold",
        "op_accuracy": "Acc",
        "op_sensitivity": "Sens",
        "op_specificity": "Spec",
        "op_f1": "F1",
    }
    lines = _head(["Method", *(heads[c] for c in OP_COLUMNS)])
    for s in rows:
        t_mean, t_lo, t_hi, t_n = s.cells["op_threshold"]
        thr = "n/a" if t_n == 0 else f"{t_mean:.3f}" + (f" ({t_lo:.3f}{DASH}{t_hi:.3f})" if _finite(t_lo) else "")
        cells = [fmt_cell(s.cells[c], s.runs) for c in OP_COLUMNS[1:]]
        lines.append(f"| {s.row.title(s.row.tables[-1])} | {thr} | " + " | ".join(cells) + " |")
    return lines


def interval_lines(summaries: Iterable[RowSummary]) -> list[str]:
    """The sentence under the tables that says which interval the means carry (one per kind, naming
    the rows, when rows differ)."""
    by_note: dict[str, list[str]] = {}
    for s in summaries:
        by_note.setdefault(interval_note(s), []).append(s.row.name)
    if len(by_note) == 1:
        return [f"Interval of the means (these tables and the operating point): {next(iter(by_note))}."]
    return [f"Interval of the means of {', '.join(rows)}: {note}." for note, rows in by_note.items()]


def curve_lines(curve: Mapping[float, Mapping[str, RowSummary]], *, n_boot: int = 1000, results=None) -> list[str]:
    """The label-efficiency section: one line per fraction; per row its pooled AUC (95 % CI), then CLMAN − each
    other row: ΔAUC in points (95 % CI) and the paired bootstrap's p. results: for the labelled videos per run."""
    names = curve_mod.rows_of(curve)
    others = [n for n in names if n != REFERENCE]
    labelled = results is not None and "n_labelled" in curve_mod.frame(results).columns
    heads = [
        "Labelled share",
        *(["Labelled videos per run"] if labelled else []),
        *(f"{curve_mod.label(n)}: AUC" for n in names),
    ]
    for n in others:
        heads += [f"CLMAN − {curve_mod.label(n)}", "p"]
    lines = _head(heads)
    for f, summary in curve.items():
        cells = [f"{f:g}"]
        if labelled:
            cells.append(f"{curve_mod.mean_labelled(results, f):.1f}")
        for n in names:
            s = summary.get(n)
            cells.append(
                "n/a"
                if s is None or not s.pooled
                else fmt_pct(s.pooled.get("auc")) + fmt_ci(*s.pooled_ci.get("auc", (None, None)))
            )
        for n in others:
            s = summary.get(n)
            if s is None:
                cells += ["n/a", "n/a"]
                continue
            diff, ci, p = curve_mod.versus_reference(s)
            cells += [fmt_diff(diff, ci) or "n/a", fmt_p(p)]
        lines.append("| " + " | ".join(cells) + " |")
    return [
        "## Label efficiency — AUC against the labelled share of the training patients",
        "",
        "Each trial finetunes on that share of its (fold, seed)'s training patients, per class, rounded up "
        "(finetune.label_fraction): nested (a smaller share's patients are among a larger one's), the same "
        "patients for every row of a (fold, seed); the validation patients, the test fold and SimCLR (one run per "
        "(fold, seed) on all its training and unlabelled videos) are the same at every share. "
        f"AUC: pooled out of fold (one score per video, its mean over seeds) in %, with a 95 % CI from {n_boot} "
        "bootstrap resamples of patients. CLMAN − row: the paired patient bootstrap of the AUC difference on the "
        "same videos, in AUC points, with its 95 % percentile CI and two-sided p. The tables below are the trials "
        "at share 1.",
        "",
        *lines,
        "",
        f"![AUC against the labelled share]({curve_mod.PNG})",
        "",
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return (f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s") + f" ({s} s)"


def default_tables(summary: Mapping[str, RowSummary]) -> tuple[int, ...]:
    """The tables with a row of the study besides CLMAN (CLMAN alone is the reference, not a table)."""
    return tuple(t for t in TABLES if any(s.row.name != REFERENCE and t in s.row.tables for s in summary.values()))


def markdown(
    summary: Mapping[str, RowSummary],
    *,
    tables: Iterable[int] | None = None,
    title: str = "CLMAN study",
    protocol: str = "",
    command: str = "",
    config: Mapping | None = None,
    run_time_s: float | None = None,
    n_boot: int = 1000,
    threshold: float = 0.5,
    notes: Sequence[str] = (),
    curve: Mapping[float, Mapping[str, RowSummary]] | None = None,
    results=None,
) -> str:
    """study.md from :func:`clman.study.stats.summarize`'s output and what the run was.

    curve: :func:`clman.study.curve.summarize_curve`'s output, for the label-efficiency section (results: the
    trials, for its labelled videos per run).
    """
    tables = default_tables(summary) if tables is None else tuple(tables)
    lines = [f"# {title}", ""]
    if protocol:
        lines += [protocol, ""]
    lines += [
        "Each cell: the mean of a row's metric over its runs in %, the seeds of a fold averaged first (they "
        "share its test videos), then the mean of the fold means, with the 95 % interval stated under the "
        "tables (clipped to [0, 100]). "
        f"↳ pooled: the metric of the pooled out-of-fold predictions (one score per video, its mean over "
        f"seeds) with a 95 % CI from {n_boot} bootstrap resamples of patients (a patient's videos together). "
        "↳ paper: Huang et al. 2022, one random 60/40 split of 268 videos. "
        f"p: two-sided p-value of the paired bootstrap of the pooled AUC against CLMAN's on the same videos "
        f"({n_boot} resamples of patients, both rows scored on each; p = 2 · min(P(Δ ≤ 0), P(Δ ≥ 0)) with "
        "the +1 correction); ΔAUC on the ↳ pooled line: the row's AUC minus CLMAN's, in points, with its 95 % "
        "percentile CI. "
        f"Malignant is the positive class; threshold {threshold:g}."
        + ("" if n_boot else " No bootstrap was asked (0 resamples): no pooled CIs, and p is n/a."),
        "",
    ]
    if curve is not None:
        lines += curve_lines(curve, n_boot=n_boot, results=results)
    shown: set[str] = set()
    for t in tables:
        members = [summary[r.name] for r in table_rows(t) if r.name in summary]
        if not members:
            continue
        shown.update(s.row.name for s in members)
        lines += [f"## {TABLE_TITLES[t]}", "", *table_lines(lambda r, t=t: r.title(t), members), ""]
    rest = [s for s in summary.values() if s.row.name not in shown]
    if rest:
        lines += ["## Other rows", "", *table_lines(lambda r: r.title(r.tables[-1]), rest), ""]
    lines += [*interval_lines(summary.values()), ""]
    if any(s.cells[k][3] < s.runs for s in summary.values() for k in s.cells):
        lines += ["† undefined in some runs: the mean of the runs where it is defined (seeds within a fold first).", ""]
    op = op_lines(list(summary.values()))
    if op:
        lines += [
            "## Operating point chosen on the validation videos",
            "",
            "The threshold that gives the target sensitivity (evaluate.target_sensitivity) on each run's "
            "validation videos, and the test metrics at it: what a clinic would deploy.",
            "",
            *op,
            "",
        ]
    lines += ["## ROC", "", "![ROC curves of the pooled out-of-fold predictions](roc.png)", ""]
    lines += [
        "## Rows",
        "",
        *_head(["Row", "Tables", "Pretrained encoder", "Runs", "Pooled videos (patients)", "Overrides"]),
    ]
    for s in summary.values():
        r = s.row
        lines.append(
            f"| {r.name} | {', '.join(map(str, r.tables))} | {'yes' if r.pretrained else 'no'} | "
            f"{s.runs} | {s.videos} ({s.patients}) | " + " ".join(f"`{x}`" for x in r.sets) + " |"
        )
    lines += ["", "## Run", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines.append(f"- run time: {_duration(run_time_s)}")
    lines.append(f"- trials: {sum(s.runs for s in summary.values())} ({len(summary)} rows)")
    lines += [f"- {n}" for n in notes]
    if config is not None:
        lines += ["", "Config:", "", "```yaml", yaml.safe_dump(_plain(config), sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _plain(obj):
    """Tuples to lists, so the config dumps as plain YAML."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
