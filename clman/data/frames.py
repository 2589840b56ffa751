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

import warnings

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
    grey = (
        np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0) <= GREY_TOLERANCE
        and np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0) <= GREY_TOLERANCE
    )
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


# Ray's object store hands out read-only arrays; stack_frames only reads them. (A filter, not
# warnings.catch_warnings: that is not thread-safe, and the feed stacks on its own thread.)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def stack_frames(items: list, pin: bool = False):
    """Stack uint8 frames into one torch tensor, written once, into pinned memory when ``pin``.

    items: arrays of equal shape (..., C, S, S), or ``(array, rows)`` pairs meaning ``array[rows]``
    (a cached video and the positions wanted from it: gathered straight into the batch, no copy
    between). Grayscale items are expanded when the batch mixes 1 and 3 channels. One copy per
    batch instead of three (numpy's gather, ``np.stack``, ``pin_memory()``), as torch ops, which
    release the GIL while the training loop's thread launches the step's kernels. (On an H200 at
    the paper's sizes the two ways fed the CUDA-graph steps equally: 0.98-0.99 of synthetic input.)
    """
    import torch

    sources = []  # (source tensor, row indices or None): the frames are src, or src[rows]
    for item in items:
        a, rows = item if isinstance(item, tuple) else (item, None)
        src = torch.from_numpy(np.ascontiguousarray(a))  # no copy when it already is (decoded, cached)
        if rows is not None and np.ndim(rows) == 0:
            src, rows = src[int(rows)], None
        sources.append((src, None if rows is None else torch.from_numpy(np.ascontiguousarray(rows, np.int64))))
    shapes = [tuple(src.shape) if rows is None else (len(rows), *src.shape[1:]) for src, rows in sources]
    first, channels = shapes[0], max(shape[-3] for shape in shapes)
    out = torch.empty((len(sources), *first[:-3], channels, *first[-2:]), dtype=torch.uint8, pin_memory=pin)
    for dst, (src, rows), shape in zip(out, sources, shapes):
        if shape[:-3] != first[:-3] or shape[-2:] != first[-2:]:
            raise ValueError(f"frames of shape {shape} in a batch of {first}")
        if rows is None:
            dst.copy_(src)  # broadcasts 1 -> 3 channels
        elif shape[-3] == channels:
            torch.index_select(src, 0, rows, out=dst)
        else:
            dst.copy_(src[rows])
    return out
