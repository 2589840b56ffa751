"""The worker feed: uint8 frames from the real local S3, decoded by Ray tasks once (cache) or every epoch."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from clman import storage
from clman.config import DataConfig
from clman.data import manifest as M
from clman.data.video import encode_mp4
from clman.train import feed as FD
from clman.errors import JobError
from clman.launch import trainer
from tests.media import frames

SIZE, T, M_FRAMES = 24, 4, 3
LENGTHS = {"v0": 12, "v1": 9, "v2": 3, "v3": 12, "v4": 10, "v5": 8}  # v2 is shorter than T


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray

    # The s3 fixture has put the AWS_* variables in os.environ: the Ray workers inherit them.
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def rows(s3, ray_local):
    """Six good grayscale clips, one corrupt object and one missing object: manifest rows."""
    name = "feed-data"
    s3.make_bucket(name)
    root = f"s3://{name}"
    out = []
    for i, (vid, n) in enumerate({**LENGTHS, "bad": 12, "gone": 12}.items()):
        uri = f"{root}/clips/{vid}.mp4"
        if vid == "bad":
            storage.write_bytes(uri, b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 500)
        elif vid != "gone":
            storage.write_bytes(uri, encode_mp4(frames(n, 32, 40, seed=i, gray=True), fps=10))
        out.append(
            {
                "video_id": vid,
                "patient_id": vid,
                "label": i % 2,
                "split": "train",
                "fold": -1,
                "uri": uri,
                "num_frames": n,
                "fps": 10.0,
                "height": 32,
                "width": 40,
                "sha256": f"{i:064d}",
                "source": "test",
            }
        )
    M.write_manifest(pd.DataFrame(out), f"{root}/manifest.parquet")
    return M.read_manifest(f"{root}/manifest.parquet")


def cfg(cache: str) -> DataConfig:
    return DataConfig(size=SIZE, num_frames=T, frames_per_clip=M_FRAMES, cache=cache, decode_cpus=0.5)


def sampler(mode: str, data, seed: int):
    """The feed's sampler for finetune training (clips), evaluation (eval) or SimCLR (frames)."""
    if mode == "clips":
        return FD.Clips(data.num_frames, seed)
    if mode == "eval":
        return FD.EvalClips(data.num_frames)
    if mode == "frames":
        return FD.Frames(data.frames_per_clip, seed)
    raise ValueError(mode)


def epoch_batches(source, data, mode, epoch, batch_size=2, rank=0, world=1, seed=0):
    f = FD.Feed(source, sampler(mode, data, seed), data, batch_size=batch_size, rank=rank, world=world)
    return list(f.batches(epoch)), f


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_clip_batches_are_uint8_at_the_stored_size_and_skip_bad_clips(rows, cache, caplog):
    data = cfg(cache)
    with caplog.at_level(logging.WARNING, logger="clman.train.feed"):
        source = trainer.frame_source(rows, data)
        f = FD.Feed(source, FD.Clips(data.num_frames, 0), data, batch_size=2)
        batches = list(f.batches(0)) + list(f.batches(1))
    s = data.stored_size
    assert s == 28  # 24 * 8 / 7, rounded up
    for b in batches:
        assert b["frames"].dtype == torch.uint8 and b["frames"].shape == (2, T, 1, s, s)
        assert b["label"].shape == (2,) and b["frame_idx"].shape == (2, T)
    seen = {int(v) for b in batches for v in b["video"]}
    names = [rows["video_id"].iloc[i] for i in seen]
    assert "bad" not in names and "gone" not in names and len(seen) == 6
    warned = [r.getMessage() for r in caplog.records if "skipping clip" in r.getMessage()]
    # once per bad URI: in the cache when it is built, in a stream the first time it is met
    assert sum("bad.mp4" in m for m in warned) == 1 and sum("gone.mp4" in m for m in warned) == 1, warned
    if cache == "memory":
        assert len(source["videos"]) == 6, "the cache leaves bad videos out of every epoch"


def test_cache_and_stream_give_the_same_frames(rows):
    """Same seed: the same clips in the same order whichever way the frames arrive."""
    got = {}
    for cache in ("memory", "off"):
        source = trainer.frame_source(rows, cfg(cache))
        keep = [i for i, v in enumerate(source["videos"]) if "bad" not in v.uri and "gone" not in v.uri]
        source = {
            "videos": [source["videos"][i] for i in keep],
            "cache": None if source["cache"] is None else [source["cache"][i] for i in keep],
        }
        got[cache] = epoch_batches(source, cfg(cache), "clips", epoch=3)[0]
    for a, b in zip(got["memory"], got["off"], strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["frame_idx"], b["frame_idx"])
        assert torch.equal(a["frames"], b["frames"])


def test_order_and_frames_change_by_epoch_and_repeat_by_seed(rows):
    data = cfg("memory")
    source = trainer.frame_source(rows, data)
    e0, f = epoch_batches(source, data, "clips", epoch=0)
    e0_again, _ = epoch_batches(source, data, "clips", epoch=0)
    e1, _ = epoch_batches(source, data, "clips", epoch=1)
    order = [b["video"].tolist() for b in e0]
    assert order == [b["video"].tolist() for b in e0_again]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(e0, e0_again))
    assert order != [b["video"].tolist() for b in e1] or any(
        not torch.equal(a["frame_idx"], b["frame_idx"]) for a, b in zip(e0, e1)
    )
    other_seed, _ = epoch_batches(source, data, "clips", epoch=0, seed=1)
    assert order != [b["video"].tolist() for b in other_seed]


def test_ranks_share_an_epoch_without_overlap_and_run_equal_steps(rows):
    data = cfg("memory")
    source = trainer.frame_source(rows, data)
    per_rank = [epoch_batches(source, data, "clips", epoch=2, batch_size=1, rank=r, world=2)[0] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    videos = [{int(b["video"]) for b in batches} for batches in per_rank]
    assert not videos[0] & videos[1] and len(videos[0] | videos[1]) == 6


def test_ranks_run_equal_steps_when_a_streamed_clip_fails(rows):
    """Rank 0's share holds the bad clips: it still runs as many steps as rank 1 (DDP would hang)."""
    data = cfg("off")
    source = trainer.frame_source(rows, data)
    for epoch in range(3):
        steps = [
            len(epoch_batches(source, data, "clips", epoch=epoch, batch_size=2, rank=r, world=2)[0]) for r in (0, 1)
        ]
        assert steps == [2, 2], (epoch, steps)


def test_simclr_batches_hold_m_frames_per_video(rows):
    data = cfg("memory")
    source = trainer.frame_source(rows, data)
    batches, f = epoch_batches(source, data, "frames", epoch=0, batch_size=6)
    assert len(batches) == f.steps() == 6 * M_FRAMES // 6
    for b in batches:
        assert b["frames"].shape == (6, 1, 28, 28) and b["slot"].shape == (6,)
        assert b["video"].tolist()[:M_FRAMES] == [int(b["video"][0])] * M_FRAMES


def test_eval_clips_are_segment_centres_and_every_video_once(rows):
    data = cfg("off")
    source = trainer.frame_source(rows, data)
    batches, _ = epoch_batches(source, data, "eval", epoch=0, batch_size=4)
    assert sorted(int(v) for b in batches for v in b["video"]) == list(range(6))
    first = {int(v): idx.tolist() for b in batches for v, idx in zip(b["video"], b["frame_idx"])}
    assert first[0] == [1, 4, 7, 10]  # 12 frames, T = 4: centres of the four segments
    again, _ = epoch_batches(source, data, "eval", epoch=5, batch_size=4)
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(batches, again))


def test_cache_memory_that_cannot_fit_fails_naming_the_sizes(rows):
    data = DataConfig(size=SIZE, store_size=20000, cache="memory")
    with pytest.raises(JobError, match=r"data.cache=memory: the decoded data set \(8 videos, .* GB"):
        trainer.frame_source(rows, data)


def test_cache_auto_streams_a_data_set_too_large_saying_so(rows, caplog):
    data = DataConfig(size=SIZE, store_size=20000, cache="auto")
    with caplog.at_level(logging.INFO, logger="clman.train.feed"):
        source = trainer.frame_source(rows, data)
    assert source["cache"] is None
    assert [r.getMessage() for r in caplog.records if "streaming clips" in r.getMessage()]


def test_stack_frames_gathers_straight_into_the_batch():
    """The Feed's stacking: np.stack's numbers, rows gathered from cached videos, 1 -> 3 channels in a mixed batch."""
    from clman.data.frames import stack_frames

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (9, 1, 6, 6), dtype=np.uint8)
    colour = rng.integers(0, 256, (9, 3, 6, 6), dtype=np.uint8)
    grey.flags.writeable = False  # as Ray's object store hands them out
    rows = np.array([0, 4, 4, 8])
    got = stack_frames([(grey, rows), (grey, rows[::-1])])
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(np.stack([grey[rows], grey[rows[::-1]]])))
    mixed = stack_frames([(grey, rows), (colour, rows)])
    assert mixed.shape == (2, 4, 3, 6, 6)
    assert torch.equal(mixed[0], torch.from_numpy(np.repeat(grey[rows], 3, axis=1)))
    assert torch.equal(mixed[1], torch.from_numpy(colour[rows]))
    frames = stack_frames([(grey, 2), (colour, 5), grey[7]])  # SimCLR: single frames
    assert torch.equal(frames[1], torch.from_numpy(colour[5])) and torch.equal(
        frames[2, 0], torch.from_numpy(grey[7, 0])
    )
    with pytest.raises(ValueError, match="shape"):
        stack_frames([grey[:2], grey[:3]])
