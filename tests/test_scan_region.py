"""Scan-region cropping: burned-in text (banners, side panels, clocks) is cut, the moving image kept."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clman.data.ingest import read_dicom
from clman.data.scan_region import (
    NO_SCAN_REGION,
    ScanRegion,
    ScanRegionError,
    TemporalStd,
    apply_scan_region,
    find_scan_region,
    parse_scan_region,
    temporal_std,
)
from clman.data.video import Mp4Writer, VideoError, decode_frames, encode_mp4, transcode_cropped, transcode_with_info
from tests.media import dicom_cine, pyav_mp4

TEXT = "DOE^JANE MRN0042917 2026-01-02"
T, H, W = 12, 112, 192


def speckle(n: int, h: int, w: int, seed: int = 0, step: int = 3) -> np.ndarray:
    """(n, h, w) uint8 blurred Rayleigh speckle sliding ``step`` rows per frame (a probe sweep)."""
    rng = np.random.default_rng(seed)
    tall = rng.rayleigh(1.0, (h + step * n + 2, w + 2))
    tall = sum(tall[i : i + h + step * n, j : j + w] for i in range(3) for j in range(3)) / 9  # 3x3 box blur
    tall = np.clip(tall / tall.mean() * 90, 0, 255).astype(np.uint8)
    return np.stack([tall[step * t : step * t + h] for t in range(n)])


def sweep(
    top: int = 16,
    bottom: int = 0,
    left: int = 0,
    right: int = 0,
    clock: bool = False,
    hole: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(frames (T, H, W) uint8, text mask (T, H, W) bool): speckle in the scan box, burned-in text
    around it — a top banner with a patient line, depth marks in a left panel, a bottom line (a
    clock that changes every frame when ``clock``); ``hole``: a static black patch inside the scan."""
    video = np.zeros((T, H, W), np.uint8)
    sh, sw = H - top - bottom, W - left - right
    video[:, top : top + sh, left : left + sw] = speckle(T, sh, sw, seed)
    if hole:
        video[:, top + sh // 3 : top + sh // 3 + sh // 4, left + 4 : left + sw // 3] = 0
    text = np.zeros((T, H, W), bool)
    for t in range(T):
        img = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(img)
        if top:
            draw.text((4, (top - 12) // 2), TEXT, fill=235)
        for y in range(top + 4, H - bottom - 8, 16) if left else ():
            draw.text((1, y), f"{(y - top) // 16}", fill=200)
        if bottom:
            draw.text((W - 90, H - bottom + 1), f"00:00:{t:02d}" if clock else "MI 0.9 TIS 0.2", fill=220)
        ink = np.asarray(img) > 100
        frame = video[t]
        frame[:top] = 30  # the banner's grey background
        frame[ink] = np.asarray(img)[ink]
        text[t] = ink
    return video, text


def best_match(frames: np.ndarray, patch: np.ndarray) -> float:
    """Largest normalised cross-correlation of ``patch`` (h, w) anywhere in (T, H, W) ``frames``."""
    from scipy.signal import fftconvolve

    h, w = patch.shape
    if frames.shape[1] < h or frames.shape[2] < w:
        return 0.0
    p = patch.astype(np.float64) - patch.mean()  # zero mean: the window's own mean drops out of the sum
    best = 0.0
    for f in frames.astype(np.float64):
        num = fftconvolve(f, p[::-1, ::-1], mode="valid")

        # Window sums of f and f^2 from integral images.
        def box(a):
            c = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]

        var = np.maximum(box(f * f) - box(f) ** 2 / p.size, 0.0)
        best = max(best, float((num / (np.sqrt(var * (p**2).sum()) + 1e-6)).max()))
    return best


def text_patch(frames: np.ndarray, text: np.ndarray) -> np.ndarray:
    """The banner's text from frame 0, cut to the ink's bounding box (plus a pixel)."""
    ys, xs = np.nonzero(text[0, :16])
    return frames[0, max(ys.min() - 1, 0) : ys.max() + 2, max(xs.min() - 1, 0) : xs.max() + 2]


# -- parsing ------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("off", ScanRegion("off")),
        ("auto", ScanRegion("auto")),
        (" AUTO ", ScanRegion("auto")),
        ("crop=0,40,128,88", ScanRegion("crop", (0, 40, 128, 88))),
        ("crop=0, 40, 128, 88", ScanRegion("crop", (0, 40, 128, 88))),
    ],
)
def test_parse_scan_region(text, want):
    assert parse_scan_region(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        "on",
        "crop",
        "crop=1,2,3",
        "crop=-1,0,10,10",
        "crop=0,0,0,10",
        "crop=a,b,c,d",
        "crop=1.5,0,10,10",
        "auto,off",
    ],
)
def test_parse_scan_region_errors_name_the_text_and_the_valid_forms(text):
    with pytest.raises(ScanRegionError) as err:
        parse_scan_region(text)
    msg = str(err.value)
    assert repr(text) in msg and "crop=x,y,w,h" in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_scan_region_checks_its_fields():
    with pytest.raises(ScanRegionError, match="needs a box"):
        ScanRegion("crop")
    with pytest.raises(ScanRegionError, match="takes no box"):
        ScanRegion("auto", (0, 0, 2, 2))
    with pytest.raises(ScanRegionError, match="not one of off, auto, crop"):
        ScanRegion("on")


# -- finding the region -------------------------------------------------------------
def test_temporal_std_is_exact_in_any_batching():
    video, _ = sweep()
    rgb = np.stack([video, video // 2, 255 - video], axis=-1)
    want = rgb.astype(np.float64).std(axis=0).max(axis=-1)
    np.testing.assert_allclose(temporal_std(rgb), want, atol=1e-4)
    np.testing.assert_allclose(temporal_std(video), video.astype(np.float64).std(axis=0), atol=1e-4)
    one_by_one = TemporalStd()
    for frame in rgb:
        one_by_one.add(frame)
    assert one_by_one.count == T
    np.testing.assert_allclose(one_by_one.std(), want, atol=1e-4)


@pytest.mark.parametrize("codec", ["raw", "crf18", "crf28"])
def test_a_static_text_banner_is_cut(codec):
    video, text = sweep(top=16)
    frames = video if codec == "raw" else decode_frames(encode_mp4(video, fps=10, crf=int(codec[3:])))
    assert text[:, :16].sum() > 100  # the banner really holds text
    box = find_scan_region(frames)
    assert box == (0, 16, W, H - 16)
    cropped, used, note = apply_scan_region(frames, parse_scan_region("auto"))
    assert used == box and cropped.shape[1:3] == (H - 16, W)
    assert (
        note == f"scan region x=0 y=16 w={W} h={H - 16} of {W}x{H}: cut 16 rows above, 0 below, 0 columns left, 0 right"
    )
    x, y, w, h = box
    assert not text[:, y : y + h, x : x + w].any()  # no text pixel inside the crop
    # None of the banner's rows survives: each cropped row differs from every banner row.
    banner = frames[0, :16].reshape(16, -1).astype(int)
    rows = cropped[0].reshape(h, -1).astype(int)
    assert np.abs(rows[:, None] - banner[None]).mean(axis=-1).min() > 20


@pytest.mark.parametrize(
    "layout",
    [
        dict(top=13),  # odd banner: the box is rounded in to even
        dict(top=14, bottom=12, clock=True),  # the clock changes every frame, but is no scan
        dict(top=16, left=14),  # a static side panel with depth marks
        dict(top=10, bottom=9, left=11, right=7, clock=True, hole=True),  # static black patch inside the scan
    ],
)
@pytest.mark.parametrize("codec", ["raw", "crf23"])
def test_text_on_any_side_is_cut(layout, codec):
    video, text = sweep(**layout)
    frames = video if codec == "raw" else decode_frames(encode_mp4(video, fps=10, crf=23))
    x, y, w, h = find_scan_region(frames)
    assert w % 2 == 0 and h % 2 == 0
    assert not text[:, y : y + h, x : x + w].any()
    # All of the scan is kept but for the one line that even sizes cost.
    top, left = layout.get("top", 0), layout.get("left", 0)
    scan_h = H - top - layout.get("bottom", 0)
    scan_w = W - left - layout.get("right", 0)
    assert top <= y <= top + 1 and left <= x <= left + 1
    assert scan_h - 1 <= h <= scan_h and scan_w - 1 <= w <= scan_w


def test_a_sweep_without_overlays_is_kept_whole():
    video, text = sweep(top=0)
    assert not text.any()
    assert find_scan_region(video) == (0, 0, W, H)


def test_degenerate_sweeps_raise_naming_why():
    video, _ = sweep()
    with pytest.raises(ScanRegionError, match="at least 2 frames.*got 1"):
        find_scan_region(video[:1])
    with pytest.raises(ScanRegionError, match="nothing changes over the 5 frames.*a still image or a frozen loop"):
        find_scan_region(np.repeat(video[:1], 5, axis=0))
    small = np.repeat(video[:1], T, axis=0)
    small[:, 40:60, 20:60] = video[:, 40:60, 20:60]  # only a 40x20 patch moves: 4% of the frame
    with pytest.raises(ScanRegionError, match=f"is 4% of the {W}x{H} frame, under 25%"):
        find_scan_region(small)
    with pytest.raises(ScanRegionError, match="uint8"):
        find_scan_region(video.astype(np.float32))
    assert NO_SCAN_REGION == "no_scan_region"  # the ingest reject reason


# -- applying it ---------------------------------------------------------------------
def test_crop_and_off():
    video, _ = sweep()
    rgb = np.stack([video] * 3, axis=-1)
    out, box, note = apply_scan_region(rgb, parse_scan_region("crop=10,20,100,60"))
    assert box == (10, 20, 100, 60) and out.shape == (T, 60, 100, 3)
    np.testing.assert_array_equal(out, rgb[:, 20:80, 10:110])
    assert "cut 20 rows above, 32 below, 10 columns left, 82 right" in note
    # Odd sizes are rounded in to even (H.264 yuv420p), not padded with repeated lines.
    out, box, _ = apply_scan_region(video, parse_scan_region("crop=1,1,101,61"))
    assert box == (1, 1, 100, 60) and out.shape == (T, 60, 100)
    # A single frame is fine for crop (nothing to find).
    assert apply_scan_region(video[:1], parse_scan_region(f"crop=0,0,{W},{H}"))[0].shape == (1, H, W)
    out, box, note = apply_scan_region(video, parse_scan_region("off"))
    assert out is video and box is None and note == f"scan region off: {W}x{H} frames kept whole"


@pytest.mark.parametrize("spec", ["crop=0,0,193,112", "crop=100,0,100,10", "crop=0,100,10,13"])
def test_a_crop_outside_the_frame_names_the_frame_size(spec):
    video, _ = sweep()
    with pytest.raises(ScanRegionError, match=f"outside the {W}x{H} frame"):
        apply_scan_region(video, parse_scan_region(spec))


def test_a_crop_of_one_pixel_cannot_be_encoded():
    video, _ = sweep()
    with pytest.raises(ScanRegionError, match="even"):
        apply_scan_region(video, parse_scan_region("crop=0,0,1,40"))


# -- end to end: DICOM and video files --------------------------------------------------
@pytest.mark.parametrize("color", [False, True])
def test_dicom_burned_in_text_is_gone_from_the_clip(color):
    video, text = sweep(top=16, bottom=12, clock=True)
    source = np.stack([video, video, np.clip(video.astype(int) + 20, 0, 255).astype(np.uint8)], -1) if color else video
    ds, frames = read_dicom(dicom_cine(source, "Doe^Jane", "MRN0042917"), "labels.csv line 2")
    assert frames.shape == source.shape
    cropped, (x, y, w, h), note = apply_scan_region(frames, parse_scan_region("auto"))
    assert "cut 16 rows above, 12 below" in note
    writer = Mp4Writer(fps=25.0, name="labels.csv line 2")
    for frame in cropped:
        writer.write(frame)
    clip = decode_frames(writer.finish())
    assert clip.shape == (T, h, w, 3) and (h, w) == (H - 28, W)
    gray = clip[..., 1]
    # The banner line matches itself in a clip of the whole frame, and nowhere in the cropped one.
    whole = decode_frames(encode_mp4(frames, fps=25.0))[..., 1]
    for patch in (text_patch(video, text), text_patch(video, text)[:, 40:110]):  # the line, "MRN0042917"
        assert best_match(whole, patch) > 0.9
        assert best_match(gray, patch) < 0.5


def test_transcode_crops_to_the_scan_region(caplog):
    video, text = sweep(top=16, left=14)
    data = pyav_mp4(np.stack([video] * 3, axis=-1), fps=10)
    # Callers that name no region get the whole frame, as before.
    _, info = transcode_with_info(data, gop=4, name="labels.csv line 3")
    assert (info.height, info.width) == (H, W)

    caplog.set_level(logging.INFO, logger="clman.data.video")
    clip, info = transcode_with_info(data, gop=4, name="labels.csv line 3", scan_region=parse_scan_region("auto"))
    assert (info.num_frames, info.height, info.width) == (T, H - 16, W - 14)
    assert "labels.csv line 3: scan region x=14 y=16 w=178 h=96" in caplog.text
    got = decode_frames(clip)
    assert got.shape == (T, H - 16, W - 14, 3)
    assert best_match(got[..., 0], text_patch(video, text)) < 0.5
    assert np.abs(got[..., 0].astype(int) - video[:, 16:, 14:]).mean() < 4  # the scan itself, kept

    clip, info, note = transcode_cropped(data, parse_scan_region("crop=14,16,100,50"), name="x")
    assert (info.height, info.width) == (50, 100) and note.startswith("scan region x=14 y=16 w=100 h=50")
    _, info, note = transcode_cropped(data, parse_scan_region("off"), name="x")
    assert (info.height, info.width) == (H, W) and note.startswith("scan region off")


@pytest.mark.parametrize(
    "spec, match", [("crop=0,0,400,10", f"outside the {W}x{H} frame"), ("auto", "nothing changes")]
)
def test_transcode_rejects_a_region_it_cannot_use(spec, match):
    video, _ = sweep()
    still = (
        np.repeat(np.stack([video[:1]] * 3, axis=-1), 6, axis=0) if spec == "auto" else np.stack([video] * 3, axis=-1)
    )
    with pytest.raises(VideoError, match=f"labels.csv line 4: .*{match}") as err:
        transcode_with_info(pyav_mp4(still), name="labels.csv line 4", scan_region=parse_scan_region(spec))
    assert err.value.reason == NO_SCAN_REGION
