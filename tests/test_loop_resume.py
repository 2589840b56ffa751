"""The real per-worker loops in this process (Ray Train's parts stubbed, frames in memory): a run resumed
from any epoch's checkpoint reports what the uninterrupted run reported, weights included."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

from clman import config as C
from clman.launch import trainer
from clman.train import feed, worker

TINY = ["model.width=0.125", "model.gn_groups=4", "data.size=16", "data.store_size=20", "data.num_frames=4"]
TIMING = ("clips_per_s", "images_per_s", "start_epoch")


class _NoRay:
    """``ray.get`` for a feed whose "cache" holds (frames, available) tuples in memory."""

    @staticmethod
    def get(x):
        return x


def _source(n: int, frames: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    videos = [feed.Video(i, f"mem://{seed}/{i}", frames, i % 2) for i in range(n)]
    cache = [(rng.integers(0, 255, (frames, 1, 20, 20), dtype=np.uint8), np.arange(frames)) for _ in videos]
    for v, (f, _) in zip(videos, cache):
        f[:, :, 5:15, 5:15] //= 3 if v.label else 1  # something to learn
    return {"videos": videos, "cache": cache}


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(job, monkeypatch, saved=None, resume_at=None):
    """[(metrics less timing, saved, extra, weights)] of every epoch; checkpoints by epoch into ``saved``."""
    reports = []

    def report(metrics, model, optimizer, *, step, epoch, save, extra=None, **kw):
        reports.append(({k: v for k, v in metrics.items() if k not in TIMING}, save, repr(extra), _digest(model)))
        if saved is not None:
            saved[epoch] = {
                "epoch": epoch,
                "step": step,
                "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "extra": copy.deepcopy(extra),
            }

    def restore(model, optimizer):
        if resume_at is None:
            return None
        state = saved[resume_at]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return {k: state[k] for k in ("epoch", "step", "extra")}

    monkeypatch.setattr(feed, "ray", _NoRay)
    monkeypatch.setattr(worker, "report", report)
    monkeypatch.setattr(worker, "restore", restore)
    monkeypatch.setattr(worker, "prepare", lambda model, scale: (model, torch.device("cpu"), "fp32"))
    job.loop(job.loop_config)
    return reports


def _same(a, b):
    """Reports equal, NaN equal to NaN."""
    assert len(a) == len(b)
    for (ma, *ra), (mb, *rb) in zip(a, b):
        assert ra == rb
        assert ma.keys() == mb.keys() and list(ma) == list(mb)  # the same keys, in the same order
        for k in ma:
            assert ma[k] == mb[k] or (ma[k] != ma[k] and mb[k] != mb[k]), k


def test_finetune_resumes_bit_for_bit_and_keeps_its_selection(monkeypatch):
    cfg = C.load(
        "finetune",
        None,
        TINY
        + [
            "finetune.epochs=5",
            "finetune.batch_size=2",
            "finetune.select_window=2",
            "finetune.patience=2",
            "finetune.lr=0.05",
            "finetune.optimizer=adamw",
            "evaluate.clips=2",
            "finetune.checkpoint_every=2",
        ],
    )
    sources = {"train": _source(8, 8, 1), "val": _source(6, 8, 2)}
    saved: dict = {}
    whole = _run(trainer.finetune_job(cfg, "mem://m", None, True, sources=sources), monkeypatch, saved)
    assert whole[-1][0]["epoch"] + 1 == len(whole) and "best_epoch" in whole[-1][0]
    assert list(whole[0][0])[:5] == ["epoch", "step", "train_loss", "train_auc", "lr"]  # timing keys left out
    assert [r[1] for r in whole[:2]] == [False, True]  # epoch 0: no score yet (window 2), not the 2nd epoch
    for k in range(len(whole) - 1):
        again = _run(trainer.finetune_job(cfg, "mem://m", None, True, sources=sources), monkeypatch, saved, k)
        _same(again, whole[k + 1 :])


@pytest.mark.parametrize("same_video", ["negative", "mask"])
def test_pretrain_resumes_bit_for_bit(monkeypatch, same_video):
    cfg = C.load(
        "pretrain",
        None,
        [
            "model.width=0.125",
            "model.gn_groups=8",
            "model.nonlocal_stages=[]",
            "model.proj_dim=16",
            "data.size=16",
            "data.store_size=20",
            "data.frames_per_clip=3",
            "pretrain.batch_size=6",
            "pretrain.epochs=5",
            "pretrain.lr=0.5",
            f"pretrain.same_video={same_video}",
        ],
    )
    source, saved = _source(6, 6, 3), {}
    whole = _run(trainer.pretrain_job(cfg, "mem://m", "train", source=source), monkeypatch, saved)
    assert len(whole) == 5
    # the loss trend (windows of 2 epochs) from the 4th epoch on; every epoch's loss on the last report
    assert ["loss_trend" in m for m, *_ in whole] == [False, False, False, True, True]
    losses = [m["loss"] for m, *_ in whole]
    assert whole[-1][0]["loss_curve"] == losses and all("loss_curve" not in m for m, *_ in whole[:-1])
    assert whole[-1][0]["loss_trend"] == pytest.approx((losses[3] + losses[4]) / (losses[1] + losses[2]) - 1)
    for k in range(len(whole) - 1):  # resumed from each epoch: the same reports, the curve kept in the checkpoint
        again = _run(trainer.pretrain_job(cfg, "mem://m", "train", source=source), monkeypatch, saved, k)
        _same(again, whole[k + 1 :])
