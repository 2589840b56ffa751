"""What the CPU does with a video: read its bytes, decode the sampled frames, hand over uint8.

No Ray here: Ray tasks (``clman/train/feed.py``), Ray Data evaluation
(``clman/evaluate/scoring.py``), ``jobs.predict`` and the benchmark's plain
processes all call :func:`decode_stored`.

- Frames are decoded by decord straight to the stored size (``DataConfig.stored_size``,
  a margin above the training size for the random crop; the source's aspect is
  squashed to a square, as the evaluation resize always did) by FFmpeg's scaler
  inside the decoder, and kept as uint8.
- Grayscale B-mode (R = G = B after decoding) keeps one channel: a third of the
  bytes through the object store and the host-to-device copy. Colour / Doppler
  sources keep three.
- Which frames: the draws of :mod:`clman.data.sampling`, seeded by
  :func:`draw_rng` from (seed, epoch, video, purpose) — never from a process id or
  the clock — so a video gets the same frames whichever task decodes it.
"""

from __future__ import annotations

import numpy as np

from clman.data.sampling import segment_indices
from clman.data.video import decode_frames_resized

GREY_TOLERANCE = 2  # max |R - G|, |G - B| (grey levels) for a frame to count as grayscale
MAX_CACHED_FRAMES = 512  # whole-video decodes (cache, evaluation) keep at most this many frames

# purposes of a draw: separate streams for the same (seed, epoch, video)
CLIP_FRAMES, SIMCLR_FRAMES, SHUFFLE = 1, 2, 3


def draw_rng(seed: int, epoch: int, video: int, purpose: int) -> np.random.Generator:
    """The generator of one draw: a pure function of its arguments."""
    return np.random.default_rng([seed % 2**32, epoch, video, purpose])


def to_stored(frames: np.ndarray) -> np.ndarray:
    """decord's (N, H, W, 3) uint8 -> (N, C, H, W) uint8, C = 1 when every frame is grey."""
    rgb = frames.astype(np.int16)
    grey = (np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0) <= GREY_TOLERANCE
            and np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0) <= GREY_TOLERANCE)
    out = frames[..., :1] if grey else frames
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_stored(uri: str, indices: np.ndarray | None, size: int) -> np.ndarray:
    """(N, C, size, size) uint8 frames ``indices`` of the video at ``uri`` (all when None).

    Raises ``VideoError`` / ``StorageError`` naming the URI.
    """
    from clman import storage

    return decode_stored_bytes(storage.read_bytes(uri), indices, size, name=uri)


def decode_stored_bytes(data: bytes, indices: np.ndarray | None, size: int, name: str = "video") -> np.ndarray:
    """:func:`decode_stored` on bytes already read (the benchmark's Ray- and S3-free processes)."""
    return to_stored(decode_frames_resized(data, indices, size, name=name))  # (N, C, size, size)


def whole_video_indices(num_frames: int, max_frames: int = MAX_CACHED_FRAMES) -> np.ndarray:
    """Every frame, or ``max_frames`` segment centres of a longer video."""
    if num_frames > max_frames:
        return segment_indices(num_frames, max_frames, train=False)
    return np.arange(num_frames, dtype=np.int64)


def simclr_indices(num_frames: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``m`` frames: distinct when the video has that many, else all of them plus repeats.

    A fixed count per video keeps every worker's number of steps per epoch equal (DDP needs it).
    """
    if num_frames >= m:
        return np.sort(rng.choice(num_frames, size=m, replace=False)).astype(np.int64)
    extra = rng.choice(num_frames, size=m - num_frames, replace=True)
    return np.sort(np.concatenate([np.arange(num_frames), extra])).astype(np.int64)


def pick(available: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``available`` (sorted source frame numbers of a cached video) nearest to ``wanted``."""
    pos = np.searchsorted(available, wanted).clip(0, len(available) - 1)
    left = (pos - 1).clip(0)
    closer_left = np.abs(available[left] - wanted) < np.abs(available[pos] - wanted)
    return np.where(closer_left, left, pos)
