"""The life of an ``isup`` process: which Prefect API it talks to, the temporary server it
starts when there is none, and the flow process it supervises.

A command that runs a flow (``isup run``, ``dump``, ``train``, ...) from the console script
runs the flow in a child process and supervises it: Ctrl-C or SIGTERM stops the child (a
polite SIGTERM, then SIGKILL of its process group), marks its flow run Crashed, stops the
temporary server and exits, all within a few seconds. A flow run records ``host:pid`` of
its process (``infrastructure_pid``); a flow run left Running by a process that died
(kill -9, out of memory, a reboot) is marked Crashed by the next ``isup`` command that
talks to the same server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLOW_PROCESS_ENV = "ISUP_FLOW_PROCESS"
"""Set in a supervised flow process (it must not supervise again)."""
TEMPORARY_SERVER_ENV = "ISUP_TEMPORARY_SERVER"
"""Set in a flow process whose ``PREFECT_API_URL`` is isup's temporary server."""
DEFAULT_STARTUP_TIMEOUT_S = 180
"""Seconds the temporary server may take to start (a first start migrates its database,
which takes minutes on a loaded machine). ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
overrides it."""
STOP_GRACE_S = 2.0
"""Seconds a flow process gets to stop after SIGTERM before it is killed."""
API_CHECK_TIMEOUT_S = 3.0

_ACTIVE_STATES = ("RUNNING", "PENDING", "CANCELLING")


class PrefectUnavailable(RuntimeError):
    """No Prefect API to run flows against; the message is one line saying what to do."""


def api_url() -> str | None:
    """The configured ``PREFECT_API_URL`` (None: isup starts a temporary server)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def check_api(url: str, timeout: float = API_CHECK_TIMEOUT_S) -> None:
    """Raise :class:`PrefectUnavailable` unless ``{url}/health`` answers within ``timeout``."""
    import httpx

    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
        r.raise_for_status()
        return
    except httpx.HTTPStatusError as e:
        why = f"HTTP {e.response.status_code}"
    except httpx.HTTPError as e:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    raise PrefectUnavailable(
        f"the Prefect API at PREFECT_API_URL={url} could not be reached ({why}); start the "
        "server there (`isup server`), or unset PREFECT_API_URL to run on a temporary local server"
    )


def startup_timeout() -> int:
    """The temporary server's startup timeout: the user's
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` if set (environment or profile),
    else :data:`DEFAULT_STARTUP_TIMEOUT_S`."""
    from prefect.settings import get_current_settings

    eph = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in eph.model_fields_set:
        return int(eph.startup_timeout_seconds)
    return DEFAULT_STARTUP_TIMEOUT_S


def server_defaults() -> dict[str, str]:
    """Settings isup gives the servers it starts unless the user set them: analytics off
    (turn them on with ``PREFECT_SERVER_ANALYTICS_ENABLED=true``); offline, their telemetry
    only prints failures to the console."""
    from prefect.settings import get_current_settings

    if "analytics_enabled" in get_current_settings().server.model_fields_set:
        return {}
    return {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: the child gets SIGKILL when its parent dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TemporaryServer:
    """Prefect's server on a free loopback port, on the database under ``PREFECT_HOME``,
    for the life of one ``isup`` command: in its own process group (a Ctrl-C in the
    terminal reaches isup, which stops it last) and killed with isup even by kill -9."""

    def __init__(self, timeout_s: int | None = None) -> None:
        from prefect.settings import get_current_settings

        self.timeout_s = startup_timeout() if timeout_s is None else timeout_s
        self.home = Path(get_current_settings().home)
        self.log_path = self.home / "isup-temporary-server.log"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> str:
        """Start the server and wait until it answers; returns its API URL."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the server process (it answers some seconds later: :meth:`wait_ready`)."""
        import prefect
        from prefect.settings import get_current_settings

        env = {
            **os.environ,
            **server_defaults(),
            **get_current_settings().to_environment_variables(exclude_unset=True),
            # what Prefect's own temporary server sets: no UI, no background services
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        self.started = time.monotonic()

    def wait_ready(self, cancelled: Any = None) -> str:
        """Wait until the server answers (at most ``timeout_s`` from its launch, or until
        ``cancelled()``); returns its API URL or raises :class:`PrefectUnavailable`."""
        import httpx

        assert self.proc is not None
        deadline = self.started + self.timeout_s
        while time.monotonic() < deadline and not (cancelled and cancelled()):
            if self.proc.poll() is not None:
                self.stop()
                raise PrefectUnavailable(
                    f"the temporary Prefect server exited with code {self.proc.returncode} while "
                    f"starting (its log: {self.log_path}); start one with `isup server` and set "
                    "PREFECT_API_URL=http://127.0.0.1:4200/api"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=5).status_code == 200:
                    return self.api_url
            time.sleep(0.2)
        self.stop()
        if cancelled and cancelled():
            return self.api_url
        raise PrefectUnavailable(
            f"the temporary Prefect server did not start within {self.timeout_s} s (its log: "
            f"{self.log_path}); on a slow machine set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
            "higher, or start one with `isup server` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- which process runs a flow run ---------------------------------------------------------


def record_process(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow ``on_running`` hook: record this process on the flow run (unless a worker did),
    so that the run can be marked Crashed if the process dies without a final state."""
    from integral_superposition.runs import process_id
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if client.read_flow_run(flow_run.id).infrastructure_pid:
            return  # a worker's record (a pod, a container) is what cancels the run
        client.update_flow_run(flow_run.id, infrastructure_pid=process_id())


def mark_dead_runs_crashed(
    url: str | None = None, reasons: dict[str, str] | None = None, limit: int = 200
) -> list[str]:
    """Mark Crashed every active flow run (and its active task runs) on the API at ``url``
    (default: ``PREFECT_API_URL``; none: nothing to do) whose recorded process on this host
    is gone, with the message ``reasons[host:pid]`` if given; returns their names. Best
    effort: an API error marks nothing more."""
    from integral_superposition.runs import process_alive
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    url = url or api_url()
    if not url:
        return []
    active = [StateType(s) for s in _ACTIVE_STATES]
    marked: list[str] = []
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))
                ),
                limit=limit,
            )
            for fr in runs:
                since = fr.start_time or fr.created
                if process_alive(fr.infrastructure_pid, since) is not False:
                    continue
                msg = (reasons or {}).get(fr.infrastructure_pid or "") or (
                    f"its process ({fr.infrastructure_pid}) ended without reporting a final state"
                )
                client.set_flow_run_state(fr.id, Crashed(message=msg), force=True)
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])),
                    task_run_filter=TaskRunFilter(
                        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=active))
                    ),
                )
                for tr in tasks:
                    client.set_task_run_state(tr.id, Crashed(message=msg), force=True)
                marked.append(fr.name)
    except Exception:  # the server may be unreachable: the next command tries again
        return marked
    return marked


# -- the supervisor --------------------------------------------------------------------------


def supervised() -> bool:
    """True in a flow process started by :func:`supervise`."""
    return os.environ.get(FLOW_PROCESS_ENV) == "1"


def temporary_server_url() -> str | None:
    """The API URL of isup's temporary server when this flow process runs on one."""
    return os.environ.get(TEMPORARY_SERVER_ENV) or None


def _say(msg: str) -> None:
    print(f"isup: {msg}", file=sys.stderr, flush=True)


class Supervisor:
    """Runs ``isup *argv`` in a child process on a reachable Prefect API: the configured one
    (checked here, quickly) or a temporary server started here. :meth:`prepare` starts the
    server in the background (the caller validates its input meanwhile); :meth:`run` waits
    for it, runs the child and returns its exit code. On SIGINT, SIGTERM or SIGHUP it stops
    the child (SIGTERM, then SIGKILL of its process group after :data:`STOP_GRACE_S`), marks
    its flow run Crashed, stops the server and returns 128 + the signal number."""

    def __init__(self) -> None:
        self.server: TemporaryServer | None = None
        self.url: str | None = None

    def prepare(self) -> None:
        """Check the configured API, or start a temporary server (without waiting for it)."""
        self.url = api_url()
        if self.url:
            check_api(self.url)
        else:
            self.server = TemporaryServer()
            _say(
                f"starting a temporary Prefect server on {self.server.api_url} "
                f"(database under {self.server.home})"
            )
            self.server.launch()

    def close(self) -> None:
        """Stop the temporary server, if any."""
        if self.server is not None:
            self.server.stop()

    def run(self, argv: list[str]) -> int:
        env = {**os.environ, FLOW_PROCESS_ENV: "1"}
        received: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            received.append(signum)

        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, on_signal) for s in handled}
        proc = None
        try:
            if self.server is not None:
                self.url = self.server.wait_ready(lambda: bool(received))
                env.update(PREFECT_API_URL=self.url, **{TEMPORARY_SERVER_ENV: self.url})
            if not received:
                cmd = [sys.executable, "-m", "integral_superposition.flows.cli", *argv]
                proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=_die_with_parent)
                while proc.poll() is None and not received:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.2)
            if received:
                name = signal.Signals(received[0]).name
                if proc is not None:
                    _say(f"{name}: stopping the flow run")
                    _stop_group(proc)
                    from integral_superposition.runs import process_id

                    reasons = {process_id(proc.pid): f"stopped by {name}"}
                    crashed = mark_dead_runs_crashed(self.url, reasons)
                    if crashed:
                        _say(f"marked Crashed: {', '.join(crashed)}")
                return 128 + received[0]
            assert proc is not None
            if proc.returncode < 0:  # the child was killed: its flow run cannot report
                mark_dead_runs_crashed(self.url)
            return proc.returncode
        finally:
            if proc is not None and proc.poll() is None:
                _stop_group(proc)
            self.close()
            for s, h in previous.items():
                signal.signal(s, h)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after :data:`STOP_GRACE_S`; waits."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):  # and whatever it started
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
