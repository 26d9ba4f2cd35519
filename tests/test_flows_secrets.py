"""Storage credentials never reach Prefect: which options are credentials, how a config
masks them when dumped to JSON, how ``isup`` moves them into a per-run Secret block, and a
scan of everything a real Prefect server holds after runs given inline S3 credentials
(parameters, task runs, artifacts, events, logs, blocks) plus every file the runs wrote."""

from __future__ import annotations

import datetime as _dt
import json
import time
import uuid

import pytest
from integral_superposition.credentials import (
    MASK,
    is_secret_option,
    masked_options,
    merge_options,
    option_paths,
    split_secret_options,
    without_values,
)
from integral_superposition.experiment import ConfigError
from integral_superposition.flows.config import load_preset


def test_split_secret_options_finds_credentials_at_any_depth():
    opts = {
        "key": "AKIA1", "secret": "s1", "token": "t1", "password": "p1",
        "aws_access_key_id": "a", "aws_secret_access_key": "b", "aws_session_token": "c",
        "account_key": "d", "sas_token": "e", "connection_string": "f", "client_secret": "g",
        "endpoint_url": "http://127.0.0.1:9000", "anon": False, "profile": "dev",
        "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "h"},
        "config_kwargs": {"signature_version": "s3v4"},
        "headers": {"Authorization": "Bearer i", "Accept": "*/*"},
        "s3_additional_kwargs": {"SSECustomerKey": "j", "ServerSideEncryption": "AES256"},
    }  # fmt: skip
    public, secret = split_secret_options(opts)
    assert public == {
        "endpoint_url": "http://127.0.0.1:9000", "anon": False, "profile": "dev",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"signature_version": "s3v4"}, "headers": {"Accept": "*/*"},
        "s3_additional_kwargs": {"ServerSideEncryption": "AES256"},
    }  # fmt: skip

    def leaves(d):
        return {x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])}

    assert leaves(secret) == {
        *["AKIA1", "s1", "t1", "p1", "a", "b", "c", "d", "e", "f", "g", "h", "j"],
        "Bearer i",
    }
    assert merge_options(secret, public) == opts  # nothing lost
    masked = masked_options(opts)
    assert masked["client_kwargs"] == {"region_name": "eu-west-1", "aws_secret_access_key": MASK}
    assert not is_secret_option("endpoint_url") and is_secret_option("SSEKMSKeyId")


def test_credentials_are_named_by_path_and_scrubbed_from_messages():
    secret = {"key": "AKIA9", "client_kwargs": {"aws_secret_access_key": "s3cr3t"}, "n": 7}
    assert option_paths(secret) == ["key", "client_kwargs.aws_secret_access_key", "n"]
    assert option_paths(None) == []
    message = "auth failed for AKIA9 with s3cr3t (7 tries)"
    assert without_values(message, secret) == f"auth failed for {MASK} with {MASK} ({MASK} tries)"
    assert without_values(message, {"empty": ""}) == message


def test_a_config_dumped_to_json_masks_credentials_and_refuses_the_mask():
    from fastapi.encoders import jsonable_encoder  # what Prefect stores parameters with

    cfg = load_preset(
        "smoke",
        {"storage_options": {
            "key": "AKIA-inline", "secret": "inline-secret", "endpoint_url": "http://e",
            "client_kwargs": {"aws_session_token": "inline-token"},
        }},
    )  # fmt: skip
    assert cfg.storage_options["secret"] == "inline-secret"  # kept in memory for the run
    assert cfg.inline_credentials() == {
        "key": "AKIA-inline", "secret": "inline-secret",
        "client_kwargs": {"aws_session_token": "inline-token"},
    }  # fmt: skip
    stored = json.dumps(jsonable_encoder({"cfg": cfg}))
    for value in ("AKIA-inline", "inline-secret", "inline-token"):
        assert value not in stored and value not in cfg.to_yaml()
    assert '"endpoint_url": "http://e"' in stored
    dumped = cfg.model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"storage_options: key, secret, "
                       r"client_kwargs\.aws_session_token='\*\*\*': expected a credential"):  # fmt: skip
        load_preset("smoke", {"storage_options": dumped["storage_options"]})


@pytest.mark.prefect
def test_inline_credentials_move_into_a_per_run_secret_block(prefect_api):
    from integral_superposition.tasks.blocks import load_secret_options, secure_config
    from prefect.blocks.system import Secret

    Secret(value={"key": "from-block", "endpoint_url": "http://e"}).save(
        "isup-test-base", overwrite=True
    )
    cfg = load_preset(
        "smoke",
        {"run": "r1", "storage_secret": "isup-test-base",
         "storage_options": {"secret": "inline-s", "region_name": "eu"}},
    )  # fmt: skip
    moved = secure_config(cfg)
    assert moved.storage_secret != "isup-test-base"
    assert moved.storage_secret.startswith("isup-storage-smoke-r1-")
    assert moved.storage_options == {"region_name": "eu"}
    # the per-run block holds the inline credentials and those of the block named before
    assert load_secret_options(moved.storage_secret) == {
        "key": "from-block", "endpoint_url": "http://e", "secret": "inline-s",
    }  # fmt: skip
    same = load_preset("smoke", {"run": "r1", "storage_options": {"endpoint_url": "http://e"}})
    assert secure_config(same) is same  # nothing to move


@pytest.mark.prefect
def test_credentials_are_refused_when_no_block_can_hold_them(prefect_api):
    from integral_superposition.tasks.blocks import secure_config
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = load_preset("smoke", {"run": "r2", "storage_options": {"key": "AK", "secret": "S-v"}})
    refused = r"storage_options\.key, storage_options\.secret: credentials given inline .* failed"
    with (
        temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}),  # nothing listens
        pytest.raises(ValueError, match=refused) as err,
    ):
        secure_config(cfg)
    assert "S-v" not in str(err.value)


@pytest.mark.prefect
def test_step_flows_refuse_credentials_as_parameters(prefect_api, tmp_path):
    from integral_superposition.flows.steps import report_flow

    state = report_flow(
        run_root=str(tmp_path / "e" / "r"),
        storage_options={"client_kwargs": {"aws_secret_access_key": "x"}},
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"storage_options\.client_kwargs\.aws_secret_access_key:"
                       r" credentials cannot be flow parameters"):  # fmt: skip
        state.result()


def _everything_prefect_holds(since: _dt.datetime) -> dict[str, str]:
    """Parameters, names and states of every flow run and task run, every artifact, event,
    log and block document (secrets left hidden, as the UI shows them) on the server."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventOccurredFilter

    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        out["flow_runs"] = json.dumps([r.model_dump(mode="json") for r in client.read_flow_runs()])
        out["task_runs"] = json.dumps([r.model_dump(mode="json") for r in client.read_task_runs()])
        out["artifacts"] = json.dumps([a.model_dump(mode="json") for a in client.read_artifacts()])
        out["logs"] = json.dumps([log.model_dump(mode="json") for log in client.read_logs()])
        docs = client.read_block_documents(include_secrets=False)
        out["blocks"] = json.dumps([d.model_dump(mode="json") for d in docs])
        page = client.read_events(EventFilter(occurred=EventOccurredFilter(since=since)), limit=50)
        events = list(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            events += page.events
        out["events"] = json.dumps([e.model_dump(mode="json") for e in events])
    return out


def _wait_for_event(name: str, match, timeout_s: float = 30.0):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    flt = EventFilter(
        event=EventNameFilter(name=[name]),
        occurred=EventOccurredFilter(since=_dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1)),
    )
    deadline = time.time() + timeout_s  # events reach the server asynchronously
    while True:
        with get_client(sync_client=True) as client:
            found = [e for e in client.read_events(flt, limit=50).events if match(e)]
        if found or time.time() > deadline:
            return found
        time.sleep(1)


@pytest.mark.prefect
@pytest.mark.s3
def test_inline_s3_credentials_never_reach_prefect(prefect_api, s3_bucket, tmp_path):
    """``isup run`` with S3 credentials given through ``--set``: one run that succeeds and
    one that fails. Neither the secret key nor the session token is anywhere on the Prefect
    server or in any file the runs wrote (results records included)."""
    import s3fs
    from integral_superposition.flows.cli import app
    from integral_superposition.tasks.blocks import load_secret_options
    from typer.testing import CliRunner

    bucket, opts = s3_bucket
    secret, token = f"isup-secret-{uuid.uuid4().hex}", f"isup-token-{uuid.uuid4().hex}"
    since = _dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=5)
    inline = [
        "--set", "storage_options.key=AKIAISUPINLINE", "--set", f"storage_options.secret={secret}",
        "--set", f"storage_options.token={token}",
        "--set", f"storage_options.endpoint_url={opts['endpoint_url']}",
    ]  # fmt: skip
    common = ["--preset", "smoke", "--storage", f"{bucket}/runs", *inline,
              "--set", "fanout.partitions=1", "--set", "steps.merge=false",
              "--set", "steps.steer_eval=false", "--set", "retries.delay_s=0.1"]  # fmt: skip
    ok = CliRunner().invoke(app, ["run", *common, "--run", "inline"])
    assert ok.exit_code == 0, ok.output[-4000:]
    table = tmp_path / "news.csv"
    table.write_text("title,topic\nStocks rally,Business\nCup final tonight,Sports\n")
    failed = CliRunner().invoke(
        app,
        ["run", *common, "--run", "inline-bad",
         "--set", f"data.source={table}", "--set", "data.label_col=no_such_column"],
    )  # fmt: skip
    assert failed.exit_code == 1 and "no_such_column" in failed.output, failed.output[-4000:]

    # the credentials went into one Secret block per run, which the run used by name
    sae_events = _wait_for_event(
        "isup.sae.trained", lambda e: e.payload.get("uri", "").startswith(f"{bucket}/runs/")
    )
    assert sae_events, "no isup.sae.trained event of the run"
    payload = sae_events[0].payload
    assert payload["storage_secret"].startswith("isup-storage-smoke-inline-")
    assert payload["storage_options"] == {"endpoint_url": opts["endpoint_url"]}
    assert load_secret_options(payload["storage_secret"])["secret"] == secret
    assert _wait_for_event(  # the last event of a run: everything before it was sent
        "isup.experiment.completed", lambda e: e.payload.get("run_root", "").startswith(bucket)
    )

    held = _everything_prefect_holds(since)
    assert payload["storage_secret"] in held["flow_runs"]  # the parameters name the block
    assert "isup.sae.trained" in held["events"] and "dump" in held["logs"]
    assert "no_such_column" in held["flow_runs"]  # the failed run is in what was scanned
    assert held["artifacts"].count('"key"') >= 3
    for where, text in held.items():
        assert secret not in text, f"the secret key is in the server's {where}"
        assert token not in text, f"the session token is in the server's {where}"
    fs = s3fs.S3FileSystem(**opts)
    files = fs.find(f"{bucket}/runs")
    assert any("/.prefect-results/" in f for f in files) and any(
        f.endswith("config.yaml") for f in files
    )
    for f in files:
        data = fs.cat_file(f)
        assert secret.encode() not in data and token.encode() not in data, f


@pytest.mark.prefect
@pytest.mark.s3
def test_a_flow_called_with_inline_credentials_stores_them_masked(prefect_api, s3_bucket):
    """``dump_flow`` called from Python with credentials in its config: Prefect stores the
    parameters masked, and the flow moves the credentials into a per-run Secret block."""
    from integral_superposition.flows.steps import dump_flow
    from integral_superposition.tasks.blocks import load_secret_options
    from prefect.client.orchestration import get_client

    bucket, opts = s3_bucket
    secret = f"isup-secret-{uuid.uuid4().hex}"
    cfg = load_preset(
        "smoke",
        {"storage": f"{bucket}/runs", "run": "direct", "fanout.partitions": 1,
         "storage_options": {"endpoint_url": opts["endpoint_url"], "key": "AKIADIRECT",
                             "secret": secret}},
    )  # fmt: skip
    state = dump_flow(cfg, return_state=True)
    assert state.is_completed(), state
    assert state.result().uri == f"{bucket}/runs/smoke/direct/acts"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    stored = run.parameters["cfg"]["storage_options"]
    assert stored == {"endpoint_url": opts["endpoint_url"], "key": MASK, "secret": MASK}
    assert secret not in json.dumps(run.model_dump(mode="json"))
    events = _wait_for_event(
        "isup.activations.dumped", lambda e: e.payload.get("uri", "").startswith(bucket)
    )
    assert events, "no isup.activations.dumped event of the dump"
    block = events[0].payload["storage_secret"]
    assert block.startswith("isup-storage-smoke-direct-")
    assert load_secret_options(block) == {"key": "AKIADIRECT", "secret": secret}


@pytest.mark.prefect
def test_step_commands_pass_credentials_by_the_name_of_a_secret_block(prefect_api, tmp_path):
    """``isup report --storage-option key=... --storage-option secret=...``: the flow run gets
    a Secret block's name and the endpoint, never the credentials."""
    from integral_superposition.flows.cli import app
    from integral_superposition.tasks.blocks import load_secret_options
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from typer.testing import CliRunner

    secret = f"isup-secret-{uuid.uuid4().hex}"
    root = tmp_path / "e" / "no-such-run"
    result = CliRunner().invoke(
        app,
        ["report", str(root), "--storage-option", "endpoint_url=http://127.0.0.1:9",
         "--storage-option", "key=AKIACLI", "--storage-option", f"secret={secret}"],
    )  # fmt: skip
    assert result.exit_code == 1 and "run.json" in result.output, result.output[-3000:]
    assert secret not in result.output
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["report"])))
    ours = [r for r in runs if r.parameters.get("run_root") == str(root)]
    assert len(ours) == 1
    params = ours[0].parameters
    assert params["storage_options"] == {"endpoint_url": "http://127.0.0.1:9"}
    assert params["storage_secret"].startswith("isup-storage-cli-")
    assert load_secret_options(params["storage_secret"]) == {"key": "AKIACLI", "secret": secret}
    assert secret not in json.dumps(ours[0].model_dump(mode="json"))


@pytest.mark.prefect
def test_storage_settings_of_a_run_name_the_secret_and_leave_credentials_out(prefect_api):
    from integral_superposition.tasks.blocks import save_secret_options
    from integral_superposition.tasks.refs import RunLocation

    save_secret_options("isup-test-settings", {"secret": "s", "endpoint_url": "http://a"})
    loc = RunLocation(
        storage="s3://b", experiment="e", run="r", storage_secret="isup-test-settings",
        storage_options={"secret": "s", "endpoint_url": "http://a", "region_name": "eu"},
    )  # fmt: skip
    assert loc.storage_settings() == {
        "storage_secret": "isup-test-settings", "storage_options": {"region_name": "eu"},
    }  # fmt: skip
    assert loc.model_dump(mode="json")["storage_options"]["secret"] == MASK
    # a Secret that cannot be read when the event is sent does not fail the step
    gone = loc.model_copy(update={"storage_secret": "isup-test-no-such-block"})
    assert gone.storage_settings() == {
        "storage_secret": "isup-test-no-such-block",
        "storage_options": {"endpoint_url": "http://a", "region_name": "eu"},
    }


@pytest.mark.prefect
def test_a_secret_block_saved_as_a_mapping_is_read_with_a_warning(prefect_api, caplog):
    from integral_superposition.tasks.blocks import load_secret_options, save_secret_options
    from prefect.blocks.system import Secret

    Secret(value={"secret": "m"}).save("isup-test-mapping", overwrite=True)
    save_secret_options("isup-test-string", {"secret": "s"})
    with caplog.at_level("WARNING", logger="integral_superposition.tasks.blocks"):
        assert load_secret_options("isup-test-string") == {"secret": "s"}
        assert not caplog.records
        assert load_secret_options("isup-test-mapping") == {"secret": "m"}
        assert load_secret_options("isup-test-mapping") == {"secret": "m"}
    (warning,) = caplog.records  # once per block
    assert "'isup-test-mapping' holds a mapping" in warning.getMessage()
    assert "json.dumps" in warning.getMessage()
