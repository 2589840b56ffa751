"""Ray Tune sweeps of finetune or pretrain: every trial drives its own Ray Train run.

    Tuner ──trial (0.01 CPU)──▶ train_driver(config) ──▶ TorchTrainer(train_loop_per_worker)
      │  ASHA / FIFO, random / Optuna              │  RunConfig(callbacks=[EpochReport()])
      ◀──────── every epoch's ray.train.report ────┘  (Train V2's TuneReportCallback)

A trial's config is the sweep's base config (preset + ``--set``) with the
trial's sampled values set (``clman.tune_space``). Each epoch the worker loop
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

Resume: ``Tuner.restore`` keeps finished trials and continues unfinished ones
(each Train run from its last checkpoint, as its name is the trial id). Tune
does not save ASHA's rungs, so ``ResumableASHA`` replays the stored results
into them first. Restoring unpickles Tune's state: resume only sweeps whose
storage you trust.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import yaml
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from clman import config as C
from clman import storage
from clman.metrics import METRIC_NAMES
from clman.train.runner import JobError
from clman.tune_space import SearchSpace, SpaceError, space_from_dict

log = logging.getLogger(__name__)

JOBS = ("finetune", "pretrain")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
# Which reported metric ranks trials, and which way.
SCORES = {"finetune": ("val_auc", "max"), "pretrain": ("loss", "min")}
# val_auc first (it ranks the trials), then the rest in the paper's order.
VAL_METRICS = ("val_auc",) + tuple(f"val_{k}" for k in METRIC_NAMES if k != "auc")
TABLE_METRICS = {"finetune": VAL_METRICS + ("val_loss", "train_loss"), "pretrain": ("loss",)}
PLOT_FILES = {"finetune": "auc_vs_lr.png", "pretrain": "loss_vs_lr.png"}
# A trial's driver only starts a TorchTrainer and waits; Ray needs a non-empty bundle.
DRIVER_CPUS = 0.01
TIME_ATTR = "epochs_done"  # 1-based epoch count, added to every report (ASHA's clock)
TRAIN_DIR = "train"  # <out>/<run-name>/train/<trial-id>/: each trial's Ray Train run
SWEEP_FILE = "sweep.json"
# Tune's per-report bookkeeping that the result tables leave out.
_BOOKKEEPING = {
    "done", "date", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "trial_id", "training_iteration",
}


# ---------------------------------------------------------------- the sweep's arguments


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep needs; saved as ``sweep.json`` beside it so a resume needs only the name."""

    job: str
    space: dict  # flat {dotted key: {kind: [...]}}, as read from space_file
    samples: int
    manifest: str
    out: str
    run_name: str
    tree: dict = field(default_factory=dict)  # base config sections (preset + --set), resolved
    space_file: str = "<space>"
    config: str | None = None  # preset path, for the record
    overrides: tuple[str, ...] = ()
    scheduler: str = "asha"
    search: str = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    encoder: str | None = None  # finetune: encoder.pt from pretrain
    split: str = "train"  # pretrain: the manifest split whose frames are used

    def check(self) -> None:
        if self.job not in JOBS:
            raise C.ConfigError(f"--job {self.job!r}: not one of {list(JOBS)}")
        if self.scheduler not in SCHEDULERS:
            raise C.ConfigError(f"--scheduler {self.scheduler!r}: not one of {list(SCHEDULERS)}")
        if self.search not in SEARCHES:
            raise C.ConfigError(f"--search {self.search!r}: not one of {list(SEARCHES)}")
        if self.samples < 1:
            raise C.ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.grace_period < 1:
            raise C.ConfigError(f"--grace-period must be >= 1 epoch, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise C.ConfigError(f"--reduction-factor must be >= 2, got {self.reduction_factor}")
        if not self.run_name or "/" in self.run_name:
            raise C.ConfigError(f"--run-name {self.run_name!r}: a folder name without '/'")
        if self.encoder and self.job != "finetune":
            raise C.ConfigError("--encoder applies to finetune sweeps only")
        space = self.search_space()
        if self.search == "optuna" and space.has_grid:
            raise SpaceError(f"{self.space_file}: 'grid' needs --search random; Optuna samples, it "
                             "does not enumerate (use choice)")
        epochs = self.max_epochs()
        if self.scheduler == "asha" and self.grace_period > epochs:
            raise C.ConfigError(f"--grace-period {self.grace_period} is more than the {epochs} epoch(s) "
                                "a trial runs; lower it or raise the epochs")

    def search_space(self) -> SearchSpace:
        return space_from_dict(self.space, self.job, self.tree, source=self.space_file)

    def base_config(self):
        return C.job_config(self.tree, self.job)

    def trial_config(self, values: Mapping[str, Any]):
        """The job config of one trial: the base config with the trial's sampled values."""
        return C.job_config(self.search_space().apply(self.tree, values), self.job)

    def max_epochs(self) -> int:
        """The most epochs any trial runs (ASHA's max_t)."""
        param = self.search_space().get(f"{self.job}.epochs")
        return int(param.largest()) if param is not None else self.base_config().epochs

    @property
    def run_dir(self) -> str:
        return storage.join(self.out, self.run_name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = list(self.overrides)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Sweep":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise C.ConfigError(f"sweep.json: unknown key {unknown[0]!r}; written by another clman version?")
        d = dict(d)
        d["overrides"] = tuple(d.get("overrides") or ())
        return cls(**d)


def new_sweep(job: str, space_file: str, samples: int, manifest: str, out: str, run_name: str | None = None,
              config: str | None = None, overrides: Sequence[str] = (), **options) -> Sweep:
    """Load the preset and the space file and check them together; nothing is started."""
    from clman import tune_space

    tree = C.load_tree(config, list(overrides))
    tune_space.job_sections(job)  # a clear error for a bad --job before the space is read
    space = tune_space.load_space(space_file, job, tree)
    run_name = run_name or f"tune-{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep = Sweep(job=job, space=space.to_dict(), samples=samples, manifest=manifest, out=out,
                  run_name=run_name, tree=tree, space_file=space_file, config=config,
                  overrides=tuple(overrides), **options)
    sweep.check()
    return sweep


def load_sweep(out: str, run_name: str) -> Sweep:
    """The ``Sweep`` saved under ``<out>/<run_name>/sweep.json``."""
    uri = storage.join(out, run_name, SWEEP_FILE)
    try:
        d = json.loads(storage.read_text(uri))
    except storage.StorageNotFoundError:
        raise JobError(f"{uri}: no such sweep to resume (is --out the same as the sweep's?)") from None
    # The sweep may have moved (copied to another bucket): the --out given now wins.
    return dataclasses.replace(Sweep.from_dict(d), out=out)


# ---------------------------------------------------------------- resources


def max_concurrent_trials(resources: Mapping[str, float], cfg) -> int:
    """How many trials of ``cfg`` the cluster ``resources`` (ray.cluster_resources()) holds at once."""
    from clman.train import runner

    scale = cfg.scale
    per_trial = scale.num_workers * scale.cpus_per_worker + runner.decode_cpus(cfg.data) + DRIVER_CPUS
    n = math.floor(resources.get("CPU", 0.0) / per_trial + 1e-9)
    if scale.gpus_per_worker > 0:
        n = min(n, math.floor(resources.get("GPU", 0.0) / (scale.num_workers * scale.gpus_per_worker) + 1e-9))
    if n < 1:
        raise JobError(
            f"one trial needs {per_trial:g} CPU(s) and {scale.num_workers * scale.gpus_per_worker:g} GPU(s) "
            f"but the Ray cluster has {resources.get('CPU', 0.0):g} CPU(s) and {resources.get('GPU', 0.0):g} "
            "GPU(s); lower scale.num_workers, scale.cpus_per_worker, scale.gpus_per_worker or data.decode_cpus"
        )
    return n


# ---------------------------------------------------------------- one trial


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


def _train_job(sweep: Sweep, cfg):
    """The trial's ``runner.TrainJob``: the same loop, datasets and checkpoint score as the job itself."""
    if sweep.job == "finetune":
        from clman.train import finetune

        return finetune.train_job(cfg, sweep.manifest, sweep.encoder, has_val=True)
    from clman.train import pretrain

    return pretrain.train_job(cfg, sweep.manifest, sweep.split, len(pretrain.check_data(sweep.manifest, sweep.split)))


def train_driver(config: dict, sweep: dict) -> None:
    """One Tune trial: the job's config with this trial's values, fitted by a TorchTrainer.

    The Train run is named after the trial id, so a trial restarted after the
    sweep's driver died continues from its own last checkpoint.
    """
    import ray.tune

    from clman.train import runner

    s = Sweep.from_dict(sweep)
    cfg = s.trial_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = runner.trainer(_train_job(s, cfg), cfg.scale, storage.join(s.run_dir, TRAIN_DIR), trial_id,
                             callbacks=[_epoch_report_callback()])
    trainer.fit()  # raises when the run fails: Tune marks the trial ERROR with the cause


# ---------------------------------------------------------------- the sweep


def _check_data(sweep: Sweep) -> None:
    """A clear error before any trial when the manifest cannot feed the sweep's job."""
    if sweep.job == "finetune":
        from clman.train import finetune

        finetune.check_data(sweep.manifest, require_val=True)
    else:
        from clman.train import pretrain

        pretrain.check_data(sweep.manifest, sweep.split)


def reap_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many.

    Why: when ASHA stops a trial early, Tune kills the trial's actor; its Ray
    Train controller dies with it before it can remove the worker group's
    placement group. Ray keeps a placement group made by a (non-detached)
    actor until the whole job ends, and Train V2's own cleaner needs the Ray
    State API (``ray[default]``'s dashboard server, and a single Ray instance
    per host to find it), so without this the stopped trial's CPUs and GPUs
    stay reserved and the next trial waits forever. Placement groups made by
    the driver (Tune's own, one per trial) have no creator actor and are never
    touched.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.is_detached or not pg.creator_actor_dead or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED
                or ray.ActorID(pg.creator_actor_id).is_nil() or pg.creator_job_id.hex() != job):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    if removed:
        log.info("released %d placement group(s) of stopped trials' Ray Train runs", removed)
    return removed


class PlacementGroupReaper(Callback):
    """Tune callback: every few seconds, release what stopped trials' Train runs still reserve."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0
        self._failed = False

    def on_step_end(self, iteration: int, trials: list, **info):
        if self._failed or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        try:
            reap_orphaned_placement_groups()
        except Exception as e:  # a Ray upgrade may move these internals: warn once, let the sweep go on
            self._failed = True
            log.warning("cannot release stopped trials' placement groups (%s: %s); later trials may wait "
                        "for resources", type(e).__name__, e)


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
                log.warning("could not replay stored results into ASHA (%s: %s); resumed trials are "
                            "compared only with each other", type(e).__name__, e)
        super().on_trial_add(tune_controller, trial)

    def replay(self, records: Sequence["TrialRecord"]) -> int:
        """Record stored results in the rungs, in the order they were reported; returns how many."""
        rows = epochs_table(records, ())
        if rows.empty or not {TIME_ATTR, self._metric} <= set(rows.columns):
            return 0
        if "timestamp" in rows.columns:
            rows = rows.sort_values("timestamp", kind="stable")
        stubs = {t: _StoredTrial(t) for t in rows["trial_id"].unique()}
        stopped_before = self._num_stopped
        for stub in stubs.values():
            super().on_trial_add(None, stub)
        n = 0
        for row in rows.to_dict("records"):
            if pd.notna(row[self._metric]):
                super().on_trial_result(None, stubs[row["trial_id"]], row)  # its decisions are moot
                n += 1
        for stub in stubs.values():
            self._trial_info.pop(stub.trial_id, None)
        self._num_stopped = stopped_before  # replayed decisions stopped nothing
        log.info("ASHA: replayed %d stored result(s) of %d trial(s) into its rungs", n, len(stubs))
        return n


def _tuner(sweep: Sweep, trainable, concurrent: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    metric, mode = SCORES[sweep.job]
    if sweep.scheduler == "asha":
        scheduler = ResumableASHA(sweep.out, sweep.run_name, time_attr=TIME_ATTR, max_t=sweep.max_epochs(),
                                  grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor,
                                  # A trial at max_t ends by itself: let its Train run finish cleanly.
                                  stop_last_trials=False)
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
    fs, path = storage.arrow_fs(sweep.out)
    return tune.Tuner(
        trainable,
        param_space=sweep.search_space().to_tune(),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=search_alg,
                                    num_samples=sweep.samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=sweep.run_name, storage_path=path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[PlacementGroupReaper()]),
    )


def _trainable(sweep: Sweep):
    from ray import tune

    return tune.with_resources(tune.with_parameters(train_driver, sweep=sweep.to_dict()), {"CPU": DRIVER_CPUS})


def run_sweep(sweep: Sweep, address: str | None = None, resume: bool = False,
              restart_errored: bool = False) -> dict:
    """Run (or, with ``resume``, continue) ``sweep``; write the result files; return their URIs.

    A resumed sweep keeps its finished trials, continues the unfinished ones
    from their last checkpoints and leaves errored trials as they are unless
    ``restart_errored``.
    """
    from ray import tune

    from clman.train import runner

    sweep.check()
    cfg = sweep.base_config()
    _check_data(sweep)
    if sweep.encoder:
        from clman import checkpoint as ckpt

        state = ckpt.load_checkpoint(sweep.encoder)
        if state.get("kind") not in ("simclr", "classifier", "encoder"):
            raise ckpt.CheckpointError(f"{sweep.encoder}: a {state.get('kind')!r} checkpoint holds no encoder")
    sweep_uri = storage.join(sweep.run_dir, SWEEP_FILE)
    if not resume and storage.exists(sweep_uri):
        raise JobError(f"sweep {sweep.run_name!r} already exists under {sweep.out}; continue it with "
                       f"--resume {sweep.run_name}, or choose another --run-name")
    runner.init_ray(address)
    import ray

    runner.check_resources(cfg.scale, cfg.data, extra_cpus=DRIVER_CPUS)
    concurrent = max_concurrent_trials(ray.cluster_resources(), cfg)
    if not resume:
        storage.write_text(sweep_uri, json.dumps(sweep.to_dict(), indent=2) + "\n")
    space = sweep.search_space()
    log.info("sweep %s: %s over %s, %d sample(s), %s scheduler, %s search, up to %d trial(s) at once -> %s",
             sweep.run_name, sweep.job, ", ".join(f"{p.key} {p.describe()}" for p in space.params),
             sweep.samples, sweep.scheduler, sweep.search, concurrent, sweep.run_dir)
    trainable = _trainable(sweep)
    if resume:
        fs, path = storage.arrow_fs(sweep.run_dir)
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise JobError(f"{sweep.run_dir}: no Tune experiment state to resume (did the sweep start?)")
        done = [t for t, st in trial_statuses(sweep.out, sweep.run_name).items() if st == "TERMINATED"]
        log.info("resuming sweep %s: %d finished trial(s) kept", sweep.run_name, len(done))
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=restart_errored, storage_filesystem=fs)
    else:
        tuner = _tuner(sweep, trainable, concurrent)
    t0 = time.time()
    tuner.fit()
    log.info("sweep %s: trials done in %.0f s", sweep.run_name, time.time() - t0)
    return write_results(sweep)


# ---------------------------------------------------------------- results


@dataclass
class TrialRecord:
    """What Tune knows of one trial: its sampled values, status and every reported row."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict  # dotted key -> sampled value
    history: pd.DataFrame | None = None  # one row per report (epoch)
    error: str | None = None


def trial_statuses(out: str, run_name: str) -> dict[str, str]:
    """{trial id: Tune status} from the latest experiment state on storage ({} before the first save).

    Cheap enough to poll while a sweep runs.
    """
    prefix = storage.join(out, run_name)
    states = [u for u in storage.list_uris(prefix, suffix=".json")
              if u.rsplit("/", 1)[-1].startswith("experiment_state-")]
    if not states:
        return {}
    state = json.loads(storage.read_text(max(states)))  # names end in a sortable timestamp
    out_ = {}
    for item in state.get("trial_data", []):
        trial = json.loads(item[0]) if isinstance(item, (list, tuple)) else json.loads(item)
        out_[trial.get("trial_id")] = trial.get("status")
    return out_


def _one_line(text: str, limit: int = 300) -> str:
    """The innermost ``SomeError: message`` line of a (possibly nested) traceback, else its last line."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", ln)]
    line = causes[-1] if causes else (lines[-1] if lines else "")
    return line[:limit]


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
            error = _one_line(str(err)) if err is not None else "error"
        config = {k: trial.config.get(k) for k in keys}
        records.append(TrialRecord(trial.trial_id, trial.status, config, frames.get(trial.trial_id), error))
    return records


def _scalar(value):
    """Table cells: lists (e.g. nonlocal_stages) as text, numpy scalars as Python ones."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def epochs_table(records: Sequence[TrialRecord], keys: Sequence[str]) -> pd.DataFrame:
    """A row per trial per reported epoch: trial id, the trial's values, every reported metric.

    A trial restarted after a driver failure reports some epochs twice; the last report wins.
    """
    parts = []
    for r in records:
        h = r.history
        if h is None or len(h) == 0:
            continue
        h = h[[c for c in h.columns if not c.startswith("config/") and c not in _BOOKKEEPING]].copy()
        h.insert(0, "trial_id", r.trial_id)
        for i, k in enumerate(keys):
            h.insert(1 + i, k, _scalar(r.config.get(k)))
        parts.append(h)
    if not parts:
        return pd.DataFrame(columns=["trial_id", *keys, "epoch"])
    df = pd.concat(parts, ignore_index=True)
    if "epoch" in df.columns:
        df = df.drop_duplicates(["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"])
    return df.reset_index(drop=True)


def _best_row(h: pd.DataFrame, metric: str, mode: str):
    if metric not in h.columns:
        return None
    values = pd.to_numeric(h[metric], errors="coerce")
    if values.notna().sum() == 0:
        return None
    return h.loc[values.idxmax() if mode == "max" else values.idxmin()]


def trials_table(records: Sequence[TrialRecord], job: str, keys: Sequence[str],
                 planned_epochs: Mapping[str, int]) -> pd.DataFrame:
    """A row per trial: its values, status, best epoch and the metrics at that epoch, ranked best first.

    status: completed (ran all its epochs), stopped (early, by the scheduler),
    error, or Tune's status in lower case for a trial that has not ended
    (running, pending, paused). ``planned_epochs``: trial id -> epochs it was set to run.
    """
    metric, mode = SCORES[job]
    epochs = epochs_table(records, keys)
    rows = []
    for r in records:
        h = epochs[epochs["trial_id"] == r.trial_id]
        done = int(h[TIME_ATTR].max()) if TIME_ATTR in h.columns and len(h) else 0
        if r.status == "ERROR":
            status = "error"
        elif r.status == "TERMINATED":
            status = "completed" if done >= planned_epochs.get(r.trial_id, done) else "stopped"
        else:
            status = r.status.lower()
        best = _best_row(h, metric, mode) if len(h) else None
        row = {"trial_id": r.trial_id, **{k: _scalar(r.config.get(k)) for k in keys}, "status": status,
               "best_epoch": int(best["epoch"]) if best is not None and "epoch" in best else None,
               "epochs_done": done}
        for m in TABLE_METRICS[job]:
            row[m] = float(best[m]) if best is not None and m in best and pd.notna(best[m]) else float("nan")
        row["seconds"] = float(pd.to_numeric(h["time_this_iter_s"], errors="coerce").sum()) \
            if "time_this_iter_s" in h.columns else float("nan")
        ckpt_path = best.get("checkpoint_path") if best is not None else None
        row["checkpoint"] = ckpt_path if isinstance(ckpt_path, str) else ""
        row["error"] = r.error or ""
        rows.append(row)
    columns = ["trial_id", *keys, "status", "best_epoch", "epochs_done", *TABLE_METRICS[job], "seconds",
               "checkpoint", "error"]
    df = pd.DataFrame(rows, columns=columns)
    df["best_epoch"] = df["best_epoch"].astype("Int64")
    return df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable").reset_index(drop=True)


def best_tree(sweep: Sweep, trials: pd.DataFrame) -> dict | None:
    """The base config sections with the best trial's values set (None when no trial scored)."""
    metric, _ = SCORES[sweep.job]
    scored = trials[trials[metric].notna()]
    if scored.empty:
        return None
    space = sweep.search_space()
    values = {k: _unscalar(scored.iloc[0][k]) for k in space.keys}
    tree = space.apply(sweep.tree, values)
    for job in C.JOB_CONFIGS:  # the file must load as a preset: every section valid
        C.job_config(tree, job)
    return tree


def _unscalar(value):
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def _lr_key(sweep: Sweep) -> str:
    return f"{sweep.job}.lr"


def plot_png(sweep: Sweep, trials: pd.DataFrame) -> bytes:
    """The score of each trial (at its best epoch) against its learning rate, coloured by the
    other tuned field (model.mma_depth when tuned). Errored / unscored trials are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = SCORES[sweep.job]
    lr_key = _lr_key(sweep)
    keys = sweep.search_space().keys
    others = [k for k in keys if k != lr_key]
    colour_key = "model.mma_depth" if "model.mma_depth" in others else (others[0] if others else None)
    df = trials[trials[metric].notna()].copy()
    if lr_key not in df.columns:  # lr not tuned: every trial ran the base config's
        df[lr_key] = getattr(sweep.base_config(), "lr")
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    if colour_key is None:
        ax.scatter(df[lr_key], df[metric], s=30)
    else:
        groups = sorted(df[colour_key].unique(), key=lambda v: (str(type(v)), v))
        cmap = plt.get_cmap("viridis", max(len(groups), 2))
        for i, g in enumerate(groups):
            sel = df[df[colour_key] == g]
            ax.scatter(sel[lr_key], sel[metric], s=30, color=cmap(i), label=f"{g:g}" if isinstance(g, float) else str(g))
        if groups:
            ax.legend(title=colour_key, fontsize=8, title_fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel=lr_key, ylabel=f"{metric} (best epoch)",
           title=f"{sweep.run_name}: {metric} vs learning rate ({len(df)} trials)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(sweep: Sweep, trials: pd.DataFrame, tree: dict | None) -> str:
    metric, mode = SCORES[sweep.job]
    space = sweep.search_space()
    counts = trials["status"].value_counts().to_dict()
    lines = [
        f"# Sweep `{sweep.run_name}`: {sweep.job}",
        "",
        f"- space: `{sweep.space_file}` — " + "; ".join(f"`{p.key}` {p.describe()}" for p in space.params),
        f"- base config: `{sweep.config or 'defaults'}`" + (
            " with " + " ".join(f"`--set {o}`" for o in sweep.overrides) if sweep.overrides else ""),
        f"- manifest: `{sweep.manifest}`" + (f"; encoder: `{sweep.encoder}`" if sweep.encoder else ""),
        f"- {sweep.samples} sample(s), {sweep.search} search, " + (
            f"ASHA on `{metric}` ({mode}), grace period {sweep.grace_period} epoch(s), reduction factor "
            f"{sweep.reduction_factor}" if sweep.scheduler == "asha" else f"FIFO, ranked by `{metric}` ({mode})"),
        f"- {len(trials)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "",
        f"## Trials by {metric} ({'highest' if mode == 'max' else 'lowest'} first)",
        "",
        "Metrics at each trial's best epoch (0-based); `epochs` = epochs run.",
        "",
    ]
    cols = ["trial_id", *space.keys, "status", "best_epoch", "epochs_done", *TABLE_METRICS[sweep.job], "seconds"]
    heads = [c.replace("epochs_done", "epochs").replace("best_epoch", "best epoch") for c in cols]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for _, row in trials.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    errors = trials[trials["status"] == "error"]
    if len(errors):
        lines += ["", "Errors:", ""] + [f"- `{r.trial_id}`: {r.error}" for r in errors.itertuples()]
    lines += ["", "## Best config", ""]
    if tree is None:
        lines.append(f"No trial reported a finite `{metric}`.")
    else:
        best = trials.iloc[0]
        values = ", ".join(f"`{k}` = {_fmt(best[k])}" for k in space.keys)
        lines += [
            f"Trial `{best['trial_id']}` ({values}): `{metric}` {_fmt(best[metric])} at epoch "
            f"{_fmt(best['best_epoch'])}. As a preset (also in `best.yaml` beside this file):",
            "",
            "```yaml",
            yaml.safe_dump(tree, sort_keys=False).rstrip(),
            "```",
            "",
            "Train it with:",
            "",
            f"    python -m jobs.{sweep.job} --config {storage.join(sweep.run_dir, 'best.yaml')} "
            f"--manifest {sweep.manifest} --out <runs> --run-name <name>"
            + (f" --encoder {sweep.encoder}" if sweep.encoder else ""),
        ]
    lines += ["", f"![{metric} against learning rate]({PLOT_FILES[sweep.job]})", ""]
    return "\n".join(lines)


def _parquet(df: pd.DataFrame, uri: str) -> None:
    storage.write_parquet(pa.Table.from_pandas(df, preserve_index=False), uri)


def write_results(sweep: Sweep, records: Sequence[TrialRecord] | None = None) -> dict:
    """Write trials.parquet/.csv, epochs.parquet, best.yaml, summary.md and the plot under the run dir.

    ``records`` default to what Tune stored for the sweep (``collect``).
    """
    keys = sweep.search_space().keys
    if records is None:
        records = collect(sweep.out, sweep.run_name, keys)
    planned = {r.trial_id: sweep.trial_config(r.config).epochs for r in records}
    trials = trials_table(records, sweep.job, keys, planned)
    if storage.is_s3(sweep.out):  # Ray reports paths inside the filesystem: "bucket/key"
        trials["checkpoint"] = [f"s3://{p}" if p and not p.startswith("s3://") else p for p in trials["checkpoint"]]
    epochs = epochs_table(records, keys)
    tree = best_tree(sweep, trials)
    d = sweep.run_dir
    uris = {name: storage.join(d, name) for name in
            ("trials.parquet", "trials.csv", "epochs.parquet", "summary.md", PLOT_FILES[sweep.job])}
    _parquet(trials, uris["trials.parquet"])
    storage.write_text(uris["trials.csv"], trials.to_csv(index=False))
    _parquet(epochs, uris["epochs.parquet"])
    if tree is not None:
        uris["best.yaml"] = storage.join(d, "best.yaml")
        storage.write_text(uris["best.yaml"], f"# Best trial of sweep {sweep.run_name} ({sweep.job}); "
                                              f"see summary.md\n" + yaml.safe_dump(tree, sort_keys=False))
    storage.write_bytes(uris[PLOT_FILES[sweep.job]], plot_png(sweep, trials))
    storage.write_text(uris["summary.md"], summary_markdown(sweep, trials, tree))
    metric, _ = SCORES[sweep.job]
    if len(trials) and trials[metric].notna().any():
        best = trials.iloc[0]
        log.info("sweep %s: best trial %s, %s %.4f (%s)", sweep.run_name, best["trial_id"], metric, best[metric],
                 ", ".join(f"{k}={_fmt(best[k])}" for k in keys))
    unfinished = trials["status"].isin(["running", "pending", "paused"]).sum()
    if unfinished:
        log.warning("sweep %s: %d trial(s) did not finish; continue with: python -m jobs.tune --resume %s --out %s",
                    sweep.run_name, unfinished, sweep.run_name, sweep.out)
    failed = (trials["status"] == "error").sum()
    if len(trials) and failed == len(trials):
        raise JobError(f"sweep {sweep.run_name}: all {failed} trial(s) failed; first error: "
                       f"{trials['error'].iloc[0]} (tables in {d})")
    return uris
