"""Every use of a Ray internal, in one module that imports only the standard library.

Each is tested to fail loudly when a Ray upgrade moves it (tests/test_ray_compat.py, and the
reaper and ASHA tests in tests/test_tune.py); here, a failure only keeps Ray's own behaviour:

- :func:`setup_local_worker`: the hook every worker of a Ray that ``session.init_ray`` started
  runs first; points Train's ``PlacementGroupCleaner`` at the GCS (no dashboard on one machine).
- :func:`reap_orphaned_placement_groups`: reads the GCS placement-group table (protobufs) for
  Tune, whose stopped trials' Train runs leave their placement groups behind.
- :func:`replay_into_asha`: ASHA's private rungs, refilled from stored results on ``--resume``.
- :func:`keep_credentials_out_of_tune`: Tune copies the driver's AWS keys into each trial's runtime_env.

Why stdlib-only: Ray runs ``worker_process_setup_hook`` in every worker it starts: the decode tasks, Ray
Data's actors and Train's small helper actors as well as the Train workers. Whatever the
hook's module (and its package, ``clman.launch``, kept empty) imports, each of them imports:
torch, ray.train and ray.data cost ~3.3 s of CPU per process, ~40 s of a tiny finetune's 73 s
on a 2-core machine (13 worker processes). This module imports only the standard library;
the one Ray internal the hook patches is patched when, and in the process where, Ray imports it;
the others import what they touch when called.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

log = logging.getLogger(__name__)

PG_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
TUNE_CLASS_CACHE = "ray.tune.execution.class_cache"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def setup_local_worker() -> None:
    """The hook. Any failure here only keeps Ray's own behaviour: it must never stop a worker.

    Ray Train starts, for every run, a detached ``PlacementGroupCleaner`` that polls
    whether the run's controller is alive through the State API, which lives in the
    dashboard. Without one the poll fails every second (a warning line each time, in the
    job's log) and the cleaner never ends: one leaked process per run whose controller
    died (every trial ASHA stops), and the stopped trial's placement group is never
    released. Answering the poll from the GCS makes the cleaner work as on a cluster
    with a dashboard.
    """
    quiet_warnings()
    after_import(PG_CLEANER, patch_pg_cleaner)


def patch_pg_cleaner(module: ModuleType) -> None:
    """Point the cleaner's liveness poll at the GCS; a loud error when a Ray upgrade moved it."""
    if not callable(getattr(module, "is_actor_alive", None)):
        raise AttributeError(
            f"{module.__name__}.is_actor_alive is gone: the PlacementGroupCleaner patch "
            "(clman.launch.ray_compat) needs updating for this Ray"
        )
    module.is_actor_alive = actor_alive


def actor_alive(actor_id: str, timeout: float | None = None) -> bool:
    """Whether the actor is not DEAD, asked of the GCS directly (no dashboard needed)."""
    from ray._private.state import state

    info = state.actor_table(actor_id)
    return bool(info) and info.get("State") != "DEAD"


def quiet_warnings() -> None:
    """Warnings that say nothing a clman user can act on, once per worker process and run.

    - DDP's "Grad strides do not match bucket view strides": the non-local block's 1x1
      convolutions get channels-last gradients; DDP copies them into its buckets (a copy,
      not an error). The fix belongs in ``clman.models`` (the weight's memory layout).
    - Deprecations inside torch, Ray and their dependencies.
    """
    warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|ray|torchvision|torchmetrics)\b")


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` once module ``name`` is imported in this process (now, if it is)."""
    if name in sys.modules:
        _apply(patch, sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, patch))


def _apply(patch: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        patch(module)
    except Exception as e:  # a Ray upgrade moved it: Ray's own behaviour (and the warnings) come back
        log.warning("%s: %s", type(e).__name__, e)


class _AfterImport(importlib.abc.MetaPathFinder):
    """A finder that finds one module the normal way and wraps its loader to patch it once loaded."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable[[ModuleType], None]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _apply(self.patch, module)

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)


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
        if (
            pg.is_detached
            or not pg.creator_actor_dead
            or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED
            or ray.ActorID(pg.creator_actor_id).is_nil()
            or pg.creator_job_id.hex() != job
        ):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    if removed:
        log.info("released %d placement group(s) of stopped trials' Ray Train runs", removed)
    return removed


def replay_into_asha(scheduler, rows, stub: Callable) -> int:
    """Record stored results (``rows``: dicts in the order they were reported, each with a ``trial_id``)
    in an ASHA scheduler's rungs, as if just reported; returns how many.

    Tune saves no scheduler state with an experiment. Uses ASHA's own ``on_trial_add`` /
    ``on_trial_result`` on stand-in trials (``stub(trial_id)``), then removes the stand-ins from
    its private ``_trial_info`` and restores its private ``_num_stopped``: the replayed decisions
    stopped nothing.
    """
    from ray.tune.schedulers import ASHAScheduler

    metric = scheduler._metric
    for name in ("_metric", "_num_stopped", "_trial_info"):
        if not hasattr(scheduler, name):
            raise AttributeError(
                f"ASHAScheduler.{name} is gone: replay_into_asha (clman.launch.ray_compat) needs updating for this Ray"
            )
    stubs = {r["trial_id"]: stub(r["trial_id"]) for r in rows}
    stopped_before = scheduler._num_stopped
    for s in stubs.values():
        ASHAScheduler.on_trial_add(scheduler, None, s)
    n = 0
    for row in rows:
        value = row.get(metric)
        if isinstance(value, (int, float)) and value == value:  # not None, NaN or pandas' NA
            ASHAScheduler.on_trial_result(scheduler, None, stubs[row["trial_id"]], row)  # its decisions are moot
            n += 1
    for trial_id in stubs:
        scheduler._trial_info.pop(trial_id, None)
    scheduler._num_stopped = stopped_before
    return n


def keep_credentials_out_of_tune() -> None:
    """Stop Tune copying this process's AWS keys into every trial actor's ``runtime_env``.

    Ray Tune (``class_cache.ENV_VARS_TO_PROPAGATE``) puts AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    and the session token into the trial actor's runtime_env; the GCS stores it, and Ray's runtime-env
    agent logs the whole env at INFO (measured: the secret key in ``runtime_env_agent.log`` of a
    one-trial sweep). A trial resolves credentials as every other process does, from its own
    environment or the AWS default chain (a local Ray's workers inherit the driver's variables).
    """
    import importlib

    module = importlib.import_module(TUNE_CLASS_CACHE)
    names = getattr(module, "ENV_VARS_TO_PROPAGATE", None)
    if not isinstance(names, set):
        raise AttributeError(
            f"{TUNE_CLASS_CACHE}.ENV_VARS_TO_PROPAGATE is gone: the credentials patch "
            "(clman.launch.ray_compat) needs updating for this Ray"
        )
    names.difference_update(CREDENTIAL_VARS)


TRAIN_CONTEXT = "ray.train.v2._internal.execution.context"


def quiet_report_lines() -> logging.Logger:
    """Ray Train's "Reporting training result N: TrainingReport(...)" line, once per worker and report, off.

    Ray 2.60 logs it at INFO in every Train worker, on a logger named after its module's *file path*
    (``logging.getLogger(__file__)``): outside ``ray.train``, so ``LoggingConfig(log_level=...)`` does
    not reach it, and it propagates to the root logger that Train sets to INFO in each worker, whose
    console handler Ray forwards to the driver: 27 of a finetune log's 74 lines. Called in the worker
    (``clman.launch.trainer.trainer`` wraps the loop), after Train has configured its logging; warnings still pass.
    """
    import importlib

    module = importlib.import_module(TRAIN_CONTEXT)
    logger = logging.getLogger(module.__file__)
    if getattr(module, "logger", None) is not logger:
        raise AttributeError(
            f"{TRAIN_CONTEXT}.logger is no longer logging.getLogger(__file__): "
            "quiet_report_lines (clman.launch.ray_compat) needs updating for this Ray"
        )
    logger.setLevel(logging.WARNING)
    return logger
