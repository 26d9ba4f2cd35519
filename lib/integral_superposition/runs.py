"""Run folders ``{storage}/{experiment}/{run}``: where a step's output sits in one, and what
its ``run.json`` index and the outputs' manifests say (the store an SAE was trained on, the
model and dtype it was dumped with, every output of a finished run); what its ``config.yaml``
and ``process.json`` say (whether a step's config fits the run, whether its process still
runs); the runs of a storage root (``isup ls``) and the unfinished run a rerun continues.

An SAE of a run sits at ``{run}/sae/<name>``; the steps after training write next to it
(``{run}/analysis/<name>``, ``{run}/merge/<name>``, ...).
"""

from __future__ import annotations

import datetime as _dt
import os
import posixpath
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from integral_superposition import storage

if TYPE_CHECKING:
    from integral_superposition.experiment import ExperimentConfig

__all__ = [
    "RUN_CONFIG",
    "RUN_INDEX",
    "RUN_PROCESS",
    "STEP_FIELDS",
    "RunConfigMismatch",
    "absolute_storage",
    "basename",
    "config_differences",
    "dumped_dtype",
    "find_store_of",
    "find_unfinished_run",
    "list_runs",
    "parent",
    "process_alive",
    "process_id",
    "read_run_outputs",
    "run_state",
    "sae_model_id",
    "split_run_root",
    "write_run_record",
]

RUN_INDEX = "run.json"
"""The index a finished run writes into its folder: its config and every step's output."""
RUN_CONFIG = "config.yaml"
"""The resolved config a run records at its start (without storage options)."""
RUN_PROCESS = "process.json"
"""Which process runs the run (``host:pid``), since when, and its flow run."""


RECORD_KEYS = {RUN_INDEX: ("experiment", "run", "steps"), RUN_PROCESS: ("process", "started")}
"""The keys every record of that name holds: what tells a record of ours from a user's file."""


def write_run_record(
    run_root: str,
    name: str,
    doc: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the record ``name`` (:data:`RUN_INDEX`, :data:`RUN_PROCESS`) into ``run_root``,
    replacing only an earlier record of ours (a JSON object with :data:`RECORD_KEYS`); any
    other file of that name is a :class:`FileExistsError`, and stays. Returns its URI."""
    uri = storage.join(run_root, name)
    if storage.exists(uri, storage_options):
        try:
            found = storage.read_json(uri, storage_options)
        except (ValueError, UnicodeDecodeError):
            found = None
        if not isinstance(found, dict) or not all(k in found for k in RECORD_KEYS[name]):
            raise FileExistsError(
                f"run root {run_root!r} holds a {name} that is not a run record this project "
                "wrote: refusing to replace it; choose another run folder (it was not changed)"
            )
    storage.write_json(uri, dict(doc), storage_options)
    return uri


def absolute_storage(uri: str) -> str:
    """Local storage made absolute (a worker may run a flow from another directory)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _split(uri: str) -> tuple[str, str]:
    uri = uri.rstrip("/")
    return posixpath.split(uri) if "://" in uri else os.path.split(uri)


def parent(uri: str, levels: int = 1) -> str:
    """The folder ``levels`` up from ``uri`` (a local path or a URI)."""
    for _ in range(levels):
        uri = _split(uri)[0]
    return uri


def basename(uri: str) -> str:
    """The last part of ``uri`` (a folder's name)."""
    return posixpath.basename(uri.rstrip("/"))


def split_run_root(run_root: str) -> tuple[str, str, str]:
    """``(storage, experiment, run)`` of a run folder ``{storage}/{experiment}/{run}``."""
    root = absolute_storage(run_root).rstrip("/")
    exp_root, run = _split(root)
    storage_root, experiment = _split(exp_root)
    if not (run and experiment and storage_root):
        raise ValueError(
            f"run_root={run_root!r}: expected a folder {{storage}}/{{experiment}}/{{run}}"
        )
    return storage_root, experiment, run


def find_store_of(sae_uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The activation store an SAE of an experiment run was trained on (from the run's
    ``run.json``); raises when the SAE does not sit in a run folder that records it."""
    index = storage.join(parent(sae_uri, 2), RUN_INDEX)
    try:
        doc = storage.read_json(index, storage_options)
    except (FileNotFoundError, OSError, ValueError):
        raise ValueError(
            f"sae_uri={sae_uri!r}: no run index at {index!r} to find its activation store; "
            "pass store_uri explicitly"
        ) from None
    stores = [
        s["output"]["uri"]
        for s in doc.get("steps", [])
        if s.get("output")
        and s["output"]["kind"] == "activations"
        and s["step"] in ("dump", "combine")
    ]
    if not stores:
        raise ValueError(f"{index!r} records no activation store; pass store_uri explicitly")
    return stores[-1]


def sae_model_id(sae_uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The model an SAE was trained on, from its ``cfg.json`` (SAELens ``metadata.model_name``)."""
    try:
        cfg = storage.read_json(storage.join(sae_uri, "cfg.json"), storage_options)
    except (FileNotFoundError, OSError, ValueError):
        cfg = {}
    name = (cfg.get("metadata") or {}).get("model_name") or cfg.get("model_name")
    if not name:
        raise ValueError(f"sae_uri={sae_uri!r}: its cfg.json names no model; pass model_id")
    return str(name)


def dumped_dtype(
    store_uri: str, model_id: str, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The dtype (``bf16``, ``fp32``, ...) model ``model_id`` ran in when it dumped the store
    at ``store_uri``; None when the store was dumped from another model or does not say."""
    from integral_superposition.compute import DTYPE_NAMES, short_name

    try:
        dumped = storage.read_manifest(store_uri, storage_options).get("model") or {}
    except (FileNotFoundError, OSError, ValueError):
        return None
    name = str(dumped.get("dtype"))
    if dumped.get("model_id") != model_id or name not in DTYPE_NAMES:
        return None
    return short_name(DTYPE_NAMES[name])


def read_run_outputs(
    run_root: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The config of a finished run and its outputs by kind (``{"sae": [output, ...], ...}``,
    each output as recorded in ``run.json``; the report's own left out)."""
    doc = storage.read_json(storage.join(run_root, RUN_INDEX), storage_options)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for s in doc.get("steps", []):
        if s.get("output") and s["step"] != "report":
            by_kind.setdefault(s["output"]["kind"], []).append(s["output"])
    return doc.get("config", {}), by_kind


# -- a run's records: its config, its process; the runs of a storage root -----------------------
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
    exp_root = storage.join(absolute_storage(cfg.storage), cfg.name)
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


def list_runs(
    storage_root: str,
    experiment: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every run under ``storage_root`` (or one experiment): ``experiment, run, finished,
    report_uri, steps`` from its ``run.json``; a run without one has ``finished: None`` and a
    ``state`` (:func:`run_state`: running, crashed, stopped or unfinished)."""
    storage_root = absolute_storage(storage_root)  # runs record absolute local paths
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
                if not storage.exists(storage.join(run_root, RUN_CONFIG), storage_options):
                    continue
                doc = {"experiment": exp, "run": run, "finished": None, "steps": []}
                doc["state"] = run_state(run_root, storage_options)[0]
            doc["run_root"] = run_root
            runs.append(doc)
    runs.sort(
        key=lambda d: (d.get("experiment") or "", d.get("finished") or "", d.get("run") or "")
    )
    return runs
