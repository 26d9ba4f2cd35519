"""The ``isup`` process: a dead API URL, the temporary server's settings, ``isup server
--port``, a clean stop on SIGTERM, and a rerun after kill -9 that resumes the killed run."""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from typer.testing import CliRunner

ISUP = str(Path(sys.executable).with_name("isup"))
# a smoke experiment that stops after training
TRAIN_ONLY = [
    "--preset", "smoke", "--set", "fanout.partitions=1", "--set", "steps.analyze=false",
    "--set", "steps.merge=false", "--set", "steps.steer_eval=false", "--set", "steps.report=false",
]  # fmt: skip


def _env(api_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_api_url_fails_at_once_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there
    t0 = time.monotonic()
    proc = subprocess.run(
        [ISUP, "run", "--preset", "smoke", "--storage", str(tmp_path / "runs")],
        env=_env(url), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert url in lines[0] and "could not be reached" in lines[0]
    assert "unset PREFECT_API_URL" in lines[0] and "isup server" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()
    assert elapsed < 60  # no 25 s of connection retries on top of the start-up


SETTINGS = textwrap.dedent(
    """
    import json
    from integral_superposition.flows.process import server_defaults, startup_timeout
    print(json.dumps([startup_timeout(), server_defaults()]))
    """
)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, [180, {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}]),
        (
            {
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "7",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "true",
            },
            [7, {}],
        ),
    ],
)
def test_temporary_server_settings_default_and_user_values(tmp_path, extra, expected):
    """A generous start-up timeout and no analytics by default; the user's settings win."""
    env = _env(PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED")
    env.update(extra)
    proc = subprocess.run(
        [sys.executable, "-c", SETTINGS], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected


def _server_processes(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or []) and (
                p.environ().get("PREFECT_HOME") == str(home)
            ):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_temporary_server_timeout_is_honoured(tmp_path):
    """A start-up timeout the server cannot meet: one line that says what to do, and the
    server it started is stopped."""
    home = tmp_path / "home"
    proc = subprocess.run(
        [ISUP, "run", "--preset", "smoke", "--storage", str(tmp_path / "runs")],
        env=_env(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "did not start within 1 s" in errors[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not _server_processes(home)


def test_server_on_any_port_serves_a_ui_that_talks_to_that_port(tmp_path):
    port = _free_port()
    # a PREFECT_API_URL for another server used to become the UI's API URL (or else 4200)
    env = _env("http://127.0.0.1:4200/api", PREFECT_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(
        [ISUP, "server", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        settings = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=5)
                if r.status_code == 200:
                    settings = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert settings is not None, "the server did not answer"
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
        health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
        assert health.status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _flow_runs(api_url: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def _latest_step(run_root: Path) -> int:
    steps = [0]
    for p in glob.glob(str(run_root / "checkpoints" / "*" / "latest.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            steps.append(int(json.loads(Path(p).read_text())["step"]))
    return max(steps)


def _wait_for_checkpoint(proc, run_root: Path, min_step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while (step := _latest_step(run_root)) < min_step:
        assert proc.poll() is None, "isup ended before it could be stopped"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    return step


@pytest.mark.prefect
def test_sigterm_stops_the_run_its_processes_and_marks_it_crashed(prefect_api, tmp_path):
    from integral_superposition.flows.cli import app

    storage = tmp_path / "runs"
    args = [ISUP, "run", *TRAIN_ONLY, "--storage", str(storage), "--run", "sig",
            "--set", "sae.epochs=500"]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=_env(prefect_api), stdout=f, stderr=f)
    try:
        _wait_for_checkpoint(proc, storage / "smoke" / "sig", 10)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the flow runs in a child process
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert stopped_in < 10, stopped_in
    _, alive = psutil.wait_procs(children, timeout=2)
    assert not alive, alive
    assert "Traceback" not in err
    (fr,) = _flow_runs(prefect_api, "smoke/sig")
    assert fr.state.type.value in ("CRASHED", "CANCELLED"), fr.state
    # said by isup's supervisor, or by Prefect's own handler when it got there first
    assert re.search(r"SIGTERM|termination signal", fr.state.message or ""), fr.state.message
    listing = CliRunner().invoke(app, ["ls", str(storage)])
    assert re.search(r"smoke\s+sig\s+\(crashed\)", listing.output), listing.output
    assert not (storage / "smoke" / "sig" / "run.json").exists()


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # isup runs on one thread too: the same float summation order
    yield
    torch.set_num_threads(n)


@pytest.mark.prefect
def test_rerun_after_kill_9_resumes_the_run_and_ends_with_the_uninterrupted_weights(
    prefect_api, tmp_path, one_thread
):
    from integral_superposition.flows.config import resolve_config
    from integral_superposition.sae import load_sae
    from integral_superposition.sae.train import train_saes

    storage = tmp_path / "runs"
    budget = ["--set", "sae.epochs=20", "--set", "sae.checkpoint_every=20"]
    args = [ISUP, "run", *TRAIN_ONLY, *budget, "--storage", str(storage)]
    env = _env(prefect_api, OMP_NUM_THREADS="1")
    with open(tmp_path / "killed.txt", "w") as f:
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=f)
    try:
        deadline = time.monotonic() + 300
        while not (runs := list((storage / "smoke").glob("2*"))):
            assert proc.poll() is None and time.monotonic() < deadline, "no run folder"
            time.sleep(0.1)
        (killed_root,) = runs
        killed_at = _wait_for_checkpoint(proc, killed_root, 40)
        proc.kill()  # kill -9 of isup: its flow process dies with it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed_root / "run.json").exists()
    (killed,) = _flow_runs(prefect_api, f"smoke/{killed_root.name}")
    assert killed.state.type.value == "RUNNING"  # nobody could report it yet

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    first = again.stdout.splitlines()[0]
    assert first.startswith(f"resuming the unfinished run {killed_root.name} of smoke"), first
    m = re.search(r"resuming training from checkpoint step (\d+)", again.stderr)
    assert m and int(m.group(1)) >= killed_at, again.stderr[-4000:]
    assert [p.name for p in (storage / "smoke").glob("2*")] == [killed_root.name]
    assert (killed_root / "run.json").exists()
    assert f"marked Crashed (their process is gone): smoke/{killed_root.name}" in again.stderr
    states = sorted(
        fr.state.type.value for fr in _flow_runs(prefect_api, f"smoke/{killed_root.name}")
    )
    assert states == ["COMPLETED", "CRASHED"]  # the killed flow run is no longer Running

    # the same SAE trained without interruption, on the same store
    cfg = resolve_config(None, "smoke", [a for a in TRAIN_ONLY[2:] + budget if a != "--set"])
    (job,) = cfg.sae_jobs()
    (ref,) = train_saes(
        str(killed_root / "acts"), [job.cfg], [str(tmp_path / "ref")], progress=False
    )
    a = load_sae(str(killed_root / "sae" / job.name)).requires_grad_(False)
    b = load_sae(ref.uri).requires_grad_(False)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert float((getattr(a, name) - getattr(b, name)).abs().max()) <= 1e-6, name


def test_find_unfinished_run_picks_the_newest_crashed_run_of_the_same_config(tmp_path):
    from integral_superposition.flows.config import resolve_config
    from integral_superposition.runs import find_unfinished_run, list_runs

    cfg = resolve_config(None, "smoke", [f"storage={tmp_path}"])
    exp = tmp_path / "smoke"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()

    def make(run: str, started: str, pid: int | None, finished=False, **changes) -> None:
        root = exp / run
        root.mkdir(parents=True)
        c = cfg.model_copy(update={"run": run, **changes})
        (root / "config.yaml").write_text(c.to_yaml())
        if pid is not None:
            rec = {"process": f"{host}:{pid}", "started": started, "flow_run_id": None}
            (root / "process.json").write_text(json.dumps(rec))
        if finished:
            (root / "run.json").write_text(json.dumps({"run": run, "finished": started}))

    make("a-old-crash", "2026-01-01T00:00:00+00:00", dead.pid)
    make("b-new-crash", "2026-01-02T00:00:00+00:00", dead.pid)
    make("c-finished", "2026-01-03T00:00:00+00:00", dead.pid, finished=True)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    make("d-running", now, os.getpid())  # this process, started before that record
    make("e-other-config", "2026-01-05T00:00:00+00:00", dead.pid, name="smoke", gpu_limit="x")
    # a run of another host whose lease is renewed: it is running there
    make("f-other-host", "2026-01-06T00:00:00+00:00", None)
    (exp / "f-other-host" / "process.json").write_text(
        json.dumps({"process": "elsewhere:1", "started": "2026-01-06T00:00:00+00:00"})
    )
    lease = {"host": "elsewhere", "pid": 1, "heartbeat": time.time(), "expires": time.time() + 99}
    (exp / "f-other-host" / ".lease.json").write_text(json.dumps(lease))
    assert find_unfinished_run(cfg) == "b-new-crash"
    states = {r["run"]: r.get("state") for r in list_runs(str(tmp_path))}
    assert states["b-new-crash"] == "crashed" and states["d-running"] == "running"
    assert states["f-other-host"] == "running" and states["c-finished"] is None
    # once its lease expired it has crashed there, and a rerun here continues it
    lease["expires"] = time.time() - 1
    (exp / "f-other-host" / ".lease.json").write_text(json.dumps(lease))
    assert find_unfinished_run(cfg) == "f-other-host"
    assert {r["run"]: r.get("state") for r in list_runs(str(tmp_path))}["f-other-host"] == "crashed"
    (exp / "f-other-host" / "run.json").write_text("{}")
    assert find_unfinished_run(cfg) == "b-new-crash"
    # with no process record (it died before writing one) a run is resumable too
    (exp / "b-new-crash" / "process.json").unlink()
    (exp / "a-old-crash" / "process.json").unlink()
    assert find_unfinished_run(cfg) in ("a-old-crash", "b-new-crash")
    (exp / "b-new-crash" / "run.json").write_text("{}")
    (exp / "a-old-crash" / "run.json").write_text("{}")
    assert find_unfinished_run(cfg) is None


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.prefect
def test_library_messages_of_a_task_reach_its_run_log_once(prefect_api):
    from integral_superposition.tasks.ui import library_logs
    from prefect import flow, task

    lib = logging.getLogger("integral_superposition.sae.train")
    with library_logs():  # outside a run: nothing to forward (and no loop back)
        lib.info("outside a run")

    @task
    def step() -> None:
        with library_logs():
            lib.info("resuming training from checkpoint step 5 (here)")
        lib.info("after the step")

    @flow
    def one_step() -> None:
        step()

    run_log, root_log = _Collect(), _Collect()
    logging.getLogger("prefect.task_runs").addHandler(run_log)
    logging.getLogger().addHandler(root_log)
    try:
        one_step()
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(run_log)
        logging.getLogger().removeHandler(root_log)
    said = [r.getMessage() for r in run_log.records]
    assert said.count("resuming training from checkpoint step 5 (here)") == 1, said
    assert not [r for r in root_log.records if r.name.startswith("integral_superposition")]
    assert logging.getLogger("integral_superposition").propagate
    assert not logging.getLogger("integral_superposition").handlers
