"""jobs.study end to end: bad input fails before any trial, a tiny study through the CLI (Tables 2 and 4,
two folds, one seed, on the real local S3 with a local Ray) checked cell by cell, and --resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from clman import cli, storage
from clman.data.manifest import read_manifest, write_manifest
from clman.metrics import METRIC_NAMES, bootstrap_ci, compute_metrics
from clman.evaluate.report import PAPER_COLUMNS
from clman.study import REFERENCE, table_rows
from jobs import study as study_job

# 0.45 + 0.45 + 0.01 CPUs a trial: two trials at once on 2 cores (four at once was slower: 2:15 for
# stage 1 against 2:00, the CPUs are busy either way). The CLMAN-only sizes are in the preset: a
# --set model.width would be refused, since tsm_18 does not read it.
PRESET = """
model: {width: 0.125, gn_groups: 4}
data: {size: 32, num_frames: 4, frames_per_clip: 2, decode_cpus: 0.45}
scale: {num_workers: 1, cpus_per_worker: 0.45}
pretrain: {epochs: 1, batch_size: 8, lr: 0.5}
finetune: {epochs: 1, batch_size: 4, lr: 0.01, val_fraction: 0.3}
evaluate: {bootstrap: 200}
"""
ROWS = ("clman", "tsm_18")  # Table 2 and Table 4 share CLMAN: trained once
TABLES = (2, 4)


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    """32 tiny sweeps, 2 per patient, ingested with --folds 2: (manifest URI, bucket, preset path)."""
    from clman.data.ingest import ingest, labeled_items
    from clman.data.synth import SynthConfig, write_dataset

    root = s3.make_bucket(f"study-{uuid.uuid4().hex[:8]}")
    write_dataset(
        f"{root}/videos",
        32,
        seed=0,
        cfg=SynthConfig(size=32, frames=8, videos_per_patient=2),
        workers=1,
        progress=False,
    )
    ingest(
        labeled_items(f"{root}/videos", f"{root}/videos/labels.csv"),
        f"{root}/data",
        folds=2,
        seed=0,
        workers=2,
        keep_ids=True,
    )
    preset = tmp_path_factory.mktemp("study") / "tiny.yaml"
    preset.write_text(PRESET)
    return f"{root}/data/manifest.parquet", root, str(preset)


def _args(manifest, out, name, preset, *extra):
    return ["--manifest", manifest, "--out", out, "--run-name", name, "--config", preset, *extra]


# ---------------------------------------------------------------- bad input: one line, nothing started


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.run_main(study_job.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    return err


def test_bad_input_fails_in_one_line_before_any_trial(data, capsys, tmp_path):
    manifest, root, preset = data
    out = str(tmp_path / "studies")
    base = _args(manifest, out, "bad", preset)
    assert "the manifest has 2 folds" in _one_line_error(base + ["--folds", "3"], capsys)
    assert "--holdout needs a 'test' split" in _one_line_error(base + ["--holdout"], capsys)
    err = _one_line_error(base + ["--folds", "2", "--tables", "2,5"], capsys)
    assert "unknown table '5'" in err and "valid: 1, 2, 3, 4" in err
    err = _one_line_error(base + ["--folds", "2", "--tables", "4", "--rows", "tsm_18,i3d"], capsys)
    assert "unknown row 'i3d'" in err and "tsm_18" in err and "r3d_18" in err
    err = _one_line_error(
        base + ["--folds", "2", "--tables", "4", "--rows", "tsm_18", "--set", "model.width=0.25"], capsys
    )
    assert "row tsm_18 (model.arch=tsm_18) does not read model.width" in err
    assert "seeds" in _one_line_error(base + ["--folds", "2", "--set", "finetune.seed=3"], capsys)

    one_class = read_manifest(manifest)
    one_class["fold"] = one_class["label"].astype("int8")  # fold 0 benign, fold 1 malignant
    bad = str(tmp_path / "one-class" / "manifest.parquet")
    write_manifest(one_class, bad)
    err = _one_line_error(_args(bad, out, "bad", preset, "--folds", "2"), capsys)
    assert "fold 0 holds only benign videos" in err
    assert not os.path.exists(out), "a study with bad input wrote something"


# ---------------------------------------------------------------- a tiny study through the CLI


def _env():
    return {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}


def _run_cli(argv, log_path, timeout=900) -> float:
    t0 = time.time()
    with open(log_path, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.study", *argv], env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        )
    text = open(log_path, errors="replace").read()
    assert proc.returncode == 0, text[-6000:]
    return time.time() - t0


@pytest.fixture(scope="module")
def tiny_study(data, tmp_path_factory):
    manifest, root, preset = data
    out, name = f"{root}/studies", "tiny"
    argv = _args(
        manifest, out, name, preset, "--folds", "2", "--seeds", "1", "--tables", "2,4", "--rows", ",".join(ROWS)
    )
    log_path = tmp_path_factory.mktemp("study-log") / "study.log"
    seconds = _run_cli(argv, log_path)
    print(f"tiny study (2 rows x 2 folds + 2 SimCLR runs): {seconds:.0f} s")
    return {"argv": argv, "dir": f"{out}/{name}", "log": log_path.read_text(), "manifest": manifest}


def _corrected_t(runs: pd.DataFrame, key: str):
    """Nadeau & Bengio's corrected resampled t over the fold means (seeds averaged within a fold),
    n_test / n_train from the trials' sizes, written out here independently of clman.study.stats."""
    runs = runs[np.isfinite(runs[key].astype(float))]
    v = runs.groupby("fold")[key].mean().to_numpy(np.float64)
    if v.size < 2:
        return (v.mean() if v.size else math.nan), math.nan, math.nan
    ratio = runs["n_test"].sum() / runs["n_train"].sum()
    half = sps.t.ppf(0.975, v.size - 1) * math.sqrt((1 / v.size + ratio) * v.var(ddof=1))
    return v.mean(), v.mean() - half, v.mean() + half


def _pct(x) -> str:
    return f"{100 * x:.2f}" if math.isfinite(x) else "n/a"


def _cell(mean, lo, hi) -> str:
    text = _pct(mean)
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" ({_pct(min(max(lo, 0.0), 1.0))}–{_pct(min(max(hi, 0.0), 1.0))})"
    return text


def _table(md: str, table: int) -> list[list[str]]:
    """The cells of Table ``table`` in study.md, one list per Markdown line below its header."""
    section = md.split(f"## Table {table} ", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def _auc_mann_whitney(scores, labels) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def _delong_reference(a, b, labels) -> float:
    """Paired DeLong test, written from DeLong et al. 1988 with explicit structural components."""
    pos, neg = labels == 1, labels == 0

    def components(s):
        x, y = s[pos], s[neg]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])  # (m, n)
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (ta, va, wa), (tb, vb, wb) = components(a), components(b)
    m, n = pos.sum(), neg.sum()
    s10 = np.cov(np.stack([va, vb]))  # over the m positives
    s01 = np.cov(np.stack([wa, wb]))  # over the n negatives
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z = (ta - tb) / math.sqrt(var)
    return float(2 * sps.norm.sf(abs(z)))


@pytest.mark.slow
def test_tiny_study_fills_every_cell_of_its_tables(tiny_study):
    d = tiny_study["dir"]
    manifest = read_manifest(tiny_study["manifest"])
    results = storage.read_parquet(f"{d}/study.parquet").to_pandas()
    preds = storage.read_parquet(f"{d}/predictions.parquet").to_pandas()
    md = storage.read_text(f"{d}/study.md")
    summary = {r["row"]: r for r in json.loads(storage.read_text(f"{d}/summary.json"))["rows"]}
    assert storage.read_bytes(f"{d}/roc.png")[:4] == b"\x89PNG"
    assert "stage1: 4 trial(s), up to 2 at once" in tiny_study["log"]

    # The grid: every (row, fold, seed) once; each fold's test videos are that fold's, scored once per row.
    assert sorted(zip(results["row"], results["fold"], results["seed"])) == sorted(
        (r, f, 0) for r in ROWS for f in (0, 1)
    )
    for row in ROWS:
        p = preds[preds["row"] == row]
        assert sorted(p["video_id"]) == sorted(manifest["video_id"])
        for f in (0, 1):
            fold_ids = set(manifest.loc[manifest["fold"] == f, "video_id"])
            assert set(p.loc[p["fold"] == f, "video_id"]) == fold_ids
    # SimCLR of a cell saw its training videos only, never the held-out fold.
    for f in (0, 1):
        cell = read_manifest(f"{d}/cells/f{f}-s0/manifest.parquet")
        assert set(cell.loc[cell["split"] == "test", "fold"]) == {f}
        assert set(cell.loc[cell["split"] != "test", "fold"]) == {1 - f}
        assert set(cell.groupby("split")["label"].nunique()) == {2}
        pre = json.loads(storage.read_text(f"{d}/pretrain/f{f}-s0/metrics.json"))
        assert pre["videos"] == int((cell["split"] != "test").sum())
        assert storage.exists(f"{d}/pretrain/f{f}-s0/encoder.pt")
    trial = json.loads(storage.read_text(f"{d}/trials/clman-f0-s0.json"))
    assert trial["encoder"].endswith("pretrain/f0-s0/encoder.pt")
    assert json.loads(storage.read_text(f"{d}/trials/tsm_18-f0-s0.json"))["encoder"] is None

    # Every cell of Tables 2 and 4: the mean of the fold means with the corrected resampled t interval,
    # pooled with its patient-level bootstrap CI, the paper's numbers, and the paired test against CLMAN.
    for table in TABLES:
        cells = _table(md, table)
        rows = [r for r in table_rows(table) if r.name in ROWS]
        assert len(cells) == 3 * len(rows)
        for i, row in enumerate(rows):
            mean_line, pooled_line, paper_line = cells[3 * i : 3 * i + 3]
            assert mean_line[0] == row.title(table) and pooled_line[0] == "↳ pooled" and paper_line[0] == "↳ paper"
            runs = results[results["row"] == row.name]
            for j, (key, _) in enumerate(PAPER_COLUMNS, start=1):
                assert mean_line[j].rstrip(" †") == _cell(*_corrected_t(runs, key)), (row.name, key)
                assert paper_line[j] == _pct(row.paper_metrics[key])
            pooled = preds[preds["row"] == row.name].sort_values("video_id")
            scores, labels = pooled["score"].to_numpy(), pooled["label"].to_numpy()
            assert pooled_line[PAPER_COLUMNS.index(("auc", "AUC")) + 1].startswith(
                _pct(_auc_mann_whitney(scores, labels))
            )
            m = compute_metrics(scores, labels)
            ci = bootstrap_ci(scores, labels, n_boot=200, seed=0, groups=pooled["patient_id"].to_numpy())
            for j, (key, _) in enumerate(PAPER_COLUMNS, start=1):
                assert pooled_line[j] == _cell(m[key], *ci[key]), (row.name, key)
            p_cell = mean_line[-1]
            if row.name == REFERENCE:
                assert p_cell == "ref."
            else:
                # The p shown is the paired patient bootstrap (checked against a plain loop in
                # test_study_stats); the per-video DeLong is only an extra of summary.json, checked
                # here against an independent computation.
                ref = preds[preds["row"] == REFERENCE].sort_values("video_id")
                vs = summary[row.name]["vs_reference"]
                assert p_cell == ("<0.001" if vs["p_auc"] < 0.001 else f"{vs['p_auc']:.3f}"), (row.name, p_cell)
                assert vs["auc_diff"] == pytest.approx(
                    _auc_mann_whitney(scores, labels) - _auc_mann_whitney(ref["score"].to_numpy(), labels)
                )
                assert vs["auc_diff_ci95"][0] <= vs["auc_diff"] <= vs["auc_diff_ci95"][1]
                p = _delong_reference(scores, ref["score"].to_numpy(), labels)
                assert vs["p_auc_delong_per_video"] == pytest.approx(p, rel=1e-6), row.name
    # The patients of a fold are resampled together: 16 patients of 2 videos each.
    assert manifest.groupby("patient_id").size().eq(2).all()
    assert {"op_threshold", "op_sensitivity", "op_specificity"} <= set(results.columns)
    assert "Operating point chosen on the validation videos" in md
    assert " ".join(tiny_study["argv"]) in md and "- run time:" in md


@pytest.mark.slow
def test_resume_reruns_only_unfinished_trials_and_reproduces_them(tiny_study, tmp_path):
    d = tiny_study["dir"]
    # As if the study had been killed while a trial ran, before its Train run began (no checkpoint:
    # trained again from scratch, and it must give the same numbers).
    fresh = "tsm_18-f1-s0"
    before = {u: storage.read_bytes(u) for u in storage.list_uris(f"{d}/trials", suffix=".json")}
    encoders = {f: storage.read_bytes(f"{d}/pretrain/f{f}-s0/encoder.pt") for f in (0, 1)}
    results = storage.read_parquet(f"{d}/study.parquet").to_pandas()
    md = storage.read_text(f"{d}/study.md")
    storage.delete(f"{d}/trials/{fresh}.json")
    for uri in storage.list_uris(f"{d}/train/{fresh}"):
        storage.delete(uri)
    storage.delete(f"{d}/study.md")

    log_path = tmp_path / "resume.log"
    seconds = _run_cli(tiny_study["argv"] + ["--resume"], log_path)
    print(f"resumed study, one trial: {seconds:.0f} s")
    text = log_path.read_text()
    assert "3 of 4 trial(s) finished, kept; 0 SimCLR run(s) to do" in text
    assert "stage1: 1 trial(s)" in text and "stage2:" not in text, text[-3000:]
    for uri, data in before.items():  # finished trials untouched (a rerun would rewrite its seconds)
        if not uri.endswith(f"/{fresh}.json"):
            assert storage.read_bytes(uri) == data, uri
    for f, data in encoders.items():
        assert storage.read_bytes(f"{d}/pretrain/f{f}-s0/encoder.pt") == data

    # The trial trained anew gives the same numbers again: the same study.md tables.
    again = storage.read_parquet(f"{d}/study.parquet").to_pandas()
    metrics = [
        "row",
        "fold",
        "seed",
        *METRIC_NAMES,
        "op_threshold",
        "op_accuracy",
        "op_sensitivity",
        "op_specificity",
        "op_f1",
        "val_auc",
        "kept_epoch",
    ]
    pd.testing.assert_frame_equal(again[metrics], results[metrics])
    tables = lambda text: text.split("## ROC")[0]  # noqa: E731 (the run section holds the run time)
    assert tables(storage.read_text(f"{d}/study.md")) == tables(md)
    assert "resumed: 3 trial(s)" in storage.read_text(f"{d}/study.md")

    # Without --resume the same run name is refused, in one line, before Ray starts.
    log_path = tmp_path / "again.log"
    with open(log_path, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.study", *tiny_study["argv"]],
            env=_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert proc.returncode == 2 and "continue it with --resume" in log_path.read_text()
