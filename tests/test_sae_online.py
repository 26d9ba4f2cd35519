"""Online SAE training: straight from the model's forward passes through a shuffle buffer."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
from integral_superposition import DumpConfig, SAEConfig
from integral_superposition.data import demo_corpus
from integral_superposition.dump import ActivationStore, dump_layer_activations
from integral_superposition.dump.shards import verify_dump
from integral_superposition.sae import load_sae
from integral_superposition.sae.online import OnlineActivations, OnlineSource
from integral_superposition.sae.train import train_saes

DUMP = DumpConfig(layer=2, max_len=32, batch_size=64, dtype="fp32")
CFG = SAEConfig(
    architecture="topk",
    k=64,
    top_k=8,
    batch_size=256,
    epochs=1,
    shuffle_buffer_tokens=2048,
    lr_warmup_steps=5,
    log_every=5,
    checkpoint_every=8,
)


def _rows_by_token(store: ActivationStore) -> tuple[np.ndarray, torch.Tensor]:
    """The store's ``(doc_id, position)`` keys in sorted order and its rows in that order."""
    order = np.lexsort((store.positions, store.doc_ids))
    keys = np.stack([store.doc_ids[order], store.positions[order]], axis=1)
    return keys, store.gather(order).float()


@pytest.fixture(scope="module")
def pair(tiny_backend, tmp_path_factory):
    """One corpus trained twice with ``CFG``: from its dumped store, and online (writing a
    store along the way); shared by the tests that compare or resume them."""
    root = tmp_path_factory.mktemp("online-pair")
    df = demo_corpus(240)
    dumped = dump_layer_activations(
        df, "title", "topic", tiny_backend, DUMP, str(root / "acts"), progress=False
    )
    (by_store,) = train_saes(dumped, [CFG], [str(root / "sae-store")], progress=False)
    spec = OnlineActivations(
        df, "title", "topic", tiny_backend, DUMP, store_uri=str(root / "online-acts"),
        write_store=True,
    )  # fmt: skip
    (online,) = train_saes(spec, [CFG], [str(root / "sae-online")], progress=False)
    return {"df": df, "dumped": dumped, "by_store": by_store, "online": online, "root": root}


def test_online_training_matches_store_training_and_writes_the_same_store(pair):
    dumped, by_store, online = pair["dumped"], pair["by_store"], pair["online"]
    tmp_path = pair["root"]

    # same tokens, same seed, same buffer: the held-out FVU agrees within 5%
    assert online.steps > 0 and online.tokens > 0
    assert online.metrics["n_tokens"] == by_store.metrics["n_tokens"]
    assert online.metrics["fvu"] == pytest.approx(by_store.metrics["fvu"], rel=0.05)
    sae = load_sae(online.uri)
    assert sae.metadata["isup_source"] == "online"

    # the store written along the way verifies and holds what a dump of the documents holds
    written = ActivationStore(str(tmp_path / "online-acts"))
    assert verify_dump(str(tmp_path / "online-acts"))
    assert written.n_tokens == dumped.n_tokens and written.d_model == dumped.d_model
    assert written.hook_point_names == dumped.hook_point_names
    k1, x1 = _rows_by_token(written)
    k2, x2 = _rows_by_token(dumped)
    np.testing.assert_array_equal(k1, k2)
    torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5)
    order1 = np.lexsort((written.positions, written.doc_ids))
    order2 = np.lexsort((dumped.positions, dumped.doc_ids))
    np.testing.assert_array_equal(written.token_ids[order1], dumped.token_ids[order2])
    np.testing.assert_array_equal(written.labels[order1], dumped.labels[order2])
    assert written.docs.equals(dumped.docs)
    assert written.manifest["labels"] == dumped.manifest["labels"]
    assert written.manifest["masking"] == dumped.manifest["masking"]


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on every object touches deprecated aliases
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu":
            try:
                st = obj.untyped_storage()
            except RuntimeError:
                continue
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def test_online_memory_is_flat_when_the_tokens_double(tiny_backend, tmp_path):
    cfg = CFG.model_copy(update={"shuffle_buffer_tokens": 1024})
    peaks = []
    for n_docs in (120, 240):
        spec = OnlineActivations(demo_corpus(n_docs), "title", "topic", tiny_backend, DUMP)
        peak = [0]

        def watch(step, total, peak=peak):
            if step % 6 == 0:
                peak[0] = max(peak[0], _live_tensor_bytes())

        gc.collect()
        base = _live_tensor_bytes()
        (res,) = train_saes(
            spec, [cfg], [str(tmp_path / f"sae-{n_docs}")], progress=False, on_progress=watch
        )
        peaks.append((peak[0] - base, res.tokens))
    (small, tok_small), (big, tok_big) = peaks
    assert tok_big > 1.8 * tok_small
    # the buffer is seen ([~1024 + a document, 64] float32), and it does not grow with tokens
    assert small >= cfg.shuffle_buffer_tokens * tiny_backend.d_model * 4
    assert big < small * 1.25 + 256 * tiny_backend.d_model * 4


class _Stop(Exception):
    pass


def test_online_training_resumes_after_a_stop_and_skips_consumed_documents(
    pair, tiny_backend, tmp_path
):
    df = pair["df"]
    ckpt = str(tmp_path / "ckpt")
    cfg = CFG

    def spec(name):
        return OnlineActivations(
            df, "title", "topic", tiny_backend, DUMP, store_uri=str(tmp_path / name),
            write_store=True,
        )  # fmt: skip

    whole = pair["online"]  # the same documents and config, trained without a stop

    def stop_after_checkpoint(step, total):
        if step == 2 * cfg.checkpoint_every + 1:
            raise _Stop

    with pytest.raises(_Stop):
        train_saes(
            spec("acts-b"), [cfg], [str(tmp_path / "sae-b")], checkpoint_uri=ckpt,
            progress=False, on_progress=stop_after_checkpoint,
        )  # fmt: skip
    forwarded: list[int] = []
    capture = tiny_backend.capture

    def counting(ids, mask, hooks):
        forwarded.append(int(mask.sum()))
        return capture(ids, mask, hooks)

    tiny_backend.capture = counting
    try:
        source = OnlineSource(spec("acts-b"), [cfg])
        windows = source.windows(0)
        forwarded.clear()
        (resumed,) = train_saes(
            spec("acts-b"), [cfg], [str(tmp_path / "sae-b")], checkpoint_uri=ckpt, progress=False
        )
    finally:
        del tiny_backend.capture
    assert resumed.resumed_from_step == 2 * cfg.checkpoint_every
    assert resumed.steps == whole.steps
    # the windows finished before the checkpoint were not run through the model again
    done = 0
    skipped = 0
    for w in windows:
        if done + w.batches <= resumed.resumed_from_step:
            skipped += int(source.n_tok[w.docs].sum())
        done += w.batches
    total_fed = int(source.n_tok.sum())
    assert skipped > 0
    assert sum(forwarded) <= total_fed - skipped + 2 * max(
        int(source.n_tok[w.docs].sum()) for w in windows
    )
    a, b = load_sae(whole.uri), load_sae(resumed.uri)
    torch.testing.assert_close(a.W_dec, b.W_dec, rtol=1e-4, atol=1e-5)
    assert verify_dump(str(tmp_path / "acts-b"))
    assert not (tmp_path / "ckpt" / "latest.json").exists()


def test_online_bad_input_is_refused_before_anything_is_written(tiny_backend, tmp_path):
    df = demo_corpus(40)
    with pytest.raises(ValueError, match="write_store=True: expected a store_uri"):
        OnlineActivations(df, "title", "topic", tiny_backend, DUMP, write_store=True)
    with pytest.raises(TypeError, match="backend: expected an HFBackend"):
        OnlineActivations(df, "title", "topic", object(), DUMP)
    spec = OnlineActivations(df, "title", "topic", tiny_backend, DUMP)
    with pytest.raises(ValueError, match=r"cfg.hook_point='layer.3': not computed online"):
        train_saes(spec, [CFG.model_copy(update={"hook_point": "layer.3"})], [str(tmp_path / "s")])
    with pytest.raises(ValueError, match="batch_size=100000"):
        train_saes(spec, [CFG.model_copy(update={"batch_size": 100000})], [str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_a_dump_of_chosen_documents_keeps_their_ids_and_refuses_bad_ones(tiny_backend, tmp_path):
    df = demo_corpus(40)
    with pytest.raises(ValueError, match="documents: row 40 is out of range; the dataset has 40"):
        dump_layer_activations(
            df, "title", "topic", tiny_backend, DUMP, str(tmp_path / "bad"), documents=[3, 40]
        )
    assert not (tmp_path / "bad").exists()
    store = dump_layer_activations(
        df, "title", "topic", tiny_backend, DUMP, str(tmp_path / "some"), documents=[31, 5, 5],
        progress=False,
    )  # fmt: skip
    assert sorted(set(store.doc_ids.tolist())) == [5, 31]
    assert store.docs["doc_id"].tolist() == [5, 31]
    full = dump_layer_activations(
        df, "title", "topic", tiny_backend, DUMP, str(tmp_path / "all"), progress=False
    )
    rows = np.flatnonzero(np.isin(full.doc_ids, [5, 31]))
    _, x1 = _rows_by_token(store)
    order = rows[np.lexsort((full.positions[rows], full.doc_ids[rows]))]
    torch.testing.assert_close(x1, full.gather(order).float())
