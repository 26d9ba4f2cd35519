"""Latent analysis: top activating tokens, label enrichment (token and document level, with a
shuffled-label control and near-duplicate grouping), co-activation, statistics, 2-D maps and
the logit lens (``pipelines.run_analysis`` publishes all of them)."""

from integral_superposition.analysis import (
    control,
    enrichment,
    generic,
    jaccard_sparse,
    labels,
    logit_lens,
    params,
    probe,
    reducer,
    redundancy,
    scan,
    select,
    stats,
    top_tokens,
)
from integral_superposition.analysis.control import shuffled_label_control
from integral_superposition.analysis.enrichment import (
    document_enrichment,
    fisher_enrichment,
)
from integral_superposition.analysis.generic import generic_latents
from integral_superposition.analysis.labels import LabelEnrichment, label_enrichment
from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.analysis.probe import sparse_probe
from integral_superposition.analysis.redundancy import redundancy_groups, top_latents_table
from integral_superposition.analysis.result import AnalysisResult, load_analysis
from integral_superposition.analysis.scan import LatentScan, TopKSets, scan_latents
from integral_superposition.analysis.top_tokens import topk_sets_per_latent

__all__ = [
    "AnalysisParams",
    "AnalysisResult",
    "LabelEnrichment",
    "LatentScan",
    "TopKSets",
    "control",
    "document_enrichment",
    "enrichment",
    "fisher_enrichment",
    "generic",
    "generic_latents",
    "jaccard_sparse",
    "label_enrichment",
    "labels",
    "load_analysis",
    "logit_lens",
    "params",
    "probe",
    "reducer",
    "redundancy",
    "redundancy_groups",
    "scan",
    "scan_latents",
    "select",
    "shuffled_label_control",
    "sparse_probe",
    "stats",
    "top_latents_table",
    "top_tokens",
    "topk_sets_per_latent",
]
