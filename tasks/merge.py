"""The merge task: cluster redundant latents, build and refit the merged SAE, evaluate it."""

from __future__ import annotations

from integral_superposition.merge.params import MergeParams
from integral_superposition.tasks.backends import run_sae_step
from integral_superposition.tasks.policy import TASK_DEFAULTS, output_cache
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.ui import event, table
from prefect import task


@task(
    name="merge-sae",
    **{
        **TASK_DEFAULTS,
        "cache_policy": output_cache(
            "integral_superposition.pipelines.merge", "integral_superposition.backends"
        ),
    },
)
def merge_sae(
    sae: OutputRef,
    store: OutputRef,
    params: MergeParams,
    loc: RunLocation,
    model: ModelRef | None = None,
    out: str = "merge",
    gpu_limit: str | None = "gpu",
    allow_other_store: bool = False,
) -> OutputRef:
    """Merge ``sae``'s latents into ``{run}/{out}/{sae.name}`` (a loadable SAE folder with its
    merge map and evaluation); ``model`` enables the spliced CE / KL metrics. Cached on the
    SAE's and the store's content hashes and ``params``."""
    from integral_superposition.pipelines.merge import run_merge

    out_uri = loc.uri(out, sae.name)
    manifest = run_sae_step(
        run_merge, "merge", sae, store, params, loc, out_uri, model, gpu_limit,
        allow_other_store=allow_other_store,
    )  # fmt: skip
    info = manifest.get("merge", {})
    rows = [
        {"sae": "original", **info.get("original_metrics", {})},
        {"sae": "merged", **info.get("merged_metrics", {})},
    ]
    ref = OutputRef.from_manifest(
        "merge", sae.name, out_uri, manifest,
        n_latents_before=info.get("n_latents_before"), n_latents_after=info.get("n_latents_after"),
        original=info.get("original_metrics", {}), merged=info.get("merged_metrics", {}),
    )  # fmt: skip
    table(f"merge-{sae.name}", rows, f"{sae.name}: original vs merged SAE on held-out tokens")
    if info.get("sweep"):
        table(f"merge-sweep-{sae.name}", info["sweep"], f"{sae.name}: merge sweep over K'")
    event(
        "isup.merge.completed",
        f"isup.merge.{ref.content_hash[:16]}",
        {
            "uri": out_uri,
            "sae_uri": sae.uri,
            "store_uri": store.uri,
            **ref.summary,
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
