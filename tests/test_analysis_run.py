"""run_analysis end to end on a tiny dump: outputs, manifest, label overrides, bad input."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import storage
from integral_superposition.analysis import AnalysisParams, load_analysis
from integral_superposition.pipelines import run_analysis
from integral_superposition.sae import SparseAutoencoder, save_sae

# one probe C: cross-validating C is tested in test_analysis_probe
FAST = {
    "reducer": "pca",
    "n_top": 8,
    "n_bands": 2,
    "per_band": 2,
    "hist_bins": 32,
    "probe_cs": [1.0],
}


@pytest.fixture(scope="module")
def sae_dir(demo_store, tmp_path_factory):
    sae = SparseAutoencoder(demo_store.d_model, 48, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.2)
        sae.b_enc[7] = -1e4  # a dead latent
    return save_sae(sae, str(tmp_path_factory.mktemp("sae") / "sae"))


def test_run_analysis_publishes_everything(demo_store, sae_dir, tiny_backend, tmp_path):
    out = str(tmp_path / "analysis")
    calls = []
    m = run_analysis(sae_dir, demo_store.uris[0], out, AnalysisParams(**FAST), backend=tiny_backend,
                     on_progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    assert m["kind"] == "analysis" and storage.verify_output(out, deep=True)
    assert m["activations"]["content_hash"] == demo_store.content_hash
    assert m["sae"]["content_hash"] is not None and m["config"]["n_top"] == 8
    files = set(m["files"])
    for name in ("summary.json", "tables/latents.parquet", "tables/enrichment.parquet", "tables/examples.parquet",
                 "tables/neighbours.parquet", "tables/logit_lens.parquet", "figures/latent_map.png",
                 "figures/latent_map.svg", "figures/enrichment_heatmap.png", "figures/density_hist.svg",
                 "dashboards/index.html", "dashboards/latents/00000.html"):  # fmt: skip
        assert name in files, name
    assert sum(f.startswith("dashboards/latents/") for f in files) == 48
    done = [d for d, _ in calls]
    assert done and done[-1] == calls[-1][1] and done == sorted(done)
    a = load_analysis(out)
    lat = a.latents
    assert len(lat) == 48 and bool(lat.loc[7, "dead"]) and a.summary["dead_latents"] == [7]
    assert {"x", "y", "best_label", "q", "top_tokens", "promoted_tokens", "doc_best_label"} <= set(
        lat.columns
    )
    enr = a.enrichment
    assert set(enr["level"].astype(str)) == {"token", "document"} and len(enr) == 2 * 48 * 8
    ex = a.table("examples")
    assert (ex.groupby("latent").size() <= 8 + 2 * 2).all() and 7 not in set(ex["latent"])
    assert a.summary["metrics"]["n_tokens"] == demo_store.n_tokens
    assert a.figure("latent_map")[:8] == b"\x89PNG\r\n\x1a\n"
    probe = a.table("probe")
    assert "tables/probe.parquet" in files and set(probe["method"]) == {"sae", "random", "dense"}
    assert set(probe.loc[probe.method == "sae", "k"]) == {1, 2, 5, 10, 20}
    assert probe["accuracy"].between(0, 1).all() and (probe["n_test"] > 0).all()
    # each label's task is class-balanced within the held-out documents
    assert (probe["n_test"] <= a.summary["probe"]["n_test_docs"]).all()
    assert (probe["n_test"] == 2 * probe["n_test_pos"]).all()
    best = a.summary["best_latents"]
    assert lat["generic"].dtype == bool and set(best) == set(a.summary["labels"])
    assert not any(lat.loc[j, "generic"] for j in best.values() if j is not None)
    assert a.summary["generic_latents"] == lat.index[lat["generic"]].tolist()
    ctrl = a.control
    assert set(ctrl["level"]) == {"token", "document"} and set(ctrl["seed"]) == {0, 1, 2}
    doc_ctrl = a.summary["enrichment_control"]["document"]
    assert (
        doc_ctrl["n_significant"] == ctrl.loc[ctrl["level"] == "document", "n_significant"].tolist()
    )
    lead = a.summary["lead_level"]
    assert lead == ("document" if a.summary["median_doc_tokens"] <= 64 else "token")
    top = a.top_latents
    assert (top["unit"] == lead).all() and (top["group_size"] == top["members"].map(len)).all()
    assert not lat.loc[top["latent"], "generic"].any()
    one = a.top_latents_grouped_by(np.zeros(48, int))  # one cluster: one row per label
    assert (one.groupby("label").size() == 1).all() and (one["grouping"] == "merge").all()
    assert a.dashboard_uri(3).endswith("dashboards/latents/00003.html")
    with open(os.path.join(out, "dashboards/latents/00003.html"), encoding="utf-8") as f:
        html = f.read()
    assert "Top activations" in html and "Logit lens" in html


def test_label_override_plants_an_enriched_latent(demo_store, sae_dir, tmp_path):
    """Documents labelled by whether latent 3 fires in them: latent 3 must come out enriched."""
    from integral_superposition.analysis.scan import scan_latents
    from integral_superposition.sae import load_sae

    sae = load_sae(sae_dir)
    scan = scan_latents(sae, demo_store, n_top=1, doc_threshold=0.0)
    fires = np.unique(scan.doc_pairs[scan.doc_pairs[:, 1] == 3, 0])
    docs = demo_store.docs["doc_id"].to_numpy()
    assert 0 < fires.size < docs.size
    labels = pd.DataFrame({"doc_id": docs, "label": np.where(np.isin(docs, fires), "on", "off")})
    out = str(tmp_path / "a")
    run_analysis(sae_dir, demo_store, out, {**FAST, "dashboards": "none"}, labels=labels)
    e = load_analysis(out).enrichment
    row = e[(e.latent == 3) & (e.label == "on") & (e.level == "document")].iloc[0]
    assert row.q < 1e-6 and row.in_set == fires.size
    rng = np.random.default_rng(0)
    shuffled = labels.assign(label=rng.permutation(labels["label"].to_numpy()))
    run_analysis(sae_dir, demo_store, out, {**FAST, "dashboards": "none"}, labels=shuffled)
    e = load_analysis(out).enrichment
    assert not (e[e.latent == 3].q < 0.05).any()


def test_test_split_and_memory_filesystem(demo_store, sae_dir):
    out = "memory://isup-analysis-test/run"
    m = run_analysis(
        sae_dir,
        demo_store,
        out,
        {**FAST, "split": "test", "test_fraction": 0.3, "dashboards": "alive"},
    )
    assert storage.verify_output(out)
    a = load_analysis(out)
    assert a.summary["n_tokens"] == int(demo_store.split_mask("test", 0.3).sum())
    pages = [f for f in m["files"] if f.startswith("dashboards/latents/")]
    assert len(pages) == 48 - a.summary["n_dead"]
    assert a.dashboard_uri(7) is None  # dead: no page
    assert b"L7" in a.read("dashboards/index.html")


def _assert_nothing_written(path):
    assert not os.path.exists(path) or not any(files for _, _, files in os.walk(path))


def test_bad_inputs_write_nothing(demo_store, sae_dir, tmp_path):
    out = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"sae.d_in=32 does not match the store's d_model=64"):
        bad = save_sae(SparseAutoencoder(32, 8), str(tmp_path / "sae32"))
        run_analysis(bad, demo_store, out)
    with pytest.raises(
        ValueError, match=f"labels has 5 entries, but the store has {demo_store.n_tokens} tokens"
    ):
        run_analysis(sae_dir, demo_store, out, labels=np.zeros(5, int))
    docs = demo_store.docs
    with pytest.raises(ValueError, match="not aligned by doc_id"):
        run_analysis(
            sae_dir,
            demo_store,
            out,
            labels=pd.DataFrame({"doc_id": docs["doc_id"][:-3], "label": docs["label"][:-3]}),
        )
    with pytest.raises(ValueError, match="single class"):
        run_analysis(
            sae_dir,
            demo_store,
            out,
            labels=pd.DataFrame({"doc_id": docs["doc_id"], "label": "same"}),
        )
    with pytest.raises(
        ValueError,
        match=f"n_top=100000: more top examples per latent than the {demo_store.n_tokens} tokens",
    ):
        run_analysis(sae_dir, demo_store, out, {"n_top": 100000})
    with pytest.raises(ValueError, match="clusters has shape"):
        run_analysis(sae_dir, demo_store, out, clusters=np.zeros(3))
    _assert_nothing_written(out)


def test_failure_midway_rolls_back(demo_store, sae_dir, tmp_path, monkeypatch):
    from integral_superposition.viz import panels

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(panels, "write_dashboards", boom)
    out = str(tmp_path / "rollback")
    with pytest.raises(RuntimeError, match="disk full"):
        run_analysis(sae_dir, demo_store, out, FAST)
    assert not storage.exists(storage.join(out, "manifest.json"))
    _assert_nothing_written(out)
