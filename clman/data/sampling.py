"""Which frames of a video to decode.

Finetuning reads T frames per clip by segments (TSN style): the video is cut
into T equal segments and one frame is taken from each — a random one when
training, the centre one when evaluating — so a clip always spans the whole
video. SimCLR's M random frames: ``clman.data.frames.simclr_indices``.

Scoring (validation in the finetune loop, ``jobs.evaluate``, the demo and the study's
trials) takes its frames from one function, :func:`scoring_clips`, set by
``evaluate.frames`` / ``evaluate.clips`` (the finetune job reads the same keys):

- ``clips`` (the default): K clips of T frames, the same segments as training, clip k
  taking the frame at phase (k + 1/2) / K of every segment; a video's score is the
  mean P(malignant) of its K clips. K = 1 is the segment centres. Every model sees
  frames at the spacing it was trained at (about N / T), whatever its arch.
- ``all``: every frame (segment centres beyond ``max_frames``) as one clip: for
  CLMAN only, whose aggregator takes any number of frames; a Table 4 baseline
  trained on T frames N / T apart would be tested at stride 1, on a spacing it
  never saw (``clman.config.check_scoring``).

Facts that shaped this module
- Interleaved, the K clips are the K*T segment centres (clip k = every K-th of them from
  the k-th; equal up to float rounding, 139 of 18808 (N, T, K) cases differ by a frame):
  offsets spread evenly inside each segment, no randomness, so a video gets the same
  frames in every epoch's validation and in the test.
- The demo's sweeps have 24 frames and T = 8: with K = 3 the clips hold every frame
  once; with K = 4 two of them coincide (segments of 3 frames), which is allowed (the
  mean then weighs that clip twice) and costs a third more compute for nothing.
"""

from __future__ import annotations

import numpy as np


def _check(num_frames: int, count: int, what: str) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}")


def segment_indices(num_frames: int, T: int, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """(T,) int64 frame indices, one per equal segment of ``num_frames``, ascending.

    When ``num_frames < T`` every frame is used and repeated in order
    (e.g. 3 frames, T=8 -> 0 0 0 1 1 1 2 2); no randomness then.
    """
    _check(num_frames, T, "T")
    if num_frames < T:
        return (np.arange(T) * num_frames // T).astype(np.int64)
    edges = np.arange(T + 1) * (num_frames / T)  # segment boundaries (float)
    starts, lengths = edges[:-1], np.diff(edges)
    if train:
        if rng is None:
            raise ValueError("segment_indices(train=True) needs an rng")
        offsets = rng.random(T) * lengths
    else:
        offsets = lengths / 2
    return np.minimum(np.floor(starts + offsets), num_frames - 1).astype(np.int64)


def all_frame_indices(num_frames: int, max_frames: int | None = None) -> np.ndarray:
    """Every frame for whole-video evaluation; at most ``max_frames`` (segment centres) when set."""
    if max_frames is not None and num_frames > max_frames:
        return segment_indices(num_frames, max_frames, train=False)
    _check(num_frames, 1, "count")
    return np.arange(num_frames, dtype=np.int64)


SCORING = ("clips", "all")  # evaluate.frames (clman.config.EVAL_FRAMES): how a video is scored (module docstring)


def clip_indices(num_frames: int, T: int, K: int) -> np.ndarray:
    """(K, T) int64: K deterministic clips of T frames by segments, each ascending.

    Clip k takes, in each of T equal segments, the frame at phase (k + 1/2) / K of the
    segment; K = 1 gives :func:`segment_indices` ``(train=False)``, the centres. A video
    shorter than T gives K copies of its repeated-frame clip.
    """
    _check(num_frames, T, "T")
    _check(num_frames, K, "K")
    if num_frames < T:
        return np.tile(segment_indices(num_frames, T, train=False), (K, 1))
    edges = np.arange(T + 1) * (num_frames / T)  # segment boundaries (float), as segment_indices
    starts, lengths = edges[:-1], np.diff(edges)  # (T,), (T,)
    phases = (np.arange(K) + 0.5) / K  # (K,): 0.5 for K = 1, the centre
    idx = np.floor(starts[None, :] + lengths[None, :] * phases[:, None])  # (K, T)
    return np.minimum(idx, num_frames - 1).astype(np.int64)


def scoring_clips(num_frames: int, T: int, frames: str, clips: int, max_frames: int) -> np.ndarray:
    """(K, T') int64 frame indices a video is scored on: its clips, one per row.

    ``frames``: ``clips`` -> :func:`clip_indices` (K = ``clips``, T' = T); ``all`` -> one
    clip of every frame (T' = num_frames, at most ``max_frames`` segment centres). Used by
    validation and by test scoring alike, so both score the same frames of a video.
    """
    if frames == "clips":
        return clip_indices(num_frames, T, clips)
    if frames == "all":
        return all_frame_indices(num_frames, max_frames)[None]
    raise ValueError(f"evaluate.frames: {frames!r} is not one of {list(SCORING)}")


def describe_scoring(frames: str, clips: int, T: int, max_frames: int) -> str:
    """One line saying how videos were scored, for reports (metrics.json, study.md, the demo's output)."""
    if frames == "clips":
        how = "the segment centres" if clips == 1 else f"clip k at phase (k + 1/2)/{clips} of each of the T segments"
        return (
            f"Scoring protocol 'clips' (evaluate.frames=clips, evaluate.clips={clips}): a video's score is the "
            f"mean P(malignant) of {clips} clip(s) of T={T} frames ({how}), fixed offsets, for validation and "
            "test alike"
        )
    if frames == "all":
        return (
            f"Scoring protocol 'all' (evaluate.frames=all): a video's score is P(malignant) of one clip of every "
            f"frame (at most {max_frames}, segment centres beyond), for validation and test alike; CLMAN only"
        )
    raise ValueError(f"evaluate.frames: {frames!r} is not one of {list(SCORING)}")
