"""The ``labels`` similarity: latents' label distributions over the documents they fire in."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from _merge_setup import store_and_topk_sae
from integral_superposition.merge import evaluate as ev
from integral_superposition.merge.params import MergeParams
from integral_superposition.merge.similarity import (
    LatentSimilarity,
    check_similarity_weights,
    label_profiles,
)


def _planted() -> tuple[sp.csr_array, np.ndarray]:
    """40 documents of 4 balanced labels; latents 0 and 1 fire in label 2's documents only,
    latent 2 in every document, latent 3 in none, latent 4 in label 0's."""
    labels = np.repeat(np.arange(4), 10)
    fire = np.zeros((40, 5), dtype=bool)
    fire[labels == 2, 0] = True
    fire[labels == 2, 1] = True
    fire[:, 2] = True
    fire[labels == 0, 4] = True
    return sp.csr_array(fire.astype(np.float32)), labels


def test_profiles_count_labels_and_shrink_towards_the_base_rates():
    f, labels = _planted()
    prof = label_profiles(f, labels, 4, prior_docs=10.0)
    assert prof.shape == (5, 4)
    np.testing.assert_allclose(prof.sum(1), 1.0)
    # latent 0: 10 documents of label 2 plus 10 documents' worth of base rates (0.25 each)
    np.testing.assert_allclose(prof[0], [2.5 / 20, 2.5 / 20, 12.5 / 20, 2.5 / 20])
    np.testing.assert_allclose(prof[2], 0.25)  # fires alike everywhere: the base rates
    np.testing.assert_allclose(prof[3], 0.25)  # never fires: the base rates
    # unlabelled documents (-1) are left out of the counts and of the base rates
    labels2 = labels.copy()
    labels2[:10] = -1
    prof2 = label_profiles(f, labels2, 4, prior_docs=10.0)
    assert prof2[4, 0] == pytest.approx(0.0)  # label 0 no longer has a document


def test_same_topic_latents_are_close_and_a_topical_latent_is_far_from_a_generic_one():
    f, labels = _planted()
    sim = LatentSimilarity(weights="labels", profiles=label_profiles(f, labels, 4))
    d = sim.distance_matrix()
    assert d[0, 1] == pytest.approx(0.0)
    assert d[2, 3] == pytest.approx(0.0)
    # topical vs generic: the total variation between (0.125, 0.125, 0.625, 0.125) and 0.25 each
    assert d[0, 2] == pytest.approx(0.375)
    assert d[0, 4] > d[0, 2] > d[0, 1]
    mixed = LatentSimilarity(
        weights={"decoder": 1.0, "labels": 1.0},
        decoder=np.eye(5, 3, dtype=np.float32) + 0.1,
        profiles=label_profiles(f, labels, 4),
    )
    assert mixed.n_latents == 5 and np.allclose(mixed.distance_matrix(), mixed.distance_matrix().T)


def test_bad_label_inputs_are_refused_naming_them():
    f, labels = _planted()
    assert check_similarity_weights({"labels": 1, "decoder": 1}) == {"labels": 0.5, "decoder": 0.5}
    with pytest.raises(ValueError, match=r"doc_labels has shape \(39,\)"):
        label_profiles(f, labels[:39], 4)
    with pytest.raises(ValueError, match="n_labels=1"):
        label_profiles(f, labels, 1)
    with pytest.raises(ValueError, match="expected < 3"):
        label_profiles(f, labels, 3)
    with pytest.raises(ValueError, match="no labelled document"):
        label_profiles(f, np.full(40, -1), 4)
    with pytest.raises(ValueError, match="labels similarity needs profiles="):
        LatentSimilarity(weights="labels")
    with pytest.raises(ValueError, match="disagree on the number of latents"):
        LatentSimilarity(
            weights={"decoder": 1, "labels": 1},
            decoder=np.ones((4, 3), np.float32),
            profiles=label_profiles(f, labels, 4),
        )


def test_a_merge_with_the_labels_similarity_keeps_topics_apart(tiny_backend, tmp_path):
    """On a labelled store the merge tree uses the profiles of the fit split's documents; a
    store without labels is refused before any work."""
    store, sae = store_and_topk_sae(tiny_backend, tmp_path)
    p = MergeParams(similarity={"decoder": 1.0, "labels": 1.0}, sweep=False)
    sim = ev.similarity_for(sae, store, p)
    assert set(sim.weights) == {"decoder", "labels"} and sim.n_latents == sae.d_sae
    only = ev.similarity_for(sae, store, MergeParams(similarity={"labels": 1.0}, sweep=False))
    d = only.distance_matrix()
    assert d.shape == (sae.d_sae, sae.d_sae) and (d >= 0).all() and d.max() <= 1.0 + 1e-9
    assert d.max() > 0.1  # the demo topics separate some latents

    class Unlabelled:  # any read of its activations would fail: the refusal comes first
        label_names = ()
        labels = None

    both = MergeParams(similarity={"coactivation": 1.0, "labels": 1.0}, sweep=False)
    for params in (p, both):
        with pytest.raises(ValueError, match="'labels' needs a store with at least two labels"):
            ev.check_params_for(sae, params, Unlabelled())
        with pytest.raises(ValueError, match=r"\(this one has 0\); drop 'labels'"):
            ev.similarity_for(sae, Unlabelled(), params)
    ev.check_params_for(sae, MergeParams(similarity={"decoder": 1.0}), Unlabelled())
