"""Decoding, encoding, frame sampling and augmentation on tiny real videos (no S3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clman.data.sampling import all_frame_indices, segment_indices, simclr_frame_indices
from clman.data.transforms import MEAN, STD, ClipAugment, SimCLRAugment
from clman.data.video import (EMPTY, NOT_A_VIDEO, TRUNCATED, VideoError, decode_frames, encode_mp4,
                              probe_video, transcode, transcode_with_info)
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


@pytest.mark.parametrize("data, reason", [
    (b"", EMPTY),
    (b"this is a text file, not a video\n" * 20, NOT_A_VIDEO),
    (bytes(range(256)) * 8, NOT_A_VIDEO),
])
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


def test_simclr_indices_are_distinct():
    rng = np.random.default_rng(0)
    idx = simclr_frame_indices(20, 6, rng)
    assert len(set(idx.tolist())) == 6 and idx.max() < 20
    assert sorted(simclr_frame_indices(3, 6, rng).tolist()) == [0, 1, 2]  # all there is
    with pytest.raises(ValueError, match="num_frames"):
        simclr_frame_indices(0, 2, rng)


# -- transforms -------------------------------------------------------------
def test_clip_augment_applies_one_draw_to_all_frames():
    torch.manual_seed(0)
    clip = np.repeat(frames(1, 48, 64), 8, axis=0)  # 8 identical frames
    aug = ClipAugment(32, train=True, elastic_p=1.0)  # elastic always on: the hardest case
    for _ in range(5):
        out = aug(clip)
        assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
        assert type(out) is torch.Tensor
        assert torch.equal(out, out[:1].expand_as(out)), "frames of one clip got different draws"


def test_clip_augment_is_random_between_calls_and_eval_is_not():
    torch.manual_seed(0)
    clip = frames(4, 48, 64)
    aug = ClipAugment(32, train=True)
    assert not torch.equal(aug(clip), aug(clip))
    ev = ClipAugment(32, train=False)
    a, b = ev(clip), ev(clip)
    assert torch.equal(a, b)
    # Normalised with the fixed per-channel constants.
    grey = ev(np.full((1, 8, 8, 3), 128, np.uint8))
    assert torch.allclose(grey, torch.full_like(grey, (128 / 255 - MEAN[0]) / STD[0]), atol=1e-3)


def test_simclr_views_differ_and_have_the_right_shape():
    torch.manual_seed(0)
    v1, v2 = SimCLRAugment(24)(frames(3, 40, 40))
    assert v1.shape == v2.shape == (3, 3, 24, 24)
    assert v1.dtype == torch.float32
    for i in range(3):
        assert not torch.allclose(v1[i], v2[i]), f"frame {i}: the two views are the same"
