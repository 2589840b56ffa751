"""Label efficiency (issue 23 item 2): finetune.label_fraction's nested patient subsets, the linear probe's frozen
encoder, jobs.study --label-fractions' checks and grid, and the curve (study.md section, label_efficiency.png,
summary.json) from hand-made results. CPU, no Ray, local tmp paths.

No real study here: 2 folds x 1 seed x fractions 0.5, 1 x rows clman, linear_probe (8 trials + 2 SimCLR runs at
tests/test_study_job.py's tiny sizes, local paths) took 675 s on 2 cores, too long for this file; the curve's
inputs are made by hand instead, and jobs.study's Ray part is the same as for any study (test_study_job)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from clman import cli, storage
from clman import config as C
from clman import study
from clman.data.manifest import assign_splits, write_manifest
from clman.metrics import METRIC_NAMES, UndefinedMetricWarning, bootstrap_ci, compute_metrics, paired_bootstrap_auc
from clman.study import StudyError, curve
from clman.launch import trainer
from clman.train import finetune
from clman.study import driver as S
from clman.errors import JobError
from jobs import study as study_job
from tests.test_study import manifest_rows

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _manifest(n_patients=40, malignant_every=3, folds=2, seed=0) -> pd.DataFrame:
    """Patients with 1-3 videos each (so patient and video counts differ), every third malignant, in ``folds``."""
    rows = manifest_rows([1 + p % 3 for p in range(n_patients)], malignant_every)
    return assign_splits(rows, folds=folds, seed=seed)


def _patients(rows: pd.DataFrame) -> set[str]:
    return set(rows["patient_id"])


# ---------------------------------------------------------------- the subset


def test_subsets_are_nested_patient_level_and_stratified():
    train = _manifest()
    labels = train.groupby("patient_id")["label"].max()
    n = {y: int((labels == y).sum()) for y in (0, 1)}
    for seed in (0, 1, 2):
        subsets = [finetune.label_subset(train, f, seed)[0] for f in FRACTIONS]
        for f, rows in zip(FRACTIONS, subsets):
            kept = _patients(rows)
            # patient-level: every video of a kept patient, none of another
            assert sorted(rows["video_id"]) == sorted(train.loc[train["patient_id"].isin(kept), "video_id"])
            # stratified: ceil(f n) patients of each class, so both classes at any f > 0
            assert {y: int((labels[sorted(kept)] == y).sum()) for y in (0, 1)} == {
                y: math.ceil(f * n[y]) for y in (0, 1)
            }, (seed, f)
        for small, large in zip(subsets, subsets[1:]):
            assert _patients(small) < _patients(large), seed  # 10 % inside 25 % inside 50 % inside 100 %
        assert subsets[-1] is train  # 1: every patient, the rows as they came
    # the same seed and pool give the same subset whatever the order of the rows; another seed another one
    again = finetune.label_subset(train.sample(frac=1.0, random_state=5), 0.25, 0)[0]
    assert _patients(again) == _patients(finetune.label_subset(train, 0.25, 0)[0])
    draws = {frozenset(_patients(finetune.label_subset(train, 0.25, s)[0])) for s in range(4)}
    assert len(draws) == 4
    # not the validation carve's order: the subset's draw has its own stream beside the seed
    rows, info = finetune.label_subset(train, 0.5, 3)
    assert info["patients_per_label"] == [math.ceil(0.5 * n[0]), math.ceil(0.5 * n[1])]
    assert info["videos"] == len(rows) and "finetune.label_fraction=0.5" in info["note"]
    assert "\n" not in info["note"]


def test_a_class_or_batch_left_empty_fails_in_one_line():
    train = _manifest()
    benign = train[train["label"] == 0]
    with pytest.raises(
        JobError,
        match=r"^m.parquet: finetune.label_fraction=0.5 leaves a class out of training "
        r"\(\d+ benign \+ 0 malignant of \d+ \+ 0 training patients",
    ) as e:
        finetune.label_subset(benign, 0.5, 0, "m.parquet")
    assert "\n" not in str(e.value)
    with pytest.raises(
        JobError,
        match=r"videos: fewer than one batch \(64 videos\); raise finetune.label_fraction or "
        r"lower finetune.batch_size$",
    ):
        finetune.label_subset(train, 0.1, 0, "m.parquet", min_videos=64)
    cfg = C.load("finetune", None, ["finetune.batch_size=8", "scale.num_workers=3"])
    assert finetune.min_training_videos(cfg) == 6  # 3 workers x 2 clips: each worker fills its batch
    assert finetune.min_training_videos(C.load("finetune", None, ["finetune.batch_size=4"])) == 4


@pytest.mark.parametrize(
    "value, match",
    [
        ("0", r"finetune.label_fraction: must be in \(0, 1\] \(1 = every labelled training patient\), got 0.0"),
        ("1.5", r"finetune.label_fraction: must be in \(0, 1\]"),
        ("-0.25", r"finetune.label_fraction: must be in \(0, 1\]"),
        (".nan", r"finetune.label_fraction: must be a finite number"),
        ("half", r"finetune.label_fraction: expected a number"),
    ],
)
def test_bad_label_fraction_fails_naming_the_key(value, match):
    with pytest.raises(C.ConfigError, match=match) as e:
        C.load("finetune", None, [f"finetune.label_fraction={value}"])
    assert "\n" not in str(e.value)
    assert C.load("finetune", None, ["finetune.label_fraction=0.25"]).label_fraction == 0.25
    assert C.FinetuneConfig().label_fraction == 1.0


def test_train_job_never_ignores_a_label_fraction():
    cfg = C.load("finetune", None, ["finetune.label_fraction=0.5"])
    with pytest.raises(JobError, match="a sweep decodes its splits once .* jobs.study --label-fractions"):
        trainer.finetune_job(cfg, "m.parquet", None, has_val=True, sources={"train": None, "val": None})
    with pytest.raises(JobError, match="pass the training rows of finetune.label_subset"):
        trainer.finetune_job(cfg, "m.parquet", None, has_val=False)


# ---------------------------------------------------------------- the linear probe's frozen encoder


def test_linear_probe_freezes_the_encoder_weights_and_norm_statistics():
    from clman.models.build import classifier_from

    cfg = C.load(
        "finetune",
        None,
        [
            *study.ROWS[[r.name for r in study.ROWS].index("linear_probe")].sets,
            "model.width=0.125",
            "model.gn_groups=4",
            "model.norm=batch",
        ],
    )
    assert cfg.encoder_lr_scale == 0 and cfg.model.nonlocal_stages == (3, 4)
    torch.manual_seed(0)
    model = classifier_from(cfg.model)
    opt = finetune.make_optimizer(model, cfg)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in model.named_parameters() if not n.startswith("encoder.")}
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    finetune.hold_frozen_encoder(model, cfg)
    assert not model.encoder.training and model.aggregator.training
    clips = torch.rand(2, 2, 3, 32, 32)  # (B, T, 3, H, W)
    loss = torch.nn.functional.cross_entropy(model(clips, None), torch.tensor([0, 1]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running stats
    # a finetune that trains its encoder keeps it in train mode
    cfg_all = C.load("finetune", None, ["model.width=0.125", "model.gn_groups=4"])
    model.train()
    finetune.hold_frozen_encoder(model, cfg_all)
    assert model.encoder.training


# ---------------------------------------------------------------- --label-fractions: checks and grid


def test_parse_fractions():
    assert curve.parse_fractions("1, 0.5,0.1,0.25,0.5") == FRACTIONS
    assert curve.parse_fractions([1, 0.5]) == (0.5, 1.0)
    for text, match in [
        ("0.1,x,1", r"'x' is not a number in \(0, 1\]"),
        ("0,1", r"'0' is not a number in \(0, 1\]"),
        ("0.5,1.5", r"'1.5' is not a number"),
        ("nan,1", "'nan' is not a number"),
        ("", "no fraction given"),
        ("0.1,0.5", r"^--label-fractions 0.1,0.5: must include 1 "),
        ("0.1234561,0.1234562,1", "too close to tell apart"),
    ]:
        with pytest.raises(StudyError, match=match) as e:
            curve.parse_fractions(text)
        assert "\n" not in str(e.value)


def test_curve_rows_and_conflicting_rows_or_tables():
    names = lambda rows: [r.name for r in rows]  # noqa: E731
    assert names(curve.curve_rows()) == ["gn_nl", "linear_probe", "clman"]  # ROWS order
    assert names(curve.curve_rows("2", "gn_nl")) == ["gn_nl", "clman"]  # CLMAN: always (the reference)
    for tables, rows, match in [
        (
            "4",
            None,
            r"^--label-fractions: --tables 4 asks for other rows than the curve's \(Table 2: clman, gn_nl, "
            r"linear_probe\); drop --tables",
        ),
        ("2,4", None, "--tables 2,4 asks for other rows"),
        (
            None,
            "clman,tsm_18",
            r"^--label-fractions: row 'tsm_18' is not on the label-efficiency curve; its rows: "
            r"clman, gn_nl, linear_probe",
        ),
    ]:
        with pytest.raises(StudyError, match=match) as e:
            curve.curve_rows(tables, rows)
        assert "\n" not in str(e.value)


@pytest.fixture
def manifest_uri(tmp_path):
    uri = str(tmp_path / "data" / "manifest.parquet")
    write_manifest(_manifest(), uri)
    return uri


def _plan(manifest_uri, tmp_path, **kw):
    kw.setdefault("label_fractions", "0.1,0.25,0.5,1")
    return S.plan_study(manifest_uri, str(tmp_path / "studies"), "lf", folds=2, seeds=2, **kw)


def test_grid_of_a_label_fraction_study(manifest_uri, tmp_path):
    run = _plan(manifest_uri, tmp_path, sets=["finetune.batch_size=2"])
    assert run.fractions == FRACTIONS and run.tables == (2,)
    grid = run.grid
    assert len(grid) == 3 * 2 * 2 * 4 and len({t.id for t in grid}) == len(grid)
    assert [t.id for t in grid[:4]] == [
        "gn_nl-f0-s0-lf0.1",
        "linear_probe-f0-s0-lf0.1",
        "clman-f0-s0-lf0.1",
        "gn_nl-f0-s0-lf0.25",
    ]
    assert "clman-f1-s1" in {t.id for t in grid}  # fraction 1: the ids of a study without fractions
    assert study.pretrain_cells(grid) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # SimCLR once per (fold, seed)
    assert run.spec()["label_fractions"] == list(FRACTIONS) and run.spec()["tables"] == [2]
    t = next(t for t in grid if t.id == "linear_probe-f1-s1-lf0.25")
    assert study.trial_sets(t, run.sets)[-2:] == ["finetune.seed=1", "finetune.label_fraction=0.25"]
    cfg = run.finetune_config(t)
    assert (cfg.label_fraction, cfg.seed, cfg.encoder_lr_scale, cfg.batch_size) == (0.25, 1, 0.0, 2)
    assert run.finetune_config(next(t for t in grid if t.id == "clman-f1-s1")).label_fraction == 1.0
    assert run.finetune_config(next(t for t in grid if t.id == "clman-f1-s1")).encoder_lr_scale == 1.0
    # a study without --label-fractions: as before (no fraction in its spec, ids or --set lists)
    plain = S.plan_study(manifest_uri, str(tmp_path / "studies"), "plain", folds=2, seeds=1, tables="2")
    assert plain.fractions is None and "label_fractions" not in plain.spec()
    assert [t.id for t in plain.grid] == ["gn_nl-f0-s0", "clman-f0-s0", "gn_nl-f1-s0", "clman-f1-s0"]
    assert not any("label_fraction" in s for t in plain.grid for s in study.trial_sets(t, plain.sets))


def test_the_three_rows_of_a_cell_see_the_same_nested_labels(manifest_uri, tmp_path):
    run = _plan(manifest_uri, tmp_path, sets=["finetune.batch_size=2"])
    for fold, seed in run.cells:
        split = run.split(fold, seed)
        by_fraction = {}
        for t in (t for t in run.grid if (t.fold, t.seed) == (fold, seed)):
            rows, info = run.labelled(t, split.train)
            assert _patients(rows) <= _patients(split.train)
            assert not _patients(rows) & _patients(split.val)  # the carve first: validation never subsampled
            by_fraction.setdefault(t.fraction, set()).add(frozenset(_patients(rows)))
        assert all(len(v) == 1 for v in by_fraction.values()), (fold, seed)  # clman, gn_nl, linear_probe alike
        sets = [next(iter(by_fraction[f])) for f in FRACTIONS]
        assert all(a < b for a, b in zip(sets, sets[1:]))
        assert sets[-1] == _patients(split.train)
    # the seeds of a fold draw different subsets; the validation carve is the same at every fraction
    a = run.labelled(next(t for t in run.grid if t.id == "clman-f0-s0-lf0.25"), run.split(0, 0).train)[0]
    b = run.labelled(next(t for t in run.grid if t.id == "clman-f0-s1-lf0.25"), run.split(0, 1).train)[0]
    assert _patients(a) != _patients(b)


def test_bad_label_fraction_studies_fail_in_one_line_before_any_work(manifest_uri, tmp_path):
    out = tmp_path / "studies"
    cases = [
        (dict(label_fractions="0.1,0.5"), "must include 1"),
        (dict(label_fractions="0.1,1", tables="1,2"), "--tables 1,2 asks for other rows"),
        (dict(label_fractions="0.1,1", rows="clman,mean"), "row 'mean' is not on the label-efficiency curve"),
        # 10 % of a fold's training patients: 2 + 1 patients, too few videos for one batch of 8
        (
            dict(label_fractions="0.1,1", sets=["finetune.batch_size=8"]),
            r"trial gn_nl-f0-s0-lf0.1: finetune.label_fraction=0.1 leaves \d+ benign \+ \d+ malignant of \d+ \+ \d+ "
            r"training patients, \d of \d+ videos: fewer than one batch \(8 videos\); raise finetune.label_fraction",
        ),
        (
            dict(label_fractions="0.1,1", sets=["finetune.label_fraction=0.5"]),
            r"the study sets finetune.label_fraction itself \(from --label-fractions\)",
        ),
        (dict(sets=["clman:finetune.label_fraction=0.5"]), "the study sets finetune.label_fraction itself"),
        (
            dict(label_fractions="0.1,1", sets=["finetune.encoder_lr_scale=0.1"]),
            r"the study sets finetune.encoder_lr_scale itself \(it defines rows linear_probe\)",
        ),
    ]
    for kw, match in cases:
        with pytest.raises(StudyError, match=match) as e:
            S.plan_study(manifest_uri, str(out), "lf", folds=2, seeds=1, **kw)
        assert "\n" not in str(e.value)
    preset = tmp_path / "p.yaml"
    preset.write_text("finetune: {label_fraction: 0.5}\n")
    with pytest.raises(StudyError, match=r"p.yaml: finetune.label_fraction: the study sets it for every trial"):
        S.plan_study(manifest_uri, str(out), "lf", folds=2, seeds=1, config=str(preset))
    assert not out.exists()


def test_cli_flag_and_one_line_errors(manifest_uri, tmp_path, capsys):
    base = ["--manifest", manifest_uri, "--out", str(tmp_path / "studies"), "--run-name", "lf", "--folds", "2"]
    args = study_job.parse(base + ["--label-fractions", "0.1,0.25,0.5,1"])
    assert curve.parse_fractions(args.label_fractions) == FRACTIONS
    assert study_job.parse(base).label_fractions is None
    for extra, want in [
        (["--label-fractions", "0.1,2"], "'2' is not a number in (0, 1]"),
        (["--label-fractions", "0.5,1", "--tables", "4"], "--tables 4 asks for other rows"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.run_main(study_job.main, base + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith("error: ") and want in err, err
    assert not (tmp_path / "studies").exists()


# ---------------------------------------------------------------- the curve from hand-made results


def _hand_made_curve(seed=1):
    """Three rows x 2 fractions x 3 folds x 1 seed on 24 patients of 2 videos; CLMAN separates best, and every
    row better with more labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(24) % 2, 2)
    sep = {
        ("clman", 1.0): 0.5,
        ("gn_nl", 1.0): 0.3,
        ("linear_probe", 1.0): 0.35,
        ("clman", 0.25): 0.35,
        ("gn_nl", 0.25): 0.1,
        ("linear_probe", 0.25): 0.3,
    }
    preds, results = [], []
    for (row, f), d in sep.items():
        s = np.clip(0.3 + d * y + rng.normal(0, 0.15, len(y)), 0, 1)
        preds += [
            {
                "row": row,
                "fold": (i // 2) % 3,
                "seed": 0,
                "fraction": f,
                "video_id": f"v{i:02d}",
                "patient_id": f"p{i // 2:02d}",
                "label": int(y[i]),
                "score": float(s[i]),
            }
            for i in range(len(y))
        ]
        for fold in range(3):
            results.append(
                {
                    "row": row,
                    "fold": fold,
                    "seed": 0,
                    "fraction": f,
                    **{k: 0.5 for k in METRIC_NAMES},
                    "n_train": 32,
                    "n_test": 16,
                    "n_labelled": 24 if f == 1 else 6,
                }
            )
    return pd.DataFrame(results), pd.DataFrame(preds)


def _curve_table(md: str) -> list[list[str]]:
    section = md.split("## Label efficiency", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def test_curve_table_plot_and_paired_tests_from_hand_made_results(tmp_path):
    results, preds = _hand_made_curve()
    out = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        summary = study.write_study(
            out, results, preds, tables_shown=(2,), n_boot=200, seed=3, label_fractions=(0.25, 1.0)
        )
    md = storage.read_text(f"{out}/study.md")
    table = _curve_table(md)
    assert table[0] == [
        "Labelled share",
        "Labelled videos per run",
        "With CL (CLMAN): AUC",
        "Without CL: AUC",
        "Linear probe (CL encoder frozen): AUC",
        "CLMAN − Without CL",
        "p",
        "CLMAN − Linear probe (CL encoder frozen)",
        "p",
    ]
    body = table[1:]  # (the |---| rule is not a '| ' line)
    assert [r[0] for r in body] == ["0.25", "1"] and [r[1] for r in body] == ["6.0", "24.0"]
    for line, f in zip(body, (0.25, 1.0)):
        at = preds[preds["fraction"] == f]
        ref = at[at["row"] == "clman"].sort_values("video_id")
        y, groups = ref["label"].to_numpy(), ref["patient_id"].to_numpy()
        for j, row in enumerate(("clman", "gn_nl", "linear_probe"), start=2):
            s = at[at["row"] == row].sort_values("video_id")["score"].to_numpy()
            auc = compute_metrics(s, y)["auc"]
            lo, hi = bootstrap_ci(s, y, n_boot=200, seed=3, groups=groups)["auc"]
            assert line[j] == f"{100 * auc:.2f} ({100 * lo:.2f}–{100 * hi:.2f})", (f, row)
        for j, row in ((5, "gn_nl"), (7, "linear_probe")):
            s = at[at["row"] == row].sort_values("video_id")["score"].to_numpy()
            test = paired_bootstrap_auc(s, ref["score"].to_numpy(), y, groups=groups, n_boot=200, seed=3)
            want = f"ΔAUC {-100 * test.diff:+.2f} ({-100 * test.hi:+.2f}, {-100 * test.lo:+.2f})"
            assert line[j] == want, (f, row)
            assert line[j + 1] == ("<0.001" if test.p < 0.001 else f"{test.p:.3f}"), (f, row)
    assert "![AUC against the labelled share](label_efficiency.png)" in md
    png = storage.read_bytes(f"{out}/label_efficiency.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The paper's tables are the fraction-1 trials: Table 2 with its three rows, one run per fold each
    assert md.index("## Label efficiency") < md.index("## Table 2")
    assert set(summary) == {"gn_nl", "linear_probe", "clman"} and all(s.runs == 3 for s in summary.values())
    full = preds[preds["fraction"] == 1.0]
    pooled = full[full["row"] == "clman"].sort_values("video_id")
    assert summary["clman"].pooled["auc"] == pytest.approx(
        compute_metrics(pooled["score"].to_numpy(), pooled["label"].to_numpy())["auc"]
    )
    assert "| Linear probe (CL encoder frozen) |" in md
    # summary.json: the curve's points with their CIs and paired tests
    record = json.loads(storage.read_text(f"{out}/summary.json"))
    le = record["label_efficiency"]
    assert le["fractions"] == [0.25, 1.0] and le["rows"] == ["clman", "gn_nl", "linear_probe"]
    point = next(p for p in le["points"] if p["fraction"] == 0.25 and p["row"] == "gn_nl")
    at = preds[preds["fraction"] == 0.25]
    ref = at[at["row"] == "clman"].sort_values("video_id")
    gn = at[at["row"] == "gn_nl"].sort_values("video_id")
    test = paired_bootstrap_auc(
        gn["score"].to_numpy(),
        ref["score"].to_numpy(),
        ref["label"].to_numpy(),
        groups=ref["patient_id"].to_numpy(),
        n_boot=200,
        seed=3,
    )
    assert point["reference_minus_row"]["auc_diff"] == pytest.approx(-test.diff)
    assert point["reference_minus_row"]["auc_diff_ci95"] == pytest.approx([-test.hi, -test.lo])
    assert point["reference_minus_row"]["p_auc"] == pytest.approx(test.p) and point["labelled_videos_per_run"] == 6
    # study.parquet / predictions.parquet: a trial per (row, fold, seed, fraction)
    table = pd.read_parquet(f"{out}/study.parquet")
    assert len(table) == 18 and table[["row", "fold", "seed", "fraction"]].duplicated().sum() == 0
    assert table["row"].tolist()[:6] == ["gn_nl"] * 6 and table["fraction"].tolist()[:6] == [0.25] * 3 + [1.0] * 3
    assert len(pd.read_parquet(f"{out}/predictions.parquet")) == len(preds)
    # a trial twice at one fraction is still refused
    with pytest.raises(StudyError, match="appears twice"):
        study.outputs.results_table(pd.concat([results, results.iloc[:1]]))


def test_summarize_curve_reuses_the_study_statistics():
    results, preds = _hand_made_curve(seed=2)
    points = curve.summarize_curve(results, preds, n_boot=100, seed=0)
    assert list(points) == [0.25, 1.0]
    for f, summary in points.items():
        alone = study.summarize(results[results["fraction"] == f], preds[preds["fraction"] == f], n_boot=100, seed=0)
        for name in alone:
            assert summary[name].pooled == alone[name].pooled and summary[name].p_auc == alone[name].p_auc
        diff, (lo, hi), p = curve.versus_reference(summary["gn_nl"])
        assert diff == -alone["gn_nl"].auc_diff and (lo, hi) == (
            -alone["gn_nl"].auc_diff_ci[1],
            -alone["gn_nl"].auc_diff_ci[0],
        )
    with pytest.raises(StudyError, match="no trial at label fraction 0.5; present: 0.25, 1"):
        curve.summarize_curve(results, preds, fractions=(0.5, 1.0), n_boot=0)
    # a table without a fraction column is all at 1 (a study without --label-fractions)
    plain = results[results["fraction"] == 1.0].drop(columns="fraction")
    assert curve.at_fraction(plain, 1.0).shape[0] == 9 and curve.at_fraction(plain, 0.25).empty
