"""Driver-side plumbing shared by the jobs and Tune: Ray start-up, the TorchTrainer, outputs.

The per-worker loops are in ``pretrain.py`` and ``finetune.py``; this module
only builds Ray configs from a job config and checks, before any worker
starts, that the cluster can hold the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clman import storage
from clman.config import DataConfig, ScaleConfig
from clman.train.worker import CHECKPOINT_FILE

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A job cannot start or finish; the message is one line naming the cause."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to ``address`` / ``RAY_ADDRESS`` when set, else start Ray on this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Train V2 is the default in Ray 2.60; pin it so a cluster with an older default agrees.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # No dashboard (it needs ray[default] and a CPU of its own); the hook below makes up for
        # the one thing Ray Train uses it for. Ray Data's per-operator progress bars flood job logs
        # (the loops log epoch, loss and speed): off in every worker process, Tune trials included.
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "clman.train.runner.setup_local_worker",
                              "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False


def _actor_alive(actor_id: str, timeout: float | None = None) -> bool:
    """Whether the actor is not DEAD, asked of the GCS directly (no dashboard needed)."""
    from ray._private.state import state

    info = state.actor_table(actor_id)
    return bool(info) and info.get("State") != "DEAD"


def setup_local_worker() -> None:
    """Runs in every worker process of a Ray that :func:`init_ray` started here.

    Ray Train starts, for every run, a detached ``PlacementGroupCleaner`` that
    polls whether the run's controller is alive through the State API, which
    lives in the dashboard. Without one the poll fails every second (a
    warning line each time, in the job's log) and the cleaner never ends: one
    leaked process per run whose controller died (every trial ASHA stops),
    and the stopped trial's placement group is never released. Answering the
    poll from the GCS makes the cleaner work as on a cluster with a dashboard.
    Any failure here only keeps Ray's own behaviour: the hook must never stop
    a worker from starting.
    """
    try:
        from ray.train.v2._internal.execution.controller import placement_group_cleaner

        placement_group_cleaner.is_actor_alive = _actor_alive
    except Exception as e:  # a Ray upgrade moved it: the warnings come back, nothing breaks
        log.debug("PlacementGroupCleaner not patched: %s: %s", type(e).__name__, e)


def decode_cpus(data: DataConfig) -> float:
    """CPUs the decode tasks of one run must find besides its workers (one task when ``auto``)."""
    return (1 if data.decode_tasks == "auto" else data.decode_tasks) * data.decode_cpus


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


def check_resources(scale: ScaleConfig, data: DataConfig, extra_cpus: float = 0.0) -> None:
    """Fail before any worker starts when the cluster cannot hold the workers and their decoders."""
    extra_cpus += decode_cpus(data)
    total = ray.cluster_resources()
    gpus_needed = scale.gpus_per_worker * scale.num_workers
    if gpus_needed > total.get("GPU", 0.0):
        raise JobError(
            f"scale: {scale.num_workers} worker(s) x {scale.gpus_per_worker} GPU asked for, "
            f"but the Ray cluster has {total.get('GPU', 0.0):g} GPU(s); set scale.gpus_per_worker=0 for CPU workers"
        )
    cpus_needed = scale.cpus_per_worker * scale.num_workers + extra_cpus
    if cpus_needed > total.get("CPU", 0.0) + 1e-9:
        raise JobError(
            f"scale: {scale.num_workers} worker(s) x {scale.cpus_per_worker} CPU + {extra_cpus:g} CPU for "
            f"decoding asked for, but the Ray cluster has {total.get('CPU', 0.0):g} CPU(s); "
            "lower scale.cpus_per_worker or scale.num_workers"
        )


def scaling_config(scale: ScaleConfig) -> ScalingConfig:
    resources: dict[str, float] = {"CPU": scale.cpus_per_worker}
    if scale.gpus_per_worker > 0:
        resources["GPU"] = scale.gpus_per_worker
    return ScalingConfig(
        num_workers=scale.num_workers, use_gpu=scale.gpus_per_worker > 0, resources_per_worker=resources
    )


@dataclass(frozen=True)
class TrainJob:
    """What a TorchTrainer needs for one job (``finetune.train_job``, ``pretrain.train_job``)."""

    loop: Callable[[dict], None]  # the function every worker runs
    loop_config: dict[str, Any]
    datasets: dict  # Ray datasets by name, if any (the clman loops read frames through loop_config)
    score: str | None = None  # the metric that ranks checkpoints (None: keep the latest)


def run_config(out: str, run_name: str, scale: ScaleConfig, score: str | None,
               callbacks: Sequence[Any] = ()) -> RunConfig:
    """Checkpoints under ``<out>/<run_name>/`` on local disk or S3 (same name = resume)."""
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
    )


def trainer(job: TrainJob, scale: ScaleConfig, out: str, run_name: str,
            callbacks: Sequence[Any] = ()) -> TorchTrainer:
    """The TorchTrainer of ``job`` on ``scale``'s workers, its run under ``<out>/<run_name>/``."""
    return TorchTrainer(
        job.loop,
        train_loop_config=job.loop_config,
        scaling_config=scaling_config(scale),
        run_config=run_config(out, run_name, scale, job.score, callbacks),
        datasets=job.datasets or None,
    )


def fit(job: TrainJob, scale: ScaleConfig, out: str, run_name: str):
    """Run ``job`` to the end; return the Ray ``Result`` (one-line :class:`JobError` when it failed)."""
    result = trainer(job, scale, out, run_name).fit()
    if result.error is not None:
        raise JobError(f"run {run_name!r} failed: {result.error}")
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
