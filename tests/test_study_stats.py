"""The study's statistics (issue 23): the fold-aware interval of the means over runs, the paired patient
bootstrap of an AUC difference, and summarize / study.md / summary.json end to end. CPU, no Ray, local tmp."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from clman import storage, study
from clman.metrics import (
    METRIC_NAMES,
    UndefinedMetricWarning,
    corrected_t_ci,
    delong_test,
    mean_ci,
    paired_bootstrap_auc,
)
from clman.study import stats
from clman.study.tables import fmt_p

# ---------------------------------------------------------------- the interval of the means over runs


def test_corrected_t_is_nadeau_bengio():
    m = np.array([0.80, 0.86, 0.83, 0.90, 0.78])  # K = 5 fold means
    half = sps.t.ppf(0.975, 4) * math.sqrt((1 / 5 + 1 / 4) * m.var(ddof=1))  # default n_test/n_train: 1/(K-1)
    assert corrected_t_ci(m) == pytest.approx((m.mean(), m.mean() - half, m.mean() + half), abs=1e-12)
    half = sps.t.ppf(0.975, 4) * math.sqrt((1 / 5 + 0.3) * m.var(ddof=1))
    assert corrected_t_ci(m, 0.3)[2] == pytest.approx(m.mean() + half, abs=1e-12)
    assert corrected_t_ci(m, 0.0)[1:] == pytest.approx(mean_ci(m)[1:], abs=1e-12)  # no overlap: the plain t
    one = corrected_t_ci([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError, match="test_train_ratio"):
        corrected_t_ci(m, -1.0)


def test_mean_over_runs_averages_the_seeds_of_a_fold_first():
    # fold 0 has one seed defined (the other NaN), folds 1 and 2 two: the mean is of the fold means
    v = [0.6, math.nan, 0.8, 0.9, 0.7, 0.7]
    f = [0, 0, 1, 1, 2, 2]
    mean, lo, hi = stats.mean_over_runs(v, f)
    fm = np.array([0.6, 0.85, 0.7])
    assert (mean, lo, hi) == pytest.approx(corrected_t_ci(fm, 1 / 2), abs=1e-12)
    assert mean != pytest.approx(np.nanmean(v))  # not the mean of the five runs
    # one fixed split (the holdout): the seeds' t-interval
    assert stats.mean_over_runs([0.7, 0.8, 0.9], [-1, -1, -1]) == pytest.approx(mean_ci([0.7, 0.8, 0.9]))
    # a design of 3 folds with the metric defined in one fold only: no interval
    one = stats.mean_over_runs([0.6, math.nan, math.nan], [0, 1, 2])
    assert one[0] == 0.6 and math.isnan(one[1])


def _coverage(rho: float, rng, studies=400, k=5, seeds=3, sd_fold=0.03, sd_seed=0.01, mu=0.85):
    """(naive, fold-aware) coverage of mu by the 95 % intervals over ``studies`` simulated K x seeds studies.

    A run's metric is mu + fold effect + seed noise. The seeds of a fold share its effect (its test
    set); the fold effects are correlated by ``rho`` (a common part: the folds' training sets overlap).
    """
    folds = np.repeat(np.arange(k), seeds)
    naive = new = 0
    for _ in range(studies):
        fold = math.sqrt(rho) * rng.normal(0, sd_fold) + math.sqrt(1 - rho) * rng.normal(0, sd_fold, k)  # (K,)
        v = mu + np.repeat(fold, seeds) + rng.normal(0, sd_seed, k * seeds)  # (K * seeds,)
        _, lo, hi = mean_ci(v)  # the old interval: every (fold, seed) run taken as independent
        naive += lo <= mu <= hi
        _, lo, hi = stats.mean_over_runs(v, folds)  # seeds averaged per fold, corrected t, n_test/n_train 1/4
        new += lo <= mu <= hi
    return naive / studies, new / studies


def test_fold_aware_interval_covers_the_true_mean():
    # 5 folds x 3 seeds, fold sd 0.03, seed sd 0.01, 400 studies each, one rng (seed 0). Measured:
    #   rho 0.2 (= n_test / (n_test + n_train) of 5-fold, Nadeau & Bengio's model of the overlap):
    #     naive 0.578, fold-aware 0.965   (20 000 studies: 0.549 and 0.953; plain t over fold means 0.863)
    #   rho 0 (folds independent; only the seeds share a fold's test set):
    #     naive 0.710, fold-aware 0.990   (20 000 studies: 0.713 and 0.985, conservative; plain fold t 0.949)
    rng = np.random.default_rng(0)
    for rho in (0.2, 0.0):
        naive, new = _coverage(rho, rng)
        print(f"rho {rho}: naive coverage {naive:.3f}, fold-aware {new:.3f}")
        assert new >= 0.90, (rho, new)
        assert naive <= 0.80 and new - naive >= 0.2, (rho, naive, new)


# ---------------------------------------------------------------- the paired patient bootstrap


def _loop_bootstrap(a, b, y, patients, n_boot, seed, alpha=0.05):
    """The paired patient bootstrap written plainly: draw patients (sorted ids, the library's draw),
    take each drawn patient's videos, both AUCs by scikit-learn on the same videos."""
    ids = sorted(set(patients))
    videos = {p: [i for i in range(len(y)) if patients[i] == p] for p in ids}
    rng = np.random.default_rng(seed)
    diffs, skipped = [], 0
    for _ in range(n_boot):
        drawn = rng.integers(0, len(ids), size=len(ids))
        idx = [i for d in drawn for i in videos[ids[d]]]
        yb = y[idx]
        if yb.min() == yb.max():
            skipped += 1
            continue
        diffs.append(roc_auc_score(yb, a[idx]) - roc_auc_score(yb, b[idx]))
    d = np.array(diffs)
    lo, hi = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2 * min((1 + np.sum(d <= 0)) / (len(d) + 1), (1 + np.sum(d >= 0)) / (len(d) + 1)))
    return roc_auc_score(y, a) - roc_auc_score(y, b), lo, hi, p, len(d), skipped


def _paired_case(seed, n_patients, tied=False):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)  # 1-3 videos a patient
    patients = np.repeat([f"p{i:02d}" for i in range(n_patients)], per)
    y = np.repeat(rng.integers(0, 2, n_patients), per)
    y[:2] = [0, 1]
    base = np.repeat(rng.normal(0, 0.15, n_patients), per)  # a patient's videos look alike
    a = np.clip(0.35 + 0.3 * y + base + rng.normal(0, 0.1, len(y)), 0, 1)
    b = np.clip(0.6 * a + 0.2 + 0.05 * y + rng.normal(0, 0.12, len(y)), 0, 1)  # correlated with a, weaker
    if tied:
        a, b = np.round(a, 1), np.round(b, 1)
    order = rng.permutation(len(y))  # a patient's videos not adjacent
    return a[order], b[order], y[order], patients[order]


@pytest.mark.parametrize("seed, n_patients, tied", [(0, 30, False), (1, 30, True), (2, 7, False)])
def test_paired_bootstrap_matches_a_plain_loop(seed, n_patients, tied):
    a, b, y, patients = _paired_case(seed, n_patients, tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # 7 patients: some one-class resamples
        got = paired_bootstrap_auc(a, b, y, groups=patients, n_boot=100, seed=seed + 10)
    diff, lo, hi, p, used, skipped = _loop_bootstrap(a, b, y, patients, 100, seed + 10)
    assert got.diff == pytest.approx(diff, abs=1e-12)
    assert (got.lo, got.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert got.p == pytest.approx(p, abs=1e-12)
    assert (got.resamples, got.skipped) == (used, skipped)
    if n_patients == 7:
        assert skipped > 0
    # deterministic from the seed; the same scores on both sides: no difference, p = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        assert paired_bootstrap_auc(a, b, y, groups=patients, n_boot=100, seed=seed + 10) == got
        same = paired_bootstrap_auc(a, a, y, groups=patients, n_boot=50, seed=0)
    assert (same.diff, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_by_patient_is_wider_than_per_video_delong():
    # 40 patients, three copies of each video: DeLong counts 120 independent videos, the bootstrap 40 patients
    rng = np.random.default_rng(5)
    y = np.repeat(rng.integers(0, 2, 40), 3)
    y[:6] = [0, 0, 0, 1, 1, 1]
    a = np.repeat(np.clip(rng.normal(0.4, 0.2, 40), 0, 1), 3)
    a = np.clip(a + 0.25 * y, 0, 1)
    b = np.clip(a + np.repeat(rng.normal(-0.05, 0.1, 40), 3) * y, 0, 1)
    patients = np.repeat([f"p{i}" for i in range(40)], 3)
    boot = paired_bootstrap_auc(b, a, y, groups=patients, n_boot=1000, seed=0)
    by_video = paired_bootstrap_auc(b, a, y, n_boot=1000, seed=0)  # cases resampled one by one
    assert boot.hi - boot.lo > 1.3 * (by_video.hi - by_video.lo)  # ~sqrt(3): the copies are no new evidence
    assert delong_test(b, a, y) < boot.p


# ---------------------------------------------------------------- summarize end to end


def _study_tables(folds=(0, 1, 2), seeds=(0, 1), sizes=True):
    """Results and predictions of clman and r3d_18: 24 patients x 2 videos, fold = patient % len(folds)."""
    rng = np.random.default_rng(4)
    y = np.repeat(rng.integers(0, 2, 24), 2)
    y[:4] = [0, 0, 1, 1]
    patient_fold = {f"p{i}": folds[i % len(folds)] for i in range(24)}
    preds = []
    for row, sep in (("clman", 0.4), ("r3d_18", 0.15)):
        for seed in seeds:
            s = np.clip(0.3 + sep * y + rng.normal(0, 0.15, len(y)), 0, 1)
            preds += [
                {
                    "row": row,
                    "fold": patient_fold[f"p{i // 2}"],
                    "seed": seed,
                    "video_id": f"v{i:02d}",
                    "patient_id": f"p{i // 2}",
                    "label": int(y[i]),
                    "score": float(s[i]),
                }
                for i in range(len(y))
            ]
    results = []
    for r in ("clman", "r3d_18"):
        for f in folds:
            for s in seeds:
                line = {"row": r, "fold": f, "seed": s, **{k: float(rng.uniform(0.6, 0.9)) for k in METRIC_NAMES}}
                if sizes:
                    line |= {"n_train": 32, "n_test": 16}
                results.append(line)
    results[1]["f1"] = math.nan  # clman, fold 0, seed 1: F1 undefined
    return pd.DataFrame(results), pd.DataFrame(preds)


def test_summarize_cells_paired_test_and_outputs(tmp_path):
    results, preds = _study_tables()
    out = str(tmp_path / "cv")
    summary = study.write_study(out, results, preds, n_boot=200, seed=7)
    cl, r3d = summary["clman"], summary["r3d_18"]

    # cells: seeds averaged per fold, the corrected t over the 3 fold means with n_test/n_train = 16/32
    assert (r3d.folds, r3d.seeds, r3d.interval, r3d.ratio_source) == (3, 2, "cv_corrected_t", "results")
    assert r3d.test_train_ratio == 0.5
    for name, s in summary.items():
        df = results[results["row"] == name]
        for k in METRIC_NAMES:
            fm = df.dropna(subset=[k]).groupby("fold")[k].mean().to_numpy()
            assert s.cells[k][:3] == pytest.approx(corrected_t_ci(fm, 0.5), abs=1e-12), (name, k)
    f1 = results[results["row"] == "clman"]["f1"]
    assert cl.cells["f1"][3] == 5 and cl.cells["f1"][0] != pytest.approx(f1.mean())

    # p_auc: the paired patient bootstrap (checked against a plain loop above) on the pooled scores, the mean
    # over seeds of each video, drawn from the summary's seed
    pool = lambda row: stats.pooled_scores(preds, row)  # noqa: E731
    a, b = pool("r3d_18"), pool("clman")
    assert (a["video_id"] == b["video_id"]).all() and (a["seeds"] == 2).all()
    y, pats = a["label"].to_numpy(), a["patient_id"].to_numpy()
    want = paired_bootstrap_auc(a["score"].to_numpy(), b["score"].to_numpy(), y, groups=pats, n_boot=200, seed=7)
    diff, lo, hi = want.diff, want.lo, want.hi
    assert (r3d.p_auc, r3d.auc_diff, r3d.auc_diff_ci, r3d.paired_resamples) == (want.p, diff, (lo, hi), 200)
    assert diff == pytest.approx(roc_auc_score(y, a["score"]) - roc_auc_score(y, b["score"]), abs=1e-12)
    delong = delong_test(a["score"].to_numpy(), b["score"].to_numpy(), y)
    assert r3d.p_auc_delong_per_video == pytest.approx(delong) and r3d.p_auc != pytest.approx(delong)
    assert (r3d.paired_videos, r3d.paired_patients) == (48, 24)
    assert cl.p_auc is None and cl.p_auc_delong_per_video is None

    # study.md: the bootstrap p in the table, ΔAUC on the pooled line, the interval said under the tables,
    # no DeLong anywhere
    md = storage.read_text(f"{out}/study.md")
    line = next(ln for ln in md.splitlines() if ln.startswith("| R3D |"))
    assert line.endswith(f"| {fmt_p(r3d.p_auc)} |")
    pooled = md.splitlines()[md.splitlines().index(line) + 1]
    assert pooled.startswith("| ↳ pooled |") and pooled.endswith(
        f"| ΔAUC {100 * diff:+.2f} ({100 * lo:+.2f}, {100 * hi:+.2f}) |"
    )
    assert (
        "Interval of the means (these tables and the operating point): the corrected resampled t of Nadeau & "
        "Bengio (2003) over the 3 fold means"
    ) in md
    assert "n_test/n_train = 0.500 (from the trials' n_test / n_train)" in md
    assert "DeLong" not in md and "seeds only" not in md

    # summary.json: every number, labelled; the DeLong p only as the labelled extra; NaN as null
    js = json.loads(storage.read_text(f"{out}/summary.json"))
    assert "summary.json" in study.OUTPUTS
    assert (js["n_boot"], js["seed"], js["reference"]) == (200, 7, "clman")
    rows = {r["row"]: r for r in js["rows"]}
    vs = rows["r3d_18"]["vs_reference"]
    assert vs["test"] == "paired patient bootstrap of the pooled AUC difference"
    assert vs["p_auc"] == pytest.approx(r3d.p_auc) and vs["p_auc_delong_per_video"] == pytest.approx(delong)
    assert vs["auc_diff_ci95"] == pytest.approx(list(r3d.auc_diff_ci)) and vs["paired_patients"] == 24
    assert "independent" in js["p_auc_delong_per_video"]
    assert rows["clman"]["vs_reference"] is None
    means = rows["r3d_18"]["means"]
    assert (means["interval"], means["ratio_source"], means["test_train_ratio"]) == ("cv_corrected_t", "results", 0.5)
    assert means["cells"]["auc"]["mean"] == pytest.approx(r3d.cells["auc"][0])
    assert rows["r3d_18"]["pooled"]["ci95_patient_bootstrap"]["auc"] == pytest.approx(list(r3d.pooled_ci["auc"]))

    # the same inputs and seed: the same numbers; without sizes, n_test/n_train is 1/(K-1) and said so
    again = study.summarize(results, preds, n_boot=200, seed=7)
    assert (again["r3d_18"].p_auc, again["r3d_18"].auc_diff_ci) == (r3d.p_auc, r3d.auc_diff_ci)
    bare, _ = _study_tables(sizes=False)
    s = study.summarize(bare)["r3d_18"]
    assert (s.test_train_ratio, s.ratio_source) == (0.5, "1/(K-1)")
    assert "1/(K−1), the K-fold value: the results carry no n_test / n_train" in stats.interval_note(s)


def test_holdout_interval_is_labelled_seeds_only(tmp_path):
    results, preds = _study_tables(folds=(study.HOLDOUT,), seeds=(0, 1, 2))
    out = str(tmp_path / "holdout")
    summary = study.write_study(out, results, preds, n_boot=100, seed=0)
    s = summary["r3d_18"]
    assert (s.folds, s.seeds, s.interval) == (1, 3, "seeds_t_one_split")
    v = results.loc[results["row"] == "r3d_18", "auc"]
    assert s.cells["auc"][:3] == pytest.approx(mean_ci(v))  # over the seeds: training noise only
    md = storage.read_text(f"{out}/study.md")
    assert "| Method (interval: seeds only, see below) |" in md
    assert (
        "one fixed test split, so the t-interval over the 3 seeds: the seed-to-seed variation of training "
        "only, not the sampling variability of the test set (for that, see ↳ pooled's patient-bootstrap CI)"
    ) in md
    js = json.loads(storage.read_text(f"{out}/summary.json"))
    means = next(r for r in js["rows"] if r["row"] == "r3d_18")["means"]
    assert means["interval"] == "seeds_t_one_split" and means["test_train_ratio"] is None
    assert "seed-to-seed variation of training only" in means["interval_note"]
    one = study.summarize(results[results["seed"] == 0])["r3d_18"]
    assert one.interval == "none" and math.isnan(one.cells["auc"][1])
