"""What the analysis computes and how much of it (:class:`AnalysisParams`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

__all__ = ["AnalysisParams"]


class AnalysisParams(BaseModel):
    """What :func:`run_analysis` computes and how much of it."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )

    n_top: int = Field(20, ge=1)
    """Top activating examples kept per latent (the top set of the token-level enrichment)."""
    n_bands: int = Field(4, ge=0)
    """Quantile bands of each latent's firing activations sampled below the top (0: none)."""
    per_band: int = Field(5, ge=1)
    """Examples sampled per quantile band."""
    context_left: int = Field(8, ge=0)
    """Tokens shown before each example token."""
    context_right: int = Field(4, ge=0)
    """Tokens shown after each example token."""
    split: Literal["all", "train", "test"] = "all"
    """Which rows of the store to analyse (the store's shared document-level split)."""
    test_fraction: float = Field(0.05, gt=0, lt=1)
    """Test fraction of that split (must match the one used in training to mean 'held out')."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level for Benjamini-Hochberg q-values."""
    doc_threshold: float = Field(0.0, ge=0)
    """A latent fires in a document when its maximum over the document exceeds this."""
    hist_bins: int = Field(96, ge=8)
    """log10 activation bins (range 1e-4..1e4) for the AUROC and the dashboards' histograms."""
    n_neighbours: int = Field(10, ge=1)
    """Co-activation (Jaccard) neighbours listed per latent."""
    firing_budget: int = Field(4_000_000, ge=0)
    """Most non-zeros kept in the token firing sample for Jaccard (0: skip neighbours)."""
    reducer: Literal["auto", "pca", "umap"] = "auto"
    """2-D map method; ``auto`` is UMAP when umap-learn is installed, else PCA."""
    map_input: Literal["decoder", "profiles"] = "decoder"
    """Map decoder directions, or per-label log-odds profiles."""
    logit_top: int = Field(10, ge=1)
    """Promoted / suppressed tokens per latent in the logit lens (needs a backend)."""
    dashboards: Literal["all", "alive", "none"] = "all"
    """Which latents get a dashboard page (the index always lists every latent)."""
    heatmap_per_label: int = Field(5, ge=1)
    """Most enriched latents per label shown in the enrichment heatmap."""
    coactivation_latents: int = Field(40, ge=2)
    """Latents (the most frequently firing of the heatmap's) in the co-activation heatmap."""
    enrichment: bool = True
    """Run the label enrichment (needs at least two labels)."""
    control_seeds: int = Field(3, ge=0)
    """Shuffled-label control: the enrichment rerun with document labels permuted, once per
    seed (0: skip); published as ``tables/enrichment_control.parquet``."""
    lead_doc_tokens: int = Field(64, ge=1)
    """The analysis leads with the document level (best latents, top-latents table) when the
    median analysed document has at most this many tokens, else with the token level."""
    redundancy_cosine: float = Field(0.7, ge=-1, le=1)
    """Top latents whose decoder directions have at least this cosine are grouped..."""
    redundancy_jaccard: float = Field(0.5, gt=0, le=1)
    """...and so are those whose co-firing Jaccard (at the lead unit) is at least this."""
    top_per_label: int = Field(10, ge=1)
    """Rows (groups of near-duplicate latents) per label in ``tables/top_latents.parquet``."""
    purity_top_n: int = Field(50, ge=1)
    """Documents in a latent's top set for the document-level top-set purity (of the N
    documents where the latent's maximum is largest, the fraction with the label); the token
    level's top set is the ``n_top`` tokens."""
    best_q: float = Field(1e-6, gt=0, lt=1)
    """A label's best latents are ranked by top-set purity (ties: smaller q) among the
    non-generic, positively enriched latents with q below this (when none is, among those with
    q < ``alpha``): significant and specific, not merely the smallest q."""
    generic_token_share: float = Field(0.5, gt=0, le=1)
    """A latent is generic when one token makes up at least this share of its top contexts..."""
    generic_label_fraction: float = Field(0.1, ge=0, le=1)
    """...and that token occurs in at least this fraction of the documents of every label...
    Generic latents are listed apart and never chosen as a label's best latent."""
    generic_rate_ratio: float = Field(0.5, ge=0, le=1)
    """...and the latent fires on that token in every label alike: on the token firing sample,
    its lowest per-label firing rate on the token is at least this times its highest (a latent
    firing on "." only in one label's documents is topical)."""
    probe: bool = True
    """Sparse probing: per label, logistic probes on the top-k enriched latents of held-out
    documents (the store's ``test`` split), with dense and random-latent baselines."""
    probe_ks: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 5, 10, 20], min_length=1)
    """Probe sizes k (latents per probe)."""
    probe_rank_by: Literal["std_diff", "mean_diff", "forward"] = "forward"
    """The order a probe takes latents in, on the training documents: greedy forward
    selection by the logistic score test (each latent judged given the ones before it, so a
    near-duplicate of a chosen latent is not taken again), the standardised difference of class
    means (Cohen's d, scale-free) or the raw difference (SAEBench's)."""
    probe_cs: list[PositiveFloat] = Field(
        default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0], min_length=1
    )
    """Inverse L2 regularisation strengths each probe's ``C`` is chosen from, by stratified
    cross-validation on its training documents (one value: that ``C``, no cross-validation);
    the same for the SAE, random-latent and dense probes."""
    probe_cv_folds: int = Field(5, ge=2)
    """Folds of that cross-validation (fewer when a class has fewer training documents)."""
    metrics: bool = True
    """Also compute reconstruction metrics (EV, FVU, cosine) in the same pass (one decode per chunk)."""
    chunk_tokens: int | None = Field(None, ge=1)
    """Tokens per chunk (default: about 64 MiB of latent activations)."""
    device: str = "auto"
    """Torch device for the SAE: ``auto`` (CUDA when available), ``cpu``, ``cuda:0``, ..."""
    encode_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Encoder matmul precision of the scan: ``bfloat16`` is several times faster on CPUs with
    AVX512-BF16/AMX and on GPUs (near-equal activations can swap ranks) and many times slower
    on other CPUs; ``auto`` picks bf16 only where it is native."""
    dead_min_tokens: int = Field(100_000, ge=1)
    """A latent is dead when it never fires on at least this many tokens (all of the store's
    when it has fewer): when the analysed split is smaller, rows from the rest of the store
    are added to the count."""
    seed: int = 0
    """Seed of the reservoir sampling, the firing sample and the 2-D map."""
