"""Driver-side plumbing shared by the jobs and Tune: Ray start-up, the TorchTrainer, outputs.

The per-worker loops are in ``pretrain.py`` and ``finetune.py``; this module
only builds Ray configs from a job config and checks, before any worker
starts, that the cluster can hold the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clman import storage
from clman.config import ScaleConfig
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
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    # Ray Data's per-operator progress bars flood job logs; the loops log epoch, loss and speed.
    ray.data.DataContext.get_current().enable_progress_bars = False


def check_resources(scale: ScaleConfig, extra_cpus: float = 0.0) -> None:
    """Fail before any worker starts when the cluster cannot hold the workers."""
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


def run_config(out: str, run_name: str, scale: ScaleConfig, score: str | None) -> RunConfig:
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
    )


def fit(
    loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    scale: ScaleConfig,
    datasets: dict,
    out: str,
    run_name: str,
    score: str | None = None,
):
    """Run ``loop`` on ``scale.num_workers`` Ray Train workers; return the Ray ``Result``."""
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(scale),
        run_config=run_config(out, run_name, scale, score),
        datasets=datasets,
    )
    result = trainer.fit()
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
