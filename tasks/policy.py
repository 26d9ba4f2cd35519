"""How every task of the project caches, retries and shares GPUs.

- :class:`OutputCache`: the cache key is the task's source, the step's code version (the
  package version + a hash of the library modules the step runs: the transitive imports of
  its ``entry_points``, or all of ``lib/`` when it names none) and the task's inputs, where a published input counts by its
  content hash, the run location by its experiment root, and storage options not at all.
  A cached result is reused only while the outputs it names are still there with the same
  content (``storage.verify_output`` plus the manifest hash); otherwise the task reruns.
- :func:`retry_transient`: the ``retry_condition_fn`` of every task. It retries network and
  S3 errors, connection resets and CUDA errors that a restart can fix, and nothing else: a
  bad config, a shape mismatch, NaNs or out-of-memory fail at once with their message.
- :func:`gpu_slot`: one slot of the global concurrency limit named ``gpu`` around a GPU
  step; a no-op when no such limit exists (or outside a Prefect run).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from integral_superposition.tasks.refs import RunLocation, collect_refs
from integral_superposition.version import check_entry_points, code_version
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

log = logging.getLogger(__name__)

_MAX_SALT = 64


def _stable(value: Any) -> Any:
    """A JSON-able stand-in of a task input for its cache key."""
    if hasattr(value, "cache_identity"):
        return value.cache_identity()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_stable(v) for v in value]
    if callable(value):
        return None
    return value


def _storage_options(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    for v in inputs.values():
        if isinstance(v, RunLocation):
            return dict(v.storage_options)
    opts = inputs.get("storage_options")
    return dict(opts) if isinstance(opts, Mapping) else None


@dataclass
class OutputCache(CachePolicy):
    """Cache on content: inputs' content hashes, the config, the step's code version; verified.

    ``entry_points``: the library modules the step runs (e.g. ``integral_superposition.dump``);
    its key holds the hash of them and everything they import, so an edit elsewhere in the
    library keeps it. Empty: the whole library counts."""

    exclude: list[str] = field(
        default_factory=lambda: ["storage_options", "gpu_limit", "show_progress"]
    )
    entry_points: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.entry_points, str):
            raise TypeError(f"entry_points={self.entry_points!r}: expected a tuple of module names")
        self.entry_points = tuple(self.entry_points)
        check_entry_points(*self.entry_points)  # a misspelt module fails here, at import

    def code_version(self) -> str:
        """The version of the code this step runs (see :func:`version.code_version`)."""
        return code_version(*self.entry_points)

    def base_key(self, task_ctx, inputs: Mapping[str, Any], flow_parameters) -> str:
        source = TASK_SOURCE.compute_key(task_ctx, dict(inputs), flow_parameters)
        payload = {
            "task": task_ctx.task.name,
            "source": source,
            "code_version": self.code_version(),
            "inputs": {k: _stable(v) for k, v in sorted(inputs.items()) if k not in self.exclude},
        }
        key = hash_objects(payload, raise_on_failure=True)
        assert key is not None
        return key

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str | None:
        base = self.base_key(task_ctx, inputs or {}, flow_parameters)
        store = getattr(task_ctx, "result_store", None)
        if store is None:
            return base
        opts = _storage_options(inputs or {})
        # A record whose outputs were deleted or replaced is skipped, not trusted: the next
        # free key in a deterministic chain is used, so the recomputed result is found again.
        for salt in range(_MAX_SALT):
            key = base if salt == 0 else f"{base}-{salt}"
            if not store.exists(key):
                if salt:
                    log.warning(
                        "%s: the cached result names outputs that are gone or changed; recomputing",
                        task_ctx.task.name,
                    )
                return key
            try:
                refs = collect_refs(store.read(key).result)
                ok = all(r.is_valid(opts) for r in refs)
            except Exception as e:  # an unreadable record is as good as none
                log.debug("cache record %s unreadable: %s", key, e)
                ok = False
            if ok:
                return key
        return f"{base}-{_MAX_SALT}"


OUTPUT_CACHE = OutputCache()
"""The policy of a step that names no entry points: every library edit invalidates it."""

DUMP_MODULES = (
    "integral_superposition.dump",
    "integral_superposition.backends",
    "integral_superposition.data",
)
"""What a dump runs: the store writer, the model backends, the dataset loaders."""


def output_cache(*entry_points: str) -> OutputCache:
    """:class:`OutputCache` keyed on the code of ``entry_points`` and what they import."""
    return OutputCache(entry_points=entry_points)


# -- retries -----------------------------------------------------------------------------------
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
    errno.EAGAIN,
}
# network errors of botocore, aiohttp, httpx, urllib3 and requests, as (top-level package,
# class name): a class counts only where it is defined, so aiohttp's base ``ClientError`` is
# not botocore's, and none of these packages has to be installed for the check to work
_TRANSIENT_CLASSES = {
    ("botocore", "EndpointConnectionError"),
    ("botocore", "ConnectionClosedError"),
    ("botocore", "ReadTimeoutError"),
    ("botocore", "ConnectTimeoutError"),
    ("botocore", "ResponseStreamingError"),
    ("botocore", "IncompleteReadError"),
    ("botocore", "ProxyConnectionError"),
    ("aiohttp", "ClientConnectionError"),  # ClientConnectorError, ServerDisconnectedError, ...
    ("aiohttp", "ClientPayloadError"),
    ("aiohttp", "ServerTimeoutError"),
    ("aiohttp", "ConnectionTimeoutError"),
    ("aiohttp", "SocketTimeoutError"),
    ("httpx", "TimeoutException"),  # ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout
    ("httpx", "NetworkError"),  # ConnectError, ReadError, WriteError, CloseError
    ("httpx", "RemoteProtocolError"),
    ("urllib3", "ProtocolError"),
    ("urllib3", "NewConnectionError"),
    ("urllib3", "ReadTimeoutError"),
    ("urllib3", "ConnectTimeoutError"),
    ("requests", "ConnectionError"),
    ("requests", "Timeout"),
    ("requests", "ChunkedEncodingError"),
}
# subclasses of the classes above that no retry can fix (a bad certificate or URL)
_PERMANENT_CLASSES = {
    ("aiohttp", "ClientConnectorCertificateError"),
    ("aiohttp", "InvalidURL"),
    ("httpx", "UnsupportedProtocol"),
    ("requests", "SSLError"),
    ("botocore", "SSLError"),
}
_TRANSIENT_HTTP_STATUS = {408, 429, 500, 502, 503, 504}
# S3 error codes that mean "try again"
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "500",
    "502",
    "503",
    "504",
}
# CUDA failures that a fresh attempt (a reloaded model, a restarted worker) can survive
_TRANSIENT_CUDA = (
    "unspecified launch failure",
    "illegal memory access",
    "ecc error",
    "launch timed out",
    "nccl error",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_internal_error",
    "cudnn_status_execution_failed",
    "cuda driver error",
    "gpu is lost",
    "uncorrectable",
)
_PERMANENT = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    AssertionError,
    NotImplementedError,
    ImportError,
    MemoryError,
    ArithmeticError,
    FileNotFoundError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)


def _classes(exc: BaseException) -> set[tuple[str, str]]:
    """``(top-level package, class name)`` of ``exc``'s class and every base class."""
    return {(c.__module__.partition(".")[0], c.__name__) for c in type(exc).__mro__}


def classify(exc: BaseException) -> str | None:
    """``"transient"``, ``"permanent"`` or None (unknown) for one exception, ignoring its causes."""
    msg = str(exc).lower()
    classes = _classes(exc)
    if ("torch", "OutOfMemoryError") in classes or "out of memory" in msg:
        return "permanent"
    if ("botocore", "ClientError") in classes:  # an S3 error response: decide by its code
        code = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
        return "transient" if code in _TRANSIENT_S3_CODES else "permanent"
    if classes & _PERMANENT_CLASSES:
        return "permanent"
    if classes & _TRANSIENT_CLASSES:
        return "transient"
    if {("aiohttp", "ClientResponseError"), ("httpx", "HTTPStatusError")} & classes:
        status = getattr(exc, "status", None) or getattr(
            getattr(exc, "response", None), "status_code", None
        )
        return "transient" if status in _TRANSIENT_HTTP_STATUS else "permanent"
    if isinstance(exc, ConnectionError | TimeoutError):
        return "transient"
    if isinstance(exc, _PERMANENT):
        return "permanent"
    if isinstance(exc, OSError):
        if exc.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if any(code.lower() in msg for code in ("slowdown", "service unavailable", "503")):
            return "transient"
        return None
    if (isinstance(exc, RuntimeError) or ("torch", "AcceleratorError") in classes) and any(
        m in msg for m in _TRANSIENT_CUDA
    ):
        return "transient"
    return None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or, if it is unknown, what caused it) is a transient failure."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        kind = classify(cur)
        if kind is not None:
            return kind == "transient"
        cur = cur.__cause__ or cur.__context__
    return False


def describe(exc: BaseException) -> str:
    """``ClassName: message``: how a failure is named in one log line."""
    return f"{type(exc).__name__}: {exc}"


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry only transient failures (see :func:`is_transient`).

    Logs one line per retry (``retry 1/3 after ClassName: message``) and the traceback only
    at debug level; the final failure's traceback is logged once, by the task engine."""
    try:
        state.result()
    except BaseException as exc:
        transient = is_transient(exc)
        logger = _run_logger()
        if transient:
            attempt = getattr(task_run, "run_count", None) or "?"
            total = getattr(task, "retries", None) or "?"
            logger.warning("transient failure, retry %s/%s after %s", attempt, total, describe(exc))
            logger.debug("traceback of the transient failure", exc_info=exc)
            if task_run is not None:
                _RETRY_LOGGED.add(str(task_run.id))
            _drop_cached_backends_on_cuda(exc)
        else:
            logger.error("not retrying (%s is not transient): %s", type(exc).__name__, exc)
        return transient
    return False


def _run_logger():
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return log


# Prefect's engine announces each retry and logs tracebacks of failures that do not end the
# run (a cache lookup or a result write during an outage); :class:`ConciseFailureLogs` keeps
# one line for each and a single traceback for the failure that ends a run.
_RETRY_LOGGED: set[str] = set()
_ENGINE_RETRY_LINE = "Task run failed with %s: %r - Retry"
_FINAL_FAILURE_LINES = ("Task run failed with", "Encountered exception during execution")
_SHOWN_MAX = 256


class ConciseFailureLogs(logging.Filter):
    """A filter for Prefect's task- and flow-run loggers: drops the engine's retry line when
    :func:`retry_transient` logged one, shows a traceback once per failure (the final one),
    and turns the traceback of a transient failure that does not end the run into one line
    (the traceback goes to debug level)."""

    def __init__(self) -> None:
        super().__init__()
        self._shown: collections.OrderedDict[tuple[Any, str, str], None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_ENGINE_RETRY_LINE):
            task_run_id = getattr(record, "task_run_id", None)
            if task_run_id in _RETRY_LOGGED:
                _RETRY_LOGGED.discard(task_run_id)
                return False
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or record.levelno < logging.INFO:
            return True
        signature = (getattr(record, "flow_run_id", None), type(exc).__qualname__, str(exc))
        final = isinstance(record.msg, str) and record.msg.startswith(_FINAL_FAILURE_LINES)
        with self._lock:
            shown = signature in self._shown
            if not shown and (final or not is_transient(exc)):
                self._shown[signature] = None
                while len(self._shown) > _SHOWN_MAX:
                    self._shown.popitem(last=False)
                return True
        log.debug("traceback of: %s", record.getMessage(), exc_info=record.exc_info)
        message = record.getMessage()
        if type(exc).__name__ not in message:
            message = f"{message.rstrip('.')}: {describe(exc)}"
        record.msg, record.args = message, None
        record.exc_info, record.exc_text = None, None
        return True


def install_concise_failure_logs() -> None:
    """Add :class:`ConciseFailureLogs` to Prefect's run loggers (once per process)."""
    shared = ConciseFailureLogs()
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ConciseFailureLogs) for f in logger.filters):
            logger.addFilter(shared)


install_concise_failure_logs()


def _drop_cached_backends_on_cuda(exc: BaseException) -> None:
    if "cuda" in str(exc).lower():
        from integral_superposition.tasks.backends import clear_backends

        clear_backends()


def retry_options(retries: int, delay_s: float, jitter: float) -> dict[str, Any]:
    """Task options for ``retries`` attempts with doubling delays starting at ``delay_s``."""
    delays = [delay_s * 2**i for i in range(max(retries, 1))]
    return {
        "retries": retries,
        "retry_delay_seconds": delays,
        "retry_jitter_factor": jitter if delay_s > 0 else None,
        "retry_condition_fn": retry_transient,
    }


# -- GPU slots ---------------------------------------------------------------------------------
_LIMIT_CACHE: dict[str, tuple[float, bool]] = {}
_LIMIT_LOCK = threading.Lock()
_LIMIT_TTL_S = 60.0


def _limit_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    now = time.monotonic()
    with _LIMIT_LOCK:
        hit = _LIMIT_CACHE.get(name)
        if hit is not None and now - hit[0] < _LIMIT_TTL_S:
            return hit[1]
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
        exists = bool(getattr(limit, "active", True))
    except ObjectNotFound:
        exists = False
    with _LIMIT_LOCK:
        _LIMIT_CACHE[name] = (now, exists)
    return exists


@contextlib.contextmanager
def gpu_slot(
    name: str | None = "gpu", timeout_s: float | None = None, occupy: int = 1
) -> Iterator[bool]:
    """Hold ``occupy`` slots (GPUs) of the global concurrency limit ``name`` (yields True), or
    do nothing (yields False) when ``name`` is None, no such active limit exists, or no Prefect
    run is active. ``timeout_s`` bounds the wait for a slot (None: wait as long as it takes)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if not name or (TaskRunContext.get() is None and FlowRunContext.get() is None):
        yield False
        return
    if not _limit_exists(name):
        log.debug("no active global concurrency limit %r: running without a GPU slot", name)
        yield False
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=occupy, timeout_seconds=timeout_s, strict=True):
        yield True


# -- defaults of every step task ---------------------------------------------------------------
TASK_DEFAULTS: dict[str, Any] = {
    "cache_policy": OUTPUT_CACHE,
    "persist_result": True,
    "result_serializer": "json",
    "retries": 3,
    "retry_delay_seconds": [10, 20, 40],
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_transient,
    "tags": ["isup"],
}
"""Options every step task starts from (the flow overrides retries and result storage); each
step replaces ``cache_policy`` by one keyed on the library modules it runs."""
