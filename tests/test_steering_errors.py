"""Bad input to steering gets a clear error and leaves no hook registered."""

from __future__ import annotations

import pytest
import torch
from integral_superposition import steering
from integral_superposition.backends import count_hooks
from integral_superposition.sae import SparseAutoencoder
from pydantic import ValidationError

LAYER = 2


@pytest.fixture
def setup(tiny_backend):
    sae = SparseAutoencoder(tiny_backend.d_model, 96, seed=1)
    n0 = count_hooks(tiny_backend.model)
    yield tiny_backend, sae
    assert count_hooks(tiny_backend.model) == n0, "a hook was left registered"


def _ids(backend):
    return backend.tokenizer(["the market rallied"], return_tensors="pt")["input_ids"]


def test_latent_index_out_of_range(setup):
    backend, sae = setup
    with (
        pytest.raises(ValueError, match=r"latent=96 .*out of range.*d_sae=96"),
        steering.steer(backend, sae, LAYER, steering.clamp(96, 1.0)),
    ):
        pass
    with pytest.raises(ValueError, match=r"latent=500"):
        steering.register_prehook_last_row(
            backend, LAYER, sae, steering.set_or_scale_latent(500, set_to=1.0)
        )
    with pytest.raises(ValueError, match=r"latent=-1: expected a non-negative"):
        steering.clamp(-1, 1.0)


def test_sae_width_must_match_the_hooked_layer(setup):
    backend, _ = setup
    narrow = SparseAutoencoder(backend.d_model // 2, 16)
    with (
        pytest.raises(
            ValueError,
            match=rf"sae.d_in={backend.d_model // 2} does not match.*d_model={backend.d_model}",
        ),
        steering.steer(backend, narrow, LAYER, steering.clamp(1, 1.0)),
    ):
        pass
    # a module path whose width is only known at run time: the error comes from the forward
    sae = SparseAutoencoder(backend.d_model, 16)
    with (
        pytest.raises(ValueError, match=r"dimension 128, but the SAE has d_in=64"),
        steering.steer(backend, sae, "model.layers.1.mlp.gate_proj", steering.clamp(1, 1.0)),
    ):
        backend.logits(_ids(backend))


def test_layer_index_out_of_range(setup):
    backend, sae = setup
    with pytest.raises(ValueError, match=r"layer_idx=99: layer=99 out of range: expected 0\.\.3"):
        steering.register_prehook_last_row(
            backend, layer_idx=99, sae=sae, latent_map=steering.clamp(1, 1.0)
        )
    with (
        pytest.raises(ValueError, match=r"hook_point='layer.4': layer=4 out of range"),
        steering.steer(backend, sae, "layer.4", steering.clamp(1, 1.0)),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"hook_point=None: the SAE does not record a hook point"),
        steering.steer(backend, sae, None, steering.clamp(1, 1.0)),
    ):
        pass


def test_set_to_and_scale_exactly_one():
    with pytest.raises(ValueError, match=r"set_to=1.0, scale=2.0: expected exactly one.*got both"):
        steering.set_or_scale_latent(latent_j=3, set_to=1.0, scale=2.0)
    with pytest.raises(
        ValueError, match=r"set_to=None, scale=None: expected exactly one.*got neither"
    ):
        steering.set_or_scale_latent(latent_j=3)


def test_empty_prompt_list(setup, tmp_path):
    backend, sae = setup
    with pytest.raises(ValueError, match="prompts is empty"):
        steering.compare_generations(backend, sae, LAYER, steering.clamp(1, 5.0), [], 4)
    with pytest.raises(ValueError, match="prompts is empty"):
        steering.generate_continuations(backend, [], 4)
    with pytest.raises(ValidationError, match="prompts is empty"):
        steering.SteeringParams(prompts=[])
    with pytest.raises(ValidationError, match="strengths is empty"):
        steering.SteeringParams(strengths=[])


def test_bad_positions_edits_and_max_acts(setup):
    backend, sae = setup
    with (
        pytest.raises(ValueError, match=r"'middle' is not one of"),
        steering.steer(backend, sae, LAYER, steering.clamp(1, 1.0), positions="middle"),
    ):
        pass
    with (
        pytest.raises(TypeError, match="a mask must be bool"),
        steering.steer(backend, sae, LAYER, steering.clamp(1, 1.0), positions=torch.ones(3)),
    ):
        pass
    with (
        pytest.raises(
            ValueError, match=r"clamps to a multiple of the latent's max activation: pass max_acts="
        ),
        steering.steer(backend, sae, LAYER, steering.clamp_to_max(1, 2.0)),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"max_acts has 5 values, but the SAE has d_sae=96"),
        steering.steer(backend, sae, LAYER, "1=2xmax", max_acts=[1.0] * 5),
    ):
        pass
    with pytest.raises(ValueError, match=r"edit='42 to 100': expected LATENT=VALUE"):
        steering.parse_edit("42 to 100")
    with pytest.raises(TypeError, match="edits=3"), steering.steer(backend, sae, LAYER, 3):
        pass


def test_a_latent_map_returning_the_wrong_shape_is_reported(setup):
    backend, sae = setup
    with (
        pytest.raises(
            ValueError, match=r"latent_map returned Tensor\(2,\): expected a tensor of shape"
        ),
        steering.steer(backend, sae, LAYER, lambda z: z[0, :2]),
    ):
        backend.logits(_ids(backend))


def test_a_mask_with_the_wrong_batch_size(setup):
    backend, sae = setup
    ids = backend.tokenizer(["a b", "c d", "e f"], return_tensors="pt", padding=True)["input_ids"]
    mask = torch.ones(2, ids.shape[1], dtype=torch.bool)
    with (
        pytest.raises(ValueError, match=r"the mask has 2 rows, but the forward has batch size 3"),
        steering.steer(backend, sae, LAYER, steering.clamp(1, 1.0), positions=mask),
    ):
        backend.logits(ids)


@pytest.mark.parametrize("positions", ["all", "last_prompt", "prompt", "generated"])
def test_a_prompt_with_nothing_to_steer_is_refused_naming_it(setup, positions):
    """An empty prompt, or one of only special tokens, would edit nothing (or BOS/EOS):
    refused before anything is generated, for every position set."""
    backend, sae = setup
    eos = backend.tokenizer.eos_token
    calls: list[int] = []
    hook = backend.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"prompts\[1\]='' is empty: expected text"):
            steering.compare_generations(
                backend, sae, LAYER, steering.clamp(1, 5.0), ["the market", ""], 3, positions
            )
        with pytest.raises(ValueError, match=rf"prompts\[0\]='{eos}' has only special tokens"):
            steering.compare_generations(
                backend, sae, LAYER, steering.clamp(1, 5.0), [eos], 3, positions
            )
    finally:
        hook.remove()
    assert calls == []  # nothing ran
    rows = steering.compare_generations(
        backend, sae, LAYER, steering.clamp(1, 5.0), [f"the market{eos}"], 2, positions
    )
    assert len(rows) == 1


def _logits(backend, ids):
    with torch.no_grad():
        return backend.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_last_prompt_skips_a_trailing_special_token(setup):
    """``"last_prompt"`` edits the last real token that is not special: with ``... b <eos>``
    it edits ``b`` (the logits from ``b`` on change), never the EOS."""
    backend, sae = setup
    tok = backend.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *_ids(backend)[0, 1:3].tolist(), tok.eos_token_id]])
    plain = _logits(backend, ids)
    with steering.steer(backend, sae, LAYER, steering.clamp(1, 500.0), "last_prompt") as h:
        steered = _logits(backend, ids)
    assert h.edited_tokens == {"prompt": 1, "generated": 0}
    assert torch.equal(steered[0, :2], plain[0, :2])  # before the edited token: unchanged
    assert not torch.allclose(steered[0, 2], plain[0, 2])  # the last non-special token


def test_hooks_warn_about_a_prompt_row_with_nothing_to_steer(setup):
    backend, sae = setup
    tok = backend.tokenizer
    text = _ids(backend)[0, 1:3].tolist()
    ids = torch.tensor(
        [[tok.bos_token_id, *text], [tok.bos_token_id, tok.eos_token_id, tok.eos_token_id]]
    )
    with (
        steering.steer(backend, sae, LAYER, steering.clamp(1, 5.0), "prompt") as h,
        pytest.warns(UserWarning, match=r"prompt rows \[1\] have no token to steer"),
    ):
        _logits(backend, ids)
    assert h.edited_tokens["prompt"] == 2  # the two text tokens of row 0
