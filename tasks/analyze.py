"""The analysis task: statistics, enrichment, maps and dashboards of one SAE's latents."""

from __future__ import annotations

from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.tasks.backends import run_sae_step
from integral_superposition.tasks.policy import TASK_DEFAULTS, output_cache
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.ui import event, table
from prefect import task


@task(
    name="analyze-sae",
    **{
        **TASK_DEFAULTS,
        "cache_policy": output_cache(
            "integral_superposition.pipelines.analyze",
            "integral_superposition.analysis.result",
            "integral_superposition.viz.report",
            "integral_superposition.backends",
        ),
    },
)
def analyze_sae(
    sae: OutputRef,
    store: OutputRef,
    params: AnalysisParams,
    loc: RunLocation,
    model: ModelRef | None = None,
    out: str = "analysis",
    gpu_limit: str | None = "gpu",
    allow_other_store: bool = False,
) -> OutputRef:
    """Analyse ``sae`` on ``store`` into ``{run}/{out}/{sae.name}``; ``model`` adds the logit
    lens. Cached on the SAE's and the store's content hashes and ``params``."""
    from integral_superposition.analysis.result import load_analysis
    from integral_superposition.pipelines.analyze import run_analysis
    from integral_superposition.viz.report import summary_tables

    out_uri = loc.uri(out, sae.name)
    manifest = run_sae_step(
        run_analysis, "analyze", sae, store, params, loc, out_uri, model, gpu_limit,
        allow_other_store=allow_other_store,
    )  # fmt: skip
    summary = manifest.get("summary", {})
    ref = OutputRef.from_manifest("analysis", sae.name, out_uri, manifest, **summary)
    tables = summary_tables(load_analysis(out_uri, loc.storage_options))
    table(f"analysis-metrics-{sae.name}", tables["metrics"], f"Latent statistics of {sae.name}")
    if "top_latents" in tables:
        table(
            f"top-latents-{sae.name}",
            tables["top_latents"].head(50),
            f"Most enriched latents per label of {sae.name}",
        )
    event(
        "isup.analysis.completed",
        f"isup.analysis.{ref.content_hash[:16]}",
        {
            "uri": out_uri,
            "sae_uri": sae.uri,
            "store_uri": store.uri,
            "summary": summary,
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
