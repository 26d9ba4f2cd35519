"""Deployments: the work-pool templates pass Prefect's validation, ``prefect deploy --all``
works against a local server (GPU pools swapped for a process pool), and a process worker
runs a deployment run of the smoke experiment to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def prefect_cli(args: list[str], api_url: str, cwd: Path = REPO, timeout: float = 300):
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return subprocess.run(
        PREFECT + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_prefect_yaml_declares_the_deployments():
    text = (REPO / "prefect.yaml").read_text()
    doc = yaml.safe_load(text)
    assert "&experiment" in text and "*experiment" in text  # shared settings are anchors
    deps = {d["name"]: d for d in doc["deployments"]}
    assert deps["experiment-gpu"]["entrypoint"] == "flows/experiment.py:experiment_flow"
    assert deps["experiment-gpu"]["work_pool"]["job_variables"]["gpu_limit"] == 1
    assert deps["experiment-gpu"]["schedules"][0]["cron"] == "0 2 * * *"
    docker = deps["experiment-docker-gpu"]["work_pool"]["job_variables"]
    assert docker["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    for name, entry in (
        ("dump-gpu", "flows/steps.py:dump_flow"),
        ("train-gpu", "flows/steps.py:train_flow"),
        ("analyze-gpu", "flows/steps.py:analyze_flow"),
    ):
        assert deps[name]["entrypoint"] == entry
    analyze = deps["analyze-gpu"]["triggers"][0]
    assert analyze["expect"] == ["isup.sae.trained"]
    assert analyze["parameters"]["sae_uri"] == "{{ event.payload.uri }}"
    data = deps["experiment-on-new-data"]["triggers"][0]
    assert data["expect"] == ["isup.data.available"]
    # the merge key keeps the shared experiment and overrides only the data source
    cfg = data["parameters"]["cfg"]
    assert cfg["model"]["model_id"] == "gemma-3-270m"
    assert cfg["data"]["source"] == "{{ event.payload.uri }}"


@pytest.mark.parametrize(
    ("kind", "template"),
    [
        ("kubernetes", "kubernetes-gpu-job-template.json"),
        ("docker", "docker-gpu-job-template.json"),
    ],
)
def test_pool_templates_pass_prefect_validation(prefect_api, tmp_path, kind, template):
    path = REPO / "deployments" / template
    tpl = json.loads(path.read_text())
    name = f"isup-validate-{kind}"
    proc = prefect_cli(
        [
            "work-pool",
            "create",
            name,
            "--type",
            kind,
            "--base-job-template",
            str(path),
            "--overwrite",
        ],
        prefect_api,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
    assert pool.type == kind
    assert pool.base_job_template == tpl
    if kind == "kubernetes":
        container = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
        assert tpl["variables"]["properties"]["gpu_limit"]["type"] == "integer"
    else:
        default = tpl["variables"]["properties"]["container_create_kwargs"]["default"]
        assert default["device_requests"][0]["driver"] == "nvidia"

    # the control: Prefect rejects a template whose placeholder names no variable
    broken = json.loads(path.read_text())
    broken["job_configuration"]["gpu_or_nothing"] = "{{ no_such_variable }}"
    bad = tmp_path / f"broken-{template}"
    bad.write_text(json.dumps(broken))
    proc = prefect_cli(
        ["work-pool", "create", f"{name}-broken", "--type", kind, "--base-job-template", str(bad)],
        prefect_api,
    )
    assert proc.returncode != 0
    assert "no_such_variable" in proc.stdout + proc.stderr


def _process_pool_copy(tmp_path: Path, pool: str) -> Path:
    """prefect.yaml with every GPU pool swapped for a local process pool and the pull step
    pointed at this checkout."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    doc["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    for d in doc["deployments"]:
        d["work_pool"] = {"name": pool}
    out = tmp_path / "prefect.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_deploy_all_and_process_workers_run_the_smoke_experiment(prefect_api, tmp_path):
    from integral_superposition.experiment import load_preset
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment

    pool = "isup-test-process"
    proc = prefect_cli(
        ["work-pool", "create", pool, "--type", "process", "--overwrite"], prefect_api
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefect_file = _process_pool_copy(tmp_path, pool)
    proc = prefect_cli(["deploy", "--all", "--prefect-file", str(prefect_file)], prefect_api)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    names = {d["name"] for d in yaml.safe_load(prefect_file.read_text())["deployments"]}
    with get_client(sync_client=True) as client:
        deployed = {d.name: d for d in client.read_deployments()}
        assert names <= set(deployed)
        nightly = deployed["experiment-gpu"]
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        automations = client.read_automations()
    triggers = {a.name for a in automations}
    assert any(n.startswith("analyze-gpu") for n in triggers), triggers
    assert any(n.startswith("experiment-on-new-data") for n in triggers), triggers

    # The smoke experiment, its dump fanned out over two partition deployment runs: the
    # worker runs the experiment and the partitions, as N GPU workers would.
    cfg = load_preset(
        "smoke",
        {
            "storage": str(tmp_path / "runs"), "run": "deployed",
            "fanout": {"partitions": 2, "mode": "deployments", "deployment": "dump-partition/dump-partition-gpu"},
            "steps.merge": False, "steps.steer_eval": False,
        },
    )  # fmt: skip
    flow_run = run_deployment(
        "experiment/experiment-gpu", parameters={"cfg": cfg.model_dump(mode="json")}, timeout=0
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 480
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
            while not state.is_final() and time.time() < deadline and worker.poll() is None:
                time.sleep(3)
                state = client.read_flow_run(flow_run.id).state
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["isup-partition"]))
            )
    finally:
        worker.terminate()
        try:
            log, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            log, _ = worker.communicate()
    assert state.is_completed(), (state, log[-6000:])
    assert sorted(c.name for c in children) == [
        "smoke/deployed/part-000-of-002", "smoke/deployed/part-001-of-002",
    ]  # fmt: skip
    assert all(c.state.is_completed() for c in children)
    run = tmp_path / "runs" / "smoke" / "deployed"
    assert (run / "acts" / "part-001-of-002" / "manifest.json").exists()
    assert (run / "report" / "report.html").exists()
    index = json.loads((run / "run.json").read_text())
    assert index["flow_run_id"] == str(flow_run.id)
    dump = [s for s in index["steps"] if s["step"] == "dump"]
    assert dump[0]["output"]["summary"]["partitions"] == 2
