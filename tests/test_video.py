"""Decoding, encoding, frame sampling and augmentation on tiny real videos (no S3)."""

from __future__ import annotations

import numpy as np
import pytest

from clman.data.frames import simclr_indices
from clman.data.sampling import all_frame_indices, segment_indices
from clman.data.video import (
    EMPTY,
    NOT_A_VIDEO,
    TRUNCATED,
    VideoError,
    decode_frames,
    decode_frames_resized,
    encode_mp4,
    probe_video,
    transcode,
    transcode_with_info,
)
from tests.media import frames, keyframe_positions, pyav_decode, pyav_mp4


# -- video ------------------------------------------------------------------
def test_decord_matches_pyav_on_the_same_file():
    data = encode_mp4(frames(12, 32, 32), fps=10)
    ours = decode_frames(data)  # (T, H, W, 3) decord
    ref = pyav_decode(data)
    assert ours.shape == ref.shape == (12, 32, 32, 3)
    assert ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 2
    # Random access returns the same frames as sequential decoding.
    idx = [11, 0, 5, 5]
    assert np.abs(decode_frames(data, idx).astype(int) - ref[idx].astype(int)).mean() < 2


def test_encode_roundtrip_is_close_to_the_source():
    src = frames(12, 32, 32)
    out = decode_frames(encode_mp4(src, fps=10))
    assert np.abs(out.astype(int) - src.astype(int)).mean() < 4


def test_probe_reports_frames_fps_and_size():
    info = probe_video(encode_mp4(frames(12, 32, 48), fps=12.5))
    assert (info.num_frames, info.height, info.width) == (12, 32, 48)
    assert info.fps == pytest.approx(12.5)


def test_grayscale_stays_gray_and_odd_sizes_are_padded():
    src = frames(6, 31, 33, gray=True)  # (T, H, W)
    info = probe_video(data := encode_mp4(src, fps=10))
    assert (info.height, info.width) == (32, 34)  # one edge row / column added for yuv420p
    out = decode_frames(data).astype(int)
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 2  # no colour cast
    assert np.abs(out[..., 0] - out[..., 2]).max() <= 2
    assert np.abs(out[:, :31, :33, 0] - src).mean() < 3


def test_clips_have_a_short_gop():
    data = transcode(pyav_mp4(frames(24, 32, 32), gop=250), gop=8)
    assert keyframe_positions(data) == [0, 8, 16]
    assert keyframe_positions(pyav_mp4(frames(24, 32, 32), gop=250)) == [0]


def test_transcode_keeps_frames_and_fps():
    src = pyav_mp4(frames(12, 32, 32), fps=10)
    clip, info = transcode_with_info(src, gop=4)
    assert (info.num_frames, info.fps, info.height, info.width) == (12, 10.0, 32, 32)
    assert np.abs(decode_frames(clip).astype(int) - pyav_decode(src).astype(int)).mean() < 2


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", EMPTY),
        (b"this is a text file, not a video\n" * 20, NOT_A_VIDEO),
        (bytes(range(256)) * 8, NOT_A_VIDEO),
    ],
)
def test_bad_bytes_raise_video_error_with_reason(data, reason):
    for fn in (probe_video, decode_frames, transcode):
        with pytest.raises(VideoError) as err:
            fn(data)
        assert err.value.reason == reason
        assert "\n" not in str(err.value)


def test_truncated_mp4_is_reported_as_truncated():
    data = pyav_mp4(frames(24, 32, 32))
    cut = data[: len(data) // 2]
    for fn in (probe_video, transcode):
        with pytest.raises(VideoError, match="truncated") as err:
            fn(cut)
        assert err.value.reason == TRUNCATED


def test_index_out_of_range_names_the_video():
    data = encode_mp4(frames(4, 16, 16))
    with pytest.raises(VideoError, match=r"clip7: frame index 4 out of range for 4 frames"):
        decode_frames(data, [0, 4], name="clip7")


# -- sampling ---------------------------------------------------------------
def test_segment_indices_eval_takes_segment_centres():
    assert segment_indices(80, 8, train=False).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    assert segment_indices(7, 7, train=False).tolist() == list(range(7))


def test_segment_indices_train_draws_one_frame_per_segment():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        idx = segment_indices(100, 10, train=True, rng=rng)
        assert idx.shape == (10,) and idx.dtype == np.int64
        assert ((idx // 10) == np.arange(10)).all()  # frame k lies in segment k
        seen.update(idx.tolist())
    assert len(seen) > 80  # offsets are random, not fixed


def test_segment_indices_repeat_in_order_for_short_videos():
    assert segment_indices(3, 8, train=False).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert segment_indices(3, 8, train=True, rng=np.random.default_rng(1)).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert segment_indices(1, 4, train=False).tolist() == [0, 0, 0, 0]


def test_all_frames_and_cap():
    assert all_frame_indices(5).tolist() == [0, 1, 2, 3, 4]
    capped = all_frame_indices(1000, max_frames=10)
    assert len(capped) == 10 and capped.max() < 1000 and (np.diff(capped) > 0).all()


def test_simclr_indices_are_distinct_and_always_m():
    rng = np.random.default_rng(0)
    idx = simclr_indices(20, 6, rng)
    assert len(set(idx.tolist())) == 6 and idx.max() < 20
    short = simclr_indices(3, 6, rng).tolist()  # every frame, then repeats: M per video keeps steps equal
    assert len(short) == 6 and set(short) == {0, 1, 2}


def test_decoding_to_the_stored_size_keeps_one_channel_for_grey():
    from clman.data.frames import to_stored

    grey = frames(6, 40, 56, gray=True)  # (T, H, W) grayscale
    stored = to_stored(decode_frames_resized(encode_mp4(grey, fps=10), [0, 3, 5], 36))
    assert stored.shape == (3, 1, 36, 36) and stored.dtype == np.uint8
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    assert to_stored(decode_frames_resized(encode_mp4(colour, fps=10), None, 36)).shape == (6, 3, 36, 36)
