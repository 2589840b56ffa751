"""Where Ray may be imported: ``jobs/``, ``clman/train/`` and the sweep driver ``clman/tune/driver.py``.

Everything else in ``clman`` (models, data, storage, metrics, reports, the CLI's error
handling, Tune's spaces and result tables) must import without Ray, so it can be used
and tested where Ray is not installed or not started.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clman"
RAY_PLACES = ("clman/train/", "clman/tune/driver.py")
# Old names kept for callers, each a re-export of the driver: importing them imports Ray.
RAY_SHIMS = ("clman/tuning.py",)
IMPORT_RAY = re.compile(r"^\s*(import ray\b|from ray\b)", re.MULTILINE)


def _modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_ray_is_imported_only_in_its_places():
    offenders = []
    for rel in _modules():
        if rel.startswith(RAY_PLACES):
            continue
        for m in IMPORT_RAY.finditer((ROOT / rel).read_text()):
            line = (ROOT / rel).read_text()[: m.start()].count("\n") + 1
            offenders.append(f"{rel}:{line}")
    assert not offenders, f"Ray imported outside {RAY_PLACES}: {offenders}"


def test_ray_free_modules_import_without_ray():
    """Not only the text: importing every other module must not pull Ray in through another."""
    names = [rel[:-3].replace("/", ".").removesuffix(".__init__") for rel in _modules()
             if not rel.startswith(RAY_PLACES) and rel not in RAY_SHIMS]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'ray' not in sys.modules, f'importing {name} imported Ray'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_job_error_is_the_same_class_everywhere():
    from clman import cli
    from clman.errors import JobError
    from clman.train import runner

    assert runner.JobError is JobError
    assert JobError in cli.user_errors()


def test_drivers_do_not_import_the_model_zoo_or_torchmetrics():
    """A job's driver, a Tune trial and a study trial import these modules in a fresh process each;
    torchvision (with torch._dynamo) and torchmetrics (with scipy.signal) cost ~3.5 s of CPU there and
    only the Train workers and scoring actors use them."""
    code = ("import sys\n"
            "import jobs.finetune, jobs.pretrain, jobs.study, jobs.tune, clman.train.study, clman.tune.driver\n"
            "heavy = sorted(m for m in ('torchvision', 'torchmetrics', 'scipy.signal') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


RAY_INTERNAL = re.compile(r"\bray\._private\b|\bray\.[\w.]*\._internal\b|\bray\.core\.generated\b")
RAY_COMPAT = "clman/train/ray_compat.py"


def test_ray_internals_are_used_in_ray_compat_only():
    """One module to update when a Ray upgrade moves an internal (each use there has a test that fails)."""
    offenders = []
    for rel in _modules() + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "jobs").rglob("*.py")):
        if rel == RAY_COMPAT:
            continue
        text = (ROOT / rel).read_text()
        offenders += [f"{rel}:{text[: m.start()].count(chr(10)) + 1}" for m in RAY_INTERNAL.finditer(text)]
    assert not offenders, f"Ray internals used outside {RAY_COMPAT}: {offenders}"
    assert RAY_INTERNAL.search((ROOT / RAY_COMPAT).read_text())  # the pattern still finds what it guards
