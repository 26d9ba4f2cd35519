"""The experiment report of a run: one page per SAE (the first with every SAE's metrics),
the merge and steering sections, and the enrichment / probe summary tables.

Its inputs are references to published outputs: anything with ``kind``, ``name`` (the SAE
an output belongs to), ``uri`` and a ``summary`` dict (the flows pass their ``OutputRef``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pandas as pd

from integral_superposition import storage
from integral_superposition.outputs import parquet_bytes, read_output
from integral_superposition.viz.section import ReportSection

__all__ = [
    "Published",
    "build_experiment_report",
    "check_same_activations",
    "merge_section",
    "report_sections",
    "report_summary",
    "write_summary_tables",
]


class Published(Protocol):
    """A reference to a published output folder."""

    kind: str
    name: str
    uri: str
    summary: dict[str, Any]


def _by_name(refs: Sequence[Published] | None) -> dict[str, Published]:
    return {r.name: r for r in refs or []}


def merge_section(ref: Published, storage_options: Mapping[str, Any] | None) -> ReportSection:
    """The evaluation (original vs merged), the K' sweep and its figure of a published merge."""
    out = read_output(ref.uri, storage_options)
    tables = []
    if out.has("merge_eval.parquet"):
        tables.append(
            (
                "original, original with a refit decoder and merged SAE (held-out tokens)",
                out.parquet("merge_eval.parquet"),
            )
        )
    if out.has("merge_sweep.parquet"):
        tables.append(
            ("sweep over K' with a random-partition control", out.parquet("merge_sweep.parquet"))
        )
    figures = []
    if out.has("merge_sweep.png"):
        figures.append(("FVU and CE recovered against K'", out.read("merge_sweep.png")))
    before, after = ref.summary.get("n_latents_before"), ref.summary.get("n_latents_after")
    tuned = (out.manifest.get("merge") or {}).get("finetune")
    how = (
        f", flattened to a plain SAE and fine-tuned for {tuned['finetune_epochs']:g} "
        f"epoch{'' if tuned['finetune_epochs'] == 1 else 's'} "
        f"({tuned['finetune_steps']} steps; so are the sweep's merges and random controls)"
        if tuned
        else ""
    )
    return ReportSection(
        f"Merge ({ref.name})",
        text=f"{before} latents merged into {after}{how}; the merged SAE is at {ref.uri}.",
        tables=tables,
        figures=figures,
        anchor=f"merge-{ref.name}",
    )


def report_sections(
    name: str,
    merges: Sequence[Published],
    steering: Sequence[Published],
    storage_options: Mapping[str, Any] | None,
) -> list[ReportSection]:
    """The merge and steering sections of SAE ``name``'s report."""
    from integral_superposition.pipelines.steer_eval import steering_section

    sections = []
    merge_of, steer_of = _by_name(merges), _by_name(steering)
    if name in merge_of:
        sections.append(merge_section(merge_of[name], storage_options))
    if name in steer_of:
        sections.append(steering_section(steer_of[name].uri, storage_options))
    return sections


def write_summary_tables(
    analyses: Sequence[Published], stem_uri: str, storage_options: Mapping[str, Any] | None
) -> str | None:
    """The enrichment tables of every analysis, one ``sae`` column added, as ``stem.csv`` and
    ``stem.parquet`` (and the sparse probes as ``stem_probe.*``); returns the CSV's URI (None
    when no analysis has an enrichment table).

    ``stem.tables.json`` records the files written (size and SHA-256): a file of one of these
    names is replaced only when that record lists it unchanged; any other (a user's
    ``results.csv``) is a :class:`FileExistsError`, raised before anything is written."""
    from integral_superposition.analysis.result import load_analysis

    frames, probes = [], []
    for a in analyses:
        result = load_analysis(a.uri, storage_options)
        enr = result.enrichment
        if enr is not None and len(enr):
            frames.append(enr.assign(sae=a.name))
        probe = result.table("probe")
        if probe is not None and len(probe):
            probes.append(probe.assign(sae=a.name))
    tables: dict[str, bytes] = {}
    for suffix, parts in (("", frames), ("_probe", probes)):  # probes: e.g. results_probe.csv
        if parts:
            df = pd.concat(parts, ignore_index=True)
            tables[suffix + ".csv"] = df.to_csv(index=False).encode("utf-8")
            tables[suffix + ".parquet"] = parquet_bytes(df)
    if tables:
        _publish_tables(stem_uri, tables, storage_options)
    return stem_uri + ".csv" if frames else None


TABLES_RECORD = ".tables.json"
"""Suffix of the record :func:`write_summary_tables` keeps beside its tables."""


def _publish_tables(stem_uri: str, tables: Mapping[str, bytes], storage_options) -> None:
    """Write ``stem_uri + suffix`` for each ``{suffix: bytes}``, replacing only files the
    record lists unchanged (a crash leaves them listed as pending: still ours)."""
    record_uri = stem_uri + TABLES_RECORD
    listed: dict[str, Any] = {}
    if storage.exists(record_uri, storage_options):
        try:
            found = storage.read_json(record_uri, storage_options)
        except (ValueError, UnicodeDecodeError):
            found = None
        if not isinstance(found, dict) or not isinstance(found.get("files"), dict):
            raise FileExistsError(
                f"stem_uri={stem_uri!r}: {record_uri!r} is not a record of summary tables this "
                "project wrote; choose another stem (nothing was changed)"
            )
        listed = found["files"]

    def ours(suffix: str) -> bool:
        uri = stem_uri + suffix
        if suffix not in listed:
            return False
        entry = listed[suffix]
        return entry is None or storage.file_entry(uri, None, storage_options) == {
            "size": entry.get("size"),
            "sha256": entry.get("sha256"),
        }

    for suffix in tables:
        if storage.exists(stem_uri + suffix, storage_options) and not ours(suffix):
            raise FileExistsError(
                f"stem_uri={stem_uri!r}: {stem_uri + suffix!r} exists and is not a summary "
                "table this project wrote (or it was changed since): refusing to replace it; "
                "choose another stem (nothing was changed)"
            )
    pending = {**listed, **dict.fromkeys(tables)}
    storage.write_json(record_uri, {"files": pending}, storage_options)
    for suffix, data in tables.items():
        storage.write_bytes(stem_uri + suffix, data, storage_options)
    for suffix in [s for s in listed if s not in tables]:  # an earlier table not written now
        if storage.exists(stem_uri + suffix, storage_options) and ours(suffix):
            storage.remove(stem_uri + suffix, storage_options)
    entries = {suffix: storage.file_entry("", data) for suffix, data in tables.items()}
    storage.write_json(record_uri, {"files": entries}, storage_options)


def _activation_hash(manifest: Mapping[str, Any]) -> str | None:
    """The content hash of the activations an output was computed on (or trained on)."""
    acts = manifest.get("activations")
    if isinstance(acts, dict) and acts.get("content_hash"):
        return str(acts["content_hash"])
    found = manifest.get("activation_manifest_hash")
    return str(found) if found else None


def check_same_activations(
    saes: Sequence[Published],
    outputs: Sequence[Published],
    storage_options: Mapping[str, Any] | None,
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


def build_experiment_report(
    report_dir: str,
    saes: Sequence[Published],
    analyses: Sequence[Published] = (),
    merges: Sequence[Published] = (),
    steering: Sequence[Published] = (),
    *,
    title: str,
    config: Mapping[str, Any] | None = None,
    top_per_label: int = 10,
    summary_stem: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report_dir/report.html`` for the first SAE (with every SAE's metrics, its merge
    and steering sections) and, for a sweep, one report per further SAE under
    ``report_dir/saes/<name>/``; with ``summary_stem``, the summary tables
    (:func:`write_summary_tables`). Returns ``{"page", "pages": {sae: page}, "summary_csv"}``.

    Outputs computed on other activations than their SAE was trained on are refused before
    anything is written (:func:`check_same_activations`)."""
    from integral_superposition.viz.report import build_report

    if not saes:
        raise ValueError("saes is empty: the report needs at least one trained SAE")
    check_same_activations(saes, [*analyses, *merges, *steering], storage_options)
    analysis_of, merge_of, steer_of = _by_name(analyses), _by_name(merges), _by_name(steering)
    extra_dirs = {s.name: storage.join(report_dir, "saes", s.name) for s in saes[1:]}
    links = {name: f"saes/{name}/report.html" for name in extra_dirs}
    pages = {}
    for i, sae in enumerate(saes):
        sections = report_sections(sae.name, merges, steering, storage_options)
        pages[sae.name] = build_report(
            report_dir if i == 0 else extra_dirs[sae.name],
            *sections,
            title=title if i == 0 else f"{title}: {sae.name}",
            analysis=analysis_of[sae.name].uri if sae.name in analysis_of else None,
            sae=sae.uri,
            merge=merge_of[sae.name].uri if sae.name in merge_of else None,
            steering=steer_of[sae.name].uri if sae.name in steer_of else None,
            sweep=[
                {
                    "name": s.name,
                    "sae": s.uri,
                    "analysis": analysis_of[s.name].uri if s.name in analysis_of else None,
                    "merge": merge_of[s.name].uri if s.name in merge_of else None,
                    "href": links.get(s.name),
                }
                for s in saes
            ]
            if i == 0 and len(saes) > 1
            else (),
            config=config,
            top_per_label=top_per_label,
            storage_options=storage_options,
        )
    csv_uri = (
        write_summary_tables(analyses, summary_stem, storage_options)
        if analyses and summary_stem
        else None
    )
    return {"page": pages[saes[0].name], "pages": pages, "summary_csv": csv_uri}


def report_summary(
    saes: Sequence[Published],
    analyses: Sequence[Published] = (),
    merges: Sequence[Published] = (),
    steering: Sequence[Published] = (),
    *,
    title: str,
    top_per_label: int = 5,
    figure_width: int = 480,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[str, pd.DataFrame | None]:
    """The markdown summary of the first SAE's report (small PNGs, top latents, merge and
    steering sections) and its metrics table (None without an analysis)."""
    from integral_superposition.viz.report import markdown_summary, summary_tables

    primary = saes[0]
    analysis_of = _by_name(analyses)
    analysis = analysis_of[primary.name].uri if primary.name in analysis_of else None
    md = markdown_summary(
        analysis,
        *report_sections(primary.name, merges, steering, storage_options),
        title=title,
        top_per_label=top_per_label,
        figure_width=figure_width,
        storage_options=storage_options,
        sae=primary.uri,
        merge=next((m.uri for m in merges if m.name == primary.name), None),
        steering=next((r.uri for r in steering if r.name == primary.name), None),
    )
    metrics = (
        summary_tables(analysis, storage_options=storage_options)["metrics"]
        if analysis is not None
        else None
    )
    return md, metrics
