"""Corrupt and non-finite inputs give a clear error naming the file (or argument), never a
silently wrong result: SAEs in our, SAELens and sparsify formats (and legacy state dicts) with
NaN/inf weights, truncated or changed safetensors files, and labels with missing values.
(Activation shards with a wrong checksum: tests/test_data_safety.py.)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import storage
from integral_superposition.sae import CorruptSAEError, SparseAutoencoder, load_sae, save_sae
from safetensors.torch import load_file, save_file

D, K = 8, 16


def _ours(folder):
    save_sae(SparseAutoencoder(D, K, architecture="topk", top_k=4, seed=0), str(folder))
    return folder, "sae_weights.safetensors", "W_dec"


def _saelens(folder):
    """A SAELens folder (cfg.json without our block, no manifest)."""
    _ours(folder)
    (folder / "manifest.json").unlink()
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.pop("isup")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, "sae_weights.safetensors", "W_enc"


def _sparsify(folder):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "encoder.weight": torch.randn(K, D, generator=g),
            "encoder.bias": torch.zeros(K),
            "W_dec": torch.randn(K, D, generator=g),
            "b_dec": torch.zeros(D),
        },
        str(folder / "sae.safetensors"),
    )
    cfg = {"d_in": D, "activation": "topk", "num_latents": K, "k": 4, "normalize_decoder": True}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, "sae.safetensors", "encoder.weight"


FORMATS = {"ours": _ours, "saelens": _saelens, "sparsify": _sparsify}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_sae_with_non_finite_weights_is_refused(fmt, bad, tmp_path):
    folder, weights, tensor = FORMATS[fmt](tmp_path / "sae")
    assert load_sae(str(folder)).d_sae == K  # the intact folder loads
    t = load_file(str(folder / weights))
    t[tensor][2, 1] = bad
    save_file(t, str(folder / weights))
    if (folder / "manifest.json").exists():  # as if the weights were saved like this
        m = json.loads((folder / "manifest.json").read_text())
        m["files"][weights] = storage.file_entry(str(folder / weights))
        (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"weights hold NaN or inf values \(\w+ has 1 of"):
        load_sae(str(folder))


def test_a_legacy_state_dict_with_nan_is_refused(tmp_path):
    state = {"enc.weight": torch.randn(K, D), "dec.weight": torch.randn(D, K)}
    state["dec.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "sae.pt")
    with pytest.raises(ValueError, match=r"sae\.pt'.*NaN or inf values"):
        load_sae(str(tmp_path / "sae.pt"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_truncated_safetensors_file_names_the_file(fmt, tmp_path):
    folder, weights, _ = FORMATS[fmt](tmp_path / "sae")
    data = (folder / weights).read_bytes()
    (folder / weights).write_bytes(data[: len(data) // 2])
    (folder / "manifest.json").unlink(missing_ok=True)  # no manifest to compare with
    with pytest.raises(CorruptSAEError, match=rf"{weights}': not a readable safetensors file"):
        load_sae(str(folder))


def test_a_changed_weights_file_is_caught_by_the_manifest(tmp_path):
    """Same size, one byte flipped in a value: still valid safetensors, but not what was saved."""
    folder, weights, _ = _ours(tmp_path / "sae")
    data = bytearray((folder / weights).read_bytes())
    data[-3] ^= 0x01
    (folder / weights).write_bytes(bytes(data))
    with pytest.raises(CorruptSAEError, match=r"but the SAE's manifest records \d+ bytes"):
        load_sae(str(folder))
    (folder / "cfg.json").write_text((folder / "cfg.json").read_text()[:-2])
    with pytest.raises(CorruptSAEError, match=r"cfg\.json'.*manifest records"):
        load_sae(str(folder))
    (folder / "manifest.json").unlink()
    with pytest.raises(CorruptSAEError, match=r"cfg\.json': not valid JSON"):
        load_sae(str(folder))


def test_a_damaged_sae_on_s3_names_the_file(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    uri = f"{bucket}/sae"
    save_sae(
        SparseAutoencoder(D, K, architecture="topk", top_k=4, seed=0), uri, storage_options=opts
    )
    data = storage.read_bytes(f"{uri}/sae_weights.safetensors", opts)
    storage.write_bytes(f"{uri}/sae_weights.safetensors", data[:100], opts)
    with pytest.raises(CorruptSAEError, match=r"sae_weights\.safetensors'"):
        load_sae(uri, storage_options=opts)


@pytest.mark.parametrize(
    "labels",
    [
        ["World", None, "Sports", "World"],
        ["World", np.nan, "Sports", "World"],
        [0.0, 1.0, np.nan, 1.0],
        ["World", "", "Sports", "World"],
    ],
    ids=["none", "nan", "float-nan", "empty"],
)
def test_missing_labels_are_refused_not_made_a_class(labels):
    from integral_superposition.analysis.enrichment import encode_label_array

    with pytest.raises(ValueError, match=r"labels: 1 of 4 labels are missing .* first at position"):
        encode_label_array(pd.Series(labels), name="labels")
    ids, names = encode_label_array(pd.Series(["World", "Sports", "World", "Sports"]), name="x")
    assert names == ["Sports", "World"] and ids.tolist() == [1, 0, 1, 0]


def test_a_labels_csv_with_missing_labels_is_refused_by_the_analysis(demo_store, tmp_path):
    """A document-label table read from a CSV where a label is missing (NaN after reading)."""
    from integral_superposition.pipelines.analyze_inputs import resolve_labels

    docs = demo_store.docs[["doc_id", "label_name"]].rename(columns={"label_name": "label"})
    docs.loc[docs.index[3], "label"] = None
    docs.to_csv(tmp_path / "labels.csv", index=False)
    table = pd.read_csv(tmp_path / "labels.csv")
    assert table["label"].isna().sum() == 1
    with pytest.raises(ValueError, match=r"labels: 1 of .* labels are missing"):
        resolve_labels(demo_store, table)


def test_a_dataset_csv_with_missing_labels_names_the_row(tmp_path):
    from integral_superposition.data import load_dataset_auto

    pd.DataFrame({"title": ["a b", "c d", "e f"], "topic": ["World", None, "Sports"]}).to_csv(
        tmp_path / "news.csv", index=False
    )
    with pytest.raises(ValueError, match=r"label_col='topic' row 1: missing \(NaN\) label"):
        load_dataset_auto(str(tmp_path / "news.csv"), text_col="title", label_col="topic")


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"[1, 2]"])
def test_a_damaged_manifest_names_the_file(tmp_path, damage):
    from integral_superposition.dump.store import ActivationStore
    from integral_superposition.dump.synthetic import write_activation_store

    uri = str(tmp_path / "acts")
    write_activation_store(torch.randn(64, D), uri)
    manifest = tmp_path / "acts" / "manifest.json"
    manifest.write_bytes(damage(manifest.read_bytes()))
    with pytest.raises(
        ValueError, match=r"manifest\.json': (not valid JSON|expected a JSON object)"
    ):
        ActivationStore(uri)
    assert not storage.verify_output(uri)
