"""A sweep's arguments: the job, its search space, the base config and where it is stored (Ray-free).

Saved as ``<out>/<run-name>/sweep.json`` beside the sweep, so ``--resume <run-name>``
needs nothing else. The constants name what the driver and the result tables share.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from clman import config as C
from clman import storage
from clman.errors import JobError
from clman.metrics import METRIC_NAMES
from clman.run_lock import check_run_name
from clman.tune.space import SearchSpace, SpaceError, space_from_dict

JOBS = ("finetune", "pretrain")

SCHEDULERS = ("asha", "fifo")

SEARCHES = ("random", "optuna")

# Which reported metric ranks trials, and which way.
SCORES = {"finetune": ("val_auc", "max"), "pretrain": ("loss", "min")}
# What decides between epochs or trials tied on the score (val AUC saturates at 1.0 on easy data): the lower val loss.
TIE_BREAKS = {"finetune": ("val_loss", "min")}

# val_auc first (it ranks the trials), then the rest in the paper's order.
VAL_METRICS = ("val_auc",) + tuple(f"val_{k}" for k in METRIC_NAMES if k != "auc")

TABLE_METRICS = {"finetune": VAL_METRICS + ("val_loss", "train_loss"), "pretrain": ("loss",)}

PLOT_FILES = {"finetune": "auc_vs_lr.png", "pretrain": "loss_vs_lr.png"}

TIME_ATTR = "epochs_done"  # 1-based epoch count, added to every report (ASHA's clock)

TRAIN_DIR = "train"  # <out>/<run-name>/train/<trial-id>/: each trial's Ray Train run

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep needs; saved as ``sweep.json`` beside it so a resume needs only the name."""

    job: str
    space: dict  # flat {dotted key: {kind: [...]}}, as read from space_file
    samples: int
    manifest: str
    out: str
    run_name: str
    tree: dict = field(default_factory=dict)  # base config sections (preset + --set), resolved
    space_file: str = "<space>"
    config: str | None = None  # preset path, for the record
    overrides: tuple[str, ...] = ()
    scheduler: str = "asha"
    search: str = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    encoder: str | None = None  # finetune: encoder.pt from pretrain
    split: str = "train"  # pretrain: the manifest split whose frames are used

    def check(self) -> None:
        if self.job not in JOBS:
            raise C.ConfigError(f"--job {self.job!r}: not one of {list(JOBS)}")
        if self.scheduler not in SCHEDULERS:
            raise C.ConfigError(f"--scheduler {self.scheduler!r}: not one of {list(SCHEDULERS)}")
        if self.search not in SEARCHES:
            raise C.ConfigError(f"--search {self.search!r}: not one of {list(SEARCHES)}")
        if self.samples < 1:
            raise C.ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.grace_period < 1:
            raise C.ConfigError(f"--grace-period must be >= 1 epoch, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise C.ConfigError(f"--reduction-factor must be >= 2, got {self.reduction_factor}")
        check_run_name(self.run_name)
        if self.encoder and self.job != "finetune":
            raise C.ConfigError("--encoder applies to finetune sweeps only")
        space = self.search_space()
        if self.search == "optuna" and space.has_grid:
            raise SpaceError(
                f"{self.space_file}: 'grid' needs --search random; Optuna samples, it does not enumerate (use choice)"
            )
        epochs = self.max_epochs()
        if self.scheduler == "asha" and self.grace_period > epochs:
            raise C.ConfigError(
                f"--grace-period {self.grace_period} is more than the {epochs} epoch(s) "
                "a trial runs; lower it or raise the epochs"
            )

    def search_space(self) -> SearchSpace:
        return space_from_dict(self.space, self.job, self.tree, source=self.space_file)

    def base_config(self):
        return C.job_config(self.tree, self.job)

    def trial_config(self, values: Mapping[str, Any]):
        """The job config of one trial: the base config with the trial's sampled values.

        Finetune trials keep their checkpoints by each epoch's val AUC (``select_window`` 1), the
        metric the sweep ranks and ASHA stops trials on: a window's mean has no value before the
        window fills, and ASHA compares trials at every rung (see ``window_note``).
        """
        cfg = C.job_config(self.search_space().apply(self.tree, values), self.job)
        return dataclasses.replace(cfg, select_window=1) if self.job == "finetune" else cfg

    def window_note(self) -> str:
        """One line when the config's ``finetune.select_window`` is not what the trials use, else ""."""
        window = getattr(self.base_config(), "select_window", 1)
        if window == 1:
            return ""
        return (
            f"finetune.select_window={window} is not used by the trials: a sweep ranks them, and keeps "
            "their checkpoints, by each epoch's val_auc (ASHA compares them at every rung)"
        )

    def max_epochs(self) -> int:
        """The most epochs any trial runs (ASHA's max_t)."""
        param = self.search_space().get(f"{self.job}.epochs")
        return int(param.largest()) if param is not None else self.base_config().epochs

    @property
    def run_dir(self) -> str:
        return storage.join(self.out, self.run_name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = list(self.overrides)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Sweep":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise C.ConfigError(f"sweep.json: unknown key {unknown[0]!r}; written by another clman version?")
        d = dict(d)
        d["overrides"] = tuple(d.get("overrides") or ())
        return cls(**d)


def new_sweep(
    job: str,
    space_file: str,
    samples: int,
    manifest: str,
    out: str,
    run_name: str | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    **options,
) -> Sweep:
    """Load the preset and the space file and check them together; nothing is started."""
    from clman.tune import space as tune_space

    tree = C.load_tree(config, list(overrides))
    tune_space.job_sections(job)  # a clear error for a bad --job before the space is read
    space = tune_space.load_space(space_file, job, tree)
    run_name = run_name or f"tune-{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep = Sweep(
        job=job,
        space=space.to_dict(),
        samples=samples,
        manifest=manifest,
        out=out,
        run_name=run_name,
        tree=tree,
        space_file=space_file,
        config=config,
        overrides=tuple(overrides),
        **options,
    )
    sweep.check()
    return sweep


def load_sweep(out: str, run_name: str) -> Sweep:
    """The ``Sweep`` saved under ``<out>/<run_name>/sweep.json``."""
    uri = storage.join(out, check_run_name(run_name, "--resume"), SWEEP_FILE)
    try:
        d = json.loads(storage.read_text(uri))
    except storage.StorageNotFoundError:
        raise JobError(f"{uri}: no such sweep to resume (is --out the same as the sweep's?)") from None
    # The sweep may have moved (copied to another bucket): the --out given now wins.
    return dataclasses.replace(Sweep.from_dict(d), out=out)
