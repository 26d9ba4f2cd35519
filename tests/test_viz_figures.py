"""Figures: returned or written, never shown; maps, heatmaps and distributions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from integral_superposition import storage
from integral_superposition.analysis.enrichment import fisher_table
from integral_superposition.analysis.reducer import PCAReducer
from integral_superposition.viz import distributions, heatmaps, maps
from integral_superposition.viz.figures import figure_bytes, png_data_uri, save_figure
from matplotlib.figure import Figure


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    import matplotlib.pyplot as plt

    def fail(*a, **k):
        raise AssertionError("plt.show() was called")

    monkeypatch.setattr(plt, "show", fail)
    yield
    assert plt.get_fignums() == []  # nothing registered with pyplot


def _table(K=12, C=3, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.array([300, 200, 100])
    in_set = rng.integers(0, 6, (K, C))
    in_set[2] = [20, 0, 0]
    in_set[5] = [0, 0, 18]
    in_set[9] = 0
    return fisher_table(in_set, in_set.sum(1), counts, ["World", "Sports", "Sci/Tech"])


def test_latent_maps_by_label_and_cluster():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(12, 2))
    t = _table()
    from integral_superposition.analysis.enrichment import best_labels

    b = best_labels(t)
    dead = np.zeros(12, bool)
    dead[9] = True
    fig = maps.latent_map(
        coords,
        best_label=b["best_label"],
        q=b["q"],
        label_names=["World", "Sports", "Sci/Tech"],
        dead=dead,
        annotate=[2, 5],
    )
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Sports" in labels and "dead (1)" in labels
    fig2 = maps.latent_map(coords, clusters=rng.integers(0, 4, 12))
    assert figure_bytes(fig2, "svg").startswith(b"<?xml")
    with pytest.raises(ValueError, match="coords"):
        maps.latent_map(np.zeros((3, 3)))


def test_seed_maps_return_figures():
    rng = np.random.default_rng(0)
    Z = rng.random((40, 6))
    y = rng.integers(0, 3, 40)
    red = PCAReducer(2).fit(Z)
    assert isinstance(maps.titles_map(Z, y, red, label_names=["a", "b", "c"]), Figure)
    assert isinstance(
        maps.latents_labels_map(
            red, Z, np.array([1, 4]), ["L1", "L4"], is_sport=np.array([True, False])
        ),
        Figure,
    )
    assert isinstance(maps.activation_heatmap(Z, top_k=10), Figure)


def test_heatmaps():
    t = _table()
    fig = heatmaps.enrichment_heatmap(t, per_label=2)
    ax = fig.axes[0]
    ticks = [x.get_text() for x in ax.get_yticklabels()]
    assert "L2" in ticks and "L5" in ticks
    assert {2, 5} <= set(heatmaps.select_enriched_latents(t, 1).tolist())
    with pytest.raises(ValueError, match="mixes enrichment levels"):
        heatmaps.enrichment_heatmap(pd.concat([t, t.assign(level="document")]))
    J = np.eye(4)
    assert isinstance(heatmaps.coactivation_heatmap(J, [3, 1, 4, 1]), Figure)
    with pytest.raises(ValueError, match="J has shape"):
        heatmaps.coactivation_heatmap(J, [1, 2])
    from scipy import sparse

    M = sparse.csr_matrix(
        (np.ones(10), (np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3]), np.arange(10))), shape=(4, 10)
    )
    fig = heatmaps.merge_matrix_heatmap(M)
    assert "(4 of 4)" in fig.axes[0].get_ylabel() and "10 of 10" in fig.axes[0].get_xlabel()
    fig = heatmaps.merge_matrix_heatmap(M.T, merged_axis=1)  # the seed's [K, K'] orientation
    assert "(4 of 4)" in fig.axes[0].get_ylabel()


def test_distributions_and_saving():
    dens = np.concatenate([[0.0, 0.0], np.logspace(-6, -0.5, 50)])
    fig = distributions.density_histogram(dens)
    assert "2 dead" in fig.axes[0].get_title()
    assert isinstance(distributions.l0_histogram(np.array([0, 3, 10, 4, 1])), Figure)
    assert isinstance(distributions.l0_histogram(np.ones(900)), Figure)
    table = pd.DataFrame(
        {"decoder_norm": np.ones(20, np.float32), "max_decoder_cos": np.linspace(-0.2, 0.9, 20)}
    )
    assert isinstance(distributions.decoder_geometry_figure(table), Figure)
    hist = pd.DataFrame(
        {
            "step": np.arange(50),
            "loss": np.logspace(1, -2, 50),
            "l0": np.linspace(200, 40, 50),
            "note": "x",
        }
    )
    fig = distributions.training_curves(hist)
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["loss", "l0"]
    assert fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="non-empty"):
        distributions.training_curves(pd.DataFrame())
    uris = save_figure(fig, "memory://isup-figs/curves")
    assert set(uris) == {"png", "svg"}
    assert storage.read_bytes(uris["png"])[:4] == b"\x89PNG"
    assert b"<dc:date>" not in storage.read_bytes(uris["svg"])  # reproducible SVG
    assert png_data_uri(fig).startswith("data:image/png;base64,")
