"""Which frames of a video to decode.

Finetuning reads T frames per clip by segments (TSN style): the video is cut
into T equal segments and one frame is taken from each — a random one when
training, the centre one when evaluating — so a clip always spans the whole
video. SimCLR's M random frames: ``clman.data.frames.simclr_indices``.
"""

from __future__ import annotations

import numpy as np


def _check(num_frames: int, count: int, what: str) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}")


def segment_indices(num_frames: int, T: int, train: bool,
                    rng: np.random.Generator | None = None) -> np.ndarray:
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
