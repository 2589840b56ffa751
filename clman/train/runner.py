"""Driver-side plumbing shared by the jobs and Tune: Ray start-up, the TorchTrainer, outputs.

The per-worker loops are in ``pretrain.py`` and ``finetune.py``; this module
only builds Ray configs from a job config and checks, before any worker
starts, that the cluster can hold the run.

Facts that shaped the resource check:
- ``ray.cluster_resources()`` counts the nodes present *now*. On an autoscaling
  cluster (KubeRay, or the cluster launcher with ``min_workers: 0``, the usual GPU
  set-up) the GPU nodes appear only once something asks for them, so a job that
  refused to start without them could never start. Attached to a cluster, a job
  asks the autoscaler for its workers' bundles (``request_resources``, a hint that
  persists until overridden, so it is cleared once the nodes are there) and waits
  up to ``scale.resource_timeout``; a cluster without an autoscaler just times out.
- A Ray that :func:`init_ray` started on this machine cannot grow: it fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clman import progress, run_lock, storage, tracking
from clman.config import DataConfig, ScaleConfig
from clman.errors import JobError  # re-exported: clman.train.runner.JobError is the same class
from clman.tune.resources import decode_cpus  # a run's resource maths, in one place with Tune's
from clman.train import worker
from clman.train.worker import CHECKPOINT_FILE

log = logging.getLogger(__name__)

# Ray Train settings for a Ray this driver starts on its own machine (each a setdefault: a user's value wins).
# The controller looks at its workers every 2 s by default, and a run waits on that poll several times
# between start-up and shutdown: a tiny finetune run took 18.5-21 s with it, 15-16 s at 0.5 s (2-core
# machine). The preemption watcher (an actor per run polling for node drains) and Train's Prometheus
# metrics have nothing to watch or export on one machine without a dashboard: off (a process and ~1.5 s
# of CPU less per run).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                   "RAY_TRAIN_METRICS_ENABLED": "0"}
WAIT_POLL_S = 5.0  # seconds between looks at the cluster while waiting for the autoscaler
WAIT_LOG_S = 60.0  # seconds between "still waiting" lines
_attached = False  # init_ray attached to a running cluster (whose autoscaler may add nodes)


def attached() -> bool:
    """Whether this driver attached to a running cluster rather than starting Ray here."""
    return _attached


_terminal = None  # the terminal, when divert_stderr() sent fd 2 to a file (a quiet driver)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_file: str | None = None) -> None:
    """Attach to ``address`` / ``RAY_ADDRESS`` when set, else start Ray on this machine.

    ``log_file`` (a local start only; ``make demo``): everything Ray, its workers and the
    libraries print goes to that file, the workers' epoch lines included; this process's
    log lines stay on the terminal, and :func:`fit` shows each run as a progress bar.
    """
    global _attached
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
            raise JobError(f"the Ray cluster at {address} refused this driver ({_first_line(e)}): set "
                           "RAY_AUTH_MODE=token and copy the head node's ~/.ray/auth_token to this machine "
                           "(or point RAY_AUTH_TOKEN_PATH at it)") from None
        except ConnectionError as e:
            raise JobError(f"cannot attach to the Ray cluster at {address!r} (--address / RAY_ADDRESS): "
                           f"{_first_line(e)}") from None
        _attached = address != "local"
    else:
        # No dashboard (it needs ray[default] and a CPU of its own); the hook below makes up for
        # the one thing Ray Train uses it for. Ray Data's per-operator progress bars flood job logs
        # (the loops log epoch, loss and speed): off in every worker process, Tune trials included.
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        set_local_train_env()
        if log_file:  # the workers' lines (one per epoch) go there too; fit() shows a bar per run
            divert_stderr(log_file)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "clman.train.ray_compat.setup_local_worker",
                              "env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False


def set_local_train_env() -> None:
    """LOCAL_TRAIN_ENV into os.environ where unset: a Ray started from here, its raylet and workers inherit it."""
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def check_address(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`JobError` when nothing listens at a ``host:port`` cluster address.

    ``ray.init`` retries an unreachable GCS for minutes, printing a warning every few
    seconds; ``auto``, ``local`` and ``ray://`` addresses are left to Ray.
    """
    if address in ("auto", "local") or "://" in address and not address.startswith("http"):
        return
    if address.startswith(("http://", "https://")):
        raise JobError(f"--address / RAY_ADDRESS {address!r} is a dashboard URL: ray.init needs the cluster's "
                       "GCS address host:6379 (`ray job submit` uses the dashboard URL and sets RAY_ADDRESS itself)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise JobError(f"--address / RAY_ADDRESS {address!r}: expected host:port (e.g. 10.0.0.1:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise JobError(f"cannot reach the Ray cluster at {address} (--address / RAY_ADDRESS): "
                       f"{e.strerror or type(e).__name__}; is `ray start --head` running there?") from None


def divert_stderr(path: str) -> None:
    """Point this process's stderr (fd 2) at ``path``; its log handlers keep the terminal.

    Ray prints what its workers write to stderr (their logging, warnings, Ray's own
    lines) on the driver's stderr, and its C++ core writes there directly: a file
    descriptor, not ``sys.stderr``, is the one place all of it passes through. The
    workers' epoch lines go to the file too; :func:`fit` draws a progress bar per run on
    the terminal instead.
    """
    global _terminal
    sys.stderr.flush()
    terminal = _terminal = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
    progress.set_terminal(terminal)
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
    global _terminal
    if _terminal is None:
        return
    sys.stderr.flush()
    os.dup2(_terminal.fileno(), 2)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is _terminal:
            handler.setStream(sys.stderr)
    progress.set_terminal(None)
    _terminal.close()
    _terminal = None


@contextlib.contextmanager
def quiet_terminal(log_file: str | None = None, force: bool = False):
    """``with runner.quiet_terminal(): run(...)``: on a terminal, Ray's output to a file and a bar per run.

    Only where stderr is a terminal (or ``force``, the demo): a job whose output is a log
    (``ray job submit``, ``> run.log``) keeps Ray's lines, its workers' one line per epoch
    among them. The terminal is given back at the end, so a failure's one-line error, or a
    traceback, is printed there, not in the file. ``log_file``: default
    ``<tmp>/clman/ray-<time>-<pid>.log``, named on the terminal.
    """
    if _terminal is not None or not (force or progress.is_tty(sys.stderr)):
        yield
        return
    divert_stderr(log_file or os.path.join(tempfile.gettempdir(), "clman",
                                           f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))
    try:
        yield
    finally:
        restore_stderr()


def frame_source(rows, data: DataConfig) -> dict:
    """What the workers read a split from: {"videos": [Video], "cache": [ObjectRef] | None}.

    Decodes every video once into the object store when ``data.cache`` allows it
    (``clman.train.feed``); a video that does not decode is logged and left out.
    """
    from clman.train import feed

    videos = feed.videos_of(rows)
    try:
        cached = feed.plan_cache(videos, data)
    except feed.CacheTooLarge as e:
        raise JobError(str(e)) from None
    if not cached:
        return {"videos": videos, "cache": None}
    kept, refs = feed.build_cache(videos, data)
    if not kept:
        raise JobError(f"none of the {len(videos)} videos could be decoded")
    return {"videos": kept, "cache": refs}


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


def wait_for_resources(need: Mapping[str, float], bundles: list[dict[str, float]], timeout: float, *,
                       read: Callable[[], Mapping[str, float]] = ray.cluster_resources,
                       ask: Callable[[list], None] = _ask_autoscaler,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep,
                       poll_s: float = WAIT_POLL_S, log_every_s: float = WAIT_LOG_S) -> float:
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
                log.info("waiting for the autoscaler (%.0f of %g s): the run needs %s", waited, timeout,
                         describe_shortfall(missing))
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
    if attached():
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


def scaling_config(scale: ScaleConfig) -> ScalingConfig:
    resources: dict[str, float] = {"CPU": scale.cpus_per_worker}
    if scale.gpus_per_worker > 0:
        resources["GPU"] = scale.gpus_per_worker
    return ScalingConfig(
        num_workers=scale.num_workers, use_gpu=scale.gpus_per_worker > 0, resources_per_worker=resources
    )


@dataclass(frozen=True)
class TrainJob:
    """What a TorchTrainer needs for one job (``finetune.train_job``, ``pretrain.train_job``)."""

    loop: Callable[[Any], None]  # the function every worker runs, given loop_config
    loop_config: Any  # what the loop is given: a ``clman.train.worker.LoopInputs``
    datasets: dict  # Ray datasets by name, if any (the clman loops read frames through loop_config)
    score: str | None = None  # the metric that ranks checkpoints (None: keep the latest)


def run_config(out: str, run_name: str, scale: ScaleConfig, score: str | None,
               callbacks: Sequence[Any] = ()) -> RunConfig:
    """Checkpoints under ``<out>/<run_name>/`` on local disk or S3 (same name = resume)."""
    run_lock.check_run_name(run_name)
    fs, path = storage.arrow_fs(out)
    return RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=scale.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=score,
            checkpoint_score_order="max",
        )
        if score
        else CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks) or None,
        # Ray Train's INFO lines (worker group start-up, "Checkpoint successfully created ...",
        # DDP set-up) repeat what the jobs log; they stay in Ray's session log files. Not
        # "Reporting training result ...": Ray 2.60 logs it on a logger named after its file
        # path, outside ray.train, which this setting does not reach; the workers quiet it
        # themselves (_quiet_loop).
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def _quiet_loop(loop: Callable[[Any], None], config: dict) -> None:
    """What every worker runs: Ray Train's per-report INFO line off, then the job's loop."""
    from clman.train import ray_compat

    try:
        ray_compat.quiet_report_lines()
    except Exception as e:  # a Ray upgrade moved it: the lines come back, the run goes on
        logging.getLogger(__name__).warning("cannot quiet Ray Train's report lines: %s", e)
    loop(config["inputs"])


class TrackEpochs(ray.train.UserCallback):
    """Every report of rank 0 to a :class:`clman.tracking.Run`, in the run's controller (driver's node)."""

    def __init__(self, run: tracking.Run):
        self.run = run

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self.run.log(metrics[0])


def trainer(job: TrainJob, scale: ScaleConfig, out: str, run_name: str,
            callbacks: Sequence[Any] = ()) -> TorchTrainer:
    """The TorchTrainer of ``job`` on ``scale``'s workers, its run under ``<out>/<run_name>/``."""
    return TorchTrainer(
        functools.partial(_quiet_loop, job.loop),
        # a dict, as Ray Train's run state wants it; the loop is given the typed inputs inside
        train_loop_config={"inputs": job.loop_config},
        scaling_config=scaling_config(scale),
        run_config=run_config(out, run_name, scale, job.score, callbacks),
        datasets=job.datasets or None,
    )


def _first_line(e: BaseException | str) -> str:
    """One line of an error: the last line of a traceback ("FloatingPointError: ..."), else the first line."""
    lines = [line.rstrip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        tail = [line for line in lines if not line[0].isspace() and not line.startswith(("Traceback", "The above"))]
        if tail:
            return tail[-1].strip()
    return lines[0].strip() if lines else (type(e).__name__ if isinstance(e, BaseException) else str(e))


def _root_cause(error: BaseException) -> BaseException:
    """The exception under Ray Train's wrappers: the controller's failure, or the lowest rank's."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        inner = getattr(error, "controller_failure", None) or (failures[min(failures)] if failures else None)
        inner = inner or error.__cause__
        if inner is None:
            break
        error = inner
    return error


def failure_line(run_name: str, error: BaseException) -> str:
    """One line for a failed run: its root cause, the S3 endpoint when storage failed, how to resume."""
    cause = _root_cause(error)
    line = _first_line(cause)
    if not isinstance(cause, JobError) and not re.match(r"[\w.]+: ", line):
        line = f"{type(cause).__name__}: {line}"
    text = f"run {run_name!r} failed: {line[:400]}"
    # pyarrow's words for an expired session token or clock skew, which waiting does not cure.
    problem = storage.s3_problem(str(cause)) if "AWS Error" in str(cause) else None
    if problem:
        text += f" — {problem}; then the same --run-name resumes from the last checkpoint"
    elif "AWS Error" in str(cause) or isinstance(cause, (OSError, storage.StorageError)) and "s3" in str(cause).lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default AWS S3 endpoint"
        text += f" (S3 at {endpoint} after retries); once S3 answers, the same --run-name resumes from the last checkpoint"
    return text


class ProgressBar:
    """A run's epochs as a tqdm bar on the terminal of a quiet driver (``init_ray(log_file=...)``).

    Rank 0 puts each epoch's metrics in a Ray queue (``worker.report``, through
    ``LoopInputs.progress``: ``self.job`` is the run's job given the queue); a thread here moves the
    bar. The queue's actor takes no CPU, so it never waits for the workers' resources. Where
    ``stream`` is not a terminal (``make demo > demo.log``), one plain line per epoch instead.
    """

    SHOWN = (("loss", "loss"), ("loss", "train_loss"), ("auc", "train_auc"), ("val auc", "val_auc"))

    def __init__(self, job: TrainJob, run_name: str, stream):
        from ray.util.queue import Queue
        from tqdm import tqdm

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.job = TrainJob(job.loop, job.loop_config.with_progress(self.queue), job.datasets, job.score)
        self.epochs = int(job.loop_config.config.epochs) or None
        self.run_name = run_name
        self.bar = (tqdm(total=self.epochs, desc=run_name, unit="epoch", file=stream, dynamic_ncols=False, ncols=100)
                    if progress.is_tty(stream) else None)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        from ray.util.queue import Empty

        while not self.done.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray shutting down): no more bar
                return
            shown = {k: item[m] for k, m in self.SHOWN if isinstance(item.get(m), float) and item[m] == item[m]}
            if self.bar is None:
                log.info("%s epoch %d/%s  %s", self.run_name, item["epoch"], self.epochs or "?",
                         "  ".join(f"{k} {v:.3f}" for k, v in shown.items()))
                continue
            self.bar.n = item["epoch"]
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=True)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        if self.bar is not None:
            self.bar.close()
        ray.kill(self.queue.actor)


def claim(out: str, run_name: str, record: dict, force_resume: bool = False):
    """``with runner.claim(...)``: the run's lock held and its fingerprint checked (``clman.run_lock``).

    Taken before Ray starts: a second job with this run name is refused before any work. A run with
    no checkpoint file yet has nothing to resume, so other inputs are recorded rather than refused.
    """
    run_dir = storage.join(out, run_name)
    return run_lock.claim(out, run_name, record, force=force_resume,
                          has_checkpoint=lambda: bool(storage.list_uris(run_dir, "/" + CHECKPOINT_FILE)))


def fit(job: TrainJob, scale: ScaleConfig, out: str, run_name: str, tracked: tracking.Run | None = None):
    """Run ``job`` to the end; return the Ray ``Result`` (one-line :class:`JobError` when it failed).

    ``tracked``: a started :class:`clman.tracking.Run` that gets every epoch's metrics, finished here.
    """
    bar = ProgressBar(job, run_name, _terminal) if _terminal is not None else None
    failed = True
    try:
        job = bar.job if bar is not None else job
        result = trainer(job, scale, out, run_name, callbacks=[TrackEpochs(tracked)] if tracked else ()).fit()
        failed = result.error is not None
    except ray.train.TrainingFailedError as e:  # a worker or the controller gave up (after scale.max_failures)
        raise JobError(failure_line(run_name, e)) from None
    except OSError as e:  # pyarrow, creating the run's folder or reading its state on the driver
        raise JobError(failure_line(run_name, e)) from None
    finally:
        if bar is not None:
            bar.close()
        if tracked is not None:
            tracked.finish(failed=failed)
    if result.error is not None:
        raise JobError(failure_line(run_name, result.error))
    return result


def pick_checkpoint(result, score: str | None):
    """The best checkpoint by ``score`` (when it was reported), else the latest."""
    if score and result.best_checkpoints:
        scored = [(c, m) for c, m in result.best_checkpoints if m.get(score) is not None and m[score] == m[score]]
        if scored:
            return max(scored, key=lambda cm: cm[1][score])
    if result.checkpoint is None:
        raise JobError("the run reported no checkpoint")
    return result.checkpoint, result.metrics or {}


def export_checkpoint(checkpoint: "ray.train.Checkpoint", dest_uri: str) -> None:
    """Copy the clman checkpoint file out of a Ray checkpoint to ``dest_uri`` (atomically)."""
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, CHECKPOINT_FILE), "rb") as f:
            storage.write_bytes(dest_uri, f.read())
