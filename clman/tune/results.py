"""A sweep's results: the trials and epochs tables, ``best.yaml``, ``summary.md`` and the plot (Ray-free).

Written by :func:`write_results` under ``<out>/<run-name>/`` when the sweep ends:
``trials.parquet``/``trials.csv`` (a row per trial), ``epochs.parquet`` (a row per
trial per epoch), ``best.yaml`` (a preset with the best trial's values), ``summary.md``
and ``auc_vs_lr.png`` (``loss_vs_lr.png`` for pretrain). The records come from Tune's
stored state (``clman.tune.driver.collect``) or, in tests, are made by hand.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import pyarrow as pa
import yaml

from clman import config as C
from clman import storage
from clman.errors import JobError
from clman.tune.sweep import PLOT_FILES, SCORES, TABLE_METRICS, TIE_BREAKS, TIME_ATTR, Sweep

log = logging.getLogger(__name__)

# Tune's per-report bookkeeping that the result tables leave out.
_BOOKKEEPING = {
    "done",
    "date",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "experiment_tag",
    "checkpoint_dir_name",
    "should_checkpoint",
    "trial_id",
    "training_iteration",
}


@dataclass
class TrialRecord:
    """What Tune knows of one trial: its sampled values, status and every reported row."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict  # dotted key -> sampled value
    history: pd.DataFrame | None = None  # one row per report (epoch)
    error: str | None = None


def trial_statuses(out: str, run_name: str) -> dict[str, str]:
    """{trial id: Tune status} from the latest experiment state on storage ({} before the first save).

    Cheap enough to poll while a sweep runs.
    """
    prefix = storage.join(out, run_name)
    states = [
        u for u in storage.list_uris(prefix, suffix=".json") if u.rsplit("/", 1)[-1].startswith("experiment_state-")
    ]
    if not states:
        return {}
    state = json.loads(storage.read_text(max(states)))  # names end in a sortable timestamp
    out_ = {}
    for item in state.get("trial_data", []):
        trial = json.loads(item[0]) if isinstance(item, (list, tuple)) else json.loads(item)
        out_[trial.get("trial_id")] = trial.get("status")
    return out_


def _scalar(value):
    """Table cells: lists (e.g. nonlocal_stages) as text, numpy scalars as Python ones."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def epochs_table(records: Sequence[TrialRecord], keys: Sequence[str]) -> pd.DataFrame:
    """A row per trial per reported epoch: trial id, the trial's values, every reported metric.

    A trial restarted after a driver failure reports some epochs twice; the last report wins.
    """
    parts = []
    for r in records:
        h = r.history
        if h is None or len(h) == 0:
            continue
        h = h[[c for c in h.columns if not c.startswith("config/") and c not in _BOOKKEEPING]].copy()
        h.insert(0, "trial_id", r.trial_id)
        for i, k in enumerate(keys):
            h.insert(1 + i, k, _scalar(r.config.get(k)))
        parts.append(h)
    if not parts:
        return pd.DataFrame(columns=["trial_id", *keys, "epoch"])
    df = pd.concat(parts, ignore_index=True)
    if "epoch" in df.columns:
        df = df.drop_duplicates(["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"])
    return df.reset_index(drop=True)


def _ranked(df: pd.DataFrame, job: str) -> pd.DataFrame:
    """``df`` best first by the job's score (``SCORES``), ties by its tie-break (``TIE_BREAKS``), the
    order before kept among full ties; rows without a score last."""
    metric, mode = SCORES[job]
    by, ascending = [metric], [mode == "min"]
    tie = TIE_BREAKS.get(job)
    if tie and tie[0] in df.columns:
        by.append(tie[0])
        ascending.append(tie[1] == "min")
    numeric = df.assign(**{c: pd.to_numeric(df[c], errors="coerce") for c in by})
    order = numeric.sort_values(by, ascending=ascending, na_position="last", kind="stable").index
    return df.loc[order]


def _ties(job: str) -> str:
    """', ties by the lower val_loss': how the ranking breaks ties, for the summary's heading."""
    tie = TIE_BREAKS.get(job)
    return f", ties by the {'lower' if tie[1] == 'min' else 'higher'} {tie[0]}" if tie else ""


def _best_row(h: pd.DataFrame, job: str):
    """The epoch of one trial's history ``h`` that scored best (:func:`_ranked`); None when none scored."""
    metric, _ = SCORES[job]
    if metric not in h.columns or pd.to_numeric(h[metric], errors="coerce").notna().sum() == 0:
        return None
    return _ranked(h, job).iloc[0]


def trials_table(
    records: Sequence[TrialRecord], job: str, keys: Sequence[str], planned_epochs: Mapping[str, int]
) -> pd.DataFrame:
    """A row per trial: its values, status, best epoch and the metrics at that epoch, ranked best first
    (:func:`_ranked`: by val AUC, ties by the lower val loss, for a finetune sweep).

    status: completed (ran all its epochs), stopped (early, by the scheduler),
    error, or Tune's status in lower case for a trial that has not ended
    (running, pending, paused). ``planned_epochs``: trial id -> epochs it was set to run.
    """
    epochs = epochs_table(records, keys)
    rows = []
    for r in records:
        h = epochs[epochs["trial_id"] == r.trial_id]
        done = int(h[TIME_ATTR].max()) if TIME_ATTR in h.columns and len(h) else 0
        if r.status == "ERROR":
            status = "error"
        elif r.status == "TERMINATED":
            status = "completed" if done >= planned_epochs.get(r.trial_id, done) else "stopped"
        else:
            status = r.status.lower()
        best = _best_row(h, job) if len(h) else None
        row = {
            "trial_id": r.trial_id,
            **{k: _scalar(r.config.get(k)) for k in keys},
            "status": status,
            "best_epoch": int(best["epoch"]) if best is not None and "epoch" in best else None,
            "epochs_done": done,
        }
        for m in TABLE_METRICS[job]:
            row[m] = float(best[m]) if best is not None and m in best and pd.notna(best[m]) else float("nan")
        row["seconds"] = (
            float(pd.to_numeric(h["time_this_iter_s"], errors="coerce").sum())
            if "time_this_iter_s" in h.columns
            else float("nan")
        )
        ckpt_path = best.get("checkpoint_path") if best is not None else None
        row["checkpoint"] = ckpt_path if isinstance(ckpt_path, str) else ""
        row["error"] = r.error or ""
        rows.append(row)
    columns = [
        "trial_id",
        *keys,
        "status",
        "best_epoch",
        "epochs_done",
        *TABLE_METRICS[job],
        "seconds",
        "checkpoint",
        "error",
    ]
    df = pd.DataFrame(rows, columns=columns)
    df["best_epoch"] = df["best_epoch"].astype("Int64")
    return _ranked(df, job).reset_index(drop=True)


def best_tree(sweep: Sweep, trials: pd.DataFrame) -> dict | None:
    """The base config sections with the best trial's values set (None when no trial scored)."""
    metric, _ = SCORES[sweep.job]
    scored = trials[trials[metric].notna()]
    if scored.empty:
        return None
    space = sweep.search_space()
    values = {k: _unscalar(scored.iloc[0][k]) for k in space.keys}
    tree = space.apply(sweep.tree, values)
    for job in C.JOB_CONFIGS:  # the file must load as a preset: every section valid
        C.job_config(tree, job)
    return tree


def _unscalar(value):
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def _lr_key(sweep: Sweep) -> str:
    return f"{sweep.job}.lr"


def plot_png(sweep: Sweep, trials: pd.DataFrame) -> bytes:
    """The score of each trial (at its best epoch) against its learning rate, coloured by the
    other tuned field (model.mma_depth when tuned). Errored / unscored trials are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = SCORES[sweep.job]
    lr_key = _lr_key(sweep)
    keys = sweep.search_space().keys
    others = [k for k in keys if k != lr_key]
    colour_key = "model.mma_depth" if "model.mma_depth" in others else (others[0] if others else None)
    df = trials[trials[metric].notna()].copy()
    if lr_key not in df.columns:  # lr not tuned: every trial ran the base config's
        df[lr_key] = sweep.base_config().lr
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    if colour_key is None:
        ax.scatter(df[lr_key], df[metric], s=30)
    else:
        groups = sorted(df[colour_key].unique(), key=lambda v: (str(type(v)), v))
        cmap = plt.get_cmap("viridis", max(len(groups), 2))
        for i, g in enumerate(groups):
            sel = df[df[colour_key] == g]
            ax.scatter(
                sel[lr_key], sel[metric], s=30, color=cmap(i), label=f"{g:g}" if isinstance(g, float) else str(g)
            )
        if groups:
            ax.legend(title=colour_key, fontsize=8, title_fontsize=8)
    ax.set_xscale("log")
    ax.set(
        xlabel=lr_key,
        ylabel=f"{metric} (best epoch)",
        title=f"{sweep.run_name}: {metric} vs learning rate ({len(df)} trials)",
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(sweep: Sweep, trials: pd.DataFrame, tree: dict | None) -> str:
    metric, mode = SCORES[sweep.job]
    space = sweep.search_space()
    counts = trials["status"].value_counts().to_dict()
    lines = [
        f"# Sweep `{sweep.run_name}`: {sweep.job}",
        "",
        f"- space: `{sweep.space_file}` — " + "; ".join(f"`{p.key}` {p.describe()}" for p in space.params),
        f"- base config: `{sweep.config or 'defaults'}`"
        + (" with " + " ".join(f"`--set {o}`" for o in sweep.overrides) if sweep.overrides else ""),
        f"- manifest: `{sweep.manifest}`" + (f"; encoder: `{sweep.encoder}`" if sweep.encoder else ""),
        f"- {sweep.samples} sample(s), {sweep.search} search, "
        + (
            f"ASHA on `{metric}` ({mode}), grace period {sweep.grace_period} epoch(s), reduction factor "
            f"{sweep.reduction_factor}"
            if sweep.scheduler == "asha"
            else f"FIFO, ranked by `{metric}` ({mode})"
        ),
        f"- {len(trials)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "",
        f"## Trials by {metric} ({'highest' if mode == 'max' else 'lowest'} first{_ties(sweep.job)})",
        "",
        "Metrics at each trial's best epoch (0-based; the same rule picks it); `epochs` = epochs run.",
        "",
    ]
    cols = ["trial_id", *space.keys, "status", "best_epoch", "epochs_done", *TABLE_METRICS[sweep.job], "seconds"]
    heads = [c.replace("epochs_done", "epochs").replace("best_epoch", "best epoch") for c in cols]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for _, row in trials.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    errors = trials[trials["status"] == "error"]
    if len(errors):
        lines += ["", "Errors:", ""] + [f"- `{r.trial_id}`: {r.error}" for r in errors.itertuples()]
    lines += ["", "## Best config", ""]
    if tree is None:
        lines.append(f"No trial reported a finite `{metric}`.")
    else:
        best = trials.iloc[0]
        values = ", ".join(f"`{k}` = {_fmt(best[k])}" for k in space.keys)
        lines += [
            f"Trial `{best['trial_id']}` ({values}): `{metric}` {_fmt(best[metric])} at epoch "
            f"{_fmt(best['best_epoch'])}. As a preset (also in `best.yaml` beside this file):",
            "",
            "```yaml",
            yaml.safe_dump(tree, sort_keys=False).rstrip(),
            "```",
            "",
            "Train it with:",
            "",
            f"    python -m jobs.{sweep.job} --config {storage.join(sweep.run_dir, 'best.yaml')} "
            f"--manifest {sweep.manifest} --out <runs> --run-name <name>"
            + (f" --encoder {sweep.encoder}" if sweep.encoder else ""),
        ]
    lines += ["", f"![{metric} against learning rate]({PLOT_FILES[sweep.job]})", ""]
    return "\n".join(lines)


def _parquet(df: pd.DataFrame, uri: str) -> None:
    storage.write_parquet(pa.Table.from_pandas(df, preserve_index=False), uri)


def write_results(sweep: Sweep, records: Sequence[TrialRecord]) -> dict:
    """Write trials.parquet/.csv, epochs.parquet, best.yaml, summary.md and the plot under the run dir.

    ``records``: what Tune stored for the sweep (``clman.tune.driver.collect``), or made by hand in tests.
    """
    keys = sweep.search_space().keys
    planned = {r.trial_id: sweep.trial_config(r.config).epochs for r in records}
    trials = trials_table(records, sweep.job, keys, planned)
    if storage.is_s3(sweep.out):  # Ray reports paths inside the filesystem: "bucket/key"
        trials["checkpoint"] = [f"s3://{p}" if p and not p.startswith("s3://") else p for p in trials["checkpoint"]]
    epochs = epochs_table(records, keys)
    tree = best_tree(sweep, trials)
    d = sweep.run_dir
    uris = {
        name: storage.join(d, name)
        for name in ("trials.parquet", "trials.csv", "epochs.parquet", "summary.md", PLOT_FILES[sweep.job])
    }
    _parquet(trials, uris["trials.parquet"])
    storage.write_text(uris["trials.csv"], trials.to_csv(index=False))
    _parquet(epochs, uris["epochs.parquet"])
    if tree is not None:
        uris["best.yaml"] = storage.join(d, "best.yaml")
        storage.write_text(
            uris["best.yaml"],
            f"# Best trial of sweep {sweep.run_name} ({sweep.job}); "
            f"see summary.md\n" + yaml.safe_dump(tree, sort_keys=False),
        )
    storage.write_bytes(uris[PLOT_FILES[sweep.job]], plot_png(sweep, trials))
    storage.write_text(uris["summary.md"], summary_markdown(sweep, trials, tree))
    metric, _ = SCORES[sweep.job]
    if len(trials) and trials[metric].notna().any():
        best = trials.iloc[0]
        log.info(
            "sweep %s: best trial %s, %s %.4f (%s)",
            sweep.run_name,
            best["trial_id"],
            metric,
            best[metric],
            ", ".join(f"{k}={_fmt(best[k])}" for k in keys),
        )
    unfinished = trials["status"].isin(["running", "pending", "paused"]).sum()
    if unfinished:
        log.warning(
            "sweep %s: %d trial(s) did not finish; continue with: python -m jobs.tune --resume %s --out %s",
            sweep.run_name,
            unfinished,
            sweep.run_name,
            sweep.out,
        )
    failed = (trials["status"] == "error").sum()
    if len(trials) and failed == len(trials):
        raise JobError(
            f"sweep {sweep.run_name}: all {failed} trial(s) failed; first error: "
            f"{trials['error'].iloc[0]} (tables in {d})"
        )
    return uris
