"""Patient data never leaves the hospital's source folder: the whole job sequence, then every byte read back.

A labels.csv of names and record numbers (as hospital exports are named) goes through
ingest, finetune (1 epoch), evaluate, predict and a one-trial jobs.tune sweep, each a
subprocess with its own local Ray, against the real SeaweedFS. Then every object of the
bucket (keys and bytes; Parquet also as text, zip members unpacked), every local output,
every job's log and every file of the jobs' Ray sessions (RAY_TMPDIR) is searched for any source name, patient id,
source path, the salt and the S3 secret key. The id map, asked for, holds the names and
is the one place that does.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from clman import storage
from clman.data.synth import SynthConfig, write_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO = "jobs/configs/demo-cpu.yaml"
SALT = "hospital-secret-salt-0042"
TINY = [
    "scale.num_workers=1",
    "scale.cpus_per_worker=0.45",
    "data.decode_cpus=0.45",
    "data.size=32",
    "data.num_frames=4",
    "model.width=0.125",
    "model.gn_groups=4",
    "finetune.batch_size=4",
    "finetune.epochs=1",
    "evaluate.bootstrap=20",
]
SURNAMES = ["DOE", "ROE", "POE", "MOE", "LOWE", "KNOWLES", "BLACK", "WHITE", "GREEN", "BROWN", "STONE", "WOOD"]


def _sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _phi_source(tmp: Path) -> tuple[Path, list[str]]:
    """24 synthetic sweeps renamed as a hospital export: file names and patient ids carry names and MRNs.

    Returns the folder and every identifying string in it."""
    raw = tmp / "export" / "Breast US 2026 (Dr Smith)"
    write_dataset(str(raw), 24, seed=0, cfg=SynthConfig(size=32, frames=8), workers=1, progress=False)
    labels = pd.read_csv(raw / "labels.csv", dtype=str)
    secrets, rows = [str(raw), "Dr Smith"], []
    for i, row in enumerate(labels.itertuples(index=False)):
        surname, mrn = SURNAMES[i // 2], f"MRN{4200000 + i // 2}"
        name = f"{surname}_JANE_{mrn}_{'LR'[i % 2]}.mp4"
        os.rename(raw / row.video, raw / name)
        rows.append({"video": name, "label": row.label, "patient_id": f"{surname.title()}^Jane {mrn}"})
        secrets += [name, name[:-4], mrn, f"{surname.title()}^Jane", f"{surname}_JANE"]
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)
    return raw, sorted(set(secrets))


def _run(args: list[str], log: Path, env: dict) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900
        )
    assert proc.returncode == 0, log.read_text()[-4000:]


def _texts(key: str, blob: bytes):
    """The bytes of an object, and what it holds in readable form (Parquet as CSV, zip members)."""
    yield blob
    if blob[:4] == b"PAR1":
        yield pq.read_table(io.BytesIO(blob)).to_pandas().to_csv().encode()
    if blob[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for name in z.namelist():
                yield name.encode()
                yield z.read(name)


def _leaks(where: str, blob: bytes, needles: list[bytes]) -> list[str]:
    return [f"{n.decode()!r} in {where}" for n in needles if n in blob]


@pytest.mark.slow
def test_no_patient_identifier_or_secret_anywhere(s3, tmp_path):
    bucket = s3.make_bucket("phi-check")
    raw, secrets = _phi_source(tmp_path)
    private, outputs = tmp_path / "private", tmp_path / "outputs"
    private.mkdir()
    outputs.mkdir()
    # Each job's Ray writes its session (logs, runtime-env records) here, to be searched too; short,
    # for Ray's unix socket paths.
    ray_tmp = Path(tempfile.mkdtemp(prefix="phi-ray-", dir="/tmp"))
    env = {
        **os.environ,
        "CLMAN_PATIENT_SALT": SALT,
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",
        "RAY_TMPDIR": str(ray_tmp),
    }
    secret_key = os.environ["AWS_SECRET_ACCESS_KEY"]
    data, runs = f"{bucket}/data", f"{bucket}/runs"
    id_map = private / "id-map.csv"

    _run(
        [
            "jobs.ingest",
            "--out",
            data,
            "--videos",
            str(raw),
            "--labels",
            str(raw / "labels.csv"),
            "--split",
            "0.5,0.25,0.25",
            "--id-map",
            str(id_map),
        ],
        outputs / "ingest.log",
        env,
    )
    manifest = f"{data}/manifest.parquet"
    _run(
        ["jobs.finetune", "--manifest", manifest, "--out", runs, "--run-name", "fin", "--config", DEMO, *_sets(TINY)],
        outputs / "finetune.log",
        env,
    )
    _run(
        [
            "jobs.evaluate",
            "--checkpoint",
            f"{runs}/fin/model.pt",
            "--manifest",
            manifest,
            "--config",
            DEMO,
            *_sets(TINY),
        ],
        outputs / "evaluate.log",
        env,
    )
    videos = sorted(str(p) for p in raw.glob("*.mp4"))[:2]
    _run(
        ["jobs.predict", "--checkpoint", f"{runs}/fin/model.pt", *videos, "--json", f"{bucket}/predict/p.json"],
        outputs / "predict.log",
        env,
    )
    _run(
        ["jobs.predict", "--checkpoint", f"{runs}/fin/model.pt", *videos, "--json", str(outputs / "predictions.json")],
        outputs / "predict-local.log",
        env,
    )
    space = outputs / "space.yaml"
    space.write_text("finetune.lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    _run(
        [
            "jobs.tune",
            "--job",
            "finetune",
            "--space",
            str(space),
            "--samples",
            "1",
            "--manifest",
            manifest,
            "--out",
            f"{bucket}/sweeps",
            "--run-name",
            "one",
            "--config",
            DEMO,
            *_sets(TINY),
        ],
        outputs / "tune.log",
        env,
    )

    needles = [s.encode() for s in secrets] + [SALT.encode(), secret_key.encode()]
    leaks: list[str] = []
    client = s3.client()
    name = bucket[len("s3://") :]
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("tuner.pkl") for k in keys), keys  # the sweep's pickled state is there to check
    assert any(k.endswith("predictions.parquet") for k in keys) and "predict/p.json" in keys
    for key in keys:
        leaks += _leaks(f"key {key}", key.encode(), needles)
        for text in _texts(key, client.get_object(Bucket=name, Key=key)["Body"].read()):
            leaks += _leaks(f"s3://{name}/{key}", text, needles)
    ray_files = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    assert sum("/logs/" in str(p) for p in ray_files) > 20  # five sessions' logs
    for path in [p for p in outputs.rglob("*") if p.is_file()] + ray_files:
        for text in _texts(path.name, path.read_bytes()):
            leaks += _leaks(str(path), text, needles)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks, "\n".join(sorted(set(leaks))[:40])

    # The id map, asked for, is the one place that names the sources, and it maps every video.
    mapping = pd.read_csv(id_map, dtype=str)
    rows = storage.read_parquet(manifest).to_pandas()
    assert set(mapping["video_id"]) == set(rows["video_id"]) and len(rows) == 24
    by_id = mapping.set_index("video_id")
    for row in rows.itertuples():
        assert by_id.loc[row.video_id, "patient_id"] == row.patient_id
        assert (raw / by_id.loc[row.video_id, "source_video"]).is_file()
    assert mapping["source_patient_id"].str.contains("MRN").all()
    predictions = (outputs / "predictions.json").read_text()
    assert '"sha256"' in predictions and "video 1" in predictions
