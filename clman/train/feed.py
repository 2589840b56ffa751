"""uint8 frames from S3 to a Train worker: decode once into the object store, or stream.

    driver:  videos_of(rows) ─▶ plan_cache ─▶ build_cache: one Ray task per video decodes it
             whole, at the stored size, uint8; its frames stay in the object store
    worker:  Feed(source, sampler).batches(epoch) ─▶ this rank's share of the epoch, in a seeded
             order; frames drawn from the cached videos (no decoding after the first
             epoch), or decoded by Ray tasks in flight ahead of the loop when streaming

Why plain Ray tasks and not a Ray Data ``streaming_split``: reproducibility. Ray Data
hands blocks to whichever worker asks first, so which worker trained on which video,
and in which batch, changed from run to run; and a map task does not know the epoch,
so its draws had to come from process-local state (seeded with the pid and the clock).
Here every choice is a function of (seed, epoch, video, view): the epoch's order is a
seeded permutation, rank r takes every world-th video of it, the frames of a clip come
from :func:`clman.data.frames.draw_rng`, the augmentation from keys hashed on the
device. Tasks are submitted in order and their results taken in order, so the order
costs nothing but the wait for the slowest task of a window.

Back-pressure: each worker keeps at most ``window`` decode tasks in flight; Ray runs
them on the CPUs the Train workers leave free (``data.decode_tasks: auto``) or on at
most ``decode_tasks`` of them. A background thread assembles the next batches (numpy
stacking, pinned memory on GPUs) while the device works on the current one.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

from clman.data import frames as F
from clman.data.sampling import segment_indices
from clman.train.decode import _decode_some, _decode_whole

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2
# Decode tasks run on the CPUs the cluster has free, not inside the placement group of the
# process that submits them: a Tune trial's group holds only its driver's 0.01 CPU, a Train
# worker's bundle only that worker (Ray would refuse or wait forever). Tune's trial count
# already leaves room for them (``clman.launch.resources.max_concurrent_trials``).
OUTSIDE_PLACEMENT_GROUPS = "DEFAULT"


@dataclass(frozen=True)
class Video:
    """One manifest row as the workers need it; ``index`` = its row in the job's DataFrame."""

    index: int
    uri: str
    num_frames: int
    label: int


def videos_of(rows) -> list[Video]:
    """Manifest rows (a DataFrame) -> [Video], ``index`` = row position."""
    return [Video(i, str(r.uri), int(r.num_frames), int(r.label)) for i, r in enumerate(rows.itertuples(index=False))]


def cache_bytes(videos: Sequence[Video], size: int, channels: int = 1) -> int:
    """Bytes the decoded data set takes in the object store (grayscale unless told)."""
    frames = sum(min(v.num_frames, F.MAX_CACHED_FRAMES) for v in videos)
    return frames * size * size * channels


CACHE_CHUNK = 16  # at most this many videos per decode task when caching
# and at least this many: a task's worker process costs ~1.5 s of CPU to start (Ray, numpy, decord,
# pyarrow), a small sweep's decode ~0.05 s; one video per task started a process per task slot for a
# split of 12 videos (tests, Tune trials, study folds)
CACHE_MIN_CHUNK = 8


class CacheTooLarge(ValueError):
    """``data.cache: memory`` on a data set that cannot fit; the message names the sizes."""


def plan_cache(videos: Sequence[Video], data) -> bool:
    """Whether to decode once (``data.cache``).

    ``auto`` caches when the decoded frames (grayscale estimate) fit ``cache_fraction`` of
    the object store now free; ``memory`` insists and fails before any worker starts.
    """
    if data.cache == "off":
        return False
    need = cache_bytes(videos, data.stored_size)
    free = ray.available_resources().get("object_store_memory", 0.0)
    room = data.cache_fraction * free
    if need <= room:
        return True
    what = (
        f"the decoded data set ({len(videos)} videos, {need / 1e9:.2f} GB at {data.stored_size} px, 1 channel) "
        f"does not fit data.cache_fraction={data.cache_fraction:g} of the object store's "
        f"{free / 1e9:.2f} GB free"
    )
    if data.cache == "memory":
        raise CacheTooLarge(f"data.cache=memory: {what}; set data.cache=auto to stream, or lower data.store_size")
    log.info("streaming clips (decoded every epoch): %s", what)
    return False


def _in_flight(data) -> int:
    """Decode tasks one process keeps in flight: a cap, or a window deep enough to feed a loop."""
    return int(data.decode_tasks) if data.decode_tasks != "auto" else 0


def build_cache(videos: Sequence[Video], data) -> tuple[list[Video], list]:
    """Decode every video once; returns (the videos that decoded, their frames' ObjectRefs).

    A video that does not decode is logged once, by URI, and left out of every epoch.
    """
    size = data.stored_size
    cap = _in_flight(data) or max(1, int(ray.cluster_resources().get("CPU", 1) / data.decode_cpus))
    # Chunks of videos per task, about four per task slot: one task per video spent more time in
    # Ray's per-task overhead than in decoding (the demo's 131 clips took 50 s after a Train run,
    # each task often on a freshly started worker process).
    chunk = min(CACHE_CHUNK, max(CACHE_MIN_CHUNK, math.ceil(len(videos) / (4 * cap))))
    pending: list[tuple[list[Video], list]] = []
    kept, refs, stored, channels = [], [], [0], set()

    def settle(item):
        chunk_videos, (meta_ref, *frame_refs) = item
        for video, meta, frames_ref in zip(chunk_videos, ray.get(meta_ref), frame_refs):
            if meta["error"]:
                log.warning("skipping clip %s: %s", video.uri, meta["error"])
                continue
            kept.append(video)
            refs.append(frames_ref)
            stored[0] += meta["bytes"]
            channels.add(meta["channels"])

    for start in range(0, len(videos), chunk):
        part = list(videos[start : start + chunk])
        fn = _decode_whole.options(
            num_cpus=data.decode_cpus, num_returns=1 + len(part), scheduling_strategy=OUTSIDE_PLACEMENT_GROUPS
        )
        if len(pending) >= cap:
            settle(pending.pop(0))
        pending.append((part, fn.remote([(v.uri, v.num_frames) for v in part], size)))
    for item in pending:
        settle(item)
    log.info(
        "decoded %d videos once: %.1f MB of uint8 frames (%s channel(s), %d px) in the object store",
        len(kept),
        stored[0] / 1e6,
        "/".join(map(str, sorted(channels))) or "-",
        size,
    )
    return kept, refs


# ---------------------------------------------------------------- the worker's side


def _shuffled(seed: int, epoch: int, n: int, rank: int, world: int) -> list[int]:
    """This rank's share of the epoch's seeded permutation of ``n`` videos, equal for every rank."""
    perm = F.draw_rng(seed, epoch, 0, F.SHUFFLE).permutation(n)
    per_rank = n // world  # equal shares: every rank runs the same number of steps
    return perm[rank::world][:per_rank].tolist()


def _clip_batch(items, pin: bool) -> dict[str, np.ndarray | torch.Tensor]:
    return {
        "frames": F.stack_frames(
            [f if rows is None else (f, rows) for _, (f, rows), _ in items], pin
        ),  # (B, T, C, S, S), pinned when pin
        "video": np.asarray([v.index for v, _, _ in items], np.int64),
        "label": np.asarray([v.label for v, _, _ in items], np.int64),
        "frame_idx": np.stack([w for _, _, w in items]).astype(np.int64),
    }


def _clip_batches(items, batch_size: int, pin: bool, keep_last: bool) -> Iterator[dict]:
    buf: list[tuple[Video, tuple, np.ndarray]] = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield _clip_batch(buf, pin)
            buf = []
    if buf and keep_last:
        yield _clip_batch(buf, pin)


class Clips:
    """Finetune training: this rank's share of a seeded permutation, T = ``num_frames`` frames per
    video by segments (random within each), ``batch_size`` clips per batch, the last partial batch
    dropped so every rank runs the same number of steps. Batches: ``frames`` uint8 (B, T, C, S, S),
    ``video`` (B,) int64 row indices, ``label`` (B,), ``frame_idx`` (B, T) source frame numbers."""

    exact_steps = True  # exactly steps() batches, whatever failed to decode: DDP ranks step together

    def __init__(self, num_frames: int, seed: int):
        self.num_frames, self.seed = num_frames, seed

    def order(self, n: int, epoch: int, rank: int, world: int) -> list[int]:
        return _shuffled(self.seed, epoch, n, rank, world)

    def indices(self, video: Video, epoch: int) -> np.ndarray:
        return segment_indices(
            video.num_frames, self.num_frames, train=True, rng=F.draw_rng(self.seed, epoch, video.index, F.CLIP_FRAMES)
        )

    def steps(self, videos: int, batch_size: int) -> int:
        return videos // batch_size

    def videos_per_batch(self, batch_size: int) -> int:
        return batch_size

    def batches(self, items, batch_size: int, pin: bool) -> Iterator[dict]:
        return _clip_batches(items, batch_size, pin, keep_last=False)


class EvalClips:
    """Evaluation: every video of this rank once, in order, T = ``num_frames`` segment centres
    (no randomness), the last batch kept. Batches as :class:`Clips`'."""

    exact_steps = False

    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def order(self, n: int, epoch: int, rank: int, world: int) -> list[int]:
        return list(range(rank, n, world))

    def indices(self, video: Video, epoch: int) -> np.ndarray:
        return segment_indices(video.num_frames, self.num_frames, train=False)

    def steps(self, videos: int, batch_size: int) -> int:
        return math.ceil(videos / batch_size)

    def videos_per_batch(self, batch_size: int) -> int:
        return batch_size

    def batches(self, items, batch_size: int, pin: bool) -> Iterator[dict]:
        return _clip_batches(items, batch_size, pin, keep_last=True)


class Frames:
    """SimCLR: this rank's share of a seeded permutation, M = ``frames_per_clip`` frames per video
    (:func:`clman.data.frames.simclr_indices`), ``batch_size`` frames per batch. Batches: ``frames``
    uint8 (N, C, S, S), ``video`` (N,) int64 row indices, ``slot`` (N,) source frame numbers."""

    exact_steps = True

    def __init__(self, frames_per_clip: int, seed: int):
        self.frames_per_clip, self.seed = frames_per_clip, seed

    def order(self, n: int, epoch: int, rank: int, world: int) -> list[int]:
        return _shuffled(self.seed, epoch, n, rank, world)

    def indices(self, video: Video, epoch: int) -> np.ndarray:
        return F.simclr_indices(
            video.num_frames, self.frames_per_clip, F.draw_rng(self.seed, epoch, video.index, F.SIMCLR_FRAMES)
        )

    def steps(self, videos: int, batch_size: int) -> int:
        return videos * self.frames_per_clip // batch_size

    def videos_per_batch(self, batch_size: int) -> int:
        return max(1, math.ceil(batch_size / self.frames_per_clip))

    def batches(self, items, batch_size: int, pin: bool) -> Iterator[dict]:
        frames_buf, video_buf, slot_buf = [], [], []
        for video, (frames, rows), want in items:
            frames_buf.extend((frames, r) for r in (range(len(frames)) if rows is None else rows))
            video_buf.extend([video.index] * len(want))
            slot_buf.extend(want)
            while len(frames_buf) >= batch_size:
                b = batch_size
                yield {
                    "frames": F.stack_frames(frames_buf[:b], pin),
                    "video": np.asarray(video_buf[:b], np.int64),
                    "slot": np.asarray(slot_buf[:b], np.int64),
                }
                del frames_buf[:b], video_buf[:b], slot_buf[:b]


Sampler = Clips | EvalClips | Frames  # what a Feed is given: which videos, which frames, what batches


class Feed:
    """The batches of one worker: ``for batch in feed.batches(epoch)``.

    ``source``: a split's frames (``clman.launch.trainer.frame_source``: {"videos": [Video], "cache": [ObjectRef] |
    None}); ``sampler``: which videos, which frames and how they make batches (:class:`Clips`,
    :class:`EvalClips`, :class:`Frames`). Batches are CPU tensors (pinned when ``pin``).
    """

    def __init__(
        self, source: dict, sampler: Sampler, data, *, batch_size: int, rank: int = 0, world: int = 1, pin: bool = False
    ):
        videos, cache = source["videos"], source["cache"]
        if cache is not None and len(cache) != len(videos):
            raise ValueError(f"{len(cache)} cached videos for {len(videos)} videos")
        self.videos, self.sampler, self.data = list(videos), sampler, data
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.cache = list(cache) if cache is not None else None
        self.pin = pin
        self.bad: set[str] = set()  # URIs that failed to decode: logged once, skipped after
        self.window = _in_flight(data) or sampler.videos_per_batch(batch_size) * (PREFETCH_BATCHES + 1)

    # -- which videos, which frames

    def order(self, epoch: int) -> list[int]:
        """Positions in ``videos`` this rank reads in ``epoch``, in order."""
        return self.sampler.order(len(self.videos), epoch, self.rank, self.world)

    def steps(self, epoch: int = 0) -> int:
        return self.sampler.steps(len(self.order(epoch)), self.batch_size)

    def indices(self, video: Video, epoch: int) -> np.ndarray:
        return self.sampler.indices(video, epoch)

    # -- frames

    def _fetch(self, positions: list[int], epoch: int) -> Iterator[tuple[Video, tuple, np.ndarray]]:
        """(video, (frames (N, C, S, S) uint8, rows), source indices) for each position, in order: the
        frames wanted are ``frames[rows]`` (all of them, rows None, when streamed)."""
        if self.cache is not None:
            for p in positions:
                frames, available = ray.get(self.cache[p])  # zero-copy views of the object store
                want = self.indices(self.videos[p], epoch)
                yield self.videos[p], (frames, F.pick(available, want)), want  # gathered into the batch
            return
        fn = _decode_some.options(num_cpus=self.data.decode_cpus, scheduling_strategy=OUTSIDE_PLACEMENT_GROUPS)
        todo = [p for p in positions if self.videos[p].uri not in self.bad]
        pending: list = []  # (position, indices, ref), submitted in order, taken in order
        for p in todo + [None] * self.window:
            if p is not None:
                want = self.indices(self.videos[p], epoch)
                pending.append((p, want, fn.remote(self.videos[p].uri, want, self.data.stored_size)))
            if len(pending) < self.window and p is not None:
                continue
            if not pending:
                return
            q, want, ref = pending.pop(0)
            frames, err = ray.get(ref)
            if frames is None:
                self.bad.add(self.videos[q].uri)
                log.warning("skipping clip %s: %s", self.videos[q].uri, err)
                continue
            yield self.videos[q], (frames, None), want

    def _batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Exactly ``steps(epoch)`` batches for a training sampler (``exact_steps``), whatever failed to decode:
        DDP ranks must run the same number of steps. A clip that fails while streaming makes
        a batch come up short at the end; the last good batch is then used again."""
        steps, done, last = self.steps(epoch), 0, None
        for batch in self.sampler.batches(self._fetch(self.order(epoch), epoch), self.batch_size, self.pin):
            if self.sampler.exact_steps and done == steps:
                break
            last = batch
            done += 1
            yield batch
        if not self.sampler.exact_steps or done == steps:
            return
        if last is None:
            raise RuntimeError(
                f"rank {self.rank}: none of its {len(self.order(epoch))} clips of epoch {epoch} "
                "could be decoded (see the warnings above)"
            )
        for _ in range(steps - done):
            yield last

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's batches as CPU tensors, assembled one or two ahead by a background thread."""
        out: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        done = object()

        def produce():
            try:
                for batch in self._batches(epoch):
                    # frames come stacked into (pinned) memory already; the small index arrays are pinned here
                    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in batch.items()}
                    if self.pin:
                        tensors = {k: t if t.is_pinned() else t.pin_memory() for k, t in tensors.items()}
                    while not stop.is_set():
                        try:
                            out.put(tensors, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                out.put(done)
            except BaseException as e:  # surfaced in the loop's thread
                out.put(e)

        thread = threading.Thread(target=produce, name="clman-feed", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Non-blocking host-to-device copies (from pinned memory on GPUs)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
