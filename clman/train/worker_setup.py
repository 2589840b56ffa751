"""What runs first in every worker process of a Ray that ``runner.init_ray`` started here.

Ray runs ``worker_process_setup_hook`` in every worker it starts: the decode tasks, Ray
Data's actors and Train's small helper actors as well as the Train workers. Whatever the
hook's module imports, each of them imports: from ``clman.train.runner`` that was torch,
ray.train and ray.data, ~3.3 s of CPU per process, ~40 s of a tiny finetune's 73 s on a
2-core machine (13 worker processes). This module imports only the standard library;
the one Ray internal it patches is patched when, and in the process where, Ray imports it.
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
        raise AttributeError(f"{module.__name__}.is_actor_alive is gone: the PlacementGroupCleaner patch "
                             "(clman.train.worker_setup) needs updating for this Ray")
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
