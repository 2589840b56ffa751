"""Unlabelled videos (issue 23): ingested into split ``unlabeled`` (label -1, fold -1), read by SimCLR
(``jobs.pretrain --splits``, the study's per-cell pool), never by finetuning, scoring, evaluation or a
study's folds. Ingest on tiny real videos and the real local S3; the selections at unit level, no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clman import storage
from clman.data import ingest as I
from clman.data import manifest as M
from clman.errors import JobError
from jobs import ingest as job
from tests.media import buv_clip, dicom_cine, frames, pyav_mp4, sweep
from tests.test_ingest import ingest_buv
from tests.test_study import manifest_rows

SALT = "unlabelled-salt"


# ---------------------------------------------------------------- the manifest rules


def _rows(n_labelled: int = 20, n_unlabelled: int = 6) -> pd.DataFrame:
    """Labelled patients (1/3 malignant, 1-2 videos each) and unlabelled ones, split not yet assigned."""
    rows = []
    for p in range(n_labelled + n_unlabelled):
        unl = p >= n_labelled
        for v in range(1 + p % 2):
            rows.append(
                {
                    "video_id": f"p{p:02d}v{v}",
                    "patient_id": f"p{p:02d}",
                    "label": M.UNLABELED_LABEL if unl else int(p % 3 == 0),
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


@pytest.mark.parametrize("how", [{"ratios": (0.6, 0.0, 0.4)}, {"ratios": (0.5, 0.2, 0.3)}, {"folds": 4}])
def test_assign_splits_stratifies_the_labelled_alone(how):
    rows = _rows()
    labelled = rows[rows["label"] >= 0]
    alone = M.assign_splits(labelled, seed=5, **how).set_index("video_id")
    mixed = M.assign_splits(rows.sample(frac=1.0, random_state=2), seed=5, **how).set_index("video_id")
    # The labelled rows: the same split and fold with or without the unlabelled beside them.
    assert mixed.loc[alone.index, ["split", "fold"]].equals(alone[["split", "fold"]])
    unl = mixed[mixed["label"] == M.UNLABELED_LABEL]
    assert len(unl) and set(unl["split"]) == {M.UNLABELED} and set(unl["fold"]) == {-1}
    assert mixed["fold"].dtype == np.int8
    M.validate_manifest(mixed.reset_index()[list(M.COLUMNS)])
    # Only unlabelled rows: nothing to stratify, all go to the pool.
    only = M.assign_splits(rows[rows["label"] < 0], seed=5, **how)
    assert set(only["split"]) == {M.UNLABELED}
    # A patient with both kinds is refused.
    both = rows.copy()
    both.loc[both["video_id"] == "p21v0", "patient_id"] = "p00"
    with pytest.raises(M.ManifestError, match="patient 'p00' has labelled and unlabelled videos"):
        M.assign_splits(both, seed=5, **how)


def test_validate_ties_label_minus_one_to_split_unlabeled(tmp_path):
    df = M.assign_splits(_rows(), (0.6, 0.0, 0.4), seed=0)
    uri = str(tmp_path / "manifest.parquet")
    M.write_manifest(df, uri)
    back = M.read_manifest(uri)
    assert (back["label"] == -1).sum() == (back["split"] == M.UNLABELED).sum() > 0
    assert set(M.read_manifest(uri, split=M.UNLABELED)["label"]) == {-1}
    assert M.UNLABELED not in set(M.labeled(back)["split"]) and len(M.labeled(back)) == (back["label"] >= 0).sum()
    train = df.index[df["split"] == "train"][0]
    unl = df.index[df["split"] == M.UNLABELED][0]
    for change, match in [
        (
            {"label": {train: -1}},
            r"label -1 is not 0 \(benign\) or 1 \(malignant\) \(-1 marks an "
            r"unlabelled video: split 'unlabeled' only\)",
        ),
        ({"label": {unl: 0}}, "is in split 'unlabeled' with label 0; unlabelled videos have label -1"),
        ({"fold": {unl: 1}}, "is in split 'unlabeled' with fold 1; unlabelled videos are in no fold"),
    ]:
        bad = df.copy()
        for col, cells in change.items():
            for i, v in cells.items():
                bad.loc[i, col] = v
        with pytest.raises(M.ManifestError, match=match):
            M.write_manifest(bad, str(tmp_path / "bad.parquet"))
    with pytest.raises(M.ManifestError, match="split 'unlabeled' holds videos without a label"):
        M.check_labeled_split(M.UNLABELED, uri)


# ---------------------------------------------------------------- ingest


def _folder(root: Path, names: list[str], n: int = 8, size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).write_bytes(pyav_mp4(frames(n, size, size, seed=i)))
    return root


LABELLED = [
    ("b1.mp4", "benign", "P1"),
    ("b2.mp4", "benign", "P2"),
    ("b3.mp4", "0", "P3"),
    ("b7.mp4", "benign", "P7"),
    ("m4.mp4", "malignant", "P4"),
    ("m5.mp4", "1", "P5"),
    ("m6.mp4", "malignant", "P6"),
    ("m8.mp4", "malignant", "P8"),
]
UNLABELLED = [("u1.mp4", "", "U1"), ("u2.mp4", "", "U2"), ("u3.mp4", "unlabeled", "U3")]
BAD = [
    ("odd.mp4", "maybe", "P9", "unknown_label"),  # an invalid label is still refused
    ("b1-extra.mp4", "", "P1", "mixed_patient"),
]  # unlabelled, but P1 has a labelled video


def _csv(path: Path, rows, columns=("video", "label", "patient_id")) -> str:
    pd.DataFrame([r[: len(columns)] for r in rows], columns=list(columns)).to_csv(path, index=False)
    return str(path)


def test_ingest_empty_labels_go_to_unlabeled_and_leave_the_labelled_split_alone(s3, bucket, tmp_path):
    names = [r[0] for r in LABELLED + UNLABELLED + BAD]
    src = _folder(tmp_path / "v", names)
    only = I.ingest(
        I.labeled_items(str(src), _csv(src / "l.csv", LABELLED)),
        f"{bucket}/l",
        ratios=(0.5, 0.0, 0.5),
        seed=3,
        workers=1,
        keep_ids=True,
    ).manifest.set_index("video_id")
    res = I.ingest(
        I.labeled_items(str(src), _csv(src / "all.csv", LABELLED + UNLABELLED + BAD)),
        f"{bucket}/all",
        ratios=(0.5, 0.0, 0.5),
        seed=3,
        workers=1,
        keep_ids=True,
    )
    m = res.manifest.set_index("video_id")
    # The labelled rows: the same split as without the unlabelled ones (same seed), still stratified.
    assert m.loc[only.index, ["split", "fold"]].equals(only[["split", "fold"]])
    assert set(only["split"]) == {"train", "test"}
    per = only.groupby(["label", "split"]).size().to_dict()
    assert per == {(0, "test"): 2, (0, "train"): 2, (1, "test"): 2, (1, "train"): 2}
    unl = m[m["split"] == M.UNLABELED]
    assert sorted(unl.index) == ["u1", "u2", "u3"]
    assert set(unl["label"]) == {-1} and set(unl["fold"]) == {-1} and set(unl["patient_id"]) == {"U1", "U2", "U3"}
    assert unl["num_frames"].tolist() == [8, 8, 8]
    rejects = res.rejects.set_index("video")["reason"].to_dict()
    first_bad = len(LABELLED + UNLABELLED) + 2
    assert rejects == {f"labels.csv line {first_bad + i}": r for i, (*_, r) in enumerate(BAD)}
    detail = res.rejects.set_index("reason").loc["mixed_patient", "detail"]
    assert "also has labelled videos (labels.csv line 2)" in detail
    # Rejected before pass 2: never transcoded, nothing uploaded.
    assert not storage.exists(f"{bucket}/all/clips/b1-extra.mp4")
    assert "unlabeled" in I.summary_table(res)


def test_cli_unlabeled_merges_into_a_fold_manifest_and_patients_keep_their_kind(s3, bucket, tmp_path, capsys):
    src = _folder(tmp_path / "v", [r[0] for r in LABELLED + UNLABELLED] + ["m4b.mp4", "u2b.mp4"])
    out = f"{bucket}/merge"
    base = ["--out", out, "--videos", str(src), "--keep-ids", "--workers", "1"]
    assert job.main(base + ["--labels", _csv(src / "l.csv", LABELLED), "--folds", "2"]) == 0
    before = M.read_manifest(f"{out}/manifest.parquet").set_index("video_id")

    # --unlabeled: labels.csv needs no label column; no --folds needed to add unlabelled videos alone.
    sweeps = _csv(src / "sweeps.csv", UNLABELLED, columns=("video",))
    assert job.main(base + ["--labels", sweeps]) == 2
    assert "missing column(s) ['label']" in capsys.readouterr().err
    assert job.main(base + ["--labels", sweeps, "--unlabeled"]) == 0
    assert "unlabeled" in capsys.readouterr().out
    after = M.read_manifest(f"{out}/manifest.parquet").set_index("video_id")
    assert after.loc[before.index].equals(before)  # earlier rows kept as they were
    unl = after.drop(before.index)
    assert sorted(unl.index) == ["u1", "u2", "u3"] and set(unl["split"]) == {M.UNLABELED}
    assert set(unl["label"]) == {-1} and set(unl["fold"]) == {-1}
    assert set(unl["patient_id"]) == {"u1", "u2", "u3"}  # no patient_id column: each video its own patient
    # --unlabeled with a label in the file: which is meant? One line, exit 2.
    assert job.main(base + ["--labels", _csv(src / "lab.csv", LABELLED[:1]), "--unlabeled"]) == 2
    assert "line 2 has label 'benign' but --unlabeled" in capsys.readouterr().err
    assert job.main(["--out", out, "--videos", str(src), "--layout", "buv", "--unlabeled", "--keep-ids"]) == 2
    assert "rawframes/unlabeled/" in capsys.readouterr().err

    # A later labels.csv: u1 listed again with its label becomes labelled (its patient had no other
    # video); an unlabelled video of labelled P4 and a labelled one of unlabelled u2 are rejected.
    later = [("u1.mp4", "benign", "u1"), ("m4b.mp4", "", "P4"), ("u2b.mp4", "malignant", "u2")]
    assert job.main(base + ["--labels", _csv(src / "later.csv", later), "--folds", "2"]) == 0
    last = M.read_manifest(f"{out}/manifest.parquet").set_index("video_id")
    assert last.loc["u1", "label"] == 0 and last.loc["u1", "split"] == "train" and last.loc["u1", "fold"] in (0, 1)
    assert last.loc[["u2", "u3"], "split"].tolist() == [M.UNLABELED] * 2
    assert last.loc[before.index].equals(before)
    assert "m4b" not in last.index and "u2b" not in last.index
    rejects = storage.read_parquet(f"{out}/rejects.parquet").to_pandas().set_index("video")
    assert rejects["reason"].to_dict() == {"labels.csv line 3": "mixed_patient", "labels.csv line 4": "mixed_patient"}
    assert "1 labelled video(s) in the manifest" in rejects.loc["labels.csv line 3", "detail"]
    assert "1 unlabelled video(s) in the manifest" in rejects.loc["labels.csv line 4", "detail"]


def test_split_column_and_unlabelled_rows(s3, bucket, tmp_path):
    rows = [
        ("b1.mp4", "benign", "P1", "train"),
        ("m4.mp4", "malignant", "P4", "test"),
        ("u1.mp4", "", "U1", ""),
        ("u2.mp4", "", "U2", "unlabeled"),
        ("u3.mp4", "", "U3", "train"),  # line 6: no label, yet split train
        ("b2.mp4", "benign", "P2", "unlabeled"),
    ]  # line 7: a label, yet split unlabeled
    src = _folder(tmp_path / "v", [r[0] for r in rows])
    labels = _csv(src / "s.csv", rows, columns=("video", "label", "patient_id", "split"))
    res = I.ingest(I.labeled_items(str(src), labels), f"{bucket}/s", workers=1, keep_ids=True)
    assert res.manifest.set_index("video_id")["split"].to_dict() == {
        "b1": "train",
        "m4": "test",
        "u1": M.UNLABELED,
        "u2": M.UNLABELED,
    }
    assert res.rejects.set_index("video")["reason"].to_dict() == {
        "labels.csv line 6": "unlabeled_split",
        "labels.csv line 7": "unlabeled_split",
    }


def test_buv_unlabeled_folder(s3, bucket, tmp_path):
    for i, (label, vid) in enumerate((("benign", "x1"), ("malignant", "y1"), ("unlabeled", "z1"), ("unlabeled", "z2"))):
        buv_clip(tmp_path, label, vid, frames(6, 24, 32, seed=i))
    assert ingest_buv(f"{bucket}/buv", tmp_path) == 0
    m = M.read_manifest(f"{bucket}/buv/manifest.parquet").set_index("video_id")
    assert m["label"].to_dict() == {"x1": 0, "y1": 1, "z1": -1, "z2": -1}
    assert m.loc[["z1", "z2"], "split"].tolist() == [M.UNLABELED] * 2
    assert sorted(m.loc[["x1", "y1"], "split"]) == ["test", "train"]


def test_dicom_patient_from_the_header_settles_mixed_patients_before_decoding(s3, bucket, monkeypatch):
    src = f"{bucket}/dicom"
    files = {
        "a.dcm": dicom_cine(sweep(8, 32, 32, gray=True), "Doe^Jane", "MRN1"),
        "b.dcm": dicom_cine(sweep(8, 32, 32, seed=2, gray=True), "Doe^Jane", "MRN1"),
        "c.dcm": dicom_cine(sweep(8, 32, 32, seed=4, gray=True), "Roe^Rick", "MRN2"),
    }
    for name, data in files.items():
        storage.write_bytes(f"{src}/{name}", data)
    storage.write_text(f"{src}/labels.csv", "video,label\na.dcm,malignant\nb.dcm,\nc.dcm,\n")
    monkeypatch.setenv(I.SALT_ENV, SALT)
    res = I.ingest(
        I.dicom_items(src, f"{src}/labels.csv"), f"{bucket}/out", ratios=(1.0, 0.0, 0.0), workers=1, scan_region=None
    )
    assert res.rejects.set_index("video")["reason"].to_dict() == {"labels.csv line 3": "mixed_patient"}
    m = res.manifest
    assert sorted(m["split"]) == ["train", M.UNLABELED] and m["patient_id"].nunique() == 2
    assert len(storage.list_uris(f"{bucket}/out/clips")) == 2  # b.dcm was never transcoded


# ---------------------------------------------------------------- who reads which rows


@pytest.fixture
def manifest_uri(tmp_path) -> str:
    """A manifest with train / val / test and unlabelled rows (local path)."""
    df = M.assign_splits(_rows(), (0.5, 0.2, 0.3), seed=1)
    uri = str(tmp_path / "m" / "manifest.parquet")
    M.write_manifest(df, uri)
    return uri


def test_pretrain_selects_the_splits_asked_for(manifest_uri, tmp_path):
    from clman.train import pretrain

    df = M.read_manifest(manifest_uri)
    rows = pretrain.check_data(manifest_uri, "train,unlabeled")
    assert pretrain.splits_of(rows) == ("train", M.UNLABELED)
    assert set(rows["video_id"]) == set(df.loc[df["split"].isin(["train", M.UNLABELED]), "video_id"])
    assert pretrain.splits_of(pretrain.check_data(manifest_uri, [M.UNLABELED, "train"])) == ("train", M.UNLABELED)
    default = pretrain.check_data(manifest_uri)  # every split but test
    assert pretrain.splits_of(default) == ("train", "val", M.UNLABELED)
    assert set(default["video_id"]) == set(df.loc[df["split"] != "test", "video_id"])
    assert pretrain.splits_of(pretrain.check_data(manifest_uri, "train")) == ("train",)  # what tune passes
    with pytest.raises(JobError, match=r"unknown split\(s\) \['dev'\]"):
        pretrain.check_data(manifest_uri, "train,dev")
    labelled_only = str(tmp_path / "l" / "manifest.parquet")
    M.write_manifest(M.labeled(df), labelled_only)
    with pytest.raises(JobError, match=r"split\(s\) \['unlabeled'\] hold no videos"):
        pretrain.check_data(labelled_only, "train,unlabeled")
    assert pretrain.splits_of(pretrain.check_data(labelled_only)) == ("train", "val")


def test_pretrain_job_records_the_splits_in_its_fingerprint(manifest_uri, tmp_path, monkeypatch):
    from clman.launch import trainer
    from jobs import pretrain as job_pretrain

    records = []

    class Stop(Exception):
        pass

    def claim(out, run_name, record, force_resume):
        records.append(record)
        raise Stop

    monkeypatch.setattr(trainer, "claim", claim)
    from clman import config as C

    cfg = C.load("pretrain", None, [])
    for splits, recorded in ((None, "train,val,unlabeled"), ("unlabeled,train", "train,unlabeled")):
        with pytest.raises(Stop):
            job_pretrain.run(cfg, manifest_uri, str(tmp_path / "runs"), "pre", splits)
        assert records[-1]["config"]["--splits"] == recorded
    assert records[0]["sha256"]["config"] != records[1]["sha256"]["config"]

    # The CLI: --splits, and --split as its deprecated one-split alias.
    seen = []
    monkeypatch.setattr(job_pretrain, "run", lambda cfg, manifest, out, name, splits, *a: seen.append(splits))
    argv = ["--manifest", manifest_uri, "--out", str(tmp_path / "runs")]
    assert job_pretrain.main(argv + ["--splits", "train,unlabeled"]) == 0
    assert job_pretrain.main(argv + ["--split", "train"]) == 0
    assert job_pretrain.main(argv) == 0
    assert seen == ["train,unlabeled", "train", None]
    with pytest.raises(C.ConfigError, match="give --splits only"):
        job_pretrain.main(argv + ["--split", "train", "--splits", "train"])


def test_finetune_scoring_and_evaluate_never_see_unlabelled(manifest_uri):
    import ray

    from clman import config as C
    from clman.evaluate import scoring
    from clman.launch import trainer
    from clman.train import finetune
    from jobs import evaluate

    train, val = finetune.check_data(manifest_uri)
    assert set(train["split"]) == {"train"} and set(val["split"]) == {"val"}
    carved_train, carved_val, _ = finetune.validation_split(train, val.iloc[:0], 0.3, seed=0)
    assert set(carved_train["label"]) | set(carved_val["label"]) == {0, 1}
    with pytest.raises(AssertionError, match="finetune train rows hold a label other than 0 / 1"):
        trainer.finetune_job(
            C.load("finetune", None, []),
            manifest_uri,
            None,
            has_val=False,
            rows=(M.read_manifest(manifest_uri, split=M.UNLABELED), None),
        )
    started = ray.is_initialized()
    with pytest.raises(M.ManifestError, match="split 'unlabeled' holds videos without a label"):
        scoring.score_split("no-such-model.pt", manifest_uri, M.UNLABELED, C.load("evaluate", None, []))
    with pytest.raises(M.ManifestError, match="split 'unlabeled' holds videos without a label"):
        evaluate.run("no-such-model.pt", manifest_uri, M.UNLABELED, C.load("evaluate", None, []))
    assert ray.is_initialized() == started  # refused before Ray


# ---------------------------------------------------------------- the study


def _study_manifest(folds: int) -> pd.DataFrame:
    labelled = manifest_rows([2] * 30)
    placed = (
        M.assign_splits(labelled, folds=folds, seed=0) if folds else M.assign_splits(labelled, (0.6, 0.0, 0.4), seed=0)
    )
    row = labelled.iloc[0].to_dict()
    pool = pd.DataFrame(
        [{**row, "video_id": f"u{i}", "patient_id": f"q{i}", "label": -1, "split": M.UNLABELED} for i in range(7)]
    )
    return pd.concat([placed, pool], ignore_index=True)


@pytest.mark.parametrize("folds", [3, None])
def test_study_folds_and_pretrain_pool(folds, tmp_path):
    from clman import study
    from clman.study.driver import TRAINING_SPLITS, pretrain_pool

    m = _study_manifest(folds or 0)
    plan = study.plan_folds(m, folds=folds, holdout=folds is None)
    ref = study.plan_folds(M.labeled(m), folds=folds, holdout=folds is None)
    assert plan.folds == ref.folds and len(plan.unlabeled) == 7 and len(ref.unlabeled) == 0
    assert "7 unlabelled videos of 7 other patients" in plan.describe()
    pool_ids = {f"u{i}" for i in range(7)}
    for fold in plan.folds:
        sp, sr = plan.split(fold, 1), ref.split(fold, 1)
        for k in ("train", "val", "test"):  # the folds, the carve: as without the unlabelled videos
            assert getattr(sp, k)["video_id"].tolist() == getattr(sr, k)["video_id"].tolist()
            assert not set(getattr(sp, k)["video_id"]) & pool_ids
        pool = set(sp.pretraining_pool["video_id"])
        assert pool == set(sp.train["video_id"]) | set(sp.val["video_id"]) | pool_ids
        assert not pool & set(sp.test["video_id"])  # never a held-out video
        # What run_pretrain reads from the cell manifest (as run_study writes it) is that pool.
        uri = str(tmp_path / f"cell{fold}" / "manifest.parquet")
        M.write_manifest(sp.manifest(), uri)
        assert set(pretrain_pool(uri)["video_id"]) == pool
        assert set(TRAINING_SPLITS) == {"train", "val", M.UNLABELED}
        # The finetune and scoring reads of a trial (explicit splits) hold no unlabelled video.
        for split in ("train", "val", "test"):
            assert not set(M.read_manifest(uri, split=split)["video_id"]) & pool_ids
    # A manifest of unlabelled videos alone cannot be studied.
    with pytest.raises(study.StudyError, match="no labelled videos \\(only 7 unlabelled ones\\)"):
        study.plan_folds(m[m["split"] == M.UNLABELED], folds=folds, holdout=folds is None)


def test_run_pretrain_trains_on_the_pool(tmp_path, monkeypatch):
    from clman.study import driver as train_study

    uri = str(tmp_path / "m.parquet")
    M.write_manifest(_study_manifest(3), uri)
    run = train_study.plan_study(uri, str(tmp_path / "out"), "s", rows="clman", folds=3)
    fold, seed = run.cells[1]
    sp = run.split(fold, seed)
    M.write_manifest(sp.manifest(), run.cell_manifest(fold, seed))
    asked = []

    class Stop(Exception):
        pass

    def pretrain_job(cfg, manifest, split, *a, **k):
        asked.append(set(M.read_manifest(manifest, split=split)["video_id"]))
        raise Stop

    monkeypatch.setattr(train_study.trainer, "pretrain_job", pretrain_job)
    with pytest.raises(Stop):
        train_study.run_pretrain(run, fold, seed)
    assert asked == [set(sp.pretraining_pool["video_id"])]
    assert not asked[0] & set(sp.test["video_id"]) and {f"u{i}" for i in range(7)} <= asked[0]


# ---------------------------------------------------------------- a real (tiny) SimCLR run on the pool


@pytest.mark.slow
def test_tiny_pretrain_on_train_and_unlabeled(s3, bucket):
    """jobs.pretrain --splits train,unlabeled end to end (~35 s on 2 cores): the pool decodes and trains."""
    import io
    import json

    import ray

    from clman import config as C
    from clman.data.synth import SynthConfig, write_dataset
    from jobs import pretrain as job_pretrain

    write_dataset(f"{bucket}/raw", 16, seed=1, cfg=SynthConfig(size=32, frames=10), workers=1, progress=False)
    labels = pd.read_csv(io.StringIO(storage.read_text(f"{bucket}/raw/labels.csv")), dtype=str, keep_default_na=False)
    labels.loc[labels.index[:8], "label"] = ""  # half the sweeps without a diagnosis
    storage.write_text(f"{bucket}/raw/half.csv", labels.to_csv(index=False))
    res = I.ingest(
        I.labeled_items(f"{bucket}/raw", f"{bucket}/raw/half.csv"),
        f"{bucket}/data",
        ratios=(0.5, 0.0, 0.5),
        seed=0,
        workers=2,
        keep_ids=True,
    )
    assert (res.manifest["split"] == M.UNLABELED).sum() == 8 and res.rejects.empty
    started = ray.is_initialized()
    if not started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tiny = [
            "model.width=0.125",
            "model.gn_groups=4",
            "data.size=32",
            "data.num_frames=4",
            "data.frames_per_clip=2",
            "scale.num_workers=1",
            "scale.cpus_per_worker=0.5",
            "pretrain.epochs=1",
            "pretrain.batch_size=8",
            "pretrain.lr=0.5",
        ]
        out = job_pretrain.run(
            C.load("pretrain", None, tiny),
            f"{bucket}/data/manifest.parquet",
            f"{bucket}/runs",
            "pool",
            "train,unlabeled",
        )
    finally:
        if not started:
            ray.shutdown()
    assert out["splits"] == ["train", M.UNLABELED] and out["metrics"]["loss"] > 0
    assert json.loads(storage.read_text(f"{bucket}/runs/pool/metrics.json"))["splits"] == ["train", M.UNLABELED]
    assert json.loads(storage.read_text(f"{bucket}/runs/pool/run.json"))["config"]["--splits"] == "train,unlabeled"
