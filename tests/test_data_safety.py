"""Corrupt, non-finite or impossible data is refused, never accepted silently."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math

import pandas as pd
import pytest
from integral_superposition.analysis.run import AnalysisParams
from integral_superposition.config import DumpConfig, SAEConfig
from integral_superposition.data import load_dataset_auto, load_titles_csv
from integral_superposition.merge.params import MergeParams
from integral_superposition.steering.evaluate import SteeringParams
from pydantic import ValidationError

FRAME = pd.DataFrame(
    {"title": ["Stocks fall", "Team wins", "Rain again"], "topic": ["Biz", "Sport", "World"]}
)


# -- non-finite hyperparameters ------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    ("model", "field"),
    [
        (SAEConfig, "lr"),
        (SAEConfig, "l1"),
        (SAEConfig, "auxk_coef"),
        (SAEConfig, "grad_clip"),
        (SAEConfig, "jumprelu_init_threshold"),
        (SAEConfig, "max_norm_factor"),
        (DumpConfig, "shard_size_mb"),
        (MergeParams, "ridge_lambda"),
        (AnalysisParams, "alpha"),
        (SteeringParams, "q_max"),
    ],
)
def test_non_finite_float_fields_are_refused(model, field, bad):
    if field not in model.model_fields:
        pytest.skip(f"{model.__name__} has no field {field}")
    with pytest.raises(ValidationError, match=f"{field}[\\s\\S]*finite number"):
        model(**{field: bad})
    cfg = model()
    with pytest.raises(ValidationError, match="finite number"):
        setattr(cfg, field, bad)  # assignment is validated too


def test_lr_inf_is_refused_before_training():
    with pytest.raises(ValidationError, match=r"lr[\s\S]*input_value=inf"):
        SAEConfig(lr=float("inf"))


def test_non_finite_strength_in_a_list_is_refused():
    with pytest.raises(ValidationError, match=r"strengths\.1[\s\S]*finite number"):
        SteeringParams(strengths=[1.0, float("nan")])


# -- compressed tables, recognised by their bytes ---------------------------------------------
@pytest.mark.parametrize(
    "compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bz2", "xz"]
)
def test_compressed_table_named_csv_is_read(tmp_path, compress):
    path = tmp_path / "titles.csv"  # the name does not say it is compressed
    path.write_bytes(compress(FRAME.to_csv(index=False).encode()))
    df = load_titles_csv(str(path))
    assert df["title"].tolist() == FRAME["title"].tolist()
    assert df["topic"].tolist() == FRAME["topic"].tolist()
    assert load_dataset_auto(str(path))["title"].tolist() == FRAME["title"].tolist()


def test_plain_file_named_gz_is_read(tmp_path):
    path = tmp_path / "titles.csv.gz"
    FRAME.to_csv(path, index=False, compression=None)
    assert load_titles_csv(str(path))["title"].tolist() == FRAME["title"].tolist()


def test_truncated_gzip_names_the_compression(tmp_path):
    path = tmp_path / "titles.csv"
    data = gzip.compress(FRAME.to_csv(index=False).encode() * 50)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"titles\.csv.*gzip-compressed.*damaged or truncated"):
        load_titles_csv(str(path))
