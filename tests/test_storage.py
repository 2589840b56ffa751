"""clman.storage against local paths and a real SeaweedFS (the `s3` fixture)."""

from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError

from clman import storage
from clman.storage import StorageError, StorageNotFoundError


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A root URI: a local directory or a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket")


def _table() -> pa.Table:
    return pa.table({"video_id": ["a", "b", "c"], "label": pa.array([0, 1, 0], pa.int8())})


def test_round_trip(base):
    clip = storage.join(base, "clips", "case_0001.mp4")
    note = storage.join(base, "notes", "readme.txt")
    table_uri = storage.join(base, "manifest.parquet")

    storage.write_bytes(clip, b"\x00\x01binary")
    storage.write_text(note, "héllo\n")
    storage.write_parquet(_table(), table_uri)

    assert storage.read_bytes(clip) == b"\x00\x01binary"
    assert storage.read_text(note) == "héllo\n"
    assert storage.read_parquet(table_uri).equals(_table())
    assert storage.exists(clip) and storage.exists(storage.join(base, "clips"))
    assert not storage.exists(storage.join(base, "clips", "missing.mp4"))
    assert storage.list_uris(base) == sorted([clip, note, table_uri])
    assert storage.list_uris(storage.join(base, "clips"), suffix=".mp4") == [clip]
    assert storage.list_uris(storage.join(base, "nothing-here")) == []

    storage.write_bytes(clip, b"new")  # overwrite
    assert storage.read_bytes(clip) == b"new"
    storage.delete(clip)
    storage.delete(clip)  # deleting a missing object is not an error
    assert not storage.exists(clip)
    with pytest.raises(StorageNotFoundError, match="no such"):
        storage.read_bytes(clip)


def test_local_write_leaves_no_temporaries(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "x.bin")
    storage.write_bytes(uri, b"abc")
    assert sorted(p.name for p in (tmp_path / "deep" / "dir").iterdir()) == ["x.bin"]


def test_local_missing_file_names_path(tmp_path):
    uri = str(tmp_path / "absent.parquet")
    with pytest.raises(StorageNotFoundError) as info:
        storage.read_parquet(uri)
    assert str(info.value) == f"{uri}: no such file"


def test_join_and_scheme():
    assert storage.join("s3://bkt/", "a/", "/b.mp4") == "s3://bkt/a/b.mp4"
    assert storage.join("s3://bkt", "") == "s3://bkt"
    assert storage.is_s3("s3://bkt/k") and not storage.is_s3("/tmp/k")
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        storage.read_bytes("gs://bkt/key")
    with pytest.raises(StorageError, match="no bucket name"):
        storage.read_bytes("s3:///key")


def test_s3_multipart_write(bucket, monkeypatch):
    """Writes above the threshold go through a multipart upload."""
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    data = np.random.default_rng(0).integers(0, 256, 11 * 1024 * 1024, dtype=np.uint8).tobytes()
    uri = storage.join(bucket, "big.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data


def test_arrow_fs_s3_write(bucket):
    """pyarrow's S3FileSystem (what Ray Train writes checkpoints with) works on the same env."""
    fs, path = storage.arrow_fs(storage.join(bucket, "runs", "r1"))
    assert path == f"{bucket[len('s3://') :]}/runs/r1"
    data = np.random.default_rng(1).integers(0, 256, 12 * 1024 * 1024, dtype=np.uint8).tobytes()
    with fs.open_output_stream(f"{path}/ckpt.bin") as f:  # > 5 MiB: pyarrow uploads it in parts
        f.write(data)
    pq.write_table(_table(), f"{path}/t.parquet", filesystem=fs)
    assert storage.read_bytes(storage.join(bucket, "runs", "r1", "ckpt.bin")) == data
    assert storage.read_parquet(storage.join(bucket, "runs", "r1", "t.parquet")).equals(_table())


def test_arrow_fs_local(tmp_path):
    fs, path = storage.arrow_fs(str(tmp_path / "runs"))
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/a.txt") as f:
        f.write(b"x")
    assert storage.read_bytes(str(tmp_path / "runs" / "a.txt")) == b"x"


def test_missing_bucket(s3):
    uri = "s3://no-such-bucket-clman/key.bin"
    expected = f"{uri}: bucket 'no-such-bucket-clman' does not exist"
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"x"),
        lambda: storage.exists(uri),
        lambda: storage.list_uris(uri),
        lambda: storage.arrow_fs(uri),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert str(info.value) == expected


def test_missing_key(bucket):
    uri = storage.join(bucket, "absent.mp4")
    with pytest.raises(StorageNotFoundError) as info:
        storage.read_bytes(uri)
    assert str(info.value) == f"{uri}: no such object"


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials(bucket, s3, monkeypatch, variable):
    uri = storage.join(bucket, "x.bin")
    storage.write_bytes(uri, b"x")
    real_secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv(variable, "wrong-value-1234567890")
    calls = (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"y"), lambda: storage.exists(uri))
    for call in calls:
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert message == f"{uri}: access denied — check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        assert real_secret not in message and "wrong-value" not in message


def test_unreachable_endpoint(s3, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = "s3://bkt/key"
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri)
    assert str(info.value) == f"{uri}: cannot reach endpoint {endpoint}"
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


def _client_error(status: int, code: str) -> ClientError:
    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def test_retry_transient_then_success():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise _client_error(503, "SlowDown")
        return "ok"

    assert storage.with_retries(flaky, "s3://b/k", attempts=4, sleep=sleeps.append) == "ok"
    assert len(calls) == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.5  # doubling base with jitter in [0.5, 1]


def test_retry_dropped_connection_then_success():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionClosedError(endpoint_url="http://x")
        return 7

    assert storage.with_retries(flaky, "s3://b/k", sleep=lambda s: None) == 7


def test_retry_gives_up_and_skips_permanent_errors():
    calls = []

    def always_500():
        calls.append(1)
        raise _client_error(500, "InternalError")

    with pytest.raises(ClientError):
        storage.with_retries(always_500, "s3://b/k", attempts=3, sleep=lambda s: None)
    assert len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise _client_error(404, "NoSuchKey")

    with pytest.raises(ClientError):
        storage.with_retries(missing, "s3://b/k", attempts=3, sleep=lambda s: None)
    assert len(calls) == 1
