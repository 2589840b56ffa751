"""One run name, one run: a checked name, a lock beside the run, and the run's fingerprint (Ray-free).

**Names.** ``--run-name`` is one folder under ``--out``: a name with ``/``, ``\\`` or ``..``, an
empty one or one starting with ``.`` would write outside it or hide it (:func:`check_run_name`).

**Lock.** ``<out>/<run-name>/.lock`` is JSON (run, job, host, pid, the pid's start time and the
host's boot id, start and heartbeat times, a random token): metadata only, nothing a result reads.
It is created only where none is: on S3 by a conditional PUT (``If-None-Match: *``), locally by
``link()`` of a complete temporary file (atomic like ``O_CREAT|O_EXCL``, also on NFS, and a reader
never sees a half-written lock). A second job with the same name is refused in one line naming the
holder. The holder rewrites the lock every ``HEARTBEAT_S`` s from a daemon thread (on S3 with
``If-Match`` its own ETag: a lock taken over is noticed and logged, never overwritten) and deletes
it when the job ends: success, error (``with``) or interpreter exit (``atexit``).

A lock is stale, and taken over with a warning, when
- its heartbeat is older than ``STALE_S`` s: on S3 the object's ``Last-Modified`` against the
  ``Date`` of the same response (the server's clock twice: client clock skew does not count);
  locally the file's mtime against this machine's clock;
- or its holder ran on this host (same host name and boot id) and that process is gone or a
  zombie (SIGKILL, the OOM killer, a driver restarted at once), or its pid now belongs to another
  process (another start time).
A takeover swaps exactly the stale lock it read (S3: ``If-Match`` its ETag; locally a rename of
the file, checked by its token), so of two jobs taking over one stale lock, one wins.

Measured on SeaweedFS 4.48 (the test server, ``weed version``): ``If-None-Match: *`` on an existing
key answers 412 PreconditionFailed and leaves the object; of 20 concurrent conditional PUTs of a new
key one succeeded; ``If-Match`` with another ETag answers 412 on PUT and DELETE. AWS S3 has both
conditions since 2024. A server that ignores ``If-None-Match`` is noticed when the lock is taken (a
second conditional PUT of the lock must fail) and logged: there the lock cannot refuse a second job.

**Fingerprint.** ``<out>/<run-name>/run.json`` holds, from the first start, the sha256 of the
resolved config (every field but ``RESUMABLE``: where and how fast the run runs, not what it
computes — a resume on other hardware is legitimate), of the manifest's bytes and of the encoder
checkpoint's bytes (finetune ``--encoder``). A resume whose fingerprint differs is refused in one
line naming what differs, unless ``--force-resume`` (a warning; run.json then records the new
inputs). A run folder with no checkpoint yet has nothing to resume: its run.json is replaced.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from clman import config as C
from clman import storage
from clman.errors import JobError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
HEARTBEAT_S = 30.0  # seconds between the holder's rewrites of its lock
STALE_S = 120.0  # a lock whose last rewrite is older than this is taken over
# Config fields that may change on resume: resources, precision, compilation, how frames are fed.
RESUMABLE = ("scale.", "data.cache", "data.cache_fraction", "data.decode_tasks", "data.decode_cpus")


def check_run_name(name: str | None, flag: str = "--run-name") -> str:
    """``name`` when it is one plain folder name, else a one-line :class:`C.ConfigError`."""
    if not name or name.startswith(".") or ".." in name or any(c in name for c in "/\\\0"):
        raise C.ConfigError(
            f"{flag} {name!r}: must be one folder name: not empty, no '/', '\\' or '..', not starting with '.'"
        )
    return name


# -- the lock ---------------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command (state first, start time at [19]); None if absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _gone(pid: Any, start: str | None) -> bool:
    """Whether process ``pid`` of this host has exited, is a zombie, or is another process now."""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError):
        return True
    except PermissionError:  # another user's live process
        pass
    fields = _stat(pid)
    if fields is None:  # no /proc (macOS): alive, as kill() said; with /proc: exited since
        return os.path.isdir("/proc/self")
    return fields[0] in ("Z", "X") or (start is not None and fields[19] != start)


def _utc(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Held(NamedTuple):
    """A lock as read: its content, its age in seconds by the storage's clock, its S3 ETag."""

    info: dict
    age: float
    etag: str | None = None


class RunLock:
    """``<out>/<run_name>/.lock``: :meth:`acquire` or refuse, heartbeat while held, :meth:`release`."""

    def __init__(
        self, out: str, run_name: str, job: str = "job", *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ):
        self.run_name = check_run_name(run_name)
        self.uri = storage.join(out, run_name, LOCK_FILE)
        self.path = "" if storage.is_s3(self.uri) else str(storage._local(self.uri))  # file:// too
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        pid, stat = os.getpid(), _stat(os.getpid())
        self.info = {
            "run": run_name,
            "job": job,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": stat[19] if stat else None,
            "boot_id": _boot_id(),
            "started": _utc(),
            "heartbeat": _utc(),
            "token": uuid.uuid4().hex,
        }
        self.etag: str | None = None
        self._held = False
        self._io = threading.Lock()  # one write of the lock at a time: heartbeat or release
        self._stop = threading.Event()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # Storage: the same four operations on S3 and on local disk.
    def _body(self) -> bytes:
        return json.dumps(self.info, indent=1).encode()

    def _s3(self) -> tuple[Any, str, str]:
        bucket, key = storage._split(self.uri)
        return storage.s3_client(), bucket, key

    def _put(self, **condition) -> str | None:
        """S3 PUT of our lock under ``condition``; its ETag, or None on 412 (the condition failed)."""
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()

        def put():
            try:
                return client.put_object(Bucket=bucket, Key=key, Body=self._body(), **condition)["ETag"]
            except ClientError as e:
                if storage._error_code(e)[1] == 412:
                    return None
                raise

        return storage._s3_call(self.uri, put)

    def _create(self) -> bool:
        """Create the lock where none is; False when one is there."""
        if storage.is_s3(self.uri):
            self.etag = self._put(IfNoneMatch="*")
            return self.etag is not None
        path, tmp = self.path, f"{self.path}.{self.info['token']}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(self._body())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise storage.StorageError(f"{self.uri}: cannot create the run's lock: {e.strerror or e}") from None

    def _read(self) -> Held | None:
        """The lock as it is now; None when there is none."""
        if storage.is_s3(self.uri):
            client, bucket, key = self._s3()

            def get():
                r = client.get_object(Bucket=bucket, Key=key)
                return r["Body"].read(), r["LastModified"], r["ETag"], r["ResponseMetadata"]["HTTPHeaders"]

            try:
                body, modified, etag, headers = storage._s3_call(self.uri, get)
            except storage.StorageNotFoundError:
                return None
            now = (
                email.utils.parsedate_to_datetime(headers["date"])
                if "date" in headers
                else dt.datetime.now(dt.timezone.utc)
            )
            return Held(_parse(body), (now - modified).total_seconds(), etag)
        try:
            with open(self.path, "rb") as f:
                return Held(_parse(f.read()), time.time() - os.fstat(f.fileno()).st_mtime)
        except FileNotFoundError:
            return None

    def _swap(self, held: Held) -> bool:
        """Replace exactly the lock ``held`` with ours; False when it changed meanwhile."""
        if storage.is_s3(self.uri):
            etag = self._put(IfMatch=held.etag)
            self.etag = etag or self.etag
            return etag is not None
        aside = f"{self.path}.{self.info['token']}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = _parse(f.read())
        if moved.get("token") != held.info.get("token"):  # another job's fresh lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self._create()

    def _delete(self) -> None:
        if storage.is_s3(self.uri):
            client, bucket, key = self._s3()
            storage._s3_call(self.uri, lambda: client.delete_object(Bucket=bucket, Key=key))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):  # a job refused before its first write leaves no folder
                os.rmdir(os.path.dirname(self.path))

    # The protocol.
    def stale(self, held: Held) -> str:
        """Why ``held`` may be taken over ("" when its holder looks alive)."""
        info = held.info
        if held.age > self.stale_s:
            return f"no heartbeat for {held.age:.0f} s"
        if (info.get("host"), info.get("boot_id")) == (self.info["host"], self.info["boot_id"]) and _gone(
            info.get("pid"), info.get("pid_start")
        ):
            return f"its process {info.get('pid')} on this host is gone"
        return ""

    def refusal(self, held: Held) -> str:
        i = held.info
        return (
            f"run {self.run_name!r} is in use: {self.uri} is held by host {i.get('host', '?')} pid "
            f"{i.get('pid', '?')} ({i.get('job', 'a job')} started {i.get('started', '?')}, last heartbeat "
            f"{held.age:.0f} s ago); wait for that job to end or stop it, or choose another --run-name "
            f"(a lock whose holder is gone is taken over: at once on its host, elsewhere after "
            f"{self.stale_s:.0f} s without heartbeat)"
        )

    def acquire(self) -> "RunLock":
        """Take the lock, taking over a stale one; a one-line :class:`JobError` while another job holds it."""
        for _ in range(5):
            if self._create():
                break
            held = self._read()
            if held is None:  # released meanwhile
                continue
            if held.info.get("token") == self.info["token"]:  # our own PUT, retried after it landed
                self.etag = held.etag
                break
            why = self.stale(held)
            if not why:
                raise JobError(self.refusal(held))
            log.warning(
                "run %r: taking over the lock of host %s pid %s (started %s): %s",
                self.run_name,
                held.info.get("host"),
                held.info.get("pid"),
                held.info.get("started"),
                why,
            )
            if self._swap(held):
                break
        else:
            raise JobError(
                f"run {self.run_name!r}: {self.uri} changed hands 5 times while this job tried to "
                "take it; is another job starting with this --run-name?"
            )
        if storage.is_s3(self.uri) and self._put(IfNoneMatch="*") is not None:
            log.warning(
                "the S3 server at %s ignores If-None-Match: the lock %s cannot refuse a second job "
                "with this --run-name",
                storage._endpoint_name(),
                self.uri,
            )
        self._held = True
        self._stop.clear()
        atexit.register(self.release)
        threading.Thread(target=self._beat, name=f"run-lock-{self.run_name}", daemon=True).start()
        return self

    def refresh(self) -> bool:
        """Rewrite the lock with a new heartbeat time; False (and an error line) when it is no longer ours."""
        with self._io:
            if not self._held:
                return False
            self.info["heartbeat"] = _utc()
            if storage.is_s3(self.uri):
                etag = self._put(IfMatch=self.etag)
                if etag is None:  # another ETag: ours retried after it landed, or taken over
                    held = self._read()
                    etag = held.etag if held and held.info.get("token") == self.info["token"] else None
            else:
                held = self._read()
                etag = "" if held and held.info.get("token") == self.info["token"] else None
                if etag is not None:
                    storage.write_bytes(self.uri, self._body())
            if etag is None:
                log.error(
                    "run %r: the lock %s was taken over by another job (this one's heartbeat lapsed "
                    "for %.0f s?); two jobs may now write this run",
                    self.run_name,
                    self.uri,
                    self.stale_s,
                )
                self._held = False
                return False
            self.etag = etag or self.etag
            return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.refresh():
                    return
            except Exception as e:  # S3 away for longer than the retries: try again next beat
                log.warning("run %r: lock heartbeat failed: %s", self.run_name, storage._scrub(str(e))[:300])

    def release(self) -> None:
        """Delete the lock if it is still ours; idempotent."""
        self._stop.set()
        atexit.unregister(self.release)
        with self._io:
            if not self._held:
                return
            self._held = False
            try:
                held = self._read()
                if held is not None and held.info.get("token") == self.info["token"]:
                    self._delete()
            except Exception as e:  # the job's own outcome matters more; the lock goes stale
                log.warning(
                    "run %r: could not remove the lock %s: %s", self.run_name, self.uri, storage._scrub(str(e))[:300]
                )


def _parse(body: bytes) -> dict:
    try:
        info = json.loads(body)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


# -- the fingerprint --------------------------------------------------------------------------------
def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def fingerprint(job: str, cfg, manifest: str, encoder: str | None = None, **args: Any) -> dict:
    """The record of what a run computes: ``job``, ``cfg`` but RESUMABLE, ``args`` (e.g. pretrain's
    split) and the sha256 of the manifest's and the encoder's bytes; ``record["fingerprint"]`` sums it up."""
    tree = C.to_dict(cfg)  # the job's own fields at the top: named as --set names them (finetune.lr)
    tree = {
        **{k: v for k, v in tree.items() if isinstance(v, dict)},
        job: {k: v for k, v in tree.items() if not isinstance(v, dict)},
    }
    config = {k: v for k, v in _flat(tree).items() if not k.startswith(RESUMABLE)}
    config.update({"job": job, **{f"--{k}": v for k, v in args.items()}})
    parts = {
        "config": _sha256(json.dumps(config, sort_keys=True)),
        "manifest": _sha256(storage.read_bytes(manifest)),
        "encoder": _sha256(storage.read_bytes(encoder)) if encoder else None,
    }
    return {
        "fingerprint": _sha256(json.dumps(parts, sort_keys=True)),
        "sha256": parts,
        "manifest": manifest,
        "encoder": encoder,
        "config": config,
        "excluded": list(RESUMABLE),
    }


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two records, one phrase per part: config (the keys), manifest, encoder."""
    found, was, now = [], old.get("config") or {}, new["config"]
    sums = old.get("sha256") or {}
    if sums.get("config") != new["sha256"]["config"]:
        keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        changed = [f"{k} {was.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys]
        more = f", {len(changed) - 3} more" if len(changed) > 3 else ""
        found.append(f"config ({', '.join(changed[:3]) + more if changed else 'another config'})")
    for part in ("manifest", "encoder"):
        if sums.get(part) != new["sha256"][part]:
            found.append(
                f"{part} ({old.get(part) or 'none'} -> {new[part] or 'none'}, other bytes)"
                if old.get(part) != new[part]
                else f"{part} ({new[part]}: its bytes changed)"
            )
    return found


def check_resume(
    run_dir: str, record: dict, force: bool = False, has_checkpoint: Callable[[], bool] = lambda: True
) -> None:
    """Refuse to continue the run in ``run_dir`` with inputs other than its first start's (one line).

    First start: writes ``run.json``. ``force`` (``--force-resume``): a warning, and run.json takes the
    new inputs. ``has_checkpoint()`` (asked only when the inputs differ) False: nothing to resume from,
    so the new inputs are simply recorded.
    """
    uri = storage.join(run_dir, RUN_FILE)
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    try:
        old = json.loads(storage.read_text(uri))
    except storage.StorageNotFoundError:
        old = None
    except ValueError:
        raise JobError(f"{uri}: not JSON; delete it to record this run's inputs again") from None
    if old is not None and old.get("fingerprint") == record["fingerprint"]:
        return
    if old is not None:
        what = "; ".join(differences(old, record)) or "another fingerprint"
        if not has_checkpoint():
            log.info("run %r has no checkpoint to resume from: recording its new inputs (%s)", name, what)
        elif force:
            log.warning("--force-resume: run %r continues from its checkpoints with another %s", name, what)
        else:
            raise JobError(
                f"run {name!r} was started with another {what}; rerun with its first inputs, choose "
                "another --run-name, or pass --force-resume to continue it anyway"
            )
    storage.write_text(uri, json.dumps(record, indent=2, default=str) + "\n")


@contextlib.contextmanager
def claim(
    out: str, run_name: str, record: dict, *, force: bool = False, has_checkpoint: Callable[[], bool] = lambda: True
) -> Iterator[RunLock]:
    """For the ``with`` block: hold the run's lock, its fingerprint checked (:func:`check_resume`)."""
    with RunLock(out, run_name, record["config"].get("job", "job")) as lock:
        check_resume(storage.join(out, run_name), record, force, has_checkpoint)
        yield lock
