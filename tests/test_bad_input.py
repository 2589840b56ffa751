"""Every bad input is one line on stderr, exit status 2, no traceback (issue 22).

Config numbers (NaN / inf, for every float key of every job), manifests of another version or
missing a column, predict's own numbers and its privacy default (positions, not paths), and a
full disk (a real 64 KiB tmpfs where this test may mount one).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clman import cli, storage
from clman import config as C
from clman.data import manifest as M

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def _one_error_line(err: str) -> str:
    """The single ``error:`` line of a job's stderr (log lines may come before it); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_job(module, argv: list[str], capsys) -> str:
    """``cli.run_main(module.main, argv)`` in this process: exit 2 and the one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(module.main, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    return _one_error_line(err)


def run_subprocess(job: str, *args: str) -> str:
    """``python -m jobs.<job> ...`` as a user runs it: exit 2, one error line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    return _one_error_line(proc.stderr)


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# ---------------------------------------------------------------- config: NaN and inf, every numeric key


def _takes_float(tp) -> bool:
    if tp is float:
        return True
    origin = typing.get_origin(tp)
    return origin in (typing.Union, getattr(__import__("types"), "UnionType", None), tuple) and any(
        _takes_float(a) for a in typing.get_args(tp) if a is not Ellipsis
    )


def _float_keys() -> list[tuple[str, str, str, bool]]:
    """(job, section, field, is a tuple) for every float field of every job config, sub-configs included."""
    out = []
    for job, cls in C.JOB_CONFIGS.items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):  # model / data / scale: named by their section
                for g in dataclasses.fields(tp):
                    gtp = typing.get_type_hints(tp)[g.name]
                    if _takes_float(gtp):
                        out.append((job, f.name, g.name, typing.get_origin(gtp) is tuple))
            elif _takes_float(tp):
                out.append((job, job, f.name, typing.get_origin(tp) is tuple))
    return out


FLOAT_KEYS = _float_keys()


def test_the_float_keys_are_found():
    keys = {f"{s}.{k}" for _, s, k, _ in FLOAT_KEYS}
    # the ones the issue names, and one of each section
    assert {
        "finetune.lr",
        "finetune.grad_clip",
        "finetune.encoder_lr_scale",
        "scale.resource_timeout",
        "pretrain.temperature",
        "evaluate.threshold",
        "model.width",
        "data.cache_fraction",
    } <= keys
    assert len(FLOAT_KEYS) >= 30


@pytest.mark.parametrize(
    "text,shown",
    [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("1e999", "inf"), (".nan", "nan"), ("-.inf", "-inf")],
)
@pytest.mark.parametrize("job,section,key,is_tuple", FLOAT_KEYS, ids=[f"{j}:{s}.{k}" for j, s, k, _ in FLOAT_KEYS])
def test_every_float_key_refuses_nan_and_inf(job, section, key, is_tuple, text, shown):
    value = f"[{text}]" if is_tuple else text
    with pytest.raises(C.ConfigError) as e:
        C.load(job, None, [f"{section}.{key}={value}"])
    name = f"{section}.{key}[]" if is_tuple else f"{section}.{key}"
    assert str(e.value).lower() == f"{name}: must be a finite number, got {shown}".lower()


@pytest.mark.parametrize("job,section,key,is_tuple", FLOAT_KEYS, ids=[f"{j}:{s}.{k}" for j, s, k, _ in FLOAT_KEYS])
def test_every_float_key_refuses_nan_and_inf_from_yaml(job, section, key, is_tuple, tmp_path):
    for text in (".nan", ".inf", "-.inf", "1e999", "1.0e999"):
        value = f"[{text}]" if is_tuple else text
        path = tmp_path / "bad.yaml"
        path.write_text(f"{section}:\n  {key}: {value}\n")
        with pytest.raises(C.ConfigError, match=rf"^{section}\.{key}(\[\])?: must be a finite number, got "):
            C.load(job, str(path))


def test_finite_numbers_still_load():
    cfg = C.load("finetune", None, ["finetune.lr=3e-4", "finetune.grad_clip=1", "scale.resource_timeout=0"])
    assert (cfg.lr, cfg.grad_clip, cfg.scale.resource_timeout) == (3e-4, 1.0, 0.0)
    assert C.load("finetune", None, ["finetune.lr=1e300"]).lr == 1e300
    with pytest.raises(C.ConfigError, match=r"^finetune\.lr: must be a finite number, got an integer of 401"):
        C.build(C.FinetuneConfig, {"lr": 10**400}, "finetune")


def test_tune_space_refuses_nan_and_inf():
    from clman.tune.space import SpaceError, parse_yaml, space_from_dict

    for text in (
        "finetune.lr: {loguniform: [1.0e-5, .inf]}",
        "finetune.lr: {uniform: [.nan, 1.0]}",
        "finetune.lr: {uniform: [1.0e-5, 1e999]}",
        "finetune.lr: {choice: [.nan, 1.0e-3]}",
        "finetune.grad_clip: {grid: [0.0, .inf]}",
    ):
        with pytest.raises(SpaceError, match=r"finite"):
            space_from_dict(parse_yaml(text, "s.yaml"), "finetune", source="s.yaml")


@pytest.mark.parametrize(
    "override,line",
    [
        ("finetune.lr=nan", "error: finetune.lr: must be a finite number, got nan"),
        ("finetune.grad_clip=.nan", "error: finetune.grad_clip: must be a finite number, got nan"),
        ("finetune.encoder_lr_scale=inf", "error: finetune.encoder_lr_scale: must be a finite number, got inf"),
        ("scale.resource_timeout=.nan", "error: scale.resource_timeout: must be a finite number, got nan"),
        ("finetune.lr=1e999", "error: finetune.lr: must be a finite number, got inf"),
    ],
)
def test_job_with_nan_set_exits_2(override, line, capsys, tmp_path):
    from jobs import finetune

    got = run_job(
        finetune,
        ["--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "runs"), "--set", override],
        capsys,
    )
    assert got == line
    assert not _ray_started()


def test_job_with_nan_in_yaml_exits_2_subprocess(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("finetune:\n  lr: 1.0e-3\n  grad_clip: .nan\n")
    line = run_subprocess(
        "finetune", "--config", str(preset), "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "runs")
    )
    assert line == "error: finetune.grad_clip: must be a finite number, got nan"
    line = run_subprocess(
        "evaluate",
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--manifest",
        str(tmp_path / "m.parquet"),
        "--set",
        "evaluate.threshold=nan",
    )
    assert line == "error: evaluate.threshold: must be a finite number, got nan"


def test_gpus_per_worker_flag_nan_exits_2(capsys, tmp_path):
    from jobs import finetune

    got = run_job(
        finetune,
        ["--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "runs"), "--gpus-per-worker", "nan"],
        capsys,
    )
    assert got == "error: scale.gpus_per_worker: must be a finite number, got nan"


# ---------------------------------------------------------------- manifest version and columns


def _rows(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "video_id": [f"v{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "split": ["train", "train", "test", "test"][:n],
            "fold": [-1] * n,
            "uri": [f"s3://b/clips/v{i}.mp4" for i in range(n)],
            "num_frames": [10] * n,
            "fps": [30.0] * n,
            "height": [32] * n,
            "width": [32] * n,
            "sha256": ["0" * 64] * n,
            "source": ["x"] * n,
        }
    )


def _write(table: pa.Table, path: Path, version: str | None) -> str:
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != M.VERSION_KEY}
    if version is not None:
        meta[M.VERSION_KEY] = version.encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    return str(path)


def test_manifest_records_its_version(tmp_path):
    uri = str(tmp_path / "manifest.parquet")
    M.write_manifest(_rows(), uri)
    assert pq.read_schema(uri).metadata[M.VERSION_KEY] == M.MANIFEST_VERSION.encode()
    # ingest writes to_table() through storage.write_parquet: the version survives that path too
    other = str(tmp_path / "ingest.parquet")
    storage.write_parquet(M.to_table(_rows(), other), other)
    assert M.manifest_version(storage.read_parquet(other)) == M.MANIFEST_VERSION
    assert len(M.read_manifest(other)) == 4


def test_manifest_without_a_version_reads_as_current(tmp_path):
    uri = _write(M.to_table(_rows()), tmp_path / "old.parquet", version=None)
    assert M.VERSION_KEY not in (pq.read_schema(uri).metadata or {})
    assert M.read_manifest(uri, split="train")["video_id"].tolist() == ["v0", "v1"]


def test_manifest_of_another_version_is_refused(tmp_path):
    uri = _write(M.to_table(_rows()), tmp_path / "new.parquet", version="999")
    with pytest.raises(M.ManifestError) as e:
        M.read_manifest(uri)
    assert str(e.value).startswith(f"{uri}: manifest version '999', this clman reads version '{M.MANIFEST_VERSION}'")


def test_manifest_missing_a_column_names_it(tmp_path):
    uri = _write(M.to_table(_rows()).drop_columns(["fps"]), tmp_path / "m.parquet", version=None)
    with pytest.raises(
        M.ManifestError,
        match=rf"missing columns \['fps'\]; manifest version "
        rf"{M.MANIFEST_VERSION} has \[",
    ):
        M.read_manifest(uri)


def test_finetune_on_a_manifest_of_another_version_exits_2_before_ray(tmp_path, capsys):
    from jobs import finetune

    uri = _write(M.to_table(_rows()), tmp_path / "manifest.parquet", version="999")
    line = run_job(finetune, ["--manifest", uri, "--out", str(tmp_path / "runs")], capsys)
    assert line == (
        f"error: {uri}: manifest version '999', this clman reads version '{M.MANIFEST_VERSION}'; "
        "write it again with this clman's jobs.ingest, or use the clman that wrote it"
    )
    assert not _ray_started() and not (tmp_path / "runs").exists()


def test_evaluate_on_a_manifest_of_another_version_exits_2_subprocess(tmp_path):
    uri = _write(M.to_table(_rows()), tmp_path / "manifest.parquet", version="999")
    line = run_subprocess("evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--manifest", uri)
    assert f"{uri}: manifest version '999', this clman reads version '{M.MANIFEST_VERSION}'" in line


def test_evaluate_on_a_manifest_missing_a_column_exits_2_before_ray(tmp_path, capsys):
    from jobs import evaluate

    uri = _write(M.to_table(_rows()).drop_columns(["label"]), tmp_path / "manifest.parquet", version=None)
    line = run_job(evaluate, ["--checkpoint", str(tmp_path / "model.pt"), "--manifest", uri], capsys)
    assert line.startswith(f"error: {uri}: missing columns ['label']; manifest version {M.MANIFEST_VERSION}")
    assert not _ray_started()


def test_a_message_with_line_breaks_is_printed_on_one_line(capsys):
    def main(argv):
        raise C.ConfigError("model.arch: 'x' is not one of\n  ['clman', 'r3d_18']\n")

    assert (
        run_job(type("job", (), {"main": staticmethod(main)}), [], capsys)
        == "error: model.arch: 'x' is not one of ['clman', 'r3d_18']"
    )


def test_user_errors_cover_the_data_errors():
    from clman.data.ingest import IngestError

    errors = cli.user_errors()
    assert M.ManifestError in errors and IngestError in errors


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize(
    "args,line",
    [
        (["--threshold", "nan"], "error: --threshold: must be a number in [0, 1], got nan"),
        (["--threshold", "inf"], "error: --threshold: must be a number in [0, 1], got inf"),
        (["--threshold", "1.5"], "error: --threshold: must be a number in [0, 1], got 1.5"),
        (["--threshold=-0.1"], "error: --threshold: must be a number in [0, 1], got -0.1"),
        (["--max-frames", "0"], "error: --max-frames: must be >= 1, got 0"),
        (["--top", "-1"], "error: --top: must be >= 0, got -1"),
    ],
)
def test_predict_bad_numbers_exit_2(args, line, capsys, tmp_path):
    from jobs import predict

    # the checkpoint does not exist: the numbers are checked before it is read
    assert run_job(predict, ["--checkpoint", str(tmp_path / "model.pt"), "clip.mp4", *args], capsys) == line


def test_predict_threshold_nan_exits_2_subprocess(tmp_path):
    line = run_subprocess("predict", "--checkpoint", str(tmp_path / "model.pt"), "--threshold", "nan", "a.mp4")
    assert line == "error: --threshold: must be a number in [0, 1], got nan"


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> str:
    """A real (untrained) CLMAN classifier checkpoint at 32 px, T = 4."""
    from clman.checkpoint import save_checkpoint
    from clman.models.build import classifier_from

    cfg = C.load("finetune", None, ["model.width=0.125", "model.gn_groups=4", "data.size=32", "data.num_frames=4"])
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    save_checkpoint(path, classifier_from(cfg.model), kind="classifier", config=C.to_dict(cfg), step=0)
    return path


def test_predict_names_inputs_by_position_and_hash_not_path(tiny_classifier, tmp_path, capsys):
    import hashlib

    from jobs import predict
    from tests.media import frames, pyav_mp4

    folder = tmp_path / "Doe^Jane 1961-03-02"  # what clinical file names look like
    folder.mkdir()
    video = folder / "DOE_JANE_MRN4711.mp4"
    video.write_bytes(pyav_mp4(frames(8)))
    missing = folder / "SMITH_JOHN_MRN0815.mp4"
    digest = hashlib.sha256(video.read_bytes()).hexdigest()[:16]
    out = tmp_path / "pred.json"
    assert predict.main(["--checkpoint", tiny_classifier, str(video), str(missing), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    written = out.read_text()
    for text in (printed, written):
        assert "DOE" not in text and "SMITH" not in text and "Doe^Jane" not in text
    preds = json.loads(written)["predictions"]
    assert preds[0]["video"] == "video 1" and preds[0]["position"] == 1 and preds[0]["sha256"] == digest
    assert "uri" not in preds[0] and 0.0 <= preds[0]["probability_malignant"] <= 1.0
    assert preds[1]["video"] == "video 2" and preds[1]["sha256"] is None
    assert preds[1]["error"] == "video 2: no such file"
    assert f"video 1 (sha256 {digest}): P(malignant) = " in printed
    assert "video 2: cannot be scored: video 2: no such file" in printed

    # --show-paths: the user asked for them
    assert predict.main(["--checkpoint", tiny_classifier, str(video), "--json", str(out), "--show-paths"]) == 0
    assert str(video) in capsys.readouterr().out
    assert json.loads(out.read_text())["predictions"][0]["uri"] == str(video)


# ---------------------------------------------------------------- disk full


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB tmpfs, filled up (needs root / CAP_SYS_ADMIN; skipped where mount is refused)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root; test_disk_full_simulated covers the code path")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); test_disk_full_simulated covers it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> None:
    """Take every free block of the tmpfs (unbuffered: a short write, then ENOSPC)."""
    with open(where / "filler", "ab", buffering=0) as f:
        with pytest.raises(OSError) as e:
            for _ in range(1000):
                f.write(b"\0" * 4096)
    assert e.value.errno == errno.ENOSPC


def test_disk_full_is_one_line_and_leaves_no_partial_file(full_disk):
    keep = full_disk / "metrics.json"
    storage.write_text(str(keep), '{"auc": 0.9}\n')  # written before the disk filled up: must survive
    uri = str(full_disk / "big.bin")
    with pytest.raises(storage.StorageError) as e:
        storage.write_bytes(uri, b"x" * 200_000)  # more than the whole file system
    assert str(e.value) == f"{uri}: no space left on device"
    _fill(full_disk)
    with pytest.raises(storage.StorageError, match=r": no space left on device$"):
        storage.write_text(str(keep), '{"auc": 0.5}\n')  # a rewrite of an existing file
    assert keep.read_text() == '{"auc": 0.9}\n'
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "metrics.json"]  # no .tmp left


def test_predict_on_a_full_disk_exits_2(full_disk, tiny_classifier, tmp_path, capsys):
    from jobs import predict
    from tests.media import frames, pyav_mp4

    video = tmp_path / "a.mp4"
    video.write_bytes(pyav_mp4(frames(8)))
    _fill(full_disk)
    out = full_disk / "pred.json"
    line = run_job(predict, ["--checkpoint", tiny_classifier, str(video), "--json", str(out)], capsys)
    assert line == f"error: {out}: no space left on device"
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize(
    "code,reason", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")]
)
def test_disk_full_simulated(code, reason, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the same path with fsync failing as NFS / quotas report it."""

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    uri = str(tmp_path / "out" / "metrics.json")
    storage.write_text(uri, "old\n")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(storage.StorageError) as e:
        storage.write_text(uri, "new\n")
    assert str(e.value) == f"{uri}: {reason}"
    monkeypatch.undo()
    assert Path(uri).read_text() == "old\n" and os.listdir(tmp_path / "out") == ["metrics.json"]
