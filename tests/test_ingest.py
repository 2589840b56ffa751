"""Manifest rules and the ingest job, on tiny real videos and the real local S3 (SeaweedFS)."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from clman import storage
from clman.data import ingest as I
from clman.data import manifest as M
from clman.data.video import decode_frames, probe_video
from jobs import ingest as job
from tests.media import buv_clip, dicom_cine, frames, pyav_mp4, sweep


# -- manifest -----------------------------------------------------------------
def _videos(n_patients: int = 20, per_patient: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(p % 3 == 0)  # ~1/3 malignant patients
        for v in range(int(rng.integers(1, per_patient + 1))):
            rows.append(
                {
                    "video_id": f"p{p:02d}v{v}",
                    "patient_id": f"p{p:02d}",
                    "label": label,
                    "split": "train",
                    "fold": -1,
                    "uri": f"s3://b/clips/p{p:02d}v{v}.mp4",
                    "num_frames": 12,
                    "fps": 10.0,
                    "height": 32,
                    "width": 32,
                    "sha256": f"{p:02d}{v}" * 8,
                    "source": "x",
                }
            )
    return pd.DataFrame(rows)


def test_assign_splits_is_patient_level_stratified_and_deterministic():
    df = _videos()
    a = M.assign_splits(df, (0.6, 0.0, 0.4), seed=3)
    M.check_patient_splits(a)
    assert a.groupby("patient_id")["split"].nunique().max() == 1
    assert set(a["split"]) == {"train", "test"}
    per = a.groupby("patient_id").first().groupby(["label", "split"]).size()
    # 7 malignant, 13 benign patients -> 4/3 and 8/5 (largest remainder of 0.6 / 0.4).
    assert per.to_dict() == {(0, "test"): 5, (0, "train"): 8, (1, "test"): 3, (1, "train"): 4}
    shuffled = df.sample(frac=1.0, random_state=1)
    b = M.assign_splits(shuffled, (0.6, 0.0, 0.4), seed=3).sort_values("video_id")
    assert a.sort_values("video_id")["split"].tolist() == b["split"].tolist()  # row order is irrelevant
    c = M.assign_splits(df, (0.6, 0.0, 0.4), seed=4)
    assert c["split"].tolist() != a["split"].tolist()


def test_assign_folds_balances_labels():
    a = M.assign_splits(_videos(), folds=5, seed=0)
    M.check_patient_splits(a)
    assert set(a["split"]) == {"train"}
    patients = a.groupby("patient_id").first()
    assert patients["fold"].value_counts().sort_index().tolist() == [4, 4, 4, 4, 4]
    for _, g in patients.groupby("label"):
        counts = g["fold"].value_counts()
        assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize(
    "ratios, match",
    [
        ("0.5,0.2,0.2", "sum to 1"),
        ("0.6,0.4", "three numbers"),
        ("a,b,c", "three numbers"),
        ("1.2,-0.2,0", ">= 0"),
    ],
)
def test_bad_ratios_fail_clearly(ratios, match):
    with pytest.raises(M.ManifestError, match=match):
        M.assign_splits(_videos(), ratios)


def test_an_empty_requested_split_fails_clearly():
    with pytest.raises(M.ManifestError, match="split 'val' would be empty"):
        M.assign_splits(_videos(n_patients=2, per_patient=1), (0.5, 0.1, 0.4))
    with pytest.raises(M.ManifestError, match="3 folds need at least 3 patients"):
        M.assign_splits(_videos(n_patients=2), folds=3)


def test_manifest_roundtrip_has_exactly_the_schema(tmp_path):
    df = M.assign_splits(_videos(), seed=0)
    uri = str(tmp_path / "m" / "manifest.parquet")
    M.write_manifest(df, uri)
    assert pq.read_schema(uri).remove_metadata() == M.MANIFEST_SCHEMA
    back = M.read_manifest(uri)
    assert back["video_id"].tolist() == df["video_id"].tolist()
    assert set(M.read_manifest(uri, split="test")["split"]) == {"test"}
    with pytest.raises(M.ManifestError, match="unknown split 'dev'"):
        M.read_manifest(uri, split="dev")


def test_write_manifest_rejects_a_patient_in_two_splits(tmp_path):
    df = M.assign_splits(_videos(), seed=0)
    pid = df["patient_id"][df.groupby("patient_id")["video_id"].transform("count") > 1].iloc[0]
    rows = df.index[df["patient_id"] == pid]
    df.loc[rows[0], "split"], df.loc[rows[1], "split"] = "train", "test"
    with pytest.raises(M.ManifestError, match=f"patient '{pid}' is in more than one split"):
        M.write_manifest(df, str(tmp_path / "manifest.parquet"))


# -- ingest from a folder with good and bad files ------------------------------
# video, label, patient: 3 benign and 3 malignant patients, 8 good videos.
GOOD = [
    ("b1a.mp4", "benign", "P1"),
    ("b1b.mp4", "benign", "P1"),
    ("b2.mp4", "0", "P2"),
    ("b3.mp4", "Benign", "P3"),
    ("m4a.mp4", "malignant", "P4"),
    ("m4b.mp4", "1", "P4"),
    ("m5.mp4", "malignant", "P5"),
    ("sub/m6.avi", "malignant", "P6"),
]
BAD = [
    ("zero.mp4", "benign", "P7", "empty"),
    ("cut.mp4", "benign", "P8", "truncated"),
    ("notes.mp4", "benign", "P9", "not_a_video"),
    ("copy.mp4", "malignant", "P10", "duplicate"),
    ("odd.mp4", "maybe", "P11", "unknown_label"),
    ("ghost.mp4", "benign", "P12", "missing_file"),
]


def _avi(video: np.ndarray) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.height, s.width = video.shape[1:3]
        s.pix_fmt = "yuv420p"
        for f in video:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode(None))
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A folder of videos + labels.csv, good and deliberately bad."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    for i, (name, _, _) in enumerate(GOOD):
        video = frames(12, 32, 32, seed=i)
        (root / name).write_bytes(_avi(video) if name.endswith(".avi") else pyav_mp4(video, gop=250))
    (root / "zero.mp4").write_bytes(b"")
    good = pyav_mp4(frames(24, 32, 32, seed=99))
    (root / "cut.mp4").write_bytes(good[: len(good) // 2])
    (root / "notes.mp4").write_text("patient notes, not a video\n")
    shutil.copy(root / "b2.mp4", root / "copy.mp4")
    (root / "odd.mp4").write_bytes(good)
    rows = [(n, lab, p) for n, lab, p in GOOD] + [(n, lab, p) for n, lab, p, _ in BAD]
    pd.DataFrame(rows, columns=["video", "label", "patient_id"]).to_csv(root / "labels.csv", index=False)
    return root


class WriteCounter:
    def __init__(self, monkeypatch):
        self.uris: list[str] = []
        real = storage.write_bytes

        def counting(uri, data):
            self.uris.append(str(uri))
            return real(uri, data)

        monkeypatch.setattr(storage, "write_bytes", counting)


def _objects(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    name = bucket[len("s3://") :]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=name).get("Contents", [])]
    return {k: client.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


SALT = "test-salt-kept-secret"


def test_ingest_folder_with_bad_files(s3, bucket, source, monkeypatch, capsys):
    out = f"{bucket}/data"
    monkeypatch.setenv(I.SALT_ENV, SALT)

    def vid(name: str) -> str:
        return I.Pseudonyms(SALT).video(I.SourceItem(name="", kind="video", uris=(), entry=name))

    argv = [
        "--out",
        out,
        "--videos",
        str(source),
        "--labels",
        str(source / "labels.csv"),
        "--workers",
        "2",
        "--seed",
        "0",
    ]
    assert job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ingested" in printed and "rejected: truncated" in printed

    manifest = M.read_manifest(f"{out}/manifest.parquet")
    assert sorted(manifest["video_id"]) == sorted(vid(n) for n, _, _ in GOOD)
    assert manifest.set_index("video_id").loc[vid("sub/m6.avi"), "label"] == 1
    assert manifest.set_index("video_id").loc[vid("b3.mp4"), "label"] == 0
    assert manifest["patient_id"].nunique() == 6 and not manifest["patient_id"].isin([p for *_, p in GOOD]).any()
    assert set(manifest["source"]) == {"labels"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"train", "test"}
    assert (manifest["fold"] == -1).all()
    for row in manifest.itertuples():
        clip = storage.read_bytes(row.uri)
        assert row.uri == f"{out}/clips/{row.video_id}.mp4"
        info = probe_video(clip)
        assert (info.num_frames, info.height, info.width) == (row.num_frames, row.height, row.width) == (12, 32, 32)
        assert row.fps == pytest.approx(10.0)
    # The clip holds the source's frames (b2 was seed 2).
    b2 = manifest.set_index("video_id").loc[vid("b2.mp4")]
    assert np.abs(decode_frames(storage.read_bytes(b2["uri"])).astype(int) - frames(12, 32, 32, seed=2)).mean() < 4

    rejects = storage.read_parquet(f"{out}/rejects.parquet").to_pandas()
    assert list(rejects.columns) == ["video", "video_id", "reason", "detail"]
    lines = {f"labels.csv line {len(GOOD) + 2 + i}": r for i, (*_, r) in enumerate(BAD)}
    assert dict(zip(rejects["video"], rejects["reason"])) == lines
    assert "labels.csv line 4" in rejects.set_index("reason").loc["duplicate", "detail"]  # b2.mp4
    names = [n.encode() for n, *_ in GOOD + BAD] + [str(source).encode(), b"P10"]
    for key, blob in _objects(s3, bucket).items():
        assert not any(n in blob or n in key.encode() for n in names), key

    # A re-run uploads and rewrites nothing, and the manifest is byte-identical.
    before = _objects(s3, bucket)
    counter = WriteCounter(monkeypatch)
    assert job.main(argv) == 0
    assert counter.uris == []
    assert _objects(s3, bucket) == before
    counts = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()[1:3])
    assert counts == {"ingested": "0", "already ingested": "8"}


def test_same_seed_same_split_and_given_splits(s3, bucket, source):
    items = I.labeled_items(str(source), str(source / "labels.csv"))
    a = I.ingest(items, f"{bucket}/a", seed=7, workers=1, keep_ids=True).manifest
    b = I.ingest(items, f"{bucket}/b", seed=7, workers=1, keep_ids=True).manifest
    assert a[["video_id", "patient_id", "split"]].equals(b[["video_id", "patient_id", "split"]])

    # A split column in labels.csv is used as given and validated.
    labels = pd.read_csv(source / "labels.csv").head(8)
    labels["split"] = ["train", "train", "val", "test", "train", "train", "val", "test"]
    storage.write_text(f"{bucket}/labels.csv", labels.to_csv(index=False))
    given = I.ingest(I.labeled_items(str(source), f"{bucket}/labels.csv"), f"{bucket}/c", workers=1, keep_ids=True)
    got = given.manifest.set_index("video_id")["split"].to_dict()
    assert got == {I.safe_id(v): s for v, s in zip(labels["video"], labels["split"])}
    with pytest.raises(I.IngestError, match="split column"):
        I.ingest(I.labeled_items(str(source), f"{bucket}/labels.csv"), f"{bucket}/d", folds=2, keep_ids=True)
    labels.loc[1, "split"] = "test"  # P1 now in train and test
    storage.write_text(f"{bucket}/labels.csv", labels.to_csv(index=False))
    with pytest.raises(M.ManifestError, match="patient 'P1' is in more than one split"):
        I.ingest(I.labeled_items(str(source), f"{bucket}/labels.csv"), f"{bucket}/e", workers=1, keep_ids=True)


def test_cli_exit_codes(s3, bucket, tmp_path, capsys, monkeypatch):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"")
    pd.DataFrame({"video": ["a.mp4"], "label": ["benign"]}).to_csv(tmp_path / "l.csv", index=False)
    base = ["--out", f"{bucket}/x", "--videos", str(tmp_path / "v"), "--labels", str(tmp_path / "l.csv")]
    monkeypatch.delenv(I.SALT_ENV, raising=False)
    assert job.main(base) == 2  # no salt, no --keep-ids
    assert "pass --salt or set CLMAN_PATIENT_SALT" in capsys.readouterr().err
    base.append("--keep-ids")
    assert job.main(base) == 1  # nothing usable
    assert "no usable video" in capsys.readouterr().err
    assert storage.read_parquet(f"{bucket}/x/rejects.parquet").num_rows == 1
    assert job.main(base + ["--split", "0.5,0.5,0.5"]) == 2
    assert "must sum to 1" in capsys.readouterr().err
    pd.DataFrame({"clip": ["a.mp4"]}).to_csv(tmp_path / "bad.csv", index=False)
    assert job.main(base[:4] + ["--labels", str(tmp_path / "bad.csv"), "--keep-ids"]) == 2
    assert "missing column(s) ['video', 'label']" in capsys.readouterr().err


# -- DICOM ----------------------------------------------------------------------
NAME, MRN = "Doe^Jane", "MRN0042917"


def test_dicom_ingest_leaves_no_identifying_value(s3, bucket, monkeypatch, caplog):
    src = f"{bucket}/incoming"
    files = {
        "DOE_JANE_left.dcm": dicom_cine(sweep(10, 32, 32, gray=True), NAME, MRN),
        "DOE_JANE_right.dcm": dicom_cine(sweep(8, 32, 32, seed=3), NAME, MRN, frame_time_ms=50.0),
        "DOE_JANE_bad.dcm": b"not a dicom at all " * 20,
        "SMITH_JOHN.dcm": dicom_cine(sweep(9, 32, 32, seed=5, gray=True), "Smith^John", "MRN777"),
    }
    for name, data in files.items():
        storage.write_bytes(f"{src}/{name}", data)
    labels = pd.DataFrame(
        {
            "video": list(files) + ["DOE_JANE_missing.dcm"],
            "label": ["malignant", "malignant", "benign", "benign", "benign"],
        }
    )
    storage.write_text(f"{src}/labels.csv", labels.to_csv(index=False))
    items = I.dicom_items(src, f"{src}/labels.csv")

    monkeypatch.delenv(I.SALT_ENV, raising=False)
    with pytest.raises(I.IngestError, match="pass --salt or set CLMAN_PATIENT_SALT"):
        I.ingest(items, f"{bucket}/out", workers=1)

    monkeypatch.setenv(I.SALT_ENV, "s3cret-salt")
    caplog.set_level(logging.INFO)
    res = I.ingest(items, f"{bucket}/out", ratios=(0.5, 0.0, 0.5), workers=2)
    m = res.manifest.set_index("video_id")
    assert len(m) == 3
    assert m["patient_id"].nunique() == 2  # both Jane Doe loops are one (hashed) patient
    assert all(pid.startswith("p") and len(pid) == 17 for pid in m["patient_id"])
    assert sorted(m["num_frames"]) == [8, 9, 10]
    assert sorted(m["fps"].round(3)) == [20.0, 25.0, 25.0]  # from FrameTime (ms)
    assert set(m["source"]) == {"dicom"}
    assert all(v.startswith("v") and len(v) == 17 for v in m.index)
    rej = res.rejects.set_index("video")["reason"].to_dict()
    assert rej == {"labels.csv line 4": "not_a_video", "labels.csv line 6": "missing_file"}

    # Grep every output object, the log and the rejects for any identifying value.
    secrets = [
        b"Doe",
        b"Jane",
        b"DOE",
        b"JANE",
        MRN.encode(),
        b"19800101",
        b"Example Hospital",
        b"ACCMRN",
        b"Referrer",
        b"20240102",
        b"s3cret-salt",
        b"Smith",
        b"MRN777",
    ]
    outputs = {k: v for k, v in _objects(s3, bucket).items() if k.startswith("out/")}
    assert {k.split("/")[1] for k in outputs} == {"clips", "manifest.parquet", "rejects.parquet"}
    for key, blob in outputs.items():
        for secret in secrets:
            assert secret not in blob, f"{secret!r} found in {key}"
        assert b"DOE_JANE" not in key.encode()
    for secret in secrets:
        assert secret.decode() not in caplog.text
    # The pixels made it through (grayscale replicated, yuv420p round trip).
    left = m[m["num_frames"] == 10].iloc[0]
    got = decode_frames(storage.read_bytes(left["uri"]))[..., 0].astype(int)
    assert got.shape == (10, 32, 32)  # the whole frame changes over the sweep: nothing cropped
    assert np.abs(got - sweep(10, 32, 32, gray=True)).mean() < 3


def test_dicom_frames_for_predict():
    rgb = I.dicom_frames(dicom_cine(frames(5, 16, 16, seed=1), NAME, MRN))
    assert rgb.shape == (5, 16, 16, 3) and rgb.dtype == np.uint8
    gray = I.dicom_frames(dicom_cine(frames(4, 16, 16, gray=True), NAME, MRN))
    assert gray.shape == (4, 16, 16, 3)


# -- BUV layout --------------------------------------------------------------------
def ingest_buv(out: str, root: Path, *extra: str) -> int:
    """``jobs.ingest --layout buv`` of the clips under ``root/rawframes``, ids kept, split 0.5/0/0.5: the exit status."""
    return job.main(
        ["--out", out, "--layout", "buv", "--videos", str(root), "--keep-ids", "--split", "0.5,0,0.5", *extra]
    )


def test_buv_layout(s3, bucket, tmp_path):
    clips = {("benign", "x001"): 12, ("malignant", "y002"): 11}
    for (label, vid), n in clips.items():
        # Brightness rises with the frame number: natural order 1, 2, ..., 10 (not 1, 10, 2).
        buv_clip(tmp_path, label, vid, [np.full((24, 32), 20 + 18 * t, np.uint8) for t in range(n)], first=1)
    (tmp_path / "rawframes" / "benign" / "x001" / "Thumbs.db").write_bytes(b"junk")
    assert ingest_buv(f"{bucket}/buv", tmp_path, "--fps", "15") == 0
    m = M.read_manifest(f"{bucket}/buv/manifest.parquet").set_index("video_id")
    assert m["label"].to_dict() == {"x001": 0, "y002": 1}
    assert m["num_frames"].to_dict() == {"x001": 12, "y002": 11}
    assert set(m["fps"]) == {15.0}
    assert set(m["source"]) == {"buv"}
    means = decode_frames(storage.read_bytes(m.loc["x001", "uri"])).mean(axis=(1, 2, 3))
    assert (np.diff(means) > 10).all(), f"frames out of order: {means.round()}"


# -- patient data and bad rows ---------------------------------------------------------
def _folder(root: Path, names: list[str], n: int = 10, size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(pyav_mp4(frames(n, size, size, seed=i)))
    return root


def test_pseudonyms_are_keyed_and_stable(s3, bucket, tmp_path):
    src = _folder(tmp_path / "v", ["DOE_JANE_MRN0042917.mp4", "ROE_RICHARD_MRN0042918.mp4"])
    labels = pd.DataFrame(
        {
            "video": ["DOE_JANE_MRN0042917.mp4", "ROE_RICHARD_MRN0042918.mp4"],
            "label": ["benign", "malignant"],
            "patient_id": ["Doe^Jane MRN0042917", "Roe^Richard MRN0042918"],
        }
    )
    labels.to_csv(src / "labels.csv", index=False)
    items = I.labeled_items(str(src), str(src / "labels.csv"))
    a = I.ingest(items, f"{bucket}/a", ratios=(0.5, 0, 0.5), salt="one", workers=1).manifest
    b = I.ingest(items, f"{bucket}/b", ratios=(0.5, 0, 0.5), salt="one", workers=1).manifest
    c = I.ingest(items, f"{bucket}/c", ratios=(0.5, 0, 0.5), salt="two", workers=1).manifest
    assert a[["video_id", "patient_id"]].equals(b[["video_id", "patient_id"]])  # same salt, same ids
    assert not set(a["video_id"]) & set(c["video_id"]) and not set(a["patient_id"]) & set(c["patient_id"])
    import hashlib
    import hmac

    expect = "p" + hmac.new(b"one", b"patient\x00Doe^Jane MRN0042917", hashlib.sha256).hexdigest()[:16]
    assert expect in set(a["patient_id"])  # a keyed HMAC, not sha256(salt + id)
    assert set(a["source"]) == {"labels"} and all(u.rsplit("/", 1)[1][0] == "v" for u in a["uri"])


def test_bad_rows_each_named_by_line(s3, bucket, tmp_path, capsys):
    outside = _folder(tmp_path / "outside", ["x.mp4"])
    src = _folder(tmp_path / "v", ["a.mp4", "b.mp4", "c.mp4", "张三.mp4", "李四.mp4", "big.mp4"], size=32)
    (src / "tall.mp4").write_bytes(pyav_mp4(frames(30, 32, 32, seed=9)))
    rows = [
        ("a.mp4", "benign", "P1"),  # line 2
        ("../outside/x.mp4", "benign", "P2"),  # 3: outside --videos
        (str(outside / "x.mp4"), "benign", "P3"),  # 4: absolute
        ("b.mp4", "benign", "P4"),
        ("b.mp4", "malignant", "P4"),  # 5, 6: conflicting
        ("c.mp4", "benign", "P5"),
        ("./c.mp4", "benign", "P5"),  # 7, 8: the same row twice
        ("张三.mp4", "benign", "P6"),
        ("李四.mp4", "malignant", "P7"),  # 9, 10: distinct
        ("tall.mp4", "benign", "P8"),
    ]  # 11: 30 frames > --max-frames 20
    pd.DataFrame(rows, columns=["video", "label", "patient_id"]).to_csv(src / "labels.csv", index=False)
    out = f"{bucket}/rows"
    assert (
        job.main(
            [
                "--out",
                out,
                "--videos",
                str(src),
                "--labels",
                str(src / "labels.csv"),
                "--keep-ids",
                "--split",
                "0.5,0,0.5",
                "--max-frames",
                "20",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    rejects = storage.read_parquet(f"{out}/rejects.parquet").to_pandas().set_index("video")
    assert rejects["reason"].to_dict() == {
        "labels.csv line 3": "outside_videos",
        "labels.csv line 4": "outside_videos",
        "labels.csv line 5": "conflicting_rows",
        "labels.csv line 6": "conflicting_rows",
        "labels.csv line 8": "duplicate",
        "labels.csv line 11": "over_limit",
    }
    assert "line 6" in rejects.loc["labels.csv line 5", "detail"]
    assert "line 5" in rejects.loc["labels.csv line 6", "detail"]
    assert "30 frames, over the limit of 20" in rejects.loc["labels.csv line 11", "detail"]
    m = M.read_manifest(f"{out}/manifest.parquet")
    assert sorted(m["video_id"]) == sorted(["a", "c", "张三", "李四"])
    assert not storage.exists(f"{out}/clips/x.mp4")
    for detail in rejects["detail"]:
        assert str(tmp_path) not in detail

    # Size limit from the header; a labels.csv that is not UTF-8 is one line.
    assert (
        job.main(
            [
                "--out",
                f"{bucket}/side",
                "--videos",
                str(src),
                "--labels",
                str(src / "labels.csv"),
                "--keep-ids",
                "--max-side",
                "16",
                "--workers",
                "1",
            ]
        )
        == 1
    )
    side = storage.read_parquet(f"{bucket}/side/rejects.parquet").to_pandas().set_index("video")
    assert "32x32 pixels, over the limit of 16" in side.loc["labels.csv line 2", "detail"]
    (src / "latin1.csv").write_bytes("video,label\nJosé.mp4,benign\n".encode("latin-1"))
    capsys.readouterr()
    assert (
        job.main(["--out", f"{bucket}/l1", "--videos", str(src), "--labels", str(src / "latin1.csv"), "--keep-ids"])
        == 2
    )
    assert "line 2 is not UTF-8 (byte 0xe9)" in capsys.readouterr().err


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height grey pixels, with a tiny compressed body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # a few rows; the rest would decompress from nothing
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )


def test_buv_decompression_bomb_is_rejected_rest_ingested(s3, bucket, tmp_path):
    for label, vid in (("benign", "ok1"), ("malignant", "ok2")):
        buv_clip(tmp_path, label, vid, [frames(1, 24, 32, seed=t + 10 * len(vid + label))[0] for t in range(6)])
    for vid, side in (("bomb", 60000), ("big", 5000)):  # PIL's own limit; ours (--max-side 4096)
        bomb = tmp_path / "rawframes" / "malignant" / vid
        bomb.mkdir(parents=True)
        shutil.copy(tmp_path / "rawframes" / "benign" / "ok1" / "0.png", bomb / "0.png")
        (bomb / "1.png").write_bytes(_png_bomb(side, side))
    assert ingest_buv(f"{bucket}/buv", tmp_path) == 0
    rejects = storage.read_parquet(f"{bucket}/buv/rejects.parquet").to_pandas().set_index("video_id")
    assert rejects["reason"].tolist() == ["over_limit", "over_limit"]
    assert "frame 2: 3600000000 pixels, a decompression bomb" in rejects.loc["bomb", "detail"]
    assert "frame 2: 5000x5000 pixels, over the limit of 4096" in rejects.loc["big", "detail"]
    assert sorted(M.read_manifest(f"{bucket}/buv/manifest.parquet")["video_id"]) == ["ok1", "ok2"]


def test_ingest_into_an_existing_manifest_merges(s3, bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(I.SALT_ENV, "merge-salt")
    src = _folder(tmp_path / "v", [f"{c}{i}.mp4" for c in "ab" for i in range(4)])
    first = pd.DataFrame({"video": [f"a{i}.mp4" for i in range(4)], "label": ["benign", "malignant"] * 2})
    second = pd.DataFrame(
        {"video": [f"b{i}.mp4" for i in range(4)] + ["a0.mp4"], "label": ["benign", "malignant"] * 2 + ["benign"]}
    )
    first.to_csv(src / "first.csv", index=False)
    second.to_csv(src / "second.csv", index=False)
    out = f"{bucket}/merge"
    base = ["--out", out, "--videos", str(src), "--split", "0.5,0,0.5", "--workers", "1"]
    assert job.main(base + ["--labels", str(src / "first.csv")]) == 0
    before = M.read_manifest(f"{out}/manifest.parquet").set_index("video_id")
    capsys.readouterr()
    assert job.main(base + ["--labels", str(src / "second.csv")]) == 0
    printed = capsys.readouterr().out
    after = M.read_manifest(f"{out}/manifest.parquet").set_index("video_id")
    assert len(before) == 4 and len(after) == 8 and set(before.index) <= set(after.index)
    assert after.loc[before.index, "split"].equals(before["split"])  # earlier patients keep their split
    counts = dict(line.rsplit(None, 1) for line in printed.splitlines()[1:4])
    assert counts == {"ingested": "4", "already ingested": "1", "kept from the manifest": "3"}


def test_dicom_banner_text_is_cut_by_default_and_videos_on_request(s3, bucket, tmp_path, caplog, monkeypatch):
    from tests.test_scan_region import best_match, sweep as banner_sweep, text_patch

    monkeypatch.setenv(I.SALT_ENV, "banner-salt")
    video, text = banner_sweep(top=16, bottom=12, clock=True)
    src = tmp_path / "dicom"
    src.mkdir()
    (src / "DOE_JANE.dcm").write_bytes(dicom_cine(video, NAME, MRN))
    (src / "DOE_JANE.mp4").write_bytes(pyav_mp4(np.stack([video] * 3, axis=-1)))
    pd.DataFrame({"video": ["DOE_JANE.dcm"], "label": ["benign"]}).to_csv(src / "d.csv", index=False)
    pd.DataFrame({"video": ["DOE_JANE.mp4"], "label": ["benign"]}).to_csv(src / "v.csv", index=False)
    caplog.set_level(logging.INFO)
    patch = text_patch(video, text)
    runs = {
        "dicom": ["--dicom", str(src), "--labels", str(src / "d.csv")],
        "dicom-off": ["--dicom", str(src), "--labels", str(src / "d.csv"), "--scan-region", "off"],
        "video-auto": ["--videos", str(src), "--labels", str(src / "v.csv"), "--scan-region", "auto"],
        "video": ["--videos", str(src), "--labels", str(src / "v.csv")],
    }
    cut = {}
    for name, args in runs.items():
        assert job.main(["--out", f"{bucket}/{name}", "--split", "1,0,0", *args]) == 0
        row = M.read_manifest(f"{bucket}/{name}/manifest.parquet").iloc[0]
        clip = decode_frames(storage.read_bytes(row["uri"]))[..., 1]
        cut[name] = (row["height"], row["width"]) == (video.shape[1] - 28, video.shape[2])
        assert (best_match(clip, patch) < 0.5) == cut[name], name  # the name line is gone where cut
    assert cut == {"dicom": True, "dicom-off": False, "video-auto": True, "video": False}
    assert "labels.csv line 2: scan region x=0 y=16" in caplog.text and "cut 16 rows above, 12 below" in caplog.text
