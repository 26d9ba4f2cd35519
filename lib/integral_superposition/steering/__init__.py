"""Steering: edit SAE latents inside a model while it runs or generates, and measure the effect.

- :func:`steer` (context manager) / :func:`register_steering` / the seed's
  :func:`register_prehook_last_row`: apply latent edits at the SAE's hook point on chosen
  positions (last prompt token, prompt, generated tokens, all, or a mask), correct under the
  KV cache and with left or right padding.
- Edits: :func:`clamp`, :func:`clamp_to_max`, :func:`scale`, :func:`add`, :func:`ablate`,
  the seed's :func:`set_or_scale_latent`, and :func:`parse_edit` (``"42=100"``);
  :class:`RowEdits`: different edits on different rows of one call.
- :func:`compare_generations`: unsteered and steered continuations side by side.
- :mod:`~integral_superposition.steering.sweep`: strength sweeps scored by the label classifier
  (:mod:`~integral_superposition.steering.classifier`), target-vocabulary mass and perplexity,
  with controls (latents from :mod:`~integral_superposition.steering.picks`, the figure from
  :mod:`~integral_superposition.steering.plot`; shares with 95% Wilson intervals, the best
  fluent strength and the classifier's check on generations in
  :mod:`~integral_superposition.steering.scores`);
  ``pipelines.steer_eval.run_steering_eval`` publishes them.
- :mod:`~integral_superposition.steering.positions`: which tokens a hook edits under the KV
  cache.
"""

from integral_superposition.steering import (
    classifier,
    edits,
    generation,
    hooks,
    picks,
    plot,
    positions,
    scores,
    sweep,
)
from integral_superposition.steering.classifier import LabelClassifier, label_vocabulary
from integral_superposition.steering.edits import (
    Edit,
    RowEdits,
    ablate,
    add,
    clamp,
    clamp_to_max,
    max_activations,
    parse_edit,
    scale,
    set_or_scale_latent,
)
from integral_superposition.steering.generation import (
    Generations,
    compare_generations,
    continuation_nll,
    generate_continuations,
)
from integral_superposition.steering.hooks import (
    LatentEditor,
    SteeringHandle,
    register_prehook_last_row,
    register_steering,
    resolve_sae_hook_point,
    steer,
)
from integral_superposition.steering.picks import pick_latents
from integral_superposition.steering.plot import plot_sweep
from integral_superposition.steering.positions import POSITION_SETS, column_mask
from integral_superposition.steering.scores import (
    GenerationCheck,
    judge_generations,
    pick_best_strength,
    wilson_interval,
)
from integral_superposition.steering.sweep import SteeringEval, SteeringParams, evaluate_steering

__all__ = [
    "POSITION_SETS",
    "Edit",
    "GenerationCheck",
    "Generations",
    "LabelClassifier",
    "LatentEditor",
    "RowEdits",
    "SteeringEval",
    "SteeringHandle",
    "SteeringParams",
    "ablate",
    "add",
    "clamp",
    "clamp_to_max",
    "classifier",
    "column_mask",
    "compare_generations",
    "continuation_nll",
    "edits",
    "evaluate_steering",
    "generate_continuations",
    "generation",
    "hooks",
    "judge_generations",
    "label_vocabulary",
    "max_activations",
    "parse_edit",
    "pick_best_strength",
    "pick_latents",
    "picks",
    "plot",
    "plot_sweep",
    "positions",
    "register_prehook_last_row",
    "register_steering",
    "resolve_sae_hook_point",
    "scale",
    "scores",
    "set_or_scale_latent",
    "steer",
    "sweep",
    "wilson_interval",
]
