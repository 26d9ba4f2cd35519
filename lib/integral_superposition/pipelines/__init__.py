"""End-to-end runners: each loads a step's inputs, calls the step libraries (``analysis``,
``merge``, ``steering``, ``viz``) and publishes one output folder through
:mod:`integral_superposition.outputs`. The step libraries never import this package.

- :func:`run_analysis` (``pipelines.analyze``): tables, figures and dashboards of an SAE's
  latents;
- :func:`run_merge` (``pipelines.merge``): a merged, refitted and evaluated SAE;
- :func:`run_steering_eval` (``pipelines.steer_eval``): a steering sweep with its controls,
  read back by :func:`load_steering`;
- :func:`build_experiment_report` (``pipelines.report``): the run's HTML report pages and
  summary tables from its published outputs.
"""

from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.merge.params import MergeParams
from integral_superposition.pipelines.analyze import run_analysis
from integral_superposition.pipelines.merge import run_merge
from integral_superposition.pipelines.report import build_experiment_report
from integral_superposition.pipelines.steer_eval import (
    SteeringResult,
    load_steering,
    run_steering_eval,
    side_by_side,
    steering_section,
)
from integral_superposition.steering.params import SteeringParams

__all__ = [
    "AnalysisParams",
    "MergeParams",
    "SteeringParams",
    "SteeringResult",
    "build_experiment_report",
    "load_steering",
    "run_analysis",
    "run_merge",
    "run_steering_eval",
    "side_by_side",
    "steering_section",
]
