"""Writing the run's own records: ``config.yaml`` and ``process.json`` (which process runs
it) at its start, ``run.json`` (the index of every output the run produced or reused) at its
end. Reading them back (``isup ls``, resuming an unfinished run) is the library's
:mod:`integral_superposition.runs`."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

import yaml
from integral_superposition import storage
from integral_superposition.experiment import ExperimentConfig
from integral_superposition.runs import (
    RUN_CONFIG,
    RUN_INDEX,
    RUN_PROCESS,
    RunConfigMismatch,
    config_differences,
    process_id,
    write_run_record,
)
from integral_superposition.tasks.refs import OutputRef, RunLocation
from pydantic import BaseModel, Field


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


def write_run_process(loc: RunLocation, flow_run_id: str | None = None) -> str:
    """Write ``{run}/process.json``: the process running the run (``host:pid``), when it
    started, and its flow run. A run with this record and no ``run.json`` whose process is
    gone has crashed (and ``isup run`` resumes it)."""
    doc = {
        "process": process_id(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "flow_run_id": flow_run_id,
    }
    return write_run_record(loc.root, RUN_PROCESS, doc, loc.storage_options)


def write_run_index(result: ExperimentResult, cfg: ExperimentConfig, loc: RunLocation) -> str:
    """Write ``{run}/run.json``: the run's outputs (here or reused from earlier runs)."""
    doc = {
        "experiment": result.experiment,
        "run": result.run,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "flow_run_id": result.flow_run_id,
        "report_uri": result.report_uri,
        "config": cfg.public_dict(),
        "steps": [s.model_dump(mode="json") for s in result.steps],
    }
    return write_run_record(loc.root, RUN_INDEX, doc, loc.storage_options)


def publish_run_outputs(result: ExperimentResult, loc: RunLocation) -> None:
    """A markdown artifact listing every step of the run with its state and a link to its
    output (on a cached run, the earlier run's output it reuses)."""
    from integral_superposition.tasks.ui import markdown

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| step | name | state | output |", "| --- | --- | --- | --- |"]
    for s in result.steps:
        out = ""
        if s.output is not None:
            out = (
                f"[{cell(s.output.uri)}]({storage.browser_url(s.output.uri, loc.storage_options)})"
            )
        rows.append(f"| {s.step} | {cell(s.name)} | {s.state} | {out} |")
    n_cached = sum(s.state == "Cached" for s in result.steps)
    head = f"# Outputs of {cell(result.experiment)} / {cell(result.run)}\n\n"
    head += f"Run root: `{result.run_root}`; {n_cached} of {len(result.steps)} steps cached.\n\n"
    markdown("run-outputs", head + "\n".join(rows) + "\n", f"Outputs of {result.run}")
