"""SimCLR pretraining of the CLMAN frame encoder on Ray Train.

    python -m jobs.pretrain --config jobs/configs/paper.yaml \\
        --manifest s3://bucket/data/manifest.parquet --out s3://bucket/runs --run-name pretrain-v1

SimCLR needs no label: by default it reads every split of the manifest but test (train, val
and the ``unlabeled`` pool of ``jobs.ingest --unlabeled`` / empty labels, where present);
``--splits train,unlabeled`` names them instead. More unlabelled sweeps is the case contrastive
pretraining is for; keep the test split out, or its videos are no longer unseen.

Writes ``<out>/<run-name>/``: Ray checkpoints, ``encoder.pt`` (the last
checkpoint, the input of ``jobs.finetune --encoder``), ``config.yaml`` and
``metrics.json`` (the splits read, the last epoch's loss against chance ln(2N - 1), every
epoch's loss as ``loss_curve``, and whether it levelled off: ``convergence``). Rerunning with
the same ``--run-name`` continues the run, with the first start's config, manifest and splits (``run.json``; ``--force-resume`` otherwise); while
a job runs, a second one with its name is refused (``.lock``, ``clman/run_lock.py``).
"""

from __future__ import annotations

import argparse
import logging
import time

from clman import cli, run_lock, storage, tracking
from clman import config as C
from clman.evaluate import report
from clman.launch import resources, session, trainer
from clman.train import pretrain

log = logging.getLogger("jobs.pretrain")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", required=True, help="manifest.parquet written by jobs.ingest (path or s3:// URI)")
    p.add_argument("--out", required=True, help="storage root for runs (path or s3:// URI)")
    p.add_argument(
        "--splits",
        help="comma list of manifest splits whose frames are used, e.g. train,unlabeled "
        "(default: every split but test); each named split must hold videos",
    )
    p.add_argument("--split", dest="legacy_split", help=argparse.SUPPRESS)  # deprecated: one split, --splits
    cli.add_config_args(p)
    cli.add_scale_args(p)
    tracking.add_args(p)
    return p.parse_args(argv)


def run(
    cfg: C.PretrainConfig,
    manifest: str,
    out: str,
    run_name: str,
    splits=None,
    address: str | None = None,
    force_resume: bool = False,
    track=(),
    experiment: str = "pretrain",
) -> dict:
    """Pretrain; returns {"encoder": URI, "metrics": last epoch's metrics, "splits": the splits read}.

    ``splits``: a comma list or sequence of manifest splits; None = every split but test. The run's
    lock is held from before Ray starts to the end; a resume must have the first start's config,
    manifest and splits unless ``force_resume`` (``clman.run_lock``). ``track``: ``clman.tracking.Target``s
    that get the config and every epoch's metrics, in MLflow experiment / TensorBoard folder ``experiment``.
    """
    run_lock.check_run_name(run_name)
    rows = pretrain.check_data(manifest, splits)
    splits = pretrain.splits_of(rows)  # the default resolved: what this manifest holds
    record = run_lock.fingerprint("pretrain", cfg, manifest, splits=",".join(splits))
    with trainer.claim(out, run_name, record, force_resume):
        return _run(cfg, manifest, out, run_name, splits, address, rows, track, experiment)


def _run(cfg, manifest, out, run_name, splits, address, rows, track=(), experiment="pretrain") -> dict:
    session.init_ray(address)
    resources.check_resources(cfg.scale, cfg.data)
    run_dir = storage.join(out, run_name)
    storage.write_text(storage.join(run_dir, "config.yaml"), C.to_yaml(cfg))
    job = trainer.pretrain_job(cfg, manifest, list(splits), len(rows))
    per_split = ", ".join(f"{int((rows['split'] == s).sum())} {s}" for s in splits)
    log.info(
        "pretrain %s: %d clips (%s) x %d frames, global batch %d, %d steps/epoch, %d epochs, %d worker(s)",
        run_name,
        len(rows),
        per_split,
        cfg.data.frames_per_clip,
        cfg.batch_size,
        pretrain.steps_per_epoch(cfg, len(rows)),
        cfg.epochs,
        cfg.scale.num_workers,
    )
    tracked = tracking.start_run(
        track, experiment, run_name, cfg, job="pretrain", manifest=manifest, splits=",".join(splits)
    )
    t0 = time.time()
    result = trainer.fit(job, cfg.scale, out, run_name, tracked)
    checkpoint, metrics = trainer.pick_checkpoint(result, None)
    encoder_uri = storage.join(run_dir, "encoder.pt")
    trainer.export_checkpoint(checkpoint, encoder_uri)
    summary = {"encoder": encoder_uri, "metrics": metrics, "splits": list(splits), "seconds": time.time() - t0}
    convergence = summary["convergence"] = pretrain.convergence_line(metrics)
    report.write_json(storage.join(run_dir, "metrics.json"), summary)
    log.info("pretrain %s done in %.0f s: %s -> %s", run_name, summary["seconds"], convergence, encoder_uri)
    return summary


def main(argv=None) -> int:
    args = parse(argv)
    cfg = C.load("pretrain", args.config, cli.overrides(args))
    splits = args.splits
    if args.legacy_split is not None:
        if splits is not None:
            raise C.ConfigError("give --splits only (--split is its old, one-split name)")
        log.warning("--split is deprecated: use --splits %s", args.legacy_split)
        splits = args.legacy_split
    track = tracking.parse_targets(args.track)
    with session.quiet_terminal():  # on a terminal: a bar per run, Ray's lines in a file
        run(cfg, args.manifest, args.out, args.run_name or "pretrain", splits, args.address, args.force_resume, track)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
