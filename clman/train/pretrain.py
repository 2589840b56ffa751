"""SimCLR pretraining of the frame encoder — the function each Ray Train worker runs (paper 3.2, 4.3).

Each step takes this worker's share of the global batch of frames, two
augmented views of each, and minimises NT-Xent with the negatives of every
worker (``clman.losses.nt_xent`` gathers them). LARS with warmup + cosine
annealing, the learning rate a pure function of the global step.

A batch holds ``data.frames_per_clip`` (M) frames of each of its videos (the feed
draws M frames per video, in a row); the batch's ``video`` ids go to the loss, which
treats an anchor's other same-video frames as ``pretrain.same_video`` says.

Each epoch reports ``loss`` beside ``loss_chance``, the loss of uninformative
projections (ln(2N - 1) for N frames per global batch, 4.84 at N = 64), and
``loss_ratio`` = loss / loss_chance: near 1 the encoder has learnt next to nothing.
``loss_trend`` compares the mean loss of the last ``trend_window`` epochs with the
window before (-0.02: 2% lower): near 0 at the end of a run, the schedule has
levelled off; well below 0, a longer one would still lower the loss. The last
epoch's report also holds ``loss_curve``, every epoch's loss (kept in the
checkpoint, so a resumed run has the whole curve).
"""

from __future__ import annotations

import time

import torch

from clman import amp
from clman import config as C
from clman import distributed
from clman.losses import nt_xent, nt_xent_chance
from clman.models.build import simclr_from
from clman.optim import LARS, lars_param_groups, warmup_cosine
from clman.data import augment
from clman.errors import JobError
from clman.train import feed, worker

log = worker.worker_logger("clman.pretrain")


# ---------------------------------------------------------------- driver side


DEFAULT_LEFT_OUT = ("test",)  # never pretrained on unless named: the held-out videos


def parse_splits(splits) -> tuple[str, ...] | None:
    """``"train,unlabeled"`` or a sequence of names -> a tuple; None (the default) stays None."""
    if splits is None:
        return None
    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else [str(s) for s in splits]
    return tuple(dict.fromkeys(n for n in names if n)) or None


def check_data(manifest: str, splits=None):
    """The rows SimCLR reads (manifest order); a :class:`JobError` before any worker when there are none.

    SimCLR needs no label, so by default (``splits`` None) it reads every split of the manifest
    but ``test``: train, val and the ``unlabeled`` pool where present — the setting contrastive
    pretraining is for, many more sweeps than diagnoses. ``splits``: a comma list or a sequence
    of splits instead, each of which must hold videos (``unlabeled`` named before any was
    ingested is a mistake worth a line, not a silent run without them). ``splits_of(rows)``
    gives the splits read.
    """
    from clman.data.manifest import SPLITS, read_manifest

    wanted = parse_splits(splits)
    if wanted is not None:
        unknown = [s for s in wanted if s not in SPLITS]
        if unknown:
            raise JobError(f"{manifest}: unknown split(s) {unknown} to pretrain on; valid: {list(SPLITS)}")
    df = read_manifest(manifest)
    if wanted is None:
        rows = df[~df["split"].isin(DEFAULT_LEFT_OUT)].reset_index(drop=True)
        if len(rows) == 0:
            raise JobError(f"{manifest}: no video outside the test split; nothing to pretrain on")
        return rows
    empty = [s for s in wanted if not (df["split"] == s).any()]
    if empty:
        raise JobError(
            f"{manifest}: split(s) {empty} hold no videos; nothing to pretrain on there "
            f"(the manifest has {sorted(set(df['split']))})"
        )
    if any(s in DEFAULT_LEFT_OUT for s in wanted):
        log.warning("pretraining on the test split: its videos are no longer unseen by the encoder")
    return df[df["split"].isin(wanted)].reset_index(drop=True)


def splits_of(rows) -> tuple[str, ...]:
    """The splits present in ``rows``, in the manifest's order (train, val, test, unlabeled)."""
    from clman.data.manifest import SPLITS

    return tuple(s for s in SPLITS if (rows["split"] == s).any())


def steps_per_epoch(cfg: C.PretrainConfig, clips: int) -> int:
    """Optimizer steps in one epoch, as every worker's Feed counts them: each worker takes
    ``clips // workers`` clips, ``frames_per_clip`` frames each, in batches of ``batch_size // workers``."""
    world = cfg.scale.num_workers
    return (clips // world) * cfg.data.frames_per_clip // max(2, cfg.batch_size // world)


# ---------------------------------------------------------------- worker side


def chance_metrics(loss: float, chance: float) -> dict[str, float]:
    """``loss_chance`` (the loss of uninformative projections, ln(2N - 1) unless same_video=mask) and
    ``loss_ratio`` = loss / loss_chance: 1.0 learnt nothing, the lower the better (the demo's old
    80 LARS steps at lr 1.0 ended near 4.43 / 4.84 = 0.91)."""
    return {"loss_chance": chance, "loss_ratio": loss / chance}


def trend_window(epochs: int) -> int:
    """Epochs per window of :func:`loss_trend`: an eighth of the run, at least 2 (one epoch's loss is noisy)."""
    return max(2, epochs // 8)


def loss_trend(losses: list[float], window: int) -> float | None:
    """Relative change of the mean loss over the last ``window`` epochs against the ``window`` before
    (-0.05: 5% lower); None until there are two windows."""
    if len(losses) < 2 * window:
        return None
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window : -window]) / window
    return last / before - 1.0


def make_optimizer(model, cfg: C.PretrainConfig) -> LARS:
    """LARS over the SimCLR model, biases and norms without weight decay or adaptation."""
    return LARS(
        lars_param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        trust_coefficient=cfg.trust_coefficient,
    )


def compiled_forward(model, cfg: C.PretrainConfig, device, precision: str):
    """uint8 (n, C, S, S) -> both views (2n, 3, size, size) -> (2n, proj_dim). The views' keys are made
    here too: compiled, the keys, the augmentation and the forward are one graph."""
    spec = augment.AugmentSpec.simclr(cfg.data)

    def forward(images: torch.Tensor, video: torch.Tensor, slot: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        with amp.autocast(precision, device):
            return model(augment.simclr_views(images, prefix, video, slot, spec)).float()

    return amp.compile_step(forward, cfg.scale, device)


def train_one_epoch(
    model,
    forward,
    optimizer,
    frames: feed.Feed,
    cfg: C.PretrainConfig,
    epoch: int,
    step: int,
    lr_at,
    n_global: int,
    fixed_chance: float | None,
    device,
) -> tuple[dict, int]:
    """One epoch of this worker's batches: ({loss, loss_chance, loss_ratio, images_per_s}, the step after it).

    ``n_global``: frames per global batch; ``fixed_chance``: the chance loss, None when it depends on the
    batch's videos (``same_video=mask``).
    """
    model.train()
    t0, images, n_steps = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    chance_sum = torch.zeros((), device=device)
    prefix = augment.epoch_prefix(cfg.seed, epoch, device)  # (seed, epoch)'s part of the draws' keys
    for batch in frames.batches(epoch):
        batch = feed.to_device(batch, device)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n = batch["frames"].shape[0]
        # Two views of every image, independent draws: keys of (seed, epoch, video, view, frame).
        z = forward(batch["frames"], batch["video"], batch["slot"], prefix)  # (2n, proj_dim)
        loss = nt_xent(z[:n], z[n:], temperature=cfg.temperature, groups=batch["video"], same_video=cfg.same_video)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        n_steps += 1
        images += 2 * n
        loss_sum += loss.detach()
        if fixed_chance is None:
            chance_sum += nt_xent_chance(n_global, cfg.same_video, batch["video"])  # on the device
        if n_steps % worker.CHECK_EVERY == 0:
            worker.check_finite(loss_sum, epoch, step)
    worker.check_finite(loss_sum, epoch, step)
    seconds = time.perf_counter() - t0
    loss_mean = float(loss_sum) / max(n_steps, 1)
    chance = fixed_chance if fixed_chance is not None else float(chance_sum) / max(n_steps, 1)
    # images/s over all workers: every worker ran the same number of steps
    return {
        "loss": loss_mean,
        **chance_metrics(loss_mean, chance),
        "images_per_s": images * distributed.get_world_size() / max(seconds, 1e-9),
    }, step


def frame_feed(train: dict, cfg: C.PretrainConfig, per_worker: int, rank: int, world: int, device) -> feed.Feed:
    """This worker's SimCLR feed: ``data.frames_per_clip`` frames of each video, batches of ``per_worker``."""
    return feed.Feed(
        train,
        feed.Frames(cfg.data.frames_per_clip, cfg.seed),
        cfg.data,
        batch_size=per_worker,
        rank=rank,
        world=world,
        pin=device.type == "cuda",
    )


def lr_schedule(cfg: C.PretrainConfig, frames: feed.Feed, per_worker: int):
    """The learning rate at each optimizer step (linear warm-up, then cosine to 0 at the last epoch)."""
    steps_per_epoch = frames.steps()
    if steps_per_epoch < 1:
        raise JobError(
            f"pretrain: {len(frames.order(0))} clips x {cfg.data.frames_per_clip} frames per worker "
            f"do not fill one batch of {per_worker}; lower pretrain.batch_size"
        )
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(s: int) -> float:
        return warmup_cosine(s, total_steps, cfg.lr, warmup_steps)

    return lr_at


def log_epoch(cfg: C.PretrainConfig, metrics: dict) -> None:
    """The epoch's line in the worker's log: the loss against chance (ln(2N - 1)), the lr, the speed."""
    log.info(
        "pretrain epoch %d/%d  loss %.4f (chance %.4f, ratio %.3f)  lr %.2e  %.1f images/s",
        metrics["epoch"] + 1,
        cfg.epochs,
        metrics["loss"],
        metrics["loss_chance"],
        metrics["loss_ratio"],
        metrics["lr"],
        metrics["images_per_s"],
    )


def epoch_metrics(
    cfg: C.PretrainConfig, epoch: int, step: int, start_epoch: int, stats: dict, lr: float, losses: list[float]
) -> dict:
    """The epoch's report: its loss against chance, ``loss_trend`` once there are two windows, and every
    epoch's loss (``loss_curve``) on the last epoch."""
    metrics = {
        "epoch": epoch,
        "step": step,
        "start_epoch": start_epoch,  # > 0: resumed from a checkpoint
        "loss": stats["loss"],
        "loss_chance": stats["loss_chance"],
        "loss_ratio": stats["loss_ratio"],
        "lr": lr,
        "images_per_s": stats["images_per_s"],
    }
    window = trend_window(cfg.epochs)
    trend = loss_trend(losses, window)
    if trend is not None:
        metrics.update(loss_trend=trend, loss_window=window)
    if epoch + 1 == cfg.epochs:
        metrics["loss_curve"] = list(losses)
    return metrics


LEVELLED = 0.02  # |loss_trend| below this at the end of a run: the loss has levelled off
BARELY = 0.9  # loss_ratio above this: the encoder has learnt next to nothing


def convergence_line(metrics: dict) -> str:
    """The last epoch's loss against chance and whether it levelled off, for the driver's log and the demo."""
    if "loss_chance" not in metrics:
        return f"loss {metrics.get('loss', float('nan')):.4f}"
    text = f"loss {metrics['loss']:.4f} against chance {metrics['loss_chance']:.4f} (ratio {metrics['loss_ratio']:.3f})"
    trend, window = metrics.get("loss_trend"), metrics.get("loss_window")
    if trend is not None:
        text += f"; the last {window} epochs {abs(100 * trend):.1f}% {'below' if trend < 0 else 'above'} the {window} before"
        text += ": levelled off" if abs(trend) < LEVELLED else ": still falling, a longer schedule would lower it"
    if metrics["loss_ratio"] > BARELY:
        text += " — barely trained: more epochs (docs/recipes.md)"
    return text


def train_loop_per_worker(inputs: worker.LoopInputs) -> None:
    cfg: C.PretrainConfig = inputs.config
    world, rank = distributed.get_world_size(), distributed.get_rank()
    worker.seed_everything(cfg.seed)
    model = simclr_from(cfg.model)
    optimizer = make_optimizer(model, cfg)
    state = worker.restore(model, optimizer)
    start_epoch, step = (state["epoch"] + 1, state["step"]) if state else (0, 0)
    losses = list((state.get("extra") or {}).get("losses") or [])[:start_epoch] if state else []
    if state:
        log.info("resumed from epoch %d (step %d)", state["epoch"], step)
    model, device, precision = worker.prepare(model, cfg.scale)  # the module itself stays plain
    per_worker = max(2, cfg.batch_size // world)
    n_global = per_worker * world  # frames per global batch: 2 n_global - 1 keys per anchor
    # ln(2 n_global - 1) every step, but with same_video=mask it depends on the batch's videos
    fixed_chance = None if cfg.same_video == "mask" else float(nt_xent_chance(n_global, cfg.same_video))
    frames = frame_feed(inputs.train, cfg, per_worker, rank, world, device)
    lr_at = lr_schedule(cfg, frames, per_worker)
    forward = compiled_forward(model, cfg, device, precision)
    saved_config = C.to_dict(cfg)
    for epoch in range(start_epoch, cfg.epochs):
        stats, step = train_one_epoch(
            model, forward, optimizer, frames, cfg, epoch, step, lr_at, n_global, fixed_chance, device
        )
        losses.append(stats["loss"])
        metrics = epoch_metrics(cfg, epoch, step, start_epoch, stats, lr_at(step), losses)
        log_epoch(cfg, metrics)
        save = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        worker.report(
            metrics,
            model,
            optimizer,
            kind="simclr",
            config=saved_config,
            step=step,
            epoch=epoch,
            save=save,
            extra={"losses": list(losses)},
            progress=inputs.progress,
        )
