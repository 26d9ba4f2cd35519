"""Sparse autoencoders: the model (four architectures), training, metrics, saving and loading."""

from integral_superposition.sae.load import (
    load_sae,
    load_sparsity,
    read_sae_manifest,
    saelens_config,
    save_sae,
)
from integral_superposition.sae.model import ARCHITECTURES, SAEOutput, SparseAutoencoder

__all__ = [
    "ARCHITECTURES",
    "SAEOutput",
    "SparseAutoencoder",
    "load_sae",
    "load_sparsity",
    "read_sae_manifest",
    "saelens_config",
    "save_sae",
]
