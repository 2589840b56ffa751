"""The hook every worker of a locally started Ray runs first: cheap, and its Ray patch still lands."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from clman.train import worker_setup

CODE = """
import sys
from clman.train.worker_setup import PG_CLEANER, actor_alive, setup_local_worker
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
    worker_setup.after_import("json", calls.append)  # imported long ago: patched now
    assert [m.__name__ for m in calls] == ["json"]
    before = list(sys.meta_path)
    worker_setup.after_import("clman_no_such_module_xyz", calls.append)
    with pytest.raises(ModuleNotFoundError):
        __import__("clman_no_such_module_xyz")
    assert sys.meta_path == before, "the finder stays after the module it waits for was looked up"


def test_moved_cleaner_is_a_loud_error_not_a_silent_no_op():
    with pytest.raises(AttributeError, match="is_actor_alive is gone"):
        worker_setup.patch_pg_cleaner(types.ModuleType("placement_group_cleaner"))
