"""Ingest: source videos + labels -> short-GOP clips, manifest.parquet and rejects.parquet.

Sources (each becomes a list of ``SourceItem``):
- a folder or S3 prefix of video files listed in a labels.csv
  (``video``, ``label`` in benign|malignant|0|1, optional ``patient_id`` and ``split``);
- the BUV layout ``rawframes/{benign,malignant}/<video-id>/<frame>.png``;
- multi-frame ultrasound DICOM listed in a labels.csv. Patient ids are salted
  hashes of the PatientID; no identifying tag value, file name or UID is
  written anywhere (video ids are content hashes).

Work is done in two passes so the result is deterministic whatever the
thread scheduling: pass 1 reads and hashes every item (missing, empty and
duplicate items are settled here, the earlier item in input order winning);
pass 2 decodes each remaining item once (validating it and reading its frame
count, fps and size), transcodes it to short-GOP H.264 and uploads
``<out>/clips/<video_id>.mp4``. An item whose clip exists and whose manifest
row has the same sha256 is not decoded or uploaded again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from clman import storage
from clman.data import manifest as M
from clman.data.video import (EMPTY, NO_FRAMES, NOT_A_VIDEO, UNREADABLE, Mp4Writer, VideoError,
                              VideoInfo, probe_video, transcode_with_info)

logger = logging.getLogger(__name__)

SALT_ENV = "CLMAN_PATIENT_SALT"
LABELS = {"benign": 0, "malignant": 1, "0": 0, "1": 1}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")

# Reject reasons beyond the decoding ones in clman.data.video.
MISSING_FILE, UNKNOWN_LABEL, UNKNOWN_SPLIT, DUPLICATE, DUPLICATE_ID = (
    "missing_file", "unknown_label", "unknown_split", "duplicate", "duplicate_id")

REJECTS_SCHEMA = pa.schema([("video", pa.string()), ("reason", pa.string()), ("detail", pa.string())])

# DICOM attributes that identify a patient (or lead back to one). None is
# copied to any output; their values are also scrubbed from error details.
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientAge", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs",
    "OtherPatientNames", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup",
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "StationName",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "DeviceSerialNumber", "InstitutionalDepartmentName",
)


class IngestError(ValueError):
    """Input that cannot be ingested at all (bad labels.csv, missing salt, bad layout)."""


@dataclass(frozen=True)
class SourceItem:
    """One video to ingest.

    name: how reports call it (the labels.csv ``video`` entry, the BUV folder;
    for DICOM only the labels.csv line, never the file name).
    kind: "video" (a file any FFmpeg demuxer reads), "frames" (an image per
    frame, in order) or "dicom".
    """

    name: str
    kind: str
    uris: tuple[str, ...]  # the file, or the frame images in order
    label: object = None  # raw label text; parsed in ingest
    patient_id: str | None = None
    split: str | None = None
    video_id: str | None = None  # None: derived from the content (DICOM)
    source: str = ""


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    new: int = 0  # transcoded and uploaded this run
    reused: int = 0  # already in <out>, skipped
    split_changes: int = 0  # patients whose split differs from the previous manifest
    counts: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return len(self.manifest) > 0


@dataclass
class _Reject(Exception):
    reason: str
    detail: str


# -- sources ------------------------------------------------------------------
def safe_id(text: str) -> str:
    """A video id usable as an S3 key part: path without extension, odd characters -> '_'."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", text.strip().strip("/"))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "video"


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def read_labels(labels_uri: str) -> pd.DataFrame:
    """labels.csv as strings: ``video``, ``label`` (+ optional ``patient_id``, ``split``)."""
    try:
        text = storage.read_text(labels_uri)
    except storage.StorageError as err:
        raise IngestError(f"labels file: {err}") from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise IngestError(f"{labels_uri}: not a readable CSV: {' '.join(str(err).split())}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("video", "label") if c not in df.columns]
    if missing:
        raise IngestError(f"{labels_uri}: missing column(s) {missing}; expected video,label"
                          "[,patient_id][,split]")
    for col in df.columns:
        df[col] = df[col].str.strip()
    return df


def labeled_items(videos: str, labels_uri: str) -> list[SourceItem]:
    """Video files under ``videos`` (folder or s3:// prefix) listed in labels.csv."""
    df = read_labels(labels_uri)
    items = []
    for row in df.itertuples(index=False):
        vid = row.video
        items.append(SourceItem(
            name=vid, kind="video", uris=(storage.join(videos, vid),), label=row.label,
            patient_id=getattr(row, "patient_id", "") or None,
            split=getattr(row, "split", None) if "split" in df.columns else None,
            video_id=safe_id(vid), source=storage.join(videos, vid)))
    return items


def buv_items(root: str) -> list[SourceItem]:
    """BUV layout: ``<root>/rawframes/{benign,malignant}/<video-id>/<frame>.png`` (natural order)."""
    base = storage.join(root, "rawframes")
    frames: dict[tuple[str, str], list[str]] = {}
    for uri in storage.list_uris(base):
        rel = uri[len(base):].lstrip("/").replace(os.sep, "/")
        parts = rel.split("/")
        if len(parts) != 3 or not parts[2].lower().endswith(FRAME_SUFFIXES):
            continue
        frames.setdefault((parts[0], parts[1]), []).append(uri)
    if not frames:
        raise IngestError(f"{base}: no frames found; expected rawframes/{{benign,malignant}}/"
                          "<video-id>/<frame>.png")
    items = []
    for (label, vid), uris in sorted(frames.items()):
        uris.sort(key=lambda u: _natural_key(u.rsplit("/", 1)[-1]))
        folder = storage.join(base, label, vid)
        items.append(SourceItem(name=f"{label}/{vid}", kind="frames", uris=tuple(uris),
                                label=label, video_id=safe_id(vid), source=folder))
    return items


def dicom_items(folder: str, labels_uri: str) -> list[SourceItem]:
    """Multi-frame DICOM files under ``folder`` listed in labels.csv (``video`` = file path)."""
    df = read_labels(labels_uri)
    items = []
    for i, row in enumerate(df.itertuples(index=False)):
        line = i + 2  # 1-based, after the header line
        items.append(SourceItem(
            # File names of DICOM exports often carry the patient name: report the line only.
            name=f"labels.csv line {line}", kind="dicom", uris=(storage.join(folder, row.video),),
            label=row.label, patient_id=getattr(row, "patient_id", "") or None,
            split=getattr(row, "split", None) if "split" in df.columns else None,
            source="dicom"))
    return items


def resolve_salt(salt: str | None) -> str:
    salt = salt or os.environ.get(SALT_ENV)
    if not salt:
        raise IngestError(f"DICOM ingest needs a salt for patient ids: pass --salt or set {SALT_ENV} "
                          "(keep it secret and the same across runs so patient ids stay stable)")
    return salt


def hash_patient(patient: str, salt: str) -> str:
    return "p" + hashlib.sha256(f"{salt}\x00{patient}".encode()).hexdigest()[:16]


# -- decoding each kind ---------------------------------------------------------
def _read_all(item: SourceItem) -> list[bytes]:
    """The item's bytes (one blob per uri); _Reject for missing or unreadable."""
    blobs = []
    for uri in item.uris:
        try:
            blobs.append(storage.read_bytes(uri))
        except storage.StorageNotFoundError:
            raise _Reject(MISSING_FILE, _where(item, uri, "no such file")) from None
        except storage.StorageError as err:
            raise _Reject(UNREADABLE, _where(item, uri, str(err))) from None
    return blobs


def _where(item: SourceItem, uri: str, what: str) -> str:
    """A reject detail naming the file, except for DICOM (its name may be the patient's)."""
    if item.kind == "dicom":
        return what.replace(uri, "<file>")
    return what if uri in what else f"{uri}: {what}"


def _frames_clip(item: SourceItem, blobs: list[bytes], fps: float, gop: int,
                 crf: int) -> tuple[bytes, VideoInfo]:
    from PIL import Image, UnidentifiedImageError

    writer = Mp4Writer(fps=fps, gop=gop, crf=crf, name=item.name)
    for uri, blob in zip(item.uris, blobs):
        if not blob:
            raise _Reject(EMPTY, f"{uri}: frame image is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                gray = im.mode in ("1", "L", "I", "I;16", "F", "LA")
                arr = np.asarray(im.convert("L" if gray else "RGB"))  # (H, W) or (H, W, 3)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise _Reject(UNREADABLE, f"{uri}: not a readable image ({err})") from None
        try:
            writer.write(arr)
        except VideoError as err:
            raise _Reject(err.reason, str(err)) from None
    try:
        return writer.finish(), writer.info()
    except VideoError as err:
        raise _Reject(err.reason, str(err)) from None


def _dicom_uint8(arr: np.ndarray, ds) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    bits = int(getattr(ds, "BitsStored", 8 * arr.dtype.itemsize) or 8)
    arr = arr.astype(np.float32)
    if getattr(ds, "PixelRepresentation", 0) == 1:  # signed
        arr = arr + 2 ** (bits - 1)
    return np.clip(arr / (2 ** bits - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def dicom_fps(ds, default: float) -> float:
    """Frame rate from FrameTime (ms), CineRate, RecommendedDisplayFrameRate or FrameTimeVector."""
    for read in (lambda: 1000.0 / float(ds.FrameTime), lambda: float(ds.CineRate),
                 lambda: float(ds.RecommendedDisplayFrameRate),
                 lambda: 1000.0 / float(np.mean([float(v) for v in ds.FrameTimeVector[1:]]))):
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


def read_dicom(data: bytes, name: str = "dicom"):
    """(dataset, frames (T, H, W) or (T, H, W, 3) uint8) of a multi-frame DICOM.

    Raises VideoError with a reject reason; messages never quote an
    identifying attribute value.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not data:
        raise VideoError(f"{name}: empty (0 bytes)", EMPTY)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as err:
        # The message of a parse error may quote an element value: give the type only.
        raise VideoError(f"{name}: not a readable DICOM file ({type(err).__name__})",
                         NOT_A_VIDEO) from None
    if "PixelData" not in ds:
        raise VideoError(f"{name}: DICOM has no pixel data", NO_FRAMES)
    try:
        arr = ds.pixel_array  # pydicom 3 converts YBR to RGB
        if str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut
            arr = apply_color_lut(arr, ds)
    except Exception as err:  # decoders raise many types (missing plugin, corrupt stream)
        raise VideoError(_scrub(f"{name}: pixel data does not decode ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:200]})", ds), UNREADABLE) from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    color = (int(getattr(ds, "SamplesPerPixel", 1) or 1) == 3
             or str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR")
    if frames < 2 or arr.ndim != (4 if color else 3):
        raise VideoError(f"{name}: single-frame DICOM image (pixel data {arr.shape}), not a "
                         "multi-frame cine loop", NOT_A_VIDEO)
    arr = _dicom_uint8(arr, ds)  # (T, H, W) or (T, H, W, 3)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = 255 - arr  # MONOCHROME1: high values are dark
    return ds, arr


def dicom_frames(data: bytes, name: str = "dicom") -> np.ndarray:
    """All frames of a multi-frame DICOM as (T, H, W, 3) uint8 (grayscale replicated)."""
    arr = read_dicom(data, name)[1]
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 3 else arr


def _dicom_clip(item: SourceItem, blob: bytes, default_fps: float, gop: int,
                crf: int) -> tuple[bytes, VideoInfo, str | None]:
    """(clip, info, PatientID or None) from a multi-frame DICOM."""
    try:
        ds, arr = read_dicom(blob, item.name)
        writer = Mp4Writer(fps=dicom_fps(ds, default_fps), gop=gop, crf=crf, name=item.name)
        for frame in arr:
            writer.write(frame)
        clip = writer.finish()
    except VideoError as err:
        raise _Reject(err.reason, str(err)) from None
    if str(getattr(ds, "BurnedInAnnotation", "")).upper() == "YES":
        logger.warning("%s: BurnedInAnnotation is YES: the pixels may show identifying text; "
                       "mask it before sharing the clips", item.name)
    patient = str(getattr(ds, "PatientID", "") or "").strip() or None
    return clip, writer.info(), patient


# -- the two passes ---------------------------------------------------------------
@dataclass
class _Fingerprint:
    index: int
    item: SourceItem
    sha256: str | None = None
    video_id: str | None = None
    reject: _Reject | None = None


def _fingerprint(index: int, item: SourceItem) -> _Fingerprint:
    fp = _Fingerprint(index, item)
    try:
        blobs = _read_all(item)
    except _Reject as rej:
        fp.reject = rej
        return fp
    if item.kind != "frames" and not blobs[0]:
        fp.reject = _Reject(EMPTY, _where(item, item.uris[0], "empty (0 bytes)"))
        return fp
    h = hashlib.sha256()
    for blob in blobs:
        if item.kind == "frames":  # frame boundaries matter
            h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    fp.sha256 = h.hexdigest()
    fp.video_id = item.video_id or f"dcm-{fp.sha256[:16]}"
    return fp


def _parse_label(raw) -> int | None:
    return LABELS.get(str(raw).strip().lower()) if raw is not None else None


def _progress(it: Iterable, total: int, desc: str) -> Iterable:
    return tqdm(it, total=total, desc=desc, unit="video", disable=None, leave=False)


def _parallel(fn: Callable, args: Sequence[tuple], workers: int, desc: str) -> list:
    """fn(*a) for a in args, in order, on ``workers`` threads (PyAV and boto3 release the GIL)."""
    if workers <= 1:
        return [fn(*a) for a in _progress(args, len(args), desc)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(_progress(pool.map(lambda a: fn(*a), args), len(args), desc))


def ingest(items: Sequence[SourceItem], out: str, *, ratios: Sequence[float] | None = None,
           folds: int = 0, seed: int = 0, salt: str | None = None, workers: int = 4,
           gop: int = 8, crf: int = 18, fps: float = 30.0) -> IngestResult:
    """Ingest ``items`` into ``out``; writes manifest.parquet and rejects.parquet there.

    ratios / folds / seed: patient-level split (see manifest.assign_splits);
    when the items carry a ``split`` (labels.csv column) it is used as given
    and ratios / folds must be None / 0. fps: frame rate for frame folders
    (and DICOM without timing). Raises IngestError / ManifestError for input
    that cannot be ingested at all; bad items go to rejects.
    """
    given_split = any(it.split is not None for it in items)
    if given_split and (ratios is not None or folds):
        raise IngestError("labels.csv has a split column: drop --split/--folds, or drop the column")
    if any(it.kind == "dicom" for it in items):
        salt = resolve_salt(salt)
    manifest_uri = storage.join(out, "manifest.parquet")
    rejects_uri = storage.join(out, "rejects.parquet")
    previous = (M.read_manifest(manifest_uri) if storage.exists(manifest_uri)
                else M.empty_manifest())
    prev_rows = {r["video_id"]: r for r in previous.to_dict("records")}

    rejects: list[dict] = []

    def reject(item: SourceItem, reason: str, detail: str) -> None:
        logger.warning("reject %s: %s: %s", item.name, reason, detail)
        rejects.append({"video": item.name, "reason": reason, "detail": detail})

    # Pass 1: labels, existence, hashes, duplicates (in input order).
    todo: list[tuple[int, SourceItem]] = []
    for i, item in enumerate(items):
        if _parse_label(item.label) is None:
            reject(item, UNKNOWN_LABEL, f"label {item.label!r} is not one of benign, malignant, 0, 1")
        elif item.split is not None and item.split not in M.SPLITS:
            reject(item, UNKNOWN_SPLIT, f"split {item.split!r} is not one of {list(M.SPLITS)}")
        else:
            todo.append((i, item))
    prints = _parallel(_fingerprint, todo, workers, "hashing")
    seen_sha: dict[str, str] = {}
    seen_id: dict[str, str] = {}
    keep: list[_Fingerprint] = []
    for fp in prints:
        if fp.reject is not None:
            reject(fp.item, fp.reject.reason, fp.reject.detail)
        elif fp.sha256 in seen_sha:
            reject(fp.item, DUPLICATE, f"same content (sha256 {fp.sha256[:12]}...) as "
                                       f"{seen_sha[fp.sha256]}")
        elif fp.video_id in seen_id:
            reject(fp.item, DUPLICATE_ID, f"video id {fp.video_id!r} already used by "
                                          f"{seen_id[fp.video_id]}")
        else:
            seen_sha[fp.sha256] = fp.item.name
            seen_id[fp.video_id] = fp.item.name
            keep.append(fp)

    # Pass 2: decode, transcode, upload (skipping what is already in out).
    def process(fp: _Fingerprint) -> dict | _Reject:
        item, clip_uri = fp.item, storage.join(out, "clips", f"{fp.video_id}.mp4")
        prev = prev_rows.get(fp.video_id)
        row = {"video_id": fp.video_id, "label": _parse_label(item.label), "sha256": fp.sha256,
               "uri": clip_uri, "source": item.source, "split": item.split or "train", "fold": -1}
        patient = item.patient_id
        if prev is not None and prev["sha256"] == fp.sha256 and storage.exists(clip_uri):
            row.update({k: prev[k] for k in ("num_frames", "fps", "height", "width")})
            if item.kind == "dicom":  # the DICOM PatientID was hashed into prev on first ingest
                row["patient_id"] = hash_patient(patient, salt) if patient else prev["patient_id"]
            else:
                row["patient_id"] = patient or fp.video_id
            row["_reused"] = True
            return row
        try:
            blobs = _read_all(item)
            if item.kind == "video":
                try:
                    clip, info = transcode_with_info(blobs[0], gop=gop, crf=crf, name=item.name)
                except VideoError as err:
                    raise _Reject(err.reason, str(err)) from None
            elif item.kind == "frames":
                clip, info = _frames_clip(item, blobs, fps, gop, crf)
            elif item.kind == "dicom":
                clip, info, dicom_patient = _dicom_clip(item, blobs[0], fps, gop, crf)
                patient = patient or dicom_patient
            else:
                raise ValueError(f"{item.name}: unknown item kind {item.kind!r}; valid: video, "
                                 "frames, dicom")
            try:
                # The pipeline reads with decord: check it agrees with what was written.
                check = probe_video(clip, name=f"{item.name} (transcoded)")
            except VideoError as err:
                raise _Reject(UNREADABLE, str(err)) from None
            if check.num_frames != info.num_frames:
                raise _Reject(UNREADABLE, f"transcoded clip has {check.num_frames} frames, "
                                          f"wrote {info.num_frames}")
            storage.write_bytes(clip_uri, clip)
        except _Reject as rej:
            return rej
        if item.kind == "dicom":
            if patient is None:
                logger.warning("%s: no PatientID and no patient_id in labels.csv; counted as its "
                               "own patient", item.name)
            patient = hash_patient(patient, salt) if patient else fp.video_id
        row.update({"patient_id": patient or fp.video_id, "num_frames": info.num_frames,
                    "fps": info.fps, "height": info.height, "width": info.width})
        return row

    results = _parallel(process, [(fp,) for fp in keep], workers, "transcoding")
    rows = []
    for fp, res in zip(keep, results):
        if isinstance(res, _Reject):
            reject(fp.item, res.reason, res.detail)
        else:
            rows.append(res)
    reused = sum(1 for r in rows if r.pop("_reused", False))

    manifest = (pd.DataFrame(rows, columns=list(M.COLUMNS)) if rows else M.empty_manifest())
    manifest = manifest.sort_values("video_id", kind="stable").reset_index(drop=True)
    split_changes = 0
    if len(manifest):
        if not given_split:
            manifest = M.assign_splits(manifest, ratios=ratios or M.DEFAULT_RATIOS, folds=folds,
                                       seed=seed)
        M.check_patient_splits(manifest, "labels.csv")
        split_changes = _count_split_changes(previous, manifest)
        _write_if_changed(M.to_table(manifest, manifest_uri), manifest_uri)
    rejects_df = pd.DataFrame(rejects, columns=REJECTS_SCHEMA.names)
    _write_if_changed(pa.Table.from_pandas(rejects_df, schema=REJECTS_SCHEMA, preserve_index=False),
                      rejects_uri)
    counts = {"ingested": len(manifest) - reused, "already ingested": reused}
    for reason, n in rejects_df["reason"].value_counts().sort_index().items():
        counts[f"rejected: {reason}"] = int(n)
    return IngestResult(manifest, rejects_df, new=len(manifest) - reused, reused=reused,
                        split_changes=split_changes, counts=counts)


def _count_split_changes(previous: pd.DataFrame, manifest: pd.DataFrame) -> int:
    if previous.empty:
        return 0
    old = previous.groupby("patient_id")[["split", "fold"]].first()
    new = manifest.groupby("patient_id")[["split", "fold"]].first()
    both = old.index.intersection(new.index)
    changed = int(((old.loc[both] != new.loc[both]).any(axis=1)).sum())
    if changed:
        logger.warning("%d patient(s) changed split or fold versus the existing manifest (the "
                       "stratified assignment covers all videos, and the video set changed); "
                       "models trained on the old manifest saw them elsewhere", changed)
    return changed


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
