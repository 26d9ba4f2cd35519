"""ActivationStore: random access, aligned metadata, resumable shuffled batches, splits and
combined partition dumps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition import DumpConfig
from integral_superposition.data import demo_corpus
from integral_superposition.dump import ActivationStore, combine_dumps, dump_layer_activations
from integral_superposition.dump import batches as batches_mod
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def dumped(tiny_backend_factory, tmp_path_factory):
    """A multi-shard dump of 400 demo headlines at two hook points."""
    out = tmp_path_factory.mktemp("store") / "acts"
    cfg = DumpConfig(
        hook_points=["layer.1", "layer.3"], max_len=16, batch_size=16, shard_size_mb=0.04
    )
    store = dump_layer_activations(
        demo_corpus(400), "title", "topic", tiny_backend_factory("gemma"), cfg, out, progress=False
    )
    return store, out


def test_read_and_gather_equal_the_dumped_rows(dumped):
    store, out = dumped
    shards = [load_file(str(out / s["tensors"])) for s in store.manifest["shards"]]
    assert len(shards) > 3
    for hook in ("layer.1", "layer.3"):
        full = torch.cat([s[hook] for s in shards])
        assert full.shape == (store.n_tokens, store.d_model) and full.dtype == torch.bfloat16
        torch.testing.assert_close(store.read(0, store.n_tokens, hook), full, rtol=0, atol=0)
        # ranges across shard boundaries, empty ranges, single rows
        a = store.manifest["shards"][0]["n_tokens"] - 3
        torch.testing.assert_close(store.read(a, a + 50, hook), full[a : a + 50], rtol=0, atol=0)
        assert store.read(7, 7, hook).shape == (0, store.d_model)
        # read_into converts on the way, across shard boundaries, without a temporary
        out = torch.full((50, store.d_model), float("nan"))
        store.read_into(a, a + 50, out, hook)
        torch.testing.assert_close(out, full[a : a + 50].float(), rtol=0, atol=0)
        idx = np.random.default_rng(1).integers(0, store.n_tokens, 500)
        idx[:3] = [0, store.n_tokens - 1, idx[5]]  # edges and a repeat
        torch.testing.assert_close(store.gather(idx, hook), full[idx], rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range"):
        store.read(0, store.n_tokens + 1)
    with pytest.raises(IndexError, match="out of range"):
        store.gather([store.n_tokens])
    with pytest.raises(ValueError, match=r"out has shape \(3, \d+\): expected \(2, \d+\)"):
        store.read_into(0, 2, torch.empty(3, store.d_model))
    with pytest.raises(ValueError, match=r"hook_point='layer\.2': not in this store"):
        store.read(0, 1, "layer.2")


def test_metadata_is_aligned(dumped):
    store, _ = dumped
    n = store.n_tokens
    for arr in (store.token_ids, store.doc_ids, store.positions, store.labels):
        assert arr.shape == (n,)
    docs = store.docs.set_index("doc_id")
    assert (docs.loc[store.doc_ids, "label"].to_numpy() == store.labels).all()
    counts = np.bincount(store.doc_ids, minlength=len(docs))
    assert (counts == docs["n_tokens"].to_numpy()).all()
    assert store.label_names == sorted(docs["label_name"].unique())
    assert store.norm_stats("layer.3")["count"] == n
    chunks = list(store.iter_chunks(1000, hook_point="layer.3"))
    assert np.concatenate([r for r, _ in chunks]).tolist() == list(range(n))
    torch.testing.assert_close(
        torch.cat([x for _, x in chunks]), store.read(0, n, "layer.3").float(), rtol=0, atol=0
    )


def test_iter_chunks_read_ahead_equals_sequential_and_surfaces_errors(dumped, monkeypatch):
    store, _ = dumped
    mask = np.zeros(store.n_tokens, dtype=bool)
    mask[::3] = True
    mask[: 2 * 97] = False  # whole chunks without a kept row are skipped
    kw = dict(hook_point="layer.3", mask=mask, dtype=None)
    seq = list(store.iter_chunks(97, **kw))
    ahead = list(store.iter_chunks(97, prefetch=2, **kw))
    assert len(seq) == len(ahead) > 2 and seq[0][0][0] == 195  # the first kept row
    for (ra, xa), (rb, xb) in zip(seq, ahead, strict=True):
        assert (ra == rb).all() and xa.dtype == store.dtype and torch.equal(xa, xb)
    # a read that fails in the background thread raises in the consumer, after the good chunks
    real_read = type(store).read

    def failing_read(self, a, b, *args):
        if a >= 5 * 97:
            raise OSError(f"shard unreadable at row {a}")
        return real_read(self, a, b, *args)

    monkeypatch.setattr(type(store), "read", failing_read)
    got = []
    with pytest.raises(OSError, match="unreadable at row 485"):
        for rows, _ in store.iter_chunks(97, prefetch=2, hook_point="layer.3"):
            got.append(rows[0])
    assert got == [0, 97, 194, 291, 388]
    # leaving the loop early stops the reader thread
    it = store.iter_chunks(97, prefetch=1, hook_point="layer.3")
    next(it)
    it.close()
    import threading
    import time

    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "isup-prefetch"]


def test_train_test_split_is_disjoint_by_document(dumped):
    store, _ = dumped
    train = store.split_mask("train", test_fraction=0.2, seed=0)
    test = store.split_mask("test", test_fraction=0.2, seed=0)
    assert not (train & test).any() and (train | test).all()
    tr_docs, te_docs = set(store.doc_ids[train]), set(store.doc_ids[test])
    assert tr_docs.isdisjoint(te_docs) and len(tr_docs | te_docs) == 400
    assert 40 <= len(te_docs) <= 120  # about a fifth of the documents
    assert (store.split_mask("test", 0.2, seed=0) == test).all()  # every consumer agrees
    assert not (store.split_mask("test", 0.2, seed=1) == test).all()
    with pytest.raises(ValueError, match="split='dev'"):
        store.split_mask("dev")


def _run(store, **kw):
    return [(b.index.copy(), b.acts.clone()) for b in store.iter_batches(**kw)]


def test_iter_batches_deterministic_resumable_and_bounded(dumped, monkeypatch):
    store, _ = dumped
    kw = dict(batch_size=64, split="train", seed=7, buffer_tokens=512, block_tokens=128, epochs=2)
    full = _run(store, **kw)
    per_epoch = store.batches_per_epoch(64, buffer_tokens=512, block_tokens=128)
    assert len(full) == 2 * per_epoch > 20
    again = _run(store, **kw)
    assert all(
        (a[0] == b[0]).all() and torch.equal(a[1], b[1]) for a, b in zip(full, again, strict=True)
    )
    # batches hold the rows they name, in float32
    rows, acts = full[3]
    torch.testing.assert_close(acts, store.gather(rows).float(), rtol=0, atol=0)
    # one epoch visits each train row at most once, never a test row
    epoch = np.concatenate([r for r, _ in full[:per_epoch]])
    assert len(np.unique(epoch)) == epoch.size
    assert store.split_mask("train")[epoch].all()
    # resuming at batch n yields exactly batches n.. of the full run
    for n in (1, per_epoch - 1, per_epoch + 5):
        resumed = _run(store, start_batch=n, **kw)
        assert len(resumed) == len(full) - n
        assert all(
            (a[0] == b[0]).all() and torch.equal(a[1], b[1])
            for a, b in zip(full[n:], resumed, strict=True)
        )
    other = _run(store, **{**kw, "seed": 8})
    assert not (other[0][0] == full[0][0]).all()
    # the prefetch thread reads at most `prefetch` buffers ahead of the consumer
    loads = []
    real_load = batches_mod.BatchPlan.load

    def counting_load(self, *a, **k):
        loads.append(1)
        return real_load(self, *a, **k)

    monkeypatch.setattr(batches_mod.BatchPlan, "load", counting_load)
    it = iter(
        store.iter_batches(batch_size=64, seed=7, buffer_tokens=512, block_tokens=128, prefetch=2)
    )
    next(it)
    import time

    time.sleep(0.3)  # give the producer every chance to run ahead
    assert len(loads) <= 1 + 2 + 1  # the buffer in use, the queue, one waiting in put()
    it.close()


def test_iter_batches_errors(dumped):
    store, _ = dumped
    with pytest.raises(ValueError, match="batch_size=0"):
        next(store.iter_batches(0))
    with pytest.raises(ValueError, match="larger than every buffer"):
        next(store.iter_batches(10**7))


def test_several_dumps_read_as_one_store(tiny_backend, tmp_path):
    cfg = DumpConfig(layer=1, max_len=12)
    a = dump_layer_activations(
        demo_corpus(20), "title", "topic", tiny_backend, cfg, tmp_path / "a", progress=False
    )
    b = dump_layer_activations(
        demo_corpus(30, topics=["Sports", "Health"], seed=3),
        "title",
        "topic",
        tiny_backend,
        cfg,
        tmp_path / "b",
        progress=False,
    )
    both = ActivationStore([str(tmp_path / "a"), str(tmp_path / "b")])
    assert both.n_tokens == a.n_tokens + b.n_tokens and both.n_docs == 50
    torch.testing.assert_close(
        both.read(a.n_tokens, both.n_tokens), b.read(0, b.n_tokens), rtol=0, atol=0
    )
    assert (both.doc_ids[a.n_tokens :] == b.doc_ids + 20).all()  # document ids stay unique
    names = [both.label_names[i] for i in both.labels[a.n_tokens :]]
    assert names == [b.label_names[i] for i in b.labels]  # labels mapped by name


def test_combine_four_partitions_equals_one_dump(tiny_backend, tmp_path):
    df = demo_corpus(120)
    cfg = DumpConfig(layer=2, dtype="fp32", max_len=16, batch_size=8, shard_size_mb=0.05)
    whole = dump_layer_activations(
        df, "title", "topic", tiny_backend, cfg, tmp_path / "whole", progress=False
    )
    root = tmp_path / "parts"
    parts = [
        dump_layer_activations(
            df,
            "title",
            "topic",
            tiny_backend,
            cfg,
            root / f"part-{i}",
            partition=(i, 4),
            progress=False,
        )
        for i in range(4)
    ]
    assert all(set(p.doc_ids % 4) == {i} for i, p in enumerate(parts))
    combined = combine_dumps([str(root / f"part-{i}") for i in range(4)], str(root))
    assert combined.n_tokens == whole.n_tokens and combined.n_docs == whole.n_docs == 120
    assert combined.manifest["labels"] == whole.manifest["labels"]
    assert combined.norm_stats()["count"] == whole.n_tokens

    def keyed(s):
        order = np.lexsort((s.positions, s.doc_ids))
        return (
            s.doc_ids[order],
            s.positions[order],
            s.token_ids[order],
            s.read(0, s.n_tokens)[order],
        )

    d1, p1, t1, x1 = keyed(whole)
    d2, p2, t2, x2 = keyed(combined)
    assert (d1 == d2).all() and (p1 == p2).all() and (t1 == t2).all()
    torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-6)  # other batches, same rows
    assert combined.docs["doc_id"].tolist() == list(range(120))
    with pytest.raises(ValueError, match="must be a sub-directory"):
        combine_dumps([str(tmp_path / "whole")], str(root))
    with pytest.raises(ValueError, match="listed twice"):
        combine_dumps([str(root / "part-0"), str(root / "part-0")], str(root))


def test_the_document_split_is_a_fixed_rule_of_the_document_ids(dumped):
    """Held-out documents depend only on their ids, the fraction and the seed (pinned: a
    change would move every store's train/test split), and a store's mask is that rule."""
    from integral_superposition.dump.tokens import split_rows

    ids = np.arange(40)
    assert np.flatnonzero(split_rows(ids, "test", 0.25, seed=0)).tolist() == [3, 10, 18, 20, 21, 33]
    assert np.flatnonzero(split_rows(ids, "test", 0.25, seed=7)).tolist() == [
        6, 16, 18, 21, 23, 26, 27, 34, 35,
    ]  # fmt: skip
    assert (split_rows(ids[::-1], "train", 0.25)[::-1] == ~split_rows(ids, "test", 0.25)).all()
    assert split_rows(ids, "all").all()
    store, _ = dumped
    assert (store.split_mask("test", 0.2, 3) == split_rows(store.doc_ids, "test", 0.2, 3)).all()
    for bad, match in ((0.0, "test_fraction=0.0"), (1.0, "test_fraction=1.0")):
        with pytest.raises(ValueError, match=match):
            split_rows(ids, "test", bad)
