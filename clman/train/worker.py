"""Pieces every per-worker loop uses: seeding, resume, reporting a checkpoint, a rank-0 logger."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray.train
import torch

from clman import amp
from clman import checkpoint as ckpt
from clman import distributed

CHECKPOINT_FILE = "checkpoint.pt"
CHECK_EVERY = 50  # steps between finite-loss checks (each one waits for the device)


@dataclass(frozen=True)
class LoopInputs:
    """What a per-worker loop is given (``clman.launch.trainer.finetune_job`` / ``pretrain_job`` make it on the driver;
    Ray pickles it to every worker): the job's config, its splits' frames, and where to report progress."""

    config: Any  # clman.config.FinetuneConfig or PretrainConfig
    train: dict = field(repr=False)  # clman.launch.trainer.frame_source of the training videos
    val: dict | None = field(default=None, repr=False)  # finetune: of the val videos; None: no validation
    encoder: str | None = None  # finetune: the SimCLR checkpoint whose encoder starts the model
    progress: Any = field(
        default=None, repr=False
    )  # the driver's progress queue (clman.launch.progress.ProgressBar), if any

    def with_progress(self, queue) -> LoopInputs:
        """These inputs, the epochs' metrics to be put in ``queue`` (``worker.report``)."""
        return replace(self, progress=queue)


class RankFilter(logging.Filter):
    """Only rank 0 logs INFO; every rank logs warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or distributed.get_rank() == 0


def worker_logger(name: str) -> logging.Logger:
    log = logging.getLogger(name)
    if not any(isinstance(f, RankFilter) for f in log.filters):
        log.addFilter(RankFilter())
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    return log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict | None:
    """Load the latest Ray checkpoint of this run (after a failure or a driver restart)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = ckpt.load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
    ckpt.load_model_state(model, state["model"], what="resumed checkpoint")
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def report(
    metrics: dict,
    model,
    optimizer,
    *,
    kind: str,
    config: dict,
    step: int,
    epoch: int,
    save: bool,
    extra: dict | None = None,
    progress=None,
) -> None:
    """``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint.

    ``progress``: the driver's progress queue (``LoopInputs.progress``), when it shows a bar: rank 0
    puts the epoch's losses and AUCs in it.
    """
    if progress is not None and distributed.is_main_process():
        shown = {k: float(v) for k, v in metrics.items() if k in ("loss", "train_loss", "train_auc", "val_auc")}
        progress.put_nowait({"epoch": epoch + 1, **shown})
    if save and distributed.is_main_process():
        d = tempfile.mkdtemp(prefix="clman-ckpt-")
        try:
            ckpt.save_checkpoint(
                os.path.join(d, CHECKPOINT_FILE),
                model,
                kind=kind,
                config=config,
                step=step,
                epoch=epoch,
                optimizer=optimizer,
                extra=extra,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        ray.train.report(metrics)


def prepare(model: torch.nn.Module, scale) -> tuple[torch.nn.Module, torch.device, str]:
    """(the model to train, its device, the precision to run at): device + DDP through Ray Train.
    The loops compile their step (augmentation + forward) when ``scale.compile`` (``amp.compile_step``)."""
    import ray.train.torch

    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    return model, device, amp.resolve(scale.precision, device)


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    """``loss`` may be a running sum: one non-finite step makes it non-finite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss.item()} by epoch {epoch}, step {step}: lower the learning rate"
        )
