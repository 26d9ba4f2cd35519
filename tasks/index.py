"""The run's own records: ``config.yaml`` and ``process.json`` (which process runs it) at
its start, ``run.json`` (the index of every output the run produced or reused) at its end,
and reading them back for ``isup ls`` and for resuming an unfinished run."""

from __future__ import annotations

import datetime as _dt
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from integral_superposition import storage
from integral_superposition.experiment import ExperimentConfig
from integral_superposition.runs import RUN_INDEX
from integral_superposition.tasks.refs import OutputRef, RunLocation
from pydantic import BaseModel, Field

RUN_CONFIG = "config.yaml"
RUN_PROCESS = "process.json"


class StepRecord(BaseModel):
    """One task run of a flow: its step, the output it names, and its final state."""

    step: str
    name: str
    state: str
    seconds: float | None = None
    output: OutputRef | None = None


class ExperimentResult(BaseModel):
    """What ``experiment_flow`` returns (and writes as ``run.json``)."""

    experiment: str
    run: str
    run_root: str
    flow_run_id: str | None = None
    report_uri: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)

    @property
    def all_cached(self) -> bool:
        return bool(self.steps) and all(s.state == "Cached" for s in self.steps)

    def outputs(self, kind: str) -> list[OutputRef]:
        return [s.output for s in self.steps if s.output is not None and s.output.kind == kind]


class RunConfigMismatch(ValueError):
    """A step's config differs from the config recorded in the run root it writes to."""


_NOT_OUTPUT_FIELDS = (
    "run",
    "storage",
    "storage_options",
    "storage_secret",
    "storage_create_bucket",
    "result_storage",
    "retries",
    "gpu_limit",
    "steps",
    "fanout.mode",
    "fanout.deployment",
    "fanout.train",
    "fanout.train_deployment",
    "fanout.gpus_per_run",
    "model.device",
    "model.device_map",
)
"""Config fields that do not shape any output: they may differ between steps of one run."""

STEP_FIELDS: dict[str, tuple[str, ...] | None] = {
    "dump": ("name", "data", "model", "dump", "fanout", "paths.shards_dir"),
    "train": ("name", "data", "model", "dump", "fanout", "paths", "sae", "sweep"),
    "experiment": None,
}
"""The config fields each step's outputs depend on (None: every field)."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_differences(
    recorded: Mapping[str, Any], cfg: ExperimentConfig, step: str = "experiment"
) -> list[tuple[str, Any, Any]]:
    """``(field, recorded value, this value)`` for every field of ``step`` that differs
    (fields the recorded config does not know, e.g. added by a later version, are skipped)."""
    scope = STEP_FIELDS[step]
    old, new = _flatten(dict(recorded)), _flatten(cfg.public_dict())

    def relevant(key: str) -> bool:
        if any(key == f or key.startswith(f + ".") for f in _NOT_OUTPUT_FIELDS):
            return False
        return scope is None or any(key == f or key.startswith(f + ".") for f in scope)

    diffs = []
    for key in sorted(set(old) | set(new)):
        if not relevant(key) or key not in old:
            continue
        if old.get(key) != new.get(key, "<absent>"):
            diffs.append((key, old.get(key), new.get(key, "<absent>")))
    return diffs


def write_run_config(cfg: ExperimentConfig, loc: RunLocation, step: str = "experiment") -> str:
    """Record the resolved config (without storage options) as ``{run}/config.yaml``, or
    check it against the one already recorded there: a run root belongs to one config, and
    a step whose config differs raises :class:`RunConfigMismatch` naming the fields."""
    uri = loc.uri(RUN_CONFIG)
    try:
        text = storage.read_bytes(uri, loc.storage_options).decode("utf-8")
    except FileNotFoundError:
        storage.write_bytes(uri, cfg.to_yaml().encode("utf-8"), loc.storage_options)
        return uri
    try:
        recorded = yaml.safe_load(text)
    except yaml.YAMLError:
        recorded = None
    if not isinstance(recorded, Mapping):
        raise RunConfigMismatch(
            f"{uri!r} is not a config this project wrote; run root {loc.root!r} is not a run "
            "of this experiment (choose another --run)"
        )
    diffs = config_differences(recorded, cfg, step)
    if diffs:
        shown = "; ".join(f"{k}: {a!r} recorded, {b!r} now" for k, a, b in diffs[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise RunConfigMismatch(
            f"run {loc.experiment}/{loc.run} was made with a different config ({uri}); its "
            f"outputs belong to that config. Differing fields: {shown}{more}. Start a new run "
            "(another --run, or none for a fresh one), or use the recorded config "
            f"(--config {uri})"
        )
    return uri


def process_id(pid: int | None = None) -> str:
    """``host:pid`` of a process (this one by default), as Prefect's runner records it."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def process_alive(process: str | None, since: _dt.datetime | None = None) -> bool | None:
    """Whether the process ``host:pid`` still runs: None when it is on another host
    (unknown); False when the pid is gone, a zombie, or a newer process that reused the pid
    (started after ``since``)."""
    import psutil

    host, _, pid = (process or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        p = psutil.Process(int(pid))
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return since is None or p.create_time() <= since.timestamp() + 1.0
    except psutil.Error:
        return False


def write_run_process(loc: RunLocation, flow_run_id: str | None = None) -> str:
    """Write ``{run}/process.json``: the process running the run (``host:pid``), when it
    started, and its flow run. A run with this record and no ``run.json`` whose process is
    gone has crashed (and ``isup run`` resumes it)."""
    uri = loc.uri(RUN_PROCESS)
    doc = {
        "process": process_id(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "flow_run_id": flow_run_id,
    }
    storage.write_json(uri, doc, loc.storage_options)
    return uri


def run_state(
    run_root: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The state of a run without ``run.json``: ``running`` (its process is alive, or on
    another host its lease is renewed), ``crashed`` (its process on this host is gone, or
    its lease expired), ``stopped`` (a process on another host released its lease without
    finishing) or ``unfinished`` (no record, or unknown); and its ``process.json`` record."""
    from integral_superposition.lease import read_lease, stale_reason

    try:
        rec = storage.read_json(storage.join(run_root, RUN_PROCESS), storage_options)
    except (FileNotFoundError, NotADirectoryError, OSError, ValueError):
        return "unfinished", {}
    started = rec.get("started")
    since = _dt.datetime.fromisoformat(started) if started else None
    alive = process_alive(rec.get("process"), since)
    if alive is None:  # another host: its lease tells whether it still writes
        try:
            lease = read_lease(run_root, storage_options)
        except (OSError, ValueError):
            return "unfinished", rec
        if lease is None:
            return "stopped", rec
        return ("crashed" if stale_reason(lease) else "running"), rec
    return ("running" if alive else "crashed"), rec


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same: all but the run name and how storage is accessed."""
    return {
        k: v for k, v in config.items() if k not in ("run", "storage_options", "storage_secret")
    }


def find_unfinished_run(
    cfg: ExperimentConfig, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The newest run of ``cfg``'s experiment that did not finish (no ``run.json``), whose
    process is gone (it crashed, or never recorded one), and whose ``config.yaml`` equals
    ``cfg`` but for the run name and storage access: the run a rerun of the same command
    continues. None if there is none. A run of another host counts as gone when its lease
    expired or was released (:func:`run_state`)."""
    root = cfg.storage if "://" in cfg.storage else os.path.abspath(os.path.expanduser(cfg.storage))
    exp_root = storage.join(root, cfg.name)
    try:
        names = storage.listdir(exp_root, storage_options)
    except (FileNotFoundError, NotADirectoryError):
        return None
    want = _comparable(yaml.safe_load(cfg.to_yaml()))
    found: list[tuple[str, str]] = []
    for run in names:
        if run.startswith("."):
            continue
        root = storage.join(exp_root, run)
        if storage.exists(storage.join(root, RUN_INDEX), storage_options):
            continue
        try:
            recorded = yaml.safe_load(
                storage.read_bytes(storage.join(root, RUN_CONFIG), storage_options)
            )
        except (FileNotFoundError, NotADirectoryError, OSError, yaml.YAMLError):
            continue
        if not isinstance(recorded, dict) or _comparable(recorded) != want:
            continue
        state, rec = run_state(root, storage_options)
        if state == "running" or (rec and state == "unfinished"):  # it may still be running
            continue
        found.append((rec.get("started") or "", run))
    return max(found)[1] if found else None


def write_run_index(result: ExperimentResult, cfg: ExperimentConfig, loc: RunLocation) -> str:
    """Write ``{run}/run.json``: the run's outputs (here or reused from earlier runs)."""
    uri = loc.uri(RUN_INDEX)
    doc = {
        "experiment": result.experiment,
        "run": result.run,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "flow_run_id": result.flow_run_id,
        "report_uri": result.report_uri,
        "config": cfg.public_dict(),
        "steps": [s.model_dump(mode="json") for s in result.steps],
    }
    storage.write_json(uri, doc, loc.storage_options)
    return uri


def list_runs(
    storage_root: str,
    experiment: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every run under ``storage_root`` (or one experiment): ``experiment, run, finished,
    report_uri, steps`` from its ``run.json``; a run without one has ``finished: None`` and a
    ``state`` (:func:`run_state`: running, crashed, stopped or unfinished)."""
    experiments: Sequence[str] = (
        [experiment] if experiment else storage.listdir(storage_root, storage_options)
    )
    runs = []
    for exp in experiments:
        if exp.startswith("."):
            continue
        exp_root = storage.join(storage_root, exp)
        for run in storage.listdir(exp_root, storage_options):
            if run.startswith("."):
                continue
            run_root = storage.join(exp_root, run)
            index = storage.join(run_root, RUN_INDEX)
            try:
                doc = storage.read_json(index, storage_options)
            except (FileNotFoundError, NotADirectoryError, OSError, ValueError):
                if not storage.exists(storage.join(run_root, "config.yaml"), storage_options):
                    continue
                doc = {"experiment": exp, "run": run, "finished": None, "steps": []}
                doc["state"] = run_state(run_root, storage_options)[0]
            doc["run_root"] = run_root
            runs.append(doc)
    runs.sort(
        key=lambda d: (d.get("experiment") or "", d.get("finished") or "", d.get("run") or "")
    )
    return runs


def publish_run_outputs(result: ExperimentResult, loc: RunLocation) -> None:
    """A markdown artifact listing every step of the run with its state and a link to its
    output (on a cached run, the earlier run's output it reuses)."""
    from integral_superposition.tasks.ui import browser_url, markdown

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| step | name | state | output |", "| --- | --- | --- | --- |"]
    for s in result.steps:
        out = ""
        if s.output is not None:
            out = f"[{cell(s.output.uri)}]({browser_url(s.output.uri, loc.storage_options)})"
        rows.append(f"| {s.step} | {cell(s.name)} | {s.state} | {out} |")
    n_cached = sum(s.state == "Cached" for s in result.steps)
    head = f"# Outputs of {cell(result.experiment)} / {cell(result.run)}\n\n"
    head += f"Run root: `{result.run_root}`; {n_cached} of {len(result.steps)} steps cached.\n\n"
    markdown("run-outputs", head + "\n".join(rows) + "\n", f"Outputs of {result.run}")
