"""The decode tasks of :mod:`clman.train.feed`, in a module without torch.

A Ray task's worker process imports the module its function lives in: from here that is
numpy, decord and pyarrow (0.2 s), not torch (seconds on 2 busy cores). The workers Ray
starts for a run's first decode tasks were most of the time the demo spent caching.
Where decord has no wheel (macOS, aarch64) the same tasks read with PyAV and give the same
frames (``clman.data.video.PyAVReader``; tests/test_decode_fallback.py runs ``_decode`` so).
"""

from __future__ import annotations

import numpy as np
import ray

from clman import storage
from clman.data import frames as F
from clman.data.video import VideoError


def _decode(uri: str, indices: np.ndarray | None, size: int):
    """(frames (N, C, S, S) uint8, source indices (N,)) or (None, the one-line reason)."""
    try:
        frames = F.decode_stored(uri, indices, size)
    except (VideoError, storage.StorageError) as err:
        return None, str(err)
    return frames, indices


@ray.remote
def _decode_whole(items: list[tuple[str, int]], size: int):
    """Cache entries of a chunk of videos: their metas (one small object the driver reads), then
    each video's (frames, indices) as an object of its own (``num_returns`` = 1 + len(items))."""
    metas, entries = [], []
    for uri, num_frames in items:
        idx = F.whole_video_indices(num_frames)
        frames, err = _decode(uri, idx, size)
        if frames is None:
            metas.append({"error": err})
            entries.append(None)
        else:
            metas.append({"error": None, "bytes": frames.nbytes, "channels": frames.shape[1]})
            entries.append((frames, idx))
    return (metas, *entries)


@ray.remote
def _decode_some(uri: str, indices: np.ndarray, size: int):
    return _decode(uri, indices, size)
