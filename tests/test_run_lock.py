"""One run name, one run (``clman.run_lock``): names, the lock on local disk and on SeaweedFS, the fingerprint.

Real SeaweedFS (``s3`` / ``bucket`` fixtures) and, for the job runs, a local Ray: never a mock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import ray

from clman import cli, storage
from clman import config as C
from clman import run_lock
from clman.errors import JobError
from clman.run_lock import RunLock
from jobs import finetune, pretrain
from tests.media import synth_manifest
from tests.test_jobs import ROOT, TINY, local_ray  # noqa: F401  (local_ray: a fixture)


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    """A storage root for runs: a local folder, or a fresh bucket on SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"{request.getfixturevalue('bucket')}/runs"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant(out: str, run: str, **info) -> None:
    """A lock left by another job (written as the holder would, outside RunLock)."""
    body = {
        "run": run,
        "job": "finetune",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": None,
        "boot_id": run_lock._boot_id(),
        "started": "2030-01-01T00:00:00Z",
        "token": "theirs",
        **info,
    }
    storage.write_text(storage.join(out, run, run_lock.LOCK_FILE), json.dumps(body))


def _lock(out: str, run: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(out, run, run_lock.LOCK_FILE)))
    except storage.StorageNotFoundError:
        return None


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", ".hidden", "x..y", ""])
def test_a_run_name_is_one_plain_folder(name):
    with pytest.raises(C.ConfigError, match="must be one folder name"):
        run_lock.check_run_name(name)
    assert run_lock.check_run_name("clman-v1.2_x") == "clman-v1.2_x"


@pytest.mark.parametrize("job,name", [("finetune", "../x"), ("finetune", "a/b"), ("pretrain", "a\\b")])
def test_job_refuses_a_run_name_with_a_path_in_one_line(job, name, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"jobs.{job}",
            "--manifest",
            str(tmp_path / "m.parquet"),
            "--out",
            str(tmp_path / "runs"),
            "--run-name",
            name,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --run-name {name!r}: must be one folder name"), lines
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_sweep_and_its_resume_refuse_a_path():
    from clman.tune import sweep as sweeps

    with pytest.raises(C.ConfigError, match=r"--resume '\.\./x': must be one folder name"):
        sweeps.load_sweep("/nowhere", "../x")


# ---------------------------------------------------------------- the lock


def test_conditional_put_on_seaweedfs(bucket):
    """What the lock relies on, measured on the test server: If-None-Match: * and If-Match answer 412."""
    from botocore.exceptions import ClientError

    client, name = storage.s3_client(), bucket[len("s3://") :]
    etag = client.put_object(Bucket=name, Key="k", Body=b"a", IfNoneMatch="*")["ETag"]
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123"'}):
        with pytest.raises(ClientError) as e:
            client.put_object(Bucket=name, Key="k", Body=b"b", **condition)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=name, Key="k")["Body"].read() == b"a"
    client.put_object(Bucket=name, Key="k", Body=b"c", IfMatch=etag)
    assert client.get_object(Bucket=name, Key="k")["Body"].read() == b"c"


def test_acquire_refuse_release(out):
    with RunLock(out, "r", "finetune") as lock:
        held = _lock(out, "r")
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["job"] == "finetune"
        with pytest.raises(JobError) as e:
            RunLock(out, "r", "pretrain").acquire()
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(
            f"run 'r' is in use: {lock.uri} is held by host {socket.gethostname()} "
            f"pid {os.getpid()} (finetune started {held['started']}"
        )
        assert "choose another --run-name" in message
        assert _lock(out, "r")["token"] == lock.info["token"]  # the refused job left it alone
    assert _lock(out, "r") is None
    RunLock(out, "r").acquire().release()  # free again
    assert _lock(out, "r") is None


def test_of_jobs_starting_at_once_one_holds_the_lock(out):
    won, refused = [], []

    def start(i):
        try:
            won.append(RunLock(out, "race").acquire())
        except JobError:
            refused.append(i)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert _lock(out, "race")["token"] == won[0].info["token"]
    won[0].release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(out, caplog):
    _plant(out, "dead", pid=_dead_pid())
    with caplog.at_level(logging.WARNING, logger="clman.run_lock"):
        lock = RunLock(out, "dead").acquire()
    assert _lock(out, "dead")["token"] == lock.info["token"]
    assert "taking over the lock of host" in caplog.text and "on this host is gone" in caplog.text
    lock.release()
    # A live pid on another host is not judged by its pid: refused while its heartbeat is fresh.
    _plant(out, "elsewhere", host="other-host", pid=_dead_pid())
    with pytest.raises(JobError, match="held by host other-host"):
        RunLock(out, "elsewhere").acquire()
    # The same pid, now another process (another start time), is gone too.
    _plant(out, "reused", pid=os.getpid(), pid_start="1")
    RunLock(out, "reused").acquire().release()


def test_lock_without_heartbeat_is_taken_over(out, caplog):
    _plant(out, "old", host="other-host", pid=1)
    with pytest.raises(JobError, match="last heartbeat [0-9] s ago"):
        RunLock(out, "old", stale_s=1.0).acquire()
    time.sleep(2.5)  # S3 dates are whole seconds: the age is then 2 or 3 s
    with caplog.at_level(logging.WARNING, logger="clman.run_lock"):
        lock = RunLock(out, "old", stale_s=1.0).acquire()
    assert "no heartbeat for" in caplog.text
    assert _lock(out, "old")["token"] == lock.info["token"]
    lock.release()


def test_heartbeat_keeps_the_lock_fresh_and_notices_a_takeover(out, caplog):
    lock = RunLock(out, "beat", heartbeat_s=0.5, stale_s=2.0).acquire()
    first = _lock(out, "beat")["heartbeat"]
    time.sleep(3.5)  # older than stale_s, but rewritten every 0.5 s
    assert _lock(out, "beat")["heartbeat"] != first
    with pytest.raises(JobError, match="is in use"):
        RunLock(out, "beat", stale_s=2.0).acquire()
    _plant(out, "beat", host="other-host")  # taken over (its heartbeat lapsed, say)
    with caplog.at_level(logging.ERROR, logger="clman.run_lock"):
        assert lock.refresh() is False
    assert "was taken over by another job" in caplog.text
    lock.release()
    assert _lock(out, "beat")["token"] == "theirs"  # not ours to delete


def test_lock_is_released_at_interpreter_exit(out, tmp_path):
    code = f"from clman.run_lock import RunLock\nRunLock({out!r}, 'exit').acquire()\nprint('held')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "held" in proc.stdout, proc.stderr[-2000:]
    assert _lock(out, "exit") is None


# ---------------------------------------------------------------- the fingerprint, no Ray


def test_resume_with_other_inputs_is_refused_unless_forced(tmp_path, caplog):
    manifest, encoder, run_dir = tmp_path / "m.parquet", tmp_path / "enc.pt", str(tmp_path / "runs" / "fp")
    manifest.write_bytes(b"manifest 1")
    encoder.write_bytes(b"encoder 1")
    cfg = C.load("finetune", None, TINY)
    first = run_lock.fingerprint("finetune", cfg, str(manifest), str(encoder))
    run_lock.check_resume(run_dir, first)
    assert json.loads(storage.read_text(f"{run_dir}/run.json"))["fingerprint"] == first["fingerprint"]
    run_lock.check_resume(run_dir, first)  # same inputs: a resume

    # scale.* and how frames are fed may change; what the run computes may not.
    moved = C.load("finetune", None, TINY + ["scale.num_workers=4", "scale.precision=fp32", "data.cache=off"])
    assert run_lock.fingerprint("finetune", moved, str(manifest), str(encoder))["fingerprint"] == first["fingerprint"]
    other = C.load("finetune", None, TINY + ["finetune.lr=0.02"])
    with pytest.raises(JobError) as e:
        run_lock.check_resume(run_dir, run_lock.fingerprint("finetune", other, str(manifest), str(encoder)))
    assert str(e.value) == (
        "run 'fp' was started with another config (finetune.lr 0.01 -> 0.02); rerun with its "
        "first inputs, choose another --run-name, or pass --force-resume to continue it anyway"
    )
    manifest.write_bytes(b"manifest 2")
    with pytest.raises(JobError, match=r"another manifest \(.*m.parquet: its bytes changed\)"):
        run_lock.check_resume(run_dir, run_lock.fingerprint("finetune", cfg, str(manifest), str(encoder)))
    with pytest.raises(JobError, match=r"another manifest .*; encoder \(.*enc.pt -> none, other bytes\)"):
        run_lock.check_resume(run_dir, run_lock.fingerprint("finetune", cfg, str(manifest)))
    # Nothing to resume from: recorded, not refused.
    third = run_lock.fingerprint("finetune", cfg, str(manifest))
    run_lock.check_resume(run_dir, third, has_checkpoint=lambda: False)
    assert json.loads(storage.read_text(f"{run_dir}/run.json"))["fingerprint"] == third["fingerprint"]
    with caplog.at_level(logging.WARNING, logger="clman.run_lock"):
        run_lock.check_resume(run_dir, run_lock.fingerprint("finetune", other, str(manifest)), force=True)
    assert "--force-resume: run 'fp' continues from its checkpoints with another config (finetune.lr" in caplog.text


# ---------------------------------------------------------------- the jobs


@pytest.fixture(scope="module")
def dataset(s3):
    """24 tiny synthetic sweeps ingested with train/val/test splits (as tests/test_jobs.py): the manifest URI."""
    name = "lock-data"
    s3.make_bucket(name)
    return synth_manifest(f"s3://{name}", 24, seed=1, frames=10)


@pytest.mark.parametrize("job", [finetune, pretrain])
def test_second_job_with_the_same_run_name_is_refused_before_ray(job, dataset, bucket, capsys):
    runs, started = f"{bucket}/runs", ray.is_initialized()
    with RunLock(runs, "busy", "finetune"):
        with pytest.raises(SystemExit) as exit_:
            cli.run_main(
                job.main,
                ["--manifest", dataset, "--out", runs, "--run-name", "busy", *sum((["--set", o] for o in TINY), [])],
            )
        assert storage.list_uris(f"{runs}/busy") == [f"{runs}/busy/.lock"]  # no config.yaml, no run.json
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: run 'busy' is in use: {runs}/busy/.lock is held by host ")
    assert "Traceback" not in err and ray.is_initialized() == started


@pytest.mark.slow
def test_finetune_resume_with_another_config_needs_force(dataset, bucket, local_ray):  # noqa: F811
    runs = f"{bucket}/runs"
    one = TINY + ["scale.num_workers=1", "finetune.epochs=1"]
    first = finetune.run(C.load("finetune", None, one), dataset, runs, "fp")
    assert first["last_metrics"]["epoch"] == 0
    assert storage.list_uris(f"{runs}/fp", ".lock") == []  # released
    recorded = json.loads(storage.read_text(f"{runs}/fp/run.json"))
    two = C.load("finetune", None, TINY + ["scale.num_workers=1", "finetune.epochs=2"])
    with pytest.raises(JobError, match=r"^run 'fp' was started with another config \(finetune.epochs 1 -> 2\); "):
        finetune.run(two, dataset, runs, "fp")
    assert json.loads(storage.read_text(f"{runs}/fp/run.json")) == recorded
    longer = finetune.run(two, dataset, runs, "fp", force_resume=True)
    assert longer["last_metrics"]["epoch"] == 1 and longer["last_metrics"]["start_epoch"] == 1
    assert json.loads(storage.read_text(f"{runs}/fp/run.json"))["config"]["finetune.epochs"] == 2


def test_second_sweep_with_the_same_run_name_is_refused_before_ray(tmp_path, capsys):
    from jobs import tune

    runs, started = str(tmp_path / "sweeps"), ray.is_initialized()
    with RunLock(runs, "busy", "tune"):
        with pytest.raises(SystemExit) as exit_:
            cli.run_main(
                tune.main,
                [
                    "--job",
                    "finetune",
                    "--space",
                    os.path.join(ROOT, "tune_spaces", "finetune_lr_depth.yaml"),
                    "--samples",
                    "2",
                    "--manifest",
                    str(tmp_path / "m.parquet"),
                    "--out",
                    runs,
                    "--run-name",
                    "busy",
                ],
            )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: run 'busy' is in use: ") and "Traceback" not in err
    assert ray.is_initialized() == started and os.listdir(runs) == []
