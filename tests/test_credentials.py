"""Credentials: none pickled or stored, session tokens sent, token and clock errors named.

SeaweedFS (the `s3` fixture) serves the real reads and writes. A SeaweedFS identity has no
STS, so what it cannot produce — a request's headers as received, ExpiredToken /
InvalidToken / RequestTimeTooSkewed answers — comes from `FakeEndpoint`: a small HTTP
server that records each request and answers with a chosen S3 error document. It fakes the
endpoint's protocol-level answers, not S3's behaviour; every storage call under test goes
through the real boto3 / pyarrow stacks to it.
"""

from __future__ import annotations

import http.server
import pickle
import re
import subprocess
import sys
import textwrap
import threading

import pyarrow.fs as pafs
import pytest

from clman import storage
from clman.storage import StorageError

KEY_ID, SECRET, TOKEN = "AKIDCLMANMARKER01", "secret-marker-5f3a9c1e77", "session-token-marker-0b8d2e"
EMPTY_LISTING = (
    b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
    b'2006-03-01/"><Name>bkt</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>'
    b"<IsTruncated>false</IsTruncated></ListBucketResult>"
)


class FakeEndpoint:
    """Records (method, lower-cased headers) of each request; answers `error` = (status, code), else 200
    with an empty listing."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.error: tuple[int, str] | None = None
        self.message = "fake error"
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers boto3's "Expect: 100-continue" at once, not after its 1 s wait

            def _answer(self):
                endpoint.requests.append((self.command, {k.lower(): v for k, v in self.headers.items()}))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if endpoint.error:
                    status, code = endpoint.error
                    body = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{endpoint.message}</Message><RequestId>r1</RequestId></Error>"
                    ).encode()
                else:
                    status, body = 200, EMPTY_LISTING
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":  # HEAD answers carry no body, as S3's
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arrow_fs(self) -> pafs.S3FileSystem:
        """A filesystem on this endpoint with one retry: the SDK retries skew answers (51 s at ARROW_RETRIES)."""
        return storage.RetryingS3FileSystem(
            retries=1, region="us-east-1", scheme="http", endpoint_override=self.url[len("http://") :]
        )


@pytest.fixture
def fake(monkeypatch):
    """A FakeEndpoint that AWS_ENDPOINT_URL points at, with marker credentials and session token in the env."""
    endpoint = FakeEndpoint()
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint.url,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": TOKEN,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield endpoint
    endpoint.server.shutdown()
    endpoint.server.server_close()


def _assert_no_credential(data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    for value in (KEY_ID, SECRET, TOKEN):
        assert value.encode() not in data


def test_pickled_filesystem_holds_no_credential(fake):
    """What Ray pickles (the filesystem, Tune's tuner.pkl with the RunConfig) carries no key, secret or token."""
    import ray.cloudpickle
    from ray.train import RunConfig

    fs, path = storage.arrow_fs("s3://bkt/runs")
    _assert_no_credential(pickle.dumps(fs))
    _assert_no_credential(ray.cloudpickle.dumps(RunConfig(storage_filesystem=fs, storage_path=path)))
    _assert_no_credential(repr(list(storage._clients)))  # the client cache is keyed by a digest
    # Credentials given explicitly stay out of the pickle as well.
    explicit = storage.RetryingS3FileSystem(
        region="us-east-1", access_key=KEY_ID, secret_key=SECRET, session_token=TOKEN
    )
    _assert_no_credential(pickle.dumps(explicit))


def test_session_token_reaches_boto3_and_pyarrow(fake):
    storage.list_uris("s3://bkt/x")  # boto3 (s3_client)
    fs, path = storage.arrow_fs("s3://bkt/x")  # boto3 (the bucket check), then pyarrow
    fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    agents = {headers.get("user-agent", "").split("/")[0] for _, headers in fake.requests}
    assert {"Boto3", "aws-sdk-cpp"} <= agents
    for method, headers in fake.requests:
        assert headers.get("x-amz-security-token") == TOKEN, (method, headers.get("user-agent"))
        assert f"Credential={KEY_ID}/" in headers["authorization"]


_EXPIRED = (
    "the S3 session token has expired — refresh the credentials (aws sso login, or export new "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN)"
)
_DENIED_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN"
_INVALID = "the S3 session token is invalid — check AWS_SESSION_TOKEN (it must match AWS_ACCESS_KEY_ID)"


def _skew(url: str) -> str:
    return (
        f"clock skew between this machine and {url} — the request time is off by more than the server "
        "allows: check NTP / the system clock"
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "ExpiredToken"),
        (403, "ExpiredToken"),
        (400, "ExpiredTokenException"),
        (400, "TokenRefreshRequired"),
        (400, "InvalidToken"),
        (403, "RequestTimeTooSkewed"),
        (400, "RequestExpired"),
    ],
)
def test_token_and_clock_errors_are_named(fake, status, code):
    from ray.train import ControllerError

    from clman.launch import trainer

    expected = {
        "InvalidToken": _INVALID,
        "RequestTimeTooSkewed": _skew(fake.url),
        "RequestExpired": _skew(fake.url),
    }.get(code, _EXPIRED)
    fake.error = (status, code)
    uri = "s3://bkt/k.bin"
    # GET and PUT answers carry the code; HEAD answers (exists, the bucket check of arrow_fs) do not.
    for call in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"x"),
        lambda: storage.exists(uri),
        lambda: storage.arrow_fs(uri),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert str(info.value) == f"{uri}: {expected}"
    # pyarrow's wording of the same answer, as a failed run reports it.
    with pytest.raises(OSError) as info:
        fake.arrow_fs().get_file_info(pafs.FileSelector("bkt/runs"))
    assert storage.s3_problem(str(info.value)) == expected
    line = trainer.failure_line("r", ControllerError(info.value))
    assert "\n" not in line
    assert line.endswith(f" — {expected}; then the same --run-name resumes from the last checkpoint")


def test_denied_with_session_token_names_it(fake):
    fake.error = (403, "AccessDenied")
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bkt/k")
    assert str(info.value) == f"s3://bkt/k: access denied — {_DENIED_HINT}"


def test_echoed_secret_and_token_are_masked(fake):
    fake.error, fake.message = (400, "InvalidArgument"), f"bad request signed with {SECRET} and {TOKEN}"
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bkt/k")
    assert str(info.value) == "s3://bkt/k: S3 error InvalidArgument: bad request signed with *** and ***"


def test_seaweedfs_denies_a_session_token_naming_it(bucket, monkeypatch):
    """SeaweedFS refuses a token it did not issue: a plain 403, whose hint names AWS_SESSION_TOKEN."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    uri = storage.join(bucket, "x.bin")
    for call in (lambda: storage.write_bytes(uri, b"x"), lambda: storage.exists(uri), lambda: storage.arrow_fs(uri)):
        with pytest.raises(StorageError) as info:
            call()
        assert str(info.value) == f"{uri}: access denied — {_DENIED_HINT}"


_CHILD = textwrap.dedent("""
    import pickle, sys
    import pyarrow.fs as pafs
    fs = pickle.loads(sys.stdin.buffer.read())
    try:
        with fs.open_output_stream(sys.argv[1] + "/from-child.txt") as f:
            f.write(b"child")
        print(fs.open_input_stream(sys.argv[1] + "/from-parent.txt").read().decode())
    except OSError as e:
        print("OSError", e)
    del fs
    pafs.finalize_s3()  # else the SDK may crash at exit
""")


def test_unpickled_filesystem_uses_the_credentials_of_its_process(bucket, s3):
    """A copy in a fresh process reads and writes with that process's env keys — and only with them."""
    fs, path = storage.arrow_fs(storage.join(bucket, "runs"))
    storage.write_text(storage.join(bucket, "runs", "from-parent.txt"), "parent")
    data = pickle.dumps(fs)
    # (The server's access key, "clman", is also the module's name: test_pickled_filesystem_holds_no_credential.)
    assert s3.env()["AWS_SECRET_ACCESS_KEY"].encode() not in data

    def child(**changes) -> str:
        import os

        child_env = {**os.environ, **changes}
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, path], input=data, env=child_env, capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return done.stdout.decode().strip()

    assert child() == "parent"
    assert storage.read_text(storage.join(bucket, "runs", "from-child.txt")) == "child"
    denied = child(AWS_SECRET_ACCESS_KEY="wrong-secret-for-child")
    assert re.match(r"OSError .*AWS Error (ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH)", denied), denied
    assert "wrong-secret" not in denied
