"""The report task: the HTML experiment report, the enrichment summary table, and the Prefect
summary (markdown with small PNGs, a link to the HTML report, a metrics table)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from integral_superposition import storage
from integral_superposition.experiment import ReportOptions
from integral_superposition.pipelines import report
from integral_superposition.tasks.policy import TASK_DEFAULTS, output_cache
from integral_superposition.tasks.refs import OutputRef, RunLocation
from integral_superposition.tasks.ui import (
    event,
    link,
    markdown,
    record_step_seconds,
    run_logger,
    table,
)
from prefect import task


@task(
    name="build-report",
    **{
        **TASK_DEFAULTS,
        "cache_policy": output_cache("integral_superposition.pipelines.report"),
    },
)
def build_experiment_report(
    config: dict[str, Any],
    saes: list[OutputRef],
    analyses: list[OutputRef],
    merges: list[OutputRef],
    steering: list[OutputRef],
    options: ReportOptions,
    loc: RunLocation,
    out: str = "report",
    summary_csv: str = "results.csv",
) -> OutputRef:
    """Write ``{run}/{out}/report.html`` for the first SAE (with every SAE's metrics, the
    merge and steering results) and, for a sweep, one report per further SAE under
    ``{run}/{out}/saes/<name>/``, and emit ``isup.report.published``. The flow publishes the
    summary artifacts (:func:`publish_report_summary`), so a cached report gets them too."""
    stem = summary_csv[: -len(".csv")] if summary_csv.endswith(".csv") else summary_csv
    t0 = time.perf_counter()
    built = report.build_experiment_report(
        loc.uri(out), saes, analyses, merges, steering,
        title=options.title or f"{loc.experiment} / {loc.run}",
        config=config,
        top_per_label=options.top_per_label,
        summary_stem=loc.uri(stem),
        storage_options=loc.storage_options,
    )  # fmt: skip
    page = built["page"]
    url = storage.browser_url(page, loc.storage_options)
    record_step_seconds(time.perf_counter() - t0)
    ref = OutputRef.read("report", out, loc.uri(out), loc.storage_options)
    ref = ref.model_copy(update={"summary": {**built, "url": url}})
    event(
        "isup.report.published",
        f"isup.report.{ref.content_hash[:16]}",
        {"uri": page, "url": url, "saes": [s.uri for s in saes], **loc.storage_settings()},
        labels={"prefect.resource.name": f"{loc.experiment}/{loc.run}", "isup.run": loc.run},
    )
    return ref


def publish_report_summary(
    ref: OutputRef,
    saes: Sequence[OutputRef],
    analyses: Sequence[OutputRef],
    merges: Sequence[OutputRef],
    steering: Sequence[OutputRef],
    options: ReportOptions,
    loc: RunLocation,
) -> None:
    """The Prefect UI's view of a report: the markdown summary (small PNGs, a link to the
    HTML report), a link artifact and the metrics table. Called by the flow after the report
    task, whether that ran or was cached (a cached report names an earlier run's page)."""
    if not saes:
        return
    report.check_same_activations(saes, [*analyses, *merges, *steering], loc.storage_options)
    title = options.title or f"{loc.experiment} / {loc.run}"
    page = ref.summary.get("page") or storage.join(ref.uri, "report.html")
    url = storage.browser_url(page, loc.storage_options)
    head = f"**[Open the HTML report]({url})** (`{page}`)\n\n"
    if not ref.uri.startswith(loc.root + "/"):
        head += f"The report is reused unchanged from an earlier run: `{ref.uri}`.\n\n"
    try:
        md, metrics = report.report_summary(
            saes, analyses, merges, steering,
            title=title,
            top_per_label=min(options.top_per_label, 5),
            figure_width=options.figure_width,
            storage_options=loc.storage_options,
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as e:  # the UI summary never fails the run
        run_logger().warning("report summary not built: %s: %s", type(e).__name__, e)
        md, metrics = "", None
    markdown("experiment-summary", head + md, f"Summary of {title}")
    link("experiment-report", url, "HTML report", f"Report of {title}")
    if metrics is not None:
        table("experiment-metrics", metrics, f"Metrics of {saes[0].name}")
