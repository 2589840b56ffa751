"""Opt-in experiment tracking: the config and every epoch's metrics, to MLflow and/or TensorBoard.

    python -m jobs.finetune ... --track mlflow:file:///data/mlruns --track tensorboard:/data/tb
    mlflow ui --backend-store-uri file:///data/mlruns     tensorboard --logdir /data/tb

``--track`` (repeatable) on jobs.pretrain, finetune, tune, study and demo: ``mlflow:<tracking URI>``
(``file:///path`` or a bare path: a local file store, offline; ``sqlite:///mlflow.db``;
``http(s)://server``) and ``tensorboard:<local folder>``. A flag, not a config key: where a run is
watched from changes nothing it computes, so it is not in ``config.yaml`` nor in the resume
fingerprint, and a tracking server's address stays out of every saved file.

What a run logs: its config flattened to dotted params (``finetune.lr``, ``model.width``...), the
config YAML as the artifact ``config.yaml`` (TensorBoard: the text ``config``), and every epoch's
metrics as reported by the Train loop (``ray.train.report``) at step = the report's ``epoch``
(0-based, as in ``metrics.json`` and ``epochs.parquet``). Layout: MLflow experiment = the job
(``pretrain``, ``finetune``, ``demo``) or the sweep's / study's run name, one MLflow run per Train
run or Tune trial, named after it; TensorBoard ``<dir>/<experiment>/<run>/``. A resumed run
(same ``--run-name``) is a new MLflow run of the same name, from the resumed epoch on.

Facts that shaped this module
- Logged from the driver side, so the workers need not reach the tracking store: a standalone
  Train run's metrics reach ``ray.train.UserCallback.after_report`` in the run's controller actor,
  which Ray 2.60 places on the driver's node (so a local file store there is the driver's); a
  sweep's or study's reach the Tune driver's ``ray.tune.Callback.on_trial_result``. The run is
  created (params, config) by the driver before training; the callback logs to it by run id.
- MLflow 3.18 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE=true`` ("maintenance
  mode"); it still reads and writes it, offline, so it is set for ``file:`` URIs.
- No secret goes out: configs hold none (S3 keys come from the environment), a URI carrying a
  password is refused (MLflow reads ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` instead), and
  the URIs are never logged as params.
- A tracking store that fails mid-run costs a warning, not the run; one that cannot be reached
  when the run starts is a one-line error before any training.
"""

from __future__ import annotations

import logging
import math
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from clman import config as C
from clman.errors import JobError, error_line

log = logging.getLogger(__name__)

KINDS = ("mlflow", "tensorboard")
STEP_KEY = "epoch"  # the metric whose value is the step of the others
# Reported beside the metrics by Tune (``ray.tune.result.AUTO_RESULT_KEYS``) or our Tune callback: not metrics.
NOT_METRICS = frozenset(
    {
        STEP_KEY,
        "training_iteration",
        "time_total_s",
        "time_this_iter_s",
        "timestamp",
        "time_since_restore",
        "iterations_since_restore",
        "timesteps_since_restore",
        "timesteps_total",
        "episodes_total",
        "pid",
        "done",
        "epochs_done",
    }
)


@dataclass(frozen=True)
class Target:
    kind: str  # one of KINDS
    uri: str  # MLflow tracking URI, or TensorBoard's local folder

    def describe(self) -> str:
        return f"{self.kind}:{self.uri}"


def add_args(p) -> None:
    p.add_argument(
        "--track",
        action="append",
        default=[],
        metavar="KIND:WHERE",
        help="also log the config and every epoch's metrics to mlflow:<tracking URI> (e.g. "
        "mlflow:file:///data/mlruns, offline) or tensorboard:<folder>; repeatable; "
        "needs pip install 'clman[track]'",
    )


def parse_targets(specs: Iterable[str] | None) -> tuple[Target, ...]:
    """``["mlflow:file:///x", "tensorboard:/y"]`` -> Targets; a one-line ConfigError naming a bad one."""
    targets = []
    for spec in specs or ():
        kind, sep, where = str(spec).partition(":")
        if not sep or kind not in KINDS or not where.strip():
            raise C.ConfigError(
                f"--track {spec!r}: expected mlflow:<tracking URI> or tensorboard:<folder>, "
                f"e.g. mlflow:file:///tmp/mlruns"
            )
        where = where.strip()
        if kind == "mlflow":
            parts = urllib.parse.urlsplit(where)
            if parts.password:
                raise C.ConfigError(
                    f"--track mlflow:{parts.scheme}://...: the URI holds a password; give it in "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead"
                )
            if not parts.scheme or len(parts.scheme) == 1:  # a bare path (or a Windows drive): a file store
                where = "file://" + os.path.abspath(os.path.expanduser(where))
        elif "://" in where:
            raise C.ConfigError(f"--track {spec!r}: TensorBoard writes to a local folder, not a URI")
        else:
            where = os.path.abspath(os.path.expanduser(where))
        targets.append(Target(kind, where))
    return tuple(targets)


def flatten(values: Mapping, prefix: str = "") -> dict[str, str]:
    """{"finetune": {"lr": 0.001}} -> {"finetune.lr": "0.001"}: the config as params."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def config_params(cfg) -> dict[str, str]:
    """A job config as params named like its ``--set`` keys: ``finetune.lr``, ``model.width``..."""
    job = next(name for name, cls in C.JOB_CONFIGS.items() if isinstance(cfg, cls))
    values = C.to_dict(cfg)
    sections = {k: v for k, v in values.items() if isinstance(v, Mapping)}
    return flatten({job: {k: v for k, v in values.items() if k not in sections}, **sections})


def metrics_of(result: Mapping) -> tuple[int | None, dict[str, float]]:
    """(step, {name: value}) of one report: its real-number metrics, the epoch as the step."""
    step = result.get(STEP_KEY)
    values = {
        k: float(v)
        for k, v in result.items()
        if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return (int(step) if isinstance(step, (int, float)) and math.isfinite(step) else None), values


def _mlflow():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise JobError(
            "--track mlflow:...: the mlflow package is missing: pip install 'clman[track]' (or mlflow-skinny)"
        ) from None
    return MlflowClient


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise JobError(
            "--track tensorboard:...: the tensorboard package is missing: pip install 'clman[track]' (or tensorboard)"
        ) from None
    return SummaryWriter


class Run:
    """One tracked run in every target: started by the driver, logged to wherever it is pickled to.

    Pickles as plain data (targets, names, the MLflow run id): the clients and writers are
    opened again, lazily, in the process that logs (a Train controller, the Tune driver).
    """

    def __init__(self, targets: Iterable[Target], experiment: str, name: str):
        self.targets = tuple(targets)
        self.experiment, self.name = experiment, name
        self.run_ids: dict[str, str] = {}  # MLflow tracking URI -> run id
        self._open: dict = {}  # target -> client / writer, in this process
        self._broken: set[Target] = set()  # targets that failed mid-run: warned once, skipped

    def __getstate__(self):
        return {**self.__dict__, "_open": {}, "_broken": set()}

    def _client(self, target: Target):
        if target not in self._open:
            if target.uri.startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._open[target] = _mlflow()(tracking_uri=target.uri)
        return self._open[target]

    def _writer(self, target: Target):
        if target not in self._open:
            self._open[target] = _summary_writer()(log_dir=os.path.join(target.uri, self.experiment, self.name))
        return self._open[target]

    def start(self, params: Mapping[str, str], config_yaml: str, tags: Mapping[str, str] | None = None) -> "Run":
        """Create the run in every target with the config; a one-line JobError when a target fails."""
        for target in self.targets:
            try:
                if target.kind == "mlflow":
                    self._start_mlflow(target, params, config_yaml, tags or {})
                else:
                    self._writer(target).add_text("config", "```yaml\n" + config_yaml + "```", 0)
                    self._writer(target).flush()
            except JobError:
                raise
            except Exception as e:
                raise JobError(
                    f"--track {target.describe()}: cannot start run {self.name!r}: {type(e).__name__}: {error_line(e, limit=300)}"
                ) from None
        return self

    def _start_mlflow(
        self, target: Target, params: Mapping[str, str], config_yaml: str, tags: Mapping[str, str]
    ) -> None:
        from mlflow.entities import Param, RunTag

        client = self._client(target)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        run = client.create_run(experiment_id, run_name=self.name)
        run_id = self.run_ids[target.uri] = run.info.run_id
        client.log_batch(
            run_id,
            params=[Param(k, v[:6000]) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        client.log_text(run_id, config_yaml, "config.yaml")

    def log(self, result: Mapping) -> None:
        """One report's metrics at its epoch; a target that fails is warned about once and dropped."""
        step, values = metrics_of(result)
        if not values:
            return
        for target in self.targets:
            if target in self._broken:
                continue
            try:
                if target.kind == "mlflow":
                    from mlflow.entities import Metric

                    now = int(time.time() * 1000)
                    self._client(target).log_batch(
                        self.run_ids[target.uri], metrics=[Metric(k, v, now, step or 0) for k, v in values.items()]
                    )
                else:
                    writer = self._writer(target)
                    for k, v in values.items():
                        writer.add_scalar(k, v, step or 0)
                    writer.flush()
            except Exception as e:  # tracking is a view on the run: it never stops it
                self._broken.add(target)
                log.warning(
                    "--track %s: logging run %r failed (%s: %s); it goes on untracked there",
                    target.describe(),
                    self.name,
                    type(e).__name__,
                    error_line(e, limit=300),
                )

    def finish(self, failed: bool = False) -> None:
        """Mark MLflow runs FINISHED / FAILED, close TensorBoard writers (never raises)."""
        for target in self.targets:
            try:
                if target.kind == "mlflow" and target.uri in self.run_ids:
                    self._client(target).set_terminated(self.run_ids[target.uri], "FAILED" if failed else "FINISHED")
                elif target.kind == "tensorboard" and target in self._open:
                    self._open[target].close()
            except Exception as e:
                log.warning(
                    "--track %s: closing run %r failed (%s: %s)",
                    target.describe(),
                    self.name,
                    type(e).__name__,
                    error_line(e, limit=300),
                )
        self._open = {t: o for t, o in self._open.items() if t.kind == "mlflow"}


def start_run(targets: Iterable[Target], experiment: str, name: str, cfg, **tags: str) -> Run | None:
    """A started :class:`Run` of job config ``cfg`` (None when nothing is tracked)."""
    targets = tuple(targets)
    if not targets:
        return None
    run = Run(targets, experiment, name).start(
        config_params(cfg), C.to_yaml(cfg), {f"clman.{k}": v for k, v in tags.items()}
    )
    log.info("tracking run %s of %s: %s", name, experiment, ", ".join(t.describe() for t in targets))
    return run


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__
