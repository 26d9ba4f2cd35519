"""The steps run on one trained SAE (analyze, merge, steer-eval): one row each, from which
``flows.steps`` makes the step's flow and ``flows.cli`` its ``isup`` command.

Kept free of Prefect and of the tasks, so that ``isup --help`` stays fast: the task and the
parameter model are named as ``module:attribute`` and imported when a step runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["SAE_STEPS", "SaeStep"]


@dataclass(frozen=True)
class SaeStep:
    """One step on a trained SAE."""

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
    model_from_sae: bool = False
    """Without ``model_id``, use the model the SAE was trained on (the step needs one)."""
    print_summary: bool = False
    """The command prints the output's summary (JSON) under its URI."""

    @property
    def flow_name(self) -> str:
        """The module attribute of the step's flow (``analyze_flow``, ``steer_eval_flow``)."""
        return self.name.replace("-", "_") + "_flow"

    def load_task(self) -> Any:
        return _load(self.task)

    def load_params(self) -> type:
        return _load(self.params)


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


SAE_STEPS: tuple[SaeStep, ...] = (
    SaeStep(
        name="analyze",
        task="integral_superposition.tasks.analyze:analyze_sae",
        params="integral_superposition.analysis.params:AnalysisParams",
        output="analysis",
        help="Analyse an SAE's latents: statistics, label enrichment, maps, dashboards. "
        "A model (``--model``, ``model_id``) adds the logit lens. Output: ``{run_root}/analysis/<sae>``.",
    ),
    SaeStep(
        name="merge",
        task="integral_superposition.tasks.merge:merge_sae",
        params="integral_superposition.merge.params:MergeParams",
        output="merged SAE",
        help="Merge redundant latents of an SAE into a smaller SAE, and evaluate what it "
        "costs. A model (``--model``, ``model_id``) enables the spliced CE / KL metrics. Output: "
        "``{run_root}/merge/<sae>``.",
        print_summary=True,
    ),
    SaeStep(
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
)
"""Every step on one trained SAE. Each flow takes ``sae_uri``, ``store_uri`` (default: the
store recorded by the SAE's run), ``params``, ``model_id``, ``run_root`` (default: the SAE's
run), the storage settings and ``allow_other_store`` (use a store the SAE was not trained
on)."""
