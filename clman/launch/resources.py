"""What a run, or a Tune trial, needs of the Ray cluster, and waiting for the autoscaler to add it.

A run needs ``num_workers x cpus_per_worker`` CPUs (and GPUs) for its workers and
``decode_tasks x decode_cpus`` for its decode tasks (:func:`decode_cpus`); a Tune trial needs a
sliver more for its driver (:data:`DRIVER_CPUS`). :func:`max_concurrent_trials` is what the cluster
holds of that at once, so no trial sits holding a driver while its workers wait.

Facts that shaped the resource check:
- ``ray.cluster_resources()`` counts the nodes present *now*. On an autoscaling
  cluster (KubeRay, or the cluster launcher with ``min_workers: 0``, the usual GPU
  set-up) the GPU nodes appear only once something asks for them, so a job that
  refused to start without them could never start. Attached to a cluster, a job
  asks the autoscaler for its workers' bundles (``request_resources``, a hint that
  persists until overridden, so it is cleared once the nodes are there) and waits
  up to ``scale.resource_timeout``; a cluster without an autoscaler just times out.
- A Ray that ``clman.launch.session.init_ray`` started on this machine cannot grow: it fails at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import ray

from clman.config import DataConfig, ScaleConfig
from clman.errors import JobError
from clman.launch import session

log = logging.getLogger(__name__)

# A trial's driver only starts a TorchTrainer and waits; Ray needs a non-empty bundle.
DRIVER_CPUS = 0.01
WAIT_POLL_S = 5.0  # seconds between looks at the cluster while waiting for the autoscaler
WAIT_LOG_S = 60.0  # seconds between "still waiting" lines


def decode_cpus(data) -> float:
    """CPUs the decode tasks of one run must find besides its workers (one task when ``auto``)."""
    return (1 if data.decode_tasks == "auto" else data.decode_tasks) * data.decode_cpus


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


def resource_needs(scale: ScaleConfig, data: DataConfig, extra_cpus: float = 0.0) -> dict[str, float]:
    """What one run needs of the cluster in all: its workers, their decode tasks and ``extra_cpus``."""
    need = {"CPU": scale.cpus_per_worker * scale.num_workers + decode_cpus(data) + extra_cpus}
    if scale.gpus_per_worker > 0:
        need["GPU"] = scale.gpus_per_worker * scale.num_workers
    return need


def resource_bundles(scale: ScaleConfig, data: DataConfig, extra_cpus: float = 0.0) -> list[dict[str, float]]:
    """The shapes the autoscaler must place: one bundle per worker, one for decoding and the rest."""
    worker = {"CPU": scale.cpus_per_worker}
    if scale.gpus_per_worker > 0:
        worker["GPU"] = scale.gpus_per_worker
    rest = decode_cpus(data) + extra_cpus
    return [dict(worker) for _ in range(scale.num_workers)] + ([{"CPU": rest}] if rest > 0 else [])


def shortfall(need: Mapping[str, float], total: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """{resource: (needed, present)} for every resource ``total`` holds too little of."""
    return {k: (v, float(total.get(k, 0.0))) for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}


def describe_shortfall(missing: Mapping[str, tuple[float, float]]) -> str:
    """'2 GPU more (needs 2, has 0), ...': what to add beside what is there, GPUs first."""
    items = sorted(missing.items(), key=lambda kv: kv[0] != "GPU")
    return ", ".join(f"{need - have:g} {k} more (needs {need:g}, has {have:g})" for k, (need, have) in items)


def _ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to fit ``bundles`` now; [] withdraws the request. A hint: never fatal."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # no autoscaler API on this cluster: waiting still works if nodes come
        log.debug("request_resources(%s) failed: %s: %s", bundles, type(e).__name__, e)


def wait_for_resources(
    need: Mapping[str, float],
    bundles: list[dict[str, float]],
    timeout: float,
    *,
    read: Callable[[], Mapping[str, float]] = ray.cluster_resources,
    ask: Callable[[list], None] = _ask_autoscaler,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = WAIT_POLL_S,
    log_every_s: float = WAIT_LOG_S,
) -> float:
    """Wait until the cluster (``read()``) holds ``need``; return the seconds waited.

    Asks the autoscaler for ``bundles`` while waiting and withdraws the request at the end
    (it would otherwise keep the nodes up after the job). After ``timeout`` s: a one-line
    :class:`JobError` naming what is still missing.
    """
    start = clock()
    missing = shortfall(need, read())
    if not missing:
        return 0.0
    ask(bundles)
    try:
        last_log = None
        while missing:
            waited = clock() - start
            if waited >= timeout:
                raise JobError(
                    f"scale: the Ray cluster still lacks {describe_shortfall(missing)} after {waited:.0f} s "
                    f"waiting for the autoscaler (scale.resource_timeout={timeout:g}); check the cluster's "
                    "worker node types and max_workers, or lower scale.num_workers / scale.gpus_per_worker / "
                    "scale.cpus_per_worker"
                )
            if last_log is None or clock() - last_log >= log_every_s:
                log.info(
                    "waiting for the autoscaler (%.0f of %g s): the run needs %s",
                    waited,
                    timeout,
                    describe_shortfall(missing),
                )
                last_log = clock()
            sleep(max(0.0, min(poll_s, timeout - waited)))
            missing = shortfall(need, read())
    finally:
        ask([])
    waited = clock() - start
    log.info("the Ray cluster holds the run after %.0f s of waiting", waited)
    return waited


def check_resources(scale: ScaleConfig, data: DataConfig, extra_cpus: float = 0.0) -> None:
    """Before any worker starts: the cluster must hold the workers and their decoders.

    A Ray started here fails at once; attached to a cluster, the job waits up to
    ``scale.resource_timeout`` s for the autoscaler (:func:`wait_for_resources`).
    """
    need = resource_needs(scale, data, extra_cpus)
    total = ray.cluster_resources()
    if not shortfall(need, total):
        return
    if session.attached():
        wait_for_resources(need, resource_bundles(scale, data, extra_cpus), scale.resource_timeout)
        return
    gpus_needed = need.get("GPU", 0.0)
    if gpus_needed > total.get("GPU", 0.0):
        raise JobError(
            f"scale: {scale.num_workers} worker(s) x {scale.gpus_per_worker} GPU asked for, "
            f"but the Ray cluster has {total.get('GPU', 0.0):g} GPU(s); set scale.gpus_per_worker=0 for CPU workers"
        )
    extra_cpus += decode_cpus(data)
    raise JobError(
        f"scale: {scale.num_workers} worker(s) x {scale.cpus_per_worker} CPU + {extra_cpus:g} CPU for "
        f"decoding asked for, but the Ray cluster has {total.get('CPU', 0.0):g} CPU(s); "
        "lower scale.cpus_per_worker or scale.num_workers"
    )
