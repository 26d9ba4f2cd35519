"""Task policies: which failures retry, what a cache key sees, and the GPU concurrency slot."""

from __future__ import annotations

import errno
import time

import pytest
from integral_superposition.tasks.policy import (
    OUTPUT_CACHE,
    _stable,
    gpu_slot,
    is_transient,
    retry_transient,
)
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as c:
            raise outer from c
    except BaseException as e:
        return e


def _botocore(name: str, **kw) -> BaseException:
    import botocore.exceptions as be

    return getattr(be, name)(**kw)


TRANSIENT = [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    BrokenPipeError(errno.EPIPE, "Broken pipe"),
    TimeoutError("read timed out"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    lambda: _botocore("EndpointConnectionError", endpoint_url="http://s3"),
    lambda: _botocore("ConnectionClosedError", endpoint_url="http://s3"),
    lambda: _botocore("ReadTimeoutError", endpoint_url="http://s3"),
    lambda: _botocore(
        "ClientError",
        error_response={"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"}},
        operation_name="PutObject",
    ),
    # s3fs turns botocore errors into OSError; the cause decides
    lambda: _chained(
        OSError("upload failed"),
        _botocore(
            "ClientError",
            error_response={"Error": {"Code": "503", "Message": "Service Unavailable"}},
            operation_name="PutObject",
        ),
    ),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error"),
]
PERMANENT = [
    ValueError("sae.k=0: expected a positive int"),
    TypeError("cfg: expected a DumpConfig"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 640x2048)"),
    FloatingPointError("NaN activations in shard 3, row 17"),
    ValueError("NaN or inf activations at shard-00001 row 12"),
    MemoryError(),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    FileNotFoundError("s3://bucket/acts has no manifest.json"),
    PermissionError("Access Denied"),
    lambda: _botocore(
        "ClientError",
        error_response={"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
        operation_name="GetObject",
    ),
    # a bad-input error raised while handling a network error is still a bad input
    lambda: _chained(ValueError("labels: single class"), ConnectionResetError()),
    RuntimeError("some unknown failure"),
]


def _make(e):
    return e() if callable(e) else e


def _aiohttp(name: str) -> BaseException:
    """A real aiohttp client exception, constructed as aiohttp itself raises it."""
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("s3.example.com", 443, True, True, None, None, None, None)
    if name == "ClientConnectorError":
        return aiohttp.ClientConnectorError(key, OSError(errno.ECONNREFUSED, "Connect call failed"))
    if name == "ClientConnectorCertificateError":
        return aiohttp.ClientConnectorCertificateError(key, ValueError("certificate verify failed"))
    if name == "ServerDisconnectedError":
        return aiohttp.ServerDisconnectedError()
    if name == "ClientPayloadError":
        return aiohttp.ClientPayloadError("Response payload is not completed")
    if name.startswith("ClientResponseError"):
        from multidict import CIMultiDict, CIMultiDictProxy
        from yarl import URL

        url = URL("https://s3.example.com/bucket/key")
        info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
        status = 404 if name.endswith("404") else 503
        return aiohttp.ClientResponseError(info, (), status=status, message="Slow Down")
    raise AssertionError(name)


def _httpx(name: str) -> BaseException:
    import httpx

    return getattr(httpx, name)("connection failed", request=httpx.Request("GET", "https://s3"))


def _urllib3_new_connection() -> BaseException:
    from urllib3.connection import HTTPConnection
    from urllib3.exceptions import NewConnectionError

    return NewConnectionError(HTTPConnection("s3.example.com"), "Failed to establish connection")


def _requests(name: str) -> BaseException:
    import requests

    return getattr(requests.exceptions, name)("connection aborted")


def _torch(name: str, message: str) -> BaseException:
    import torch

    return getattr(torch, name)(message)


# (exception factory, expected classification): each class constructed for real
BY_CLASS = [
    (lambda: _aiohttp("ClientConnectorError"), True),
    (lambda: _aiohttp("ServerDisconnectedError"), True),
    (lambda: _aiohttp("ClientPayloadError"), True),
    (lambda: _aiohttp("ClientResponseError"), True),
    (lambda: _aiohttp("ClientResponseError404"), False),
    (lambda: _aiohttp("ClientConnectorCertificateError"), False),
    (lambda: _botocore("EndpointConnectionError", endpoint_url="https://s3"), True),
    (lambda: _botocore("ConnectTimeoutError", endpoint_url="https://s3"), True),
    (lambda: _botocore("NoCredentialsError"), False),
    (
        lambda: _botocore(
            "ClientError",
            error_response={"Error": {"Code": "NoSuchBucket", "Message": "no bucket"}},
            operation_name="ListObjectsV2",
        ),
        False,
    ),
    (lambda: _httpx("ConnectError"), True),
    (lambda: _httpx("ReadTimeout"), True),
    (lambda: _httpx("RemoteProtocolError"), True),
    (lambda: _httpx("UnsupportedProtocol"), False),
    (_urllib3_new_connection, True),
    (lambda: _requests("ConnectionError"), True),
    (lambda: _requests("SSLError"), False),
    (lambda: OSError(errno.ECONNRESET, "Connection reset by peer"), True),
    (lambda: OSError(errno.ENOSPC, "No space left on device"), False),
    (lambda: _torch("AcceleratorError", "CUDA error: an illegal memory access"), True),
    (lambda: _torch("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB"), False),
]


@pytest.mark.parametrize(
    ("make", "transient"), BY_CLASS, ids=lambda v: repr(v() if callable(v) else v)[:60]
)
def test_each_exception_class_is_classified_by_its_type_and_module(make, transient):
    assert is_transient(make()) is transient


def test_a_botocore_error_response_is_not_confused_with_aiohttps_client_error():
    """aiohttp's base class is also named ``ClientError``: it has no S3 error code."""
    exc = _aiohttp("ServerDisconnectedError")
    assert "ClientError" in {c.__name__ for c in type(exc).__mro__}
    assert is_transient(exc)


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: repr(_make(e))[:60])
def test_transient_errors_retry(exc):
    assert is_transient(_make(exc))


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: repr(_make(e))[:60])
def test_permanent_errors_fail_at_once(exc):
    assert not is_transient(_make(exc))


def test_oom_error_class_is_permanent():
    import torch

    assert not is_transient(torch.OutOfMemoryError("CUDA out of memory"))


def test_retry_condition_reads_the_failed_state():
    from prefect.states import Failed

    assert retry_transient(None, None, Failed(data=ConnectionResetError(errno.ECONNRESET, "reset")))
    assert not retry_transient(None, None, Failed(data=ValueError("bad config")))


def test_cache_key_sees_content_not_location():
    a = OutputRef(kind="sae", name="x", uri="/runs/e/r1/sae/x", content_hash="abc")
    b = OutputRef(kind="sae", name="x", uri="/runs/e/r2/sae/x", content_hash="abc")
    c = OutputRef(kind="sae", name="x", uri="/runs/e/r1/sae/x", content_hash="def")
    assert _stable(a) == _stable(b) != _stable(c)
    r1 = RunLocation(storage="/runs", experiment="e", run="r1", storage_options={"key": "k1"})
    r2 = RunLocation(storage="/runs", experiment="e", run="r2", storage_options={"key": "k2"})
    other = RunLocation(storage="s3://b/runs", experiment="e", run="r1")
    assert _stable(r1) == _stable(r2) != _stable(other)
    assert "storage_options" in OUTPUT_CACHE.exclude


def test_gpu_slot_outside_a_run_is_a_no_op():
    with gpu_slot("gpu") as held:
        assert held is False


@pytest.mark.prefect
def test_gpu_slot_takes_a_slot_only_when_the_limit_exists(prefect_api):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    @task
    def probe(name: str) -> tuple[bool, int | None, float]:
        t0 = time.perf_counter()
        with gpu_slot(name) as held, get_client(sync_client=True) as client:
            active = None
            if held:
                active = client.read_global_concurrency_limit_by_name(name).active_slots
        return held, active, time.perf_counter() - t0

    @flow
    def probe_flow(name: str):
        return probe(name)

    held, active, elapsed = probe_flow("isup-no-such-limit")
    assert held is False and active is None and elapsed < 10  # no hang without a limit
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="isup-test-gpu", limit=1)
        )
    held, active, _ = probe_flow("isup-test-gpu")
    assert held is True and active == 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("isup-test-gpu").active_slots == 0


def test_model_spec_device_map_reaches_the_backend(monkeypatch):
    """``model.device_map`` goes to the model's from_pretrained (accelerate's dispatch)."""
    import transformers
    from integral_superposition.experiment import ModelSpec
    from integral_superposition.tasks.backends import clear_backends, load_backend

    seen: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    spec = ModelSpec(model_id="tiny:gemma", dtype="fp32", device_map="auto")
    assert spec.resolved_device_map() == "auto"
    assert ModelSpec(model_id="tiny:gemma", device="cpu").resolved_device_map() is None
    clear_backends()
    try:
        backend, lock = load_backend(spec)
        assert seen and seen[-1]["device_map"] == "auto"
        assert load_backend(spec)[0] is backend  # one model per spec and process
        with lock:
            out = backend.capture(*_ids(backend), backend.hook_points(["layer.1"]))
        assert out["layer.1"].shape[-1] == backend.d_model
    finally:
        clear_backends()
    # where a model runs does not change its cache identity; its weights' source does
    plain = ModelSpec(model_id="tiny:gemma", dtype="fp32", device="cpu")
    ident = ModelRef.of(spec).cache_identity()
    assert ident == ModelRef.of(plain).cache_identity()
    other = ModelSpec(model_id="tiny:llama", dtype="fp32")
    assert ident != ModelRef.of(other).cache_identity()


def _ids(backend):
    import torch

    ids = torch.tensor([backend.tokenizer("Stocks rally on rate hopes")["input_ids"]])
    return ids, torch.ones_like(ids)


def _run_logs(flow_run_id) -> list[str]:
    """The messages a flow run logged to the Prefect API, in order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]


@pytest.mark.prefect
@pytest.mark.parametrize("n_failures", [2, 4])
def test_a_transient_outage_logs_one_line_per_retry_and_one_final_traceback(
    prefect_api, n_failures
):
    """Two outages then success: two concise lines, no traceback. Four outages with three
    retries: three lines and the final failure's traceback, once in the whole run."""
    from integral_superposition.tasks.policy import retry_options
    from prefect import flow, task
    from prefect.cache_policies import CachePolicy

    calls: list[int] = []

    class LookupDuringOutage(CachePolicy):  # the cache lookup meets the outage too
        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "cache store unreachable")

    @task(**retry_options(3, 0.0, 0.0), cache_policy=LookupDuringOutage())
    def flaky(n: int) -> int:
        calls.append(1)
        if len(calls) <= n:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (outage)")
        return len(calls)

    @flow
    def outage(n: int) -> int:
        return flaky(n)

    state = outage(n_failures, return_state=True)
    messages = _run_logs(state.state_details.flow_run_id)
    retries = [m for m in messages if "retry" in m.lower()]
    expected = [
        f"transient failure, retry {i}/3 after ConnectionResetError: [Errno 104] "
        "Connection reset by peer (outage)"
        for i in range(1, min(n_failures, 3) + 1)
    ]
    assert retries == expected, messages
    cache_lines = [m for m in messages if "cache key" in m]
    assert cache_lines and all("ConnectionRefusedError" in m for m in cache_lines), messages
    tracebacks = sum(m.count("Traceback (most recent call last)") for m in messages)
    if n_failures == 2:
        assert state.is_completed() and state.result() == 3
        assert tracebacks == 0, messages
    else:
        assert state.is_failed()
        assert tracebacks == 1, messages
        (final,) = [m for m in messages if "Traceback" in m]
        assert "Retries are exhausted" in final
