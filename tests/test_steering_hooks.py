"""Steering hooks on tiny models of every causal family: identity, effect, KV-cache positions,
padding, hook removal, the error term, and the hook point matching dumped activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CAUSAL_FAMILIES
from integral_superposition import DumpConfig, steering
from integral_superposition.backends import count_hooks
from integral_superposition.data.tokenize import pad_batch, pad_token_id
from integral_superposition.dump import dump_layer_activations
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.metrics import explained_variance
from integral_superposition.steering.generation import encode_prompts

PROMPTS = [
    "the market rallied after the vote",
    "scientists report a new vaccine trial",
    "team wins",
]
LAYER = 2
NEW = 8


def _sae(backend, k=96, arch="relu", seed=1):
    return SparseAutoencoder(backend.d_model, k, architecture=arch, top_k=8, seed=seed).eval()


def _batch(backend, prompts=PROMPTS, side="left"):
    return pad_batch(
        encode_prompts(backend.tokenizer, prompts), pad_token_id(backend.tokenizer), side
    )


def _generate(backend, batch, **kw):
    return backend.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=NEW,
        do_sample=False,
        **kw,
    )


class Probe:
    """Records the input of block ``layer`` as seen by hooks registered after the steering
    hook (``after=True``) or before it."""

    def __init__(self, backend, layer=LAYER):
        self.seen: list[torch.Tensor] = []

        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.seen.append(x.detach().clone())

        self.handle = backend.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_identity_edits_generate_the_unsteered_tokens(tiny_backend_factory, family):
    backend = tiny_backend_factory(family)
    sae, batch = _sae(backend), _batch(backend)
    before = count_hooks(backend.model)
    base = _generate(backend, batch)
    with steering.steer(backend, sae, LAYER, [steering.scale(3, 1.0), steering.add(7, 0.0)]):
        same = _generate(backend, batch)
    with steering.steer(backend, sae, LAYER, lambda z: z, positions="all"):
        same_callable = _generate(backend, batch)
    assert torch.equal(base, same)
    assert torch.equal(base, same_callable)
    assert count_hooks(backend.model) == before


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_a_big_clamp_changes_generations(tiny_backend_factory, family):
    backend = tiny_backend_factory(family)
    sae, batch = _sae(backend), _batch(backend)
    base = _generate(backend, batch)
    with steering.steer(backend, sae, LAYER, steering.clamp(5, 200.0), positions="all") as h:
        steered = _generate(backend, batch)
    T = batch.input_ids.shape[1]
    changed_rows = (steered[:, T:] != base[:, T:]).any(1)
    assert bool(changed_rows.all()), (
        f"{family}: a clamp to 200 left rows {(~changed_rows).nonzero().ravel().tolist()} unchanged"
    )
    assert h.edited_tokens["prompt"] > 0 and h.edited_tokens["generated"] == len(PROMPTS) * (
        NEW - 1
    )


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_generated_token_steering_is_active_under_the_kv_cache(tiny_backend_factory, family):
    """Only generated tokens are steered: the first new token (made by the prompt forward) is
    unchanged, every later step is steered - a hook that edits only forwards with more than
    one token (the prompt) fails the second assertion. The cached generation must equal a
    no-cache forward that steers exactly the generated columns (teacher forcing)."""
    backend = tiny_backend_factory(family)
    sae, batch = _sae(backend), _batch(backend)
    T = batch.input_ids.shape[1]
    edit = steering.add(5, 60.0)
    base = _generate(backend, batch)
    with steering.steer(backend, sae, LAYER, edit, positions="generated") as h:
        gen = _generate(backend, batch)
    assert torch.equal(gen[:, T], base[:, T])
    assert not torch.equal(gen[:, T + 1 :], base[:, T + 1 :])
    assert h.edited_tokens == {"prompt": 0, "generated": len(PROMPTS) * (NEW - 1)}

    mask = torch.zeros_like(gen, dtype=torch.bool)
    mask[:, T:] = True
    full_mask = torch.cat(
        [batch.attention_mask, torch.ones(len(PROMPTS), NEW, dtype=torch.long)], 1
    )
    with steering.steer(backend, sae, LAYER, edit, positions=mask), torch.no_grad():
        logits = backend.model(input_ids=gen, attention_mask=full_mask, use_cache=False).logits
    assert torch.equal(logits[:, T:-1].argmax(-1), gen[:, T + 1 :])

    with steering.steer(backend, sae, LAYER, edit, positions="generated"):
        no_cache = _generate(backend, batch, use_cache=False)
    assert torch.equal(no_cache, gen)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_steer_the_last_real_token_of_each_row(tiny_backend_factory, family, side):
    backend = tiny_backend_factory(family)
    sae, batch = _sae(backend), _batch(backend, side=side)
    before = Probe(backend)
    with steering.steer(backend, sae, LAYER, steering.clamp(4, 30.0), positions="last_prompt"):
        after = Probe(backend)
        with torch.no_grad():
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
            logits = backend.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=positions,
                use_cache=False,
            ).logits
        singles = []
        for p in PROMPTS:
            one = _batch(backend, [p])
            with torch.no_grad():
                singles.append(
                    backend.model(input_ids=one.input_ids, use_cache=False).logits[0, -1]
                )
    before.remove()
    after.remove()
    changed = (after.seen[0] - before.seen[0]).abs().amax(-1) > 0  # [B, T]
    L = batch.lengths
    T = batch.input_ids.shape[1]
    last = torch.full_like(L, T - 1) if side == "left" else L - 1
    expected = torch.zeros_like(changed)
    expected[torch.arange(len(PROMPTS)), last] = True
    assert torch.equal(changed, expected)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(logits[i, last[i]], singles[i], atol=2e-4, rtol=2e-4)


def test_padding_and_bos_are_never_steered(tiny_backend):
    sae, batch = _sae(tiny_backend), _batch(tiny_backend, side="left")
    before = Probe(tiny_backend)
    with steering.steer(tiny_backend, sae, LAYER, steering.add(4, 10.0), positions="all"):
        after = Probe(tiny_backend)
        with torch.no_grad():
            tiny_backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    before.remove()
    after.remove()
    changed = (after.seen[0] - before.seen[0]).abs().amax(-1) > 0
    bos = batch.input_ids == tiny_backend.tokenizer.bos_token_id
    assert torch.equal(changed, batch.attention_mask.bool() & ~bos)


def test_hooks_are_removed_on_exit_after_errors_and_by_handles(tiny_backend):
    sae = _sae(tiny_backend)
    model = tiny_backend.model
    n0 = count_hooks(model)
    with steering.steer(tiny_backend, sae, LAYER, steering.clamp(1, 5.0)) as h:
        assert count_hooks(model) == n0 + 2 and h.active
    assert count_hooks(model) == n0 and not h.active
    with pytest.raises(RuntimeError, match="boom"), steering.steer(tiny_backend, sae, LAYER, "1=5"):
        raise RuntimeError("boom")
    assert count_hooks(model) == n0
    modifier = steering.set_or_scale_latent(latent_j=3, set_to=100.0)
    handle = steering.register_prehook_last_row(
        tiny_backend, layer_idx=LAYER, sae=sae, latent_map=modifier
    )
    assert count_hooks(model) == n0 + 2
    batch = _batch(tiny_backend)
    out = tiny_backend.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3
    )
    assert out.shape[1] == batch.input_ids.shape[1] + 3
    handle.remove()
    handle.remove()  # idempotent
    assert count_hooks(model) == n0


def test_error_term_identity_and_the_reconstruction_flag(tiny_backend):
    """With no change to the latents the hooked activations equal the originals (x + dec(z) -
    dec(z)); keep_error=False replaces them by the SAE reconstruction."""
    sae, batch = _sae(tiny_backend), _batch(tiny_backend)
    for edits in (lambda z: z, steering.scale(2, 1.0), []):
        before = Probe(tiny_backend)
        with steering.steer(tiny_backend, sae, LAYER, edits, positions="all", include_special=True):
            after = Probe(tiny_backend)
            with torch.no_grad():
                tiny_backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        before.remove()
        after.remove()
        torch.testing.assert_close(after.seen[0], before.seen[0], atol=1e-5, rtol=0)
    before = Probe(tiny_backend)
    with steering.steer(
        tiny_backend, sae, LAYER, [], positions="all", keep_error=False, include_special=True
    ):
        after = Probe(tiny_backend)
        with torch.no_grad():
            tiny_backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    before.remove()
    after.remove()
    real = batch.attention_mask.bool()
    x, x2 = before.seen[0][real], after.seen[0][real]
    with torch.no_grad():
        torch.testing.assert_close(x2, sae.reconstruct(x), atol=1e-4, rtol=1e-4)
    assert (x2 - x).abs().max() > 1e-2


def test_the_hook_sees_exactly_the_dumped_activations(tiny_backend, tmp_path):
    """The reconstruction error at the steering hook point equals the SAE's FVU on the
    activations a dump at the same layer stored."""
    from integral_superposition.data import demo_corpus

    df = demo_corpus(24)
    store = dump_layer_activations(
        df, "title", "topic", tiny_backend,
        DumpConfig(layer=LAYER, max_len=100, batch_size=8, dtype="fp32"), str(tmp_path / "acts"),
        progress=False,
    )  # fmt: skip
    sae = _sae(tiny_backend)
    with torch.no_grad():
        x = store.read(0, store.n_tokens)
        fvu_dump = 1 - explained_variance(x, sae.reconstruct(x))
    batch = pad_batch(
        encode_prompts(tiny_backend.tokenizer, df["title"].tolist()),
        pad_token_id(tiny_backend.tokenizer),
        "right",
    )
    before = Probe(tiny_backend)
    with steering.steer(
        tiny_backend, sae, f"layer.{LAYER}", [], positions="prompt", keep_error=False
    ):
        after = Probe(tiny_backend)
        with torch.no_grad():
            tiny_backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    before.remove()
    after.remove()
    changed = (after.seen[0] - before.seen[0]).abs().amax(-1) > 0
    assert int(changed.sum()) == store.n_tokens  # the same tokens: no BOS, no pad
    rows = (torch.from_numpy(store.doc_ids), torch.from_numpy(store.positions.astype(np.int64)))
    assert bool(changed[rows].all())
    torch.testing.assert_close(before.seen[0][rows], x, atol=1e-5, rtol=1e-5)
    fvu_hook = 1 - explained_variance(before.seen[0][rows], after.seen[0][rows])
    assert fvu_hook == pytest.approx(fvu_dump, rel=1e-4)
    # the previous block's input is a different tensor: a shifted mapping would be caught
    prev = Probe(tiny_backend, LAYER - 1)
    with torch.no_grad():
        tiny_backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    prev.remove()
    assert not torch.allclose(prev.seen[0][rows], x, atol=1e-3)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "merged"])
def test_the_editor_equals_the_full_formula_for_every_architecture(arch):
    torch.manual_seed(0)
    if arch == "merged":
        idx = torch.arange(48) % 16
        sae = SparseAutoencoder(32, 16, merge_index=idx, seed=2)
    else:
        sae = SparseAutoencoder(32, 48, architecture=arch, top_k=6, seed=2)
        if arch in ("batchtopk", "jumprelu"):
            with torch.no_grad():
                sae.threshold.fill_(0.05)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 32) * 2
    edits = [
        steering.clamp(3, 4.0),
        steering.scale(5, 3.0),
        steering.add(7, -1.5),
        steering.ablate(3),
        steering.clamp(9, 2.0),
    ]
    editor = steering.LatentEditor(sae, edits)
    with torch.no_grad():
        z = sae.encode(x)
        z2 = z.clone()
        for e in edits:
            z2 = e(z2)
        expected = x + sae.decode(z2) - sae.decode(z)
        torch.testing.assert_close(editor(x), expected, atol=1e-4, rtol=1e-4)
        replace = steering.LatentEditor(sae, edits, keep_error=False)
        torch.testing.assert_close(replace(x), sae.decode(z2), atol=1e-4, rtol=1e-4)


def test_merged_and_saelens_folder_saes_steer(tiny_backend, tmp_path):
    """A merged SAE and an SAE read from a plain SAELens folder (hook point from its metadata)."""
    import json

    from integral_superposition.sae import load_sae, save_sae
    from safetensors.torch import save_file

    batch = _batch(tiny_backend)
    base = _generate(tiny_backend, batch)
    merged = SparseAutoencoder(tiny_backend.d_model, 24, merge_index=torch.arange(96) % 24, seed=3)
    save_sae(
        merged, str(tmp_path / "merged"), metadata={"hook_name": f"blocks.{LAYER}.hook_resid_pre"}
    )
    merged = load_sae(str(tmp_path / "merged"))
    assert merged.is_merged
    with steering.steer(tiny_backend, merged, None, steering.scale(2, 1.0)) as h:
        assert h.hook_point.name == f"layer.{LAYER}"
        assert torch.equal(_generate(tiny_backend, batch), base)
    with steering.steer(tiny_backend, merged, None, steering.clamp(2, 200.0)):
        assert not torch.equal(_generate(tiny_backend, batch), base)

    src = _sae(tiny_backend)
    folder = tmp_path / "saelens"
    folder.mkdir()
    save_file(
        {k: getattr(src, k).detach().contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "standard", "d_in": src.d_in, "d_sae": src.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": f"blocks.{LAYER - 1}.hook_resid_post"},
    }  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(str(folder))
    with steering.steer(tiny_backend, loaded, None, steering.clamp(5, 200.0)) as h:
        assert h.hook_point.name == f"layer.{LAYER}"  # resid_post of block i = input of block i+1
        from_folder = _generate(tiny_backend, batch)
    with steering.steer(tiny_backend, src, LAYER, steering.clamp(5, 200.0)):
        direct = _generate(tiny_backend, batch)
    assert torch.equal(from_folder, direct) and not torch.equal(direct, base)


def test_clamp_to_max_uses_the_data_maxima(tiny_backend):
    import pandas as pd

    sae = _sae(tiny_backend)
    mx = np.linspace(1.0, 2.0, sae.d_sae)
    table = pd.DataFrame({"latent": np.arange(sae.d_sae), "max_act": mx})
    for source in (mx, torch.tensor(mx), table):
        (e,) = steering.edits.resolve_edits([steering.clamp_to_max(10, 3.0)], sae.d_sae, source)
        assert e.op == "set" and e.value == pytest.approx(3.0 * mx[10])
    batch = _batch(tiny_backend)
    with steering.steer(tiny_backend, sae, LAYER, "10=3xmax", max_acts=table):
        a = _generate(tiny_backend, batch)
    with steering.steer(tiny_backend, sae, LAYER, steering.clamp(10, 3.0 * mx[10])):
        b = _generate(tiny_backend, batch)
    assert torch.equal(a, b)


def test_compare_generations_side_by_side(tiny_backend):
    sae = _sae(tiny_backend)
    rows = steering.compare_generations(
        tiny_backend, sae, LAYER, steering.clamp(5, 200.0), PROMPTS, max_new_tokens=6
    )
    assert [r[0] for r in rows] == PROMPTS
    assert all(isinstance(r[1], str) and isinstance(r[2], str) for r in rows)
    assert any(r[1] != r[2] for r in rows)
    same = steering.compare_generations(
        tiny_backend, sae, LAYER, steering.scale(5, 1.0), PROMPTS, 6
    )
    assert all(r[1] == r[2] for r in same)


def test_parse_edit_and_edit_objects():
    assert steering.parse_edit("42=100") == steering.clamp(42, 100.0)
    assert steering.parse_edit("42=3xmax") == steering.clamp_to_max(42, 3.0)
    assert steering.parse_edit("42*0.5") == steering.scale(42, 0.5)
    assert steering.parse_edit("42+-8") == steering.add(42, -8.0)
    assert steering.parse_edit("42:ablate") == steering.ablate(42)
    assert str(steering.clamp(3, 2.5)) == "3=2.5"
    z = torch.ones(2, 5)
    assert steering.clamp(1, 7.0)(z)[:, 1].tolist() == [7.0, 7.0]
    assert steering.scale(1, 3.0)(z)[:, 1].tolist() == [3.0, 3.0]
    assert steering.ablate(4)(z)[:, 4].tolist() == [0.0, 0.0]
    assert z.sum() == 10  # edits return copies
    assert steering.set_or_scale_latent(latent_j=2, scale=0.5) == steering.scale(2, 0.5)


@pytest.mark.gemma
def test_steering_the_real_gemma(gemma_backend):
    """gemma-3-270m (fp32): identity edits keep the tokens, generated-token steering starts
    after the first new token and agrees with a teacher-forced no-cache forward."""
    backend = gemma_backend
    sae = SparseAutoencoder(backend.d_model, 256, seed=5).eval()
    batch = _batch(backend, ["The capital of France is", "In sports news today,"])
    n0 = count_hooks(backend.model)
    base = _generate(backend, batch)
    with steering.steer(backend, sae, "layer.9", [steering.scale(3, 1.0)]):
        assert torch.equal(_generate(backend, batch), base)
    T = batch.input_ids.shape[1]
    edit = steering.add(11, 4000.0)  # the residual stream's norm at layer 9 is in the thousands
    with steering.steer(backend, sae, "layer.9", edit, positions="generated") as h:
        gen = _generate(backend, batch)
    assert h.edited_tokens["generated"] == 2 * (NEW - 1)
    assert torch.equal(gen[:, T], base[:, T]) and not torch.equal(gen[:, T + 1 :], base[:, T + 1 :])
    mask = torch.zeros_like(gen, dtype=torch.bool)
    mask[:, T:] = True
    full = torch.cat([batch.attention_mask, torch.ones(2, NEW, dtype=torch.long)], 1)
    with steering.steer(backend, sae, "layer.9", edit, positions=mask), torch.no_grad():
        logits = backend.model(input_ids=gen, attention_mask=full, use_cache=False).logits
    agree = (logits[:, T:-1].argmax(-1) == gen[:, T + 1 :]).float().mean()
    assert agree >= 0.9
    assert count_hooks(backend.model) == n0
