"""The run's own records: ``config.yaml`` at its start, ``run.json`` (the index of every
output the run produced or reused) at its end, and reading them back for ``isup ls``."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

from integral_superposition import storage
from integral_superposition.experiment import ExperimentConfig
from integral_superposition.tasks.refs import OutputRef, RunLocation
from pydantic import BaseModel, Field

RUN_INDEX = "run.json"


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


def write_run_config(cfg: ExperimentConfig, loc: RunLocation) -> str:
    """Write the resolved config (without storage options) to ``{run}/config.yaml``."""
    uri = loc.uri("config.yaml")
    storage.write_bytes(uri, cfg.to_yaml().encode("utf-8"), loc.storage_options)
    return uri


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
    report_uri, steps`` from its ``run.json``; runs without one are listed as unfinished."""
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
