"""Latent analysis: top activating tokens, label enrichment, co-activation, statistics,
2-D maps and the logit lens (``pipelines.run_analysis`` publishes all of them)."""

from integral_superposition.analysis import (
    enrichment,
    generic,
    jaccard_sparse,
    logit_lens,
    params,
    probe,
    reducer,
    scan,
    stats,
    top_tokens,
)
from integral_superposition.analysis.enrichment import (
    document_enrichment,
    fisher_enrichment,
)
from integral_superposition.analysis.generic import generic_latents
from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.analysis.probe import sparse_probe
from integral_superposition.analysis.result import AnalysisResult, load_analysis
from integral_superposition.analysis.scan import LatentScan, TopKSets, scan_latents
from integral_superposition.analysis.top_tokens import topk_sets_per_latent

__all__ = [
    "AnalysisParams",
    "AnalysisResult",
    "LatentScan",
    "TopKSets",
    "document_enrichment",
    "enrichment",
    "fisher_enrichment",
    "generic",
    "generic_latents",
    "jaccard_sparse",
    "load_analysis",
    "logit_lens",
    "params",
    "probe",
    "reducer",
    "scan",
    "scan_latents",
    "sparse_probe",
    "stats",
    "top_tokens",
    "topk_sets_per_latent",
]
