"""Finetune CLMAN (encoder + multi-meta attention + linear classifier) on Ray Train.

    python -m jobs.finetune --config jobs/configs/paper.yaml \\
        --manifest s3://bucket/data/manifest.parquet --out s3://bucket/runs \\
        --encoder s3://bucket/runs/pretrain-v1/encoder.pt --run-name clman-v1

Without ``--encoder`` the encoder starts from scratch (the paper's "without
CL" row). Validation: the manifest's val split, else ``finetune.val_fraction``
(0.2) of the training patients, stratified by label (0 = none); ``finetune.label_fraction``
trains on that share of the other training patients per class (nested by finetune.seed). Writes
``<out>/<run-name>/model.pt`` — the checkpoint with the best validation AUC, averaged
over ``finetune.select_window`` epochs (the last one without validation) — plus
``config.yaml`` and ``metrics.json`` (what was validated on, the kept and last epochs'
metrics, per-epoch training loss / AUC and val AUC, and the one-line not-learning
warning, if any, under ``warnings``).
The same ``--run-name`` resumes, with the first start's config, manifest and encoder (``run.json``;
``--force-resume`` otherwise); while a job runs, a second one with its name is refused (``.lock``,
``clman/run_lock.py``). Recipes and what they gave: docs/recipes.md.
"""

from __future__ import annotations

import argparse
import logging
import time

from clman import checkpoint as ckpt
from clman import cli, run_lock, storage, tracking
from clman import config as C
from clman.models.build import ENCODER_FIELDS, is_clman
from clman.errors import JobError
from clman.evaluate import report
from clman.launch import resources, session, trainer
from clman.train import finetune

log = logging.getLogger("jobs.finetune")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", required=True, help="manifest.parquet written by jobs.ingest")
    p.add_argument("--out", required=True, help="storage root for runs (path or s3:// URI)")
    p.add_argument("--encoder", help="encoder.pt from jobs.pretrain; omit to train from scratch")
    cli.add_config_args(p)
    cli.add_scale_args(p)
    tracking.add_args(p)
    return p.parse_args(argv)


def check_encoder(uri: str, cfg: C.FinetuneConfig) -> None:
    """Fail before any worker starts when the encoder checkpoint does not fit ``cfg.model``."""
    state = ckpt.load_checkpoint(uri)
    if state.get("kind") not in ("simclr", "classifier", "encoder"):
        raise ckpt.CheckpointError(f"{uri}: a {state.get('kind')!r} checkpoint holds no encoder")
    theirs = dict((state.get("config") or {}).get("model") or {})
    ours = C.to_dict(cfg)["model"]
    for key in ENCODER_FIELDS:
        if key in theirs and theirs[key] != ours[key]:
            raise ckpt.CheckpointError(
                f"{uri}: encoder of another architecture: model.{key} is {theirs[key]!r} there, "
                f"{ours[key]!r} here (set --set model.{key}=... to match)"
            )
    # Shapes too, in case the config was edited by hand.
    from clman.models.build import classifier_from

    ckpt.load_model_state(
        classifier_from(cfg.model).encoder, ckpt.encoder_state_dict(state), what=f"encoder checkpoint {uri}"
    )


def run(
    cfg: C.FinetuneConfig,
    manifest: str,
    out: str,
    run_name: str,
    encoder: str | None = None,
    address: str | None = None,
    force_resume: bool = False,
    track=(),
    experiment: str = "finetune",
) -> dict:
    """Finetune; returns {"model": URI, "metrics": metrics of the kept checkpoint}.

    The run's lock is held from before Ray starts to the end; a resume must have the first start's
    config, manifest and encoder unless ``force_resume`` (``clman.run_lock``). ``track``:
    ``clman.tracking.Target``s that get the config and every epoch's metrics, in MLflow experiment
    / TensorBoard folder ``experiment``.
    """
    run_lock.check_run_name(run_name)
    train_rows, val_rows = finetune.check_data(manifest)
    train_rows, val_rows, validation = finetune.validation_split(
        train_rows, val_rows, cfg.val_fraction, cfg.seed, manifest
    )
    log.info("%s", validation["note"])
    # After the carve: the validation patients are the same at every label fraction
    train_rows, labels = finetune.label_subset(
        train_rows, cfg.label_fraction, cfg.seed, manifest, finetune.min_training_videos(cfg)
    )
    if cfg.label_fraction < 1:
        log.info("%s", labels["note"])
    if cfg.patience and not len(val_rows):
        log.info("finetune.patience=%d unused: no validation to stop on", cfg.patience)
    if encoder and not is_clman(cfg.model):
        raise JobError(
            f"--encoder {encoder}: contrastive pretraining applies to CLMAN only; model.arch="
            f"{cfg.model.arch} trains from the data alone (drop --encoder; model.weights loads "
            "weights of this arch)"
        )
    if encoder:
        check_encoder(encoder, cfg)
    record = run_lock.fingerprint("finetune", cfg, manifest, encoder)
    with trainer.claim(out, run_name, record, force_resume):
        return _run(
            cfg, manifest, out, run_name, encoder, address, train_rows, val_rows, validation, labels, track, experiment
        )


def _run(
    cfg,
    manifest,
    out,
    run_name,
    encoder,
    address,
    train_rows,
    val_rows,
    validation,
    labels=None,
    track=(),
    experiment="finetune",
) -> dict:
    session.init_ray(address)
    resources.check_resources(cfg.scale, cfg.data)
    run_dir = storage.join(out, run_name)
    storage.write_text(storage.join(run_dir, "config.yaml"), C.to_yaml(cfg))
    has_val = len(val_rows) > 0
    log.info(
        "finetune %s: %d train / %d val clips, T=%d, global batch %d, %d epochs, %s lr %g (%s), encoder %s",
        run_name,
        len(train_rows),
        len(val_rows),
        cfg.data.num_frames,
        cfg.batch_size,
        cfg.epochs,
        cfg.optimizer,
        cfg.lr,
        cfg.schedule,
        encoder or "from scratch",
    )
    job = trainer.finetune_job(cfg, manifest, encoder, has_val, rows=(train_rows, val_rows))
    tracked = tracking.start_run(
        track, experiment, run_name, cfg, job="finetune", manifest=manifest, encoder=encoder or ""
    )
    t0 = time.time()
    result = trainer.fit(job, cfg.scale, out, run_name, tracked)
    checkpoint, metrics = trainer.pick_checkpoint(result, job.score)
    model_uri = storage.join(run_dir, "model.pt")
    trainer.export_checkpoint(checkpoint, model_uri)
    last = result.metrics or {}
    window = finetune.selection_window(cfg)
    kept_by = f"best val_score (mean val AUC of {window} epochs)" if window > 1 else "best val_auc"
    summary = {
        "model": model_uri,
        "kept": kept_by if has_val else "last",
        "metrics": metrics,
        "last_metrics": last,
        "validation": validation,
        "labels": labels,
        "stopped_early": bool(last.get("stopped_early")),
        "warnings": [last["warning"]] if last.get("warning") else [],
        "history": finetune.history(result.checkpoint),
        "seconds": time.time() - t0,
    }
    report.write_json(storage.join(run_dir, "metrics.json"), summary)
    kept = f"epoch {metrics.get('epoch', -1) + 1}" + (f", val AUC {metrics['val_auc']:.3f}" if has_val else "")
    if has_val and "val_score" in metrics and window > 1:
        kept += f", val score {metrics['val_score']:.3f}"
    log.info(
        "finetune %s done in %.0f s -> %s (%s: %s)%s%s",
        run_name,
        summary["seconds"],
        model_uri,
        summary["kept"],
        kept,
        ", stopped early" if summary["stopped_early"] else "",
        ", NOT LEARNING: see metrics.json 'warnings'" if summary["warnings"] else "",
    )
    return summary


def main(argv=None) -> int:
    args = parse(argv)
    cfg = C.load("finetune", args.config, cli.overrides(args))
    track = tracking.parse_targets(args.track)
    with session.quiet_terminal():  # on a terminal: a bar per run, Ray's lines in a file
        run(
            cfg,
            args.manifest,
            args.out,
            args.run_name or "finetune",
            args.encoder,
            args.address,
            args.force_resume,
            track,
        )
    return 0


if __name__ == "__main__":
    cli.run_main(main)
