"""A lease on a run root: one writer at a time.

A run root ``{storage}/{name}/{run}`` is written by one process at a time. The writer holds
``{run root}/.lease.json``, a small JSON object naming its owner, host, process, heartbeat
and expiry::

    {"owner": "experiment flow run 3f2c...", "host": "node-7", "pid": 4242, "token": "...",
     "acquired": 1733480000.0, "heartbeat": 1733480090.0, "expires": 1733480210.0, ...}

Creating it is atomic: ``O_CREAT | O_EXCL`` on local storage, a conditional put with
``If-None-Match: *`` on S3 (the loser of a race gets ``FileExistsError``). A second writer is
refused with :class:`LeaseHeldError` naming the holder. While a lease is held a background
thread renews it every ``ttl_s / 4`` seconds (on S3 a put with ``If-Match`` on the last ETag;
locally a replace under a short lock file), and it is deleted on release.

A lease is *stale*, and taken over by the next writer, when it has expired (its holder
stopped renewing it), or at once when its holder ran on this host and that process is gone
(``kill -9``, a crash: rerunning the command resumes without waiting). Takeover is itself
a conditional replace, so of two writers racing for a stale lease only one wins.

Helpers on other machines (dump partitions started as deployment runs) write under a root
whose lease their parent holds: they are its *delegates*, checked with
:func:`check_delegate` against the parent's token, and each leases its own sub-folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from integral_superposition import storage

log = logging.getLogger(__name__)

LEASE_NAME = ".lease.json"
DEFAULT_TTL_S = 120.0
"""Seconds a lease stays valid without a heartbeat (renewed every quarter of it)."""
_LOCK_STALE_S = 30.0  # a local update lock older than this was left by a crashed process

_HELD: dict[str, RunLease] = {}
_HELD_LOCK = threading.Lock()


class LeaseHeldError(RuntimeError):
    """Another writer holds the run root's lease."""

    def __init__(self, message: str, holder: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.holder = dict(holder or {})


class LeaseLostError(RuntimeError):
    """This writer's lease was taken over (it stopped renewing it for longer than its TTL)."""


def _pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), to tell a live
    holder from a new process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # bytes: a process name may be any bytes
            return f.read().rsplit(b")", 1)[1].split()[19].decode("ascii")
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _process_gone(pid: Any, start: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return start is not None and _pid_start(pid) not in (None, start)


def describe_holder(doc: Mapping[str, Any], now: float | None = None) -> str:
    """``owner on host (pid N), since ..., last heartbeat Ns ago, expires in Ms``."""
    now = time.time() if now is None else now
    since = doc.get("acquired")
    since_s = (
        _dt.datetime.fromtimestamp(float(since), _dt.UTC).isoformat(timespec="seconds")
        if isinstance(since, int | float)
        else "?"
    )
    beat = doc.get("heartbeat")
    beat_s = f"{now - float(beat):.0f} s ago" if isinstance(beat, int | float) else "never"
    exp = doc.get("expires")
    exp_s = f"{float(exp) - now:.0f} s" if isinstance(exp, int | float) else "?"
    return (
        f"{doc.get('owner', '?')} on host {doc.get('host', '?')} (pid {doc.get('pid', '?')}), "
        f"since {since_s}, last heartbeat {beat_s}, expires in {exp_s}"
    )


def stale_reason(doc: Mapping[str, Any], now: float | None = None) -> str | None:
    """Why a lease may be taken over (expired, or its holder's process on this host is
    gone), or None while its holder may still be writing."""
    now = time.time() if now is None else now
    exp = doc.get("expires")
    if not isinstance(exp, int | float):
        return "it is unreadable"
    if now > float(exp):
        return f"it expired {now - float(exp):.0f} s ago"
    if doc.get("host") == socket.gethostname() and _process_gone(
        doc.get("pid"), doc.get("pid_start")
    ):
        return f"its process {doc.get('pid')} on this host is gone"
    return None


# -- the lock object on each kind of storage ---------------------------------------------------
class _LocalLockFile:
    """``.lease.json`` on a local filesystem: created with ``O_EXCL``; updates are
    compare-and-replace under a short-lived ``.lease.json.lock`` (also ``O_EXCL``)."""

    def __init__(self, path: str):
        self.path = path
        self.lock = path + ".lock"

    def create(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, storage.file_mode())
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return storage.sha256_bytes(data)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, storage.sha256_bytes(data)

    @contextlib.contextmanager
    def _locked(self):
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.stat(self.lock).st_mtime > _LOCK_STALE_S:
                        os.unlink(self.lock)
                        continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.lock!r}: held for over 10 s") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock)

    def replace(self, data: bytes, version: str) -> str | None:
        """Write ``data`` if the file still has ``version``; the new version, or None."""
        with self._locked():
            cur = self.read()
            if cur is None or cur[1] != version:
                return None
            with storage.atomic_open(self.path) as f:
                f.write(data)
            return storage.sha256_bytes(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            cur = self.read()
            if cur is None or cur[1] != version:
                return False
            os.unlink(self.path)
            return True


class _ObjectLockFile:
    """``.lease.json`` on S3 (and fsspec stores that honour S3's conditional puts): created
    with ``If-None-Match: *``, replaced with ``If-Match: <ETag>``."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path

    def _etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        try:
            return str(self.fs.info(self.path).get("ETag") or "")
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str:
        out = self.fs.pipe_file(self.path, data, mode="create")
        etag = out.get("ETag") if isinstance(out, dict) else None
        return str(etag or self._etag() or "")

    def read(self) -> tuple[bytes, str] | None:
        for _ in range(5):
            before = self._etag()
            if before is None:
                return None
            try:
                data = self.fs.cat_file(self.path)
            except FileNotFoundError:
                return None
            if self._etag() == before:
                return data, before
        raise RuntimeError(f"{self.path!r}: changes too fast to read a consistent version")

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            out = self.fs.pipe_file(self.path, data, IfMatch=version)
        except OSError as e:  # s3fs maps 412 Precondition Failed to EINVAL
            text = str(e).lower().replace("-", "")
            if (
                isinstance(e, FileNotFoundError)
                or e.errno == errno.EINVAL
                or "precondition" in text
            ):
                return None
            raise
        etag = out.get("ETag") if isinstance(out, dict) else None
        return str(etag or self._etag() or "")

    def delete(self, version: str) -> bool:
        if self._etag() != version:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
        return True


def _lock_file(root_uri: str, storage_options: Mapping[str, Any] | None):
    fs, path = storage.get_fs(storage.join(root_uri, LEASE_NAME), storage_options)
    if isinstance(fs, LocalFileSystem):
        return _LocalLockFile(path)
    return _ObjectLockFile(fs, path)


def read_lease(
    root_uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The lease document of a run root, or None when nobody holds it."""
    cur = _lock_file(root_uri, storage_options).read()
    if cur is None:
        return None
    try:
        doc = json.loads(cur[0])
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _lease_doc(data: bytes, root: str) -> dict[str, Any]:
    """The lease document in ``data``; ``{}`` for one a crash left half-written (empty, or the
    start of a lease). A file that is neither is not ours: :class:`FileExistsError`, and it is
    never replaced nor removed."""
    try:
        doc = json.loads(data)
    except ValueError:
        if not data.strip() or data.startswith(b'{\n  "acquired"'):
            return {}
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("token"), str):
        return doc
    raise FileExistsError(
        f"run root {root!r} holds a {LEASE_NAME} that is not a lease this project wrote: "
        "choose another folder, or move that file away (it was not changed)"
    )


# -- the lease ---------------------------------------------------------------------------------
class RunLease:
    """The exclusive right to write under ``root_uri`` (see the module docstring).

    ``with RunLease(root, owner="experiment flow run 42"):`` acquires it (or raises
    :class:`LeaseHeldError` naming the holder), renews it from a background thread and
    releases it on exit, even after an exception.
    """

    def __init__(
        self,
        root_uri: str,
        storage_options: Mapping[str, Any] | None = None,
        owner: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        parent_token: str | None = None,
    ):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s={ttl_s!r}: expected a positive number of seconds")
        self.root = str(root_uri).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.owner = owner or f"isup process {os.getpid()}"
        self.ttl_s = float(ttl_s)
        self.parent_token = parent_token
        self.token = uuid.uuid4().hex
        self._file = _lock_file(self.root, self.storage_options)
        self._version: str | None = None
        self._acquired = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # -- the document --
    def _doc(self, now: float) -> bytes:
        doc = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()),
            "token": self.token,
            "parent_token": self.parent_token,
            "root": self.root,
            "acquired": self._acquired or now,
            "heartbeat": now,
            "expires": now + self.ttl_s,
            "ttl_s": self.ttl_s,
        }
        return json.dumps(doc, sort_keys=True, indent=2).encode("utf-8")

    @property
    def held(self) -> bool:
        return self._version is not None and self.lost is None

    # -- acquire / release --
    def acquire(self) -> RunLease:
        """Take the lease (or a stale one over); :class:`LeaseHeldError` when it is held."""
        if self._version is not None:
            raise RuntimeError(f"lease on {self.root!r} is already acquired by this object")
        for _ in range(5):
            now = time.time()
            self._acquired = now
            try:
                self._version = self._file.create(self._doc(now))
                break
            except FileExistsError:
                pass
            cur = self._file.read()
            if cur is None:
                continue  # released meanwhile: try to create it again
            doc = _lease_doc(cur[0], self.root)
            why = stale_reason(doc, now)
            if why is None:
                raise LeaseHeldError(
                    f"run root {self.root!r} is being written by another run: "
                    f"{describe_holder(doc, now)}. Wait for it to finish (or, if that run is "
                    f"gone, for its lease to expire; or remove {storage.join(self.root, LEASE_NAME)!r})",
                    doc,
                )
            version = self._file.replace(self._doc(now), cur[1])
            if version is not None:
                log.warning(
                    "took over the lease on %s from %s: %s",
                    self.root,
                    describe_holder(doc, now),
                    why,
                )
                self._version = version
                break
        else:
            raise LeaseHeldError(f"run root {self.root!r}: could not take its lease (contended)")
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"isup-lease-{os.path.basename(self.root)}", daemon=True
        )
        self._thread.start()
        with _HELD_LOCK:
            _HELD[self.root] = self
        return self

    def _beat(self) -> None:
        period = max(0.05, self.ttl_s / 4)
        while not self._stop.wait(period):
            try:
                self.renew()
            except LeaseLostError as e:
                log.error("%s", e)
                return
            except Exception as e:  # transient storage trouble: try again next period
                log.warning("could not renew the lease on %s: %s", self.root, e)

    def renew(self) -> None:
        """Push the expiry forward; :class:`LeaseLostError` when another writer took it."""
        if self._version is None:
            raise LeaseLostError(f"lease on {self.root!r} is not held")
        version = self._file.replace(self._doc(time.time()), self._version)
        if version is None:
            self.lost = (
                f"the lease on run root {self.root!r} was taken over by another writer "
                "(this run stopped renewing it for longer than its TTL)"
            )
            raise LeaseLostError(self.lost)
        self._version = version

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease was lost (call before publishing)."""
        if self.lost:
            raise LeaseLostError(self.lost)
        if self._version is None:
            raise LeaseLostError(f"lease on {self.root!r} is not held")

    def release(self) -> None:
        """Stop renewing and delete the lock object (if it is still ours)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        with _HELD_LOCK:
            if _HELD.get(self.root) is self:
                del _HELD[self.root]
        if self._version is not None and self.lost is None:
            try:
                self._file.delete(self._version)
            except Exception as e:  # it expires on its own
                log.warning("could not release the lease on %s: %s", self.root, e)
        self._version = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held_lease(root_uri: str) -> RunLease | None:
    """The lease this process holds on ``root_uri``, if any."""
    with _HELD_LOCK:
        return _HELD.get(str(root_uri).rstrip("/"))


def check_writer(root_uri: str) -> None:
    """Raise :class:`LeaseLostError` when this process holds ``root_uri``'s lease and lost it
    to another writer (a step then stops instead of writing into the other run's outputs)."""
    lease = held_lease(root_uri)
    if lease is not None:
        lease.check()


def check_delegate(
    root_uri: str, token: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Check that ``root_uri``'s lease is live and has ``token`` (the parent run's): a
    delegate (a partition dump started by that run) may then write its own sub-folder.
    Raises :class:`LeaseHeldError` otherwise; returns the lease document."""
    doc = read_lease(root_uri, storage_options)
    if not doc or doc.get("token") != token:
        holder = describe_holder(doc) if doc else "nobody"
        raise LeaseHeldError(
            f"run root {root_uri!r}: the run that started this part no longer holds its lease "
            f"(held by {holder}); this part is not written",
            doc,
        )
    why = stale_reason(doc)
    if why is not None:
        raise LeaseHeldError(
            f"run root {root_uri!r}: the lease of the run that started this part is stale ({why})",
            doc,
        )
    return doc
