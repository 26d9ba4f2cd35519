"""``k`` (the number of latents) and ``top_k`` each have one rule (``config.check_k``,
``config.check_top_k``): a bad value gives the same message from the constructor, the
config, a YAML/preset override and the ``isup`` command line."""

from __future__ import annotations

import re

import pydantic
import pytest
from integral_superposition.config import MAX_LATENTS, SAEConfig, check_k, check_top_k
from integral_superposition.experiment import ConfigError, load_preset
from integral_superposition.flows.cli import app
from integral_superposition.sae import SparseAutoencoder
from typer.testing import CliRunner

K_RANGE = f"expected an int with 1 <= k <= {MAX_LATENTS} (the number of latents)"
TOP_K_VALUE = "expected an int >= 1 (active latents per token)"

# (value, its YAML spelling on the command line, the message)
BAD_K = [
    (0, "0", f"k=0: {K_RANGE}"),
    (-1, "-1", f"k=-1: {K_RANGE}"),
    (2.5, "2.5", f"k=2.5: {K_RANGE}"),
    ("64", "'64'", f"k='64': {K_RANGE}"),
    (True, "true", f"k=True: {K_RANGE}"),
    (MAX_LATENTS + 1, str(MAX_LATENTS + 1), f"k={MAX_LATENTS + 1}: {K_RANGE}"),
]
BAD_TOP_K = [
    (0, "0", f"top_k=0: {TOP_K_VALUE}"),
    (-3, "-3", f"top_k=-3: {TOP_K_VALUE}"),
    (2.5, "2.5", f"top_k=2.5: {TOP_K_VALUE}"),
    (True, "true", f"top_k=True: {TOP_K_VALUE}"),
    (32, "32", "top_k=32: expected top_k <= k (the number of latents, 16)"),
]


def _cli_error(*sets: str) -> str:
    args = ["run", "--preset", "smoke", "--dry-run"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    return result.output


@pytest.mark.parametrize(("value", "yaml_value", "message"), BAD_K, ids=lambda v: repr(v))
def test_a_bad_k_gets_one_message_everywhere(value, yaml_value, message):
    with pytest.raises(ValueError) as rule:
        check_k(value)
    assert str(rule.value) == message
    with pytest.raises(ValueError) as model:
        SparseAutoencoder(8, value)
    assert str(model.value) == message
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
        SAEConfig(k=value)
    with pytest.raises(ConfigError) as preset:
        load_preset("smoke", {"sae.k": value})
    assert str(preset.value).endswith(f"sae.k: {message}")  # the value is named once
    assert f"sae.k: {message}" in _cli_error(f"sae.k={yaml_value}")
    # a sweep value goes through the same rule
    swept = _cli_error(f"sweep.k=[{yaml_value}]")
    assert f"sweep (k={value!r}): sae.k: {message}" in swept


@pytest.mark.parametrize(("value", "yaml_value", "message"), BAD_TOP_K, ids=lambda v: repr(v))
def test_a_bad_top_k_gets_one_message_everywhere(value, yaml_value, message):
    with pytest.raises(ValueError) as rule:
        check_top_k("topk", value, 16)
    assert str(rule.value) == message
    with pytest.raises(ValueError) as model:
        SparseAutoencoder(8, 16, architecture="topk", top_k=value)
    assert str(model.value) == message
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
        SAEConfig(k=16, architecture="topk", top_k=value)
    where = "sae" if value == 32 else "sae.top_k"  # the width check needs the whole section
    with pytest.raises(ConfigError) as preset:
        load_preset("smoke", {"sae.k": 16, "sae.architecture": "topk", "sae.top_k": value})
    assert str(preset.value).endswith(f"{where}: {message}")
    out = _cli_error("sae.k=16", "sae.architecture=topk", f"sae.top_k={yaml_value}")
    assert f"{where}: {message}" in out


def test_top_k_is_an_int_for_every_architecture_and_bounded_by_k_for_the_topk_family():
    # relu and jumprelu do not use top_k, but a value that is no count is still refused
    for arch in ("relu", "jumprelu"):
        with pytest.raises(ValueError, match=re.escape(f"top_k=0: {TOP_K_VALUE}")):
            SparseAutoencoder(8, 16, architecture=arch, top_k=0)
        assert SparseAutoencoder(8, 16, architecture=arch, top_k=32).top_k == 32
        assert SAEConfig(k=16, architecture=arch, top_k=32).top_k == 32
    # numpy integers count as ints; the model and the config keep plain ints
    np = pytest.importorskip("numpy")
    sae = SparseAutoencoder(8, np.int64(16), architecture="topk", top_k=np.int32(4))
    assert (type(sae.d_sae), type(sae.top_k)) == (int, int) and (sae.d_sae, sae.top_k) == (16, 4)
    cfg = SAEConfig(k=np.int64(16), top_k=np.int64(4), architecture="topk")
    assert (type(cfg.k), type(cfg.top_k)) == (int, int)
    # a groupmax SAE (read from other formats) splits its latents into top_k groups
    with pytest.raises(ValueError, match=r"top_k=3: a groupmax SAE splits its k=16 latents"):
        check_top_k("groupmax", 3, 16)
    assert check_top_k("groupmax", 4, 16) == 4


def test_assignment_is_checked_by_the_same_rule():
    cfg = SAEConfig(k=16, architecture="topk", top_k=4)
    with pytest.raises(pydantic.ValidationError, match=re.escape(f"k=0: {K_RANGE}")):
        cfg.k = 0
    with pytest.raises(pydantic.ValidationError, match=re.escape(f"top_k=True: {TOP_K_VALUE}")):
        cfg.top_k = True
