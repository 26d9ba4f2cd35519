"""The report runner without Prefect: one page per SAE, the merge section, the summary tables,
the markdown summary, and refusals before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest
from integral_superposition import storage
from integral_superposition.outputs import OutputWriter
from integral_superposition.pipelines import run_analysis
from integral_superposition.pipelines.report import (
    build_experiment_report,
    merge_section,
    report_summary,
)
from integral_superposition.sae import SparseAutoencoder, save_sae


@dataclass
class Ref:
    kind: str
    name: str
    uri: str
    summary: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def run(demo_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    saes = []
    for i, name in enumerate(("a", "b")):
        uri = save_sae(
            SparseAutoencoder(demo_store.d_model, 16, seed=i),
            str(root / "sae" / name),
            activation_manifest_hash=demo_store.content_hash,
        )
        saes.append(Ref("sae", name, uri, {"d_sae": 16, "metrics": {"fvu": 0.5 + i}}))
    analysis = str(root / "analysis" / "a")
    run_analysis(
        saes[0].uri,
        demo_store,
        analysis,
        {"reducer": "pca", "n_top": 4, "n_bands": 0, "dashboards": "none", "probe": False},
    )
    merge = str(root / "merge" / "a")
    with OutputWriter(merge, "sae") as out:
        out.parquet(
            "merge_eval.parquet", pd.DataFrame({"sae": ["original", "merged"], "fvu": [0.5, 0.6]})
        )
        out.publish(None, activation_manifest_hash=demo_store.content_hash)
    refs = {
        "saes": saes,
        "analyses": [Ref("analysis", "a", analysis)],
        "merges": [Ref("merge", "a", merge, {"n_latents_before": 16, "n_latents_after": 8})],
    }
    return root, refs


def test_report_pages_sections_and_summary_tables(run):
    root, refs = run
    built = build_experiment_report(
        str(root / "report"),
        refs["saes"],
        refs["analyses"],
        refs["merges"],
        title="exp / run",
        config={"name": "exp"},
        summary_stem=str(root / "results"),
    )
    assert built["page"] == storage.join(str(root / "report"), "report.html")
    assert set(built["pages"]) == {"a", "b"}
    first = (root / "report" / "report.html").read_text()
    assert (
        "saes/b/report.html" in first
        and "Merge (a)" in first
        and "16 latents merged into 8" in first
    )
    second = (root / "report" / "saes" / "b" / "report.html").read_text()
    assert "exp / run: b" in second and "Merge (a)" not in second
    assert storage.read_manifest(str(root / "report"))["kind"] == "report"
    assert built["summary_csv"] == str(root / "results") + ".csv"
    table = pd.read_csv(built["summary_csv"])
    assert len(table) and set(table["sae"]) == {"a"}
    back = pd.read_parquet(str(root / "results.parquet"))
    assert len(back) == len(table) and list(back.columns) == list(table.columns)

    md, metrics = report_summary(refs["saes"], refs["analyses"], refs["merges"], title="exp / run")
    assert "exp / run" in md and "Merge (a)" in md
    assert isinstance(metrics, pd.DataFrame) and len(metrics)


def test_merge_section_reads_the_published_tables(run):
    _, refs = run
    section = merge_section(refs["merges"][0], None)
    assert section.title == "Merge (a)"
    ((caption, df),) = section.tables
    assert caption.startswith("original, original with a refit decoder and merged")
    assert list(df["sae"]) == ["original", "merged"]


def test_report_refusals_write_nothing(run, tmp_path):
    _, refs = run
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="saes is empty"):
        build_experiment_report(str(out), [], title="t")
    other = str(tmp_path / "analysis")
    storage.write_manifest(other, "analysis", {}, {}, activations={"content_hash": "f" * 64})
    with pytest.raises(ValueError, match=r"analysis output .* on activations ffffffffffffffff"):
        build_experiment_report(str(out), refs["saes"], [Ref("analysis", "a", other)], title="t")
    assert not out.exists()


def test_summary_tables_never_replace_a_users_file(run, tmp_path):
    """A user's results.csv is refused before anything is written; the tables of an earlier
    report are replaced (they are recorded in results.tables.json), unless changed since."""
    from integral_superposition.pipelines.report import write_summary_tables

    _root, refs = run
    stem = tmp_path / "results"
    (tmp_path / "results.csv").write_text("mine,1\n")
    with pytest.raises(FileExistsError, match=r"results\.csv' exists and is not a summary table"):
        write_summary_tables(refs["analyses"], str(stem), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    (tmp_path / "results.csv").unlink()
    write_summary_tables(refs["analyses"], str(stem), None)
    first = (tmp_path / "results.parquet").read_bytes()
    assert write_summary_tables(refs["analyses"], str(stem), None) == str(stem) + ".csv"
    assert (tmp_path / "results.parquet").read_bytes() == first  # our own: replaced
    (tmp_path / "results.parquet").write_bytes(b"edited by hand")
    with pytest.raises(FileExistsError, match=r"results\.parquet' exists"):
        write_summary_tables(refs["analyses"], str(stem), None)
    assert (tmp_path / "results.parquet").read_bytes() == b"edited by hand"
