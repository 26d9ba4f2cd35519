"""The smoke experiment end to end against a real Prefect server: local and S3 storage,
caching across runs, selective reruns, recomputation of deleted outputs, retries of
transient failures, and bad configs failing at once."""

from __future__ import annotations

import datetime as _dt
import errno
import shutil
import time

import pytest
from integral_superposition import storage
from integral_superposition.experiment import ConfigError
from integral_superposition.flows.config import load_preset

pytestmark = pytest.mark.prefect


def smoke(storage_root, **overrides):
    """The smoke preset writing under ``storage_root``, with fast retries."""
    return load_preset("smoke", {"storage": str(storage_root), "retries.delay_s": 0.2, **overrides})


def run_experiment(cfg):
    from integral_superposition.flows.experiment import experiment_flow

    t0 = time.perf_counter()
    result = experiment_flow(cfg)
    return result, time.perf_counter() - t0


def states(result) -> dict[tuple[str, str], str]:
    return {(s.step, s.name): s.state for s in result.steps}


def task_runs(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def flow_run_artifacts(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _results_blocks():
    from integral_superposition.tasks.blocks import SecretRemoteFileSystem
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        docs = client.read_block_documents()
    return [
        SecretRemoteFileSystem.load(d.name)
        for d in docs
        if d.block_type and d.block_type.slug == SecretRemoteFileSystem.get_block_type_slug()
    ]


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    cfg = smoke(tmp_path_factory.mktemp("experiments"), run="first")
    result, elapsed = run_experiment(cfg)
    return cfg, result, elapsed


def test_smoke_experiment_runs_end_to_end(first_run):
    cfg, result, _ = first_run
    steps = [s.step for s in result.steps]
    assert steps.count("dump") == 4 and "combine" in steps  # four partitions, one store
    for step in ("data", "train", "analyze", "merge", "steer_eval", "report"):
        assert step in steps, step
    assert all(s.state == "Completed" for s in result.steps), states(result)
    root = cfg.run_root()
    for s in result.steps:
        if s.output is not None:
            assert s.output.uri.startswith(root), s.output.uri
            assert s.output.is_valid(), s.output.uri
    store = result.outputs("activations")[-1]
    parts = [o for o in result.outputs("activations") if o.name.startswith("part-")]
    assert store.summary["n_tokens"] == sum(p.summary["n_tokens"] for p in parts) > 0
    page = result.report_uri
    assert page == storage.join(root, "report", "report.html")
    html = storage.read_bytes(page).decode()
    assert "Metrics" in html and "Merge" in html and "layer2-topk-k128" in html
    # every section, with the controls the science needs: merge against a random partition,
    # steering against its alpha0, random-latent and own-label controls
    for section in (
        "Merge (layer2-topk-k128)",
        "with a random-partition control",
        "Steering",
        "Strength sweep with controls",
    ):
        assert section in html, section
    import pandas as pd

    sweep = pd.read_parquet(storage.join(root, "merge", "layer2-topk-k128", "merge_sweep.parquet"))
    assert {"original", "cluster", "random"} <= set(sweep["partition"])
    steer = pd.read_parquet(storage.join(root, "steering", "layer2-topk-k128", "sweep.parquet"))
    assert {"steer", "alpha0", "random", "own_label", "unsteered"} <= set(steer["control"])
    index = storage.read_json(storage.join(root, "run.json"))
    assert [s["step"] for s in index["steps"]] == steps
    assert storage.exists(storage.join(root, "results.csv"))
    probe = pd.read_parquet(storage.join(root, "results_probe.parquet"))
    assert set(probe["sae"]) == {"layer2-topk-k128"} and "dense" in set(probe["method"])
    assert "Sparse probing" in html
    # the headline table compares the merge and the steering with their controls
    for group in ("SAE", "Sparse probing", "Merge", "Steering"):
        assert f'<tr class="group"><th colspan="4">{group}</th></tr>' in html, group
    assert "random partition: " in html and "random latent " in html


def test_merge_and_steering_start_after_the_analysis(first_run):
    """The analysis does not queue behind the merge for the GPU slot and the shared model."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, result, _ = first_run
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result.flow_run_id]))
        )
    by_task: dict[str, list] = {}
    for r in runs:
        by_task.setdefault(r.name.rsplit("-", 1)[0], []).append(r)  # "analyze-sae-1a2"
    analyses, later = by_task["analyze-sae"], by_task["merge-sae"] + by_task["steer-eval"]
    assert analyses and later, sorted(by_task)
    analysis_end = max(r.end_time for r in analyses)
    for r in later:
        assert r.start_time >= analysis_end, (r.name, r.start_time, analysis_end)


def test_the_prefect_ui_gets_progress_tables_a_summary_and_events(first_run):
    """Progress artifacts during dump and training, metrics tables, the markdown summary
    (small PNGs, a link to the HTML report), and ``isup.sae.trained`` with the metrics."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    _, result, _ = first_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result.flow_run_id]))
        )
    by_type: dict[str, list] = {}
    for a in arts:
        by_type.setdefault(a.type, []).append(a)
    progress = {a.key for a in by_type.get("progress", [])}
    assert any(k.startswith("dump-part-") for k in progress), progress
    assert any(k.startswith("train-") for k in progress), progress
    assert all(a.data == 100.0 for a in by_type["progress"])  # every one ran to the end
    tables = {a.key for a in by_type.get("table", [])}
    assert "sae-metrics-layer2-topk-k128" in tables and "experiment-metrics" in tables, tables
    (summary,) = [a for a in by_type["markdown"] if a.key == "experiment-summary"]
    assert "data:image/png;base64," in summary.data
    assert f"file://{result.report_uri}" in summary.data
    (link,) = [a for a in arts if a.key == "experiment-report"]  # stored as markdown
    assert f"file://{result.report_uri}" in link.data

    sae = result.outputs("sae")[0]
    flt = EventFilter(
        event=EventNameFilter(name=["isup.sae.trained"]),
        occurred=EventOccurredFilter(since=_dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1)),
    )
    deadline = time.time() + 30  # events reach the server asynchronously
    while True:
        with get_client(sync_client=True) as client:
            events = [e for e in client.read_events(flt, limit=50).events
                      if e.payload.get("content_hash") == sae.content_hash]  # fmt: skip
        if events or time.time() > deadline:
            break
        time.sleep(1)
    assert events, "no isup.sae.trained event for the trained SAE"
    payload = events[0].payload
    assert payload["uri"] == sae.uri and payload["metrics"] == sae.summary["metrics"]
    assert {"fvu", "l0"} <= set(payload["metrics"]), payload["metrics"]
    assert events[0].resource["isup.producer"] == "experiment"


def test_second_run_has_every_task_cached(first_run):
    cfg, first, first_s = first_run
    second, elapsed = run_experiment(cfg.model_copy(update={"run": "second"}))
    assert second.all_cached, states(second)
    assert len(second.steps) == len(first.steps)
    # nothing was recomputed: the run reuses the first run's outputs
    assert [s.output.uri for s in second.steps if s.output] == [
        s.output.uri for s in first.steps if s.output
    ]
    assert second.report_uri == first.report_uri
    assert elapsed < max(20.0, 0.5 * first_s), (elapsed, first_s)
    # the cached run's UI still has the summary, the report link and links to its outputs
    arts = {a.key: a for a in flow_run_artifacts(second.flow_run_id)}
    summary = arts["experiment-summary"].data
    assert f"file://{first.report_uri}" in summary and "data:image/png;base64," in summary
    assert "reused unchanged from an earlier run" in summary
    assert f"file://{first.report_uri}" in arts["experiment-report"].data
    assert "experiment-metrics" in arts
    outputs = arts["run-outputs"].data
    for s in second.steps:
        if s.output is not None:
            assert f"(file://{s.output.uri})" in outputs, s.output.uri
    assert outputs.count("| Cached |") == len(second.steps)


def test_changing_one_sae_parameter_reruns_only_training_and_after(first_run):
    cfg, first, _ = first_run
    changed = smoke(cfg.storage, run="lr", **{"sae.lr": 0.002})
    result, _ = run_experiment(changed)
    by_step: dict[str, set[str]] = {}
    for s in result.steps:
        by_step.setdefault(s.step, set()).add(s.state)
    for step in ("data", "dump", "combine"):
        assert by_step[step] == {"Cached"}, (step, by_step)
    for step in ("train", "analyze", "merge", "steer_eval", "report"):
        assert by_step[step] == {"Completed"}, (step, by_step)
    new_sae = result.outputs("sae")[0]
    assert new_sae.uri.startswith(changed.run_root())
    assert new_sae.content_hash != first.outputs("sae")[0].content_hash


def test_step_flows_share_the_experiments_cache(first_run):
    """``isup dump``/``train``/``analyze`` run the same cached tasks as the experiment: on
    the experiment's inputs they reuse its outputs (the analysis found the store through
    the SAE's run.json, as the event-triggered ``analyze`` deployment does)."""
    from integral_superposition.flows.steps import analyze_flow, dump_flow, train_flow

    cfg, first, _ = first_run
    again = cfg.model_copy(update={"run": "steps"})
    store = dump_flow(again)
    assert store.uri == first.outputs("activations")[-1].uri
    (sae,) = train_flow(again, store_uri=store.uri)
    assert sae.uri == first.outputs("sae")[0].uri
    state = analyze_flow(
        sae_uri=sae.uri, params=cfg.analysis, model_id="tiny:gemma", return_state=True
    )
    assert state.result().uri == first.outputs("analysis")[0].uri
    runs = task_runs(str(state.state_details.flow_run_id))
    assert [t.state_name for t in runs] == ["Cached"]


def test_deleted_outputs_are_recomputed_not_trusted(first_run):
    cfg, first, _ = first_run
    part = next(o for o in first.outputs("activations") if o.name == "part-001-of-004")
    analysis = first.outputs("analysis")[0]
    shutil.rmtree(part.uri)
    shutil.rmtree(analysis.uri)
    result, _ = run_experiment(cfg.model_copy(update={"run": "after-delete"}))
    st = states(result)
    assert st[("dump", "part-001-of-004")] == "Completed"
    assert st[("dump", "part-000-of-004")] == "Cached"
    assert st[("combine", "acts")] == "Completed"  # its old manifest names the deleted shards
    assert st[("train", "layer2-topk-k128")] == "Cached"  # same content, so same key
    assert st[("analyze", "layer2-topk-k128")] == "Completed"
    for s in result.steps:
        if s.output is not None:
            assert s.output.is_valid(), s.output.uri
    # the recomputed partition lands in this run; the combined store holds all four parts
    new_part = next(o for o in result.outputs("activations") if o.name == "part-001-of-004")
    assert new_part.uri.startswith(cfg.model_copy(update={"run": "after-delete"}).run_root())
    assert new_part.content_hash == part.content_hash


@pytest.mark.s3
def test_smoke_on_s3_retries_a_transient_failure(prefect_api, s3_bucket, monkeypatch):
    from prefect.blocks.system import Secret

    bucket, opts = s3_bucket
    # the credentials and endpoint come only from a Prefect Secret block
    Secret(value=dict(opts)).save("isup-test-s3", overwrite=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    fs, _ = storage.get_fs(bucket, opts)  # the (cached) filesystem the tasks will use
    original = fs.put_file
    injected: list[str] = []

    def flaky_put(lpath, rpath, *args, **kwargs):
        if "sae_weights.safetensors" in str(rpath) and not injected:
            injected.append(str(rpath))
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (injected)")
        return original(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    cfg = smoke(f"{bucket}/runs", run="s3", storage_secret="isup-test-s3")
    result, _ = run_experiment(cfg)
    assert injected, "the fault was not injected"
    assert all(s.state == "Completed" for s in result.steps), states(result)
    for s in result.steps:
        if s.output is not None:
            assert s.output.uri.startswith(f"{bucket}/runs/smoke/s3/"), s.output.uri
            assert s.output.is_valid(opts)
    train_runs = [t for t in task_runs(result.flow_run_id) if t.name.startswith("train-saes")]
    assert [t.run_count for t in train_runs] == [2]  # failed once, retried once
    sae = result.outputs("sae")[0]
    assert sae.summary["resumed_from_step"] > 0  # the retry resumed from a checkpoint
    html = storage.read_bytes(result.report_uri, opts).decode()
    assert "layer2-topk-k128" in html
    # the credentials are never written with the run, nor in the results block
    saved = storage.read_bytes(f"{bucket}/runs/smoke/s3/config.yaml", opts).decode()
    assert "storage_secret: isup-test-s3" in saved and opts["endpoint_url"] not in saved
    from integral_superposition.tasks.blocks import SecretRemoteFileSystem

    (block,) = [
        b for b in _results_blocks() if isinstance(b, SecretRemoteFileSystem)
        and b.basepath.startswith(f"{bucket}/runs/smoke")
    ]  # fmt: skip
    assert block.credentials_secret == "isup-test-s3"
    assert not set(block.settings) & {"key", "secret", "endpoint_url"}

    again, _ = run_experiment(cfg.model_copy(update={"run": "s3-again"}))
    assert again.all_cached, states(again)


def test_bad_config_is_rejected_naming_the_field():
    with pytest.raises(ConfigError, match=r"sae\.k: k=0: expected an int with 1 <= k"):
        load_preset("smoke", {"sae.k": 0})
    with pytest.raises(ConfigError, match=r"sae: top_k=1000: expected top_k <= k"):
        load_preset("smoke", {"sae.top_k": 1000})
    with pytest.raises(ConfigError, match=r"dump\.dtype"):
        load_preset("smoke", {"dump.dtype": "int8"})


def test_bad_input_fails_at_once_without_retries(prefect_api, tmp_path):
    from integral_superposition.flows.experiment import experiment_flow

    table = tmp_path / "news.csv"
    table.write_text("title,topic\nStocks rally,Business\nCup final tonight,Sports\n")
    cfg = smoke(
        tmp_path, run="bad",
        **{"data.source": str(table), "data.label_col": "no_such_column", "retries.delay_s": 30},
    )  # fmt: skip
    t0 = time.perf_counter()
    state = experiment_flow(cfg, return_state=True)
    elapsed = time.perf_counter() - t0
    assert state.is_failed()
    assert elapsed < 30  # a retry would have waited 30 s
    with pytest.raises(ValueError, match="no_such_column"):
        state.result()
    runs = task_runs(str(state.state_details.flow_run_id))
    failed = [t for t in runs if t.state_type.value == "FAILED"]
    assert failed and all(t.run_count == 1 for t in failed)
