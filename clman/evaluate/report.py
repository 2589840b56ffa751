"""Evaluation outputs: metrics with CIs, calibration, predictions table, ROC and reliability plots, a Markdown report.

Two thresholds appear and are kept apart: ``evaluate.threshold`` (0.5 by default, the paper's
table) and the operating point model.pt stores, chosen on the validation videos at
``evaluate.target_sensitivity`` (``clman.evaluate.inference.choose_threshold``), whose test metrics are
reported and marked on the ROC. The "specificity at 95% sensitivity" line is read off the
evaluated split itself: descriptive, never a threshold to deploy.

Every file goes through ``clman.storage`` writes, which are atomic, so a crash
never leaves a half-written output that looks complete.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from clman import storage
from clman.evaluate.calibration import calibration
from clman.metrics import METRIC_NAMES, bootstrap_ci, bootstrap_indices, compute_metrics, specificity_at_sensitivity

# The paper's column order and headings (Tables 1-4).
PAPER_COLUMNS = (
    ("accuracy", "Acc"),
    ("ap", "AP"),
    ("sensitivity", "Sens"),
    ("specificity", "Spec"),
    ("f1", "F1"),
    ("auc", "AUC"),
)


def evaluate_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float = 0.5,
    target_sensitivity: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    patients: Sequence[str] | None = None,
    validation_threshold: dict | None = None,
) -> dict:
    """The six metrics, their bootstrap 95% CIs, specificity at a fixed sensitivity and calibration
    (Brier score, ECE; ``clman.evaluate.calibration``, CIs from the same resamples).

    ``patients`` (one id per video): the bootstrap resamples patients, a patient's videos
    together; without it, videos. ``validation_threshold``: the record model.pt stores
    (``clman.evaluate.inference.choose_threshold``); its test metrics go under ``operating_point``.
    """
    point = compute_metrics(scores, labels, threshold=threshold)
    groups = None if patients is None else np.asarray(patients)
    ci = bootstrap_ci(scores, labels, n_boot=n_boot, seed=seed, threshold=threshold, groups=groups) if n_boot else {}
    spec, thr = specificity_at_sensitivity(scores, labels, sensitivity=target_sensitivity)
    return {
        "n": int(len(labels)),
        "n_malignant": int(np.sum(labels == 1)),
        "threshold": threshold,
        "metrics": {k: _num(point[k]) for k in METRIC_NAMES},
        "ci95": {k: [_num(ci[k][0]), _num(ci[k][1])] for k in ci},
        "specificity_at_sensitivity": {
            "sensitivity": target_sensitivity,
            "specificity": _num(spec),
            "threshold": _num(thr),
        },
        "bootstrap": n_boot,
        "bootstrap_unit": "video" if patients is None else "patient",
        "calibration": calibration(scores, labels, n_boot=n_boot, seed=seed, groups=groups),
        "operating_point": operating_point(scores, labels, validation_threshold),
    }


def operating_point(scores, labels, record: dict | None) -> dict | None:
    """The test metrics at the threshold chosen on validation (``record``), and where it sits on the ROC."""
    if record is None:
        return None
    at = compute_metrics(scores, labels, threshold=record["value"])
    return {
        "threshold": record["value"],
        "chosen_on": "validation",
        "validation": dict(record),
        **{k: _num(at[k]) for k in ("accuracy", "sensitivity", "specificity", "f1")},
        "fpr": _num(1 - at["specificity"]),
    }


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def table_rows(rows: Mapping[str, dict]) -> str:
    """A Markdown table in the paper's layout; each cell is the value and its 95% CI, in %."""
    head = "| Method | " + " | ".join(h for _, h in PAPER_COLUMNS) + " |"
    sep = "|---" * (len(PAPER_COLUMNS) + 1) + "|"
    lines = [head, sep]
    for name, result in rows.items():
        cells = []
        for key, _ in PAPER_COLUMNS:
            value = result["metrics"][key]
            ci = result.get("ci95", {}).get(key)
            cells.append(fmt_pct(value) + (f" ({fmt_pct(ci[0])}–{fmt_pct(ci[1])})" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ci(ci: Sequence | None, fmt=lambda x: f"{x:.3f}") -> str:
    return f" (95% CI {fmt(ci[0])}–{fmt(ci[1])})" if ci else ""


def markdown(
    rows: Mapping[str, dict],
    title: str = "CLMAN evaluation",
    notes: Sequence[str] = (),
    images: Sequence[str] = ("roc.png",),
) -> str:
    """report.md: the paper-layout table, the operating points, calibration, the plots ``images``."""
    first = next(iter(rows.values()))
    lines = [
        f"# {title}",
        "",
        f"{first['n']} videos ({first['n_malignant']} malignant); malignant is the positive class; "
        f"threshold {first['threshold']:g} (evaluate.threshold) in the table; 95% CIs from {first['bootstrap']} "
        f"bootstrap resamples of {first.get('bootstrap_unit', 'video')}s.",
        "",
        table_rows(rows),
        "",
    ]
    for name, result in rows.items():
        op = result["specificity_at_sensitivity"]
        lines.append(
            f"- {name}: specificity {fmt_pct(op['specificity'])}% at "
            f"{100 * op['sensitivity']:.0f}% sensitivity (score threshold {op['threshold']}, read off "
            "these videos themselves: descriptive, not a threshold to deploy)"
        )
    for name, result in rows.items():
        dep = result.get("operating_point")
        if dep:
            v = dep["validation"]
            lines.append(
                f"- {name}, deployed operating point: threshold {dep['threshold']:.4g}, chosen on the "
                f"{v['videos']} validation videos ({v['malignant']} malignant) for "
                f"{100 * v['target_sensitivity']:.0f}% sensitivity (there: sensitivity "
                f"{fmt_pct(v['sensitivity'])}%, specificity {fmt_pct(v['specificity'])}%), not on this "
                f"split; here: sensitivity {fmt_pct(dep['sensitivity'])}%, specificity "
                f"{fmt_pct(dep['specificity'])}%, accuracy {fmt_pct(dep['accuracy'])}%, F1 "
                f"{fmt_pct(dep['f1'])}%. jobs.predict applies this threshold by default"
            )
    for name, result in rows.items():
        cal = result.get("calibration")
        if cal:
            ci = cal.get("ci95", {})
            lines.append(
                f"- {name}, calibration: Brier score {cal['brier']:.3f}{_ci(ci.get('brier'))}, ECE "
                f"{cal['ece']:.3f}{_ci(ci.get('ece'))} over {cal['ece_bins']} equal-width bins of "
                "P(malignant)"
            )
    lines += ["", *notes, "", *[f"![{Path(i).stem}]({i})" for i in images], ""]
    return "\n".join(lines)


def roc_band(
    scores, labels, *, n_boot: int = 1000, seed: int = 0, groups=None, alpha: float = 0.05, points: int = 101
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr grid, lower, upper): a pointwise percentile-bootstrap (1 - alpha) band of the ROC's sensitivity.

    The resamples of the metrics' CIs (``bootstrap_indices``: patients when ``groups``, same seed); at each
    1 - specificity of the grid, the sensitivity of the step ROC (that of its last point at or left of it,
    as ``roc_png`` draws it). Resamples holding one class are skipped.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for idx in bootstrap_indices(len(labels), n_boot, seed, groups):
        y = labels[idx]
        if y.min() == y.max():
            continue
        fpr, tpr = roc_points(scores[idx], y)
        curves.append(tpr[np.searchsorted(fpr, grid, side="right") - 1])  # (points,)
    if not curves:
        nan = np.full(points, np.nan)
        return grid, nan, nan
    lo, hi = np.percentile(np.stack(curves), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return grid, lo, hi


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score threshold, from (0, 0) to (1, 1); ties move together."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(1 - y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(tp[-1], 1)]
    fpr = np.r_[0.0, fp / max(fp[-1], 1)]
    return fpr, tpr


def roc_png(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]],
    title: str = "ROC (malignant = positive)",
    size: float = 4.5,
    bands: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    points: Mapping[str, tuple[float, float, str]] | None = None,
) -> bytes:
    """ROC curves as PNG bytes; ``curves`` maps a name to (scores, labels, auc), drawn in that order.

    ``bands``: name -> (fpr grid, lower, upper) of :func:`roc_band`, shaded; ``points``: name ->
    (1 - specificity, sensitivity, label) of an operating point, marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    for name, (scores, labels, auc) in curves.items():
        fpr, tpr = roc_points(np.asarray(scores, dtype=np.float64), np.asarray(labels))
        label = name if auc is None else f"{name} (AUC {auc:.3f})"
        (line,) = ax.plot(fpr, tpr, drawstyle="steps-post", label=label)
        if bands and name in bands:
            grid, lo, hi = bands[name]
            ax.fill_between(
                grid, lo, hi, step="post", color=line.get_color(), alpha=0.2, lw=0, label="95% CI (bootstrap)"
            )
        if points and name in points:
            x, y, text = points[name]
            ax.plot([x], [y], marker="o", ms=7, mfc="none", mew=1.8, ls="none", color="black", label=text)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_json(uri: str, obj) -> None:
    storage.write_text(uri, json.dumps(obj, indent=2, default=float) + "\n")


def write_predictions(
    uri: str, video_ids: Sequence[str], labels, scores, threshold: float, top_frames: Sequence[Sequence[int]]
) -> None:
    table = pa.table(
        {
            "video_id": pa.array(list(video_ids), pa.string()),
            "label": pa.array(np.asarray(labels, dtype=np.int8)),
            "score": pa.array(np.asarray(scores, dtype=np.float32)),
            "predicted": pa.array((np.asarray(scores) >= threshold).astype(np.int8)),
            "top_frames": pa.array([list(map(int, f)) for f in top_frames], pa.list_(pa.int32())),
        }
    )
    storage.write_parquet(table, uri)


def reliability_png(reliability: dict, name: str, ece: float | None = None, size: float = 4.5) -> bytes:
    """The reliability diagram of ``clman.evaluate.calibration.reliability_bins`` as PNG bytes: per equal-width bin of
    P(malignant), the share malignant against the mean score (the diagonal is perfect calibration), with
    each bin's video count; below, how many videos each bin holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(size, size * 1.3), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    full = [i for i, c in enumerate(reliability["count"]) if c]
    x = [reliability["mean_score"][i] for i in full]
    y = [reliability["fraction_malignant"][i] for i in full]
    label = name if ece is None else f"{name} (ECE {ece:.3f})"
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1, label="perfectly calibrated")
    ax.plot(x, y, marker="o", label=label)
    for xi, yi, i in zip(x, y, full):
        ax.annotate(str(reliability["count"][i]), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(
        ylabel="share malignant",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        title=f"Reliability ({len(reliability['count'])} equal-width bins)",
    )
    ax.legend(loc="upper left", fontsize=8)
    lower, upper = np.asarray(reliability["lower"]), np.asarray(reliability["upper"])
    hist.bar(lower, reliability["count"], width=upper - lower, align="edge", color="grey", edgecolor="white")
    hist.set(xlabel="mean P(malignant) in the bin", ylabel="videos")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def roc_marker(result: dict, threshold: float) -> tuple:
    """(FPR, sensitivity, label) of the point the ROC marks: the validation threshold's when the model
    stores one, else ``threshold``'s (evaluate.threshold); None where a class is missing."""
    op = result["operating_point"]
    if op:
        return op["fpr"], op["sensitivity"], f"threshold {op['threshold']:.3g}, chosen on validation"
    m = result["metrics"]
    fpr = None if m["specificity"] is None else 1 - m["specificity"]
    return fpr, m["sensitivity"], f"threshold {threshold:g} (evaluate.threshold)"


def write_evaluation(
    out_dir: str,
    name: str,
    scored: Mapping[str, Sequence],
    cfg,
    validation_threshold: dict | None = None,
    notes: Sequence[str] = (),
) -> dict:
    """Metrics with patient-bootstrap CIs and calibration, ``predictions.parquet``, ``roc.png`` (with its
    bootstrap band and the operating point), ``reliability.png``, ``metrics.json`` and ``report.md`` of one
    scored split (``clman.evaluate.scoring.score_split``) under ``out_dir``.

    ``cfg``: an ``EvaluateConfig`` (threshold, target sensitivity, bootstrap resamples, seed).
    ``validation_threshold``: the threshold record the model stores (``clman.evaluate.inference.stored_threshold``);
    the ROC marks its operating point, else that of ``cfg.threshold``. ``notes``: lines for report.md.
    """
    scores = np.asarray(scored["score"], dtype=np.float64)
    labels = np.asarray(scored["label"], dtype=np.int64)
    patients = scored.get("patient_id")
    result = evaluate_scores(
        scores,
        labels,
        threshold=cfg.threshold,
        target_sensitivity=cfg.target_sensitivity,
        n_boot=cfg.bootstrap,
        seed=cfg.seed,
        patients=patients,  # resamples patients
        validation_threshold=validation_threshold,
    )
    write_predictions(
        storage.join(out_dir, "predictions.parquet"),
        scored["video_id"],
        labels,
        scores,
        cfg.threshold,
        scored["top_frames"],
    )
    groups = None if patients is None else np.asarray(patients)
    bands = (
        {name: roc_band(scores, labels, n_boot=cfg.bootstrap, seed=cfg.seed, groups=groups)} if cfg.bootstrap else None
    )
    point = roc_marker(result, cfg.threshold)
    points = {name: point} if None not in point[:2] else None
    storage.write_bytes(
        storage.join(out_dir, "roc.png"),
        roc_png({name: (scores, labels, result["metrics"]["auc"])}, bands=bands, points=points),
    )
    cal = result["calibration"]
    storage.write_bytes(storage.join(out_dir, "reliability.png"), reliability_png(cal["reliability"], name, cal["ece"]))
    write_json(storage.join(out_dir, "metrics.json"), result)
    storage.write_text(
        storage.join(out_dir, "report.md"), markdown({name: result}, notes=notes, images=("roc.png", "reliability.png"))
    )
    return result
