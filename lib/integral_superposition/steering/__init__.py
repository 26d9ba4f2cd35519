"""Steering: edit SAE latents inside a model while it runs or generates, and measure the effect.

- :func:`steer` (context manager) / :func:`register_steering` / the seed's
  :func:`register_prehook_last_row`: apply latent edits at the SAE's hook point on chosen
  positions (last prompt token, prompt, generated tokens, all, or a mask), correct under the
  KV cache and with left or right padding.
- Edits: :func:`clamp`, :func:`clamp_to_max`, :func:`scale`, :func:`add`, :func:`ablate`,
  the seed's :func:`set_or_scale_latent`, and :func:`parse_edit` (``"42=100"``).
- :func:`compare_generations`: unsteered and steered continuations side by side.
- :mod:`~integral_superposition.steering.evaluate`: strength sweeps with a label classifier,
  target-vocabulary mass, perplexity and controls; :func:`run_steering_eval` publishes them.
"""

from integral_superposition.steering import edits, evaluate, generation, hooks
from integral_superposition.steering.edits import (
    Edit,
    ablate,
    add,
    clamp,
    clamp_to_max,
    max_activations,
    parse_edit,
    scale,
    set_or_scale_latent,
)
from integral_superposition.steering.evaluate import (
    LabelClassifier,
    SteeringEval,
    SteeringParams,
    SteeringResult,
    evaluate_steering,
    label_vocabulary,
    load_steering,
    pick_latents,
    plot_sweep,
    run_steering_eval,
    side_by_side,
    steering_section,
)
from integral_superposition.steering.generation import (
    Generations,
    compare_generations,
    continuation_nll,
    generate_continuations,
)
from integral_superposition.steering.hooks import (
    POSITION_SETS,
    LatentEditor,
    SteeringHandle,
    column_mask,
    register_prehook_last_row,
    register_steering,
    resolve_sae_hook_point,
    steer,
)

__all__ = [
    "POSITION_SETS",
    "Edit",
    "Generations",
    "LabelClassifier",
    "LatentEditor",
    "SteeringEval",
    "SteeringHandle",
    "SteeringParams",
    "SteeringResult",
    "ablate",
    "add",
    "clamp",
    "clamp_to_max",
    "column_mask",
    "compare_generations",
    "continuation_nll",
    "edits",
    "evaluate",
    "evaluate_steering",
    "generate_continuations",
    "generation",
    "hooks",
    "label_vocabulary",
    "load_steering",
    "max_activations",
    "parse_edit",
    "pick_latents",
    "plot_sweep",
    "register_prehook_last_row",
    "register_steering",
    "resolve_sae_hook_point",
    "run_steering_eval",
    "scale",
    "set_or_scale_latent",
    "side_by_side",
    "steer",
    "steering_section",
]
