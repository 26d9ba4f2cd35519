"""Latent merging: cluster redundant SAE latents, build a merged SAE, refit its decoder, and
measure what the merge costs.

The seed's recipe, kept::

    dist = merge.cluster.cosine_dist_from_decoder(model.dec.weight.data.numpy())  # [d, K]
    labels = merge.cluster.agglomerative_labels(dist, n_clusters=256)
    medoids = merge.medoid.medoids_from_labels(dist, labels)
    M = merge.medoid.merge_matrix_from_labels(labels, medoids)                    # [K, K']
    W_new = merge.refit.merge_and_refit_decoder(data_iter, model, M)              # [d, K']

and the full pipeline: ``pipelines.run_merge(sae_uri, store_uri, out_uri, MergeParams(...))``.
"""

from integral_superposition.merge import cluster, evaluate, medoid, refit, similarity
from integral_superposition.merge.cluster import (
    MergeTree,
    agglomerative_labels,
    build_tree,
    cosine_dist_from_decoder,
)
from integral_superposition.merge.evaluate import compare, sweep
from integral_superposition.merge.medoid import (
    medoids_from_labels,
    merge_map_table,
    merge_matrix_from_labels,
)
from integral_superposition.merge.params import MergeParams
from integral_superposition.merge.refit import (
    RidgeStats,
    build_merged_sae,
    merge_and_refit_decoder,
    refit_decoder,
)
from integral_superposition.merge.similarity import LatentSimilarity, latent_firing

__all__ = [
    "LatentSimilarity",
    "MergeParams",
    "MergeTree",
    "RidgeStats",
    "agglomerative_labels",
    "build_merged_sae",
    "build_tree",
    "cluster",
    "compare",
    "cosine_dist_from_decoder",
    "evaluate",
    "latent_firing",
    "medoid",
    "medoids_from_labels",
    "merge_and_refit_decoder",
    "merge_map_table",
    "merge_matrix_from_labels",
    "refit",
    "refit_decoder",
    "similarity",
    "sweep",
]
