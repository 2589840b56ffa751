"""SimCLR pretraining of the frame encoder — the function each Ray Train worker runs (paper 3.2, 4.3).

Each step takes this worker's share of the global batch of frames, two
augmented views of each, and minimises NT-Xent with the negatives of every
worker (``clman.losses.nt_xent`` gathers them). LARS with warmup + cosine
annealing, the learning rate a pure function of the global step.
"""

from __future__ import annotations

import time

import ray.train
import torch

from clman import amp
from clman import config as C
from clman import distributed
from clman.losses import nt_xent
from clman.models.build import simclr_from
from clman.optim import LARS, lars_param_groups, warmup_cosine
from clman.train import runner, worker
from clman.train.runner import JobError

log = worker.worker_logger("clman.pretrain")


# ---------------------------------------------------------------- driver side


def check_data(manifest: str, split: str):
    """The rows of ``split``; a :class:`JobError` before any worker when it is empty."""
    from clman.data.manifest import read_manifest

    rows = read_manifest(manifest, split=split)
    if len(rows) == 0:
        raise JobError(f"{manifest}: split {split!r} is empty; nothing to pretrain on")
    return rows


def steps_per_epoch(cfg: C.PretrainConfig, clips: int) -> int:
    """Optimizer steps in one epoch: ``frames_per_clip`` frames of each clip, in global batches."""
    return max(1, clips * cfg.data.frames_per_clip // cfg.batch_size)


def train_job(cfg: C.PretrainConfig, manifest: str, split: str, clips: int) -> runner.TrainJob:
    """The pretrain run of ``cfg`` on ``clips`` clips of ``split`` (Ray must be up: the dataset is built here)."""
    from clman.data import pipeline

    return runner.TrainJob(
        train_loop_per_worker,
        {"config": C.to_dict(cfg), "steps_per_epoch": steps_per_epoch(cfg, clips)},
        {"train": pipeline.pretrain_dataset(manifest, split, cfg.data, seed=cfg.seed)},
    )


# ---------------------------------------------------------------- worker side


def train_loop_per_worker(loop_config: dict) -> None:
    cfg: C.PretrainConfig = C.from_dict("pretrain", loop_config["config"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    world = distributed.get_world_size()
    rank = distributed.get_rank()
    worker.seed_everything(cfg.seed + rank)

    model = simclr_from(cfg.model)
    optimizer = LARS(
        lars_param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        trust_coefficient=cfg.trust_coefficient,
    )
    state = worker.restore(model, optimizer)
    start_epoch = state["epoch"] + 1 if state else 0
    step = state["step"] if state else 0
    if state:
        log.info("resumed from epoch %d (step %d)", state["epoch"], step)
    model, device, precision = worker.prepare(model, cfg.scale)  # the module itself stays plain

    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    per_worker = max(1, cfg.batch_size // world)
    shard = ray.train.get_dataset_shard("train")
    saved_config = C.to_dict(cfg)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, images, loss_sum, n_steps = time.perf_counter(), 0, 0.0, 0
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device):
            lr = warmup_cosine(step, total_steps, cfg.lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n = batch["view1"].shape[0]
            # One forward over both views: (2n, C, H, W) -> (2n, proj_dim)
            with amp.autocast(precision, device):
                z = model(torch.cat([batch["view1"], batch["view2"]])).float()
            loss = nt_xent(z[:n], z[n:], temperature=cfg.temperature)
            worker.check_finite(loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n_steps += 1
            images += 2 * n
            loss_sum += loss.item()
        seconds = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "step": step,
            "start_epoch": start_epoch,  # > 0 when this run resumed from a checkpoint
            "loss": loss_sum / max(n_steps, 1),
            "lr": warmup_cosine(step, total_steps, cfg.lr, warmup_steps),
            # images/s over all workers: every worker ran the same number of steps
            "images_per_s": images * world / max(seconds, 1e-9),
        }
        log.info(
            "pretrain epoch %d/%d  loss %.4f  lr %.2e  %.1f images/s",
            epoch + 1, cfg.epochs, metrics["loss"], metrics["lr"], metrics["images_per_s"],
        )
        save = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        worker.report(metrics, model, optimizer, kind="simclr", config=saved_config, step=step,
                      epoch=epoch, save=save)
