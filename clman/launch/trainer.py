"""A run on Ray Train, from the driver: a TrainJob -> TorchTrainer -> fit -> the kept checkpoint.

``finetune_job`` and ``pretrain_job`` (below) say what the workers run
(:class:`TrainJob`, its frames from :func:`frame_source`); this module builds the Ray configs around
it (scaling, storage under ``<out>/<run_name>/``, checkpoints kept by score), runs it and turns a
failure into one line (:func:`error_line`, :func:`failure_line`: the error helper of the whole driver side).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clman import progress, run_lock, storage, tracking
from clman import config as C
from clman.config import DataConfig, ScaleConfig
from clman.errors import JobError, error_line
from clman.launch.progress import ProgressBar
from clman.train import finetune, pretrain, worker
from clman.train.worker import CHECKPOINT_FILE

log = logging.getLogger(__name__)


def scaling_config(scale: ScaleConfig) -> ScalingConfig:
    resources: dict[str, float] = {"CPU": scale.cpus_per_worker}
    if scale.gpus_per_worker > 0:
        resources["GPU"] = scale.gpus_per_worker
    return ScalingConfig(
        num_workers=scale.num_workers, use_gpu=scale.gpus_per_worker > 0, resources_per_worker=resources
    )


def frame_source(rows, data: DataConfig) -> dict:
    """What the workers read a split from: {"videos": [Video], "cache": [ObjectRef] | None}.

    Decodes every video once into the object store when ``data.cache`` allows it
    (``clman.train.feed``); a video that does not decode is logged and left out.
    """
    from clman.train import feed

    videos = feed.videos_of(rows)
    try:
        cached = feed.plan_cache(videos, data)
    except feed.CacheTooLarge as e:
        raise JobError(str(e)) from None
    if not cached:
        return {"videos": videos, "cache": None}
    kept, refs = feed.build_cache(videos, data)
    if not kept:
        raise JobError(f"none of the {len(videos)} videos could be decoded")
    return {"videos": kept, "cache": refs}


@dataclass(frozen=True)
class TrainJob:
    """What a TorchTrainer needs for one job (:func:`finetune_job`, :func:`pretrain_job`)."""

    loop: Callable[[Any], None]  # the function every worker runs, given loop_config
    loop_config: Any  # what the loop is given: a ``clman.train.worker.LoopInputs``
    datasets: dict  # Ray datasets by name, if any (the clman loops read frames through loop_config)
    score: str | None = None  # the metric that ranks checkpoints (None: keep the latest)


def run_config(
    out: str, run_name: str, scale: ScaleConfig, score: str | None, callbacks: Sequence[Any] = ()
) -> RunConfig:
    """Checkpoints under ``<out>/<run_name>/`` on local disk or S3 (same name = resume)."""
    run_lock.check_run_name(run_name)
    fs, path = storage.arrow_fs(out)
    return RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=scale.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=score,
            checkpoint_score_order="max",
        )
        if score
        else CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks) or None,
        # Ray Train's INFO lines (worker group start-up, "Checkpoint successfully created ...",
        # DDP set-up) repeat what the jobs log; they stay in Ray's session log files. Not
        # "Reporting training result ...": Ray 2.60 logs it on a logger named after its file
        # path, outside ray.train, which this setting does not reach; the workers quiet it
        # themselves (_quiet_loop).
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def _quiet_loop(loop: Callable[[Any], None], config: dict) -> None:
    """What every worker runs: Ray Train's per-report INFO line off, then the job's loop."""
    from clman.launch import ray_compat

    try:
        ray_compat.quiet_report_lines()
    except Exception as e:  # a Ray upgrade moved it: the lines come back, the run goes on
        logging.getLogger(__name__).warning("cannot quiet Ray Train's report lines: %s", e)
    loop(config["inputs"])


class TrackEpochs(ray.train.UserCallback):
    """Every report of rank 0 to a :class:`clman.tracking.Run`, in the run's controller (driver's node)."""

    def __init__(self, run: tracking.Run):
        self.run = run

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self.run.log(metrics[0])


def trainer(job: TrainJob, scale: ScaleConfig, out: str, run_name: str, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    """The TorchTrainer of ``job`` on ``scale``'s workers, its run under ``<out>/<run_name>/``."""
    return TorchTrainer(
        functools.partial(_quiet_loop, job.loop),
        # a dict, as Ray Train's run state wants it; the loop is given the typed inputs inside
        train_loop_config={"inputs": job.loop_config},
        scaling_config=scaling_config(scale),
        run_config=run_config(out, run_name, scale, job.score, callbacks),
        datasets=job.datasets or None,
    )


def _root_cause(error: BaseException) -> BaseException:
    """The exception under Ray Train's wrappers: the controller's failure, or the lowest rank's."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        inner = getattr(error, "controller_failure", None) or (failures[min(failures)] if failures else None)
        inner = inner or error.__cause__
        if inner is None:
            break
        error = inner
    return error


def failure_line(run_name: str, error: BaseException) -> str:
    """One line for a failed run: its root cause, the S3 endpoint when storage failed, how to resume."""
    cause = _root_cause(error)
    line = error_line(cause)
    if not isinstance(cause, JobError) and not re.match(r"[\w.]+: ", line):
        line = f"{type(cause).__name__}: {line}"
    text = f"run {run_name!r} failed: {line[:400]}"
    # pyarrow's words for an expired session token or clock skew, which waiting does not cure.
    problem = storage.s3_problem(str(cause)) if "AWS Error" in str(cause) else None
    if problem:
        text += f" — {problem}; then the same --run-name resumes from the last checkpoint"
    elif "AWS Error" in str(cause) or isinstance(cause, (OSError, storage.StorageError)) and "s3" in str(cause).lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default AWS S3 endpoint"
        text += (
            f" (S3 at {endpoint} after retries); once S3 answers, the same --run-name resumes from the last checkpoint"
        )
    return text


def claim(out: str, run_name: str, record: dict, force_resume: bool = False):
    """``with trainer.claim(...)``: the run's lock held and its fingerprint checked (``clman.run_lock``).

    Taken before Ray starts: a second job with this run name is refused before any work. A run with
    no checkpoint file yet has nothing to resume, so other inputs are recorded rather than refused.
    """
    run_dir = storage.join(out, run_name)
    return run_lock.claim(
        out,
        run_name,
        record,
        force=force_resume,
        has_checkpoint=lambda: bool(storage.list_uris(run_dir, "/" + CHECKPOINT_FILE)),
    )


def fit(job: TrainJob, scale: ScaleConfig, out: str, run_name: str, tracked: tracking.Run | None = None):
    """Run ``job`` to the end; return the Ray ``Result`` (one-line :class:`JobError` when it failed).

    ``tracked``: a started :class:`clman.tracking.Run` that gets every epoch's metrics, finished here.
    """
    terminal = progress.TERMINAL.saved  # a quiet driver (clman.launch.session.divert_stderr): a bar per run
    bar = ProgressBar(job, run_name, terminal) if terminal is not None else None
    failed = True
    try:
        job = bar.job if bar is not None else job
        result = trainer(job, scale, out, run_name, callbacks=[TrackEpochs(tracked)] if tracked else ()).fit()
        failed = result.error is not None
    except ray.train.TrainingFailedError as e:  # a worker or the controller gave up (after scale.max_failures)
        raise JobError(failure_line(run_name, e)) from None
    except OSError as e:  # pyarrow, creating the run's folder or reading its state on the driver
        raise JobError(failure_line(run_name, e)) from None
    finally:
        if bar is not None:
            bar.close()
        if tracked is not None:
            tracked.finish(failed=failed)
    if result.error is not None:
        raise JobError(failure_line(run_name, result.error))
    return result


def pick_checkpoint(result, score: str | None):
    """The best checkpoint by ``score`` (when it was reported), else the latest."""
    if score and result.best_checkpoints:
        scored = [(c, m) for c, m in result.best_checkpoints if m.get(score) is not None and m[score] == m[score]]
        if scored:
            return max(scored, key=lambda cm: cm[1][score])
    if result.checkpoint is None:
        raise JobError("the run reported no checkpoint")
    return result.checkpoint, result.metrics or {}


def export_checkpoint(checkpoint: "ray.train.Checkpoint", dest_uri: str) -> None:
    """Copy the clman checkpoint file out of a Ray checkpoint to ``dest_uri`` (atomically)."""
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, CHECKPOINT_FILE), "rb") as f:
            storage.write_bytes(dest_uri, f.read())


def finetune_job(
    cfg: C.FinetuneConfig,
    manifest: str,
    encoder: str | None,
    has_val: bool,
    rows: tuple | None = None,
    sources: dict | None = None,
) -> TrainJob:
    """The finetune run of ``cfg`` on ``manifest`` (Ray must be up: the frames are cached here when they fit).

    ``rows``: (train, val) DataFrames to use instead of the manifest's splits (:func:`clman.train.finetune.validation_split`,
    then :func:`~clman.train.finetune.label_subset` for ``finetune.label_fraction``: the callers subsample, not this function).
    ``sources``: {split: ``frame_source``} made already (a sweep decodes once for all its trials).
    """
    from clman.data.manifest import read_manifest

    if cfg.label_fraction < 1 and rows is None:  # the subset is the caller's (label_subset): never ignored
        raise JobError(
            f"finetune.label_fraction={cfg.label_fraction:g}: "
            + (
                "a sweep decodes its splits once for all trials and does not subsample them; run label fractions "
                "with jobs.study --label-fractions"
                if sources is not None
                else "pass the training rows of finetune.label_subset (rows=...)"
            )
        )
    frames = {}
    for i, split in enumerate(("train", "val") if has_val else ("train",)):
        if sources is not None:
            frames[split] = sources[split]
            continue
        split_rows = rows[i] if rows is not None else read_manifest(manifest, split=split)
        # Unlabelled videos (split unlabeled, label -1) are for SimCLR only: never a finetune target.
        assert split_rows["label"].isin([0, 1]).all(), f"finetune {split} rows hold a label other than 0 / 1"
        frames[split] = frame_source(split_rows, cfg.data)
    inputs = worker.LoopInputs(cfg, frames["train"], frames.get("val"), encoder)
    return TrainJob(finetune.train_loop_per_worker, inputs, {}, finetune.SCORE if has_val else None)


def pretrain_job(
    cfg: C.PretrainConfig, manifest: str, split, clips: int | None = None, source: dict | None = None
) -> TrainJob:
    """The pretrain run of ``cfg`` on the clips of ``split``, a split or a sequence of them (Ray must be up:
    the frames are cached here when they fit). ``clips`` is unused (kept for callers that count first).
    ``source``: the splits' :func:`frame_source` made already (a sweep decodes once for all its trials)."""
    from clman.data.manifest import read_manifest

    if source is None:
        source = frame_source(read_manifest(manifest, split=split), cfg.data)
    return TrainJob(pretrain.train_loop_per_worker, worker.LoopInputs(cfg, source), {})
