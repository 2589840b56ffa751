"""The scan region of an ultrasound sweep: the part of the frame that is the image, not overlays.

Scanner exports burn text into the pixels (patient name, record number, date,
hospital banner, probe and depth labels). Over a sweep the image changes from
frame to frame while the overlays stay put, so ``auto`` keeps the rectangle
whose pixels change over time and cuts the rest:

1. per-pixel temporal standard deviation over all frames (max over channels),
   exact in integers (``TemporalStd``); a pixel "moves" when it is above
   ``PIXEL_STD`` grey levels, which lossy compression of static text stays under;
2. rows, then columns, then rows again (to a fixed point) are kept where at least
   ``LINE_FRACTION`` of the pixels inside the current box move, relative to the
   busiest lines: static pixels inside the scan (black background, anechoic areas)
   are tolerated up to that share, and a few moving pixels in a banner (a clock,
   a cine progress bar) do not pull it in; gaps up to ``GAP_FRACTION`` of a side
   are bridged and the run with the most moving pixels wins;
3. on each side where something was cut, up to ``BLEED_MAX`` lines are trimmed
   while their median temporal std is under ``BLEED_REL`` of the box's: lossy
   codecs (H.264 macroblocks, JPEG blocks) leak the image's motion into the
   static pixels that share a block with it;
4. width and height are rounded down to even (H.264 yuv420p), and a box under
   ``MIN_AREA`` of the frame is refused (``ScanRegionError``).

Limits: a rectangle cannot cut text beside a fan-shaped (convex probe) image
inside its bounding box, nor overlays drawn inside the image (calipers, markers);
of a split-screen (dual) view only the larger image is kept.
Ray-free and torch-free: numpy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# The reject reason (rejects.parquet ``reason``) of a video whose scan region cannot be found.
NO_SCAN_REGION = "no_scan_region"

MODES = ("off", "auto", "crop")
VALID = "off, auto or crop=x,y,w,h (pixels; x, y >= 0; w, h > 0)"

# Grey levels. Measured on a 12-24 frame speckle sweep: static text in blocks it does not share with the
# image has std 0 after H.264 crf 18 and <= ~1 at crf 28; the sweep's pixels 7-9 (1st percentile).
PIXEL_STD = 3.0
LINE_FRACTION = 0.5  # of the busiest lines' share of moving pixels
GAP_FRACTION = 0.04  # of the side: bridged static bands inside the scan (a dark cyst, a dropout)
BLEED_REL = 0.5  # lines next to a cut whose median std is under this share of the box's
BLEED_MAX = 16  # pixels per side: one H.264 macroblock / JPEG 4:2:0 MCU
MIN_AREA = 0.25  # of the frame: a smaller box is more likely a mistake than the scan


class ScanRegionError(ValueError):
    """A scan region that cannot be parsed, found or applied (one line, naming why)."""


Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class ScanRegion:
    """How to crop frames: ``off`` (keep whole), ``auto`` (find it) or ``crop`` with ``box`` (x, y, w, h)."""

    mode: str = "off"
    box: Box | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ScanRegionError(f"scan region mode {self.mode!r} is not one of {', '.join(MODES)}")
        if (self.mode == "crop") != (self.box is not None):
            raise ScanRegionError(
                f"scan region mode {self.mode!r} "
                + ("needs a box (x, y, w, h)" if self.mode == "crop" else "takes no box")
            )
        if self.box is not None:
            if len(self.box) != 4 or min(self.box[:2]) < 0 or min(self.box[2:]) <= 0:
                raise ScanRegionError(f"scan region box {self.box} is not x, y >= 0 and w, h > 0")


def parse_scan_region(text: str) -> ScanRegion:
    """``off`` | ``auto`` | ``crop=x,y,w,h`` (case and spaces ignored) -> ScanRegion; ScanRegionError otherwise."""
    spec = re.sub(r"\s+", "", str(text)).lower()
    if spec in ("off", "auto"):
        return ScanRegion(spec)
    m = re.fullmatch(r"crop=(\d+),(\d+),(\d+),(\d+)", spec)
    if m is None:
        raise ScanRegionError(f"scan region {text!r} is not valid; expected {VALID}")
    x, y, w, h = (int(v) for v in m.groups())
    if w == 0 or h == 0:
        raise ScanRegionError(f"scan region {text!r}: w and h must be > 0; expected {VALID}")
    return ScanRegion("crop", (x, y, w, h))


class TemporalStd:
    """Per-pixel standard deviation over frames added one (or a batch) at a time.

    Sums of values and squares are kept in int64, so the result is exact whatever
    the number of frames, and memory is 16 bytes per pixel and channel, not per frame.
    """

    def __init__(self):
        self.count = 0
        self._sum = self._sq = None

    def add(self, frames: np.ndarray) -> None:
        """One frame (H, W) / (H, W, C) uint8, or a batch (N, H, W, C) uint8."""
        a = np.asarray(frames)
        if a.dtype != np.uint8:
            raise ScanRegionError(f"frames must be uint8, got {a.dtype}")
        if a.ndim == 2:
            a = a[None, :, :, None]
        elif a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ScanRegionError(f"frame shape {np.asarray(frames).shape} is not (H, W), (H, W, C) or (N, H, W, C)")
        if self._sum is None:
            self._sum = np.zeros(a.shape[1:], np.int64)
            self._sq = np.zeros(a.shape[1:], np.int64)
        elif a.shape[1:] != self._sum.shape:
            raise ScanRegionError(f"frame {self.count} has shape {a.shape[1:]}, earlier frames {self._sum.shape}")
        self._sum += a.sum(axis=0, dtype=np.int64)
        self._sq += np.square(a, dtype=np.uint16).sum(axis=0, dtype=np.int64)
        self.count += len(a)

    def std(self) -> np.ndarray:
        """(H, W) float32: the temporal std of each pixel, the largest over channels."""
        if self._sum is None:
            raise ScanRegionError("no frames added")
        n = self.count
        var = (n * self._sq - self._sum * self._sum) / float(n * n)  # exact integers until the division
        return np.sqrt(np.maximum(var, 0.0)).max(axis=-1).astype(np.float32)


def _as_video(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) or (T, H, W, C) uint8 -> (T, H, W, C), checked."""
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.dtype != np.uint8:
        raise ScanRegionError(f"frames must be (T, H, W) or (T, H, W, C) uint8, got {a.shape} {a.dtype}")
    return a


def _accumulate(video: np.ndarray) -> TemporalStd:
    acc = TemporalStd()
    step = max(1, (8 << 20) // max(1, video[0].size))  # ~8 M values (16 MB of squares) per batch
    for i in range(0, len(video), step):
        acc.add(video[i : i + step])
    return acc


def temporal_std(frames: np.ndarray) -> np.ndarray:
    """(H, W) float32 temporal std of (T, H, W[, C]) uint8 frames (max over channels), in bounded memory."""
    return _accumulate(_as_video(frames)).std()


def _span(share: np.ndarray, max_gap: int) -> tuple[int, int] | None:
    """[start, stop) of the run of busy lines (share >= LINE_FRACTION of the busiest) holding most
    moving pixels, bridging gaps of up to ``max_gap`` quiet lines; None when no line moves."""
    # The 95th percentile, not the max: one full-width moving line (a progress bar) is not the level.
    level = float(np.percentile(share, 95)) or float(share.max())
    if level <= 0:
        return None
    busy = np.flatnonzero(share >= LINE_FRACTION * level)
    runs, start = [], busy[0]
    for prev, cur in zip(busy[:-1], busy[1:]):
        if cur - prev - 1 > max_gap:
            runs.append((start, prev + 1))
            start = cur
    runs.append((start, busy[-1] + 1))
    a, b = max(runs, key=lambda r: share[r[0] : r[1]].sum())
    return int(a), int(b)


def _trim_bleed(std: np.ndarray, lo_cut: bool, hi_cut: bool) -> tuple[int, int]:
    """[start, stop) of the lines (rows of ``std``, lines x pixels) left after trimming quiet lines
    at an edge where overlays were cut: codec bleed, see BLEED_REL."""
    activity = np.median(std, axis=1)
    floor = BLEED_REL * float(np.median(activity))
    limit = min(BLEED_MAX, len(activity) // 4)
    i, j = 0, len(activity)
    while lo_cut and i < limit and activity[i] < floor:
        i += 1
    while hi_cut and len(activity) - j < limit and activity[j - 1] < floor:
        j -= 1
    return i, j


def _even(start: int, size: int, side: int) -> tuple[int, int]:
    """(start, size) with size rounded down to even (yuv420p), the odd line taken from the start
    when only that end was cut (nearer the overlays), else from the far end."""
    if size % 2 == 0:
        return start, size
    return (start + 1 if start > 0 and start + size == side else start), size - 1


def box_from_std(std: np.ndarray, frames: int) -> Box:
    """The scan box (x, y, w, h) of a (H, W) temporal-std map over ``frames`` frames; see the module doc."""
    H, W = std.shape
    if frames < 2:
        raise ScanRegionError(
            f"finding the scan region needs at least 2 frames (what changes is the image), got {frames}"
        )
    moving = std > PIXEL_STD
    if not moving.any():
        raise ScanRegionError(
            f"nothing changes over the {frames} frames (largest temporal std "
            f"{float(std.max()):.1f} grey levels, threshold {PIXEL_STD:g}): a still "
            "image or a frozen loop"
        )
    rows, cols = (0, H), (0, W)
    for _ in range(8):  # alternate until the box stops changing (2-3 rounds in practice)
        new_rows = _span(moving[:, cols[0] : cols[1]].mean(axis=1), max(2, int(GAP_FRACTION * H)))
        new_cols = (
            None
            if new_rows is None
            else _span(moving[new_rows[0] : new_rows[1]].mean(axis=0), max(2, int(GAP_FRACTION * W)))
        )
        if new_rows is None or new_cols is None:
            raise ScanRegionError(
                f"no band of the {W}x{H} frame changes over the {frames} frames "
                f"({int(moving.sum())} scattered moving pixels)"
            )
        if (new_rows, new_cols) == (rows, cols):
            break
        rows, cols = new_rows, new_cols
    box_std = std[rows[0] : rows[1], cols[0] : cols[1]]
    r0, r1 = _trim_bleed(box_std, rows[0] > 0, rows[1] < H)
    c0, c1 = _trim_bleed(box_std[r0:r1].T, cols[0] > 0, cols[1] < W)
    y, h = _even(rows[0] + r0, r1 - r0, H)
    x, w = _even(cols[0] + c0, c1 - c0, W)
    if w * h < MIN_AREA * W * H:
        raise ScanRegionError(
            f"the changing area x={x} y={y} w={w} h={h} is {100 * w * h / (W * H):.0f}% "
            f"of the {W}x{H} frame, under {MIN_AREA:.0%}: not a scan region"
        )
    return x, y, w, h


def find_scan_region(frames: np.ndarray) -> Box:
    """(x, y, w, h) of the scan region of (T, H, W) or (T, H, W, C) uint8 frames: w, h even.

    Raises ScanRegionError (naming why) for fewer than 2 frames, nothing changing,
    or a changing area under MIN_AREA of the frame; the caller should then reject
    the video (reason NO_SCAN_REGION) rather than keep the whole frame, whose
    burned-in text would survive.
    """
    video = _as_video(frames)
    return box_from_std(temporal_std(video), len(video))


def region_box(region: ScanRegion, height: int, width: int, std: TemporalStd | None = None) -> Box | None:
    """The box ``region`` gives on ``height`` x ``width`` frames (None for off); even w, h.

    ``std``: the frames' TemporalStd, needed for ``auto``. A ``crop`` box outside
    the frame raises ScanRegionError naming the frame size; an odd w or h is
    rounded down to even.
    """
    if region.mode == "off":
        return None
    if region.mode == "auto":
        if std is None:
            raise ScanRegionError("scan region auto needs the frames' temporal std")
        return box_from_std(std.std(), std.count)
    x, y, w, h = region.box
    if x + w > width or y + h > height:
        raise ScanRegionError(
            f"scan region crop={x},{y},{w},{h} reaches x={x + w} y={y + h}, outside the {width}x{height} frame"
        )
    w, h = w - w % 2, h - h % 2
    if w == 0 or h == 0:
        raise ScanRegionError(
            f"scan region crop={x},{y},{region.box[2]},{region.box[3]}: H.264 needs even "
            "sizes, and w or h of 1 rounds to 0"
        )
    return x, y, w, h


def describe(box: Box | None, height: int, width: int) -> str:
    """One line saying what was cut, e.g. for the ingest log."""
    if box is None:
        return f"scan region off: {width}x{height} frames kept whole"
    x, y, w, h = box
    return (
        f"scan region x={x} y={y} w={w} h={h} of {width}x{height}: cut {y} rows above, "
        f"{height - y - h} below, {x} columns left, {width - x - w} right"
    )


def apply_scan_region(frames: np.ndarray, region: ScanRegion) -> tuple[np.ndarray, Box | None, str]:
    """(frames cropped to ``region`` (a view), box used (None for off), one-line note of the cut).

    ``frames``: (T, H, W) or (T, H, W, C) uint8; the crop keeps the shape's rank.
    Raises ScanRegionError as ``find_scan_region`` (auto) and ``region_box`` (crop) do.
    """
    frames = np.asarray(frames)
    video = _as_video(frames)
    height, width = video.shape[1:3]
    box = region_box(region, height, width, _accumulate(video) if region.mode == "auto" else None)
    if box is None:
        return frames, None, describe(None, height, width)
    x, y, w, h = box
    return frames[:, y : y + h, x : x + w], box, describe(box, height, width)
