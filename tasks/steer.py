"""The steering task: sweep edit strengths of an SAE's most label-enriched latents during
generation, scored by a label classifier, target-vocabulary mass and perplexity, with
controls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from integral_superposition.steering.params import SteeringParams
from integral_superposition.tasks.backends import run_sae_step
from integral_superposition.tasks.policy import TASK_DEFAULTS, output_cache
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.ui import event, table
from prefect import task


@task(
    name="steer-eval",
    **{
        **TASK_DEFAULTS,
        "cache_policy": output_cache(
            "integral_superposition.pipelines.steer_eval", "integral_superposition.backends"
        ),
    },
)
def evaluate_steering(
    sae: OutputRef,
    store: OutputRef,
    params: SteeringParams,
    loc: RunLocation,
    model: ModelRef,
    out: str = "steering",
    gpu_limit: str | None = "gpu",
    allow_other_store: bool = False,
) -> OutputRef:
    """Evaluate steering with ``sae`` inside ``model`` into ``{run}/{out}/{sae.name}``.
    Cached on the SAE's and the store's content hashes, the model and ``params``."""
    from integral_superposition.pipelines.steer_eval import load_steering, run_steering_eval

    out_uri = loc.uri(out, sae.name)
    manifest = run_sae_step(
        run_steering_eval,
        "steer",
        sae,
        store,
        params,
        loc,
        out_uri,
        model,
        gpu_limit,
        title="steering eval",
        allow_other_store=allow_other_store,
    )
    summary = manifest.get("summary", {})
    ref = OutputRef.from_manifest("steering", sae.name, out_uri, manifest, **summary)
    result = load_steering(out_uri, loc.storage_options)
    table(
        f"steering-{sae.name}",
        result.sweep.round(4),
        f"{sae.name}: steering strength sweep with controls",
    )
    event(
        "isup.steering.evaluated",
        f"isup.steering.{ref.content_hash[:16]}",
        {
            "uri": out_uri,
            "sae_uri": sae.uri,
            "latents": summary.get("latents", []),
            **loc.storage_settings(),
        },
        labels={"prefect.resource.name": f"{loc.experiment}/{sae.name}", "isup.run": loc.run},
        related=[
            {
                "prefect.resource.id": f"isup.sae.{sae.content_hash[:16]}",
                "prefect.resource.role": "sae",
            }
        ],
    )
    return ref


def steering_sections(ref: OutputRef, storage_options: Mapping[str, Any] | None = None) -> list:
    """The report sections of a published steering evaluation."""
    from integral_superposition.pipelines.steer_eval import steering_section

    return [steering_section(ref.uri, storage_options)]
