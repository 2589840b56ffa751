"""The study driver behind ``jobs.study``: the paper's Tables 1-4 as Ray Tune trials, each driving Ray Train.

    plan_study (clman.study, no Ray): rows x folds x seeds; every input checked, every config built
      │  cells/<f0-s0>/manifest.parquet: the (fold, seed)'s train / val / test videos (split column),
      │                                   and the manifest's unlabelled videos (split unlabeled)
      ▼
    stage 1 (Tune grid): a SimCLR run per (fold, seed) that a pretrained row needs, on that
      │                  cell's train + val videos and the unlabelled ones (never its test videos),
      │                  and every from-scratch trial beside them
    stage 2 (Tune grid): the pretrained rows' trials, each loading its (fold, seed)'s encoder
      │  a trial: Ray Train finetune -> model.pt -> score val + test videos -> trials/<id>.json
      ▼
    clman.study.write_study: study.md, summary.json, study.parquet, predictions.parquet, roc.png
      (and label_efficiency.png with --label-fractions)

``--label-fractions 0.1,0.25,0.5,1``: the rows with CL (clman), without CL (gn_nl) and the linear
probe (linear_probe) at each fraction (``clman.study.curve``); a trial per (row, fold, seed, fraction),
its id suffixed ``-lf0.25`` below 1. A cell's manifest, validation carve and SimCLR run are the same
at every fraction; a trial subsamples its cell's training patients (``finetune.label_subset``).

Storage under ``<out>/<run-name>/``: ``study.json`` (what was asked, so ``--resume`` can refuse
a different study), ``cells/``, ``pretrain/<cell>/`` (the SimCLR Train run, ``encoder.pt``,
``metrics.json``), ``train/<trial id>/`` (the finetune Train run, ``model.pt``), ``trials/<trial
id>.json`` (the trial's results line, its test videos' scores and its validation scores),
``tune/`` (Tune's state and every trial's every epoch, passed on by ``TuneReportCallback``),
and the five outputs.

Resume: a trial whose ``trials/<id>.json`` exists is left out of the grid, a cell whose
``encoder.pt`` exists is not pretrained again; an interrupted Train run continues from its
last checkpoint (its name is the trial id). Every output is rebuilt from the trial files.

Facts that shaped this module
- A trial holds 0.01 CPU for its driver (``clman.launch.resources.DRIVER_CPUS``); its Train run
  takes its workers' and decoders' CPUs when it starts, so ``max_concurrent_trials`` counts
  those, like a sweep. Scoring (``clman.evaluate.scoring``: 0.5-CPU decode tasks, a scoring
  actor per GPU, or one of 0.5 CPU) starts after the Train run has freed its CPUs; on a full
  cluster it waits for a neighbour's run to end, never for itself.
- The from-scratch rows need no encoder, so they run beside the SimCLR runs in stage 1 rather
  than after them: on a cluster the grid is wider, on 2 cores the order does not matter.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from clman import config as C
from clman import storage, study, tracking
from clman.data.manifest import ManifestError, read_manifest, write_manifest
from clman.errors import JobError, error_line
from clman.evaluate import scoring
from clman.launch import grid, resources, session, trainer
from clman.launch.resources import DRIVER_CPUS, max_concurrent_trials
from clman.study import FoldPlan, Row, StudyError, StudySets, Trial
from clman.train import finetune, pretrain

log = logging.getLogger(__name__)

SPEC_FILE = "study.json"
PRETRAIN_PREFIX = "pretrain-"  # a SimCLR run's id in the grid: pretrain-f0-s0
# What SimCLR of a cell sees: its train + val videos and every unlabelled one, never its test videos.
# The unlabelled pool is used whenever the manifest has one (no option asks for it, so none fails).
TRAINING_SPLITS = ("train", "val", "unlabeled")


def cell_name(fold: int, seed: int) -> str:
    """``f2-s0``, ``holdout-s1``: the folder of a (fold, seed) (the suffix of its trials' ids)."""
    return f"{'holdout' if fold == study.HOLDOUT else f'f{fold}'}-s{seed}"


@dataclass(frozen=True)
class StudyRun:
    """A checked study: all its trials need, sent to each Tune trial (plain, picklable data)."""

    manifest: str
    out: str
    run_name: str
    tables: tuple[int, ...]
    rows: tuple[Row, ...]
    plan: FoldPlan
    seeds: int
    preset: dict  # the --config preset alone (clman.config.load_tree)
    tree: dict  # the preset with the --set items for every row: the shared config
    sets: StudySets
    config: str | None = None  # the preset's path, for the record
    command: str = ""
    fractions: tuple[float, ...] | None = None  # --label-fractions (with 1), None without: every label

    @property
    def label_fractions(self) -> tuple[float, ...]:
        return self.fractions or (1.0,)

    @property
    def run_dir(self) -> str:
        return storage.join(self.out, self.run_name)

    @property
    def grid(self) -> list[Trial]:
        return study.trials(self.rows, self.plan.folds, self.seeds, self.label_fractions)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """Every (fold, seed), fold-major."""
        return [(f, s) for f in self.plan.folds for s in range(self.seeds)]

    def finetune_config(self, t: Trial) -> C.FinetuneConfig:
        return C.job_config(C.apply_overrides(self.tree, study.trial_sets(t, self.sets, self.tree)), "finetune")

    def pretrain_config(self, seed: int) -> C.PretrainConfig:
        return C.job_config(C.apply_overrides(self.tree, study.pretrain_sets(seed, self.sets, self.rows)), "pretrain")

    def evaluate_config(self) -> C.EvaluateConfig:
        return C.job_config(self.tree, "evaluate")

    def split(self, fold: int, seed: int) -> study.Split:
        return self.plan.split(fold, seed, C.job_config(self.tree, "finetune").val_fraction)

    def labelled(self, t: Trial, train: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        """The training rows trial ``t`` sees: ``t.fraction`` of its cell's training patients (after the carve)."""
        cfg = self.finetune_config(t)
        return finetune.label_subset(
            train, cfg.label_fraction, cfg.seed, f"{self.manifest}, trial {t.id}", finetune.min_training_videos(cfg)
        )

    def cell_manifest(self, fold: int, seed: int) -> str:
        return storage.join(self.run_dir, "cells", cell_name(fold, seed), "manifest.parquet")

    def encoder(self, fold: int, seed: int) -> str:
        return storage.join(self.run_dir, "pretrain", cell_name(fold, seed), "encoder.pt")

    def trial_file(self, trial_id: str) -> str:
        return storage.join(self.run_dir, "trials", f"{trial_id}.json")

    def spec(self) -> dict:
        """What makes two studies the same study (``--resume`` checks it against ``study.json``)."""
        return {
            "manifest": self.manifest,
            "tables": list(self.tables),
            "rows": [r.name for r in self.rows],
            "folds": list(self.plan.folds),
            "seeds": self.seeds,
            "preset": self.preset,
            "sets": list(self.sets.common) + [f"{r}:{i}" for r, i in self.sets.scoped],
        } | ({} if self.fractions is None else {"label_fractions": list(self.fractions)})  # as before without


def plan_study(
    manifest: str,
    out: str,
    run_name: str,
    *,
    tables: str | None = None,
    rows: str | None = None,
    folds: int | None = None,
    holdout: bool = False,
    seeds: int = 1,
    config: str | None = None,
    sets: Sequence[str] = (),
    command: str = "",
    label_fractions: str | Sequence[float] | None = None,
) -> StudyRun:
    """Check everything a study needs and build every trial's config; a one-line error on bad input.

    label_fractions: ``--label-fractions`` (``clman.study.curve``): the curve's rows at each fraction.
    No Ray, no training: this is the part that must fail before the first trial starts.
    """
    if not run_name or "/" in run_name:
        raise StudyError(f"--run-name {run_name!r}: a folder name without '/'")
    if not isinstance(seeds, int) or seeds < 1:
        raise StudyError(f"--seeds must be >= 1, got {seeds!r}")
    fractions = None if label_fractions is None else study.curve.parse_fractions(label_fractions)
    if fractions is None:
        chosen = study.select_rows(tables, rows)
    else:
        chosen, tables = study.curve.curve_rows(tables, rows), str(study.curve.CURVE_TABLE)
    preset = C.load_tree(config)
    if "label_fraction" in dict(preset.get("finetune") or {}):
        raise StudyError(
            f"{config}: finetune.label_fraction: the study sets it for every trial (1, or "
            "--label-fractions); remove it from the preset"
        )
    checked = study.parse_sets(list(sets), chosen, model=preset.get("model"))
    tree = C.load_tree(config, checked.common)
    try:
        df = read_manifest(manifest)
    except ManifestError as e:
        raise StudyError(str(e)) from None
    plan = study.plan_folds(df, folds=folds, holdout=holdout, where=manifest)
    run = StudyRun(
        manifest,
        out,
        run_name,
        study.parse_tables(tables),
        chosen,
        plan,
        seeds,
        preset,
        tree,
        checked,
        config,
        command,
        fractions,
    )
    for t in run.grid:  # a bad value scoped to one row fails here, naming the row
        try:
            run.finetune_config(t)
        except C.ConfigError as e:
            raise StudyError(f"row {t.row.name}: {e}") from None
    for _fold, seed in study.pretrain_cells(run.grid):
        run.pretrain_config(seed)
    for fold, seed in run.cells:
        split = run.split(fold, seed)  # a carve that leaves a class out fails here
        for t in run.grid:  # a label fraction too small for a class or a batch fails here
            if (t.fold, t.seed) == (fold, seed) and t.fraction < 1:
                try:
                    run.labelled(t, split.train)
                except JobError as e:
                    raise StudyError(str(e)) from None
    run.evaluate_config()
    return run


# ---------------------------------------------------------------- inside a Tune trial


def _fit(job: trainer.TrainJob, scale: C.ScaleConfig, out: str, name: str):
    """Run a Train job inside a Tune trial, each epoch's metrics passed on to Tune."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        result = trainer.trainer(job, scale, out, name, callbacks=[TuneReportCallback()]).fit()
    except ray.train.TrainingFailedError as e:
        raise JobError(trainer.failure_line(name, e)) from None
    if result.error is not None:
        raise JobError(trainer.failure_line(name, result.error))
    return result


def pretrain_pool(cell_manifest: str) -> pd.DataFrame:
    """The rows SimCLR of a cell reads from its manifest (``StudyRun.cell_manifest``): TRAINING_SPLITS,
    i.e. ``Split.pretraining_pool``; a JobError when there are none."""
    rows = read_manifest(cell_manifest, split=list(TRAINING_SPLITS))
    if rows.empty:
        raise JobError(f"{cell_manifest}: no train, val or unlabelled video; nothing to pretrain on")
    return rows


def run_pretrain(run: StudyRun, fold: int, seed: int) -> dict:
    """SimCLR on the (fold, seed)'s training videos (train + val) and the unlabelled ones; writes ``encoder.pt``."""
    cfg = run.pretrain_config(seed)
    manifest, name = run.cell_manifest(fold, seed), cell_name(fold, seed)
    pool = pretrain_pool(manifest)
    videos, unlabeled = len(pool), int((pool["split"] == "unlabeled").sum())
    t0 = time.time()
    result = _fit(
        trainer.pretrain_job(cfg, manifest, list(TRAINING_SPLITS)),
        cfg.scale,
        storage.join(run.run_dir, "pretrain"),
        name,
    )
    checkpoint, metrics = trainer.pick_checkpoint(result, None)
    summary = {
        "encoder": run.encoder(fold, seed),
        "videos": videos,
        "unlabeled_videos": unlabeled,
        "loss": metrics.get("loss"),
        "loss_ratio": metrics.get("loss_ratio"),  # against chance ln(2N - 1)
        "convergence": pretrain.convergence_line(metrics),
        "seconds": time.time() - t0,
    }
    storage.write_text(
        storage.join(run.run_dir, "pretrain", name, "metrics.json"), json.dumps(summary, indent=2, default=float) + "\n"
    )
    trainer.export_checkpoint(checkpoint, summary["encoder"])  # last: its presence marks a finished run
    log.info("pretrain %s done in %.0f s: %s", name, summary["seconds"], summary["convergence"])
    return summary


def run_trial(run: StudyRun, t: Trial) -> dict:
    """One (row, fold, seed): finetune, score the val and test videos, write ``trials/<id>.json``."""
    cfg, ev = run.finetune_config(t), run.evaluate_config()
    manifest = run.cell_manifest(t.fold, t.seed)
    train, val = read_manifest(manifest, split="train"), read_manifest(manifest, split="val")
    train, labels = run.labelled(t, train)  # t.fraction of the training patients; the val patients stay
    encoder = run.encoder(t.fold, t.seed) if t.row.pretrained else None
    t0 = time.time()
    job = trainer.finetune_job(cfg, manifest, encoder, has_val=len(val) > 0, rows=(train, val))
    result = _fit(job, cfg.scale, storage.join(run.run_dir, "train"), t.id)
    checkpoint, kept = trainer.pick_checkpoint(result, job.score)
    model = storage.join(run.run_dir, "train", t.id, "model.pt")
    trainer.export_checkpoint(checkpoint, model)
    train_s = time.time() - t0

    rows = read_manifest(manifest, split=["val", "test"])
    # The protocol the trial's validation used (its tree's evaluate.frames / evaluate.clips): every row, CLMAN
    # and the Table 4 baselines, scored on K clips of its own T at its training spacing unless frames=all.
    scored = scoring.score_rows(model, rows, cfg.data, cfg.val_frames, cfg.val_clips)
    if len(scored) < len(rows):
        log.warning(
            "trial %s: %d of %d val/test videos did not decode; scored without them",
            t.id,
            len(rows) - len(scored),
            len(rows),
        )
    videos = [
        {
            "split": r.split,
            "video_id": str(r.video_id),
            "patient_id": str(r.patient_id),
            "label": int(r.label),
            "score": scored[i][0],
        }
        for i, r in enumerate(rows.itertuples(index=False))
        if i in scored
    ]
    test = [v for v in videos if v["split"] == "test"]
    val_scored = [v for v in videos if v["split"] == "val"]
    if not test:
        raise JobError(f"trial {t.id}: none of the {int((rows['split'] == 'test').sum())} test videos decoded")
    has_op = {v["label"] for v in val_scored} == {0, 1}
    metrics = study.trial_metrics(
        [v["score"] for v in test],
        [v["label"] for v in test],
        threshold=ev.threshold,
        val_scores=[v["score"] for v in val_scored] if has_op else None,
        val_labels=[v["label"] for v in val_scored] if has_op else None,
        target_sensitivity=ev.target_sensitivity,
    )
    line = {
        "row": t.row.name,
        "fold": t.fold,
        "seed": t.seed,
        "fraction": t.fraction,
        **metrics,
        "val_auc": float(kept.get("val_auc", math.nan)),
        "kept_epoch": int(kept.get("epoch", -1)),
        "train_seconds": train_s,
        "seconds": time.time() - t0,
        # the corrected resampled t of the fold means uses n_test / n_train (clman.study.stats)
        "n_train": len(train) + len(val),
        "n_test": int((rows["split"] == "test").sum()),
        "n_labelled": len(train),
    }  # the training videos whose labels it saw (label fraction)
    record = {
        "trial": t.id,
        "result": line,
        "model": model,
        "encoder": encoder,
        "labels": labels["note"],
        "predictions": [
            {
                "row": t.row.name,
                "fold": t.fold,
                "seed": t.seed,
                "fraction": t.fraction,
                **{k: v[k] for k in ("video_id", "patient_id", "label", "score")},
            }
            for v in test
        ],
        "val_scores": [{k: v[k] for k in ("video_id", "patient_id", "label", "score")} for v in val_scored],
    }
    storage.write_text(run.trial_file(t.id), json.dumps(record, indent=1) + "\n")  # atomic: the trial is done
    log.info("trial %s done in %.0f s: test AUC %.3f", t.id, line["seconds"], line["auc"])
    return line


def trial_driver(config: dict, run: StudyRun) -> None:
    """A Tune trial: ``config["trial"]`` is a SimCLR run (``pretrain-f0-s0``) or a (row, fold, seed) id."""
    import ray.tune

    trial_id = config["trial"]
    if trial_id.startswith(PRETRAIN_PREFIX):
        fold, seed = next(c for c in run.cells if PRETRAIN_PREFIX + cell_name(*c) == trial_id)
        summary = run_pretrain(run, fold, seed)
        ray.tune.report({"loss": summary["loss"], "seconds": summary["seconds"]})
    else:
        line = run_trial(run, next(t for t in run.grid if t.id == trial_id))
        ray.tune.report({k: v for k, v in line.items() if isinstance(v, (int, float))})


# ---------------------------------------------------------------- the driver


def trial_config(run: StudyRun, config: dict):
    """The job config a grid trial (``config["trial"]``) runs: its cell's SimCLR run, or its row's finetune."""
    trial_id = config["trial"]
    if trial_id.startswith(PRETRAIN_PREFIX):
        fold, seed = next(c for c in run.cells if PRETRAIN_PREFIX + cell_name(*c) == trial_id)
        return run.pretrain_config(seed)
    return run.finetune_config(next(t for t in run.grid if t.id == trial_id))


def _run_grid(
    run: StudyRun, name: str, ids: list[str], configs: list, track: Sequence[tracking.Target] = ()
) -> dict[str, str]:
    """Run ``ids`` as one Tune grid, as many at once as the cluster holds; {id: error line} of failures.

    ``track``: an MLflow run (TensorBoard folder) per trial in experiment ``run.run_name``."""
    import ray
    from ray import tune

    if not ids:
        return {}
    for cfg in configs:  # attached to an autoscaling cluster: wait for room for one trial of each kind
        resources.check_resources(cfg.scale, cfg.data, extra_cpus=DRIVER_CPUS)
    concurrent = min(max_concurrent_trials(ray.cluster_resources(), cfg) for cfg in configs)
    log.info("study %s, %s: %d trial(s), up to %d at once", run.run_name, name, len(ids), concurrent)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, run=run), {"CPU": DRIVER_CPUS})
    tuner = grid.tuner(
        trainable,
        {"trial": tune.grid_search(ids)},
        name=name,
        storage_uri=storage.join(run.run_dir, "tune"),
        concurrent=concurrent,
        track=track,
        experiment=run.run_name,
        config_of=functools.partial(trial_config, run),
    )
    results = tuner.fit()
    failed = {}
    for r in results:
        if r.error is not None:
            failed[r.config["trial"]] = error_line(r.error, limit=300)
    return failed


def _check_spec(run: StudyRun, resume: bool) -> None:
    uri = storage.join(run.run_dir, SPEC_FILE)
    if not storage.exists(uri):
        if resume and storage.exists(storage.join(run.run_dir, "trials")):
            raise JobError(f"{uri}: missing; cannot tell whether the trials under {run.run_dir} are this study's")
        storage.write_text(uri, json.dumps(run.spec(), indent=2) + "\n")
        return
    if not resume:
        raise JobError(
            f"study {run.run_name!r} already exists under {run.out}; continue it with --resume, "
            "or choose another --run-name"
        )
    saved, now = json.loads(storage.read_text(uri)), json.loads(json.dumps(run.spec()))
    for key in now:
        if saved.get(key) != now[key]:
            raise JobError(
                f"--resume: {key} differs from the study under {run.run_dir} ({saved.get(key)!r} there, "
                f"{now[key]!r} now); give the same arguments, or another --run-name"
            )


def run_study(
    run: StudyRun, address: str | None = None, resume: bool = False, track: Sequence[tracking.Target] = ()
) -> dict:
    """Run (or with ``resume``, continue) the study; write its outputs; return their URIs.

    ``track``: every trial's config and epochs to MLflow / TensorBoard (``clman.tracking``)."""
    t_start = time.time()
    _check_spec(run, resume)
    grid = run.grid
    done = {t.id for t in grid if resume and storage.exists(run.trial_file(t.id))}
    todo = [t for t in grid if t.id not in done]
    cells = [c for c in study.pretrain_cells(todo) if not (resume and storage.exists(run.encoder(*c)))]
    if resume:
        log.info(
            "resuming study %s: %d of %d trial(s) finished, kept; %d SimCLR run(s) to do",
            run.run_name,
            len(done),
            len(grid),
            len(cells),
        )
    for fold, seed in {(t.fold, t.seed): None for t in todo}:
        write_manifest(run.split(fold, seed).manifest(), run.cell_manifest(fold, seed))
    session.init_ray(address)

    scratch = [t for t in todo if not t.row.pretrained]
    stage1 = [PRETRAIN_PREFIX + cell_name(*c) for c in cells] + [t.id for t in scratch]
    failed = _run_grid(
        run,
        "stage1",
        stage1,
        [run.pretrain_config(s) for _, s in cells[:1]] + [run.finetune_config(t) for t in scratch],
        track,
    )
    pretrained = [t for t in todo if t.row.pretrained]
    ready = [t for t in pretrained if storage.exists(run.encoder(t.fold, t.seed))]
    for t in pretrained:
        if t not in ready:
            failed[t.id] = f"its encoder ({PRETRAIN_PREFIX}{cell_name(t.fold, t.seed)}) was not trained"
    failed |= _run_grid(run, "stage2", [t.id for t in ready], [run.finetune_config(t) for t in ready], track)

    missing = {t.id: failed.get(t.id, "no result file") for t in grid if not storage.exists(run.trial_file(t.id))}
    failed_cells = {k: v for k, v in failed.items() if k.startswith(PRETRAIN_PREFIX)}
    if missing:
        first = next(iter({**failed_cells, **missing}.items()))
        raise JobError(
            f"study {run.run_name}: {len(missing)} of {len(grid)} trial(s) did not finish (first: "
            f"{first[0]}: {first[1]}); the finished ones are kept: rerun the same command with --resume"
        )
    return write_outputs(run, run_time_s=time.time() - t_start, resumed=len(done))


def write_outputs(run: StudyRun, run_time_s: float | None = None, resumed: int = 0) -> dict:
    """study.md, study.parquet, predictions.parquet and roc.png from the trial files."""
    records = [json.loads(storage.read_text(run.trial_file(t.id))) for t in run.grid]
    # Trial files of a study begun before label fractions have no "fraction": every label (1)
    results = pd.DataFrame([{"fraction": 1.0, **r["result"]} for r in records])
    predictions = pd.DataFrame([{"fraction": 1.0, **p} for r in records for p in r["predictions"]])
    ev = run.evaluate_config()
    pretrain_s, ratios = [], []
    for fold, seed in study.pretrain_cells(run.grid):
        m = json.loads(storage.read_text(storage.join(run.run_dir, "pretrain", cell_name(fold, seed), "metrics.json")))
        pretrain_s.append(m["seconds"])
        if m.get("loss_ratio") is not None:  # studies before 2026-12-06 kept the loss only
            ratios.append(m["loss_ratio"])
    notes = [f"{run.split(f, s).note} (fold {f}, seed {s})" for f, s in run.cells]
    notes.append(
        scoring.describe(ev, C.job_config(run.tree, "finetune").data.num_frames) + "; T is each row's data.num_frames"
    )
    notes.append(
        f"finetune per trial: {results['seconds'].mean():.0f} s on average ({results['seconds'].min():.0f}"
        f"–{results['seconds'].max():.0f} s: Ray Train run + scoring val and test videos)"
    )
    if pretrain_s:
        pool = f" and the {len(run.plan.unlabeled)} unlabelled videos" if len(run.plan.unlabeled) else ""
        notes.append(
            f"SimCLR per (fold, seed): {sum(pretrain_s) / len(pretrain_s):.0f} s on average, "
            f"{len(pretrain_s)} run(s) on the training videos of their cell{pool} only"
            + (f"; last loss {min(ratios):.2f}–{max(ratios):.2f} x chance ln(2N - 1)" if ratios else "")
        )
    if run.fractions is not None:
        notes.append(
            f"label fractions {', '.join(f'{f:g}' for f in run.fractions)}: {len(records)} trial(s) in "
            f"all; the tables and roc.png are the {int((results['fraction'] == 1).sum())} at fraction 1"
        )
    if resumed:
        notes.append(f"resumed: {resumed} trial(s) finished in an earlier run; the run time is this run's")
    study.write_study(
        run.run_dir,
        results,
        predictions,
        tables_shown=run.tables,
        protocol=run.plan.describe(),
        command=run.command,
        config=run.tree,
        run_time_s=run_time_s,
        n_boot=ev.bootstrap,
        seed=ev.seed,
        threshold=ev.threshold,
        notes=notes,
        label_fractions=run.fractions,
    )
    names = [*study.OUTPUTS, *([study.curve.PNG] if run.fractions is not None else [])]
    uris = {name: storage.join(run.run_dir, name) for name in names}
    log.info("study %s: %d trial(s) -> %s", run.run_name, len(records), uris["study.md"])
    return uris


__all__ = ["StudyRun", "cell_name", "plan_study", "run_study", "trial_driver", "write_outputs"]
