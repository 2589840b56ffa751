"""The sweep driver, the one module of ``clman.tune`` that imports Ray: every trial drives its own Ray Train run.

    Tuner ──trial (0.01 CPU)──▶ train_driver(config) ──▶ TorchTrainer(train_loop_per_worker)
      │  ASHA / FIFO, random / Optuna              │  RunConfig(callbacks=[EpochReport()])
      ◀──────── every epoch's ray.train.report ────┘  (Train V2's TuneReportCallback)

A trial's config is the sweep's base config (preset + ``--set``) with the
trial's sampled values set (``clman.tune.space``). Each epoch the worker loop
reports the validation metrics (finetune: ``val_auc`` and the other five,
``val_loss``, ``train_loss``; pretrain: ``loss``); the callback passes them to
Tune, where ASHA can stop the trial early, and Tune keeps every epoch's row.

Storage, under ``<out>/<run-name>/``: ``sweep.json`` (the sweep's own
arguments and base config, so ``--resume <run-name>`` needs nothing else),
Tune's experiment state and trial folders, ``train/<trial-id>/`` (each
trial's Ray Train run and checkpoints) and, when the sweep ends, the result
files written by ``write_results``: ``trials.parquet``/``trials.csv`` (a row
per trial), ``epochs.parquet`` (a row per trial per epoch), ``best.yaml`` (a
preset with the best trial's values), ``summary.md`` and ``auc_vs_lr.png``
(``loss_vs_lr.png`` for pretrain).

Concurrency: a trial needs ``num_workers x cpus_per_worker`` CPUs (and GPUs)
for its workers, ``decode_tasks x decode_cpus`` for its Ray Data decoders and
a sliver for its driver; ``max_concurrent_trials`` is what the cluster holds of
that at once, so no trial sits holding a driver while its workers wait. When
ASHA stops a trial, Tune kills its driver and the Train run dies with it;
``PlacementGroupReaper`` then frees the resources that run still reserved.

Data: the driver decodes the splits once (``shared_frames``) and every trial reads those cached
frames through the object store, unless the space varies a ``data.*`` key.

Resume: ``Tuner.restore`` keeps finished trials and continues unfinished ones
(each Train run from its last checkpoint, as its name is the trial id). Tune
does not save ASHA's rungs, so ``ResumableASHA`` replays the stored results
into them first. Restoring unpickles Tune's state: resume only sweeps whose
storage you trust.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Sequence

from ray.tune.schedulers import ASHAScheduler

from clman import config as C
from clman import storage, tracking
from clman.errors import JobError
from clman.launch import grid, resources, session
from clman.launch.ray_compat import replay_into_asha
from clman.launch.resources import DRIVER_CPUS, max_concurrent_trials
from clman.errors import error_line
from clman.tune.results import TrialRecord, epochs_table, trial_statuses, write_results
from clman.tune.space import Param, SearchSpace
from clman.tune.sweep import SCHEDULERS, SCORES, SEARCHES, TIME_ATTR, TRAIN_DIR, SWEEP_FILE, Sweep

log = logging.getLogger(__name__)


def tune_domain(param: Param):
    """The ray.tune domain a search-space parameter stands for."""
    from ray import tune

    if param.kind == "loguniform":
        return tune.loguniform(*param.args)
    if param.kind == "uniform":
        return tune.uniform(*param.args)
    if param.kind == "randint":
        lo, hi = param.args
        return tune.randint(lo, hi + 1)  # ours includes hi, Ray's excludes it
    if param.kind == "choice":
        return tune.choice(list(param.args))
    if param.kind == "grid":
        return tune.grid_search(list(param.args))
    raise AssertionError(f"unhandled kind {param.kind!r}")


def param_space(space: SearchSpace) -> dict:
    """Ray Tune's ``param_space`` of a search space: flat, dotted keys -> tune domains (:func:`tune_domain`)."""
    return {p.key: tune_domain(p) for p in space.params}


def _epoch_report_callback():
    """Train V2's TuneReportCallback, adding ``epochs_done`` (1-based) for ASHA's clock.

    Built inside the trial: the callback must be created in a Tune session.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [dict(m, **{TIME_ATTR: int(m["epoch"]) + 1}) if "epoch" in m else m for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return EpochReport()


def _train_job(sweep: Sweep, cfg, frames: dict | None = None):
    """The trial's ``clman.launch.trainer.TrainJob``: the same loop, datasets and checkpoint score as the job itself.

    ``frames``: the splits decoded once by the sweep's driver (:func:`shared_frames`), else None.
    """
    from clman.launch import trainer

    if sweep.job == "finetune":
        return trainer.finetune_job(cfg, sweep.manifest, sweep.encoder, has_val=True, sources=frames)
    # The manifest was checked once, before any trial (_check_data): no second read per trial.
    return trainer.pretrain_job(cfg, sweep.manifest, sweep.split, source=frames[sweep.split] if frames else None)


def shared_frames(sweep: Sweep) -> dict | None:
    """{split: ``clman.launch.trainer.frame_source``} for every trial, made once in the sweep's driver; None when
    a trial would read other frames (the space sets ``data.*``), and each trial then decodes its own.

    Each trial used to decode its splits again: ~10-15 s of a 2-core demo trial's ~80 s, and with
    N trials at once N copies of the cached frames in the object store.
    """
    from clman.data.manifest import read_manifest
    from clman.launch.trainer import frame_source

    varied = [p.key for p in sweep.search_space().params if p.key.startswith("data.")]
    if varied:
        log.info("each trial decodes its own frames: the space varies %s", ", ".join(varied))
        return None
    data = sweep.base_config().data
    splits = ("train", "val") if sweep.job == "finetune" else (sweep.split,)
    t0 = time.time()
    frames = {split: frame_source(read_manifest(sweep.manifest, split=split), data) for split in splits}
    log.info("frames of %s for every trial ready in %.0f s", " and ".join(splits), time.time() - t0)
    return frames


def train_driver(config: dict, sweep: dict, frames: dict | None = None) -> None:
    """One Tune trial: the job's config with this trial's values, fitted by a TorchTrainer.

    The Train run is named after the trial id, so a trial restarted after the
    sweep's driver died continues from its own last checkpoint.
    """
    import ray.tune

    from clman.launch import trainer as launch_trainer

    s = Sweep.from_dict(sweep)
    cfg = s.trial_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = launch_trainer.trainer(
        _train_job(s, cfg, frames),
        cfg.scale,
        storage.join(s.run_dir, TRAIN_DIR),
        trial_id,
        callbacks=[_epoch_report_callback()],
    )
    trainer.fit()  # raises when the run fails: Tune marks the trial ERROR with the cause


def _check_data(sweep: Sweep) -> None:
    """A clear error before any trial when the manifest cannot feed the sweep's job."""
    if sweep.job == "finetune":
        from clman.train import finetune

        finetune.check_data(sweep.manifest, require_val=True)
    else:
        from clman.train import pretrain

        pretrain.check_data(sweep.manifest, sweep.split)


def _sweep_trial_config(sweep: dict, config: dict):
    return Sweep.from_dict(sweep).trial_config(config)


class _StoredTrial:
    """Stands in for a Tune trial when stored results are replayed into ASHA (it reads only the id)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class ResumableASHA(ASHAScheduler):
    """ASHA that first replays the sweep's stored results into its rungs.

    Tune does not save scheduler state with the experiment, so after
    ``--resume`` a plain ASHA starts with empty rungs and compares the resumed
    trials only with each other. This one, before the first trial is added,
    reads every result stored under ``<out>/<run_name>/`` (none on a fresh
    sweep) and records it as if it had just been reported.
    """

    def __init__(self, out: str, run_name: str, **kwargs):
        super().__init__(**kwargs)
        self._sweep_dir = (out, run_name)
        self._replayed = False

    def __getstate__(self):  # pickled with the experiment: a restored copy replays again
        return {**self.__dict__, "_replayed": False}

    def on_trial_add(self, tune_controller, trial):
        if not self._replayed:
            self._replayed = True
            try:
                if trial_statuses(*self._sweep_dir):
                    self.replay(collect(*self._sweep_dir, keys=()))
            except Exception as e:  # the sweep still runs without the replay: say so, go on
                log.warning(
                    "could not replay stored results into ASHA (%s: %s); resumed trials are "
                    "compared only with each other",
                    type(e).__name__,
                    e,
                )
        super().on_trial_add(tune_controller, trial)

    def replay(self, records: Sequence["TrialRecord"]) -> int:
        """Record stored results in the rungs, in the order they were reported; returns how many."""
        rows = epochs_table(records, ())
        if rows.empty or not {TIME_ATTR, self.metric} <= set(rows.columns):
            return 0
        if "timestamp" in rows.columns:
            rows = rows.sort_values("timestamp", kind="stable")
        n = replay_into_asha(self, rows.to_dict("records"), _StoredTrial)
        stubs = rows["trial_id"].unique()
        log.info("ASHA: replayed %d stored result(s) of %d trial(s) into its rungs", n, len(stubs))
        return n


def _tuner(sweep: Sweep, trainable, concurrent: int, track: Sequence[tracking.Target] = ()):
    from ray.tune.schedulers import FIFOScheduler

    metric, mode = SCORES[sweep.job]
    if sweep.scheduler == "asha":
        scheduler = ResumableASHA(
            sweep.out,
            sweep.run_name,
            time_attr=TIME_ATTR,
            max_t=sweep.max_epochs(),
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
            # A trial at max_t ends by itself: let its Train run finish cleanly.
            stop_last_trials=False,
        )
    elif sweep.scheduler == "fifo":
        scheduler = FIFOScheduler()
    else:
        raise C.ConfigError(f"--scheduler {sweep.scheduler!r}: not one of {list(SCHEDULERS)}")
    if sweep.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # max_concurrent here: Tune ignores TuneConfig.max_concurrent_trials for a given generator.
        search_alg = BasicVariantGenerator(max_concurrent=concurrent, random_state=sweep.seed)
    elif sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise JobError("--search optuna needs the optuna package: pip install optuna") from None
        search_alg = OptunaSearch(seed=sweep.seed)
    else:
        raise C.ConfigError(f"--search {sweep.search!r}: not one of {list(SEARCHES)}")
    return grid.tuner(
        trainable,
        param_space(sweep.search_space()),
        name=sweep.run_name,
        storage_uri=sweep.out,
        concurrent=concurrent,
        track=track,
        experiment=sweep.run_name,
        config_of=functools.partial(_sweep_trial_config, sweep.to_dict()),
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=sweep.samples,
    )


def _trainable(sweep: Sweep, frames: dict | None = None):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(train_driver, sweep=sweep.to_dict(), frames=frames), {"CPU": DRIVER_CPUS}
    )


def run_sweep(
    sweep: Sweep,
    address: str | None = None,
    resume: bool = False,
    restart_errored: bool = False,
    track: Sequence[tracking.Target] = (),
) -> dict:
    """Run (or, with ``resume``, continue) ``sweep``; write the result files; return their URIs.

    A resumed sweep keeps its finished trials, continues the unfinished ones
    from their last checkpoints and leaves errored trials as they are unless
    ``restart_errored``. ``track``: an MLflow run (TensorBoard folder) per trial, in experiment
    ``sweep.run_name`` (:class:`TrackTrials`); a resumed sweep keeps its first start's.
    """
    from ray import tune

    sweep.check()
    cfg = sweep.base_config()
    _check_data(sweep)
    if sweep.window_note():
        log.info("%s", sweep.window_note())
    if sweep.encoder:
        from clman import checkpoint as ckpt

        state = ckpt.load_checkpoint(sweep.encoder)
        if state.get("kind") not in ("simclr", "classifier", "encoder"):
            raise ckpt.CheckpointError(f"{sweep.encoder}: a {state.get('kind')!r} checkpoint holds no encoder")
    sweep_uri = storage.join(sweep.run_dir, SWEEP_FILE)
    if not resume and storage.exists(sweep_uri):
        raise JobError(
            f"sweep {sweep.run_name!r} already exists under {sweep.out}; continue it with "
            f"--resume {sweep.run_name}, or choose another --run-name"
        )
    session.init_ray(address)
    import ray

    resources.check_resources(cfg.scale, cfg.data, extra_cpus=DRIVER_CPUS)
    concurrent = max_concurrent_trials(ray.cluster_resources(), cfg)
    if not resume:
        storage.write_text(sweep_uri, json.dumps(sweep.to_dict(), indent=2) + "\n")
    space = sweep.search_space()
    log.info(
        "sweep %s: %s over %s, %d sample(s), %s scheduler, %s search, up to %d trial(s) at once -> %s",
        sweep.run_name,
        sweep.job,
        ", ".join(f"{p.key} {p.describe()}" for p in space.params),
        sweep.samples,
        sweep.scheduler,
        sweep.search,
        concurrent,
        sweep.run_dir,
    )
    trainable = _trainable(sweep, shared_frames(sweep))
    if resume:
        fs, path = storage.arrow_fs(sweep.run_dir)
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise JobError(f"{sweep.run_dir}: no Tune experiment state to resume (did the sweep start?)")
        done = [t for t, st in trial_statuses(sweep.out, sweep.run_name).items() if st == "TERMINATED"]
        log.info("resuming sweep %s: %d finished trial(s) kept", sweep.run_name, len(done))
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=restart_errored,
            storage_filesystem=fs,
        )
    else:
        tuner = _tuner(sweep, trainable, concurrent, track)
    t0 = time.time()
    tuner.fit()
    log.info("sweep %s: trials done in %.0f s", sweep.run_name, time.time() - t0)
    return write_results(sweep, collect(sweep.out, sweep.run_name, space.keys))


def collect(out: str, run_name: str, keys: Sequence[str]) -> list[TrialRecord]:
    """Every trial of the sweep stored under ``<out>/<run_name>/``, read back through Tune."""
    from ray.tune import ExperimentAnalysis

    fs, path = storage.arrow_fs(storage.join(out, run_name))
    analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        error = None
        if trial.status == "ERROR":
            try:
                err = trial.get_pickled_error() or trial.get_error()
            except Exception as e:  # a missing error file must not lose the table
                err = f"{type(e).__name__}: error file unreadable"
            error = error_line(str(err), limit=300) if err is not None else "error"
        config = {k: trial.config.get(k) for k in keys}
        records.append(TrialRecord(trial.trial_id, trial.status, config, frames.get(trial.trial_id), error))
    return records
