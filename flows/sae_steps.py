"""The steps run alone after training, one row each: from a row ``flows.steps`` makes the
step's flow and ``flows.cli`` its ``isup`` command.

Two kinds of step: those on one trained SAE (``analyze``, ``merge``, ``steer-eval``; scope
``sae``) and those on a finished run's recorded outputs (``report``; scope ``run``).

Kept free of Prefect and of the tasks, so that ``isup --help`` stays fast: the task, the
parameter model and the publishing hook are named as ``module:attribute`` and imported when
a step runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["RUN_STEPS", "SAE_STEPS", "STEPS", "Step"]


@dataclass(frozen=True)
class Step:
    """One step run on its own: on a trained SAE, or on a finished run."""

    name: str
    """Flow and command name (``isup <name>``)."""
    task: str
    """The Prefect task, ``module:attribute``."""
    params: str
    """The step's parameter model, ``module:attribute`` (``--param NAME=VALUE`` fills it)."""
    output: str
    """What the output is called in logs and on the terminal."""
    help: str
    """The flow's docstring and the command's help."""
    scope: Literal["sae", "run"] = "sae"
    """``sae``: the flow takes ``sae_uri``, ``store_uri``, ``params``, ``model_id``,
    ``run_root`` (default: the SAE's run), the storage settings and ``allow_other_store``, and
    calls ``task(sae, store, params, loc, model=...)``. ``run``: the flow takes ``run_root``,
    ``options`` (the parameter model) and the storage settings, reads the outputs of the
    kinds ``inputs`` from the run's ``run.json`` and calls ``task(config, *inputs, options,
    loc)``."""
    inputs: tuple[str, ...] = ()
    """Scope ``run``: the kinds of recorded output the task takes, in its argument order."""
    publish: str | None = None
    """Scope ``run``: ``module:attribute`` called after the task, cached or not, with
    ``(ref, *inputs, options, loc)`` (what the Prefect UI shows of the output)."""
    shown: str | None = None
    """The summary field printed and logged as where the output is (default: its URI)."""
    model_from_sae: bool = False
    """Without ``model_id``, use the model the SAE was trained on (the step needs one)."""
    print_summary: bool = False
    """The command prints the output's summary (JSON) under its URI."""

    def __post_init__(self) -> None:
        if self.scope not in ("sae", "run"):
            raise ValueError(f"scope={self.scope!r}: expected 'sae' or 'run'")
        if self.scope == "sae" and (self.inputs or self.publish):
            raise ValueError(f"step {self.name!r}: inputs and publish are for scope 'run'")

    @property
    def flow_name(self) -> str:
        """The module attribute of the step's flow (``analyze_flow``, ``steer_eval_flow``)."""
        return self.name.replace("-", "_") + "_flow"

    def load_task(self) -> Any:
        return _load(self.task)

    def load_params(self) -> type:
        return _load(self.params)

    def load_publish(self) -> Any:
        return _load(self.publish) if self.publish else None

    def where(self, ref: Any) -> str:
        """Where the output ``ref`` (an ``OutputRef``) is, as the command prints it."""
        return str(ref.summary.get(self.shown) if self.shown else ref.uri)


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


STEPS: tuple[Step, ...] = (
    Step(
        name="analyze",
        task="integral_superposition.tasks.analyze:analyze_sae",
        params="integral_superposition.analysis.params:AnalysisParams",
        output="analysis",
        help="Analyse an SAE's latents: statistics, label enrichment, maps, dashboards. "
        "A model (``--model``, ``model_id``) adds the logit lens. Output: ``{run_root}/analysis/<sae>``.",
    ),
    Step(
        name="merge",
        task="integral_superposition.tasks.merge:merge_sae",
        params="integral_superposition.merge.params:MergeParams",
        output="merged SAE",
        help="Merge redundant latents of an SAE into a smaller SAE, and evaluate what it "
        "costs. A model (``--model``, ``model_id``) enables the spliced CE / KL metrics. Output: "
        "``{run_root}/merge/<sae>``.",
        print_summary=True,
    ),
    Step(
        name="steer-eval",
        task="integral_superposition.tasks.steer:evaluate_steering",
        params="integral_superposition.steering.params:SteeringParams",
        output="steering evaluation",
        help="Sweep steering strengths of the SAE's most label-enriched latents, with "
        "controls, inside a model (``--model``, ``model_id``; default: the model the SAE was "
        "trained on). Output: "
        "``{run_root}/steering/<sae>``.",
        model_from_sae=True,
    ),
    Step(
        name="report",
        scope="run",
        task="integral_superposition.tasks.report:build_experiment_report",
        params="integral_superposition.experiment:ReportOptions",
        inputs=("sae", "analysis", "merge", "steering"),
        publish="integral_superposition.tasks.report:publish_report_summary",
        output="report",
        shown="page",
        help="(Re)build the HTML report of a finished run (``run_root``, the folder "
        "``{storage}/{experiment}/{run}``) from its ``run.json``. Output: ``{run_root}/report``.",
    ),
)
"""Every step run on its own, in the order ``isup --help`` lists them."""

SAE_STEPS: tuple[Step, ...] = tuple(s for s in STEPS if s.scope == "sae")
"""The steps on one trained SAE."""
RUN_STEPS: tuple[Step, ...] = tuple(s for s in STEPS if s.scope == "run")
"""The steps on a finished run."""
