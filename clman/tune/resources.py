"""How many trials a cluster holds at once (Ray-free: it reads a ``ray.cluster_resources()`` dict).

A trial needs ``num_workers x cpus_per_worker`` CPUs (and GPUs) for its workers,
``decode_tasks x decode_cpus`` for its decode tasks and a sliver for its driver;
``max_concurrent_trials`` is what the cluster holds of that at once, so no trial sits
holding a driver while its workers wait.
"""

from __future__ import annotations

import math
from typing import Mapping

from clman.errors import JobError

# A trial's driver only starts a TorchTrainer and waits; Ray needs a non-empty bundle.
DRIVER_CPUS = 0.01


def max_concurrent_trials(resources: Mapping[str, float], cfg) -> int:
    """How many trials of ``cfg`` the cluster ``resources`` (ray.cluster_resources()) holds at once."""
    scale = cfg.scale
    per_trial = scale.num_workers * scale.cpus_per_worker + decode_cpus(cfg.data) + DRIVER_CPUS
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


def decode_cpus(data) -> float:
    """CPUs the decode tasks of one run must find besides its workers (one task when ``auto``)."""
    return (1 if data.decode_tasks == "auto" else data.decode_tasks) * data.decode_cpus
