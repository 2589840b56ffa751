"""Local paths and s3:// URIs behind one small API.

Every input and output of clman is a URI: a local path (or `file://...`) or
`s3://bucket/key`. The endpoint and region come from `AWS_ENDPOINT_URL` and
`AWS_REGION` (or `AWS_DEFAULT_REGION`), so the same command works against AWS,
MinIO, Ceph or the embedded SeaweedFS (`clman.local_s3`). Credentials come
from the AWS default chain, resolved by each process when it makes a request:
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), a shared
config/SSO profile (`AWS_PROFILE`), web identity (IRSA), an instance or
container role. clman never holds a credential itself: none is passed to
boto3 or pyarrow, so none is pickled (the `arrow_fs` filesystem that Ray
pickles into `tuner.pkl` and to its workers), stored or printed.

Writes are atomic: a local file is written to a hidden temporary file beside
it and renamed; an S3 object appears only when its PUT (or multipart upload)
completes. Failures raise `StorageError` with one line naming the URI and the
cause; the secret key and session token never appear in a message.

Retries come in two layers: botocore's "standard" mode retries each API call
(`S3_MAX_ATTEMPTS`), and `with_retries` retries the whole operation —
including reading the response body, which botocore does not retry — on
throttling, 5xx answers and dropped connections, with jittered exponential
backoff. The filesystem Ray Train writes checkpoints through (`arrow_fs`) has
its own retries in the AWS C++ SDK (`ARROW_RETRIES`).

Facts that shaped the retries (SeaweedFS stopped for 20 s during a finetune):
- The old budget (4 attempts, ~4 s of waiting) lost the run: decode tasks gave up
  and skipped their videos, and Ray Train's controller failed on its first failed
  write of `checkpoint_manager_snapshot.json`. Both layers now wait at least ~30 s:
  `with_retries` makes `RETRY_ATTEMPTS` attempts with delays 0.5, 1, 2, 4, then 8 s
  (x a jitter in [0.5, 1]: 32-63 s in all); the arrow filesystem uses the SDK's
  default strategy, delays of 25 ms x 2^k, `ARROW_RETRIES` = 11 retries = 51 s.
  (Measured against a closed port: the SDK's "standard" strategy, pyarrow's default,
  waited 1.5 s in 3 attempts, 17.7 s in 6, 47 s in 8, drawing random delays and on a
  retry quota shared by the filesystem's calls; the default strategy's 8 retries 6.4 s.)
  pyarrow drops the retry strategy when it pickles the filesystem, as Ray does to
  hand it to its workers: `RetryingS3FileSystem` keeps it.
- A refused connection is a configuration error (a wrong `AWS_ENDPOINT_URL`) the
  first time, and an outage once the endpoint has answered: `with_retries` retries
  it only for an endpoint this process has reached, or where `CLMAN_S3_REACHED=1`
  says the job's driver did (`clman.launch.session` sets it for the Ray workers it
  starts: a decode task may be the first S3 call of a fresh worker process).

Facts that shaped the credentials (boto3/botocore 1.44, pyarrow 26, checked against
SeaweedFS and a recording HTTP endpoint, tests/test_credentials.py):
- pyarrow's `S3FileSystem` pickles access key, secret key and session token when they
  were given to it, nothing when it uses the default chain; its chain (AWS C++ SDK)
  reads `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` at each
  request, so an unpickled copy uses the credentials of the process it lands in.
- boto3 sends `AWS_SESSION_TOKEN` from the default chain; a client is built from its own
  `boto3.session.Session` (the module-level default session keeps the credentials it
  first found), cached per digest of the `AWS_*` variables. Chain credentials that
  expire (SSO, web identity, roles, env with `AWS_CREDENTIAL_EXPIRATION`) are
  refreshable: botocore renews them before they expire.
- Not retried by `with_retries`: an expired or invalid session token (a static one
  never renews itself; refreshable ones are renewed before they expire, so an expired
  one means its source, e.g. the SSO session, expired) and clock skew
  (`RequestTimeTooSkewed`, `RequestExpired`: the request's time is off by more than
  the server allows). botocore makes one attempt at a skewed request; the C++ SDK
  retries it within `ARROW_RETRIES`, adjusting its clock to the answer's Date. Each
  gets its own one-line cause, not "access denied"; pyarrow's wording: `s3_problem`.
- HEAD answers (`head_bucket`, `head_object`) have no body, so no error code: a
  bodiless 400/403 is followed by a GET on the bucket that names the cause.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

T = TypeVar("T")

S3_MAX_ATTEMPTS = 3  # botocore attempts per API call
RETRY_ATTEMPTS = 12  # our attempts per whole operation: waits of 0.5, 1, 2, 4, then 8 s, x a jitter in [0.5, 1]
RETRY_BASE_DELAY = 0.5  # seconds; doubles each retry, capped at RETRY_MAX_DELAY
RETRY_MAX_DELAY = 8.0
ARROW_RETRIES = 11  # the arrow filesystem's retries per call: 25 ms x 2^k, 51 s in all
REACHED_ENV = "CLMAN_S3_REACHED"  # "1": the job reached the endpoint already (refused = outage)
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; larger writes use a multipart upload

_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestThrottled",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"}
_SKEW_CODES = {"RequestTimeTooSkewed", "RequestExpired"}
_TOKEN_VARIABLES = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")  # botocore reads both
_EXPIRED = (
    "the S3 session token has expired — refresh the credentials (aws sso login, or export new "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN)"
)
_INVALID_TOKEN = "the S3 session token is invalid — check AWS_SESSION_TOKEN (it must match AWS_ACCESS_KEY_ID)"


class StorageError(Exception):
    """A storage operation failed; the message is one line naming the URI and the cause."""


class StorageNotFoundError(StorageError):
    """The object or file does not exist (the bucket does)."""


# -- URIs ---------------------------------------------------------------------
def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _check_scheme(uri: str) -> None:
    scheme = urlparse(str(uri)).scheme
    if scheme not in ("", "s3", "file") and not re.fullmatch(r"[a-zA-Z]", scheme):  # "C:" on Windows
        raise StorageError(
            f"{uri}: unsupported URI scheme {scheme!r}; valid: a local path, file://..., s3://bucket/key"
        )


def _split(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    rest = str(uri)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in S3 URI; expected s3://bucket/key")
    return bucket, key


def _local(uri: str) -> Path:
    uri = str(uri)
    _check_scheme(uri)
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with "/" (os.path.join for local paths)."""
    base = str(base)
    if is_s3(base):
        pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    return os.path.join(base, *parts)


# -- S3 client, errors, retries ----------------------------------------------
_clients: dict[tuple, object] = {}


def _aws_env_digest() -> str:
    """A digest of every AWS_* variable: a changed key, token or profile gets a new client, no secret is kept."""
    items = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    return hashlib.sha256(repr(items).encode()).hexdigest()


def s3_client(max_attempts: int = S3_MAX_ATTEMPTS):
    """A boto3 S3 client on the AWS default credential chain, with botocore standard retries.

    No credential is passed: the client's own session resolves (and, where they
    expire, refreshes) them. Cached per process and per `AWS_*` variables (boto3
    clients are thread-safe but must not cross a fork).
    """
    import boto3
    from botocore.config import Config

    cache_key = (os.getpid(), max_attempts, _aws_env_digest())
    client = _clients.get(cache_key)
    if client is None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        session = boto3.session.Session()
        # AWS_REGION first (botocore reads only AWS_DEFAULT_REGION and the profile's region).
        region = os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # Custom endpoints (MinIO, SeaweedFS, an IP address) need path-style URLs.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        _clients[cache_key] = client
    return client


def _endpoint_name() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "the default AWS S3 endpoint"


def _scrub(text: str) -> str:
    """One line, with the secret key and session token (should a server echo them) masked."""
    text = str(text)
    for name in ("AWS_SECRET_ACCESS_KEY", *_TOKEN_VARIABLES):
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return " ".join(text.split())


def _session_token_set() -> bool:
    return any(os.environ.get(name) for name in _TOKEN_VARIABLES)


def _credentials_hint() -> str:
    return "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" + ("/AWS_SESSION_TOKEN" if _session_token_set() else "")


def _skew() -> str:
    return (
        f"clock skew between this machine and {_endpoint_name()} — the request time is off by more than "
        "the server allows: check NTP / the system clock"
    )


def _token_or_clock_cause(code: str) -> str | None:
    """The cause, for an S3 error code that means an expired / invalid session token or clock skew."""
    if code in _EXPIRED_CODES:
        return _EXPIRED
    if code == "InvalidToken":
        return _INVALID_TOKEN
    if code in _SKEW_CODES:
        return _skew()
    return None


def s3_problem(text: str) -> str | None:
    """The cause named in an S3 error message — a pyarrow ``OSError`` — when it is an
    expired or invalid session token or clock skew, as a phrase; else None.

    pyarrow words them "AWS Error UNKNOWN (HTTP status 400) during ... ExceptionName:
    ExpiredToken ...", "AWS Error REQUEST_TIME_TOO_SKEWED ...", "AWS Error REQUEST_EXPIRED ...".
    """
    text = str(text)
    text = text[text.find("AWS Error") :] if "AWS Error" in text else text  # not the key and bucket before it
    if re.search(r"expired_?token|token_?refresh_?required", text, re.IGNORECASE):
        return _EXPIRED
    if re.search(r"invalid_?token", text, re.IGNORECASE):
        return _INVALID_TOKEN
    if re.search(r"skew|request_?expired", text, re.IGNORECASE):
        return _skew()
    return None


def _error_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError; ("", 0) otherwise."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


_reached: set[str] = set()  # endpoints that answered this process


def _mark_reached() -> None:
    _reached.add(_endpoint_name())


def endpoint_reached() -> bool:
    """Whether the S3 endpoint has answered this process (or, per ``CLMAN_S3_REACHED``, the job)."""
    return _endpoint_name() in _reached or os.environ.get(REACHED_ENV) == "1"


def _is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, a connection dropped mid-request, or an outage: worth retrying the operation."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        return code in _THROTTLE_CODES or status == 429 or status >= 500
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        # botocore already retried the connect: an endpoint that never answered is a
        # configuration error, one that answered before is down for a while.
        return endpoint_reached()
    return isinstance(exc, (ConnectionClosedError, ReadTimeoutError, ResponseStreamingError, IncompleteReadError))


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = RETRY_BASE_DELAY,
    max_delay: float = RETRY_MAX_DELAY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn(); on a transient S3 failure wait (jittered, doubling) and call again.

    Non-transient errors and the last transient one propagate unchanged.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not _is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning(
                "%s: transient S3 error at %s (%s), retry %d/%d in %.1f s",
                what,
                _endpoint_name(),
                _scrub(type(exc).__name__ + ": " + str(exc))[:200],
                attempt,
                attempts - 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")


def _translate(uri: str, exc: BaseException) -> StorageError:
    """A botocore / boto3 exception as a one-line StorageError naming `uri`."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        TokenRetrievalError,
        UnauthorizedSSOTokenError,
    )

    bucket = _split(uri)[0] if is_s3(uri) else ""
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(f"{uri}: cannot reach endpoint {_endpoint_name()}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{uri}: no S3 credentials — set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(+ AWS_SESSION_TOKEN) or AWS_PROFILE"
        )
    if isinstance(exc, (UnauthorizedSSOTokenError, TokenRetrievalError)):  # the SSO session behind the profile
        return StorageError(f"{uri}: {_EXPIRED}")
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
    elif isinstance(exc, S3UploadFailedError):
        match = re.search(r"\((\w+)\)", str(exc))
        code, status = (match.group(1) if match else ""), 0
    else:
        return StorageError(f"{uri}: {type(exc).__name__}: {_scrub(str(exc))}")
    if code == "NoSuchBucket":
        return StorageError(f"{uri}: bucket '{bucket}' does not exist")
    cause = _token_or_clock_cause(code)
    if cause:
        return StorageError(f"{uri}: {cause}")
    if code in _DENIED_CODES or status == 403:
        return StorageError(f"{uri}: access denied — {_credentials_hint()}")
    if code in _MISSING_CODES or status == 404:
        return StorageNotFoundError(f"{uri}: no such object")
    message = exc.response.get("Error", {}).get("Message", "") if isinstance(exc, ClientError) else str(exc)
    return StorageError(f"{uri}: S3 error {code or status}: {_scrub(message)}")


def _s3_call(uri: str, fn: Callable[[], T]) -> T:
    """Run an S3 operation with retries; raise StorageError on failure."""
    try:
        result = with_retries(fn, uri)
        _mark_reached()
        return result
    except StorageError:
        raise
    except Exception as exc:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, (BotoCoreError, ClientError, Boto3Error)):
            raise (_bodiless_cause(uri, exc) or _translate(uri, exc)) from None
        raise


def _bodiless_cause(uri: str, exc: BaseException) -> StorageError | None:
    """For a HEAD's bodiless 400/403, the expired token or clock skew a GET on the bucket names; else None."""
    code, status = _error_code(exc)
    if code != str(status) or status not in (400, 403) or not is_s3(uri):
        return None
    try:
        s3_client(max_attempts=1).list_objects_v2(Bucket=_split(uri)[0], MaxKeys=0)
    except Exception as probe:
        cause = _token_or_clock_cause(_error_code(probe)[0])
        return StorageError(f"{uri}: {cause}") if cause else None
    return None


def _check_bucket(uri: str) -> None:
    """Raise the clear StorageError when the bucket of `uri` is missing or not ours."""
    bucket, _ = _split(uri)
    client = s3_client()
    try:
        _s3_call(uri, lambda: client.head_bucket(Bucket=bucket))
    except StorageNotFoundError:
        # HEAD answers carry no error code: a 404 on a bucket means the bucket is missing.
        raise StorageError(f"{uri}: bucket '{bucket}' does not exist") from None


def _local_call(uri: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except FileNotFoundError:
        raise StorageNotFoundError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, expected a file") from None
    except NotADirectoryError:
        raise StorageError(f"{uri}: a parent of this path is a file, not a directory") from None
    except PermissionError:
        raise StorageError(f"{uri}: permission denied") from None
    except OSError as exc:
        import errno

        # A full disk or quota: the write's temporary file is already removed (``write_bytes``).
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            raise StorageError(f"{uri}: {reason}") from None
        raise


# -- bytes and text -----------------------------------------------------------
def read_bytes(uri: str) -> bytes:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split(uri)
        client = s3_client()
        # The body read is inside the retried call: a connection dropped mid-stream is retried.
        return _s3_call(uri, lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read())
    path = _local(uri)
    return _local_call(uri, path.read_bytes)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    uri = str(uri)
    data = bytes(data) if not isinstance(data, bytes) else data
    if is_s3(uri):
        bucket, key = _split(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri}: no object key to write to")
        client = s3_client()
        if len(data) <= MULTIPART_THRESHOLD:
            _s3_call(uri, lambda: client.put_object(Bucket=bucket, Key=key, Body=data))
        else:
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
            _s3_call(uri, lambda: client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config))
        return
    path = _local(uri)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    _local_call(uri, write)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


# -- listing, existence, deletion ---------------------------------------------
def exists(uri: str) -> bool:
    """True for an existing object/file, or a non-empty S3 prefix / local directory."""
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = _split(uri)
    client = s3_client()
    if key and not key.endswith("/"):
        try:
            _s3_call(uri, lambda: client.head_object(Bucket=bucket, Key=key))
            return True
        except StorageNotFoundError:
            pass
    _check_bucket(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    listing = _s3_call(uri, lambda: client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1))
    return listing.get("KeyCount", 0) > 0


def list_uris(prefix_uri: str, suffix: str = "") -> list[str]:
    """Sorted full URIs of the files under a directory / S3 prefix (recursive) ending in `suffix`.

    A missing local directory or empty prefix gives []; a missing bucket raises.
    """
    prefix_uri = str(prefix_uri)
    if is_s3(prefix_uri):
        bucket, key = _split(prefix_uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        client = s3_client()

        def list_all() -> list[str]:
            keys = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            return keys

        keys = _s3_call(prefix_uri, list_all)
        return sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith(suffix) and not k.endswith("/"))
    root = _local(prefix_uri)
    if not root.is_dir():
        return []
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            # Skip our own in-flight temporaries (".<name>.<random>.tmp").
            if name.endswith(suffix) and not (name.startswith(".") and name.endswith(".tmp")):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def delete(uri: str) -> None:
    """Delete one object / file; deleting a missing one is not an error (as in S3)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split(uri)
        client = s3_client()
        _s3_call(uri, lambda: client.delete_object(Bucket=bucket, Key=key))
        return
    path = _local(uri)
    _local_call(uri, lambda: path.unlink(missing_ok=True))


# -- Parquet and pyarrow filesystems -----------------------------------------
def read_parquet(uri: str) -> pa.Table:
    data = read_bytes(uri)
    try:
        return pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise StorageError(f"{uri}: not a Parquet file ({_scrub(str(exc))})") from None


def write_parquet(table: pa.Table, uri: str) -> None:
    """Serialise in memory, then one atomic write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


_CREDENTIAL_ARGS = ("access_key", "secret_key", "session_token")


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with ``ARROW_RETRIES`` retries per call, also after pickling.

    Ray Train pickles ``RunConfig(storage_filesystem=...)`` to its controller and workers,
    and pyarrow's pickle of an ``S3FileSystem`` leaves the retry strategy out: every copy
    fell back to 3 attempts (~1.5 s). This class pickles its arguments and rebuilds itself,
    without any credential argument: a copy uses the default chain of the process that
    unpickles it (Ray Tune also writes the pickle into the bucket, as ``tuner.pkl``).
    """

    def __init__(self, retries: int = ARROW_RETRIES, **kwargs):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retries), **kwargs)
        self.retries = retries
        self._kwargs = {k: v for k, v in kwargs.items() if k not in _CREDENTIAL_ARGS}

    def __reduce__(self):
        return _rebuild_s3fs, (self.retries, self._kwargs)


def _rebuild_s3fs(retries: int, kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(retries, **kwargs)


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for `uri`, e.g. Ray's RunConfig(storage_filesystem=...).

    For S3 the filesystem has the endpoint and region of `s3_client` and no
    credentials (the AWS C++ SDK's default chain, in whichever process uses it:
    nothing secret is pickled), and the bucket is checked first so a typo fails
    here with a clear message rather than deep inside Ray. Ray Train writes every
    checkpoint and its run state through it, and one failed write ends the run:
    it retries each call for ~50 s (`RetryingS3FileSystem`, module docstring).
    """
    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(_local(uri).resolve())
    bucket, key = _split(uri)
    _check_bucket(uri)
    kwargs: dict = {"region": s3_client().meta.region_name}
    if os.environ.get("AWS_ENDPOINT_URL"):
        endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
        kwargs["endpoint_override"] = endpoint.netloc
        kwargs["scheme"] = endpoint.scheme or "https"
    return RetryingS3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
