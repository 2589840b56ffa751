"""Shared fixtures: a real SeaweedFS S3 server for the whole session (never a mock)."""

from __future__ import annotations

import os
import uuid

import pytest

from clman.local_s3 import LocalS3
from clman.train.runner import set_local_train_env

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
