"""Credentials never reach a repr, a log line, an exception message or a URI that is written
with outputs: configs mask them in repr/str and hide rejected values in validation errors,
URIs carrying a password or token are refused (masked in the error), and storage errors from
fsspec/s3fs do not echo them."""

from __future__ import annotations

import logging
import os
import traceback

import pytest
from integral_superposition import storage
from integral_superposition.credentials import masked_uri, uri_credentials
from integral_superposition.experiment import ConfigError, ExperimentConfig
from integral_superposition.flows.config import FlowExperimentConfig, load_preset
from pydantic import ValidationError

SECRET = "sEcReT-5c1e4b"
OPTIONS = {
    "key": "AKIAEXAMPLEKEY",
    "secret": SECRET,
    "endpoint_url": "http://127.0.0.1:9000",
    "client_kwargs": {"aws_session_token": SECRET, "region_name": "us-east-1"},
}


@pytest.mark.parametrize("model", [ExperimentConfig, FlowExperimentConfig])
def test_a_config_never_shows_its_credentials(model, caplog):
    cfg = model(storage_options=OPTIONS)
    log = logging.getLogger("isup.test")
    with caplog.at_level(logging.INFO):
        log.info("config: %s", cfg)
        log.info("config: %r", cfg)
    shown = [repr(cfg), str(cfg), f"{cfg}", caplog.text, cfg.model_dump_json()]
    for text in shown:
        assert SECRET not in text and "AKIAEXAMPLEKEY" not in text
    assert "http://127.0.0.1:9000" in repr(cfg)  # what is not a credential stays visible
    assert cfg.storage_options["secret"] == SECRET  # the process itself still has it


@pytest.mark.parametrize(
    "kwargs",
    [
        {"storage": f"sftp://me:{SECRET}@host/runs"},
        {"storage": f"https://host/runs?token={SECRET}"},
        {"data": {"source": f"https://me:{SECRET}@host/news.csv"}},
        {"storage_options": OPTIONS, "sweep": 5},  # an error elsewhere in the same config
    ],
)
def test_validation_errors_never_echo_a_credential(kwargs):
    for model in (ExperimentConfig, FlowExperimentConfig):
        with pytest.raises(ValidationError) as err:
            model(**kwargs)
        text = "".join(traceback.format_exception(err.value))
        assert SECRET not in text


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        (f"storage=sftp://me:{SECRET}@host/runs", "storage='sftp://me:***@host/runs'"),
        (f"data.source=https://h/x.csv?api_key={SECRET}&v=1", "'https://h/x.csv?api_key=***&v=1'"),
    ],
)
def test_a_uri_carrying_a_credential_is_refused_with_it_masked(override, shown):
    with pytest.raises(ConfigError, match="carries a credential") as err:
        load_preset("smoke", [override])
    assert SECRET not in str(err.value)
    assert shown in str(err.value)


def test_uri_credentials_and_their_mask():
    assert uri_credentials("s3://bucket/prefix") == []
    assert uri_credentials("runs/local") == []
    assert uri_credentials("https://user@host/x") == []  # a user name alone is no secret
    assert uri_credentials(f"sftp://u:{SECRET}@h/p?X-Amz-Credential=a&n=1") == [
        "password",
        "X-Amz-Credential",
    ]
    assert (
        masked_uri(f"sftp://u:{SECRET}@h:22/p?sig=1&token=t")
        == "sftp://u:***@h:22/p?sig=1&token=***"
    )
    with pytest.raises(ValueError, match=r"storage='ftp://u:\*\*\*@h/p'"):
        storage.check_root(f"ftp://u:{SECRET}@h/p")


def test_isup_run_refuses_a_storage_uri_with_a_password_without_echoing_it(tmp_path, monkeypatch):
    from integral_superposition.flows.cli import app
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["run", "--preset", "smoke", "--storage", f"sftp://me:{SECRET}@host/runs"]
    )
    assert result.exit_code == 2
    assert "carries a credential" in result.output
    assert SECRET not in result.output
    assert os.listdir(tmp_path) == []


def test_online_activations_repr_leaves_out_storage_options(tiny_backend):
    import pandas as pd
    from integral_superposition import DumpConfig
    from integral_superposition.sae.online import OnlineActivations

    spec = OnlineActivations(
        df=pd.DataFrame({"title": ["a"]}), text_col="title", label_col=None, backend=tiny_backend,
        dump=DumpConfig(layer=0), storage_options=OPTIONS,
    )  # fmt: skip
    assert SECRET not in repr(spec)


def test_storage_errors_do_not_echo_credentials(s3_server):
    """fsspec/s3fs errors for a missing bucket, an unreachable endpoint and an unknown option
    name the URI or the option, never a credential's value."""
    cases = [
        ("s3://isup-no-such-bucket/x.json", {**s3_server, "key": "k", "secret": SECRET}),
        (
            "s3://bucket/x.json",
            {
                "key": "k",
                "secret": SECRET,
                "endpoint_url": "http://127.0.0.1:9",
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
            },
        ),
        ("s3://bucket/x.json", {"key": "k", "secret": SECRET, "no_such_option": 1}),
    ]
    for uri, opts in cases:
        with pytest.raises(Exception) as err:
            storage.read_bytes(uri, opts)
        assert SECRET not in "".join(traceback.format_exception(err.value))


@pytest.mark.parametrize("option", ["--sae", "--store", "--run-root"])
def test_step_commands_refuse_a_uri_carrying_a_credential(tmp_path, monkeypatch, option):
    from integral_superposition.flows.cli import app
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    args = {"--sae": str(tmp_path / "sae"), option: f"https://me:{SECRET}@host/x"}
    result = CliRunner().invoke(app, ["analyze", *[a for kv in args.items() for a in kv]])
    assert result.exit_code == 2, result.output
    assert "carries a credential" in result.output and SECRET not in result.output
    assert os.listdir(tmp_path) == []
