"""The report task: the HTML experiment report, the enrichment summary table, and the Prefect
summary (markdown with small PNGs, a link to the HTML report, a metrics table)."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

from integral_superposition import storage
from integral_superposition.experiment import ReportOptions
from integral_superposition.tasks.dump import TASK_DEFAULTS
from integral_superposition.tasks.policy import output_cache
from integral_superposition.tasks.refs import OutputRef, RunLocation
from integral_superposition.tasks.ui import (
    browser_url,
    event,
    link,
    markdown,
    record_step_seconds,
    run_logger,
    table,
)
from prefect import task


def _by_name(refs: Sequence[OutputRef] | None) -> dict[str, OutputRef]:
    return {r.name: r for r in refs or []}


def _saes_section(saes: Sequence[OutputRef], links: dict[str, str]):
    import pandas as pd
    from integral_superposition.viz.report import ReportSection

    rows = []
    for s in saes:
        row: dict[str, Any] = {
            "sae": s.name,
            "hook point": s.summary.get("hook_point"),
            "architecture": s.summary.get("architecture"),
            "latents": s.summary.get("d_sae"),
        }
        row.update(
            {
                k: v
                for k, v in (s.summary.get("metrics") or {}).items()
                if not isinstance(v, dict | list)
            }
        )
        rows.append(row)
    text = ""
    if links:
        text = "Each SAE of the sweep has its own report: " + ", ".join(
            f"{name}: {href}" for name, href in links.items()
        )
    return ReportSection(
        "SAEs", text=text, tables=[("held-out metrics", pd.DataFrame(rows))], anchor="saes"
    )


def _merge_section(ref: OutputRef, storage_options):
    import pandas as pd
    from integral_superposition.viz.report import ReportSection

    manifest = storage.read_manifest(ref.uri, storage_options)
    files = manifest.get("files", {})
    tables = []
    if "merge_eval.parquet" in files:
        data = storage.read_bytes(storage.join(ref.uri, "merge_eval.parquet"), storage_options)
        tables.append(
            ("original vs merged SAE (held-out tokens)", pd.read_parquet(io.BytesIO(data)))
        )
    if "merge_sweep.parquet" in files:
        data = storage.read_bytes(storage.join(ref.uri, "merge_sweep.parquet"), storage_options)
        tables.append(
            ("sweep over K' with a random-partition control", pd.read_parquet(io.BytesIO(data)))
        )
    figures = []
    if "merge_sweep.png" in files:
        figures.append(
            (
                "FVU and CE recovered against K'",
                storage.read_bytes(storage.join(ref.uri, "merge_sweep.png"), storage_options),
            )
        )
    before, after = ref.summary.get("n_latents_before"), ref.summary.get("n_latents_after")
    return ReportSection(
        f"Merge ({ref.name})",
        text=f"{before} latents merged into {after}; the merged SAE is at {ref.uri}.",
        tables=tables,
        figures=figures,
        anchor=f"merge-{ref.name}",
    )


def _write_summary_table(
    analyses: Sequence[OutputRef], loc: RunLocation, csv_path: str
) -> str | None:
    """The enrichment tables of every analysis, one ``sae`` column added, as CSV + Parquet."""
    import pandas as pd
    from integral_superposition.analysis.result import load_analysis

    frames, probes = [], []
    for a in analyses:
        result = load_analysis(a.uri, loc.storage_options)
        enr = result.enrichment
        if enr is not None and len(enr):
            frames.append(enr.assign(sae=a.name))
        probe = result.table("probe")
        if probe is not None and len(probe):
            probes.append(probe.assign(sae=a.name))
    stem = csv_path[: -len(".csv")] if csv_path.endswith(".csv") else csv_path
    if probes:  # the sparse probes of every SAE, side by side (e.g. results_probe.csv)
        _write_csv_parquet(pd.concat(probes, ignore_index=True), loc, stem + "_probe")
    if not frames:
        return None
    return _write_csv_parquet(pd.concat(frames, ignore_index=True), loc, stem)


def _write_csv_parquet(df, loc: RunLocation, stem: str) -> str:
    """``stem.csv`` and ``stem.parquet`` under the run root; returns the CSV's URI."""
    csv_uri = loc.uri(stem + ".csv")
    storage.write_bytes(csv_uri, df.to_csv(index=False).encode("utf-8"), loc.storage_options)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(loc.uri(stem + ".parquet"), buf.getvalue(), loc.storage_options)
    return csv_uri


def _sections(
    name: str, merge_of: dict[str, OutputRef], steer_of: dict[str, OutputRef], loc: RunLocation
) -> list:
    """The merge and steering sections of one SAE's report."""
    out_sections = []
    if name in merge_of:
        out_sections.append(_merge_section(merge_of[name], loc.storage_options))
    if name in steer_of:
        from integral_superposition.tasks.steer import steering_sections

        out_sections += steering_sections(steer_of[name], loc.storage_options)
    return out_sections


def _activation_hash(manifest: dict[str, Any]) -> str | None:
    """The content hash of the activations an output was computed on (or trained on)."""
    acts = manifest.get("activations")
    if isinstance(acts, dict) and acts.get("content_hash"):
        return str(acts["content_hash"])
    found = manifest.get("activation_manifest_hash")
    return str(found) if found else None


def check_same_activations(
    saes: Sequence[OutputRef], outputs: Sequence[OutputRef], storage_options: Any
) -> None:
    """Refuse to report outputs computed on other activations than their SAE was trained on
    (a dump replaced under a trained SAE): a ``ValueError`` names the output and both hashes."""
    by_name = {}
    for s in saes:
        by_name[s.name] = _activation_hash(storage.read_manifest(s.uri, storage_options))
    for ref in outputs:
        expected = by_name.get(ref.name)
        got = _activation_hash(storage.read_manifest(ref.uri, storage_options))
        if expected and got and got != expected:
            raise ValueError(
                f"the {ref.kind} output {ref.uri!r} was computed on activations {got[:16]}, but "
                f"the SAE {ref.name!r} was trained on activations {expected[:16]}: the run mixes "
                "outputs of different dumps; rerun that step on the SAE's store"
            )


@task(
    name="build-report",
    **{
        **TASK_DEFAULTS,
        "cache_policy": output_cache(
            "integral_superposition.viz.report",
            "integral_superposition.analysis.result",
            "integral_superposition.steering.evaluate",
        ),
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
    from integral_superposition.viz.report import build_report

    if not saes:
        raise ValueError("saes is empty: the report needs at least one trained SAE")
    check_same_activations(saes, [*analyses, *merges, *steering], loc.storage_options)
    title = options.title or f"{loc.experiment} / {loc.run}"
    analysis_of, merge_of, steer_of = _by_name(analyses), _by_name(merges), _by_name(steering)
    report_dir = loc.uri(out)
    extra_dirs = {s.name: storage.join(report_dir, "saes", s.name) for s in saes[1:]}
    links = {name: f"saes/{name}/report.html" for name in extra_dirs}

    def sections_for(name: str) -> list:
        return _sections(name, merge_of, steer_of, loc)

    page_uris = {}
    t0 = time.perf_counter()
    for sae in saes:
        target = report_dir if sae is saes[0] else extra_dirs[sae.name]
        sections = sections_for(sae.name)
        if sae is saes[0] and len(saes) > 1:
            sections.insert(0, _saes_section(saes, links))
        page_uris[sae.name] = build_report(
            target,
            *sections,
            title=title if sae is saes[0] else f"{title}: {sae.name}",
            analysis=analysis_of[sae.name].uri if sae.name in analysis_of else None,
            sae=sae.uri,
            config=config,
            top_per_label=options.top_per_label,
            storage_options=loc.storage_options,
        )
    csv_uri = _write_summary_table(analyses, loc, summary_csv) if analyses else None

    page = page_uris[saes[0].name]
    url = browser_url(page, loc.storage_options)
    record_step_seconds(time.perf_counter() - t0)
    ref = OutputRef.read("report", out, report_dir, loc.storage_options)
    ref = ref.model_copy(
        update={"summary": {"page": page, "pages": page_uris, "url": url, "summary_csv": csv_uri}}
    )
    event(
        "isup.report.published",
        f"isup.report.{ref.content_hash[:16]}",
        {"uri": page, "url": url, "saes": [s.uri for s in saes], **loc.storage_settings()},
        labels={"prefect.resource.name": f"{loc.experiment}/{loc.run}", "isup.run": loc.run},
    )
    return ref


def publish_report_summary(
    report: OutputRef,
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
    from integral_superposition.viz.report import markdown_summary, summary_tables

    if not saes:
        return
    check_same_activations(saes, [*analyses, *merges, *steering], loc.storage_options)
    title = options.title or f"{loc.experiment} / {loc.run}"
    primary = saes[0]
    analysis_of = _by_name(analyses)
    page = report.summary.get("page") or storage.join(report.uri, "report.html")
    url = browser_url(page, loc.storage_options)
    head = f"**[Open the HTML report]({url})** (`{page}`)\n\n"
    if not report.uri.startswith(loc.root + "/"):
        head += f"The report is reused unchanged from an earlier run: `{report.uri}`.\n\n"
    try:
        md = markdown_summary(
            analysis_of[primary.name].uri if primary.name in analysis_of else None,
            *_sections(primary.name, _by_name(merges), _by_name(steering), loc),
            title=title,
            top_per_label=min(options.top_per_label, 5),
            figure_width=options.figure_width,
            storage_options=loc.storage_options,
        )
        metrics = None
        if primary.name in analysis_of:
            t = summary_tables(analysis_of[primary.name].uri, storage_options=loc.storage_options)
            metrics = t["metrics"]
    except (OSError, ValueError, KeyError) as e:  # the UI summary never fails the run
        run_logger().warning("report summary not built: %s: %s", type(e).__name__, e)
        md, metrics = "", None
    markdown("experiment-summary", head + md, f"Summary of {title}")
    link("experiment-report", url, "HTML report", f"Report of {title}")
    if metrics is not None:
        table("experiment-metrics", metrics, f"Metrics of {primary.name}")
