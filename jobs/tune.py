"""Ray Tune sweep of finetune or pretrain: every trial is a Ray Train run.

    python -m jobs.tune --job finetune --space tune_spaces/finetune_lr_depth.yaml --samples 16 \\
        --config jobs/configs/paper.yaml --manifest s3://bucket/data/manifest.parquet \\
        --out s3://bucket/sweeps --run-name lr-depth-v1

    python -m jobs.tune --resume lr-depth-v1 --out s3://bucket/sweeps   # after an interruption

Writes ``<out>/<run-name>/``: ``trials.parquet`` + ``trials.csv`` (a row per
trial: its values, best epoch, the six validation metrics there, status,
time), ``epochs.parquet`` (every trial's every epoch), ``best.yaml`` (a preset
with the best values, for ``jobs.finetune --config``), ``summary.md``,
``auc_vs_lr.png`` (``loss_vs_lr.png`` for pretrain), ``sweep.json`` (these
arguments) and Tune's state with each trial's Ray Train checkpoints. Search
spaces: ``tune_spaces/*.yaml``; their format is in ``clman/tune/space.py``.
"""

from __future__ import annotations

import argparse
import logging

from clman import cli, run_lock, tracking
from clman.tune import driver
from clman.tune import sweep as sweeps

log = logging.getLogger("jobs.tune")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="storage root for sweeps (path or s3:// URI)")
    p.add_argument(
        "--resume",
        metavar="RUN_NAME",
        help="continue the interrupted sweep <out>/RUN_NAME: finished trials are kept, "
        "unfinished ones continue from their last checkpoint; takes no other sweep flags",
    )
    p.add_argument(
        "--restart-errored",
        action="store_true",
        help="with --resume: run errored trials again from scratch (default: keep them as errors)",
    )
    p.add_argument("--job", choices=sweeps.JOBS, help="which job each trial runs")
    p.add_argument("--space", help="search-space YAML, e.g. tune_spaces/finetune_lr_depth.yaml")
    p.add_argument(
        "--samples",
        type=int,
        help="trials to sample (times the size of any 'grid' entries); ASHA needs a few "
        "per rung to prune: 8+ is a useful sweep",
    )
    p.add_argument(
        "--scheduler",
        choices=sweeps.SCHEDULERS,
        default="asha",
        help="asha: stop trials whose validation AUC (pretrain: loss) trails the others at "
        "each rung; fifo: run every trial to the end (default: asha)",
    )
    p.add_argument(
        "--search",
        choices=sweeps.SEARCHES,
        default="random",
        help="random sampling, or optuna (TPE, learns from finished trials; no 'grid') (default: random)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=1,
        help="ASHA: epochs every trial runs before it can be stopped; raise it when early "
        "epochs are noisy (default: 1)",
    )
    p.add_argument(
        "--reduction-factor", type=int, default=2, help="ASHA: keep the best 1/N of trials at each rung (default: 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the search (which values are sampled)")
    p.add_argument("--manifest", help="manifest.parquet written by jobs.ingest")
    p.add_argument("--encoder", help="finetune sweeps: encoder.pt from jobs.pretrain (default: from scratch)")
    p.add_argument("--split", default="train", help="pretrain sweeps: manifest split used (default: train)")
    cli.add_address_arg(p)
    p.add_argument("--run-name", help="sweep folder under --out (default: tune-<job>-<date>-<time>)")
    cli.add_config_args(p)
    tracking.add_args(p)
    args = p.parse_args(argv)
    if args.resume:
        given = (
            [
                f
                for f in ("job", "space", "samples", "manifest", "encoder", "config", "run_name")
                if getattr(args, f) is not None
            ]
            + (["set"] if args.overrides else [])
            + (["track"] if args.track else [])
        )
        if given:
            p.error(f"--resume takes the sweep's saved arguments; drop --{given[0].replace('_', '-')}")
    else:
        missing = [f for f in ("job", "space", "samples", "manifest") if getattr(args, f) is None]
        if missing:
            p.error(f"--{missing[0]} is required (or --resume RUN_NAME)")
        if args.restart_errored:
            p.error("--restart-errored goes with --resume")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    track = tracking.parse_targets(args.track)  # a resumed sweep tracks as its first start did
    if args.resume:
        sweep = sweeps.load_sweep(args.out, args.resume)
    else:
        sweep = sweeps.new_sweep(
            args.job,
            args.space,
            args.samples,
            args.manifest,
            args.out,
            args.run_name,
            args.config,
            args.overrides,
            scheduler=args.scheduler,
            search=args.search,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            seed=args.seed,
            encoder=args.encoder,
            split=args.split,
        )
    with run_lock.RunLock(args.out, sweep.run_name, "tune"):  # a second sweep of this name is refused
        uris = driver.run_sweep(
            sweep, args.address, resume=bool(args.resume), restart_errored=args.restart_errored, track=track
        )
    log.info("sweep %s done: %s", sweep.run_name, uris["summary.md"])
    return 0


if __name__ == "__main__":
    cli.run_main(main)
