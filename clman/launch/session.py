"""This driver's Ray: attach to a cluster or start one here, and keep Ray's output off the terminal.

Facts that shaped this module:
- ``ray.init`` retries an unreachable GCS for minutes, printing a warning every few seconds:
  :func:`check_address` looks first and fails in one line.
- Ray prints its workers' stderr, and its C++ core writes, on the driver's file descriptor 2, not
  ``sys.stderr``: :func:`divert_stderr` moves fd 2 itself, and keeps the terminal for this process's
  log lines and progress bars (``clman.progress.TERMINAL``).
- Ray Train's settings for a Ray started here (``LOCAL_TRAIN_ENV``): the controller polls its
  workers every 2 s by default and a run waits on that poll several times; a tiny finetune run
  took 18.5-21 s with it, 15-16 s at 0.5 s (2-core machine). The preemption watcher and Train's
  Prometheus metrics have nothing to do on one machine without a dashboard: off (a process and
  ~1.5 s of CPU less per run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import ray
import ray.data

from clman import progress, storage
from clman.errors import JobError
from clman.errors import error_line

log = logging.getLogger(__name__)

# Each a setdefault: a user's value wins.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


@dataclass
class Session:
    """What :func:`init_ray` did in this process (one per process: :data:`SESSION`)."""

    attached: bool = False  # attached to a running cluster (whose autoscaler may add nodes), not a Ray started here


SESSION = Session()


def attached() -> bool:
    """Whether this driver attached to a running cluster rather than starting Ray here."""
    return SESSION.attached


def init_ray(address: str | None = None, num_cpus: int | None = None, log_file: str | None = None) -> None:
    """Attach to ``address`` / ``RAY_ADDRESS`` when set, else start Ray on this machine.

    ``log_file`` (a local start only; ``make demo``): everything Ray, its workers and the
    libraries print to stderr goes to that file, the workers' epoch lines included (Ray's stdout too
    within :func:`ray_stdout_to`); this process's log lines stay on the terminal, and
    ``clman.launch.trainer.fit`` shows each run as a progress bar.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Train V2 is the default in Ray 2.60; pin it so a cluster with an older default agrees.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Every worker treats a refused S3 connection as an outage once this driver has reached S3.
    env = {storage.REACHED_ENV: "1"} if storage.endpoint_reached() and storage.REACHED_ENV not in os.environ else {}
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None)
        except ray.exceptions.AuthenticationError as e:
            raise JobError(
                f"the Ray cluster at {address} refused this driver ({error_line(e)}): set "
                "RAY_AUTH_MODE=token and copy the head node's ~/.ray/auth_token to this machine "
                "(or point RAY_AUTH_TOKEN_PATH at it)"
            ) from None
        except ConnectionError as e:
            raise JobError(
                f"cannot attach to the Ray cluster at {address!r} (--address / RAY_ADDRESS): {error_line(e)}"
            ) from None
        SESSION.attached = address != "local"
    else:
        # No dashboard (it needs ray[default] and a CPU of its own); the hook below makes up for
        # the one thing Ray Train uses it for. Ray Data's per-operator progress bars flood job logs
        # (the loops log epoch, loss and speed): off in every worker process, Tune trials included.
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        set_local_train_env()
        if log_file:  # the workers' lines (one per epoch) go there too; fit() shows a bar per run
            divert_stderr(log_file)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": "clman.launch.ray_compat.setup_local_worker", "env_vars": env},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def set_local_train_env() -> None:
    """LOCAL_TRAIN_ENV into os.environ where unset: a Ray started from here, its raylet and workers inherit it."""
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def check_address(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`JobError` when nothing listens at a ``host:port`` cluster address.

    ``auto``, ``local`` and ``ray://`` addresses are left to Ray.
    """
    if address in ("auto", "local") or "://" in address and not address.startswith("http"):
        return
    if address.startswith(("http://", "https://")):
        raise JobError(
            f"--address / RAY_ADDRESS {address!r} is a dashboard URL: ray.init needs the cluster's "
            "GCS address host:6379 (`ray job submit` uses the dashboard URL and sets RAY_ADDRESS itself)"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise JobError(f"--address / RAY_ADDRESS {address!r}: expected host:port (e.g. 10.0.0.1:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise JobError(
            f"cannot reach the Ray cluster at {address} (--address / RAY_ADDRESS): "
            f"{e.strerror or type(e).__name__}; is `ray start --head` running there?"
        ) from None


@contextlib.contextmanager
def ray_stdout_to(path: str):
    """``with ray_stdout_to(log_file):`` what Ray prints to this process's stdout goes to ``path`` too (a
    quiet driver's stderr is there already, :func:`divert_stderr`): the raylet's warnings (e.g. more worker
    processes started than it expects on 2 CPUs) and the workers' deduplicated lines, which Ray flushes when
    it shuts down: so Ray is shut down on the way out, before the caller prints its own results."""
    with open(path, "a", buffering=1, errors="replace") as f, contextlib.redirect_stdout(f):
        try:
            yield
        finally:
            ray.shutdown()


def divert_stderr(path: str) -> None:
    """Point this process's stderr (fd 2) at ``path``; its log handlers and progress bars keep the terminal.

    The workers' epoch lines go to the file too; ``clman.launch.trainer.fit`` draws a progress
    bar per run on the terminal instead.
    """
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
    progress.TERMINAL.saved = terminal
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(terminal)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    log.info("Ray's own output: %s", path)


def restore_stderr() -> None:
    """Undo :func:`divert_stderr`: fd 2 is the terminal again (an error printed after this shows there)."""
    terminal = progress.TERMINAL.saved
    if terminal is None:
        return
    sys.stderr.flush()
    os.dup2(terminal.fileno(), 2)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is terminal:
            handler.setStream(sys.stderr)
    progress.TERMINAL.saved = None
    terminal.close()


@contextlib.contextmanager
def quiet_terminal(log_file: str | None = None, force: bool = False):
    """``with session.quiet_terminal(): run(...)``: on a terminal, Ray's output to a file and a bar per run.

    Only where stderr is a terminal (or ``force``, the demo): a job whose output is a log
    (``ray job submit``, ``> run.log``) keeps Ray's lines, its workers' one line per epoch
    among them. The terminal is given back at the end, so a failure's one-line error, or a
    traceback, is printed there, not in the file. ``log_file``: default
    ``<tmp>/clman/ray-<time>-<pid>.log``, named on the terminal.
    """
    if progress.TERMINAL.saved is not None or not (force or progress.is_tty(sys.stderr)):
        yield
        return
    divert_stderr(
        log_file
        or os.path.join(tempfile.gettempdir(), "clman", f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    )
    try:
        yield
    finally:
        restore_stderr()
