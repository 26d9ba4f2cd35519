"""``MergeParams``: everything that shapes a merge (the cache key of a merge run)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from integral_superposition.config import _Config


class MergeParams(_Config):
    """How latents are clustered, merged, refit and evaluated."""

    n_clusters: int | None = Field(None, ge=1)
    """Number of merged latents K'; default ``round(fraction * K)`` (checked against K)."""
    fraction: float = Field(0.25, gt=0, le=1)
    """K' as a fraction of K when neither ``n_clusters`` nor ``distance_threshold`` is given."""
    distance_threshold: float | None = Field(None, ge=0)
    """Cut the merge tree at this linkage distance instead of at a cluster count."""
    similarity: dict[str, float] = Field(
        default_factory=lambda: {"reconstruction": 1.0, "coactivation": 0.3}
    )
    """Weights of the distances to mix: ``decoder``, ``encoder``, ``coactivation``, ``reconstruction`` (merge cost), ``labels`` (label distributions of the documents a latent fires in; needs a labelled store)."""
    coactivation: Literal["jaccard", "correlation"] = "correlation"
    """Co-activation similarity: Jaccard of the firing sets, or the correlation of firing indicators."""
    coactivation_level: Literal["token", "document"] = "document"
    """Co-activation over tokens, or over documents (a latent fires in a document if on any token)."""
    linkage: Literal["average", "complete", "single"] = "complete"
    """Agglomerative linkage."""
    graph: Literal["auto", "dense", "knn"] = "auto"
    """Dense ``[K, K]`` distances, a sparse k-NN graph, or auto (dense up to 16,384 latents)."""
    n_neighbors: int = Field(16, ge=1)
    """Neighbours per latent in the k-NN graph mode."""
    aggregation: Literal["sum", "projection", "max"] = "projection"
    """A merged latent's activation: the weighted sum of its members' activations with the
    weights of the best rank-one summary of the cluster's reconstruction (``projection``); their
    plain sum; or their max. Above 16,384 latents ``projection`` runs as ``sum`` (logged)."""
    refit: bool = True
    """Refit the decoder by streaming ridge regression (else keep the medoids' decoder rows)."""
    ridge_lambda: float = Field(1e-4, ge=0)
    """Ridge strength relative to the mean diagonal of Z^T Z; shrinks towards the medoid rows."""
    refit_bias: bool = True
    """Refit the decoder bias too (the encoder bias is compensated, so codes do not change)."""
    fit_split: Literal["train", "all"] = "train"
    """Tokens for the co-activation statistics and the refit."""
    eval_split: Literal["test", "all"] = "test"
    """Held-out tokens for every evaluation metric."""
    test_fraction: float = Field(0.05, gt=0, lt=1)
    """Document-level test fraction of the store's split (``ActivationStore.split_mask``)."""
    split_seed: int = 0
    """Seed of the store's document split."""
    chunk_tokens: int = Field(16384, ge=1)
    """Tokens per streamed chunk."""
    top_n: int = Field(100, ge=1)
    """Top-activating tokens per latent for the enrichment tests."""
    q_threshold: float = Field(0.01, gt=0, lt=1)
    """BH q-value below which a (latent, label) pair counts as significantly enriched."""
    ce_docs: int = Field(64, ge=0)
    """Held-out documents for the spliced CE / KL metrics (0: skip; needs a backend)."""
    ce_batch_size: int = Field(16, ge=1)
    """Documents per spliced forward."""
    sweep: bool = True
    """Also sweep K' over ``sweep_fractions`` of K, with a random-partition control."""
    sweep_fractions: list[float] = Field(default_factory=lambda: [1 / 2, 1 / 4, 1 / 8, 1 / 16])
    """Fractions of K for the sweep."""
    control_seed: int = 0
    """Seed of the random-partition control."""
    finetune_epochs: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Fine-tune every merge (and its random control, with the same budget and seed) as a plain
    ``K'``-latent SAE for this many epochs of the training split, with the original SAE's
    training recipe and decoder refit (0: off; needs ``aggregation`` ``sum``/``projection``)."""

    @field_validator("similarity")
    @classmethod
    def _check_similarity(cls, v: dict[str, float]) -> dict[str, float]:
        from integral_superposition.merge.similarity import check_similarity_weights

        check_similarity_weights(v)
        return v

    @field_validator("sweep_fractions")
    @classmethod
    def _check_fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"sweep_fractions={v}: every fraction must be in (0, 1]; bad: {bad}")
        return v

    @model_validator(mode="after")
    def _one_cut(self) -> MergeParams:
        if self.n_clusters is not None and self.distance_threshold is not None:
            raise ValueError(
                f"n_clusters={self.n_clusters} and distance_threshold={self.distance_threshold}: give at most one"
            )
        return self

    @model_validator(mode="after")
    def _finetune_split(self) -> MergeParams:
        if self.finetune_epochs > 0 and self.split_seed != 0:
            raise ValueError(
                f"finetune_epochs={self.finetune_epochs} with split_seed={self.split_seed}: the "
                "fine-tune trains on the trainer's training split (seed 0), which would hold "
                "held-out tokens of this split; use split_seed=0 or finetune_epochs=0"
            )
        if self.finetune_epochs > 0 and self.aggregation == "max":
            raise ValueError(
                f"finetune_epochs={self.finetune_epochs} with aggregation='max': only a sum "
                "merge flattens to a plain SAE; use aggregation 'projection' or 'sum', or "
                "finetune_epochs=0"
            )
        return self

    def target_clusters(self, n_latents: int) -> int | None:
        """K' for an SAE with ``n_latents`` latents (None when cutting by distance)."""
        if self.distance_threshold is not None:
            return None
        k = (
            self.n_clusters
            if self.n_clusters is not None
            else max(1, round(self.fraction * n_latents))
        )
        if not 1 <= k <= n_latents:
            raise ValueError(f"n_clusters={k}: expected 1 <= n_clusters <= K={n_latents}")
        return int(k)

    def sweep_sizes(self, n_latents: int) -> list[int]:
        """Distinct K' of the sweep, largest first."""
        return sorted({max(1, round(f * n_latents)) for f in self.sweep_fractions}, reverse=True)
