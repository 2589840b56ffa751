"""Ingest: source videos + labels -> short-GOP clips, manifest.parquet and rejects.parquet.

Sources (each becomes a list of ``SourceItem``):
- a folder or S3 prefix of video files listed in a labels.csv
  (``video``, ``label`` in benign|malignant|0|1 or empty, optional ``patient_id`` and ``split``);
- the BUV layout ``rawframes/{benign,malignant,unlabeled}/<video-id>/<frame>.png``;
- multi-frame ultrasound DICOM listed in a labels.csv.

Unlabelled videos (contrastive pretraining only: a hospital has far more sweeps than
diagnoses) come from a labels.csv row with an empty ``label`` (or ``unlabeled``), from
``unlabeled=True`` (``--unlabeled``: every listed video, and labels.csv needs no ``label``
column), or from a BUV ``rawframes/unlabeled/`` folder. They go to split ``unlabeled`` with
label -1 and fold -1 (``clman.data.manifest``); a split column may leave them empty or say
``unlabeled``, any other split rejects the row (``unlabeled_split``). Any other label text
(``maybe``) is still ``unknown_label``. The splits and folds of the labelled patients are drawn
among the labelled patients alone, so adding unlabelled videos never moves a labelled one.
A patient's videos are all labelled or all unlabelled (``mixed_patient``): an unlabelled video
of a patient who has labelled ones is rejected, because in the unlabelled pool it would be
pretrained on whichever split (test included) its patient's labelled videos are in; a patient
already in the manifest in ``out`` keeps its kind, so a labelled video of a patient the
manifest holds as unlabelled is rejected too, until the patient's unlabelled videos are listed
again with their labels (the new rows replace the old). The patient is known before any
decoding (labels.csv ``patient_id``, the DICOM header's PatientID, or the video itself), so a
rejected video is never transcoded or uploaded.

Patient data. File names and patient ids of hospital exports carry names and
record numbers (``DOE_JANE_MRN0042917.mp4``), so by default every ``video_id``
and ``patient_id`` is a keyed pseudonym, HMAC-SHA256 under a secret salt
(``--salt`` / ``CLMAN_PATIENT_SALT``), and nothing stored names a source file:
clip keys are ``clips/<pseudonym>.mp4``, the manifest's ``source`` column holds
the kind of input (labels, buv, dicom), rejects and log lines name the
labels.csv line (or the BUV pseudonym) and never a path. The salt is only held
in memory. ``--keep-ids`` keeps the labels' own ids for data that is already
pseudonymous; ``id_map`` writes the pseudonym <-> source mapping to the one
place the user names. No identifying DICOM attribute is copied anywhere, and
DICOM pixels are cropped to the scan region by default (burned-in text).

Work is done in two passes so the result is deterministic whatever the
thread scheduling: pass 1 reads and hashes every item (missing, empty,
duplicate and conflicting items are settled here, the earlier item in input
order winning); pass 2 decodes each remaining item once (validating it, checking
the size limits and reading its frame count, fps and size), transcodes it to
short-GOP H.264 and uploads ``<out>/clips/<video_id>.mp4``. An item whose clip
exists and whose manifest row has the same sha256 is not decoded or uploaded
again. An ``out`` that already holds a manifest is merged into: earlier rows not
in this input are kept, and patients already there keep their split and fold.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from clman import progress, storage
from clman.data import manifest as M
from clman.data.video import (
    EMPTY,
    NO_FRAMES,
    NOT_A_VIDEO,
    UNREADABLE,
    Mp4Writer,
    VideoError,
    VideoInfo,
    probe_video,
    transcode_cropped,
    transcode_with_info,
)

logger = logging.getLogger(__name__)

SALT_ENV = "CLMAN_PATIENT_SALT"
LABELS = {"benign": 0, "malignant": 1, "0": 0, "1": 1}
# No label: an unlabelled video (pretraining only). The BUV folder is "unlabeled".
UNLABELED_TEXTS = ("", "unlabeled", "unlabelled")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")

# Reject reasons beyond the decoding ones in clman.data.video.
MISSING_FILE, UNKNOWN_LABEL, UNKNOWN_SPLIT, DUPLICATE, DUPLICATE_ID = (
    "missing_file",
    "unknown_label",
    "unknown_split",
    "duplicate",
    "duplicate_id",
)
CONFLICT, OUTSIDE, OVER_LIMIT, NO_SCAN_REGION = ("conflicting_rows", "outside_videos", "over_limit", "no_scan_region")
UNLABELED_SPLIT, MIXED_PATIENT = "unlabeled_split", "mixed_patient"

# video: the labels.csv line (or BUV pseudonym); video_id: the pseudonym, where one was made.
REJECTS_SCHEMA = pa.schema(
    [("video", pa.string()), ("video_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)
ID_MAP_COLUMNS = ("video_id", "patient_id", "source_video", "source_patient_id")

# DICOM attributes that identify a patient (or lead back to one). None is
# copied to any output; their values are also scrubbed from error details.
IDENTIFYING_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MilitaryRank",
    "EthnicGroup",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "StationName",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "DeviceSerialNumber",
    "InstitutionalDepartmentName",
)


class IngestError(ValueError):
    """Input that cannot be ingested at all (bad labels.csv, missing salt, bad layout)."""


@dataclass(frozen=True)
class Limits:
    """What one source may hold before it is rejected (decompression bombs, runaway exports).

    max_bytes: the file (or all frame images of a BUV video); max_frames: decoded
    frames; max_side: the longer side of a frame in pixels (checked from the header,
    before any pixel is decoded).
    """

    max_bytes: int = 4 * 1024**3
    max_frames: int = 20_000
    max_side: int = 4096

    def check(self, *, frames: int | None = None, width: int | None = None, height: int | None = None) -> None:
        if frames is not None and frames > self.max_frames:
            raise _Reject(OVER_LIMIT, f"{frames} frames, over the limit of {self.max_frames} (--max-frames)")
        if width is not None and height is not None and max(width, height) > self.max_side:
            raise _Reject(
                OVER_LIMIT, f"{width}x{height} pixels, over the limit of {self.max_side} per side (--max-side)"
            )


@dataclass(frozen=True)
class SourceItem:
    """One video to ingest.

    name: how rejects and log lines call it — the labels.csv line, or for BUV the
    folder (``--keep-ids``) or its pseudonym; never a file name or path otherwise.
    entry: the source's own identifier (the labels.csv ``video`` value, the BUV
    ``<label>/<folder>``): the video pseudonym is keyed on it; stored only in an id map.
    kind: "video" (a file any FFmpeg demuxer reads), "frames" (an image per
    frame, in order) or "dicom".
    """

    name: str
    kind: str
    uris: tuple[str, ...]  # the file, or the frame images in order
    entry: str = ""
    label: object = None  # raw label text; parsed in ingest ("" = unlabelled)
    patient_id: str | None = None
    split: str | None = None
    line: int | None = None  # labels.csv line (1-based, header = line 1)
    outside: bool = False  # the labels row points outside the videos folder

    @property
    def source(self) -> str:
        """The manifest's ``source``: the kind of input, never a path."""
        return {"video": "labels", "frames": "buv"}.get(self.kind, self.kind)


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    new: int = 0  # transcoded and uploaded this run
    reused: int = 0  # already in <out>, skipped
    kept: int = 0  # earlier rows of the manifest not in this input, kept as they were
    counts: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return len(self.manifest) > 0


@dataclass
class _Reject(Exception):
    reason: str
    detail: str


# -- pseudonyms -----------------------------------------------------------------
class Pseudonyms:
    """video_id / patient_id for an item: HMAC-SHA256 pseudonyms under the salt, or the source's own.

    The salt keys the hash, so an id cannot be checked against a guessed name without
    it; the same salt gives the same ids on every run (keep it secret and stable).
    """

    def __init__(self, salt: str | None, keep_ids: bool = False):
        if not salt and not keep_ids:
            raise IngestError(
                f"ingest pseudonymises patient and video ids: pass --salt or set {SALT_ENV} "
                "(a secret kept the same across runs), or --keep-ids when the labels "
                "already hold pseudonyms"
            )
        self._key = salt.encode() if salt else None
        self.keep_ids = keep_ids

    def _hmac(self, kind: str, text: str) -> str:
        return hmac.new(self._key, f"{kind}\x00{text}".encode(), hashlib.sha256).hexdigest()[:16]

    def video(self, item: "SourceItem") -> str:
        if not self.keep_ids:
            return "v" + self._hmac("video", item.entry)
        # BUV: the folder is the id (its label is the parent folder)
        return safe_id(item.entry.split("/", 1)[1] if item.kind == "frames" else item.entry)

    def patient(self, patient: str) -> str:
        return patient if self.keep_ids else "p" + self._hmac("patient", patient)

    def dicom_patient(self, patient: str) -> str | None:
        """A DICOM PatientID is always hashed (never kept): None without a salt."""
        return "p" + self._hmac("patient", patient) if self._key else None


def resolve_salt(salt: str | None) -> str | None:
    return salt or os.environ.get(SALT_ENV) or None


# -- sources ------------------------------------------------------------------
def safe_id(text: str) -> str:
    """A video id usable as an S3 key part: path without extension, other characters -> '_'.

    Letters of any script are kept (``张三.mp4`` -> ``张三``), so two unicode names stay distinct.
    """
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", text.strip().strip("/"))
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "video"


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def read_labels(labels_uri: str, unlabeled: bool = False) -> pd.DataFrame:
    """labels.csv as strings: ``video``, ``label`` (+ optional ``patient_id``, ``split``); UTF-8.

    unlabeled: every listed video is unlabelled; the ``label`` column may be left out (it reads
    as empty), and a label in it is an IngestError (say which you mean: labelled or not).
    """
    try:
        data = storage.read_bytes(labels_uri)
    except storage.StorageError as err:
        raise IngestError(f"labels file: {err}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise IngestError(
            f"{labels_uri}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x}); save the "
            "file as UTF-8 (e.g. 'CSV UTF-8' in Excel)"
        ) from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise IngestError(f"{labels_uri}: not a readable CSV: {' '.join(str(err).split())}") from None
    df.columns = [c.strip() for c in df.columns]
    if unlabeled and "label" not in df.columns:
        df["label"] = ""
    missing = [c for c in ("video", "label") if c not in df.columns]
    if missing:
        raise IngestError(
            f"{labels_uri}: missing column(s) {missing}; expected video,label"
            "[,patient_id][,split] (or video[,patient_id] with --unlabeled)"
        )
    for col in df.columns:
        df[col] = df[col].str.strip()
    if unlabeled:
        labelled = [i for i, v in enumerate(df["label"]) if v.lower() not in UNLABELED_TEXTS]
        if labelled:
            raise IngestError(
                f"{labels_uri}: line {labelled[0] + 2} has label {df['label'].iloc[labelled[0]]!r} "
                "but --unlabeled says every video is unlabelled; drop --unlabeled (an empty label "
                "marks an unlabelled row) or empty the label column"
            )
    return df


def _relative(entry: str) -> tuple[str, bool]:
    """(normalised entry, whether it points outside the folder: absolute, a URI, or '..')."""
    entry = entry.replace("\\", "/")
    while entry.startswith("./"):
        entry = entry[2:]
    outside = (
        entry.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", entry) is not None or ".." in entry.split("/")
    )
    return entry, outside


def _labelled(folder: str, labels_uri: str, kind: str, unlabeled: bool = False) -> list[SourceItem]:
    df = read_labels(labels_uri, unlabeled)
    items = []
    for i, row in enumerate(df.itertuples(index=False)):
        entry, outside = _relative(row.video)
        line = i + 2  # 1-based, after the header line
        items.append(
            SourceItem(
                name=f"labels.csv line {line}",
                kind=kind,
                uris=() if outside else (storage.join(folder, entry),),
                entry=entry,
                label=row.label,
                patient_id=getattr(row, "patient_id", "") or None,
                split=getattr(row, "split", None) if "split" in df.columns else None,
                line=line,
                outside=outside,
            )
        )
    return items


def labeled_items(videos: str, labels_uri: str, unlabeled: bool = False) -> list[SourceItem]:
    """Video files under ``videos`` (folder or s3:// prefix) listed in labels.csv.

    unlabeled: every listed video is unlabelled (see :func:`read_labels`)."""
    return _labelled(videos, labels_uri, "video", unlabeled)


def dicom_items(folder: str, labels_uri: str, unlabeled: bool = False) -> list[SourceItem]:
    """Multi-frame DICOM files under ``folder`` listed in labels.csv (``video`` = file path)."""
    return _labelled(folder, labels_uri, "dicom", unlabeled)


def buv_items(root: str) -> list[SourceItem]:
    """BUV layout: ``<root>/rawframes/{benign,malignant,unlabeled}/<video-id>/<frame>.png`` (natural order).

    The folder ``unlabeled`` holds videos without a label (split ``unlabeled``)."""
    base = storage.join(root, "rawframes")
    frames: dict[tuple[str, str], list[str]] = {}
    for uri in storage.list_uris(base):
        rel = uri[len(base) :].lstrip("/").replace(os.sep, "/")
        parts = rel.split("/")
        if len(parts) != 3 or not parts[2].lower().endswith(FRAME_SUFFIXES):
            continue
        frames.setdefault((parts[0], parts[1]), []).append(uri)
    if not frames:
        raise IngestError(
            f"{base}: no frames found; expected rawframes/{{benign,malignant,unlabeled}}/<video-id>/<frame>.png"
        )
    items = []
    for (label, vid), uris in sorted(frames.items()):
        uris.sort(key=lambda u: _natural_key(u.rsplit("/", 1)[-1]))
        # name: set by ingest once the pseudonym is known (the folder name may be a patient's).
        items.append(SourceItem(name="", kind="frames", uris=tuple(uris), entry=f"{label}/{vid}", label=label))
    return items


def hash_patient(patient: str, salt: str) -> str:
    """The patient pseudonym of ``patient`` under ``salt`` (what ingest stores)."""
    return Pseudonyms(salt).patient(patient)


# -- decoding each kind ---------------------------------------------------------
def _read_all(item: SourceItem, limits: Limits) -> list[bytes]:
    """The item's bytes (one blob per uri); _Reject for missing, unreadable or over --max-bytes."""
    blobs, total = [], 0
    for i, uri in enumerate(item.uris):
        try:
            blobs.append(storage.read_bytes(uri))
        except storage.StorageNotFoundError:
            raise _Reject(MISSING_FILE, _where(item, uri, "no such file", i)) from None
        except storage.StorageError as err:
            raise _Reject(UNREADABLE, _where(item, uri, str(err), i)) from None
        total += len(blobs[-1])
        if total > limits.max_bytes:
            raise _Reject(OVER_LIMIT, f"{total} bytes or more, over the limit of {limits.max_bytes} (--max-bytes)")
    return blobs


def _where(item: SourceItem, uri: str, what: str, index: int = 0) -> str:
    """A reject detail that names the file by its place in the item, never by its path."""
    place = f"frame {index + 1}" if item.kind == "frames" else "<file>"
    return what.replace(uri, place) if uri in what else f"{place}: {what}"


def _scan_crop(item: SourceItem, frames: np.ndarray, region) -> np.ndarray:
    """``frames`` cropped to the scan region (None or mode off: unchanged), the cut logged."""
    if region is None or region.mode == "off":
        return frames
    from clman.data.scan_region import ScanRegionError, apply_scan_region

    try:
        cropped, _, note = apply_scan_region(frames, region)
    except ScanRegionError as err:
        raise _Reject(NO_SCAN_REGION, f"{err}; pass --scan-region crop=x,y,w,h or off") from None
    logger.info("%s: %s", item.name, note)
    return cropped


def _encode(
    item: SourceItem, frames: Iterable[np.ndarray] | np.ndarray, fps: float, gop: int, crf: int, region
) -> tuple[bytes, VideoInfo]:
    """Frames -> short-GOP clip, cropped to the scan region first when one is asked for."""
    if region is not None and region.mode != "off":
        frames = _scan_crop(item, np.stack(list(frames)), region)  # the region needs every frame
    writer = Mp4Writer(fps=fps, gop=gop, crf=crf, name=item.name)
    for frame in frames:
        writer.write(frame)
    return writer.finish(), writer.info()


def _video_header(blob: bytes) -> tuple[int, int, int]:
    """(declared frames, width, height) from the container header, 0 where unknown; nothing decoded."""
    import av

    try:
        with av.open(io.BytesIO(blob), mode="r") as container:
            if not container.streams.video:
                return 0, 0, 0
            stream = container.streams.video[0]
            return int(stream.frames or 0), int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    except Exception:  # not a video: transcoding names the reason
        return 0, 0, 0


def _video_clip(item: SourceItem, blob: bytes, gop: int, crf: int, limits: Limits, region) -> tuple[bytes, VideoInfo]:
    declared, width, height = _video_header(blob)
    limits.check(frames=declared or None, width=width or None, height=height or None)
    try:
        if region is None or region.mode == "off":
            clip, info = transcode_with_info(blob, gop=gop, crf=crf, name=item.name)
        else:  # two decoding passes (the region, then the clip): memory does not grow with length
            clip, info, note = transcode_cropped(blob, region, gop=gop, crf=crf, name=item.name)
            logger.info("%s: %s", item.name, note)
    except VideoError as err:
        raise _Reject(err.reason, str(err)) from None
    limits.check(frames=info.num_frames)
    return clip, info


def _frames_clip(
    item: SourceItem, blobs: list[bytes], fps: float, gop: int, crf: int, limits: Limits, region
) -> tuple[bytes, VideoInfo]:
    from PIL import Image, UnidentifiedImageError

    limits.check(frames=len(blobs))
    arrays = []
    for i, blob in enumerate(blobs):
        if not blob:
            raise _Reject(EMPTY, f"frame {i + 1}: frame image is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                # The header's size, before a pixel is decoded: a decompression bomb stops here.
                try:
                    limits.check(width=im.size[0], height=im.size[1])
                except _Reject as rej:
                    raise _Reject(rej.reason, f"frame {i + 1}: {rej.detail}") from None
                gray = im.mode in ("1", "L", "I", "I;16", "F", "LA")
                arrays.append(np.asarray(im.convert("L" if gray else "RGB")))  # (H, W) or (H, W, 3)
        except Image.DecompressionBombError as err:  # PIL's own check, at open, beyond 2 x MAX_IMAGE_PIXELS
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            raise _Reject(
                OVER_LIMIT,
                f"frame {i + 1}: {pixels.group(1) if pixels else 'too many'} pixels, a "
                f"decompression bomb (over PIL's limit of {2 * Image.MAX_IMAGE_PIXELS})",
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise _Reject(UNREADABLE, f"frame {i + 1}: not a readable image ({type(err).__name__})") from None
    if len({a.shape for a in arrays}) > 1:
        raise _Reject(UNREADABLE, f"frames differ in size: {sorted({a.shape for a in arrays})}")
    try:
        return _encode(
            item, np.stack(arrays) if region is not None and region.mode != "off" else arrays, fps, gop, crf, region
        )
    except VideoError as err:
        raise _Reject(err.reason, str(err)) from None


def _dicom_uint8(arr: np.ndarray, ds) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    bits = int(getattr(ds, "BitsStored", 8 * arr.dtype.itemsize) or 8)
    arr = arr.astype(np.float32)
    if getattr(ds, "PixelRepresentation", 0) == 1:  # signed
        arr = arr + 2 ** (bits - 1)
    return np.clip(arr / (2**bits - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def dicom_fps(ds, default: float) -> float:
    """Frame rate from FrameTime (ms), CineRate, RecommendedDisplayFrameRate or FrameTimeVector."""
    for read in (
        lambda: 1000.0 / float(ds.FrameTime),
        lambda: float(ds.CineRate),
        lambda: float(ds.RecommendedDisplayFrameRate),
        lambda: 1000.0 / float(np.mean([float(v) for v in ds.FrameTimeVector[1:]])),
    ):
        try:
            fps = read()
        except (AttributeError, ValueError, TypeError, ZeroDivisionError, IndexError):
            continue
        if np.isfinite(fps) and 0 < fps <= 1000:
            return fps
    return default


def _scrub(text: str, ds) -> str:
    """``text`` with any identifying attribute value of ``ds`` removed."""
    for tag in IDENTIFYING_TAGS:
        value = str(getattr(ds, tag, "") or "")
        if len(value) >= 2:
            text = text.replace(value, "<redacted>")
            for part in re.split(r"[\^ ]+", value):
                if len(part) >= 3:
                    text = text.replace(part, "<redacted>")
    return text


def read_dicom(data: bytes, name: str = "dicom", limits: Limits | None = None):
    """(dataset, frames (T, H, W) or (T, H, W, 3) uint8) of a multi-frame DICOM.

    Raises VideoError with a reject reason; messages never quote an
    identifying attribute value. ``limits``: frames and size are checked from the
    header before the pixel data is decoded (_Reject over_limit).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not data:
        raise VideoError(f"{name}: empty (0 bytes)", EMPTY)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as err:
        # The message of a parse error may quote an element value: give the type only.
        raise VideoError(f"{name}: not a readable DICOM file ({type(err).__name__})", NOT_A_VIDEO) from None
    if "PixelData" not in ds:
        raise VideoError(f"{name}: DICOM has no pixel data", NO_FRAMES)
    if limits is not None:

        def number(tag):
            try:
                return int(getattr(ds, tag, 0) or 0) or None
            except (TypeError, ValueError):
                return None

        limits.check(frames=number("NumberOfFrames"), width=number("Columns"), height=number("Rows"))
    try:
        arr = ds.pixel_array  # pydicom 3 converts YBR to RGB
        if str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
    except Exception as err:  # decoders raise many types (missing plugin, corrupt stream)
        raise VideoError(
            _scrub(
                f"{name}: pixel data does not decode ({type(err).__name__}: {' '.join(str(err).split())[:200]})", ds
            ),
            UNREADABLE,
        ) from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    color = (
        int(getattr(ds, "SamplesPerPixel", 1) or 1) == 3
        or str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR"
    )
    if frames < 2 or arr.ndim != (4 if color else 3):
        raise VideoError(
            f"{name}: single-frame DICOM image (pixel data {arr.shape}), not a multi-frame cine loop", NOT_A_VIDEO
        )
    arr = _dicom_uint8(arr, ds)  # (T, H, W) or (T, H, W, 3)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = 255 - arr  # MONOCHROME1: high values are dark
    return ds, arr


def dicom_frames(data: bytes, name: str = "dicom") -> np.ndarray:
    """All frames of a multi-frame DICOM as (T, H, W, 3) uint8 (grayscale replicated)."""
    arr = read_dicom(data, name)[1]
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 3 else arr


def _dicom_clip(
    item: SourceItem, blob: bytes, default_fps: float, gop: int, crf: int, limits: Limits, region
) -> tuple[bytes, VideoInfo, str | None]:
    """(clip, info, PatientID or None) from a multi-frame DICOM, cropped to ``region``."""
    try:
        ds, arr = read_dicom(blob, item.name, limits)
        clip, info = _encode(item, arr, dicom_fps(ds, default_fps), gop, crf, region)
    except VideoError as err:
        raise _Reject(err.reason, str(err)) from None
    if (region is None or region.mode == "off") and str(getattr(ds, "BurnedInAnnotation", "")).upper() == "YES":
        logger.warning(
            "%s: BurnedInAnnotation is YES and --scan-region is off: the pixels may show identifying text", item.name
        )
    patient = str(getattr(ds, "PatientID", "") or "").strip() or None
    return clip, info, patient


# -- the two passes ---------------------------------------------------------------
@dataclass
class _Fingerprint:
    index: int
    item: SourceItem
    sha256: str | None = None
    video_id: str | None = None
    reject: _Reject | None = None
    dicom_patient: str | None = None  # the header's PatientID (memory only; stored only hashed)
    patient: str | None = None  # the manifest's patient_id, set by ingest after pass 1


def _fingerprint(index: int, item: SourceItem, video_id: str, limits: Limits) -> _Fingerprint:
    fp = _Fingerprint(index, item, video_id=video_id)
    try:
        blobs = _read_all(item, limits)
    except _Reject as rej:
        fp.reject = rej
        return fp
    if item.kind != "frames" and not blobs[0]:
        fp.reject = _Reject(EMPTY, "<file>: empty (0 bytes)")
        return fp
    h = hashlib.sha256()
    for blob in blobs:
        if item.kind == "frames":  # frame boundaries matter
            h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    fp.sha256 = h.hexdigest()
    if item.kind == "dicom" and not item.patient_id:
        fp.dicom_patient = _dicom_patient_id(blobs[0])
    return fp


def _dicom_patient_id(blob: bytes) -> str | None:
    """The PatientID of a DICOM header (no pixel decoded); None when absent or unreadable
    (an unreadable file is rejected in pass 2, naming why)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # any parse failure: pass 2 decodes it and gives the reason
        return None
    return str(getattr(ds, "PatientID", "") or "").strip() or None


def _parse_label(raw) -> int | None:
    """0 / 1, ``M.UNLABELED_LABEL`` for an empty (or ``unlabeled``) label, None for anything else."""
    if raw is None:
        return None
    text = str(raw).strip().lower()
    return M.UNLABELED_LABEL if text in UNLABELED_TEXTS else LABELS.get(text)


def _progress(it: Iterable, total: int, desc: str) -> Iterable:
    """A bar on a terminal; in a log, a line per 10% of the videos (``clman.progress``)."""
    return progress.track(it, total, desc, unit="video")


def _parallel(fn: Callable, args: Sequence[tuple], workers: int, desc: str) -> list:
    """fn(*a) for a in args, in order, on ``workers`` threads (PyAV and boto3 release the GIL)."""
    if workers <= 1:
        return [fn(*a) for a in _progress(args, len(args), desc)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(_progress(pool.map(lambda a: fn(*a), args), len(args), desc))


def _row_key(item: SourceItem) -> tuple:
    return (_parse_label(item.label), item.patient_id or "", item.split or "")


def _settle_rows(items: Sequence[SourceItem], reject: Callable) -> list[SourceItem]:
    """Items that may be read: labels, splits, paths and repeated labels.csv rows settled.

    Two rows naming one file agree (the later is a duplicate) or conflict (both rejected,
    each naming the other's line).
    """
    by_entry: dict[str, list[SourceItem]] = {}
    for item in items:
        if item.line is not None:
            by_entry.setdefault(item.entry, []).append(item)
    out = []
    for item in items:
        rows = by_entry.get(item.entry, [item]) if item.line is not None else [item]
        others = [r for r in rows if r is not item]
        if item.outside:
            reject(
                item,
                OUTSIDE,
                "the file is outside the videos folder (an absolute path, a URI or '..'); "
                "list files relative to --videos / --dicom",
            )
        elif others and any(_row_key(r) != _row_key(item) for r in others):
            reject(
                item,
                CONFLICT,
                "the same file as "
                + ", ".join(f"line {r.line}" for r in others)
                + " with another label, patient_id or split",
            )
        elif others and rows[0] is not item:
            reject(item, DUPLICATE, f"the same row as line {rows[0].line}")
        elif (label := _parse_label(item.label)) is None:
            reject(
                item,
                UNKNOWN_LABEL,
                f"label {item.label!r} is not one of benign, malignant, 0, 1, or empty (unlabelled)",
            )
        elif label == M.UNLABELED_LABEL:
            if item.split in (None, "", M.UNLABELED):
                out.append(item)
            else:
                reject(
                    item,
                    UNLABELED_SPLIT,
                    f"no label but split {item.split!r}; unlabelled videos go to split "
                    f"{M.UNLABELED!r} (leave the split empty), or give the label",
                )
        elif item.split == M.UNLABELED:
            reject(
                item,
                UNLABELED_SPLIT,
                f"label {item.label!r} but split {M.UNLABELED!r}, which is for videos without a label",
            )
        elif item.split is not None and item.split not in M.LABELED_SPLITS:
            reject(item, UNKNOWN_SPLIT, f"split {item.split!r} is not one of {list(M.LABELED_SPLITS)}")
        else:
            out.append(item)
    return out


def _mixed_patients(prints: Sequence[_Fingerprint], previous: pd.DataFrame) -> dict[int, str]:
    """{position in ``prints``: detail} of the videos to reject because their patient is of the other kind.

    A patient's videos are all labelled or all unlabelled. A patient with rows in ``previous``
    that this input does not replace keeps its kind (as it keeps its split); otherwise the
    patient is labelled when any of its videos here is, and its unlabelled ones are rejected.
    """
    replaced = {fp.video_id for fp in prints}
    kept = previous[~previous["video_id"].isin(replaced)]
    kept_kind = kept.groupby("patient_id")["split"].agg(lambda s: (s == M.UNLABELED).all())
    kept_count = kept.groupby("patient_id").size()
    labelled: dict[str, list[str]] = {}
    for fp in prints:
        if _parse_label(fp.item.label) != M.UNLABELED_LABEL:
            labelled.setdefault(fp.patient, []).append(fp.item.name)
    out = {}
    for i, fp in enumerate(prints):
        unlabeled = _parse_label(fp.item.label) == M.UNLABELED_LABEL
        if fp.patient in kept_kind.index:
            if bool(kept_kind[fp.patient]) != unlabeled:
                n, kind = int(kept_count[fp.patient]), "unlabelled" if kept_kind[fp.patient] else "labelled"
                out[i] = (
                    f"its patient has {n} {kind} video(s) in the manifest in --out; a patient's videos are all "
                    "labelled or all unlabelled"
                    + (
                        " (list those again with their labels to label the patient)"
                        if not unlabeled
                        else ": an unlabelled one would be pretrained on beside its patient's labelled videos"
                    )
                )
        elif unlabeled and fp.patient in labelled:
            out[i] = (
                f"its patient also has labelled videos ({', '.join(labelled[fp.patient][:3])}); a patient's "
                "videos are all labelled or all unlabelled: give it the label, or leave it out"
            )
    return out


def _assign(
    manifest: pd.DataFrame,
    previous: pd.DataFrame,
    given_split: bool,
    ratios: Sequence[float] | None,
    folds: int,
    seed: int,
) -> pd.DataFrame:
    """Splits and folds: as given in labels.csv; else labelled patients already in ``previous``
    keep theirs and new labelled patients are split (stratified, seeded) among themselves.
    Unlabelled videos: split ``unlabeled``, fold -1, whatever the rest."""
    manifest = manifest.copy()
    unlabeled = manifest["label"] == M.UNLABELED_LABEL
    manifest.loc[unlabeled, "split"], manifest.loc[unlabeled, "fold"] = M.UNLABELED, -1
    if given_split:
        return manifest
    previous = M.labeled(previous)
    known = previous.groupby("patient_id")[["split", "fold"]].first()
    if len(previous) and (~unlabeled).any():  # unlabelled videos alone need no --folds / --split
        prev_folds = int(previous["fold"].max()) + 1 if (previous["fold"] >= 0).any() else 0
        if prev_folds != folds:
            had = f"--folds {prev_folds}" if prev_folds else "a train/val/test split"
            raise IngestError(
                f"the manifest in --out was made with {had}; ingest into it the same way, or into another --out"
            )
    new = manifest[~unlabeled & ~manifest["patient_id"].isin(known.index)]
    if len(new):
        placed = M.assign_splits(new, ratios=ratios or M.DEFAULT_RATIOS, folds=folds, seed=seed, strict=previous.empty)
        known = pd.concat([known, placed.groupby("patient_id")[["split", "fold"]].first()])
    if (~unlabeled).any():
        patients = manifest.loc[~unlabeled, "patient_id"]
        manifest.loc[~unlabeled, "split"] = patients.map(known["split"])
        manifest.loc[~unlabeled, "fold"] = patients.map(known["fold"]).astype("int8")
    manifest["fold"] = manifest["fold"].astype("int8")
    return manifest


def ingest(
    items: Sequence[SourceItem],
    out: str,
    *,
    ratios: Sequence[float] | None = None,
    folds: int = 0,
    seed: int = 0,
    salt: str | None = None,
    keep_ids: bool = False,
    id_map: str | None = None,
    scan_region=None,
    limits: Limits = Limits(),
    workers: int = 4,
    gop: int = 8,
    crf: int = 18,
    fps: float = 30.0,
) -> IngestResult:
    """Ingest ``items`` into ``out``; writes manifest.parquet and rejects.parquet there.

    ratios / folds / seed: patient-level split of the patients new to ``out`` (see
    manifest.assign_splits); when the items carry a ``split`` (labels.csv column) it is
    used as given and ratios / folds must be None / 0. salt (default $CLMAN_PATIENT_SALT)
    keys the pseudonyms; keep_ids keeps the labels' ids instead. id_map: where to write
    the pseudonym <-> source mapping (nowhere by default). scan_region: a
    ``clman.data.scan_region.ScanRegion``; None = ``auto`` for DICOM, off otherwise.
    fps: frame rate for frame folders (and DICOM without timing). Raises IngestError /
    ManifestError for input that cannot be ingested at all; bad items go to rejects.
    """
    given_split = any(it.split is not None for it in items)
    if given_split and (ratios is not None or folds):
        raise IngestError("labels.csv has a split column: drop --split/--folds, or drop the column")
    names = Pseudonyms(resolve_salt(salt), keep_ids)
    if keep_ids and names.dicom_patient("x") is None and any(it.kind == "dicom" for it in items):
        logger.warning(
            "--keep-ids without a salt: DICOM PatientIDs are not used (never copied); each "
            "file is its own patient unless labels.csv has patient_id"
        )
    if scan_region is None and any(it.kind == "dicom" for it in items):
        from clman.data.scan_region import parse_scan_region

        dicom_region = parse_scan_region("auto")  # burned-in text: on by default for DICOM
    else:
        dicom_region = scan_region
    items = [replace(it, name=f"BUV {it.label} video {names.video(it)}") if not it.name else it for it in items]
    manifest_uri = storage.join(out, "manifest.parquet")
    rejects_uri = storage.join(out, "rejects.parquet")
    previous = M.read_manifest(manifest_uri) if storage.exists(manifest_uri) else M.empty_manifest()
    prev_rows = {r["video_id"]: r for r in previous.to_dict("records")}

    rejects: list[dict] = []

    def reject(item: SourceItem, reason: str, detail: str, video_id: str = "") -> None:
        logger.warning("reject %s: %s: %s", item.name, reason, detail)
        rejects.append({"video": item.name, "video_id": video_id, "reason": reason, "detail": detail})

    # Pass 1: rows, existence, hashes, duplicates (in input order).
    todo = [(i, item, names.video(item), limits) for i, item in enumerate(_settle_rows(items, reject))]
    prints = _parallel(_fingerprint, todo, workers, "hashing")
    seen_sha: dict[str, str] = {}
    seen_id: dict[str, str] = {}
    keep: list[_Fingerprint] = []
    for fp in prints:
        if fp.reject is not None:
            reject(fp.item, fp.reject.reason, fp.reject.detail, fp.video_id)
        elif fp.sha256 in seen_sha:
            reject(
                fp.item, DUPLICATE, f"same content (sha256 {fp.sha256[:12]}...) as {seen_sha[fp.sha256]}", fp.video_id
            )
        elif fp.video_id in seen_id:
            reject(
                fp.item, DUPLICATE_ID, f"video id {fp.video_id!r} already used by {seen_id[fp.video_id]}", fp.video_id
            )
        else:
            seen_sha[fp.sha256] = fp.item.name
            seen_id[fp.video_id] = fp.item.name
            keep.append(fp)

    def patient_of(item: SourceItem, video_id: str, dicom_patient: str | None = None) -> str:
        if item.patient_id:
            return names.patient(item.patient_id)
        if dicom_patient:
            return names.dicom_patient(dicom_patient) or video_id
        return video_id

    # Labelled and unlabelled videos of one patient: settled before anything is transcoded.
    for fp in keep:
        fp.patient = patient_of(fp.item, fp.video_id, fp.dicom_patient)
    mixed = _mixed_patients(keep, previous)
    for i, detail in mixed.items():
        reject(keep[i].item, MIXED_PATIENT, detail, keep[i].video_id)
    keep = [fp for i, fp in enumerate(keep) if i not in mixed]

    # Pass 2: decode, transcode, upload (skipping what is already in out).
    def process(fp: _Fingerprint) -> dict | _Reject:
        item, clip_uri = fp.item, storage.join(out, "clips", f"{fp.video_id}.mp4")
        prev = prev_rows.get(fp.video_id)
        label = _parse_label(item.label)
        row = {
            "video_id": fp.video_id,
            "label": label,
            "sha256": fp.sha256,
            "uri": clip_uri,
            "source": item.source,
            "split": M.UNLABELED if label == M.UNLABELED_LABEL else item.split or "train",
            "fold": -1,
        }
        if prev is not None and prev["sha256"] == fp.sha256 and storage.exists(clip_uri):
            row.update({k: prev[k] for k in ("num_frames", "fps", "height", "width")})
            # A DICOM's PatientID was hashed into prev on its first ingest.
            row["patient_id"] = (
                patient_of(item, fp.video_id) if item.patient_id or item.kind != "dicom" else prev["patient_id"]
            )
            row["_reused"] = True
            return row
        dicom_patient = None
        try:
            blobs = _read_all(item, limits)
            if item.kind == "video":
                clip, info = _video_clip(item, blobs[0], gop, crf, limits, scan_region)
            elif item.kind == "frames":
                clip, info = _frames_clip(item, blobs, fps, gop, crf, limits, scan_region)
            elif item.kind == "dicom":
                clip, info, dicom_patient = _dicom_clip(item, blobs[0], fps, gop, crf, limits, dicom_region)
            else:
                raise ValueError(f"{item.name}: unknown item kind {item.kind!r}; valid: video, frames, dicom")
            try:
                # The pipeline reads with decord: check it agrees with what was written.
                check = probe_video(clip, name=f"{item.name} (transcoded)")
            except VideoError as err:
                raise _Reject(UNREADABLE, str(err)) from None
            if check.num_frames != info.num_frames:
                raise _Reject(UNREADABLE, f"transcoded clip has {check.num_frames} frames, wrote {info.num_frames}")
            storage.write_bytes(clip_uri, clip)
        except _Reject as rej:
            return rej
        if item.kind == "dicom" and dicom_patient is None and not item.patient_id:
            logger.warning("%s: no PatientID and no patient_id in labels.csv; counted as its own patient", item.name)
        row.update(
            {
                "patient_id": patient_of(item, fp.video_id, dicom_patient),
                "num_frames": info.num_frames,
                "fps": info.fps,
                "height": info.height,
                "width": info.width,
                "_source_patient": dicom_patient if not item.patient_id else item.patient_id,
            }
        )
        return row

    results = _parallel(process, [(fp,) for fp in keep], workers, "transcoding")
    rows, mapping = [], []
    for fp, res in zip(keep, results):
        if isinstance(res, _Reject):
            reject(fp.item, res.reason, res.detail, fp.video_id)
            continue
        mapping.append(
            {
                "video_id": res["video_id"],
                "patient_id": res["patient_id"],
                "source_video": fp.item.entry,
                "source_patient_id": res.pop("_source_patient", None) or fp.item.patient_id or "",
            }
        )
        rows.append(res)
    updated = sum(1 for r in rows if r["video_id"] in prev_rows and not r.get("_reused"))
    reused = sum(1 for r in rows if r.pop("_reused", False))
    kept_rows = previous[~previous["video_id"].isin({r["video_id"] for r in rows})]

    fresh = pd.DataFrame(rows, columns=list(M.COLUMNS)) if rows else M.empty_manifest()
    if len(fresh):
        fresh = _assign(fresh, previous, given_split, ratios, folds, seed)
    parts = [df for df in (kept_rows, fresh) if len(df)]
    manifest = pd.concat(parts, ignore_index=True) if parts else M.empty_manifest()
    manifest = manifest[list(M.COLUMNS)].sort_values("video_id", kind="stable").reset_index(drop=True)
    if len(manifest):
        M.check_patient_splits(manifest, "labels.csv and the manifest in --out")
        _write_if_changed(M.to_table(manifest, manifest_uri), manifest_uri)
    rejects_df = pd.DataFrame(rejects, columns=REJECTS_SCHEMA.names)
    _write_if_changed(pa.Table.from_pandas(rejects_df, schema=REJECTS_SCHEMA, preserve_index=False), rejects_uri)
    if id_map:
        write_id_map(id_map, pd.DataFrame(mapping, columns=list(ID_MAP_COLUMNS)))
    new = len(rows) - reused
    counts = {"ingested": new, "already ingested": reused}
    if len(previous):
        counts["kept from the manifest"] = len(kept_rows)
    for reason, n in rejects_df["reason"].value_counts().sort_index().items():
        counts[f"rejected: {reason}"] = int(n)
    if len(previous):
        logger.info(
            "merged into %s: %d earlier row(s) kept, %d added, %d updated, %d already ingested, %d rejected",
            manifest_uri,
            len(kept_rows),
            new - updated,
            updated,
            reused,
            len(rejects_df),
        )
    return IngestResult(manifest, rejects_df, new=new, reused=reused, kept=len(kept_rows), counts=counts)


def write_id_map(uri: str, mapping: pd.DataFrame) -> None:
    """The pseudonym <-> source mapping as CSV at ``uri``, merged with the map already there.

    It names patients: keep it where the source data is kept, never beside the outputs.
    """
    if storage.exists(uri):
        try:
            old = pd.read_csv(io.StringIO(storage.read_text(uri)), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise IngestError(f"--id-map {uri}: exists and is not an id map ({type(err).__name__})") from None
        mapping = pd.concat([old[~old["video_id"].isin(mapping["video_id"])], mapping], ignore_index=True)
    storage.write_text(uri, mapping.sort_values("video_id").to_csv(index=False))


def _write_if_changed(table: pa.Table, uri: str) -> None:
    """Atomic write, skipped when ``uri`` already holds the same rows (a re-run writes nothing)."""
    if storage.exists(uri):
        try:
            if storage.read_parquet(uri).equals(table):
                logger.info("%s unchanged", uri)
                return
        except storage.StorageError:
            pass
    storage.write_parquet(table, uri)


def summary_table(result: IngestResult) -> str:
    """Counts per outcome, then videos / patients per split, as aligned text."""
    width = max(len(k) for k in result.counts) + 2
    lines = [f"{'outcome':<{width}}videos"]
    lines += [f"{k:<{width}}{v}" for k, v in result.counts.items()]
    if result.usable:
        lines += ["", M.summarize(result.manifest).to_string()]
    return "\n".join(lines)
