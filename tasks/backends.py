"""One loaded model per process, shared by the tasks that need it.

Loading gemma-3-270m takes seconds and a GiB of memory, so the dump, analysis, merge and
steering tasks of one flow run share one backend per :class:`ModelSpec`. Hooks are
registered per forward, so two threads must not run the same model at once: each backend
comes with a lock that its users hold while they call the library.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from integral_superposition.experiment import ModelSpec

log = logging.getLogger(__name__)

_BACKENDS: dict[str, tuple[Any, threading.Lock]] = {}
LOAD_SECONDS: list[float] = []
"""Seconds each model load of this process took (for benchmarks)."""
_LOAD_LOCK = threading.Lock()


def _key(spec: ModelSpec) -> str:
    return spec.model_dump_json()


def load_backend(spec: ModelSpec) -> tuple[Any, threading.Lock]:
    """The process's backend for ``spec`` (loaded on first use) and its lock."""
    key = _key(spec)
    with _LOAD_LOCK:
        hit = _BACKENDS.get(key)
        if hit is None:
            from integral_superposition.backends import load_backend as _load

            t0 = time.perf_counter()
            backend = _load(
                spec.model_id,
                dtype=spec.dtype,
                device_map=spec.resolved_device_map(),
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
            )
            hit = _BACKENDS[key] = (backend, threading.Lock())
            LOAD_SECONDS.append(time.perf_counter() - t0)
    return hit


@contextlib.contextmanager
def using_backend(spec: ModelSpec | None) -> Iterator[Any]:
    """The backend for ``spec`` (None yields None), held exclusively by this thread."""
    if spec is None:
        yield None
        return
    backend, lock = load_backend(spec)
    with lock:
        yield backend


def run_sae_step(
    fn: Callable[..., dict[str, Any]],
    key: str,
    sae: Any,
    store: Any,
    params: Any,
    loc: Any,
    out_uri: str,
    model: Any | None,
    gpu_limit: str | None,
    title: str | None = None,
    allow_other_store: bool = False,
) -> dict[str, Any]:
    """Run one library step on an SAE and its store, and return its manifest.

    ``fn(sae_uri, store_uri, out_uri, params, backend=, storage_options=, on_progress=)`` is
    ``run_analysis``, ``run_merge`` or ``run_steering_eval``. It runs holding a GPU slot and
    the shared backend of ``model`` (a ``ModelRef``; None: no model), timed, with a progress
    artifact keyed ``{key}-{sae.name}`` and titled ``{title or key} {sae.name}``. The store
    must be the SAE's training store unless ``allow_other_store``.
    """
    from integral_superposition.tasks.policy import gpu_slot
    from integral_superposition.tasks.ui import Progress, timed_step

    progress = Progress(f"{key}-{sae.name}", f"{title or key} {sae.name}", unit="steps")
    spec = model.spec if model is not None else None
    with progress:
        # the heartbeat says what it waits for while another step holds the GPU or the model
        progress.set_phase("waiting for a GPU slot and the shared model")
        with gpu_slot(gpu_limit), using_backend(spec) as backend, timed_step():
            progress.restart_clock()
            progress.set_phase("starting")
            manifest = fn(
                sae.uri,
                store.uri,
                out_uri,
                params,
                backend=backend,
                storage_options=loc.storage_options,
                on_progress=progress,
                allow_other_store=allow_other_store,
            )
    progress.finish()
    return manifest


def clear_backends() -> None:
    """Forget the loaded models (a CUDA failure may have poisoned them)."""
    with _LOAD_LOCK:
        _BACKENDS.clear()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
