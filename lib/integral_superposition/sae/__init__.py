"""Sparse autoencoders: the model (four architectures), training, metrics, saving and loading."""

from integral_superposition.sae import metrics
from integral_superposition.sae.curve import load_training_curve
from integral_superposition.sae.formats import CorruptSAEError
from integral_superposition.sae.load import (
    check_training_store,
    load_sae,
    load_sparsity,
    read_sae_manifest,
    saelens_config,
    save_sae,
)
from integral_superposition.sae.metrics import (
    evaluate_sae,
    explained_variance,
    spliced_ce,
    spliced_ce_many,
)
from integral_superposition.sae.model import ARCHITECTURES, SAEOutput, SparseAutoencoder
from integral_superposition.sae.train import (
    NonFiniteActivationsError,
    TrainResult,
    train_sae,
    train_saes,
)

__all__ = [
    "ARCHITECTURES",
    "CorruptSAEError",
    "NonFiniteActivationsError",
    "SAEOutput",
    "SparseAutoencoder",
    "TrainResult",
    "check_training_store",
    "evaluate_sae",
    "explained_variance",
    "load_sae",
    "load_sparsity",
    "load_training_curve",
    "metrics",
    "read_sae_manifest",
    "saelens_config",
    "save_sae",
    "spliced_ce",
    "spliced_ce_many",
    "train_sae",
    "train_saes",
]
