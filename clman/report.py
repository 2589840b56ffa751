"""Evaluation outputs: metrics with CIs, predictions table, ROC plot and a Markdown report.

Every file goes through ``clman.storage`` writes, which are atomic, so a crash
never leaves a half-written output that looks complete.
"""

from __future__ import annotations

import io
import json
import math
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from clman import storage
from clman.metrics import METRIC_NAMES, bootstrap_ci, compute_metrics, specificity_at_sensitivity

# The paper's column order and headings (Tables 1-4).
PAPER_COLUMNS = (("accuracy", "Acc"), ("ap", "AP"), ("sensitivity", "Sens"), ("specificity", "Spec"),
                 ("f1", "F1"), ("auc", "AUC"))


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5,
                    target_sensitivity: float = 0.95, n_boot: int = 1000, seed: int = 0,
                    patients: Sequence[str] | None = None) -> dict:
    """The six metrics, their bootstrap 95% CIs and specificity at a fixed sensitivity.

    ``patients`` (one id per video): the bootstrap resamples patients, a patient's videos
    together; without it, videos.
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
        "specificity_at_sensitivity": {"sensitivity": target_sensitivity, "specificity": _num(spec),
                                       "threshold": _num(thr)},
        "bootstrap": n_boot,
        "bootstrap_unit": "video" if patients is None else "patient",
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


def markdown(rows: Mapping[str, dict], title: str = "CLMAN evaluation", notes: Sequence[str] = ()) -> str:
    """report.md: the paper-layout table, the operating point at fixed sensitivity, the ROC plot."""
    first = next(iter(rows.values()))
    lines = [f"# {title}", "",
             f"{first['n']} videos ({first['n_malignant']} malignant); malignant is the positive class; "
             f"threshold {first['threshold']:g}; 95% CIs from {first['bootstrap']} bootstrap resamples of "
             f"{first.get('bootstrap_unit', 'video')}s.",
             "", table_rows(rows), ""]
    for name, result in rows.items():
        op = result["specificity_at_sensitivity"]
        lines.append(f"- {name}: specificity {fmt_pct(op['specificity'])}% at "
                     f"{100 * op['sensitivity']:.0f}% sensitivity (score threshold {op['threshold']})")
    lines += ["", *notes, "", "![ROC](roc.png)", ""]
    return "\n".join(lines)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score threshold, from (0, 0) to (1, 1); ties move together."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(1 - y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(tp[-1], 1)]
    fpr = np.r_[0.0, fp / max(fp[-1], 1)]
    return fpr, tpr


def roc_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]],
            title: str = "ROC (malignant = positive)", size: float = 4.5) -> bytes:
    """ROC curves as PNG bytes; ``curves`` maps a name to (scores, labels, auc), drawn in that order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    for name, (scores, labels, auc) in curves.items():
        fpr, tpr = roc_points(np.asarray(scores, dtype=np.float64), np.asarray(labels))
        label = name if auc is None else f"{name} (AUC {auc:.3f})"
        ax.plot(fpr, tpr, drawstyle="steps-post", label=label)
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


def write_predictions(uri: str, video_ids: Sequence[str], labels, scores, threshold: float,
                      top_frames: Sequence[Sequence[int]]) -> None:
    table = pa.table({
        "video_id": pa.array(list(video_ids), pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int8)),
        "score": pa.array(np.asarray(scores, dtype=np.float32)),
        "predicted": pa.array((np.asarray(scores) >= threshold).astype(np.int8)),
        "top_frames": pa.array([list(map(int, f)) for f in top_frames], pa.list_(pa.int32())),
    })
    storage.write_parquet(table, uri)


def write_evaluation(out_dir: str, name: str, scored: Mapping[str, Sequence], cfg) -> dict:
    """Metrics with patient-bootstrap CIs, ``predictions.parquet``, ``roc.png``, ``metrics.json`` and
    ``report.md`` of one scored split (``clman.train.scoring.score_split``) under ``out_dir``.

    ``cfg``: an ``EvaluateConfig`` (threshold, target sensitivity, bootstrap resamples, seed).
    """
    scores = np.asarray(scored["score"], dtype=np.float64)
    labels = np.asarray(scored["label"], dtype=np.int64)
    result = evaluate_scores(scores, labels, threshold=cfg.threshold, target_sensitivity=cfg.target_sensitivity,
                             n_boot=cfg.bootstrap, seed=cfg.seed,
                             patients=scored.get("patient_id"))  # the bootstrap resamples patients
    write_predictions(storage.join(out_dir, "predictions.parquet"), scored["video_id"], labels, scores,
                      cfg.threshold, scored["top_frames"])
    storage.write_bytes(storage.join(out_dir, "roc.png"), roc_png({name: (scores, labels, result["metrics"]["auc"])}))
    write_json(storage.join(out_dir, "metrics.json"), result)
    storage.write_text(storage.join(out_dir, "report.md"), markdown({name: result}))
    return result
