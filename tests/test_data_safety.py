"""Corrupt, non-finite or impossible data is refused, never accepted silently."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import storage
from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.config import DumpConfig, SAEConfig
from integral_superposition.data import load_dataset_auto, load_titles_csv
from integral_superposition.dump import (
    ActivationStore,
    CorruptShardError,
    dump_layer_activations,
)
from integral_superposition.dump import shards as shards_mod
from integral_superposition.dump.shards import ShardReader
from integral_superposition.dump.synthetic import write_activation_store
from integral_superposition.merge.params import MergeParams
from integral_superposition.steering.params import SteeringParams
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


# -- shard integrity -------------------------------------------------------------------------
def _synthetic(path: Path, n: int = 600, d: int = 16, rows_per_shard: int = 200) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    write_activation_store(x, str(path), rows_per_shard=rows_per_shard, tokens_per_doc=20)
    return x


def _overwrite_rows(shard: Path, first_row: int, n_rows: int, row_bytes: int) -> None:
    """Overwrite ``n_rows`` rows of a shard's tensor in place: same size, other bytes."""
    spans = shards_mod.read_header(str(shard))
    start = next(iter(spans.values())).start + first_row * row_bytes
    with open(shard, "r+b") as f:
        f.seek(start)
        f.write(np.full(n_rows * row_bytes // 4, 7.5, dtype=np.float32).tobytes())


def test_same_size_corruption_is_caught_on_first_read(tmp_path):
    x = _synthetic(tmp_path / "acts")
    shard = tmp_path / "acts" / "shard-00001.safetensors"
    size = shard.stat().st_size
    _overwrite_rows(shard, 5, 10, 16 * 4)
    assert shard.stat().st_size == size
    assert storage.verify_output(str(tmp_path / "acts"))  # sizes alone cannot see it

    store = ActivationStore(str(tmp_path / "acts"))
    torch.testing.assert_close(store.read(0, 200), x[:200])  # an intact shard reads fine
    for read in (
        lambda: store.read(200, 210),
        lambda: store.gather([250]),
        lambda: next(iter(store.iter_chunks(1000))),
        lambda: next(iter(store.iter_batches(32, split="all", n_batches=50))),
    ):
        with pytest.raises(
            CorruptShardError,
            match=r"shard .*shard-00001\.safetensors is damaged: its content differs .* "
            r"size \(\d+ bytes\) matches \(sha256 expected .*\); rerun the dump",
        ):
            read()

    # skipping the hashes is explicit, and then the damaged rows are read as they are
    off = ActivationStore(str(tmp_path / "acts"), verify="off")
    got = off.read(200, 220)
    assert bool((got[5:15] == 7.5).all()) and torch.equal(got[:5], x[200:205])
    with pytest.raises(
        ValueError, match=r"verify='sometimes': expected one of \['first-read', 'off'\]"
    ):
        ActivationStore(str(tmp_path / "acts"), verify="sometimes")


def test_shards_are_hashed_once_per_process_and_file_version(tmp_path, monkeypatch):
    _synthetic(tmp_path / "acts")
    calls: list[str] = []
    real = storage.sha256_file

    def counting(uri, storage_options=None, chunk=8 << 20):
        calls.append(uri)
        return real(uri, storage_options, chunk)

    monkeypatch.setattr(storage, "sha256_file", counting)
    for _ in range(2):  # a second store in the same process trusts the first one's check
        store = ActivationStore(str(tmp_path / "acts"))
        store.read(0, store.n_tokens)
    assert sorted(Path(c).name for c in calls) == [f"shard-0000{i}.safetensors" for i in range(3)]
    # a file rewritten since (same bytes, new version) is hashed again
    shard = tmp_path / "acts" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes())
    ActivationStore(str(tmp_path / "acts")).read(0, 600)
    assert [Path(c).name for c in calls[3:]] == ["shard-00002.safetensors"]
    monkeypatch.setenv("ISUP_VERIFY_SHARDS", "never")
    with pytest.raises(ValueError, match=r"ISUP_VERIFY_SHARDS='never': expected one of"):
        ActivationStore(str(tmp_path / "acts"))
    monkeypatch.setenv("ISUP_VERIFY_SHARDS", "off")
    shard.write_bytes(shard.read_bytes())
    store = ActivationStore(str(tmp_path / "acts"))
    assert store.verify == "off"
    store.read(0, 600)
    assert len(calls) == 4


def test_damaged_token_table_is_caught(tmp_path):
    _synthetic(tmp_path / "acts")
    table = tmp_path / "acts" / "shard-00000.parquet"
    raw = bytearray(table.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    table.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=r"file .*shard-00000\.parquet is damaged"):
        _ = ActivationStore(str(tmp_path / "acts")).token_ids


def test_truncated_shard_names_the_file_what_was_expected_and_found(tmp_path):
    _synthetic(tmp_path / "acts")
    shard = tmp_path / "acts" / "shard-00001.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    for verify in ("first-read", "off"):
        store = ActivationStore(str(tmp_path / "acts"), verify=verify)
        store.read(0, 200)
        with pytest.raises(
            CorruptShardError,
            match=rf"shard .*shard-00001\.safetensors is damaged: expected {size} bytes "
            rf"\(from the dump's manifest\), found {size - 100} bytes \(truncated\); "
            r"rerun the dump .* recomputes damaged ones",
        ):
            store.read(0, 400)
    # without a manifest entry, the header still gives the expected size
    with pytest.raises(
        CorruptShardError,
        match=rf"header describes {size} bytes, but the file has {size - 100} bytes \(truncated\)",
    ):
        ShardReader(str(shard))
    shard.write_bytes(b"\x10\x00")
    with pytest.raises(CorruptShardError, match="safetensors header cannot be read"):
        ShardReader(str(shard))


def test_corrupted_shard_on_s3_is_caught(s3_bucket, tmp_path):
    import s3fs

    uri, opts = s3_bucket
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    write_activation_store(x, f"{uri}/acts", rows_per_shard=100, storage_options=opts)
    fs = s3fs.S3FileSystem(**opts)
    path = f"{uri[5:]}/acts/shard-00001.safetensors"
    raw = bytearray(fs.cat_file(path))
    raw[-40:] = bytes(40)  # the last rows, same size
    fs.pipe_file(path, bytes(raw))
    store = ActivationStore(f"{uri}/acts", storage_options=opts)
    first = store.shards[1].offset
    torch.testing.assert_close(store.read(0, first), x[:first])
    with pytest.raises(CorruptShardError, match=r"shard-00001\.safetensors is damaged"):
        store.read(first, first + 1)


class CountingBackend:
    """Wraps a backend and counts its forwards."""

    def __init__(self, inner):
        self.inner, self.forwards = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def capture(self, *args, **kw):
        self.forwards += 1
        return self.inner.capture(*args, **kw)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("published", [True, False], ids=["complete", "partial"])
def test_dump_rerun_recomputes_a_same_size_corrupted_shard(
    tiny_backend, demo_df, tmp_path, published
):
    cfg = DumpConfig(layer=1, max_len=16, batch_size=8, shard_size_mb=0.02)
    out = tmp_path / "d"
    store = dump_layer_activations(
        demo_df, "title", "topic", tiny_backend, cfg, out, progress=False
    )
    before = _tree(out)
    if not published:
        (out / "manifest.json").unlink()
    _overwrite_rows(out / "shard-00002.safetensors", 3, 10, store.d_model * 2)
    counting = CountingBackend(tiny_backend)
    again = dump_layer_activations(demo_df, "title", "topic", counting, cfg, out, progress=False)
    # only the damaged shard is recomputed, and the store is as an uninterrupted dump left it
    assert counting.forwards == math.ceil(store.manifest["shards"][2]["n_docs"] / cfg.batch_size)
    assert _tree(out) == before
    torch.testing.assert_close(again.read(0, again.n_tokens), store.read(0, store.n_tokens))


def test_cached_dump_step_is_invalid_after_same_size_corruption(tmp_path):
    from integral_superposition.tasks.refs import OutputRef

    _synthetic(tmp_path / "acts")
    ref = OutputRef.read("dump", "acts", str(tmp_path / "acts"))
    assert ref.is_valid()
    _overwrite_rows(tmp_path / "acts" / "shard-00000.safetensors", 0, 3, 16 * 4)
    assert not ref.is_valid()  # the cached dump is not reused: the step reruns


# -- non-finite activations stop every consumer ----------------------------------------------
@pytest.fixture(scope="module")
def inf_store(tmp_path_factory):
    """A store whose shard 2, row 7, holds an inf (as a dump of a diverging model would),
    and an SAE with finite weights for it."""
    from integral_superposition.sae import SparseAutoencoder, save_sae

    root = tmp_path_factory.mktemp("inf")
    x = torch.randn(600, 16, generator=torch.Generator().manual_seed(3))
    x[407, 5] = float("inf")
    labels = np.repeat(np.arange(30) % 3, 20)
    store = write_activation_store(
        x,
        str(root / "acts"),
        rows_per_shard=200,
        tokens_per_doc=20,
        labels=labels,
        label_names=["a", "b", "c"],
    )
    assert store.shards[2].offset == 400
    sae = SparseAutoencoder(16, 24, architecture="topk", top_k=4, seed=0)
    save_sae(sae, str(root / "sae"), metadata={"hook_name": "layer.0"})
    return root, store


WHERE = r"shard \S*shard-00002\.safetensors row 7 \(store row 407\) \(value inf in column 5\)"


def test_inf_in_a_store_stops_reads_with_the_shard_and_row(inf_store):
    from integral_superposition.dump.shards import NonFiniteActivationsError

    _root, store = inf_store
    with pytest.raises(NonFiniteActivationsError, match=WHERE):
        for _ in store.iter_chunks(64):
            pass
    with pytest.raises(NonFiniteActivationsError, match=WHERE):
        store.gather([3, 407])
    assert store.read(400, 410).isinf().sum() == 1  # raw reads stay raw
    chunks = list(store.iter_chunks(64, check_finite=False))  # and so does the explicit opt-out
    assert sum(int(x.isinf().sum()) for _, x in chunks) == 1


def test_inf_in_a_store_stops_analysis_before_publishing(inf_store, tmp_path):
    from integral_superposition.dump.shards import NonFiniteActivationsError
    from integral_superposition.pipelines.analyze import run_analysis

    root, _store = inf_store
    out = tmp_path / "analysis"
    with pytest.raises(NonFiniteActivationsError, match=WHERE):
        run_analysis(str(root / "sae"), str(root / "acts"), str(out), {"n_top": 5, "n_bands": 0})
    assert not (out / "manifest.json").exists()


def test_inf_in_a_store_stops_metrics(inf_store):
    from integral_superposition.dump.shards import NonFiniteActivationsError
    from integral_superposition.sae import load_sae
    from integral_superposition.sae.metrics import evaluate_sae

    root, store = inf_store
    with pytest.raises(NonFiniteActivationsError, match=WHERE):
        evaluate_sae(load_sae(str(root / "sae")), store, split="all")


def test_run_merge_says_where_non_finite_values_come_from(inf_store, tmp_path, monkeypatch):
    from integral_superposition import pipelines
    from integral_superposition.dump.shards import NonFiniteActivationsError
    from integral_superposition.merge import evaluate as ev
    from integral_superposition.sae import SparseAutoencoder, load_sae

    root, _store = inf_store
    params = {"fraction": 0.5, "top_n": 5, "chunk_tokens": 128, "sweep": False}
    out = tmp_path / "merged"
    # 1. a store row
    with pytest.raises(NonFiniteActivationsError, match=WHERE):
        pipelines.run_merge(str(root / "sae"), str(root / "acts"), str(out), params)
    assert not out.exists()

    clean = torch.randn(600, 16, generator=torch.Generator().manual_seed(4))
    write_activation_store(clean, str(tmp_path / "clean"), rows_per_shard=200, tokens_per_doc=20)
    # 2. the SAE's weights
    bad = SparseAutoencoder(16, 24, architecture="topk", top_k=4, seed=0)
    good = load_sae(str(root / "sae"))
    bad.load_state_dict(good.state_dict())
    with torch.no_grad():
        bad.W_dec[3, 2] = float("nan")
    monkeypatch.setattr("integral_superposition.sae.load_sae", lambda *a, **k: bad.eval())
    with pytest.raises(
        ValueError,
        match=r"SAE's weights hold NaN or inf values \(W_dec has 1, first at index \[3, 2\]\)",
    ):
        pipelines.run_merge(str(root / "sae"), str(tmp_path / "clean"), str(out), params)
    assert not out.exists()
    monkeypatch.undo()
    # 3. the computation
    real = ev.merge_with_labels

    def diverging(*a, **k):
        merged, medoids, dist, info = real(*a, **k)
        with torch.no_grad():
            merged.W_dec[0, 0] = float("inf")
        return merged, medoids, dist, info

    monkeypatch.setattr(ev, "merge_with_labels", diverging)
    with pytest.raises(
        FloatingPointError,
        match=r"merge computation produced NaN or inf values in the merged SAE \(W_dec",
    ):
        pipelines.run_merge(str(root / "sae"), str(tmp_path / "clean"), str(out), params)
    assert not out.exists()


# -- impossible sizes are refused before any work --------------------------------------------
def _quick(fn, exc, match, limit_s: float = 5.0):
    import time

    t0 = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    assert time.perf_counter() - t0 < limit_s


def test_huge_k_is_refused_at_once(tmp_path):
    from integral_superposition.config import MAX_LATENTS
    from integral_superposition.sae import SparseAutoencoder
    from integral_superposition.sae.train import train_saes

    _quick(
        lambda: SAEConfig(k=10**12),
        ValidationError,
        r"k=1000000000000: expected an int with 1 <= k <= 268435456",
    )
    _quick(
        lambda: SparseAutoencoder(640, MAX_LATENTS),
        MemoryError,
        rf"SparseAutoencoder\(d_model=640, k={MAX_LATENTS}\): needs at least [\d,.]+ GiB on cpu, "
        r"but only [\d,.]+ GiB is available",
    )
    store = write_activation_store(torch.randn(256, 16), str(tmp_path / "acts"))
    cfg = SAEConfig(k=MAX_LATENTS, architecture="topk", top_k=8, batch_size=64)
    _quick(
        lambda: train_saes(store, [cfg], [str(tmp_path / "sae")], progress=False, device="cpu"),
        MemoryError,
        rf"training 1 SAE\(s\) \(k={MAX_LATENTS}, d_model=16, batch_size=64: .*\): needs at least",
    )
    assert not (tmp_path / "sae").exists()


def test_huge_demo_corpus_is_refused_at_once():
    from integral_superposition.data import demo_corpus
    from integral_superposition.experiment import ExperimentConfig

    _quick(
        lambda: load_dataset_auto("demo:100000000"),
        ValueError,
        r"source='demo:100000000': n=100000000: the demo corpus has at most 640000 distinct "
        r"headlines \(80000 per topic x 8 topics\)",
    )
    _quick(
        lambda: demo_corpus(3 * 80_001, topics=["Sports", "Health", "World"]), ValueError, "240000"
    )
    _quick(
        lambda: ExperimentConfig.model_validate({"data": {"source": "demo:100000000"}}),
        ValidationError,
        r"'demo:100000000': the demo corpus has at most 640000 distinct headlines",
    )


def test_dump_whose_shards_cannot_fit_in_memory_is_refused(
    tiny_backend, demo_df, tmp_path, monkeypatch
):
    from integral_superposition import compute

    monkeypatch.setattr(compute, "available_memory", lambda device="cpu": 1 << 16)
    cfg = DumpConfig(layer=1, max_len=16, batch_size=8, shard_size_mb=4096)
    out = tmp_path / "d"
    _quick(
        lambda: dump_layer_activations(
            demo_df, "title", "topic", tiny_backend, cfg, out, progress=False
        ),
        MemoryError,
        r"cfg\.shard_size_mb=4096\.0 \(shards of up to \d+ tokens x 1 hook point\(s\) x d_model=\d+ "
        r"in bf16\): needs at least",
        limit_s=60,
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"jumprelu_bandwidth": math.inf}, r"jumprelu_bandwidth=inf: expected a finite number > 0"),
        ({"jumprelu_bandwidth": 0.0}, r"jumprelu_bandwidth=0\.0: expected a finite number > 0"),
        ({"jumprelu_init_threshold": math.nan}, r"jumprelu_init_threshold=nan: expected"),
    ],
)
def test_sae_refuses_non_finite_constructor_floats(kw, match):
    from integral_superposition.sae import SparseAutoencoder

    with pytest.raises(ValueError, match=match):
        SparseAutoencoder(8, 16, architecture="jumprelu", **kw)


def test_scan_chunk_that_cannot_fit_is_refused(monkeypatch):
    from integral_superposition import compute
    from integral_superposition.analysis.scan import scan_latents
    from integral_superposition.sae import SparseAutoencoder

    sae = SparseAutoencoder(16, 64, architecture="topk", top_k=4)
    x = torch.randn(4096, 16)
    assert scan_latents(sae, x, n_top=4, chunk_tokens=4096).top.fire_count.sum() > 0
    monkeypatch.setattr(compute, "available_memory", lambda device="cpu": 1 << 20)
    _quick(
        lambda: scan_latents(sae, x, n_top=4, chunk_tokens=4096),
        MemoryError,
        r"chunk_tokens=4096 with d_sae=64 \(chunks of 4096 tokens\): needs at least",
    )


class _EditedBackend(CountingBackend):
    """A backend whose captured activations are edited by ``fn(name, x) -> x``."""

    def __init__(self, inner, fn):
        super().__init__(inner)
        self.fn = fn

    def capture(self, *args, **kw):
        out = super().capture(*args, **kw)
        return {k: self.fn(k, v) for k, v in out.items()}


def test_dump_refuses_to_store_non_finite_activations(tiny_backend, demo_df, tmp_path):
    from integral_superposition.dump.shards import NonFiniteActivationsError

    def poisoned(_name, x):
        x = x.clone()
        x[1, 2, 3] = float("nan")
        return x

    cfg = DumpConfig(layer=1, max_len=16, batch_size=8)
    with pytest.raises(
        NonFiniteActivationsError,
        match=r"model produced NaN or inf activations at hook point 'layer\.1', document \d+ "
        r"\(row \d+ of the dataset\), token position 2, column 3",
    ):
        dump_layer_activations(
            demo_df, "title", "topic", _EditedBackend(tiny_backend, poisoned), cfg,
            tmp_path / "nan", progress=False,
        )  # fmt: skip
    assert not (tmp_path / "nan" / "manifest.json").exists()
    # finite model values that the storage dtype cannot hold
    big = _EditedBackend(tiny_backend, lambda _n, x: x * 1e6)
    with pytest.raises(
        NonFiniteActivationsError,
        match=r"activations overflow cfg\.dtype='fp16' at hook point 'layer\.1', .*becomes inf "
        r"when stored; dump with dtype='fp32'",
    ):
        dump_layer_activations(
            demo_df, "title", "topic", big, cfg.model_copy(update={"dtype": "fp16"}),
            tmp_path / "fp16", progress=False,
        )  # fmt: skip
    assert not (tmp_path / "fp16" / "manifest.json").exists()


def test_a_verified_dump_is_not_hashed_again_when_read(tmp_path, monkeypatch):
    from integral_superposition.dump.shards import verify_dump

    _synthetic(tmp_path / "acts")
    calls: list[str] = []
    real = storage.sha256_file

    def counting(uri, storage_options=None, chunk=8 << 20):
        calls.append(Path(uri).name)
        return real(uri, storage_options, chunk)

    monkeypatch.setattr(storage, "sha256_file", counting)
    assert verify_dump(str(tmp_path / "acts"))
    hashed = len(calls)
    assert sum(c.endswith(".safetensors") for c in calls) == 3
    ActivationStore(str(tmp_path / "acts")).read(0, 600)
    assert len(calls) == hashed
    _overwrite_rows(tmp_path / "acts" / "shard-00001.safetensors", 0, 2, 16 * 4)
    assert not verify_dump(str(tmp_path / "acts"))


def test_damaged_or_impossible_data_is_not_retried():
    from integral_superposition.dump.shards import NonFiniteActivationsError
    from integral_superposition.tasks.policy import is_transient

    for exc in (
        CorruptShardError("shard x is damaged"),
        NonFiniteActivationsError("NaN"),
        MemoryError("needs at least 10 GiB"),
        FloatingPointError("the merge computation produced NaN"),
    ):
        assert not is_transient(exc), exc


def test_inf_in_a_store_stops_the_steering_classifier(inf_store):
    from integral_superposition.dump.shards import NonFiniteActivationsError
    from integral_superposition.steering.classifier import mean_pooled_documents

    _root, store = inf_store
    with pytest.raises(NonFiniteActivationsError, match=WHERE):
        mean_pooled_documents(store, chunk_tokens=128)
