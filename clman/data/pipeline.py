"""Ray Data datasets that stream clips from S3 into Ray Train workers.

    manifest rows ──from_items──▶ (shuffle) ──map_batches(decode_batch, tasks)──▶ tensors
                                               read_bytes(uri) → sample indices → decord → augment

Ray Train workers read a shard with
``ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=...)``.

Columns of the batches:
- finetune / eval: ``clip`` (B, T, C, H, W) float32, ``mask`` (B, T) bool (True = real
  frame), ``frame_idx`` (B, T) int64 (source frame numbers, -1 on padding),
  ``label`` (B,) int64, ``video_index`` (B,) int64 = the row's position in
  ``read_manifest(manifest, split)`` (or in the DataFrame given) — string
  columns cannot pass ``iter_torch_batches``' default collation, so look the
  video id up there.
- pretrain: ``view1``, ``view2`` (N, C, H, W) float32, two augmentations of each of N
  frames (M per clip), and ``video_index`` (N,).

``eval_dataset(frames="all")`` gives each video all its frames, so T differs
between rows: iterate with ``batch_size=1``, or pass ``collate_fn=PadClips()``
to pad a batch to its longest video (the mask marks the padding).

Resources: up to ``decode_tasks`` decode tasks run at once, each taking
``decode_cpus`` CPUs (0.5 by default). On a small machine give Ray Train workers
fractional CPUs too (``resources_per_worker={"CPU": 0.5}``): with whole-CPU
workers on 2 cores the decoders get nothing and the run hangs waiting for data.

A clip that cannot be read or decoded is logged (``logger.warning`` naming its
URI) and dropped from its batch; the epoch goes on without it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from clman import storage
from clman.data.manifest import read_manifest
from clman.data.sampling import all_frame_indices, segment_indices, simclr_frame_indices
from clman.data.transforms import ClipAugment, SimCLRAugment
from clman.data.video import VideoError, decode_frames

logger = logging.getLogger(__name__)

MODES = ("train", "eval", "all", "simclr")
DEFAULT_MAX_FRAMES = 512  # whole-video evaluation reads at most this many frames (segment centres)


class DecodeClips:
    """A batch of manifest rows -> decoded, augmented tensors (run by :func:`decode_batch` tasks).

    mode: "train" (T frames, random per segment, augmented), "eval" (T segment
    centres, resize only), "all" (every frame up to ``max_frames``, resize only)
    or "simclr" (M random frames, two augmented views each).
    """

    def __init__(self, mode: str, size: int, num_frames: int = 16, frames_per_clip: int = 4,
                 crop_scale_min: float = 0.5, elastic_p: float = 0.2, seed: int = 0,
                 max_frames: int = DEFAULT_MAX_FRAMES):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; valid: {list(MODES)}")
        # Parallelism comes from concurrent decode tasks; more threads per process only contend.
        torch.set_num_threads(1)
        self.mode, self.size = mode, size
        self.num_frames, self.frames_per_clip, self.max_frames = num_frames, frames_per_clip, max_frames
        # Training draws differ per process and go on across epochs (the decoder is kept);
        # ``seed`` keeps runs apart, evaluation is deterministic anyway.
        self.rng = np.random.default_rng([seed, os.getpid(), time.time_ns() % 2**32])
        torch.manual_seed(int(self.rng.integers(2**31)))
        if mode == "train":
            self.augment = ClipAugment(size, train=True, scale=(crop_scale_min, 1.0), elastic_p=elastic_p)
        elif mode == "simclr":
            self.augment = SimCLRAugment(size, scale=(min(crop_scale_min, 0.2), 1.0))
        else:
            self.augment = ClipAugment(size, train=False)

    def indices(self, num_frames: int) -> np.ndarray:
        if self.mode == "train":
            return segment_indices(num_frames, self.num_frames, train=True, rng=self.rng)
        if self.mode == "eval":
            return segment_indices(num_frames, self.num_frames, train=False)
        if self.mode == "all":
            return all_frame_indices(num_frames, self.max_frames)
        return simclr_frame_indices(num_frames, self.frames_per_clip, self.rng)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        for uri, n, label, index in zip(batch["uri"], batch["num_frames"], batch["label"],
                                        batch["video_index"]):
            idx = self.indices(int(n))
            try:
                frames = decode_frames(storage.read_bytes(str(uri)), idx, name=str(uri))  # (T, H, W, 3)
            except (VideoError, storage.StorageError) as err:
                logger.warning("skipping clip %s: %s", uri, err)
                continue
            if self.mode == "simclr":
                view1, view2 = self.augment(frames)  # (M, C, S, S) each
                out.setdefault("view1", []).append(view1.numpy())
                out.setdefault("view2", []).append(view2.numpy())
                out.setdefault("video_index", []).append(np.full(len(idx), index, np.int64))
                continue
            clip = self.augment(frames).numpy()  # (T, C, S, S)
            out.setdefault("clip", []).append(clip)
            out.setdefault("mask", []).append(np.ones(len(idx), dtype=bool))
            out.setdefault("frame_idx", []).append(idx)
            out.setdefault("label", []).append(int(label))
            out.setdefault("video_index", []).append(int(index))
        return self._collate(out)

    def _collate(self, out: dict[str, list]) -> dict[str, np.ndarray]:
        c, s = 3, self.size
        if self.mode == "simclr":
            if not out:
                return {"view1": np.zeros((0, c, s, s), np.float32),
                        "view2": np.zeros((0, c, s, s), np.float32),
                        "video_index": np.zeros((0,), np.int64)}
            return {k: np.concatenate(v) for k, v in out.items()}  # (N, ...)
        if not out:
            t = 1 if self.mode == "all" else self.num_frames
            return {"clip": np.zeros((0, t, c, s, s), np.float32), "mask": np.zeros((0, t), bool),
                    "frame_idx": np.zeros((0, t), np.int64), "label": np.zeros((0,), np.int64),
                    "video_index": np.zeros((0,), np.int64)}
        batch = {"label": np.asarray(out["label"], np.int64),
                 "video_index": np.asarray(out["video_index"], np.int64)}
        for key in ("clip", "mask", "frame_idx"):
            arrays = out[key]
            # Equal lengths stack to (B, T, ...); whole-video rows of different
            # lengths stay a list (Ray stores them as a ragged tensor column).
            same = len({a.shape for a in arrays}) == 1
            batch[key] = np.stack(arrays) if same else arrays
        return batch


_DECODERS: dict[tuple, DecodeClips] = {}


def decode_batch(batch: dict[str, np.ndarray], **settings) -> dict[str, np.ndarray]:
    """Ray Data task: ``DecodeClips(**settings)(batch)``, one decoder per worker process and settings.

    Tasks, not an actor pool: Ray Data starts a new actor pool for every
    execution, i.e. every epoch of every dataset, and on small runs those
    start-ups were the larger part of an epoch. Task workers stay up between
    epochs, and so does the decoder kept here (its random state goes on, so
    every epoch draws new frames and augmentations).
    """
    key = tuple(sorted(settings.items()))
    decoder = _DECODERS.get(key)
    if decoder is None:
        decoder = _DECODERS[key] = DecodeClips(**settings)
    return decoder(batch)


try:
    from ray.data.collate_fn import NumpyBatchCollateFn as _NumpyCollate
except ImportError:  # pragma: no cover - Ray < 2.47
    _NumpyCollate = object


class PadClips(_NumpyCollate):
    """``iter_torch_batches(collate_fn=PadClips())``: pads ragged clips to the longest in the batch.

    clip (B, T_max, C, H, W) zeros on padding, mask (B, T_max) False there,
    frame_idx -1 there; other columns become tensors as usual.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        clips = list(batch["clip"])
        lengths = [len(c) for c in clips]
        t_max = max(lengths, default=0)
        b = len(clips)
        shape = clips[0].shape[1:] if clips else (3, 1, 1)
        clip = torch.zeros((b, t_max, *shape), dtype=torch.float32)  # (B, T_max, C, H, W)
        mask = torch.zeros((b, t_max), dtype=torch.bool)
        frame_idx = torch.full((b, t_max), -1, dtype=torch.int64)
        for i, (c, n) in enumerate(zip(clips, lengths)):
            clip[i, :n] = torch.as_tensor(np.asarray(c, np.float32))
            mask[i, :n] = torch.as_tensor(np.asarray(batch["mask"][i], bool))
            frame_idx[i, :n] = torch.as_tensor(np.asarray(batch["frame_idx"][i], np.int64))
        out = {"clip": clip, "mask": mask, "frame_idx": frame_idx}
        for key in batch:
            if key not in out:
                out[key] = torch.as_tensor(np.asarray(batch[key]))
        return out


def _rows(manifest: str | pd.DataFrame, split: str | Sequence[str] | None) -> pd.DataFrame:
    if isinstance(manifest, pd.DataFrame):
        df = manifest if split is None else manifest[manifest["split"].isin(
            [split] if isinstance(split, str) else list(split))]
        return df.reset_index(drop=True)
    return read_manifest(manifest, split=split)


def _dataset(manifest: str | pd.DataFrame, split, data, mode: str, seed: int, shuffle: bool,
             repeats: int, batch_size: int, max_frames: int = DEFAULT_MAX_FRAMES):
    import ray

    rows = _rows(manifest, split)
    if rows.empty:
        raise ValueError(f"{manifest if isinstance(manifest, str) else 'manifest'}: split {split!r} "
                         "has no videos")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    items = [{"uri": r.uri, "num_frames": int(r.num_frames), "label": int(r.label), "video_index": i}
             for i, r in enumerate(rows.itertuples(index=False))] * repeats
    if not shuffle:
        ds = ray.data.from_items(items)
    else:
        # One row per block and a block-order shuffle: a full row shuffle with no
        # tasks. random_shuffle() would need whole-CPU shuffle tasks, which never
        # schedule while fractional Train workers and decode tasks hold the CPUs.
        # Reseeded per execution: a new order every epoch, the same sequence per seed.
        ds = ray.data.from_items(items, override_num_blocks=len(items)).randomize_block_order(
            seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(
        decode_batch,
        fn_kwargs=dict(
            mode=mode, size=data.size, num_frames=data.num_frames,
            frames_per_clip=data.frames_per_clip, crop_scale_min=data.crop_scale_min,
            elastic_p=data.elastic_p, seed=seed, max_frames=max_frames),
        compute=ray.data.TaskPoolStrategy(size=max(1, data.decode_tasks)),
        num_cpus=data.decode_cpus,
        batch_size=batch_size,
    )


def finetune_dataset(manifest: str | pd.DataFrame, split: str | Sequence[str] | None, data,
                     train: bool, seed: int = 0, repeats: int = 1, decode_batch_size: int = 4):
    """Clips of ``data.num_frames`` frames: random per segment + augmented when ``train``
    (rows shuffled every epoch), segment centres + resize otherwise.

    ``data``: a DataConfig (size, num_frames, frames_per_clip, crop_scale_min,
    elastic_p, decode_tasks, decode_cpus). ``repeats``: clips per video per epoch.
    """
    return _dataset(manifest, split, data, "train" if train else "eval", seed, shuffle=train,
                    repeats=repeats, batch_size=decode_batch_size)


def eval_dataset(manifest: str | pd.DataFrame, split: str | Sequence[str] | None, data,
                 frames: str = "all", max_frames: int = DEFAULT_MAX_FRAMES, seed: int = 0):
    """Deterministic evaluation clips (no augmentation, no shuffle).

    frames="all": every frame of each video (segment centres when longer than
    ``max_frames``); T varies by video — iterate with batch_size=1 or
    collate_fn=PadClips(). frames="clip": ``data.num_frames`` segment centres.
    """
    if frames == "all":
        mode = "all"
    elif frames == "clip":
        mode = "eval"
    else:
        raise ValueError(f"frames={frames!r}; valid: 'all', 'clip'")
    # One video per decode call: whole videos are large, and a block then holds one shape.
    return _dataset(manifest, split, data, mode, seed, shuffle=False, repeats=1,
                    batch_size=1 if mode == "all" else 4, max_frames=max_frames)


def pretrain_dataset(manifest: str | pd.DataFrame, split: str | Sequence[str] | None, data,
                     seed: int = 0, repeats: int = 1, decode_batch_size: int = 4):
    """SimCLR frames: ``data.frames_per_clip`` random frames per clip, two views each, shuffled rows."""
    return _dataset(manifest, split, data, "simclr", seed, shuffle=True, repeats=repeats,
                    batch_size=decode_batch_size)
