"""The experiment report and its markdown summary (static checks; the browser test renders them)."""

from __future__ import annotations

import base64
import html.parser
import io
import os

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import storage
from integral_superposition.pipelines import run_analysis
from integral_superposition.sae import SparseAutoencoder, save_sae
from integral_superposition.viz import ReportSection, build_report, markdown_summary
from integral_superposition.viz.figures import new_figure
from integral_superposition.viz.report import summary_tables


@pytest.fixture(scope="module")
def analysis_dir(demo_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sae = SparseAutoencoder(demo_store.d_model, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.2)
    history = pd.DataFrame(
        {"step": np.arange(20), "loss": np.linspace(3, 1, 20), "fvu": np.linspace(0.9, 0.3, 20)}
    )
    buf = io.BytesIO()
    history.to_parquet(buf)
    sae_dir = save_sae(
        sae, str(root / "sae"), extra_files={"training_history.parquet": buf.getvalue()}
    )
    out = str(root / "analysis")
    run_analysis(
        sae_dir, demo_store, out, {"reducer": "pca", "n_top": 6, "n_bands": 1, "per_band": 2}
    )
    return out, sae_dir


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attrs: list[tuple[str, list]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_report_from_analysis_and_generic_sections(analysis_dir, tmp_path):
    out, _ = analysis_dir
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    merge = ReportSection(
        "Merge results",
        text="Merged 32 latents into 16.\n\nFVU went from 0.30 to 0.34.",
        tables=[
            (
                "before / after",
                pd.DataFrame(
                    {"metric": ["fvu", "l0"], "before": [0.3, 40.0], "after": [0.34, 22.0]}
                ),
            )
        ],
        figures=[("merge matrix", fig)],
    )
    steering = ReportSection(
        "Steering",
        generations=[
            {
                "prompt": "The match",
                "baseline": "ended 2-1.",
                "steered": "<script>alert(1)</script> markets fell",
            }
        ],
    )
    uri = build_report(
        str(tmp_path / "report"), merge, steering, analysis=out, config={"preset": "smoke"}
    )
    assert storage.read_manifest(str(tmp_path / "report"), kind="report")["config"]["sections"][
        -2:
    ] == ["Merge results", "Steering"]
    page = storage.read_bytes(uri).decode()
    p = _Collect()
    p.feed(page)
    text = "".join(p.text)
    for heading in ("Configuration", "SAE", "Training curve", "Metrics", "Latent statistics", "Label enrichment",
                    "Latent map", "Top latents per label", "Merge results", "Steering"):  # fmt: skip
        assert heading in text, heading
    assert "script" not in p.tags  # the generation is text, not markup
    assert "<script>alert(1)</script> markets fell" in text
    imgs = [dict(a) for t, a in p.attrs if t == "img"]
    assert len(imgs) >= 6 and all(i["src"].startswith("data:image/png;base64,") for i in imgs)
    links = [dict(a).get("href", "") for t, a in p.attrs if t == "a"]
    pages = [h for h in links if "dashboards/latents/" in h]
    assert pages and not any("://" in h for h in pages)  # relative links between local folders
    for h in pages + [h for h in links if h.endswith("dashboards/index.html")]:
        assert os.path.exists(os.path.normpath(os.path.join(tmp_path / "report", h))), h
    assert "default-src 'none'" in page


def test_report_rejects_bad_input(analysis_dir, tmp_path):
    out, _ = analysis_dir
    with pytest.raises(FileExistsError, match="holds a 'analysis' output"):
        build_report(out, analysis=out)
    with pytest.raises(TypeError, match="ReportSection"):
        build_report(str(tmp_path / "r"), "not a section")
    with pytest.raises(ValueError, match="nothing to report"):
        build_report(str(tmp_path / "r"))
    with pytest.raises(TypeError, match="DataFrames"):
        build_report(str(tmp_path / "r"), ReportSection("x", tables=[[1, 2]]))


def test_markdown_summary_and_tables(analysis_dir):
    out, _ = analysis_dir
    tables = summary_tables(out)
    assert {"metrics", "top_latents"} <= set(tables)
    assert "explained_variance" in set(tables["metrics"]["metric"])
    extra = ReportSection(
        "Steering", tables=[pd.DataFrame({"a|b": ["x|y"]})], figures=[new_figure()]
    )
    md = markdown_summary(out, extra, figure_width=200)
    assert md.startswith("# SAE analysis summary")
    assert "## Metrics" in md and "## Top latents per label" in md and "## Steering" in md
    # the answer first: the headline table, each number with the tokens it was measured on
    assert md.index("## Results") < md.index("## Metrics")
    fvu = next(line for line in md.splitlines() if line.startswith("| SAE | FVU |"))
    assert "all tokens" in fvu  # the analysis ran on every token, training ones included
    assert "| SAE | CE loss recovered | - |" in md
    assert "a\\|b" in md and "x\\|y" in md
    pngs = [chunk.split(")")[0] for chunk in md.split("data:image/png;base64,")[1:]]
    assert len(pngs) >= 2
    from PIL import Image

    for b64 in pngs:
        assert Image.open(io.BytesIO(base64.b64decode(b64))).width <= 200


class _Cells(html.parser.HTMLParser):
    """The text of every table row: ``[[cell, ...], ...]``."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th") and self.rows:
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "tr" and self.rows:
            self.rows.append([])  # text after the row belongs to no cell

    def handle_data(self, data):
        if self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def test_missing_metrics_show_a_dash(demo_store, analysis_dir, tmp_path):
    """With the reconstruction metrics off, cos_sim, norm_ratio and EV are missing: the HTML
    report and the markdown summary show "-", never 0."""
    _, sae_dir = analysis_dir
    out = str(tmp_path / "analysis")
    run_analysis(
        sae_dir, demo_store, out,
        {"reducer": "pca", "n_top": 6, "n_bands": 0, "metrics": False, "enrichment": False},
    )  # fmt: skip
    uri = build_report(str(tmp_path / "report"), analysis=out)
    cells = _Cells()
    cells.feed(storage.read_bytes(uri).decode())
    shown = {r[0].strip(): r[1].strip() for r in cells.rows if len(r) == 2}
    for name in ("cos_sim", "norm_ratio", "explained_variance", "fvu"):
        assert shown[name] == "-", (name, shown[name])
    assert float(shown["l0"]) > 0  # present metrics keep their values
    md = markdown_summary(out)
    for name in ("cos_sim", "norm_ratio", "explained_variance"):
        assert f"| {name.replace('_', chr(92) + '_')} | - |" in md, name


def test_missing_sae_metrics_show_a_dash(tmp_path):
    sae = SparseAutoencoder(8, 16, seed=0)
    sae_dir = save_sae(
        sae, str(tmp_path / "sae"), metrics={"fvu": 0.25, "cos_sim": float("nan"), "l0": None}
    )
    page = storage.read_bytes(build_report(str(tmp_path / "report"), sae=sae_dir)).decode()
    cells = _Cells()
    cells.feed(page)
    shown = {r[0].strip(): r[1].strip() for r in cells.rows if len(r) >= 2}
    assert shown["cos_sim"] == "-" and shown["l0"] == "-" and shown["fvu"] == "0.25"
    # the headline: FVU from the SAE's evaluation, every absent number a dash
    assert shown["FVU"] == "0.2500"
    for name in ("L0 (active latents per token)", "CE loss recovered", "dead latents"):
        assert shown[name] == "-", name
    assert "NaN" not in page and "None" not in page


def test_steering_rows_say_when_the_classifier_cannot_judge(tmp_path):
    from integral_superposition.viz.headline import headline_rows

    def steering_dir(name: str, summary: dict) -> str:
        out = str(tmp_path / name)
        data = storage.canonical_json(summary).encode()
        storage.write_bytes(storage.join(out, "summary.json"), data)
        storage.write_manifest(out, "steering", {}, {"summary.json": storage.file_entry("", data)})
        return out

    lat = {"latent": 2, "label": "World", "best_share": 0.4, "random_latent": 5,
           "random_share_at_best": None, "classifier_valid": False,
           "classifier_note": "predicted for 10% of its own prompts"}  # fmt: skip
    rows = headline_rows(steering=steering_dir("one", {"latents": [lat]}))
    (row,) = [r for r in rows if r.group == "Steering"]
    assert all(r.shown == "-" for r in rows if r.group == "SAE")  # no SAE given
    assert row.shown == "0.40" and row.control_shown == "random latent 5: -"
    assert "cannot judge this label (predicted for 10% of its own prompts)" in row.detail
    broken = {"latents": [lat], "classifier": {"generations": {"can_judge": False}}}
    (row,) = [
        r for r in headline_rows(steering=steering_dir("all", broken)) if r.group == "Steering"
    ]
    assert "failed its check on unsteered generations" in row.detail
    assert "cannot judge this label" not in row.detail


def test_steering_row_shows_each_share_with_its_lift_over_unsteered(tmp_path):
    from integral_superposition.viz.headline import headline_rows

    out = str(tmp_path / "steering")
    lat = {"latent": 1980, "label": "Sports", "n": 48, "baseline_share": 0.17,
           "best_share": 0.69, "best_share_lo": 0.55, "best_share_hi": 0.80,
           "best_lift": 0.52, "best_lift_lo": 0.35, "best_lift_hi": 0.65,
           "random_latent": 3474, "random_share_at_best": 0.15,
           "random_share_at_best_lo": 0.07, "random_share_at_best_hi": 0.27,
           "random_lift_at_best": -0.02, "random_lift_at_best_lo": -0.13,
           "random_lift_at_best_hi": 0.09, "own_label_baseline_share": 0.6,
           "own_label_share_at_best": 0.77, "own_label_lift_at_best": 0.17,
           "own_label_lift_at_best_lo": 0.04, "own_label_lift_at_best_hi": 0.3,
           "classifier_valid": True}  # fmt: skip
    data = storage.canonical_json({"n_prompts": 12, "latents": [lat]}).encode()
    storage.write_bytes(storage.join(out, "summary.json"), data)
    storage.write_manifest(out, "steering", {}, {"summary.json": storage.file_entry("", data)})
    (row,) = [r for r in headline_rows(steering=out) if r.group == "Steering"]
    assert row.shown == "0.69 [0.55, 0.80]"
    assert row.control_shown == "random latent 3474: 0.15 [0.07, 0.27], lift -0.02 [-0.13, 0.09]"
    assert "unsteered 0.17, lift +0.52 [0.35, 0.65]" in row.detail
    assert "own label's prompts 0.77 against 0.60 unsteered, lift +0.17 [0.04, 0.30]" in row.detail
    assert "text judge" not in row.detail  # published without the second judge
    judged = {**lat, "best_text_share": 0.62, "random_text_share_at_best": 0.08}
    storage.write_bytes(storage.join(out, "summary.json"), storage.canonical_json(
        {"latents": [judged]}).encode())  # fmt: skip
    (row,) = [r for r in headline_rows(steering=out) if r.group == "Steering"]
    assert "; text judge 0.62 (random 0.08)" in row.detail
    older = {k: v for k, v in lat.items() if "lift" not in k}  # published before lifts
    storage.write_bytes(storage.join(out, "summary.json"), storage.canonical_json(
        {"latents": [older]}).encode())  # fmt: skip
    (row,) = [r for r in headline_rows(steering=out) if r.group == "Steering"]
    assert row.control_shown == "random latent 3474: 0.15 [0.07, 0.27]"


def test_headline_dead_latents_come_from_the_count_over_the_most_tokens():
    from types import SimpleNamespace

    from integral_superposition.viz.headline import _sae_metrics

    manifest = {
        "metrics": {"fvu": 0.06, "l0": 32.0, "dead_frac": 0.0142, "dead_tokens": 100_000,
                    "n_tokens": 9_980, "split": "test"}
    }  # fmt: skip
    analysis = SimpleNamespace(
        summary={"n_dead": 29, "n_latents": 4096, "dead_tokens": 190_052, "split": "all"}
    )
    rows = {r.result: r for r in _sae_metrics(manifest, analysis, None)}
    dead = rows["dead latents"]
    assert dead.value == f"{100 * 29 / 4096:.2f}%" and "190,052 tokens" in dead.detail
    # the SAE's own count wins when it saw more tokens, and stands alone without an analysis
    analysis.summary["dead_tokens"] = 50_000
    rows = {r.result: r for r in _sae_metrics(manifest, analysis, None)}
    assert rows["dead latents"].value == "1.42%" and "100,000" in rows["dead latents"].detail
    alone = {r.result: r for r in _sae_metrics(manifest, None, None)}
    assert alone["dead latents"].value == "1.42%"


def _steering_row(tmp_path, members: list[int], randoms: list[int], more: int = 0):
    """The headline's steering row of a published summary whose one entry steers ``members``
    (Sports, 0.8 [0.67, 0.89]) with ``randoms`` as its control (0.15 [0.07, 0.27]), and
    ``more`` further draws of random latents pooled with it."""
    from integral_superposition.viz.headline import headline_rows

    out = str(tmp_path / "steering")
    lat = {"latent": members[0], "members": members, "label": "Sports", "n": 48,
           "baseline_share": 0.1, "best_share": 0.8, "best_share_lo": 0.67,
           "best_share_hi": 0.89, "random_latent": randoms[0], "random_members": randoms,
           "random_share_at_best": 0.15, "random_share_at_best_lo": 0.07,
           "random_share_at_best_hi": 0.27, "classifier_valid": True}  # fmt: skip
    if more:
        lat["random_draws"] = [randoms] + [[r + 1 + d for r in randoms] for d in range(more)]
    data = storage.canonical_json({"n_prompts": 12, "latents": [lat]}).encode()
    storage.write_bytes(storage.join(out, "summary.json"), data)
    storage.write_manifest(out, "steering", {}, {"summary.json": storage.file_entry("", data)})
    (row,) = [r for r in headline_rows(steering=out) if r.group == "Steering"]
    return row


def test_steering_row_of_a_group_names_every_member_and_random_latent(tmp_path):
    row = _steering_row(tmp_path, [1298, 734, 2569], [12, 40, 7])
    assert "steering L1298+L734+L2569 at" in row.result
    assert row.control_shown == "random latents 12, 40, 7: 0.15 [0.07, 0.27]"


def test_steering_row_of_a_large_group_names_four_members_and_counts_them(tmp_path):
    row = _steering_row(tmp_path, list(range(100, 356)), list(range(1000, 1256)))
    assert "steering L100+L101+L102+L103+... (256 latents) at" in row.result
    assert row.control_shown == (
        "random latents 1000, 1001, 1002, 1003, ... (256 latents): 0.15 [0.07, 0.27]"
    )


def test_steering_row_of_a_pooled_random_control_says_how_many_draws(tmp_path):
    row = _steering_row(tmp_path, [1298, 734], [12, 40], more=2)
    assert row.control_shown == "random latents 12, 40 and 2 more draws: 0.15 [0.07, 0.27]"
    one = _steering_row(tmp_path / "one", [1298], [12], more=1)
    assert one.control_shown == "random latent 12 and 1 more draw: 0.15 [0.07, 0.27]"
