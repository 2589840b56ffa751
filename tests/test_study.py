"""The study core (clman.study): rows and tables, folds by patient, the DeLong test, the patient-level
bootstrap and study.md cells from hand-made results. CPU, no Ray, no S3 (local tmp paths)."""

from __future__ import annotations

import ast
import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clman import config as C
from clman import storage
from clman.data.manifest import assign_splits
from clman.metrics import (
    METRIC_NAMES,
    UndefinedMetricWarning,
    bootstrap_ci,
    bootstrap_indices,
    delong_covariance,
    delong_test,
    mean_ci,
    paired_bootstrap_auc,
)
from clman.evaluate.report import evaluate_scores
from clman import study
from clman.study import StudyError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- no Ray


def _clman_imports(path: Path) -> tuple[set[str], set[str]]:
    """(clman modules, other top-level packages) that a source file imports, anywhere in it."""
    mods, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            (mods if n.startswith("clman") else others).add(n if n.startswith("clman") else n.split(".")[0])
    return mods, others


def test_study_imports_no_ray_transitively():
    seen, todo = set(), ["clman.study", "clman.metrics", "clman.evaluate.report"]
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for cand in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
            if cand.exists() and cand not in seen:
                seen.add(cand)
                mods, others = _clman_imports(cand)
                assert "ray" not in others, f"{cand.relative_to(ROOT)} imports ray"
                todo += sorted(mods)
    assert ROOT / "clman/study/grid.py" in seen and ROOT / "clman/models/build.py" in seen


# ---------------------------------------------------------------- rows and tables


def test_tables_have_the_papers_rows():
    sizes = {t: len(study.table_rows(t)) for t in study.TABLES}
    # Table 2: the paper's 2 + the linear_probe ablation; Table 3: the paper's 7 + the mma_unbounded ablation
    assert sizes == {1: 4, 2: 3, 3: 8, 4: 10}
    assert len(study.ROWS) == 22  # 23 table lines, three rows shared: one trial each; + 2 ablation rows
    by = {r.name: r for r in study.ROWS}
    assert by["gn_nl"].tables == (1, 2) and by["clman"].tables == (2, 3, 4)
    assert [r.title(4) for r in study.table_rows(4)] == [
        "R3D",
        "TimeSformer",
        "MC3",
        "P3D",
        "R(2+1)D",
        "TIN Res34",
        "TIN Res50",
        "TIN Res18",
        "TSM",
        "CLMAN (ours)",
    ]
    assert {r.arch for r in study.table_rows(4)} == {
        "r3d_18",
        "timesformer",
        "mc3_18",
        "p3d",
        "r2plus1d_18",
        "tin_18",
        "tin_34",
        "tin_50",
        "tsm_18",
        "clman",
    }
    assert by["clman"].paper == (88.79, 92.78, 94.44, 85.92, 91.04, 92.64)
    assert by["vanilla"].paper_metrics["auc"] == pytest.approx(0.7175)
    assert by["tin_18"].paper == (85.24, 89.52, 82.50, 87.11, 87.52, 87.30)
    assert [r.pretrained for r in study.table_rows(1)] == [False] * 4
    assert all(r.pretrained for r in study.table_rows(3))
    assert not any(r.pretrained for r in study.table_rows(4) if r.name != "clman")


def test_row_overrides_build_the_intended_models():
    from clman.models.build import ignored_fields

    want = {  # name: (norm, nonlocal, aggregator)
        "vanilla": ("batch", (), "mma"),
        "gn": ("group", (), "mma"),
        "nl": ("batch", (3, 4), "mma"),
        "gn_nl": ("group", (3, 4), "mma"),
        "clman": ("group", (3, 4), "mma"),
        "external_attention": ("group", (3, 4), "external_attention"),
        "emsa": ("group", (3, 4), "emsa"),
        "self_attention": ("group", (3, 4), "self_attention"),
        "lstm": ("group", (3, 4), "lstm"),
        "mean": ("group", (3, 4), "mean"),
        "max": ("group", (3, 4), "max"),
        "mma_unbounded": ("group", (3, 4), "mma"),  # with model.mma_bound=none (tests/test_ablations.py)
        "linear_probe": ("group", (3, 4), "mma"),  # with finetune.encoder_lr_scale=0 (tests/test_label_fraction.py)
    }
    for r in study.ROWS:
        m = C.load("finetune", None, list(r.sets)).model
        if r.name in want:
            assert (m.arch, m.norm, m.nonlocal_stages, m.aggregator) == ("clman", *want[r.name]), r.name
        else:
            assert m.arch == r.name and ignored_fields(m) == [], r.name
    assert set(C.AGGREGATORS) == {C.load("finetune", None, list(r.sets)).model.aggregator for r in study.table_rows(3)}


def test_select_rows_by_table_and_name():
    names = lambda rows: [r.name for r in rows]  # noqa: E731
    assert names(study.select_rows("1")) == ["vanilla", "gn", "nl", "gn_nl", "clman"]  # CLMAN: the reference
    assert names(study.select_rows("1", reference=False)) == ["vanilla", "gn", "nl", "gn_nl"]
    assert names(study.select_rows([2, 1])) == ["vanilla", "gn", "nl", "gn_nl", "clman"]  # gn_nl once
    assert names(study.select_rows("4", "tsm_18,r3d_18")) == ["r3d_18", "tsm_18", "clman"]
    assert len(study.select_rows()) == 20
    assert study.parse_tables(" 4, 1,1 ") == (1, 4)


@pytest.mark.parametrize(
    "tables, names, match",
    [
        ("1,5", None, r"^--tables: unknown table '5'; valid: 1, 2, 3, 4$"),
        ("x", None, "unknown table 'x'"),
        ("", None, "no table given"),
        ("1", "gn,lstm", r"^--rows: unknown row 'lstm' for tables 1; valid: vanilla, gn, nl, gn_nl$"),
        (
            "3,4",
            "tsm",
            "valid: external_attention, self_attention, emsa, lstm, mean, max, mma_unbounded, r3d_18, .*tsm_18, clman$",
        ),
    ],
)
def test_bad_tables_and_rows_fail_in_one_line(tables, names, match):
    with pytest.raises(StudyError, match=match) as e:
        study.select_rows(tables, names)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- --set checks, grid


@pytest.mark.parametrize(
    "sets, match",
    [
        (
            ["model.width=0.25"],
            r"--set model.width=0.25: row r3d_18 \(model.arch=r3d_18\) does not read model.width; "
            r"scope it .*--set vanilla:model.width=0.25",
        ),
        (["r3d_18:model.gn_groups=8"], "--set r3d_18:model.gn_groups=8: row r3d_18 .* does not read model.gn_groups"),
        (["model.tf_depth=2"], "row vanilla .* does not read model.tf_depth.*--set timesformer:model.tf_depth=2"),
        (["model.aggregator=mean"], "the study sets model.aggregator itself"),
        (["model.arch=p3d"], "the study sets model.arch itself"),
        (["finetune.seed=1"], r"finetune.seed itself \(from --seeds\)"),
        (["clman:model.width=0.5"], "share one SimCLR run per"),
        (["clman:pretrain.epochs=3"], "share one SimCLR run per"),
        (["lstm:finetune.lr=0.1"], r"'lstm' is not a row of this study; rows: vanilla, .*clman"),
        (["finetune.lrr=1"], "unknown key 'lrr' in finetune"),
        (["finetune.lr"], "expected key=value"),
        (["timesformer:model.tf_heads=5"], "row timesformer: model.tf_heads: must divide tf_dim"),
    ],
)
def test_bad_sets_fail_in_one_line(sets, match):
    rows = study.select_rows("1,4")
    with pytest.raises(StudyError, match=match) as e:
        study.parse_sets(sets, rows)
    assert "\n" not in str(e.value)


def test_trial_and_pretrain_sets():
    rows = study.select_rows("2,4", "gn_nl,timesformer")
    sets = study.parse_sets(["finetune.lr=0.01", "timesformer:model.tf_depth=2", "gn_nl:model.gn_groups=8"], rows)
    grid = study.trials(rows, (0, 1), 2)
    assert len(grid) == 12 and len({t.id for t in grid}) == 12
    assert grid[0].id == "gn_nl-f0-s0" and study.Trial(rows[0], study.HOLDOUT, 3).id == "gn_nl-holdout-s3"
    assert study.pretrain_cells(grid) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert study.pretrain_cells([t for t in grid if not t.row.pretrained]) == []
    tf = next(t for t in grid if t.row.name == "timesformer" and t.seed == 1)
    tree = {"data": {"size": 64, "num_frames": 8}}
    assert study.trial_sets(tf, sets, tree) == [
        "finetune.lr=0.01",
        "model.arch=timesformer",
        "model.tf_depth=2",
        "model.tf_size=64",
        "model.tf_frames=8",
        "finetune.seed=1",
    ]
    cfg = C.load("finetune", None, study.trial_sets(tf, sets, tree))
    assert (cfg.model.tf_size, cfg.model.tf_frames, cfg.model.tf_depth, cfg.seed) == (64, 8, 2, 1)
    gn = C.load("finetune", None, study.trial_sets(grid[0], sets, tree))
    assert (gn.model.gn_groups, gn.model.tf_depth, gn.lr) == (8, 12, 0.01)
    pre = C.load("pretrain", None, study.pretrain_sets(1, sets, rows))
    assert (pre.model.norm, pre.model.nonlocal_stages, pre.seed) == ("group", (3, 4), 1)
    with pytest.raises(StudyError, match="--seeds must be >= 1"):
        study.trials(rows, (0,), 0)


# ---------------------------------------------------------------- folds


def manifest_rows(videos: list[int], malignant_every: int = 3) -> pd.DataFrame:
    """Manifest rows, not split yet (split "train", fold -1), of patients p000, p001, ...: patient p has
    ``videos[p]`` videos, and every ``malignant_every``-th patient, p000 first, is malignant. No files."""
    rows = []
    for p, n in enumerate(videos):
        for v in range(n):
            rows.append(
                {
                    "video_id": f"v{p:03d}-{v}",
                    "patient_id": f"p{p:03d}",
                    "label": int(p % malignant_every == 0),
                    "split": "train",
                    "fold": -1,
                    "uri": f"clips/v{p}-{v}.mp4",
                    "num_frames": 20,
                    "fps": 30.0,
                    "height": 64,
                    "width": 64,
                    "sha256": "0" * 64,
                    "source": "test",
                }
            )
    return pd.DataFrame(rows)


def _manifest(n_patients=30, videos_per_patient=2, malignant_every=3, folds=0, seed=0) -> pd.DataFrame:
    df = manifest_rows([videos_per_patient] * n_patients, malignant_every)
    return assign_splits(df, folds=folds, seed=seed) if folds else assign_splits(df, (0.6, 0.0, 0.4), seed=seed)


def test_folds_by_patient_stratified_with_validation_from_training_folds():
    m = _manifest(folds=5)
    plan = study.plan_folds(m, folds=5)
    assert plan.folds == (0, 1, 2, 3, 4) and not plan.holdout
    patient_label = m.groupby("patient_id")["label"].first()
    tested = []
    for fold in plan.folds:
        for seed in (0, 1):
            sp = plan.split(fold, seed)
            parts = {k: set(getattr(sp, k)["patient_id"]) for k in ("train", "val", "test")}
            assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
            assert parts["test"] == set(m.loc[m["fold"] == fold, "patient_id"])
            assert set(sp.val["fold"]) <= set(plan.folds) - {fold}  # validation from the training folds
            assert len(sp.train) + len(sp.val) + len(sp.test) == len(m)
            for k in ("train", "val", "test"):
                assert set(getattr(sp, k)["label"]) == {0, 1}, (fold, seed, k)
            # stratified: the carve takes ~20 % of each label's training patients
            train_pats = patient_label[list(parts["train"] | parts["val"])]
            val_pats = patient_label[list(parts["val"])]
            for y in (0, 1):
                assert abs((val_pats == y).sum() - 0.2 * (train_pats == y).sum()) <= 1
            assert sp.manifest()["split"].value_counts().to_dict() == {
                "train": len(sp.train),
                "test": len(sp.test),
                "val": len(sp.val),
            }
            assert set(sp.training_folds["video_id"]) == set(sp.train["video_id"]) | set(sp.val["video_id"])
            if seed == 0:
                tested += list(sp.test["video_id"])
        # deterministic from the seed; another seed, another carve
        assert plan.split(fold, 0).val["video_id"].tolist() == plan.split(fold, 0).val["video_id"].tolist()
        assert set(plan.split(fold, 0).val["patient_id"]) != set(plan.split(fold, 1).val["patient_id"])
    assert sorted(tested) == sorted(m["video_id"])  # out of fold: every video tested exactly once
    # the same carve as the finetune job's (clman.train.finetune.validation_split uses assign_splits too)
    sp = plan.split(2, 7)
    ref = assign_splits(pd.concat([sp.train, sp.val]).sort_values("video_id"), (0.8, 0.2, 0.0), seed=7)
    assert set(sp.val["patient_id"]) == set(ref.loc[ref["split"] == "val", "patient_id"])
    assert len(plan.split(0, 0, val_fraction=0).val) == 0


def test_fold_count_and_one_class_fold_fail_in_one_line():
    m = _manifest(folds=3)
    for k in (2, 4):
        with pytest.raises(StudyError, match=rf"--folds {k}: the manifest has 3 folds \[0, 1, 2\], not 0..{k - 1}"):
            study.plan_folds(m, folds=k)
    with pytest.raises(StudyError, match="no folds .*jobs.ingest --folds 3"):
        study.plan_folds(_manifest(), folds=3)
    bad = m.copy()
    bad.loc[bad["patient_id"] == "p000", "fold"] = -1
    with pytest.raises(StudyError, match="2 videos have no fold"):
        study.plan_folds(bad, folds=3)
    # fold 0 holds the benign patients only
    one = m.copy()
    one.loc[one["label"] == 0, "fold"] = 0
    one.loc[(one["label"] == 1), "fold"] = (
        one.loc[one["label"] == 1, "patient_id"].map(lambda p: 1 + int(p[1:]) % 2).astype("int8")
    )
    with pytest.raises(
        StudyError,
        match=r"fold 0 holds only benign videos \(40 benign \+ 0 malignant videos of 20 "
        r"patients\), so its AUC is undefined",
    ) as e:
        study.plan_folds(one, folds=3)
    assert "\n" not in str(e.value)
    with pytest.raises(StudyError, match="either --folds K or --holdout"):
        study.plan_folds(m)
    # a patient in two folds
    two = m.copy()
    two.loc[two["video_id"] == "v000-0", "fold"] = (two.loc[two["video_id"] == "v000-1", "fold"].iloc[0] + 1) % 3
    with pytest.raises(StudyError, match="patient 'p000' is in more than one fold"):
        study.plan_folds(two, folds=3)


def test_holdout_uses_the_fixed_split():
    m = _manifest()
    plan = study.plan_folds(m, holdout=True)
    assert plan.folds == (study.HOLDOUT,) and plan.holdout
    sp = plan.split(study.HOLDOUT, 0)
    assert set(sp.test["video_id"]) == set(m.loc[m["split"] == "test", "video_id"])
    assert set(sp.train["video_id"]) | set(sp.val["video_id"]) == set(m.loc[m["split"] == "train", "video_id"])
    assert len(sp.val) and "carved from the training folds" in sp.note
    with_val = _manifest()
    with_val = assign_splits(with_val, (0.5, 0.2, 0.3), seed=1)
    sp = study.plan_folds(with_val, holdout=True).split(study.HOLDOUT, 5)
    assert set(sp.val["video_id"]) == set(with_val.loc[with_val["split"] == "val", "video_id"])
    assert "the manifest's val split" in sp.note
    with pytest.raises(StudyError, match="--holdout needs a 'test' split.*use --folds"):
        study.plan_folds(_manifest(folds=3), holdout=True)
    with pytest.raises(StudyError, match="fold 1 is not in this study"):
        plan.split(1, 0)


# ---------------------------------------------------------------- DeLong


def _delong_reference(a, b, y):
    """DeLong et al. 1988 directly: placement values from every (positive, negative) pair, O(m n)."""

    def psi(x, z):
        return (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])

    comps = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        k = psi(pos, neg)  # (m, n)
        comps.append((k.mean(), k.mean(axis=1), k.mean(axis=0)))  # auc, V10 (m,), V01 (n,)
    m, n = int((y == 1).sum()), int((y == 0).sum())
    s10 = np.cov(np.stack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.stack([comps[0][2], comps[1][2]]))
    cov = s10 / m + s01 / n
    diff = comps[0][0] - comps[1][0]
    z = diff / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return np.array([comps[0][0], comps[1][0]]), cov, math.erfc(abs(z) / math.sqrt(2))


@pytest.mark.parametrize("seed", range(6))
def test_delong_matches_the_quadratic_formulation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(12, 120))
    y = rng.integers(0, 2, n)
    y[:4] = [0, 0, 1, 1]
    a = np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1)
    b = np.clip(0.6 * a + rng.normal(0.2 + 0.1 * y, 0.15), 0, 1)  # correlated with a
    if seed % 2:
        a, b = np.round(a, 1), np.round(b, 1)  # ties within and across classes
    aucs, cov, p = _delong_reference(a, b, y)
    fast_aucs, fast_cov = delong_covariance(np.stack([a, b]), y)
    assert fast_aucs == pytest.approx(aucs, abs=1e-12)
    assert fast_cov == pytest.approx(cov, abs=1e-12)
    assert delong_test(a, b, y) == pytest.approx(p, rel=1e-9, abs=1e-15)
    assert delong_test(b, a, y) == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_delong_known_case():
    # Worked by hand: AUC_a = 5/6, AUC_b = 2/3; V10_a = (1, 1, 1/2), V10_b = (1/2, 1, 1/2),
    # V01_a = (2/3, 1), V01_b = (1, 1/3): var(a - b) = (1/12)/3 + (1/2)/2 = 5/18, so z^2 = (1/36)/(5/18) = 1/10.
    y = np.array([1, 1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.1])
    b = np.array([0.3, 0.8, 0.7, 0.2, 0.75])
    aucs, cov = delong_covariance(np.stack([a, b]), y)
    assert [Fraction(x).limit_denominator(100) for x in aucs] == [Fraction(5, 6), Fraction(2, 3)]
    assert cov[0, 0] + cov[1, 1] - 2 * cov[0, 1] == pytest.approx(5 / 18)
    assert delong_test(a, b, y) == pytest.approx(math.erfc(1 / math.sqrt(20)), abs=1e-12)  # 0.75183
    assert delong_test(a, a, y) == 1.0
    assert delong_test(b, a, y) == delong_test(a, b, y)
    with pytest.raises(ValueError, match="at least 2 malignant and 2 benign"):
        delong_test(a[:4], b[:4], y[:4])


# ---------------------------------------------------------------- bootstrap by patient, t-intervals


def test_patient_bootstrap_resamples_whole_patients():
    groups = np.array(["c", "a", "b", "a", "c", "c", "d"])
    n_patients = 4
    for idx in bootstrap_indices(len(groups), 50, seed=3, groups=groups):
        drawn = groups[idx]
        for g in set(drawn):
            members = np.flatnonzero(groups == g)
            counts = [int((idx == i).sum()) for i in members]
            assert len(set(counts)) == 1 and counts[0] >= 1, (g, idx)  # all of a patient's videos, equally often
        # one draw per patient: the copies of each patient add up to the number of patients
        assert sum(int((idx == np.flatnonzero(groups == g)[0]).sum()) for g in set(groups)) == n_patients
    plain = list(bootstrap_indices(7, 5, seed=3))
    assert all(len(i) == 7 for i in plain)
    # the video-level draws are those of before (one integers(0, n, n) per resample): old CIs stay bit-identical
    assert plain[0].tolist() == np.random.default_rng(3).integers(0, 7, 7).tolist()


def test_patient_bootstrap_is_wider_when_videos_of_a_patient_agree():
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 2, 40), 2)  # 40 patients, two identical videos each
    labels[:4] = [0, 0, 1, 1]
    scores = np.repeat(np.clip(rng.normal(0.4, 0.2, 40), 0, 1), 2) + 0.2 * labels
    scores = np.clip(scores, 0, 1)
    patients = np.repeat([f"p{i}" for i in range(40)], 2)
    by_video = bootstrap_ci(scores, labels, n_boot=300, seed=1)
    by_patient = bootstrap_ci(scores, labels, n_boot=300, seed=1, groups=patients)
    width = lambda ci: ci["auc"][1] - ci["auc"][0]  # noqa: E731
    assert width(by_patient) > 1.2 * width(by_video)  # ~sqrt(2): the copies are no new evidence
    out = evaluate_scores(scores, labels, n_boot=300, seed=1, patients=patients)
    assert out["bootstrap_unit"] == "patient"
    assert out["ci95"]["auc"] == list(by_patient["auc"])
    assert evaluate_scores(scores, labels, n_boot=300, seed=1)["ci95"]["auc"] == list(by_video["auc"])
    with pytest.raises(ValueError, match="one id per case"):
        bootstrap_ci(scores, labels, n_boot=5, groups=patients[:-1])


def test_mean_ci_is_the_t_interval():
    mean, lo, hi = mean_ci([0.7, 0.8, 0.9])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) sd / sqrt(n)
    assert (mean, lo, hi) == pytest.approx((0.8, 0.8 - half, 0.8 + half), abs=1e-9)
    assert mean_ci([0.5, 0.5]) == (0.5, 0.5, 0.5)
    m1 = mean_ci([0.3])
    assert m1[0] == 0.3 and math.isnan(m1[1]) and math.isnan(m1[2])
    assert all(math.isnan(v) for v in mean_ci([]))
    with pytest.raises(ValueError, match="finite"):
        mean_ci([0.1, float("nan")])


# ---------------------------------------------------------------- study.md, parquet, png


def _hand_made():
    """Results of gn and CLMAN on 3 folds x 1 seed, and pooled predictions on the DeLong known case."""
    gn = {
        "accuracy": [0.6, 0.6, 0.6],
        "ap": [0.5, 0.6, 0.7],
        "sensitivity": [1.0, 1.0, 1.0],
        "specificity": [0.0, 0.5, 1.0],
        "f1": [0.75, 0.8, 0.85],
        "auc": [0.7, 0.8, 0.9],
    }
    cl = {
        "accuracy": [0.9, 0.9, 0.9],
        "ap": [0.9, 0.9, 0.9],
        "sensitivity": [0.9, 0.9, 0.9],
        "specificity": [0.9, 0.9, 0.9],
        "f1": [0.8, float("nan"), 0.9],
        "auc": [0.9, 0.9, 0.9],
    }
    results = [
        {"row": row, "fold": f, "seed": 0, **{k: v[f] for k, v in vals.items()}, "val_auc": 0.5}
        for row, vals in (("clman", cl), ("gn", gn))
        for f in range(3)
    ]
    y = [1, 1, 1, 0, 0]
    fold = [0, 1, 2, 0, 1]
    scores = {"clman": [0.9, 0.6, 0.4, 0.5, 0.1], "gn": [0.3, 0.8, 0.7, 0.2, 0.75]}
    predictions = pd.DataFrame(
        [
            {
                "row": row,
                "fold": fold[i],
                "seed": 0,
                "video_id": f"v{i}",
                "patient_id": f"p{i}",
                "label": y[i],
                "score": s[i],
            }
            for row, s in scores.items()
            for i in range(5)
        ]
    )
    return results, predictions


def test_study_md_cells_from_hand_made_results(tmp_path):
    results, predictions = _hand_made()
    out = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        summary = study.write_study(
            out,
            results,
            predictions,
            protocol="3 folds",
            command="python -m jobs.study ...",
            config={"model": {"width": 0.25}},
            run_time_s=125.4,
            n_boot=0,
        )
    md = storage.read_text(f"{out}/study.md")
    lines = md.splitlines()
    # gn is a Table 1 row; CLMAN, the reference, is in no shown table: "Other rows"
    assert "## Table 1 — encoder ablation (multi-meta attention, no contrastive pretraining)" in lines
    assert not any(line.startswith("## Table 2") for line in lines)
    # 3 folds x 1 seed: the corrected resampled t, m +- t(0.975, 2) sqrt((1/3 + 1/2) s^2), n_test/n_train = 1/(K-1);
    # AP 0.5 0.6 0.7: s = 0.1, half 4.3027 * 0.91287 * 0.1 = 0.39278. n_boot=0: no bootstrap, so p is n/a
    i = lines.index(
        "| ResNet18 + GN | 60.00 (60.00–60.00) | 60.00 (20.72–99.28) | 100.00 (100.00–100.00) | "
        "50.00 (0.00–100.00) | 80.00 (60.36–99.64) | 80.00 (40.72–100.00) | n/a |"
    )
    # pooled, by hand: calls 0.3 0.8 0.7 0.2 0.75 >= 0.5 on labels 1 1 1 0 0; AP = (1 + 2/3 + 3/4) / 3;
    # ΔAUC: 2/3 - 5/6 (the DeLong known case's AUCs)
    assert lines[i + 1] == "| ↳ pooled | 60.00 | 80.56 | 66.67 | 50.00 | 66.67 | 66.67 | ΔAUC -16.67 |"
    assert lines[i + 2] == "| ↳ paper | 74.77 | 77.01 | 74.29 | 75.00 | 80.00 | 74.93 | |"
    assert "## Other rows" in lines
    cells = (
        "| 90.00 (90.00–90.00) | 90.00 (90.00–90.00) | 90.00 (90.00–90.00) | 90.00 (90.00–90.00) | "
        "85.00 (0.00–100.00) † | 90.00 (90.00–90.00) | ref. |"
    )  # F1 undefined in one fold: the mean of two
    j = lines.index("| CLMAN (ours) " + cells)
    assert lines[j + 1] == "| ↳ pooled | 60.00 | 91.67 | 66.67 | 50.00 | 66.67 | 83.33 | |"
    assert lines[j + 2] == "| ↳ paper | 88.79 | 92.78 | 94.44 | 85.92 | 91.04 | 92.64 | |"
    assert "† undefined in some runs: the mean of the runs where it is defined (seeds within a fold first)." in lines
    assert "- run time: 2 min 05 s (125 s)" in lines and "python -m jobs.study ..." in lines
    assert "  width: 0.25" in lines and "3 folds" in lines
    assert "Interval of the means (these tables and the operating point): the corrected resampled t" in md
    assert math.isnan(summary["gn"].p_auc) and summary["gn"].auc_diff == pytest.approx(-1 / 6)
    assert summary["gn"].p_auc_delong_per_video == pytest.approx(math.erfc(1 / math.sqrt(20)))  # the extra
    # study.parquet: one line per trial, every metric and the extra columns, paper order (gn before clman)
    table = pd.read_parquet(f"{out}/study.parquet")
    assert table["row"].tolist() == ["gn"] * 3 + ["clman"] * 3
    assert set(table.columns) == {"row", "fold", "seed", *METRIC_NAMES, "val_auc"}
    assert table.loc[table["row"] == "gn", "auc"].tolist() == [0.7, 0.8, 0.9]
    preds = pd.read_parquet(f"{out}/predictions.parquet")
    gn_scores = preds[preds["row"] == "gn"].set_index("video_id")["score"].sort_index()
    assert len(preds) == 10 and gn_scores.tolist() == [0.3, 0.8, 0.7, 0.2, 0.75]
    assert storage.read_bytes(f"{out}/roc.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # the shown tables can be chosen: Table 2 holds CLMAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        study.write_study(out, results, predictions, tables_shown=(1, 2), n_boot=0)
    lines = storage.read_text(f"{out}/study.md").splitlines()
    assert "| With CL (ours) " + cells in lines and "## Other rows" not in lines


def test_pooled_ci_by_patient_and_reproducible(tmp_path):
    rng = np.random.default_rng(4)
    y = np.repeat(rng.integers(0, 2, 24), 2)
    y[:4] = [0, 0, 1, 1]
    preds = []
    for row, sep in (("clman", 0.4), ("r3d_18", 0.1)):
        for seed in (0, 1):
            s = np.clip(0.3 + sep * y + rng.normal(0, 0.15, len(y)), 0, 1)
            preds += [
                {
                    "row": row,
                    "fold": i % 3,
                    "seed": seed,
                    "video_id": f"v{i}",
                    "patient_id": f"p{i // 2}",
                    "label": int(y[i]),
                    "score": float(s[i]),
                }
                for i in range(len(y))
            ]
    preds = pd.DataFrame(preds)
    results = [
        {
            "row": r,
            "fold": f,
            "seed": s,
            **{k: 0.5 for k in METRIC_NAMES},
            "op_threshold": 0.4,
            "op_accuracy": 0.5,
            "op_sensitivity": 0.9,
            "op_specificity": 0.2,
            "op_f1": 0.6,
        }
        for r in ("clman", "r3d_18")
        for f in range(3)
        for s in (0, 1)
    ]
    a = study.write_study(str(tmp_path / "a"), results, preds, n_boot=200, seed=3)
    study.write_study(str(tmp_path / "b"), results, preds, n_boot=200, seed=3)
    md = storage.read_text(str(tmp_path / "a/study.md"))
    assert md == storage.read_text(str(tmp_path / "b/study.md"))  # same inputs, same seed: same numbers
    pooled = study.stats.pooled_scores(preds, "clman")
    assert len(pooled) == 48 and (pooled["seeds"] == 2).all()  # one score per video: the mean over seeds
    want = bootstrap_ci(
        pooled["score"].to_numpy(),
        pooled["label"].to_numpy(),
        n_boot=200,
        seed=3,
        groups=pooled["patient_id"].to_numpy(),
    )
    assert a["clman"].pooled_ci == want and a["clman"].videos == 48 and a["clman"].patients == 24
    ref = preds[preds["row"] == "clman"].groupby("video_id")["score"].mean()
    other = preds[preds["row"] == "r3d_18"].groupby("video_id")["score"].mean()
    labels = preds.groupby("video_id")["label"].first()
    assert a["r3d_18"].p_auc_delong_per_video == pytest.approx(
        delong_test(other.to_numpy(), ref.to_numpy(), labels.to_numpy())
    )
    patients = preds.groupby("video_id")["patient_id"].first().to_numpy()
    boot = paired_bootstrap_auc(
        other.to_numpy(), ref.to_numpy(), labels.to_numpy(), groups=patients, n_boot=200, seed=3
    )
    assert a["r3d_18"].p_auc == boot.p and a["r3d_18"].auc_diff_ci == (boot.lo, boot.hi)
    assert "## Table 4 — other video classifiers (from scratch) and CLMAN" in md
    assert "| R3D | 50.00 (50.00–50.00) |" in md
    assert "| CLMAN (ours) | 0.400 (0.400–0.400) | 50.00 (50.00–50.00) | 90.00 (90.00–90.00) |" in md  # op point
    assert list(study.roc_curves(a, preds)) == ["R3D", "CLMAN (ours)"]


def test_bad_tables_of_results_fail_in_one_line():
    results, predictions = _hand_made()
    with pytest.raises(StudyError, match="results: trial \\(row gn, fold 0, seed 0\\) appears twice"):
        study.summarize(results + results[3:4], predictions)
    with pytest.raises(StudyError, match="results: unknown row 'gm'"):
        study.summarize([{**results[0], "row": "gm"}])
    with pytest.raises(StudyError, match="results: missing columns \\['auc'\\]"):
        study.summarize([{k: v for k, v in r.items() if k != "auc"} for r in results])
    dup = pd.concat([predictions, predictions.iloc[:1].assign(fold=2)])
    with pytest.raises(StudyError, match="video 'v0' is scored twice for row clman, seed 0"):
        study.summarize(results, dup)


def test_trial_metrics_with_a_validation_operating_point():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.9])
    out = study.trial_metrics(s, y)
    assert set(out) == set(METRIC_NAMES) and out["accuracy"] == pytest.approx(4 / 6)
    out = study.trial_metrics(
        s, y, val_scores=np.array([0.2, 0.5, 0.35, 0.8]), val_labels=np.array([0, 0, 1, 1]), target_sensitivity=1.0
    )
    assert out["op_threshold"] == 0.35  # the highest threshold that calls every malignant val video
    assert out["op_sensitivity"] == 1.0 and out["op_specificity"] == pytest.approx(2 / 3)  # 0.1, 0.3 < 0.35 <= 0.6
