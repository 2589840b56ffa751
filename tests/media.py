"""Tiny real media for the tests: smooth synthetic frames, mp4 via PyAV, DICOM via pydicom, BUV frame
folders, and a tiny synthetic data set ingested to a manifest (for the job tests)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frames(n: int = 12, h: int = 32, w: int = 32, seed: int = 0, gray: bool = False) -> np.ndarray:
    """(n, h, w, 3) uint8 (or (n, h, w) when gray): a gradient with a bright square moving down.

    Smooth on purpose so H.264 reproduces it closely; ``seed`` shifts the pattern
    so different seeds give different content.
    """
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w), np.uint8)
    for t in range(n):
        base = 40 + 120 * x / max(w - 1, 1) + 20 * np.sin((y + 3 * seed) / 5.0)
        top = (2 * t + 5 * seed) % max(h - 8, 1)
        base[top : top + 8, w // 4 : w // 4 + 8] = 230
        out[t] = np.clip(base, 0, 255).astype(np.uint8)
    if gray:
        return out
    rgb = np.stack([out, out, out], axis=-1)
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 10, 0, 255)  # a little colour
    return rgb


def sweep(n: int = 12, h: int = 32, w: int = 32, seed: int = 0, gray: bool = False) -> np.ndarray:
    """``frames`` with a drifting ripple over the whole image, so that every pixel changes over the
    sweep as an ultrasound scan does (the scan-region finder keeps what changes)."""
    base = frames(n, h, w, seed=seed, gray=gray).astype(np.float32)
    t, x = np.arange(n)[:, None, None], np.arange(w)[None, None, :]
    ripple = 12 * np.sin(2 * np.pi * (x + 3 * t + seed) / 12)  # (n, 1, w)
    if not gray:
        ripple = ripple[..., None]
    return np.clip(base + ripple, 0, 255).astype(np.uint8)


def pyav_mp4(video: np.ndarray, fps: int = 10, gop: int = 250) -> bytes:
    """Encode (T, H, W, 3) uint8 with PyAV directly (a 'camera' file: long GOP by default)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"crf": "18", "g": str(gop), "preset": "fast"})
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for i, frame in enumerate(video):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))
    return buf.getvalue()


def pyav_decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def keyframe_positions(data: bytes) -> list[int]:
    """Indices of keyframes in decode order (no B-frames in our clips, so = frame index)."""
    with av.open(io.BytesIO(data)) as c:
        return [i for i, p in enumerate(p for p in c.demux(video=0) if p.size) if p.is_keyframe]


def dicom_cine(
    video: np.ndarray,
    patient_name: str,
    patient_id: str,
    frame_time_ms: float = 40.0,
    birth_date: str = "19800101",
    institution: str = "St Example Hospital",
) -> bytes:
    """A multi-frame ultrasound DICOM (Explicit VR Little Endian) with identifying tags set."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.InstitutionName = institution
    ds.AccessionNumber = "ACC" + patient_id
    ds.ReferringPhysicianName = "Dr^Referrer"
    ds.StudyDate = "20240102"
    gray = video.ndim == 3
    ds.NumberOfFrames = len(video)
    ds.Rows, ds.Columns = video.shape[1:3]
    ds.SamplesPerPixel = 1 if gray else 3
    ds.PhotometricInterpretation = "MONOCHROME2" if gray else "RGB"
    if not gray:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.FrameTime = frame_time_ms
    ds.PixelData = np.ascontiguousarray(video).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def buv_clip(root: Path, label: str, video: str, images, first: int = 0) -> Path:
    """A BUV clip: ``images`` (2-D uint8 arrays) as ``<first>.png``, ``<first + 1>.png``, ... in
    ``root/rawframes/<label>/<video>`` (made here; it must not exist yet). Returns that folder."""
    from PIL import Image

    folder = root / "rawframes" / label / video
    folder.mkdir(parents=True)
    for t, image in enumerate(images, start=first):
        Image.fromarray(image).save(folder / f"{t}.png")
    return folder


def synth_manifest(root: str, cases: int, seed: int, frames: int) -> str:
    """``cases`` synthetic 32 x 32 sweeps of ``frames`` frames written to ``<root>/raw`` and ingested to
    ``<root>/data`` with train/val/test splits 0.5/0.25/0.25 (video ids kept): the manifest's URI."""
    from clman.data.ingest import ingest, labeled_items
    from clman.data.synth import SynthConfig, write_dataset

    write_dataset(f"{root}/raw", cases, seed=seed, cfg=SynthConfig(size=32, frames=frames), workers=1, progress=False)
    ingest(
        labeled_items(f"{root}/raw", f"{root}/raw/labels.csv"),
        f"{root}/data",
        ratios=(0.5, 0.25, 0.25),
        seed=0,
        workers=2,
        keep_ids=True,
    )
    return f"{root}/data/manifest.parquet"
