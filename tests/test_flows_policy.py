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
    from integral_superposition.tasks.backends import clear_backends, load_backend, model_stamp

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
    ident = ModelRef(spec=spec, stamp=model_stamp(spec)).cache_identity()
    assert ident == ModelRef(spec=plain, stamp=model_stamp(plain)).cache_identity()
    other = ModelSpec(model_id="tiny:llama", dtype="fp32")
    assert ident != ModelRef(spec=other, stamp=model_stamp(other)).cache_identity()


def _ids(backend):
    import torch

    ids = torch.tensor([backend.tokenizer("Stocks rally on rate hopes")["input_ids"]])
    return ids, torch.ones_like(ids)
