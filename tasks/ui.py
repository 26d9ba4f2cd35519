"""What a run shows in the Prefect UI: progress artifacts, tables, links and custom events.

Library functions report progress through ``on_progress(done, total, phase=...)`` callbacks
and training metrics through ``on_log(record)``; :class:`Progress` turns them into a progress
artifact (throttled, so a fast loop does not flood the API) and log lines with the rate, the
ETA and the phase (every 10 s at most, and a heartbeat after 30 s without one).
Everything here is best effort: a UI call that fails is logged, never fatal to the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from integral_superposition import storage
from integral_superposition.progress import Reporter

log = logging.getLogger(__name__)


def run_logger():
    """The Prefect run logger inside a run, else this module's logger."""
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return log


class _LibraryLogs(logging.Handler):
    """While tasks run, takes the library's log records: those of a task's thread go to
    that task's run logger, the others on to the root logger's handlers as before."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lock = threading.Lock()
        self.targets: dict[int, Any] = {}
        self.saved = (logging.NOTSET, True)
        self.passthrough = logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        target = self.targets.get(record.thread)
        if target is not None:
            if record.levelno >= logging.INFO:
                target.log(record.levelno, record.getMessage())
        elif record.levelno >= self.passthrough:
            logging.getLogger().handle(record)

    @contextlib.contextmanager
    def forward(self, target: Any) -> Iterator[None]:
        lib = logging.getLogger("integral_superposition")
        me = threading.get_ident()
        with self.lock:
            if not self.targets:
                self.saved = (lib.level, lib.propagate)
                self.passthrough = lib.getEffectiveLevel()
                lib.addHandler(self)
                lib.propagate = False
                lib.setLevel(min(self.passthrough, logging.INFO))
            self.targets[me] = target
        try:
            yield
        finally:
            with self.lock:
                self.targets.pop(me, None)
                if not self.targets:
                    lib.removeHandler(self)
                    lib.setLevel(self.saved[0])
                    lib.propagate = self.saved[1]


_LIBRARY_LOGS = _LibraryLogs()


@contextlib.contextmanager
def library_logs() -> Iterator[None]:
    """Show the library's INFO messages of this task (e.g. "resuming training from
    checkpoint step 40") in the run's log, once; other threads log as before."""
    if not _in_run():  # outside a run the library logs as configured
        yield
        return
    with _LIBRARY_LOGS.forward(run_logger()):
        yield


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


_STEP_SECONDS: dict[str, float] = {}
_STEP_LOCK = threading.Lock()


def record_step_seconds(seconds: float) -> None:
    """Record the compute time of the current task run (see :func:`step_seconds`)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is not None:
        with _STEP_LOCK:
            _STEP_SECONDS[str(ctx.task_run.id)] = round(seconds, 3)


@contextlib.contextmanager
def timed_step() -> Iterator[None]:
    """Time the library call of the current task run (entered after its GPU slot and model
    lock are held, so waiting for them does not count)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record_step_seconds(time.perf_counter() - t0)


def step_seconds(task_run_id: Any) -> float | None:
    """Seconds the library call of a task run of this process took (None if it did not run
    here, e.g. a cached task)."""
    with _STEP_LOCK:
        return _STEP_SECONDS.pop(str(task_run_id), None)


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits and dashes) from ``parts``."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key[:100] or "isup"


class Progress(Reporter):
    """A :class:`~integral_superposition.progress.Reporter` for a task run: its lines
    (``label done/total unit (pct) | rate | ETA | phase``, at most every ``line_every_s`` and a
    heartbeat after ``interval_s`` of silence while open) go to the run logger, and a progress
    artifact keyed ``key`` follows ``done/total`` (updated at most every ``min_interval_s``).

    Use it as ``with Progress(...) as progress: fn(..., on_progress=progress)``.
    """

    def __init__(
        self,
        key: str,
        label: str,
        unit: str = "",
        min_interval_s: float = 2.0,
        line_every_s: float = 10.0,
        interval_s: float = 30.0,
    ):
        super().__init__(
            label, unit=unit, logger=run_logger(), line_every_s=line_every_s, interval_s=interval_s
        )
        self.key = artifact_key(key)
        self.min_interval_s = min_interval_s
        self._id = None
        self._last_t = 0.0
        if _in_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self._id = create_progress_artifact(
                    progress=0.0, key=self.key, description=f"{label}: progress"
                )
            except Exception as e:
                log.debug("progress artifact %s not created: %s", self.key, e)

    def update(self, done: int, total: int | None = None, phase: str | None = None) -> None:
        super().update(done, total, phase)
        if self._id is None or self.total <= 0:
            return
        frac = min(max(self.done / self.total, 0.0), 1.0)
        now = time.perf_counter()
        if frac >= 1.0 or now - self._last_t >= self.min_interval_s:
            self._last_t = now
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._id, progress=100.0 * frac)
            except Exception as e:
                log.debug("progress artifact %s not updated: %s", self.key, e)

    def finish(self) -> None:
        """Mark the work complete (100%) and stop the heartbeat."""
        self.update(max(self.total, 1), max(self.total, 1))
        self.close()


def table(key: str, rows: Sequence[Mapping[str, Any]] | Any, description: str) -> None:
    """A table artifact from records or a DataFrame (values made JSON-safe)."""
    if not _in_run():
        return
    try:
        import pandas as pd
        from prefect.artifacts import create_table_artifact

        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        records = json.loads(df.to_json(orient="records"))
        # a missing, None or NaN value shows as "-", as in the HTML report
        records = [{k: "-" if v is None else v for k, v in r.items()} for r in records]
        create_table_artifact(table=records, key=artifact_key(key), description=description)
    except Exception as e:
        run_logger().warning("table artifact %s not created: %s", key, e)


def markdown(key: str, text: str, description: str) -> None:
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=text, key=artifact_key(key), description=description)
    except Exception as e:
        run_logger().warning("markdown artifact %s not created: %s", key, e)


def link(key: str, url: str, text: str, description: str) -> None:
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(
            link=url, link_text=text, key=artifact_key(key), description=description
        )
    except Exception as e:
        run_logger().warning("link artifact %s not created: %s", key, e)


def producer() -> str:
    """The name of the flow this code runs in (``experiment``, ``train``, ...), or ``library``."""
    from prefect.runtime import flow_run

    return flow_run.flow_name or "library"


def event(
    name: str,
    resource_id: str,
    payload: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    related: Sequence[Mapping[str, str]] = (),
) -> None:
    """Emit the custom event ``name`` (e.g. ``isup.sae.trained``) about ``resource_id``."""
    try:
        from prefect.events import emit_event

        resource = {
            "prefect.resource.id": resource_id,
            **{k: str(v) for k, v in (labels or {}).items()},
        }
        emit_event(
            event=name,
            resource=resource,
            payload=json.loads(storage.canonical_json(dict(payload))),
            related=[dict(r) for r in related] or None,
        )
    except Exception as e:
        run_logger().warning("event %s not emitted: %s", name, e)
