"""The hook every worker of a locally started Ray runs first: cheap, and its Ray patch still lands."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from clman.launch import ray_compat

CODE = """
import sys
from clman.launch.ray_compat import PG_CLEANER, actor_alive, setup_local_worker
setup_local_worker()
heavy = sorted(m for m in ("torch", "ray", "ray.train", "ray.data", "numpy") if m in sys.modules)
assert not heavy, f"the hook imported {heavy}: every Ray worker process would pay for it"
import importlib
module = importlib.import_module(PG_CLEANER)  # as Ray does when it starts Train's cleaner actor
assert module.is_actor_alive is actor_alive, "Train's PlacementGroupCleaner was not patched"
"""


def test_hook_imports_nothing_heavy_and_patches_the_cleaner_when_ray_imports_it():
    """Fails when a Ray upgrade moves or renames ``placement_group_cleaner.is_actor_alive``."""
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_after_import_patches_a_module_already_imported_and_once_only(monkeypatch):
    calls = []
    ray_compat.after_import("json", calls.append)  # imported long ago: patched now
    assert [m.__name__ for m in calls] == ["json"]
    before = list(sys.meta_path)
    ray_compat.after_import("clman_no_such_module_xyz", calls.append)
    with pytest.raises(ModuleNotFoundError):
        __import__("clman_no_such_module_xyz")
    assert sys.meta_path == before, "the finder stays after the module it waits for was looked up"


def test_moved_cleaner_is_a_loud_error_not_a_silent_no_op():
    with pytest.raises(AttributeError, match="is_actor_alive is gone"):
        ray_compat.patch_pg_cleaner(types.ModuleType("placement_group_cleaner"))


def test_replay_into_asha_fills_the_rungs_and_stops_nothing():
    """ASHA's private state as this Ray has it: fails when an upgrade renames it."""
    from ray.tune.schedulers import ASHAScheduler

    class Stub:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    sched = ASHAScheduler(time_attr="epochs_done", max_t=4, grace_period=1, reduction_factor=2)
    sched.set_search_properties("val_auc", "max")
    rows = [{"trial_id": t, "epochs_done": 1, "val_auc": v} for t, v in (("a", 0.6), ("b", 0.4), ("c", None))]
    assert ray_compat.replay_into_asha(sched, rows, Stub) == 2
    assert sched._num_stopped == 0 and not sched._trial_info  # the stand-ins are gone again
    late = Stub("late")
    sched.on_trial_add(None, late)
    assert sched.on_trial_result(None, late, {"epochs_done": 1, "val_auc": 0.45}) == "STOP"  # below the median 0.5


def test_tune_no_longer_copies_credentials_into_trial_runtime_envs(monkeypatch):
    from ray.tune.execution import class_cache

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", set(class_cache.ENV_VARS_TO_PROPAGATE))
    # Ray's own list holds them: when a Ray upgrade drops them, this patch can go.
    assert set(ray_compat.CREDENTIAL_VARS) <= class_cache.ENV_VARS_TO_PROPAGATE
    ray_compat.keep_credentials_out_of_tune()
    assert not set(ray_compat.CREDENTIAL_VARS) & class_cache.ENV_VARS_TO_PROPAGATE
    assert "RAY_TRAIN_V2_ENABLED" in class_cache.ENV_VARS_TO_PROPAGATE  # Train's own still travel
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-in-any-runtime-env")

    class Trainable:
        pass

    remote = class_cache._ActorClassCache().get(Trainable)
    assert "not-in-any-runtime-env" not in repr(remote._default_options)
    monkeypatch.delattr(class_cache, "ENV_VARS_TO_PROPAGATE")
    with pytest.raises(AttributeError, match="credentials patch"):
        ray_compat.keep_credentials_out_of_tune()
