"""Training fanned out over deployment runs: a failed child run is named with its state,
the train-part flow refuses SAEs that are not the config's and writes nothing without its
parent's lease. (The end-to-end fan-out on a process work pool is in tests/test_deploy.py.)"""

from __future__ import annotations

import time

import pytest
from integral_superposition.flows.config import load_preset
from integral_superposition.lease import LeaseHeldError, RunLease


def _cfg(tmp_path, **overrides):
    return load_preset(
        "smoke",
        {
            "storage": str(tmp_path / "runs"),
            "run": "r1",
            "dump.hook_points": ["layer.1", "layer.2"],
            "sweep": {"layer": [1, 2]},
            "fanout.train": "per_hook_point",
            **overrides,
        },
    )


@pytest.mark.prefect
def test_a_failed_child_run_is_named_with_its_state(prefect_api):
    from integral_superposition.tasks.fanout import TrainRunsFailed, wait_for_runs
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed

    @flow(name="isup-child-probe")
    def child() -> None:
        return None

    with get_client(sync_client=True) as client:
        ok = client.create_flow_run(child, name="e/r/layer1-topk-k128")
        bad = client.create_flow_run(child, name="e/r/layer2-topk-k128")
        client.set_flow_run_state(ok.id, Completed(), force=True)
        client.set_flow_run_state(bad.id, Failed(message="CUDA out of memory"), force=True)
    with pytest.raises(TrainRunsFailed) as err:
        wait_for_runs([ok, bad], "training", TrainRunsFailed, poll_s=0.1)
    msg = str(err.value)
    assert msg.startswith("1 of 2 training runs did not complete")
    assert f"e/r/layer2-topk-k128 ({bad.id}) Failed: CUDA out of memory" in msg
    assert "layer1" not in msg
    # every run completed: no error
    wait_for_runs([ok], "training", TrainRunsFailed, poll_s=0.1)


@pytest.mark.prefect
def test_waiting_logs_the_runs_still_pending_with_their_states(prefect_api, caplog):
    import threading

    from integral_superposition.tasks.fanout import wait_for_runs
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    @flow(name="isup-pending-probe")
    def child() -> None:
        return None

    with get_client(sync_client=True) as client:
        slow = client.create_flow_run(child, name="e/r/layer1-topk-k128")

    def finish() -> None:
        with get_client(sync_client=True) as c:
            c.set_flow_run_state(slow.id, Completed(), force=True)

    timer = threading.Timer(1.0, finish)
    timer.start()
    with caplog.at_level("INFO", logger="integral_superposition.tasks.ui"):
        wait_for_runs([slow], "training", poll_s=0.1, report_s=0.2)
    timer.join()
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waiting and waiting[0] == "waiting for 1 training runs: e/r/layer1-topk-k128 Pending"


def test_train_part_refuses_sae_names_that_are_not_the_configs(tmp_path):
    from integral_superposition.flows.steps import train_part_flow

    cfg = _cfg(tmp_path)
    store = str(tmp_path / "runs" / "smoke" / "r1" / "acts")
    for names, expected in (
        (["layer9-topk-k128"], r"sae_names=\['layer9-topk-k128'\]: expected a non-empty list"),
        ([], r"sae_names=\[\]: expected a non-empty list"),
        (["layer1-topk-k128", "layer2-topk-k128"], "expected SAEs of one hook point"),
    ):
        with pytest.raises(ValueError, match=expected):
            train_part_flow.fn(cfg, "r1", names, store)
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_train_part_writes_nothing_without_its_parents_lease(tmp_path):
    from integral_superposition.flows.steps import train_part_flow

    cfg = _cfg(tmp_path)
    root = tmp_path / "runs" / "smoke" / "r1"
    root.mkdir(parents=True)
    store = str(root / "acts")
    # no lease on the run root: the run that started the part is gone
    with pytest.raises(LeaseHeldError, match="no longer holds its lease"):
        train_part_flow.fn(cfg, "r1", ["layer1-topk-k128"], store, lease_token="parent-token")
    # a lease held by another run: refused as well
    with (
        RunLease(str(root), owner="another experiment run"),
        pytest.raises(LeaseHeldError, match="held by"),
    ):
        train_part_flow.fn(cfg, "r1", ["layer1-topk-k128"], store, lease_token="parent-token")
    assert sorted(p.name for p in root.iterdir()) == []


@pytest.mark.prefect
def test_a_missing_train_deployment_is_named_before_anything_is_written(prefect_api, tmp_path):
    from integral_superposition.flows.experiment import check_deployments, experiment_flow
    from prefect import flow
    from prefect.client.orchestration import get_client

    cfg = _cfg(tmp_path, **{"fanout.train_deployment": "train-part/not-deployed"})
    with pytest.raises(ValueError, match=r"fanout\.train_deployment='train-part/not-deployed'"):
        experiment_flow(cfg)
    assert not (tmp_path / "runs").exists()

    @flow(name="isup-train-part-probe")
    def probe() -> None:
        return None

    with get_client(sync_client=True) as client:
        client.create_deployment(flow_id=client.create_flow(probe), name="here")
    check_deployments(cfg.model_copy(update={"fanout": cfg.fanout.model_copy(
        update={"train_deployment": "isup-train-part-probe/here"})}))  # fmt: skip
    # the dump's deployment is checked only when partitions run as deployments
    with pytest.raises(ValueError, match=r"fanout\.deployment='dump-partition/absent'"):
        check_deployments(
            _cfg(tmp_path, **{"fanout.mode": "deployments", "fanout.deployment":
                              "dump-partition/absent", "fanout.train": "in_process"})
        )  # fmt: skip
    check_deployments(_cfg(tmp_path, **{"fanout.train": "in_process"}))


def test_groups_and_run_names_of_each_training_fanout(tmp_path):
    from integral_superposition.flows.experiment import group_jobs
    from integral_superposition.tasks.fanout import train_run_name

    cfg = _cfg(tmp_path, sweep={"layer": [1, 2], "k": [64, 128]})
    jobs = cfg.sae_jobs()
    by_hook = group_jobs(jobs, "per_hook_point")
    assert [[j.name for j in g] for g in by_hook] == [
        ["layer1-topk-k64", "layer1-topk-k128"], ["layer2-topk-k64", "layer2-topk-k128"],
    ]  # fmt: skip
    assert group_jobs(jobs, "in_process") == by_hook  # one pass over the store per hook point
    per_sae = group_jobs(jobs, "per_sae")
    assert [g[0].name for g in per_sae] == [j.name for j in jobs]
    assert all(len(g) == 1 for g in per_sae)
    assert [train_run_name(g) for g in by_hook] == ["train-layer1", "train-layer2"]
    assert train_run_name(per_sae[1]) == "layer1-topk-k128"


def test_the_poll_interval_comes_from_the_argument_or_the_environment(monkeypatch):
    from integral_superposition.tasks.fanout import POLL_ENV, poll_interval

    monkeypatch.delenv(POLL_ENV, raising=False)
    assert poll_interval() == 5.0
    assert poll_interval(0.25) == 0.25
    monkeypatch.setenv(POLL_ENV, "0.5")
    assert poll_interval() == 0.5
    assert poll_interval(2) == 2.0  # the argument wins
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(POLL_ENV, bad)
        with pytest.raises(ValueError, match=POLL_ENV):
            poll_interval()
    with pytest.raises(ValueError, match="poll_s=0"):
        poll_interval(0)


@pytest.mark.prefect
def test_waiting_polls_at_the_interval_the_environment_sets(prefect_api, monkeypatch):
    import threading

    from integral_superposition.tasks.fanout import POLL_ENV, wait_for_runs
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    @flow(name="isup-poll-probe")
    def child() -> None:
        return None

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(child, name="e/r/layer1-topk-k128")

    def finish() -> None:
        with get_client(sync_client=True) as c:
            c.set_flow_run_state(run.id, Completed(), force=True)

    monkeypatch.setenv(POLL_ENV, "0.05")
    timer = threading.Timer(0.3, finish)
    timer.start()
    t0 = time.monotonic()
    wait_for_runs([run], "training")
    timer.join()
    # the default 5 s poll would see the run finish no sooner than 5 s after the first check
    assert time.monotonic() - t0 < 4.0
