"""Data loaders, label mapping, balancing, splitting and the synthetic demo corpus."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from integral_superposition import storage
from integral_superposition.data import (
    balance_labels,
    dataset_fingerprint,
    demo_corpus,
    encode_labels,
    label_mapping,
    load_dataset_auto,
    load_hf_dataset,
    load_kaggle_dataset,
    load_titles_csv,
    read_table,
    split_df,
    validate_frame,
)
from integral_superposition.data import demo_corpus as demo_module
from integral_superposition.data.demo_corpus import TOPICS

# headlines with the separators' characters inside quoted fields, and words pandas would
# otherwise read as missing
FRAME = pd.DataFrame(
    {
        "title": [
            "Stocks fall, bonds rally",
            "Team wins; fans cheer",
            "None",
            "NA",
            "Tab\tinside quotes",
            "2024",
            "Pipes | and more",
            "Plain headline",
        ],
        "topic": ["Business", "Sports", "World", "World", "Sci/Tech", "Sports", "World", "Health"],
        "extra": range(8),
    }
)


def _write_csv(path, sep: str) -> None:
    FRAME.to_csv(path, sep=sep, index=False)


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_csv_separator_is_sniffed(tmp_path, sep):
    path = tmp_path / "data.csv"
    _write_csv(path, sep)
    df = load_titles_csv(str(path), "title", "topic")
    assert list(df.columns) == ["title", "topic", "extra"]
    assert df["title"].tolist() == FRAME["title"].tolist()  # "None"/"NA"/"2024" stay text
    assert df["topic"].tolist() == FRAME["topic"].tolist()


def test_parquet_jsonl_json_and_compressed(tmp_path):
    FRAME.to_parquet(tmp_path / "d.parquet")
    FRAME.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    FRAME.to_json(tmp_path / "d.json", orient="records")
    FRAME.to_csv(tmp_path / "d.csv.gz", index=False, compression="gzip")
    FRAME.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    for name in ("d.parquet", "d.jsonl", "d.json", "d.csv.gz", "d.tsv"):
        df = load_titles_csv(str(tmp_path / name))
        assert df["title"].tolist() == FRAME["title"].tolist(), name
        assert df["topic"].tolist() == FRAME["topic"].tolist(), name


def test_loaders_read_fsspec_uris(s3_bucket):
    for uri, opts in (("memory://isup-data/d", None), (s3_bucket[0] + "/d", s3_bucket[1])):
        storage.write_bytes(uri + ".csv", FRAME.to_csv(index=False, sep=";").encode(), opts)
        buf = FRAME.to_parquet()
        storage.write_bytes(uri + ".parquet", buf, opts)
        storage.write_bytes(
            uri + ".jsonl", FRAME.to_json(orient="records", lines=True).encode(), opts
        )
        for ext in (".csv", ".parquet", ".jsonl"):
            df = load_titles_csv(uri + ext, storage_options=opts)
            assert df["title"].tolist() == FRAME["title"].tolist(), uri + ext
        auto = load_dataset_auto(uri + ".csv", storage_options=opts)
        assert auto["topic"].tolist() == FRAME["topic"].tolist()


def test_multiclass_labels_mapping_and_no_silent_binarisation(tmp_path):
    path = tmp_path / "d.csv"
    _write_csv(path, ",")
    df = load_titles_csv(str(path))
    names = label_mapping(df["topic"])
    assert names == ["Business", "Health", "Sci/Tech", "Sports", "World"]
    ids = encode_labels(df["topic"], names)
    assert ids.tolist() == [0, 3, 4, 4, 2, 3, 4, 1]
    assert label_mapping([10, 2, 1, 2]) == ["1", "2", "10"]  # numeric labels in numeric order
    with pytest.raises(ValueError, match=r"labels \['Health'\] are not in the label mapping"):
        encode_labels(df["topic"], ["Business", "Sci/Tech", "Sports", "World"])


def test_balancing_only_when_asked(tmp_path):
    df = pd.DataFrame(
        {"title": [f"headline {i}" for i in range(30)], "topic": ["a"] * 20 + ["b"] * 7 + ["c"] * 3}
    )
    df.to_csv(tmp_path / "d.csv", index=False)
    plain = load_titles_csv(str(tmp_path / "d.csv"))
    assert plain["topic"].value_counts().to_dict() == {"a": 20, "b": 7, "c": 3}
    bal = load_titles_csv(str(tmp_path / "d.csv"), balance=True, seed=1)
    assert bal["topic"].value_counts().to_dict() == {"a": 3, "b": 3, "c": 3}
    again = load_titles_csv(str(tmp_path / "d.csv"), balance=True, seed=1)
    pd.testing.assert_frame_equal(bal, again)  # deterministic for a seed
    assert balance_labels(df, "topic", seed=2)["topic"].value_counts().min() == 3
    assert len(load_titles_csv(str(tmp_path / "d.csv"), max_rows=5)) == 5


def test_split_df():
    df = demo_corpus(200)
    tr, te = split_df(df, train=0.75, seed=3)
    assert len(tr) == 150 and len(te) == 50
    assert set(tr.index).isdisjoint(te.index) and set(tr.index) | set(te.index) == set(df.index)
    tr2, _ = split_df(df, train=0.75, seed=3)
    assert tr.index.tolist() == tr2.index.tolist()
    strat, _ = split_df(demo_corpus(160), train=0.5, seed=0, stratify_col="topic")
    assert strat["topic"].value_counts().tolist() == [10] * 8  # 20 of each of 8 topics, halved
    with pytest.raises(ValueError, match=r"train=1\.5"):
        split_df(df, train=1.5)
    with pytest.raises(ValueError, match="stratify_col='nope'"):
        split_df(df, stratify_col="nope")


def test_demo_corpus_is_deterministic_and_rich():
    df = demo_corpus(6000)
    assert len(df) == 6000 and df["title"].is_unique
    assert df["topic"].nunique() >= 6 and set(df["topic"]) == set(TOPICS)
    assert df["topic"].value_counts().max() - df["topic"].value_counts().min() <= 1
    pd.testing.assert_frame_equal(df, demo_corpus(6000))
    assert not df.equals(demo_corpus(6000, seed=1))
    assert "synthetic" in demo_module.__doc__.lower() and "synthetic" in demo_corpus.__doc__.lower()
    sub = demo_corpus(100, topics=["Sports", "Health"])
    assert set(sub["topic"]) == {"Sports", "Health"}
    with pytest.raises(ValueError, match="unknown"):
        demo_corpus(10, topics=["Cooking"])
    auto = load_dataset_auto("demo:120", text_col="text", label_col="label")
    assert list(auto.columns) == ["text", "label"] and len(auto) == 120
    with pytest.raises(ValueError, match="demo:N"):
        load_dataset_auto("demo:lots")


def test_dataset_fingerprint_tracks_content():
    df = demo_corpus(50)
    fp = dataset_fingerprint(df, "title", "topic")
    assert fp == dataset_fingerprint(df.copy(), "title", "topic")
    changed = df.copy()
    changed.loc[3, "topic"] = "Other"
    assert dataset_fingerprint(changed, "title", "topic") != fp
    assert dataset_fingerprint(df.iloc[::-1], "title", "topic") != fp
    assert dataset_fingerprint(df, "title", None) != fp


@pytest.mark.parametrize(
    ("frame", "text_col", "label_col", "match"),
    [
        (
            pd.DataFrame({"title": ["a"], "topic": ["x"]}),
            "text",
            "topic",
            r"text_col='text': no such column",
        ),
        (
            pd.DataFrame({"title": ["a"], "topic": ["x"]}),
            "title",
            "label",
            r"label_col='label': no such column",
        ),
        (pd.DataFrame({"title": [], "topic": []}), "title", "topic", "the dataset is empty"),
        (
            pd.DataFrame({"title": ["a", "  "], "topic": ["x", "y"]}),
            "title",
            "topic",
            r"row 1: empty text",
        ),
        (
            pd.DataFrame({"title": ["a", 5], "topic": ["x", "y"]}),
            "title",
            "topic",
            r"row 1: expected a string, got 5",
        ),
        (
            pd.DataFrame({"title": ["a", None], "topic": ["x", "y"]}),
            "title",
            "topic",
            r"text_col='title' row 1: missing text",
        ),
        (
            pd.DataFrame({"title": ["a", "b"], "topic": ["x", np.nan]}),
            "title",
            "topic",
            r"label_col='topic' row 1: missing \(NaN\) label",
        ),
    ],
)
def test_validate_frame_errors(frame, text_col, label_col, match):
    with pytest.raises(ValueError, match=match):
        validate_frame(frame, text_col, label_col)


def test_validate_frame_type_error():
    with pytest.raises(TypeError, match="expected a pandas DataFrame, got list"):
        validate_frame([["a", "b"]], "title", "topic")


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path=.*missing\.csv.*file not found"):
        load_titles_csv(str(tmp_path / "missing.csv"))
    (tmp_path / "garbage.parquet").write_bytes(b"\x00\x01not a parquet file")
    with pytest.raises(ValueError, match=r"garbage\.parquet.*cannot parse as parquet"):
        load_titles_csv(str(tmp_path / "garbage.parquet"))
    (tmp_path / "latin.csv").write_bytes("title,topic\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"cannot parse as csv \(UnicodeDecodeError"):
        load_titles_csv(str(tmp_path / "latin.csv"))
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(OSError, match=r"dir\.csv"):
        load_titles_csv(str(tmp_path / "dir.csv"))
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown file type '\.docx'"):
        read_table(str(tmp_path / "notes.docx"))
    pd.DataFrame({"headline": ["a"], "topic": ["x"]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(
        ValueError, match=r"text_col='title': no such column.*\['headline', 'topic'\]"
    ):
        load_titles_csv(str(tmp_path / "cols.csv"))
    pd.DataFrame({"title": ["a", "b"], "topic": ["x", None]}).to_csv(
        tmp_path / "nan.csv", index=False
    )
    with pytest.raises(ValueError, match=r"label_col='topic' row 1: missing \(NaN\) label"):
        load_titles_csv(str(tmp_path / "nan.csv"))
    pd.DataFrame({"title": [], "topic": []}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ValueError, match="the dataset is empty"):
        load_titles_csv(str(tmp_path / "empty.csv"))


def test_unreachable_hub_and_kaggle_datasets_are_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((OSError, ImportError), match=r"name='nobody/no-such-dataset'|\[hf\]"):
        load_hf_dataset("nobody/no-such-dataset")
    try:
        import kagglehub  # noqa: F401

        expected: type[Exception] = OSError
        message = r"dataset_id='nobody/no-such-dataset': cannot download from Kaggle"
    except ImportError:
        expected, message = ImportError, r"pip install 'integral-superposition\[kaggle\]'"
    monkeypatch.setenv("KAGGLE_USERNAME", "nobody")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    with pytest.raises(expected, match=message):
        load_kaggle_dataset("nobody/no-such-dataset", "data.csv")
    with pytest.raises(ValueError, match="expected 'owner/dataset-name'"):
        load_kaggle_dataset("not-an-id", "data.csv")
    # the seed's auto-detection: a bare owner/name tries Kaggle, then the hub, and says so
    with pytest.raises(
        OSError, match=r"no reachable dataset of that name \(Kaggle: .*HuggingFace: "
    ):
        load_dataset_auto("nobody/no-such-dataset")
