"""CLMAN finetuning — the function each Ray Train worker runs (paper 3.3, 4.3).

The encoder (pretrained by SimCLR or fresh: the paper's "without CL" row) +
aggregator (multi-meta attention by default) + a linear classifier, trained
with cross-entropy and SGD on T-frame clips. Validation every epoch with the
six metrics, their states synced across workers.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from clman import amp
from clman import checkpoint as ckpt
from clman import config as C
from clman import distributed
from clman.metrics import BinaryMetrics
from clman.models.build import classifier_from
from clman.data import augment
from clman.train import feed, runner, worker
from clman.train.runner import JobError

log = worker.worker_logger("clman.finetune")
SCORE = "val_auc"  # what ranks checkpoints (and Tune trials) when there is a validation split


# ---------------------------------------------------------------- driver side


def check_data(manifest: str, require_val: bool = False) -> tuple:
    """The train and val rows of ``manifest``; a :class:`JobError` before any worker when they cannot be used.

    ``require_val``: a validation split with both classes must exist (Tune ranks trials by val_auc).
    """
    from clman.data.manifest import read_manifest

    train = read_manifest(manifest, split="train")
    if len(train) == 0:
        raise JobError(f"{manifest}: split 'train' is empty; nothing to finetune on")
    if len(set(train["label"].tolist())) < 2:
        raise JobError(f"{manifest}: split 'train' holds one class only; finetuning needs benign and malignant")
    val = read_manifest(manifest, split="val")
    if require_val:
        if len(val) == 0:
            raise JobError(f"{manifest}: no 'val' split; a finetune sweep ranks trials by val_auc")
        if len(set(val["label"].tolist())) < 2:
            raise JobError(f"{manifest}: split 'val' holds one class only, so val_auc is undefined")
    return train, val


def train_job(cfg: C.FinetuneConfig, manifest: str, encoder: str | None, has_val: bool) -> runner.TrainJob:
    """The finetune run of ``cfg`` on ``manifest`` (Ray must be up: the frames are cached here when they fit)."""
    from clman.data.manifest import read_manifest

    loop_config = {"config": C.to_dict(cfg), "encoder": encoder, "has_val": has_val}
    for split in ("train", "val") if has_val else ("train",):
        loop_config[split] = runner.frame_source(read_manifest(manifest, split=split), cfg.data)
    return runner.TrainJob(train_loop_per_worker, loop_config, {}, SCORE if has_val else None)


# ---------------------------------------------------------------- worker side


def load_encoder(model, encoder_uri: str) -> None:
    """Put the encoder weights of a SimCLR (or classifier) checkpoint into ``model.encoder``."""
    state = ckpt.load_checkpoint(encoder_uri)
    ckpt.load_model_state(model.encoder, ckpt.encoder_state_dict(state), what=f"encoder checkpoint {encoder_uri}")


def sgd(model, cfg: C.FinetuneConfig) -> torch.optim.SGD:
    """The paper's SGD; the CLMAN encoder may take a scaled learning rate (``encoder_lr_scale``)."""
    encoder_module = getattr(model, "encoder", None)  # the Table 4 baselines have none
    encoder = [p for p in encoder_module.parameters() if p.requires_grad] if encoder_module is not None else []
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if cfg.encoder_lr_scale > 0:
        if encoder:
            groups.append({"params": encoder, "lr_scale": cfg.encoder_lr_scale})
    else:
        for p in encoder:
            p.requires_grad_(False)
    # foreach: one kernel per group and op, not one per parameter (host-bound steps on GPUs)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return opt


@torch.no_grad()
def validate(model, batches, device, size: int, precision: str = "fp32") -> dict:
    """Loss and the six metrics over this worker's share of the validation videos, synced over all workers."""
    model.eval()
    metric = BinaryMetrics().to(device)
    loss_sum = torch.zeros(2, device=device)  # (sum of losses, count)
    for batch in batches:
        batch = feed.to_device(batch, device)
        clips = augment.resize_clips(batch["frames"], size)  # (B, T, 3, size, size)
        with amp.autocast(precision, device):
            logits = model(clips, None).float()
        labels = batch["label"]
        loss_sum += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 torch.tensor(float(len(labels)), device=device)])
        metric.update(torch.softmax(logits, dim=1)[:, 1], labels)
    loss_sum = distributed.all_reduce_sum(loss_sum)
    out = {f"val_{k}": float(v) for k, v in metric.compute().items()}
    out["val_loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    cfg: C.FinetuneConfig = C.from_dict("finetune", loop_config["config"])
    encoder_uri: str | None = loop_config.get("encoder")
    has_val: bool = loop_config.get("has_val", False)
    world = distributed.get_world_size()
    rank = distributed.get_rank()
    worker.seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    model = classifier_from(cfg.model)
    if encoder_uri:
        load_encoder(model, encoder_uri)
    optimizer = sgd(model, cfg)
    state = worker.restore(model, optimizer)
    start_epoch = state["epoch"] + 1 if state else 0
    step = state["step"] if state else 0
    if state:
        log.info("resumed from epoch %d (step %d)", state["epoch"], step)
    raw_model = model
    model, device, precision = worker.prepare(model, cfg.scale)
    per_worker = max(1, cfg.batch_size // world)
    pin = device.type == "cuda"
    train_feed = worker.feed(loop_config["train"], cfg.data, feed.CLIPS, seed=cfg.seed, batch_size=per_worker,
                             rank=rank, world=world, pin=pin)
    val_feed = (worker.feed(loop_config["val"], cfg.data, feed.EVAL_CLIPS, seed=cfg.seed, batch_size=per_worker,
                            rank=rank, world=world, pin=pin) if has_val else None)
    spec = augment.AugmentSpec.finetune(cfg.data)

    def forward(frames: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # uint8 (B, T, C, S, S) -> augmented (B, T, 3, size, size) -> logits (B, 2); one graph when compiled
        with amp.autocast(precision, device):
            return model(augment.augment_clips(frames, keys, spec), None).float()

    if cfg.scale.compile:
        forward = torch.compile(forward)
    saved_config = C.to_dict(cfg)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, clips, n_steps = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for batch in train_feed.batches(epoch):
            batch = feed.to_device(batch, device)
            keys = augment.sample_keys(cfg.seed, epoch, batch["video"])  # one draw per clip
            logits = forward(batch["frames"], keys)  # (B, 2)
            loss = F.cross_entropy(logits, batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n_steps += 1
            clips += logits.shape[0]
            loss_sum += loss.detach()
            if n_steps % worker.CHECK_EVERY == 0:
                worker.check_finite(loss_sum, epoch, step)
        worker.check_finite(loss_sum, epoch, step)
        seconds = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "step": step,
            "start_epoch": start_epoch,  # > 0 when this run resumed from a checkpoint
            "train_loss": float(loss_sum) / max(n_steps, 1),
            "lr": cfg.lr,
            "clips_per_s": clips * world / max(seconds, 1e-9),
        }
        if val_feed is not None:
            # The unwrapped module: no DDP collectives while shards hold unequal numbers of videos.
            metrics |= validate(raw_model, val_feed.batches(epoch), device, cfg.data.size, precision)
        log.info(
            "finetune epoch %d/%d  loss %.4f  %s  %.1f clips/s",
            epoch + 1, cfg.epochs, metrics["train_loss"],
            "  ".join(f"{k} {metrics['val_' + k]:.3f}" for k in ("auc", "accuracy") if "val_" + k in metrics),
            metrics["clips_per_s"],
        )
        save = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        worker.report(metrics, model, optimizer, kind="classifier", config=saved_config, step=step,
                      epoch=epoch, save=save, extra={"encoder": encoder_uri or ""})
