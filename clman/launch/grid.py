"""The one Tune ``Tuner`` builder, for sweeps (``clman.tune.driver``) and studies (``clman.study.driver``).

Every trial is a small driver (``DRIVER_CPUS``) that starts its own Ray Train run. What both kinds
of grid share: Tune's state under ``<storage_uri>/<name>/`` (local or S3), no retry of a failed trial
(a trial's Train run retries its workers itself, ``scale.max_failures``), the AWS keys kept out of
trials' runtime_env, :class:`PlacementGroupReaper` (when Tune stops a trial, its Train run's
placement group stays behind) and, when asked, :class:`TrackTrials`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from ray import tune
from ray.tune import Callback

from clman import storage, tracking
from clman.launch.ray_compat import keep_credentials_out_of_tune, reap_orphaned_placement_groups

log = logging.getLogger(__name__)


def tuner(
    trainable,
    param_space: dict,
    *,
    name: str,
    storage_uri: str,
    concurrent: int,
    track: Sequence[tracking.Target] = (),
    experiment: str | None = None,
    config_of: Callable[[dict], object] | None = None,
    metric: str | None = None,
    mode: str | None = None,
    scheduler: Any = None,
    search_alg: Any = None,
    num_samples: int = 1,
) -> tune.Tuner:
    """A Tuner of ``trainable`` over ``param_space``, up to ``concurrent`` trials at once, stored under
    ``<storage_uri>/<name>/``.

    ``track``: a :class:`clman.tracking.Run` per trial in experiment ``experiment``, holding the job
    config ``config_of(trial.config)`` (:class:`TrackTrials`). ``metric``, ``mode``, ``scheduler``,
    ``search_alg``, ``num_samples``: Tune's (a sweep's); a study's grid leaves Tune's defaults.
    """
    fs, path = storage.arrow_fs(storage_uri)
    keep_credentials_out_of_tune()
    callbacks = [PlacementGroupReaper()]
    if track:
        callbacks.append(TrackTrials(track, experiment or name, config_of))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=callbacks,
        ),
    )


class PlacementGroupReaper(Callback):
    """Tune callback: every few seconds, release what stopped trials' Train runs still reserve."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0
        self._failed = False

    def on_step_end(self, iteration: int, trials: list, **info):
        if self._failed or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        try:
            reap_orphaned_placement_groups()
        except Exception as e:  # a Ray upgrade may move these internals: warn once, let the sweep go on
            self._failed = True
            log.warning(
                "cannot release stopped trials' placement groups (%s: %s); later trials may wait for resources",
                type(e).__name__,
                e,
            )


class TrackTrials(Callback):
    """Tune callback, in the sweep's (or study's) driver: a :class:`clman.tracking.Run` per trial.

    MLflow experiment (TensorBoard folder) ``experiment``, a run per trial named after its id,
    with the trial's whole job config (``config_of(trial.config)``, a picklable callable: Tune
    saves its callbacks with the experiment, and a resumed sweep keeps tracking). A result
    without an epoch (a study trial's closing line of test metrics) is logged at the trial's
    last epoch.
    """

    def __init__(self, targets: Sequence[tracking.Target], experiment: str, config_of: Callable[[dict], object]):
        self.targets, self.experiment, self.config_of = tuple(targets), experiment, config_of
        self.runs: dict[str, tracking.Run] = {}
        self.last_epoch: dict[str, int] = {}

    def __getstate__(self):
        return {**self.__dict__, "runs": {}, "last_epoch": {}}

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        run = self.runs.get(trial.trial_id)
        if run is None:
            try:
                cfg = self.config_of(trial.config)
                run = tracking.start_run(self.targets, self.experiment, trial.trial_id, cfg, job=type(cfg).__name__)
            except Exception as e:  # the sweep goes on untracked for this trial
                log.warning("trial %s is not tracked: %s", trial.trial_id, e)
                run = tracking.Run((), self.experiment, trial.trial_id)
            self.runs[trial.trial_id] = run
        if isinstance(result.get(tracking.STEP_KEY), (int, float)):
            self.last_epoch[trial.trial_id] = int(result[tracking.STEP_KEY])
        run.log({**result, tracking.STEP_KEY: self.last_epoch.get(trial.trial_id, 0)})

    def _finish(self, trial, failed: bool) -> None:
        run = self.runs.pop(trial.trial_id, None)
        if run is not None:
            run.finish(failed=failed)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self._finish(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._finish(trial, failed=True)
