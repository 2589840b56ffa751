"""A real Ray cluster: `ray start --head` on loopback, `ray job submit` exactly as the README shows it.

The head runs with the test SeaweedFS's credentials in its environment (as a cluster's
nodes carry them), token authentication on (Ray 2.60's default) with the token in a file
of the test's own, and its own temp dir, so no other Ray on this machine can attach to it
(``ray.init()`` without an address joins the cluster recorded in ``/tmp/ray``). One job is
stopped with ``ray job stop`` after its first checkpoint; the resubmission with the same
``--run-name`` resumes it and runs to the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clman import checkpoint as ckpt
from clman import storage
from tests.media import synth_manifest
from tests.test_jobs import registered_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
EPOCHS = 24  # of the stopped-and-resubmitted job
TINY = [
    "model.width=0.125",
    "model.gn_groups=4",
    "data.size=32",
    "data.num_frames=4",
    "data.frames_per_clip=2",
    "scale.num_workers=1",
    "scale.cpus_per_worker=0.5",
    "finetune.batch_size=4",
    "finetune.lr=0.01",
    "finetune.epochs=3",
    "finetune.checkpoint_every=1",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"ray {' '.join(args[:2])}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def head(s3):
    """A Ray head on loopback with a dashboard (job server): {"address": http URL, "env": client env}."""
    temp = tempfile.mkdtemp(prefix="clman-rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Every port named: the defaults (the agent's 52365, ...) may be taken by another Ray on this machine.
    gcs_port, dash_port, client_port, agent_port, agent_grpc, env_agent, metrics = _free_ports(7)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=os.path.join(temp, "auth_token"),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ADDRESS="",
    )
    fd = os.open(env["RAY_AUTH_TOKEN_PATH"], os.O_WRONLY | os.O_CREAT, 0o600)  # what `ray start` would make
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    log = open(os.path.join(temp, "head.log"), "wb")
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--ray-client-server-port",
            str(client_port),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--dashboard-agent-grpc-port",
            str(agent_grpc),
            "--runtime-env-agent-port",
            str(env_agent),
            "--metrics-export-port",
            str(metrics),
            "--temp-dir",
            temp,
            "--disable-usage-stats",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"ray start exited: {open(log.name, errors='replace').read()[-2000:]}"
            if _ray("job", "list", "--address", address, env=env, check=False).returncode == 0:
                break
            time.sleep(3)
        else:
            raise AssertionError(f"no job server at {address} after 180 s")
        yield {"address": address, "gcs": f"127.0.0.1:{gcs_port}", "env": env}
    finally:
        # Only this head's processes (its own session): never `ray stop`, which ends every Ray here.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)  # the head's processes take ~35 s to exit cleanly; nothing here needs it
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def manifest(s3):
    s3.make_bucket("cluster-data")
    return synth_manifest("s3://cluster-data", 16, seed=2, frames=8)


def _submit(head: dict, submission_id: str, args: list[str], wait: bool) -> subprocess.CompletedProcess:
    # The README's command: --working-dir . --runtime-env infra/runtime_env.yaml -- python -m jobs.finetune ...
    cmd = [
        "job",
        "submit",
        "--address",
        head["address"],
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "infra/runtime_env.yaml",
        *([] if wait else ["--no-wait"]),
        "--",
        "python",
        "-m",
        "jobs.finetune",
        *args,
    ]
    deadline = time.time() + 120
    while True:
        proc = _ray(*cmd, env=head["env"], timeout=900, check=False)
        # The job server answers before the node's agent has registered with it.
        if "No available agent" not in proc.stderr or time.time() > deadline:
            return proc
        time.sleep(5)


def _status(head: dict, submission_id: str) -> str:
    # "Job 'x' succeeded" / "... failed" / "... was stopped", "Status for job 'x': RUNNING", ...
    out = _ray("job", "status", "--address", head["address"], submission_id, env=head["env"]).stdout
    text = out.lower()
    for state in ("succeeded", "failed", "stopped", "running", "pending"):
        if re.search(rf"(job '{submission_id}' (was )?{state}|status for job '{submission_id}': {state})", text):
            return state.upper()
    return out.strip()


@pytest.mark.slow
def test_job_submit_stop_and_resume_on_a_real_cluster(head, manifest, bucket):
    runs = f"{bucket}/runs"
    # EPOCHS so that the stop lands mid-run: at 3 the first job had trained them all before it was stopped,
    # and at 8 too once (CI 2026-12-06, a sweep running beside the suite: a poll of `ray job status` takes
    # seconds under load, a tiny epoch well under one)
    args = [
        "--manifest",
        manifest,
        "--out",
        runs,
        "--run-name",
        "submitted",
        *sum((["--set", o] for o in TINY + [f"finetune.epochs={EPOCHS}"]), []),
    ]
    t0 = time.time()

    first = _submit(head, "clman-first", args, wait=False)
    assert first.returncode == 0, first.stderr[-2000:]
    deadline = time.time() + 420
    while not registered_checkpoint(f"{runs}/submitted") and time.time() < deadline:
        assert _status(head, "clman-first") in ("PENDING", "RUNNING"), _ray(
            "job", "logs", "--address", head["address"], "clman-first", env=head["env"]
        ).stdout[-3000:]
        time.sleep(1)
    assert registered_checkpoint(f"{runs}/submitted"), "the submitted job registered no checkpoint"
    _ray("job", "stop", "--address", head["address"], "clman-first", env=head["env"])
    assert _status(head, "clman-first") == "STOPPED"
    print(f"first submission: a checkpoint, then stopped, after {time.time() - t0:.0f} s")

    t1 = time.time()
    second = _submit(head, "clman-second", args, wait=True)
    assert _status(head, "clman-second") == "SUCCEEDED", second.stdout[-3000:] + second.stderr[-2000:]
    print(f"resubmission ran to the end in {time.time() - t1:.0f} s")
    logs = _ray("job", "logs", "--address", head["address"], "clman-second", env=head["env"]).stdout
    print("\n".join(line for line in logs.splitlines() if " I jobs.finetune: " in line or "epoch" in line))
    assert "finetune submitted done in" in logs, logs[-3000:]
    summary = json.loads(storage.read_text(f"{runs}/submitted/metrics.json"))
    assert "resumed from epoch" in logs, "the resubmission started over instead of resuming"
    assert summary["last_metrics"]["epoch"] == EPOCHS - 1 and summary["last_metrics"]["start_epoch"] > 0
    assert ckpt.load_checkpoint(summary["model"])["kind"] == "classifier"


def test_missing_token_is_one_line(head, manifest):
    """A driver attaching in token mode without the cluster's token: one line saying what to fix."""
    env = dict(head["env"], RAY_AUTH_TOKEN_PATH=os.path.join(tempfile.gettempdir(), "clman-no-such-token"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.finetune",
            "--manifest",
            manifest,
            "--out",
            "s3://cluster-data/runs",
            "--address",
            head["gcs"],
            *sum((["--set", o] for o in TINY), []),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray cluster at 127.0.0.1:") and "RAY_AUTH_MODE=token" in last, proc.stderr[
        -2000:
    ]
