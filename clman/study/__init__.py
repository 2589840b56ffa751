"""The paper's Tables 1-4 as a study on any manifest: the Ray-free core that ``jobs.study`` drives.

The driver (Tune grid, Ray Train runs) calls, in order::

    from clman import config as C
    from clman.data.manifest import read_manifest
    from clman import study

    rows = study.select_rows(tables="1,2,3,4", names=None)      # Row objects; CLMAN always in (the reference)
    tree = C.load_tree(preset)                                   # the preset alone, for the checks
    sets = study.parse_sets(user_sets, rows, model=tree.get("model"))  # "k=v" or "row:k=v"; one-line errors
    tree = C.load_tree(preset, sets.common)                      # the shared config, resolved
    plan = study.plan_folds(read_manifest(uri), folds=K)         # or holdout=True; checks K folds, no one-class fold
    grid = study.trials(rows, plan.folds, seeds=N)               # [Trial(row, fold, seed)], trial.id = "clman-f0-s0"

    for fold, seed in study.pretrain_cells(grid):                # one SimCLR run per (fold, seed)
        split = plan.split(fold, seed, val_fraction)             # val_fraction: finetune.val_fraction
        # pretrain on split.pretraining_pool (train + val + unlabelled) with study.pretrain_sets(seed, sets, rows)
    for t in grid:                                               # one Tune trial each
        split = plan.split(t.fold, t.seed, val_fraction)         # Split: .train .val .test DataFrames, .note
        # write split.manifest() (split column train/val/test) and finetune it with
        # C.load("finetune", preset, study.trial_sets(t, sets, tree)), the encoder of (t.fold, t.seed)
        # when t.row.pretrained; score split.val and split.test, then one results line:
        line = {"row": t.row.name, "fold": t.fold, "seed": t.seed,
                **study.trial_metrics(test_scores, test_labels, val_scores=..., val_labels=...)}
        # and one predictions line per test video: row, fold, seed, video_id, patient_id, label, score

    study.write_study(out_dir, results, predictions, tables_shown=study.parse_tables("1,2,3,4"),
                      protocol=plan.describe(), command=..., config=tree, run_time_s=...,
                      n_boot=evaluate.bootstrap, seed=evaluate.seed)
    # -> study.md, summary.json, study.parquet, predictions.parquet, roc.png under out_dir

``results`` and ``predictions`` are plain tables (pandas DataFrames, lists of dicts or Arrow
tables), so a resumed study rebuilds them from its finished trials and rewrites everything.
Every input problem is a :class:`StudyError` (a ``clman.config.ConfigError``, so ``clman.cli``
prints it as one line); select_rows, parse_sets and plan_folds make every check a study needs
before its first trial starts.
The fold of ``--holdout`` trials is ``HOLDOUT`` (-1). Nothing here imports Ray.

A label-efficiency study (``jobs.study --label-fractions``): ``curve.curve_rows`` and
``curve.parse_fractions`` instead of select_rows, ``trials(rows, folds, seeds, fractions)`` (a
trial's ``fraction`` is its ``finetune.label_fraction``, set by ``trial_sets``), a ``fraction``
field in every results and predictions line, and ``write_study(..., label_fractions=...)``.
"""

from clman.study import curve
from clman.study.folds import HOLDOUT, FoldPlan, Split, carve_validation, plan_folds
from clman.study.grid import StudySets, Trial, parse_sets, pretrain_cells, pretrain_sets, trial_sets, trials
from clman.study.outputs import OUTPUTS, predictions_table, results_table, roc_curves, write_study
from clman.study.rows import REFERENCE, ROWS, TABLES, Row, StudyError, parse_tables, select_rows, table_rows
from clman.study.stats import OP_COLUMNS, PREDICTION_COLUMNS, RowSummary, summarize, trial_metrics

__all__ = [
    "HOLDOUT",
    "OP_COLUMNS",
    "OUTPUTS",
    "PREDICTION_COLUMNS",
    "REFERENCE",
    "ROWS",
    "TABLES",
    "FoldPlan",
    "Row",
    "RowSummary",
    "Split",
    "StudyError",
    "StudySets",
    "Trial",
    "carve_validation",
    "curve",
    "parse_sets",
    "parse_tables",
    "plan_folds",
    "predictions_table",
    "pretrain_cells",
    "pretrain_sets",
    "results_table",
    "roc_curves",
    "select_rows",
    "summarize",
    "table_rows",
    "trial_metrics",
    "trial_sets",
    "trials",
    "write_study",
]
