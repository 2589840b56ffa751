"""S3 outages: a finetune rides out the S3 server stopped for ~20 s mid-epoch; a run that
still fails ends in one line naming the endpoint.

The outage test runs its own SeaweedFS (it is stopped and started again on the same data
and port) and lets the job start its own local Ray, as ``python -m jobs.finetune`` does.
"""

from __future__ import annotations

import json
import pickle
import socket
import time

import pyarrow.fs as pafs
import pytest
from botocore.exceptions import EndpointConnectionError

from clman import checkpoint as ckpt
from clman import config as C
from clman import storage
from clman.local_s3 import LocalS3
from tests.media import synth_manifest

TINY = [
    "model.width=0.125",
    "model.gn_groups=4",
    "data.size=32",
    "data.num_frames=4",
    "data.frames_per_clip=2",
    "scale.num_workers=2",
    "scale.cpus_per_worker=0.5",
    "scale.max_failures=0",
    "finetune.batch_size=4",
    "finetune.lr=0.01",
    # Streamed, one decode task in flight per worker: decode tasks read S3 all through every
    # epoch, so the outage hits them as well as Ray Train's checkpoint writes. 8 epochs: with one
    # torch thread per worker an epoch takes ~1 s, and 3 were over before the outage began.
    "data.cache=off",
    "data.decode_tasks=1",
    "finetune.epochs=8",
    "finetune.checkpoint_every=1",
]
OUTAGE_S = 20.0


# ---------------------------------------------------------------- the retry rules, without a server


def test_refused_connection_is_an_outage_only_once_the_endpoint_answered(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv(storage.REACHED_ENV, raising=False)
    monkeypatch.setattr(storage, "_reached", set())
    calls = []

    def refused():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "ok"

    with pytest.raises(EndpointConnectionError):  # never answered: a wrong endpoint, fail at once
        storage.with_retries(refused, "s3://b/k", sleep=lambda s: None)
    assert len(calls) == 1

    calls.clear()
    monkeypatch.setattr(storage, "_reached", {"http://127.0.0.1:9"})  # answered before: down for a while
    assert storage.with_retries(refused, "s3://b/k", sleep=lambda s: None) == "ok"

    calls.clear()
    monkeypatch.setattr(storage, "_reached", set())
    monkeypatch.setenv(storage.REACHED_ENV, "1")  # a Ray worker of a driver that reached it
    assert storage.with_retries(refused, "s3://b/k", sleep=lambda s: None) == "ok"


def test_retry_budget_rides_out_20_seconds():
    sleeps = []

    def down():
        raise EndpointConnectionError(endpoint_url="http://x")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(storage.REACHED_ENV, "1")
        with pytest.raises(EndpointConnectionError):
            storage.with_retries(down, "s3://b/k", sleep=sleeps.append)
    assert len(sleeps) == storage.RETRY_ATTEMPTS - 1
    assert sum(sleeps) > 30.0  # the least the jitter allows: 31.75 s
    # The arrow filesystem's default strategy: 25 ms x 2^k for k < ARROW_RETRIES.
    assert 0.025 * (2**storage.ARROW_RETRIES - 1) > 50.0


def test_arrow_filesystem_keeps_its_retries_when_pickled(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs = storage.RetryingS3FileSystem(
        region="us-east-1", endpoint_override="127.0.0.1:9", scheme="http", access_key="k", secret_key="s"
    )
    copy = pickle.loads(pickle.dumps(fs))  # what Ray Train's controller and workers get
    assert isinstance(copy, storage.RetryingS3FileSystem) and isinstance(copy, pafs.S3FileSystem)
    assert copy.retries == storage.ARROW_RETRIES
    # pyarrow's own pickle drops the strategy (why the subclass exists): when this fails,
    # pyarrow keeps it and RetryingS3FileSystem can go.
    plain = pafs.S3FileSystem(
        retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=11),
        endpoint_override="127.0.0.1:9",
        scheme="http",
        access_key="k",
        secret_key="s",
    )
    assert "retry_strategy" not in plain.__reduce__()[1][0]


def test_failed_run_is_one_line_naming_the_endpoint(monkeypatch):
    from ray.train import ControllerError

    from clman.launch import trainer

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.1.2.3:9000")
    cause = OSError(
        "When uploading part for key 'runs/x/checkpoint_manager_snapshot.json' in bucket 'b': "
        "AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Couldn't connect\n"
        "Traceback (most recent call last):\n  File ..."
    )
    line = trainer.failure_line("x", ControllerError(cause))
    assert "\n" not in line
    assert line.startswith("run 'x' failed: OSError: When uploading part for key 'runs/x/checkpoint_manager_")
    assert "(S3 at http://10.1.2.3:9000 after retries); once S3 answers, the same --run-name resumes" in line


# ---------------------------------------------------------------- the outage, for real


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_finetune_rides_out_a_20_second_s3_outage(tmp_path, monkeypatch, capfd):
    import ray

    from tests.test_jobs import finetune_until_checkpoint

    if ray.is_initialized():
        ray.shutdown()
    server = LocalS3(tmp_path / "s3", port=_free_port()).start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv(storage.REACHED_ENV, raising=False)
        root = server.make_bucket("outage")
        manifest, runs = synth_manifest(root, 24, seed=1, frames=10), f"{root}/runs"
        thread, done = finetune_until_checkpoint(C.load("finetune", None, TINY), manifest, runs, "outage", timeout=300)
        # Mid-epoch 2: decode tasks are reading clips, the next checkpoint is a few steps away.
        t0 = time.monotonic()
        server.stop(timeout=1.0)
        time.sleep(max(0.0, OUTAGE_S - 4.0 - (time.monotonic() - t0)))  # starting takes ~4 s
        # Restarted from this (the main) thread: the server dies with the thread that started it.
        server = LocalS3(tmp_path / "s3", port=server.port).start()
        outage = time.monotonic() - t0
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run did not finish after S3 came back"
        assert "error" not in done, done.get("error")
        print(f"S3 down for {outage:.1f} s")
        assert outage >= OUTAGE_S - 1.0

        summary = json.loads(storage.read_text(f"{runs}/outage/metrics.json"))
        assert summary["last_metrics"]["epoch"] == 7 and summary["last_metrics"]["start_epoch"] == 0
        # No checkpoint lost or half-written: every one the run kept loads, and so does model.pt.
        kept = sorted({u.rsplit("/", 1)[0] for u in storage.list_uris(f"{runs}/outage", "/checkpoint.pt")})
        assert kept
        for uri in kept:
            ckpt.load_checkpoint(f"{uri}/checkpoint.pt")
        ckpt.load_checkpoint(done["result"]["model"])
    finally:
        ray.shutdown()
        server.stop(timeout=1.0)
    text = "".join(capfd.readouterr())
    retried = [line for line in text.splitlines() if "transient S3 error" in line]
    print(f"{len(retried)} retry line(s) from Ray workers, e.g.: {retried[0][:300] if retried else '-'}")
    assert "skipping clip" not in text, "a decode task gave up during the outage"
    assert "transient S3 error" in text, "the log does not say what was retried"


def test_failed_worker_is_its_exception_in_one_line():
    from ray.train import WorkerGroupError

    from clman.launch import trainer

    tb = (
        'Traceback (most recent call last):\n  File "/x/finetune.py", line 3, in loop\n    check_finite(loss)\n'
        "FloatingPointError: non-finite loss nan by epoch 2, step 7: lower the learning rate\n"
    )

    class Wrapped(Exception):  # what Ray Train hands back: the worker's traceback as the message
        def __str__(self):
            return tb

    error = WorkerGroupError("worker 0 failed", {1: RuntimeError("later rank"), 0: Wrapped()})
    assert trainer.failure_line("r", error) == (
        "run 'r' failed: FloatingPointError: non-finite loss nan by epoch 2, step 7: lower the learning rate"
    )
