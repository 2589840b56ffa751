"""The paper's Tables 1-4 on your manifest: every (row, fold, seed) a Ray Tune trial driving a Ray Train finetune.

    python -m jobs.study --manifest s3://bucket/data/manifest.parquet --out s3://bucket/studies \\
        --run-name cv5 --folds 5 --seeds 3 --config jobs/configs/paper.yaml
    python -m jobs.study ... --tables 2,4 --rows gn_nl,clman,tsm_18     # a few rows
    python -m jobs.study ... --resume                                   # after an interruption
    python -m jobs.study ... --label-fractions 0.1,0.25,0.5,1           # label efficiency: AUC vs labels

Rows (--rows takes these names): Table 1 vanilla, gn, nl, gn_nl (no pretraining); Table 2 gn_nl,
clman; Table 3 external_attention, self_attention, emsa, lstm, mean, max, clman (pretrained);
Table 4 r3d_18, timesformer, mc3_18, p3d, r2plus1d_18, tin_34, tin_50, tin_18, tsm_18 (from
scratch), clman. CLMAN is always trained: every row's AUC is tested against it.

SimCLR runs once per (fold, seed), on that fold's training videos only, and the pretrained rows
share it. Writes ``<out>/<run-name>/``: study.md (each table in the paper's layout: the mean of
the fold means (seeds averaged within a fold) with the corrected resampled t interval of Nadeau &
Bengio, pooled out-of-fold metrics with patient-level bootstrap CIs, the paper's numbers, the
paired patient-bootstrap p of the AUC difference to CLMAN, the operating point chosen on validation
videos), summary.json, study.parquet, predictions.parquet, roc.png, and every trial's files.
With --label-fractions also the label-efficiency curve (study.md, label_efficiency.png).
Layout and resume: clman/study/driver.py; the cost of a study: docs/studies.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from clman import cli, run_lock, tracking
from clman.study import driver as S

log = logging.getLogger("jobs.study")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", required=True, help="manifest.parquet written by jobs.ingest (path or s3:// URI)")
    p.add_argument("--out", required=True, help="storage root for studies (path or s3:// URI)")
    p.add_argument("--run-name", required=True, help="study folder under --out; with --resume, the study to continue")
    p.add_argument(
        "--tables",
        help="tables whose rows to train, e.g. 1,2 (default: 1,2,3,4 = 20 rows; "
        "Table 4 alone is 10 rows, most of the cost)",
    )
    p.add_argument("--rows", help="only these rows of those tables, e.g. gn_nl,clman,tsm_18 (default: all)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="K-fold cross-validation by patient on the manifest's fold column "
        "(jobs.ingest --folds K); 5 gives every video an out-of-fold score from "
        "models trained on 80%% of the patients",
    )
    how.add_argument(
        "--holdout",
        action="store_true",
        help="the manifest's fixed train/test split: the paper's protocol (one split, "
        "wide CIs: 107 test videos give an AUC CI about 0.1 wide)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="training seeds per fold (default: 1); 3 separates a row's seed noise from its fold noise, at 3x the cost",
    )
    p.add_argument(
        "--label-fractions",
        metavar="F,F,...",
        help="label efficiency: train CLMAN (with CL), gn_nl (without CL) and linear_probe (CL encoder "
        "frozen) on each share of the training patients, per class, nested (0.1 inside 0.25 ...), "
        "e.g. 0.1,0.25,0.5,1 (must include 1); SimCLR still runs once per (fold, seed). --rows "
        "picks among those three; at 10%% of a small fold a class has 1-2 patients: expect wide CIs",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted study (same arguments): finished trials and encoders are "
        "kept, an interrupted Train run continues from its last checkpoint",
    )
    cli.add_address_arg(p)
    cli.add_config_args(
        p,
        set_metavar="[ROW:]SECTION.KEY=VALUE",
        set_help="override a config field for every row (--set finetune.lr=3e-4) or one row "
        "(--set timesformer:model.tf_depth=4); keys that define the rows (model.arch, "
        "norm, nonlocal_stages, aggregator) and the seeds are refused; CLMAN-only model "
        "keys (model.width) belong in the preset, as baselines do not read them",
    )
    tracking.add_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    run_lock.check_run_name(args.run_name)
    track = tracking.parse_targets(args.track)
    command = "python -m jobs.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    run = S.plan_study(
        args.manifest,
        args.out,
        args.run_name,
        tables=args.tables,
        rows=args.rows,
        folds=args.folds,
        holdout=args.holdout,
        seeds=args.seeds,
        config=args.config,
        sets=args.overrides,
        command=command,
        label_fractions=args.label_fractions,
    )
    log.info(
        "study %s: %d row(s) x %d fold(s) x %d seed(s) x %d label fraction(s) = %d trial(s); %s",
        run.run_name,
        len(run.rows),
        len(run.plan.folds),
        run.seeds,
        len(run.label_fractions),
        len(run.grid),
        run.plan.describe(),
    )
    with run_lock.RunLock(args.out, run.run_name, "study"):  # a second study of this name is refused
        uris = S.run_study(run, args.address, resume=args.resume, track=track)
    print(f"study: {uris['study.md']} (also {', '.join(n for n in uris if n != 'study.md')})")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
