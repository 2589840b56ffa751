"""Video bytes in, frames out: decord (PyAV where decord has no wheel) for random-access reading, PyAV for writing.

Clips are stored as short-GOP H.264 (a keyframe every ``gop`` frames, no
B-frames) so that reading T frames spread over a clip decodes only the GOPs
that hold them, not the whole video.

Facts that shaped the reading side:
- decord ships a wheel for x86_64 Linux only. Where it cannot be imported (macOS, Graviton,
  GH200) :class:`PyAVReader` reads instead, the way decord does: an index of the stream's
  packets (frame count, keyframes), a seek to the keyframe before each wanted frame, and
  FFmpeg's bilinear scaler to RGB at the stored size (decord's ``scale=W:H`` filter runs
  swscale with the filter's default flags, ``bilinear``, in its bundled FFmpeg 4.1).
- Measured on the test clips (x86_64, decord 0.6.0 with FFmpeg 4.1 against PyAV 18.1 with
  FFmpeg 8): the two readers give pixel-identical frames, source size and resized (36, 74,
  128 px; grey, colour, odd sizes, short and long GOPs); swscale's bicubic default would
  differ by up to 32 grey levels. tests/test_decode_fallback.py checks the equality.
- decord stays the reader where it is installed: it decodes and scales in its C++ thread.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np

from clman.data.scan_region import NO_SCAN_REGION, ScanRegion, ScanRegionError, TemporalStd, describe, region_box

logger = logging.getLogger(__name__)

try:
    import decord
except ImportError:  # no decord wheel for this platform: PyAVReader reads instead
    decord = None
else:
    # decord's C++ logger prints the failing input (possibly the whole file) on open
    # errors; our VideoError already names the item.
    decord.logging.set_level(decord.logging.QUIET)

# Reject reasons shared with the ingest job (rejects.parquet `reason` column).
EMPTY, NOT_A_VIDEO, TRUNCATED, NO_FRAMES, UNREADABLE = ("empty", "not_a_video", "truncated", "no_frames", "unreadable")

# Leading bytes of containers we know; a file that starts like one but does not
# open was cut short (or damaged), anything else is not a video at all.
_CONTAINER_MAGIC = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (0, b"RIFF"),  # AVI
    (0, b"\x1aE\xdf\xa3"),  # Matroska / WebM
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"),  # MPEG-PS
    (0, b"FLV"),
)


class VideoError(ValueError):
    """A video that cannot be used; ``reason`` is one of the reject reasons above."""

    def __init__(self, message: str, reason: str = UNREADABLE):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def looks_like_container(data: bytes) -> bool:
    return any(data[off : off + len(magic)] == magic for off, magic in _CONTAINER_MAGIC)


class DecordReader:
    """Random access with decord; frames resized by FFmpeg's scaler inside decord's C++ thread."""

    def __init__(self, data: bytes, size: int | None = None):
        # One reader per call and one decoding thread: readers shared across
        # forked worker processes deadlock, and Ray actors parallelise clips.
        side = size or -1
        self._vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=side, height=side)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return self._vr.get_batch(indices).asnumpy()  # (T, H, W, 3)

    def frame(self, i: int) -> np.ndarray:
        # Not get_batch([i]): at source size, decord 0.6.0 pads some widths' rows (48 px: a
        # (32, 48, 4) frame) and get_batch then fails its size check; one frame reads fine.
        return self._vr[i].asnumpy()  # (H, W, 3 or more)

    def close(self) -> None:
        del self._vr


class PyAVReader:
    """Random access with PyAV, where decord has no wheel: the same frames as :class:`DecordReader`.

    Like decord: the frames are the stream's packets in presentation (pts) order; a wanted frame
    is decoded from the keyframe before it, or onwards from the last decoded frame when that is
    nearer; resized to ``size`` x ``size`` RGB by swscale's bilinear filter.
    """

    def __init__(self, data: bytes, size: int | None = None):
        import av  # imported here: where decord reads, a decode task does not load PyAV's FFmpeg too

        self._container = av.open(io.BytesIO(data), mode="r")
        try:
            self._index(size)
        except BaseException:
            self._container.close()
            raise

    def _index(self, size: int | None) -> None:
        if not self._container.streams.video:
            raise VideoError("container has no video stream", NOT_A_VIDEO)
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = 1  # as decord's num_threads=1: Ray runs clips in parallel
        self._size = size
        pts, key_pts = [], []
        for packet in self._container.demux(self._stream):
            if packet.pts is None:  # the empty packet that ends the stream
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
        self._pts = sorted(pts)  # frame i is the i-th packet in presentation order
        self._frame_of = {p: i for i, p in enumerate(self._pts)}
        self._keys = np.array(sorted(self._frame_of[p] for p in key_pts), dtype=np.int64)  # frame numbers
        self.num_frames = len(self._pts)
        rate = self._stream.average_rate or self._stream.base_rate
        self.fps = float(rate) if rate else 0.0

    def _keyframe_before(self, i: int) -> int:
        k = int(np.searchsorted(self._keys, i, side="right")) - 1
        return int(self._keys[k]) if k >= 0 else 0

    def _rgb(self, frame) -> np.ndarray:
        width, height = (self._size, self._size) if self._size else (frame.width, frame.height)
        return frame.reformat(
            width=width, height=height, format="rgb24", interpolation="BILINEAR"
        ).to_ndarray()  # (H, W, 3)

    def get_batch(self, indices: list[int]) -> np.ndarray:
        wanted = set(indices)
        got: dict[int, np.ndarray] = {}
        frames, last = None, -1  # the decoder's frame iterator; the number of the frame it gave last
        for i in sorted(wanted):
            key = self._keyframe_before(i)
            if frames is None or last < key - 1:  # a seek skips the frames between last and key
                self._container.seek(self._pts[key], stream=self._stream, backward=True, any_frame=False)
                frames = self._container.decode(self._stream)
            for frame in frames:
                last = self._frame_of.get(frame.pts, -1)
                if last in wanted and last not in got:
                    got[last] = self._rgb(frame)
                if last >= i:
                    break
            if i not in got:
                raise VideoError(f"frame {i} of {self.num_frames} did not decode (truncated?)", TRUNCATED)
        return np.stack([got[i] for i in indices])  # (T, H, W, 3)

    def frame(self, i: int) -> np.ndarray:
        return self.get_batch([i])[0]  # (H, W, 3)

    def close(self) -> None:
        self._container.close()


# decord where it is installed (faster: decoding and scaling in C++), PyAV elsewhere.
Reader = DecordReader if decord is not None else PyAVReader


def _reader(data: bytes, name: str, size: int | None = None) -> DecordReader | PyAVReader:
    if len(data) == 0:
        raise VideoError(f"{name}: empty (0 bytes)", EMPTY)
    if b"\x00" not in data[:4096] and not looks_like_container(data):
        # Video containers carry binary headers; text would also be echoed in
        # full by decord's C++ error log, so stop here.
        raise VideoError(f"{name}: not a video (no binary container header, {len(data)} bytes)", NOT_A_VIDEO)
    try:
        return Reader(data, size)
    except VideoError as err:
        raise VideoError(f"{name}: {err}", err.reason) from None
    except Exception as err:  # decord raises DECORDError or RuntimeError, PyAV av.error.FFmpegError
        reason = TRUNCATED if looks_like_container(data) else NOT_A_VIDEO
        raise VideoError(
            f"{name}: cannot open as a video ({reason}, {len(data)} bytes): {_first_line(err)}", reason
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1][:200] if text else type(err).__name__


def probe_video(data: bytes, name: str = "video") -> VideoInfo:
    """Frame count, fps and size from the container, checking that the last frame decodes.

    Decoding the last frame catches files whose index is intact but whose
    data was cut short; with a short GOP this costs at most ``gop`` frames.
    """
    vr = _reader(data, name)
    try:
        n = vr.num_frames
        if n == 0:
            raise VideoError(f"{name}: no frames", NO_FRAMES)
        try:
            last = vr.frame(n - 1)  # (H, W, C)
        except Exception as err:
            raise VideoError(
                f"{name}: frame {n - 1} of {n} does not decode (truncated?): {_first_line(err)}", TRUNCATED
            ) from None
        fps = vr.fps
    finally:
        vr.close()
    return VideoInfo(
        num_frames=n,
        fps=fps if np.isfinite(fps) and fps > 0 else 0.0,
        height=int(last.shape[0]),
        width=int(last.shape[1]),
    )


def decode_frames(data: bytes, indices: Sequence[int] | None = None, name: str = "video") -> np.ndarray:
    """Frames at ``indices`` (all frames when None) -> (T, H, W, 3) uint8."""
    return decode_frames_resized(data, indices, None, name)


def decode_frames_resized(
    data: bytes, indices: Sequence[int] | None, size: int | None, name: str = "video"
) -> np.ndarray:
    """Frames at ``indices`` (all when None) -> (T, size, size, 3) uint8, resized by the decoder
    (FFmpeg's bilinear scaler, in decord's C++ thread or PyAV's; no Python per pixel); source size when
    ``size`` is None."""
    vr = _reader(data, name, size)
    try:
        n = vr.num_frames
        if n == 0:
            raise VideoError(f"{name}: no frames", NO_FRAMES)
        idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise VideoError(f"{name}: indices must be a non-empty 1-D sequence, got shape {idx.shape}", UNREADABLE)
        if idx.min() < 0 or idx.max() >= n:
            raise VideoError(
                f"{name}: frame index {int(idx.max() if idx.max() >= n else idx.min())} out of range for {n} frames",
                UNREADABLE,
            )
        try:
            return vr.get_batch(idx.tolist())  # (T, H, W, 3)
        except Exception as err:
            raise VideoError(
                f"{name}: decoding {idx.size} frames failed (truncated?): {_first_line(err)}", TRUNCATED
            ) from None
    finally:
        vr.close()


def iter_frames_pyav(data: bytes, name: str = "video") -> tuple[float, Iterator[np.ndarray]]:
    """(fps, iterator of (H, W, 3) uint8 RGB frames) decoding every frame with PyAV.

    The iterator raises VideoError(TRUNCATED) when decoding stops early,
    either with an error or with fewer frames than the container declares.
    """
    import av  # PyAV only where clips are written or transcoded (or where decord has no wheel)

    if len(data) == 0:
        raise VideoError(f"{name}: empty (0 bytes)", EMPTY)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as err:
        reason = TRUNCATED if looks_like_container(data) else NOT_A_VIDEO
        raise VideoError(
            f"{name}: cannot open as a video ({reason}, {len(data)} bytes): {_first_line(err)}", reason
        ) from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: container has no video stream", NOT_A_VIDEO)
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    declared = int(stream.frames or 0)

    def frames() -> Iterator[np.ndarray]:
        count = 0
        try:
            for frame in container.decode(stream):
                count += 1
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as err:
            raise VideoError(
                f"{name}: decoding stopped after {count} of {declared or '?'} frames (truncated?): {_first_line(err)}",
                TRUNCATED,
            ) from None
        finally:
            container.close()
        if count == 0:
            raise VideoError(f"{name}: no frames", NO_FRAMES)
        if declared and count < declared:
            raise VideoError(f"{name}: only {count} of {declared} declared frames decode (truncated?)", TRUNCATED)

    return fps, frames()


def _as_rgb(frame: np.ndarray, name: str) -> np.ndarray:
    # (H, W) or (H, W, 1) grayscale -> (H, W, 3) by replication, so the
    # yuv420p round trip keeps grey grey.
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3):
        raise VideoError(f"{name}: frame shape {frame.shape} is not (H, W), (H, W, 1) or (H, W, 3)", UNREADABLE)
    if frame.dtype != np.uint8:
        raise VideoError(f"{name}: frames must be uint8, got {frame.dtype}", UNREADABLE)
    if frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    # yuv420p subsamples chroma 2x2, so H.264 needs even sizes: replicate the
    # last row / column rather than crop away image content.
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


class Mp4Writer:
    """Streams frames into an in-memory H.264 mp4 (yuv420p, GOP ``gop``, no B-frames)."""

    def __init__(self, fps: float, gop: int = 8, crf: int = 18, preset: str = "fast", name: str = "video"):
        if gop < 1:
            raise ValueError(f"gop must be >= 1, got {gop}")
        if not (fps > 0 and np.isfinite(fps)):
            raise ValueError(f"{name}: fps must be a positive number, got {fps}")
        self.name = name
        self.fps = float(fps)
        self.num_frames = 0
        self.height = self.width = 0
        import av

        self._av = av
        self._buf = io.BytesIO()
        self._out = av.open(self._buf, mode="w", format="mp4")
        self._stream = self._out.add_stream(
            "libx264",
            rate=Fraction(self.fps).limit_denominator(1001),
            options={
                "crf": str(crf),
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",
                "bf": "0",
                "preset": preset,
            },
        )
        self._stream.pix_fmt = "yuv420p"

    def write(self, frame: np.ndarray) -> None:
        rgb = _as_rgb(frame, self.name)  # (H, W, 3) uint8, even H and W
        if self.num_frames == 0:
            self.height, self.width = rgb.shape[:2]
            self._stream.height, self._stream.width = self.height, self.width
        elif rgb.shape[:2] != (self.height, self.width):
            raise VideoError(
                f"{self.name}: frame {self.num_frames} has size {rgb.shape[:2]}, "
                f"earlier frames {(self.height, self.width)}",
                UNREADABLE,
            )
        vf = self._av.VideoFrame.from_ndarray(rgb, format="rgb24")
        vf.pts = self.num_frames
        self._out.mux(self._stream.encode(vf))
        self.num_frames += 1

    def finish(self) -> bytes:
        if self.num_frames == 0:
            self._out.close()
            raise VideoError(f"{self.name}: no frames to encode", NO_FRAMES)
        self._out.mux(self._stream.encode(None))
        self._out.close()
        return self._buf.getvalue()

    def info(self) -> VideoInfo:
        return VideoInfo(self.num_frames, self.fps, self.height, self.width)


def encode_mp4(
    frames: np.ndarray | Sequence[np.ndarray], fps: float = 30.0, gop: int = 8, crf: int = 18, name: str = "video"
) -> bytes:
    """(T, H, W) or (T, H, W, 3) uint8 frames -> mp4 bytes (H.264, yuv420p, GOP ``gop``).

    Grayscale frames are replicated to 3 channels; odd sizes are padded by one
    edge row / column (yuv420p needs even sizes).
    """
    writer = Mp4Writer(fps=fps, gop=gop, crf=crf, name=name)
    for frame in frames:
        writer.write(np.asarray(frame))
    return writer.finish()


def transcode(data: bytes, gop: int = 8, crf: int = 18, name: str = "video") -> bytes:
    """Decode every frame of ``data`` (any container PyAV reads) and re-encode as short-GOP mp4."""
    return transcode_with_info(data, gop=gop, crf=crf, name=name)[0]


def transcode_with_info(
    data: bytes,
    gop: int = 8,
    crf: int = 18,
    name: str = "video",
    default_fps: float = 30.0,
    scan_region: ScanRegion | None = None,
) -> tuple[bytes, VideoInfo]:
    """``transcode`` that also returns the new clip's VideoInfo.

    Frames stream through one at a time, so memory does not grow with video
    length. Raises VideoError with the reject reason for empty, not-a-video,
    truncated or frameless input; ``default_fps`` stands in when the source
    declares no frame rate. ``scan_region`` (auto or crop): frames are cropped to
    it, the cut logged at INFO (``transcode_cropped`` returns it instead).
    """
    if scan_region is not None and scan_region.mode != "off":
        clip, info, note = transcode_cropped(data, scan_region, gop=gop, crf=crf, name=name, default_fps=default_fps)
        logger.info("%s: %s", name, note)
        return clip, info
    fps, frames = iter_frames_pyav(data, name)
    writer = Mp4Writer(fps=fps if fps > 0 else default_fps, gop=gop, crf=crf, name=name)
    for frame in frames:
        writer.write(frame)
    return writer.finish(), writer.info()


def transcode_cropped(
    data: bytes, scan_region: ScanRegion, gop: int = 8, crf: int = 18, name: str = "video", default_fps: float = 30.0
) -> tuple[bytes, VideoInfo, str]:
    """(clip, its VideoInfo, one-line note of the cut): ``transcode_with_info`` cropping every frame
    to ``scan_region`` (see clman.data.scan_region; ``off`` keeps frames whole).

    ``auto`` decodes the video twice, once for the per-pixel temporal std and once to
    encode, so memory stays at 16 bytes per pixel and channel instead of holding every
    frame. A region that cannot be found or does not fit the frame raises
    VideoError(NO_SCAN_REGION): keeping the whole frame would keep its burned-in text.
    """
    std = None
    if scan_region.mode == "auto":
        std = TemporalStd()
        first = None
        for i, frame in enumerate(iter_frames_pyav(data, name)[1]):
            first = frame.shape if first is None else first
            if frame.shape != first:
                raise VideoError(
                    f"{name}: frame {i} has size {frame.shape[:2]}, earlier frames {first[:2]}", UNREADABLE
                )
            std.add(frame)
    fps, frames = iter_frames_pyav(data, name)
    writer = Mp4Writer(fps=fps if fps > 0 else default_fps, gop=gop, crf=crf, name=name)
    box = note = None
    for frame in frames:
        if note is None:
            height, width = frame.shape[:2]
            try:
                box = region_box(scan_region, height, width, std)
            except ScanRegionError as err:
                raise VideoError(f"{name}: {err}", NO_SCAN_REGION) from None
            note = describe(box, height, width)
        if box is not None:
            x, y, w, h = box
            frame = frame[y : y + h, x : x + w]
        writer.write(frame)
    return writer.finish(), writer.info(), note
