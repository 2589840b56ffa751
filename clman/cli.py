"""What every job's command line shares: config flags, scale flags, logging, and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from typing import Callable

from clman import config as C

# Errors a user can fix from the message alone: printed as one line, exit status 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (C.ConfigError, FileNotFoundError)


def user_errors() -> tuple[type[BaseException], ...]:
    from clman.checkpoint import CheckpointError
    from clman.errors import JobError
    from clman.storage import StorageError

    errors = [*_USER_ERRORS, CheckpointError, StorageError, JobError]
    # Imported lazily (they pull in numpy / pandas / PyAV); a module that is absent is skipped.
    for module, name in (
        ("clman.data.video", "VideoError"),
        ("clman.data.manifest", "ManifestError"),  # a manifest of another version, a missing column
        ("clman.data.ingest", "IngestError"),
        ("clman.data.scan_region", "ScanRegionError"),
    ):
        with contextlib.suppress(ImportError):  # a slim install without the module: nothing of it to catch
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a message with line breaks is joined with spaces)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def add_config_args(
    p: argparse.ArgumentParser,
    set_metavar: str = "SECTION.KEY=VALUE",
    set_help: str = "override one config field, e.g. --set finetune.lr=3e-4 --set model.mma_depth=2",
) -> None:
    """--config (a preset YAML) and --set (repeatable overrides, into ``overrides``).

    A job whose --set takes more than SECTION.KEY=VALUE (jobs.study's ROW: prefix) says so in
    ``set_metavar`` and ``set_help``.
    """
    p.add_argument("--config", help="preset YAML (jobs/configs/paper.yaml, jobs/configs/demo-cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=set_metavar, help=set_help)


def add_address_arg(p: argparse.ArgumentParser) -> None:
    """--address: the Ray cluster a job that starts Ray joins."""
    p.add_argument("--address", help="Ray cluster address; default: RAY_ADDRESS, else start Ray here")


def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides scale.num_workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; 0 = CPU workers with gloo")
    add_address_arg(p)
    p.add_argument(
        "--run-name",
        help="run folder under --out; the same name resumes an interrupted run "
        "(one job at a time: a second one is refused while the first holds its lock)",
    )
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume the run even though its config, manifest or encoder differ from its first start's",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "num_workers", None) is not None:
        extra.append(f"scale.num_workers={args.num_workers}")
    if getattr(args, "gpus_per_worker", None) is not None:
        extra.append(f"scale.gpus_per_worker={args.gpus_per_worker}")
    return list(args.overrides) + extra


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # botocore logs request headers at DEBUG; keep it quiet so no credential is ever printed.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a job's ``main``; a user error becomes one line on stderr and exit status 2."""
    setup_logging()
    try:
        code = main(argv)
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


# -- the `clman` console script -----------------------------------------------------------------
# `clman <job> args...` is `python -m jobs.<job> args...`: the same main, arguments and exit status.
JOBS = ("demo", "synth", "ingest", "pretrain", "finetune", "evaluate", "predict", "tune", "study", "export")


def _job_summary(job: str) -> str:
    """The first line of ``jobs/<job>.py``'s docstring, read without importing the job (torch, Ray)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(f"jobs.{job}")
    if spec is None or spec.origin is None:
        return "(not in this install)"
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: clman <job> [args...]    (the same as: python -m jobs.<job> [args...])", "", "jobs:"]
    lines += [f"  {job:<{width}}  {_job_summary(job)}" for job in JOBS]
    lines += ["", "clman <job> --help lists a job's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``clman`` console script (pyproject.toml's [project.scripts])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"error: unknown job {job!r}; valid: {', '.join(JOBS)}", file=sys.stderr)
        sys.exit(2)
    try:
        module = importlib.import_module(f"jobs.{job}")
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] in ("clman", "jobs"):
            raise  # our own code is broken: the traceback says where
        print(
            f"error: clman {job} needs the package of module {err.name!r}, which is not installed "
            "(pip install -e '.[dev]' installs every extra)",
            file=sys.stderr,
        )
        sys.exit(2)
    run_main(module.main, rest)
