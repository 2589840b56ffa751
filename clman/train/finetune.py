"""CLMAN finetuning — the function each Ray Train worker runs (paper 3.3, 4.3).

The encoder (pretrained by SimCLR or fresh: the paper's "without CL" row) +
aggregator (multi-meta attention by default) + a linear classifier, trained
with cross-entropy on T-frame clips: SGD at a constant lr (the paper) or AdamW,
warmup + cosine, clipping, label smoothing, class weights (``FinetuneConfig``).
Validation every epoch with the six metrics, their states synced across
workers, on the manifest's val split or on patients carved from the training
split (:func:`validation_split`). Which checkpoint is kept (the best val score: the val AUC, or its
mean over ``select_window`` epochs), when ``patience`` stops the run early and the one-line
not-learning warning are decided by ``clman.train.selection.Selection`` (no Ray, no torch; its
state rides in the checkpoint). The test split is never read here. Validation scores a video as
the test does (:class:`ScoredClips`): ``finetune.val_frames`` / ``val_clips`` are
``evaluate.frames`` / ``evaluate.clips`` of the same config tree (``clman.config.job_config``),
and the frames come from the function test scoring calls (``clman.evaluate.scoring.scored_indices``).

The loop: :func:`train_loop_per_worker` builds the model (:func:`build_model`), the optimizer, the
feeds (:func:`training_feed`, :func:`validation_feed`), then per epoch :func:`train_one_epoch`,
:func:`validation_metrics` (:func:`validate`), ``Selection.update`` and ``worker.report``.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from clman import amp
from clman import optim
from clman import checkpoint as ckpt
from clman import config as C
from clman import distributed
from clman.metrics import BinaryMetrics
from clman.models.build import classifier_from, load_weights
from clman.data import augment
from clman.errors import JobError
from clman.evaluate import scoring
from clman.evaluate.inference import choose_threshold, mean_log_probs, preprocessing
from clman.train import feed, worker
from clman.train.selection import (  # noqa: F401  (re-exported: jobs, scripts and tests read them here)
    CHANCE_AUC_MARGIN,
    CHECK_AFTER_EPOCHS,
    MIN_LOSS_DROP,
    Decision,
    Selection,
    best_score,
    check_epoch,
    loss_stalled,
    not_learning,
    val_at_chance,
    val_score,
)

log = worker.worker_logger("clman.finetune")
SCORE = "val_score"  # what ranks checkpoints when there is a validation split (:func:`val_score`)


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


def _per_label(rows, column: str) -> tuple[int, int]:
    """(benign, malignant) count of distinct ``column`` values (patient_id, video_id) in ``rows``."""
    return tuple(int(rows.loc[rows["label"] == y, column].nunique()) for y in (0, 1))


def validation_split(train, val, fraction: float, seed: int, manifest: str = "manifest") -> tuple:
    """(train rows, val rows, what was done as a dict with a one-line ``note``).

    The manifest's val split when it has one; else, with ``fraction`` > 0, a share of the
    training patients, stratified by patient label and drawn from ``seed``
    (``clman.data.manifest.carve_validation``, as in studies): no patient on both sides, the same rows and
    seed give the same carve. A :class:`JobError` naming the counts when a class would be
    missing on either side. The test split is never an input.
    """
    from clman.data.manifest import carve_validation

    if len(val):
        if val["label"].nunique() < 2:
            b, m = _per_label(val, "video_id")
            raise JobError(
                f"{manifest}: split 'val' holds {b} benign and {m} malignant videos; the val AUC that "
                "picks the checkpoint needs both (re-ingest with another --split or --seed)"
            )
        info = {
            "source": "manifest",
            "videos": len(val),
            "patients": int(val["patient_id"].nunique()),
            "note": f"validation: the manifest's val split ({len(val)} videos)",
        }
        return train, val, info
    if fraction == 0:
        info = {
            "source": "none",
            "videos": 0,
            "patients": 0,
            "note": "no val split and finetune.val_fraction=0: no validation, the last checkpoint is kept",
        }
        return train, val, info
    carved_train, carved_val = carve_validation(train, fraction, seed)  # the studies' carve too
    (tb, tm), (vb, vm) = _per_label(carved_train, "patient_id"), _per_label(carved_val, "patient_id")
    if min(tb, tm, vb, vm) == 0 or carved_val["label"].nunique() < 2:
        pb, pm = _per_label(train, "patient_id")
        raise JobError(
            f"finetune.val_fraction={fraction:g} leaves a class out: the {pb} benign and {pm} malignant training "
            f"patients would split into {tb} + {tm} for training and {vb} + {vm} for validation; change "
            "finetune.val_fraction (0 = no validation) or add a val split to the manifest"
        )
    info = {
        "source": "carved",
        "fraction": fraction,
        "seed": seed,
        "videos": len(carved_val),
        "patients": vb + vm,
        "patients_per_label": [vb, vm],
        "training_videos": len(train),
        "note": f"no val split: {len(carved_val)} of {len(train)} training videos (by patient: {vb} benign + "
        f"{vm} malignant of {train['patient_id'].nunique()} patients) held out for validation "
        f"(finetune.val_fraction={fraction:g}, seed {seed})",
    }
    return carved_train, carved_val, info


# The label_fraction draw's stream beside the seed: not the validation carve's (assign_splits draws from the
# seed alone), so the subset's order does not echo the carve's.
LABEL_SUBSET_STREAM = 0x1ABE1


def label_subset(train, fraction: float, seed: int, where: str = "manifest", min_videos: int = 1) -> tuple:
    """(the training rows of ``fraction`` of ``train``'s patients, what was taken as a dict with a one-line ``note``).

    Per patient label (a patient is malignant when any of their videos is), the patients in an
    order drawn from (``seed``, ``LABEL_SUBSET_STREAM``), the first ceil(fraction * n) of each:
    for one seed and pool the 0.1 subset is inside the 0.25 one, inside the 0.5 one (nested by
    construction), every class keeps a patient, and each class's share is ``fraction`` rounded up.
    ``train`` is the training side after the validation carve (:func:`validation_split`): the
    validation patients stay the same at every fraction, only the training labels shrink.
    A :class:`JobError` naming the counts when a class has no patient, or when fewer than
    ``min_videos`` videos (:func:`min_training_videos`: one batch) are left.
    """
    import numpy as np

    from clman.data.manifest import patient_labels

    pb, pm = _per_label(train, "patient_id")
    if fraction >= 1.0:
        info = {
            "fraction": 1.0,
            "seed": seed,
            "videos": len(train),
            "patients_per_label": [pb, pm],
            "note": f"labels: every training patient ({pb} benign + {pm} malignant, {len(train)} videos)",
        }
        return train, info
    labels = patient_labels(train)  # sorted by patient_id: the order of the input rows does not matter
    rng = np.random.default_rng([seed, LABEL_SUBSET_STREAM])
    kept = []
    for label in (0, 1):
        patients = rng.permutation(labels.index[labels == label].to_numpy())
        kept += patients[: math.ceil(fraction * len(patients))].tolist()
    rows = train[train["patient_id"].isin(set(kept))].reset_index(drop=True)
    b, m = _per_label(rows, "patient_id")
    counts = f"{b} benign + {m} malignant of {pb} + {pm} training patients, {len(rows)} of {len(train)} videos"
    if min(b, m) == 0:
        raise JobError(
            f"{where}: finetune.label_fraction={fraction:g} leaves a class out of training ({counts}); "
            "finetuning needs benign and malignant patients"
        )
    if len(rows) < min_videos:
        raise JobError(
            f"{where}: finetune.label_fraction={fraction:g} leaves {counts}: fewer than one batch "
            f"({min_videos} videos); raise finetune.label_fraction or lower finetune.batch_size"
        )
    info = {
        "fraction": fraction,
        "seed": seed,
        "videos": len(rows),
        "patients_per_label": [b, m],
        "training_videos": len(train),
        "training_patients_per_label": [pb, pm],
        "note": f"labels: finetune.label_fraction={fraction:g} of the training patients per class, {counts} "
        f"(nested by seed {seed}: a smaller fraction's patients are among these)",
    }
    return rows, info


def min_training_videos(cfg: C.FinetuneConfig) -> int:
    """The fewest training videos that fill one batch on every worker (``feed.Feed.steps`` >= 1)."""
    world = cfg.scale.num_workers
    return world * max(1, cfg.batch_size // world)


def selection_window(cfg: C.FinetuneConfig) -> int:
    """``select_window``, or the run's length when shorter: such a run is scored at its last epoch."""
    return min(cfg.select_window, cfg.epochs)


def history(checkpoint) -> dict:
    """Per-epoch ``train_loss``, ``train_auc`` and ``val_auc`` lists of a run, from its last (Ray) checkpoint."""
    with checkpoint.as_directory() as d:
        state = ckpt.load_checkpoint(os.path.join(d, worker.CHECKPOINT_FILE))
    progress = (state.get("extra") or {}).get("progress") or {}
    return {
        "train_loss": progress.get("losses", []),
        "train_auc": progress.get("train_aucs", []),
        "val_auc": progress.get("val_aucs", []),
    }


# ---------------------------------------------------------------- worker side


def load_encoder(model, encoder_uri: str) -> None:
    """Put the encoder weights of a SimCLR (or classifier) checkpoint into ``model.encoder``."""
    state = ckpt.load_checkpoint(encoder_uri)
    ckpt.load_model_state(model.encoder, ckpt.encoder_state_dict(state), what=f"encoder checkpoint {encoder_uri}")


def make_optimizer(model, cfg: C.FinetuneConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over two groups: the encoder at ``lr * encoder_lr_scale`` (0 freezes it), the rest at lr.

    Each group carries ``lr_scale``; the loop sets ``lr = schedule(step) * lr_scale`` every step.
    """
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
    if cfg.optimizer == "sgd":  # the paper's
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    else:
        raise ValueError(f"finetune.optimizer: {cfg.optimizer!r} is not one of {list(C.OPTIMIZERS)}")
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return opt


def hold_frozen_encoder(model, cfg: C.FinetuneConfig) -> None:
    """After ``model.train()``: a frozen encoder (``encoder_lr_scale`` 0: the linear probe) back in eval mode.

    Frozen means its outputs too: BatchNorm's running statistics (``model.norm=batch``) would
    otherwise drift with the finetuning batches, and dropout would stay on. GroupNorm (the
    paper's) has neither, so for CLMAN's encoder this changes nothing.
    """
    encoder = getattr(model, "encoder", None)  # the Table 4 baselines have none
    if cfg.encoder_lr_scale == 0 and encoder is not None:
        encoder.eval()


def class_weights(labels, mode: str) -> torch.Tensor | None:
    """Cross-entropy weights (benign, malignant) from the training videos' labels, or None.

    ``balanced``: n / (2 n_c), as scikit-learn's, so that both classes weigh the same in the
    loss (1.0 each when balanced); a class with no video gets weight 0.
    """
    if mode == "none":
        return None
    if mode == "balanced":
        counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=2).double()
        w = torch.where(counts > 0, counts.sum() / (2 * counts.clamp(min=1)), torch.zeros_like(counts))
        return w.float()
    raise ValueError(f"finetune.class_weights: {mode!r} is not one of {list(C.CLASS_WEIGHTS)}")


class ScoredClips(feed.EvalClips):
    """The val split's sampler, scored as the test is: every video once, in order, its frames those of
    ``clman.evaluate.scoring.scored_indices`` (the function test scoring calls) with ``finetune.val_frames`` /
    ``val_clips`` (= ``evaluate.frames`` / ``evaluate.clips``), the K clips of T flattened clip-major:
    ``frames`` (B, K * T, C, S, S). With ``val_frames=all`` a clip is the whole video (K = 1). No
    randomness: the same frames in every epoch. (From the object store cache, a video longer than 512
    frames gives the nearest of its 512 cached frames: ``clman.data.frames.pick``.)
    """

    def __init__(self, num_frames: int, frames: str, clips: int):
        super().__init__(num_frames)
        self.frames, self.clips = frames, (clips if frames == "clips" else 1)

    def indices(self, video: feed.Video, epoch: int):
        return scoring.scored_indices(video.num_frames, self.num_frames, self.frames, self.clips).ravel()


def training_feed(source: dict, cfg: C.FinetuneConfig, batch_size: int, rank: int, world: int, pin: bool) -> feed.Feed:
    """This worker's training clips: a seeded share of every epoch, T frames by segments."""
    return feed.Feed(
        source,
        feed.Clips(cfg.data.num_frames, cfg.seed),
        cfg.data,
        batch_size=batch_size,
        rank=rank,
        world=world,
        pin=pin,
    )


def validation_feed(
    source: dict, cfg: C.FinetuneConfig, batch_size: int, rank: int, world: int, pin: bool
) -> feed.Feed:
    """This worker's share of the val videos (:class:`ScoredClips`): batches of ``batch_size`` videos, each
    K clips (B * K clips through the model at once); with ``val_frames=all`` one video per batch, since
    lengths differ."""
    sampler = ScoredClips(cfg.data.num_frames, cfg.val_frames, cfg.val_clips)
    return feed.Feed(
        source,
        sampler,
        cfg.data,
        batch_size=batch_size if cfg.val_frames == "clips" else 1,
        rank=rank,
        world=world,
        pin=pin,
    )


@torch.no_grad()
def validate(
    model, batches, device, size: int, precision: str = "fp32", clips: int = 1, target_sensitivity: float | None = None
) -> dict:
    """Loss and the six metrics over this worker's share of the validation videos, synced over all workers.

    A video's score is the mean P(malignant) of its ``clips`` clips (:class:`ScoredClips`), as
    in test scoring (``clman.evaluate.inference.score_clips``); the loss is the cross-entropy of that mean
    (with one clip, of the clip's logits). With ``target_sensitivity``, also ``threshold``: the
    operating point on every worker's validation scores (``clman.evaluate.inference.choose_threshold``; None
    for one class), a record for the checkpoint, not a metric.
    """
    model.eval()
    metric = BinaryMetrics().to(device)
    loss_sum = torch.zeros(2, device=device)  # (sum of losses, count)
    scored: list[tuple[float, int]] = []  # (score, label) of this worker's videos, for the threshold
    for batch in batches:
        batch = feed.to_device(batch, device)
        frames = batch["frames"]  # (B, K * T, C, S, S) uint8, clip-major
        b, kt = frames.shape[:2]
        frames = frames.reshape(b * clips, kt // clips, *frames.shape[2:])  # (B * K, T, C, S, S)
        x = augment.resize_clips(frames, size)  # (B * K, T, 3, size, size)
        with amp.autocast(precision, device):
            logits = model(x, None).float()  # (B * K, 2)
        log_probs = mean_log_probs(logits, clips)  # (B, 2): log of each video's mean probabilities
        labels = batch["label"]
        loss_sum += torch.stack(
            [F.nll_loss(log_probs, labels, reduction="sum"), torch.tensor(float(len(labels)), device=device)]
        )
        metric.update(log_probs[:, 1].exp(), labels)
        if target_sensitivity is not None:
            scored += zip(log_probs[:, 1].exp().tolist(), labels.tolist())
    loss_sum = distributed.all_reduce_sum(loss_sum)
    out = {f"val_{k}": float(v) for k, v in metric.compute().items()}
    out["val_loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    if target_sensitivity is not None:
        every = [pair for part in distributed.all_gather_object(scored) for pair in part]  # the same on every rank
        out["threshold"] = choose_threshold([p[0] for p in every], [p[1] for p in every], target_sensitivity)
    return out


def build_model(cfg: C.FinetuneConfig, encoder_uri: str | None) -> torch.nn.Module:
    """The classifier of ``cfg.model``, with user-supplied weights of this arch (a path or S3 URI; never a
    download) and then the pretrained encoder, when given."""
    model = classifier_from(cfg.model)
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    if encoder_uri:
        load_encoder(model, encoder_uri)
    return model


def compiled_forward(model, cfg: C.FinetuneConfig, device, precision: str):
    """The training step's augmentation + forward: uint8 (B, T, C, S, S) -> augmented (B, T, 3, size, size)
    -> logits (B, 2); compiled, one graph with the draws' keys (one per clip: (seed, epoch, video))."""
    spec = augment.AugmentSpec.finetune(cfg.data)

    def forward(frames: torch.Tensor, video: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        with amp.autocast(precision, device):
            return model(augment.augment_clips(frames, augment.keys_at(prefix, video), spec), None).float()

    return amp.compile_step(forward, cfg.scale, device)


def train_one_epoch(
    model, forward, optimizer, batches: feed.Feed, cfg: C.FinetuneConfig, epoch: int, step: int, lr_at, weight, device
) -> tuple[dict, int]:
    """One epoch of this worker's batches: ({train_loss, train_auc, clips_per_s}, the step after it).

    ``lr_at(step)`` is the schedule; ``weight`` the class weights of the loss (or None).
    """
    t0, clips, n_steps = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    scores, targets = [], []  # (B,) per step, kept on the device for the epoch's training AUC
    prefix = augment.epoch_prefix(cfg.seed, epoch, device)  # (seed, epoch)'s part of the draws' keys
    for batch in batches.batches(epoch):
        batch = feed.to_device(batch, device)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        logits = forward(batch["frames"], batch["video"], prefix)  # (B, 2)
        loss = F.cross_entropy(logits, batch["label"], weight=weight, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # the norm stays on the device (no error_if_nonfinite: that would sync)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        optimizer.step()
        step += 1
        n_steps += 1
        clips += logits.shape[0]
        loss_sum += loss.detach()
        scores.append(torch.softmax(logits.detach(), dim=1)[:, 1])
        targets.append(batch["label"])
        if n_steps % worker.CHECK_EVERY == 0:
            worker.check_finite(loss_sum, epoch, step)
    worker.check_finite(loss_sum, epoch, step)
    seconds = time.perf_counter() - t0
    # Every rank ran the same number of steps: the mean over ranks is the mean over all steps.
    train_loss = float(distributed.all_reduce_mean(loss_sum)) / max(n_steps, 1)
    train_metric = BinaryMetrics().to(device)
    train_metric.update(torch.cat(scores), torch.cat(targets))  # synced over the ranks by compute()
    return {
        "train_loss": train_loss,
        "train_auc": _train_auc(train_metric),
        "clips_per_s": clips * distributed.get_world_size() / max(seconds, 1e-9),
    }, step


def validation_metrics(
    model, val_feed: feed.Feed, cfg: C.FinetuneConfig, epoch: int, device, precision: str
) -> tuple[dict, dict | None]:
    """(the val metrics reported, this epoch's operating point): model.pt keeps the kept epoch's
    (``extra``), for predict. ``model``: the unwrapped module, no DDP collectives while shards hold
    unequal numbers of videos."""
    val = validate(
        model,
        val_feed.batches(epoch),
        device,
        cfg.data.size,
        precision,
        val_feed.sampler.clips,
        target_sensitivity=cfg.val_target_sensitivity,
    )
    threshold = val.pop("threshold")
    val["val_threshold"] = threshold["value"] if threshold else float("nan")
    val["val_scoring"] = (
        f"clips: mean of {cfg.val_clips} clip(s) of T={cfg.data.num_frames}"
        if cfg.val_frames == "clips"
        else "all: every frame (<= 512) as one clip"
    )
    return val, threshold


def log_epoch(cfg: C.FinetuneConfig, metrics: dict, decision: Decision, best: tuple, rank: int) -> None:
    """The epoch's line; the not-learning warning once (rank 0); why the run stops early."""
    if decision.new_warning and rank == 0:  # one line, the first time; not one per rank
        log.warning("%s", decision.warning)
    log.info(
        "finetune epoch %d/%d  loss %.4f  train auc %.3f  %s  lr %.2e  %.1f clips/s",
        metrics["epoch"] + 1,
        cfg.epochs,
        metrics["train_loss"],
        metrics["train_auc"],
        "  ".join(f"val {k} {metrics['val_' + k]:.3f}" for k in ("auc", "accuracy") if "val_" + k in metrics),
        metrics["lr"],
        metrics["clips_per_s"],
    )
    if decision.stop:
        log.info(
            "stopping early after epoch %d: no better val score than %.3f (epoch %d) for %d epochs",
            metrics["epoch"] + 1,
            best[0] if best[0] is not None else float("nan"),
            best[1] + 1,
            cfg.patience,
        )


def train_loop_per_worker(inputs: worker.LoopInputs) -> None:
    cfg: C.FinetuneConfig = inputs.config
    world, rank = distributed.get_world_size(), distributed.get_rank()
    worker.seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    raw_model = build_model(cfg, inputs.encoder)
    optimizer = make_optimizer(raw_model, cfg)
    state = worker.restore(raw_model, optimizer)
    start_epoch, step = (state["epoch"] + 1, state["step"]) if state else (0, 0)
    selection = restored_selection(cfg, inputs.val is not None, state)
    model, device, precision = worker.prepare(raw_model, cfg.scale)
    per_worker, pin = max(1, cfg.batch_size // world), device.type == "cuda"
    train_feed = training_feed(inputs.train, cfg, per_worker, rank, world, pin)
    val_feed = validation_feed(inputs.val, cfg, per_worker, rank, world, pin) if inputs.val is not None else None
    lr_at = lr_schedule(cfg, train_feed, per_worker)
    weight = class_weights([v.label for v in train_feed.videos], cfg.class_weights)
    weight = weight.to(device) if weight is not None else None
    forward = compiled_forward(model, cfg, device, precision)
    saved_config = C.to_dict(cfg)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        hold_frozen_encoder(raw_model, cfg)
        stats, step = train_one_epoch(model, forward, optimizer, train_feed, cfg, epoch, step, lr_at, weight, device)
        metrics = {
            "epoch": epoch,
            "step": step,
            "start_epoch": start_epoch,  # > 0: resumed from a checkpoint
            "train_loss": stats["train_loss"],
            "train_auc": stats["train_auc"],
            "lr": lr_at(max(step - 1, 0)),
            "clips_per_s": stats["clips_per_s"],
        }
        threshold = None
        if val_feed is not None:
            val, threshold = validation_metrics(raw_model, val_feed, cfg, epoch, device, precision)
            metrics |= val
        decision = judge_epoch(selection, metrics, val_feed is not None)
        log_epoch(cfg, metrics, decision, selection.best, rank)
        # A new best is always saved (it is the checkpoint the job keeps); the last report always
        # carries one, so the run's final metrics are the last epoch's.
        deploy = {"preprocessing": preprocessing(cfg)} | ({"threshold": threshold} if threshold else {})
        extra = {"encoder": inputs.encoder or "", "progress": selection.state(), **deploy}
        worker.report(
            metrics,
            model,
            optimizer,
            kind="classifier",
            config=saved_config,
            step=step,
            epoch=epoch,
            save=decision.save,
            progress=inputs.progress,
            extra=extra,
        )
        if decision.stop:
            break


def restored_selection(cfg: C.FinetuneConfig, has_val: bool, state: dict | None) -> Selection:
    """The run's :class:`Selection`, holding what early stopping and the not-learning check remembered at
    the checkpoint ``state`` (none: a new run)."""
    progress = dict((state.get("extra") or {}).get("progress") or {}) if state else {}
    selection = Selection(
        cfg.epochs, selection_window(cfg), cfg.patience, cfg.checkpoint_every, cfg.lr, has_val, progress
    )
    if state:
        log.info("resumed from epoch %d (step %d)", state["epoch"], state["step"])
    return selection


def lr_schedule(cfg: C.FinetuneConfig, train_feed: feed.Feed, per_worker: int):
    """The learning rate at each optimizer step (``optim.schedule`` over the run's steps)."""
    steps_per_epoch = train_feed.steps()
    if steps_per_epoch < 1:
        raise JobError(
            f"finetune: {len(train_feed.order(0))} training clips per worker do not fill one batch of "
            f"{per_worker}; lower finetune.batch_size"
        )
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(s: int) -> float:
        return optim.schedule(cfg.schedule, s, total_steps, cfg.lr, warmup_steps)

    return lr_at


def judge_epoch(selection: Selection, metrics: dict, has_val: bool) -> Decision:
    """``selection``'s decision on this epoch; ``metrics`` gains the selection's scores (with a validation
    split), ``stopped_early`` and ``warning``."""
    decision = selection.update(metrics["epoch"], metrics["train_loss"], metrics["train_auc"], metrics.get("val_auc"))
    if has_val:
        best, best_epoch = selection.best
        metrics |= {
            "val_score": selection.score(),
            "best_val_score": best if best is not None else float("nan"),
            "best_epoch": best_epoch,
        }
    metrics |= {"stopped_early": decision.stop, "warning": decision.warning}
    return decision


def _train_auc(metric: BinaryMetrics) -> float:
    """The epoch's training AUC (NaN when an epoch held one class only)."""
    import warnings

    from clman.metrics import UndefinedMetricWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return metric.compute()["auc"]
