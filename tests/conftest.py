"""Shared fixtures: a real SeaweedFS S3 server for the whole session (never a mock)."""

from __future__ import annotations

import os
import uuid

import pytest

from clman.local_s3 import LocalS3
from clman.launch.session import set_local_train_env

# Tests start Ray with ray.init / ray start, not through init_ray: the same Train settings as a local
# run's (its raylet, and so every worker, inherits this process's environment).
set_local_train_env()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A started LocalS3; os.environ carries its AWS_* variables for the session.

    The env is visible to subprocesses too (Ray workers started by a test).
    """
    server = LocalS3(tmp_path_factory.mktemp("local-s3")).start()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in server.env().items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield server
    # The data dir is thrown away: no need to wait out weed's ~16 s clean shutdown.
    server.stop(timeout=1.0)


@pytest.fixture
def bucket(s3):
    """A fresh, empty bucket for one test: "s3://<name>"."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    uri = s3.make_bucket(name)
    yield uri
    # allowDeleteBucketNotEmpty is on by default in `weed server`: one call removes it all.
    client = s3.client()  # the server's own credentials, whatever a test did to os.environ
    try:
        client.delete_bucket(Bucket=name)
    except client.exceptions.NoSuchBucket:  # the test deleted it itself
        pass


# ---------------------------------------------------------------- the process's end
#
# CI on 2026-12-06 (commit 4b62d96): "950 passed, 32 skipped" printed, then the pytest process died of
# SIGSEGV, after the summary: in interpreter finalization, where the native libraries this suite loads
# (Ray's core worker, Arrow's S3 client, torch's and triton's threads) tear down in no fixed order; the
# same suite had exited cleanly before. The verdict is in by then, so the process ends with it,
# skipping finalization: a crash *during* the tests still fails the run, and `make test` runs Python
# with -X faulthandler so that such a crash prints every thread's stack.

_session: pytest.Session | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After every plugin's own end: Ray shut down, output flushed, exit with pytest's status."""
    if _session is None or os.environ.get("CLMAN_TEST_FINALIZE") == "1":  # =1: the normal exit, to debug it
        return
    import sys

    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_session.exitstatus))
