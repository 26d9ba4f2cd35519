"""Per-row edits: one forward or generation call carries rows with different edits (another
latent, another strength, or none), each row as if its edit ran alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.edits import Edit, RowEdits
from integral_superposition.steering.generation import generate_continuations
from integral_superposition.steering.hooks import LatentEditor, steer

PROMPTS = ["the market", "In other news, the", "a", "sports today:"]
SAMPLE = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=3)
E1 = Edit(5, "set", 40.0)
E2 = Edit(9, "add", 6.0)


@pytest.fixture(scope="module")
def sae(tiny_backend):
    return SparseAutoencoder(tiny_backend.d_model, 64, seed=4)


def _batch(backend, texts):
    enc = backend.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_a_forward_edits_each_row_as_its_own_edit_and_leaves_the_others_bit_identical(
    tiny_backend, sae
):
    ids, attn = _batch(tiny_backend, PROMPTS)
    model = tiny_backend.model
    with torch.inference_mode():
        base = model(input_ids=ids, attention_mask=attn).logits
        alone = {}
        for e in (E1, E2):
            with steer(tiny_backend, sae, "layer.2", [e]):
                alone[e] = model(input_ids=ids, attention_mask=attn).logits
        # rows 0 and 3: E1, row 1: E2, row 2: no edit
        re = RowEdits(4, [([0, 3], [E1]), ([1], "9+6")])
        with steer(tiny_backend, sae, "layer.2", re) as h:
            mixed = model(input_ids=ids, attention_mask=attn).logits
            counted = h.edited_tokens
    assert torch.equal(mixed[2], base[2])  # bit-identical, not merely close
    for r, e in ((0, E1), (3, E1), (1, E2)):
        torch.testing.assert_close(mixed[r], alone[e][r], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[r], base[r], atol=1e-3)  # the edit does something
    # only the edited rows' (non-special) tokens are counted
    real = int((attn[[0, 1, 3]] & (ids[[0, 1, 3]] != tiny_backend.tokenizer.bos_token_id)).sum())
    assert counted == {"prompt": real, "generated": 0}
    assert h.describe()["edits"] == [
        {"rows": 2, "edits": [E1.to_dict()]},
        {"rows": 1, "edits": [E2.to_dict()]},
    ]


def test_one_generation_call_of_several_sets_gives_each_set_its_own_rows(tiny_backend, sae):
    """Three sets in one call (E1 on the prompts' samples 0-1, E2 on samples 0-1, none on
    sample 2), run in batches that cut across the sets, against each set generated alone."""
    kw = dict(max_new_tokens=5, **SAMPLE)
    n = len(PROMPTS)
    rows, groups = [], []
    for g, samples in ((0, [0, 1]), (1, [0, 1]), (-1, [2])):
        for s in samples:
            rows += [(i, s) for i in range(n)]
            groups += [g] * n
    groups = np.array(groups)
    re = RowEdits(len(rows), [(np.flatnonzero(groups == 0), E1), (np.flatnonzero(groups == 1), E2)])
    with steer(tiny_backend, sae, "layer.2", re, positions="all") as h:
        mixed = generate_continuations(
            tiny_backend, PROMPTS, rows=rows, batch_size=5, on_batch=h.select_rows, score=True,
            vocab_sets=[[5, 6, 7]], **kw,
        )  # fmt: skip
    assert mixed.prompts == [PROMPTS[i] for i, _ in rows]
    alone = {}
    for e in (E1, E2):
        with steer(tiny_backend, sae, "layer.2", [e], positions="all"):
            alone[e] = generate_continuations(
                tiny_backend, PROMPTS, samples_per_prompt=2, sample_major=True, **kw
            )
    base = generate_continuations(
        tiny_backend, PROMPTS, first_sample=2, score=True, vocab_sets=[[5, 6, 7]], **kw
    )
    assert mixed.token_ids[: 2 * n] == alone[E1].token_ids
    assert mixed.token_ids[2 * n : 4 * n] == alone[E2].token_ids
    assert alone[E1].token_ids != alone[E2].token_ids
    assert mixed.token_ids[4 * n :] == base.token_ids
    # the unedited rows' scores are the unsteered model's
    np.testing.assert_allclose(mixed.nll[4 * n :], base.nll, rtol=1e-6)
    np.testing.assert_allclose(mixed.vocab_mass[4 * n :], base.vocab_mass, rtol=1e-6)
    # stream_ids: prompts listed twice in one call draw what the single list draws
    twice = generate_continuations(
        tiny_backend, PROMPTS + PROMPTS[:2], rows=[(4, 2), (5, 2)], stream_ids=[0, 1, 2, 3, 0, 1],
        **kw,
    )  # fmt: skip
    assert twice.token_ids == base.token_ids[:2]
    assert mixed.take(slice(4 * n, None)).token_ids == base.token_ids


def test_bad_per_row_edits_are_refused_naming_the_row(tiny_backend, sae):
    with pytest.raises(ValueError, match=r"groups\[1\] rows: row 4 out of range for n_rows=4"):
        RowEdits(4, [([0], E1), ([1, 4], E2)])
    with pytest.raises(ValueError, match=r"row 1 is already in groups\[0\]"):
        RowEdits(4, [([0, 1], E1), ([1], E2)])
    with pytest.raises(ValueError, match="row 2 is listed twice"):
        RowEdits(4, [([2, 2], E1)])
    with pytest.raises(ValueError, match="n_rows=0"):
        RowEdits(0, [])
    with pytest.raises(TypeError, match=r"groups\[0\] rows"):
        RowEdits(4, [([0.5], E1)])
    with pytest.raises(ValueError, match=r"groups\[0\]: edit='bad'"):
        RowEdits(4, [([0], "bad")])
    # a forward whose rows do not match the edits' rows
    ids, attn = _batch(tiny_backend, PROMPTS)
    re = RowEdits(5, [([0, 4], E1)])
    with steer(tiny_backend, sae, "layer.2", re) as h:
        with pytest.raises(
            ValueError, match="the forward has 4 rows but the edits are for n_rows=5"
        ):
            tiny_backend.model(input_ids=ids, attention_mask=attn)
        with pytest.raises(ValueError, match="row 5 out of range for per-row edits of n_rows=5"):
            h.select_rows([0, 5])
        h.select_rows([1, 2, 3])
        with pytest.raises(ValueError, match="the forward has 4 rows but select_rows named 3"):
            tiny_backend.model(input_ids=ids, attention_mask=attn)
    # a generation call of another length, or with rows that name no prompt
    with (
        steer(tiny_backend, sae, "layer.2", re) as h,
        pytest.raises(ValueError, match="n_rows=5, but the call has 4 rows"),
    ):
        generate_continuations(tiny_backend, PROMPTS, 3, batch_size=2, on_batch=h.select_rows)
    with pytest.raises(ValueError, match=r"rows: \(4, 0\): expected \(prompt index in 0..3"):
        generate_continuations(tiny_backend, PROMPTS, 3, rows=[(0, 0), (4, 0)])
    with pytest.raises(ValueError, match="stream_ids has 2 entries for 4 prompts"):
        generate_continuations(tiny_backend, PROMPTS, 3, stream_ids=[0, 1])
    editor = LatentEditor(sae, RowEdits(2, [([0], E1)]))
    with pytest.raises(ValueError, match="rows= must give the group of each of the 3 rows"):
        editor(torch.zeros(3, sae.d_in))
    with pytest.raises(ValueError, match="rows= is for per-row edits"):
        LatentEditor(sae, [E1])(torch.zeros(3, sae.d_in), torch.zeros(3, dtype=torch.long))
