"""Datasets: labelled text loaders, the synthetic demo corpus and tokenisation."""

from integral_superposition.data.datasets import (
    balance_labels,
    compose_text,
    dataset_fingerprint,
    encode_labels,
    label_mapping,
    load_dataset_auto,
    load_hf_dataset,
    load_kaggle_dataset,
    load_titles_csv,
    split_df,
    validate_frame,
)
from integral_superposition.data.demo_corpus import (
    demo_corpus,
    neutral_fit_prompts,
    neutral_prompts,
)
from integral_superposition.data.tables import read_table
from integral_superposition.data.tokenize import pad_batch, tokenize_texts

__all__ = [
    "balance_labels",
    "compose_text",
    "dataset_fingerprint",
    "demo_corpus",
    "encode_labels",
    "label_mapping",
    "load_dataset_auto",
    "load_hf_dataset",
    "load_kaggle_dataset",
    "load_titles_csv",
    "neutral_fit_prompts",
    "neutral_prompts",
    "pad_batch",
    "read_table",
    "split_df",
    "tokenize_texts",
    "validate_frame",
]
