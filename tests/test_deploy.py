"""Deployments: the work-pool templates pass Prefect's validation, ``prefect deploy --all``
works against a local server (GPU pools swapped for a process pool), and a process worker
runs a deployment run of the smoke experiment to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
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
    assert deps["experiment-gpu"]["work_pool"]["job_variables"]["gpus_per_run"] == 1
    assert deps["experiment-gpu"]["schedules"][0]["cron"] == "0 2 * * *"
    docker = deps["experiment-docker-gpu"]["work_pool"]["job_variables"]
    assert docker["gpus_per_run"] == -1  # every GPU of the host
    for name, entry in (
        ("dump-gpu", "flows/steps.py:dump_flow"),
        ("train-gpu", "flows/steps.py:train_flow"),
        ("train-part-gpu", "flows/steps.py:train_part_flow"),
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
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus_per_run }}"
        assert tpl["variables"]["properties"]["gpus_per_run"]["type"] == "integer"
    else:
        kwargs = tpl["job_configuration"]["container_create_kwargs"]
        assert kwargs["device_requests"][0]["driver"] == "nvidia"
        assert kwargs["device_requests"][0]["count"] == "{{ gpus_per_run }}"

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
    from integral_superposition.flows.config import load_preset
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

    # The smoke experiment on two hook points, its dump fanned out over two partition
    # deployment runs and its training over one deployment run per hook point: the worker
    # runs the experiment, the partitions and the trainings, as GPU pods would.
    cfg = load_preset(
        "smoke",
        {
            "storage": str(tmp_path / "runs"), "run": "deployed",
            "fanout": {"partitions": 2, "mode": "deployments", "train": "per_hook_point"},
            "dump.hook_points": ["layer.1", "layer.2"], "sweep": {"layer": [1, 2]},
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
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick up each wave of child runs at once
        "ISUP_FANOUT_POLL_S": "0.5",  # and see it finish at once
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
                time.sleep(1)
                state = client.read_flow_run(flow_run.id).state
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["isup-partition"]))
            )
            trainings = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["isup-train-part"]))
            )
            every_run = [
                f"{r.name} [{r.deployment_id}] {r.state.name if r.state else None}: "
                f"{r.state.message if r.state else ''}"
                for r in client.read_flow_runs()
            ]
    finally:
        worker.terminate()
        try:
            log, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            log, _ = worker.communicate()
    # on failure: every flow run's state and message (a child's names the cause), then the
    # worker's log, whose tail has the failing run's traceback
    why = "\n".join([f"experiment: {state.name}: {state.message}", *every_run, log[-8000:]])
    assert state.is_completed(), why
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

    # one training run per hook point, each publishing its SAE under the parent's run root
    assert sorted(c.name for c in trainings) == [
        "smoke/deployed/layer1-topk-k128", "smoke/deployed/layer2-topk-k128",
    ]  # fmt: skip
    assert all(c.state.is_completed() for c in trainings)
    trained = {s["name"]: s for s in index["steps"] if s["step"] == "train"}
    assert set(trained) == {"layer1-topk-k128", "layer2-topk-k128"}
    assert {s["output"]["summary"]["trained_by"] for s in trained.values()} == {
        c.name for c in trainings
    }
    analysed = {s["name"] for s in index["steps"] if s["step"] == "analyze"}
    assert analysed == set(trained)
    assert not list(run.rglob(".lease.json"))  # every lease, the children's too, released

    # the same SAEs as training in this process on the same store (the in-process path)
    from integral_superposition.sae.train import train_saes
    from safetensors.torch import load_file

    jobs = cfg.sae_jobs()
    local = [str(tmp_path / "in-process" / j.name) for j in jobs]
    train_saes([dump[0]["output"]["uri"]], [j.cfg for j in jobs[:1]], local[:1], progress=False)
    train_saes([dump[0]["output"]["uri"]], [j.cfg for j in jobs[1:]], local[1:], progress=False)
    for job, here in zip(jobs, local, strict=True):
        remote = load_file(run / "sae" / job.name / "sae_weights.safetensors")
        mine = load_file(Path(here) / "sae_weights.safetensors")
        assert remote.keys() == mine.keys()
        for key in remote:
            assert torch.equal(remote[key], mine[key]), (job.name, key)


class _KubernetesJob:
    """The Kubernetes worker's job configuration, rendered by Prefect's own templating
    (``BaseJobConfiguration.from_template_and_values``) from a pool's base job template and a
    deployment's job variables."""

    @staticmethod
    def render(base_job_template: dict, job_variables: dict) -> dict:
        import asyncio
        from typing import Any

        from prefect.workers.base import BaseJobConfiguration

        class KubernetesJobConfiguration(BaseJobConfiguration):
            job_manifest: dict[str, Any]
            namespace: str | None = None
            pod_watch_timeout_seconds: int | None = None
            job_watch_timeout_seconds: int | None = None
            stream_output: bool | None = None

        cfg = asyncio.run(
            KubernetesJobConfiguration.from_template_and_values(base_job_template, job_variables)
        )
        return cfg.model_dump()


def test_kubernetes_template_takes_secrets_service_account_registry_and_pull_secrets(
    prefect_api,
):
    """A pool made from the template accepts a deployment whose pods get S3 credentials from
    a Secret (envFrom) or an IRSA service account, pull a qualified, versioned image with a
    pull secret, and wait 600 s for the pod; a wrong type is refused by the server."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    path = REPO / "deployments" / "kubernetes-gpu-job-template.json"
    pool = "isup-k8s-render"
    proc = prefect_cli(
        ["work-pool", "create", pool, "--type", "kubernetes", "--base-job-template", str(path),
         "--overwrite"],
        prefect_api,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_variables = {
        "image_registry": "123456789012.dkr.ecr.us-east-1.amazonaws.com/isup",
        "image_tag": "0.2.0-cu128",
        "image_pull_secrets": [{"name": "regcred"}],
        "env_from": [{"secretRef": {"name": "isup-s3"}}, {"configMapRef": {"name": "isup-env"}}],
        "service_account_name": "isup-runner",
        "env": {"HF_HUB_OFFLINE": "1"},
    }

    @flow(name="isup-render-probe")
    def probe() -> None:
        return None

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(probe)
        dep_id = client.create_deployment(
            flow_id=flow_id, name="render", work_pool_name=pool, job_variables=job_variables
        )
        deployment = client.read_deployment(dep_id)
        template = client.read_work_pool(pool).base_job_template
        # the control: the server validates job variables against the template
        with pytest.raises(PrefectHTTPStatusError, match="422"):
            client.create_deployment(
                flow_id=flow_id, name="render-bad", work_pool_name=pool,
                job_variables={**job_variables, "env_from": {"secretRef": "isup-s3"}},
            )  # fmt: skip
    assert deployment.job_variables == job_variables

    rendered = _KubernetesJob.render(template, deployment.job_variables)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == (
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/isup/integral-superposition-worker:0.2.0-cu128"
    )
    assert container["envFrom"] == job_variables["env_from"]
    assert pod["serviceAccountName"] == "isup-runner"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert rendered["env"]["HF_HUB_OFFLINE"] == "1"
    assert rendered["pod_watch_timeout_seconds"] == 600

    # with only the registry set: the project's version as tag, no secrets, the namespace's
    # default service account
    bare = _KubernetesJob.render(template, {"image_registry": "ghcr.io/acme"})
    pod = bare["job_manifest"]["spec"]["template"]["spec"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert pod["containers"][0]["image"] == f"ghcr.io/acme/integral-superposition-worker:{version}"
    assert pod["containers"][0]["envFrom"] == [] and pod["imagePullSecrets"] == []
    assert "serviceAccountName" not in pod


def test_a_two_gpu_training_run_gets_a_two_gpu_pod_that_runs_torchrun(prefect_api):
    """fanout.gpus_per_run: 2 -> the training run's job variable -> the pod's
    ``nvidia.com/gpu: 2`` (and Docker's device request count) -> torchrun with one process
    per GPU and the standalone rendezvous inside the pod."""
    from integral_superposition.distributed import torchrun_command
    from integral_superposition.flows.config import load_preset
    from integral_superposition.tasks.fanout import train_run_request
    from integral_superposition.tasks.refs import OutputRef, RunLocation
    from prefect.utilities.templating import apply_values

    cfg = load_preset(
        "smoke",
        {"fanout.train": "per_hook_point", "fanout.gpus_per_run": 2, "sweep": {"k": [64, 128]}},
    )
    jobs = cfg.sae_jobs()
    store = OutputRef(kind="activations", name="acts", uri="s3://b/smoke/r/acts", content_hash="h")
    loc = RunLocation(storage="s3://b", experiment="smoke", run="r")
    req = train_run_request(store, jobs, loc, cfg, cfg.fanout.gpus_per_run)
    assert req["job_variables"] == {"gpus_per_run": 2}
    assert req["flow_run_name"] == "smoke/r/train-layer2"
    assert req["parameters"]["sae_names"] == [j.name for j in jobs]
    assert req["parameters"]["cfg"]["fanout"]["gpus_per_run"] == 2

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (part,) = [d for d in doc["deployments"] if d["name"] == "train-part-gpu"]
    deployment_vars = part["work_pool"]["job_variables"]
    k8s = json.loads((REPO / "deployments" / "kubernetes-gpu-job-template.json").read_text())
    pod = _KubernetesJob.render(k8s, {**deployment_vars, **req["job_variables"]})
    (container,) = pod["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    # one GPU: no override, the deployment's default of one GPU
    single = train_run_request(store, jobs, loc, cfg, 1)
    assert single["job_variables"] is None
    pod = _KubernetesJob.render(k8s, deployment_vars)
    (container,) = pod["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    docker = json.loads((REPO / "deployments" / "docker-gpu-job-template.json").read_text())
    defaults = {k: v.get("default") for k, v in docker["variables"]["properties"].items()}
    rendered = apply_values(docker["job_configuration"], {**defaults, **req["job_variables"]})
    assert rendered["container_create_kwargs"]["device_requests"][0]["count"] == 2
    assert (
        apply_values(docker["job_configuration"], defaults)["container_create_kwargs"][
            "device_requests"
        ][0]["count"]
        == -1
    )  # the Docker default: every GPU of the host

    # inside the pod the train task starts torchrun: one pod, standalone rendezvous
    cmd = torchrun_command(cfg.fanout.gpus_per_run, "integral_superposition.sae.launch")
    assert "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    with pytest.raises(ValueError, match="gpus_per_run=0"):
        train_run_request(store, jobs, loc, cfg, 0)


def _registry_reachable(index: str) -> str | None:
    """None when the package index answers, else why not."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=15) as r:
            r.read(1)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.registry
def test_worker_image_requirements_resolve_against_the_base_images_torch(tmp_path):
    """pip resolves the image's requirements (the project with the extras the Dockerfile
    installs) under deployments/worker-constraints.txt, for the base image's Python and
    platform, without installing anything: torch stays the base image's version."""
    import re

    index = "https://pypi.org/simple"
    why = _registry_reachable(index)
    if why is not None:
        pytest.skip(f"the package index {index} is unreachable ({why})")
    dockerfile = (REPO / "deployments" / "Dockerfile").read_text()
    (base_torch,) = re.findall(r"^FROM pytorch/pytorch:([0-9.]+)-cuda", dockerfile, re.M)
    constraints = REPO / "deployments" / "worker-constraints.txt"
    pins = re.findall(r"^torch==([0-9.]+)$", constraints.read_text(), re.M)
    assert pins == [base_torch], (pins, base_torch)
    (extras,) = re.findall(
        r'pip install -c deployments/worker-constraints.txt -e "\.\[([a-z0-9,]+)\]"', dockerfile
    )
    assert "hf" in extras.split(",") and "s3" in extras.split(",")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras.split(","):
        reqs += project["optional-dependencies"][extra]
    platforms = [f"manylinux_2_{v}_x86_64" for v in (28, 27, 26, 25, 24, 17, 12, 5)]
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
        "--quiet", "--index-url", index, "--use-feature=fast-deps",
        "--report", str(report), "-c", str(constraints),
        "--python-version", "3.11", "--only-binary=:all:",
        *[a for p in [*platforms, "manylinux2014_x86_64", "linux_x86_64"] for a in ("--platform", p)],
        *reqs,
    ]  # fmt: skip
    if os.environ.get("PIP_CERT"):
        cmd += ["--cert", os.environ["PIP_CERT"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0 and "fast-deps" in proc.stderr:  # a pip without lazy wheels
        cmd.remove("--use-feature=fast-deps")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert resolved["torch"] == base_torch, resolved.get("torch")
    for name in ("transformers", "accelerate", "datasets", "s3fs", "prefect"):
        assert name in resolved, name


def _env_without_aws_credentials(api_url: str) -> dict[str, str]:
    """This process's environment with no AWS variable and no AWS profile files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ISUP_S3_"))}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    return env


@pytest.mark.s3
def test_a_triggered_analysis_reads_s3_with_credentials_from_a_secret_block(
    prefect_api, s3_bucket, tmp_path
):
    """The train deployment on a worker with no AWS credentials in its environment, its S3
    credentials in a Secret block: its ``isup.sae.trained`` event starts the analyze
    deployment, which gets the Secret's name and the endpoint from the event and
    analyses the SAE on S3."""
    import s3fs
    from integral_superposition.flows.config import load_preset
    from integral_superposition.tasks.blocks import save_secret_options
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    bucket, opts = s3_bucket
    endpoint = opts["endpoint_url"]
    save_secret_options("isup-deploy-s3", {"key": opts["key"], "secret": opts["secret"]})
    env = _env_without_aws_credentials(prefect_api)
    # the control: in that environment, S3 without the Secret's credentials is refused
    probe = subprocess.run(
        [sys.executable, "-c", f"import s3fs; s3fs.S3FileSystem(endpoint_url={endpoint!r}).ls({bucket!r})"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode != 0 and "NoCredentialsError" in probe.stderr, probe.stderr[-2000:]

    pool = "isup-test-secrets"
    proc = prefect_cli(
        ["work-pool", "create", pool, "--type", "process", "--overwrite"], prefect_api
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefect_file = _process_pool_copy(tmp_path, pool)
    doc = yaml.safe_load(prefect_file.read_text())
    (analyze,) = [d for d in doc["deployments"] if d["name"] == "analyze-gpu"]
    # the smoke preset's small analysis budget as the deployment's default parameters
    analyze["parameters"] = {"params": load_preset("smoke").analysis.model_dump(mode="json")}
    prefect_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = prefect_cli(
        ["deploy", "--name", "train-gpu", "--name", "analyze-gpu", "--prefect-file", str(prefect_file)],
        prefect_api,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cfg = load_preset(
        "smoke",
        {
            "storage": f"{bucket}/runs", "run": "trained", "storage_secret": "isup-deploy-s3",
            "storage_options": {"endpoint_url": endpoint}, "fanout.partitions": 1,
            "sae.epochs": 1,
        },
    )  # fmt: skip
    train_run = run_deployment(
        "train/train-gpu", parameters={"cfg": cfg.model_dump(mode="json")}, timeout=0
    )
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    analyses: list = []
    try:
        deadline = time.time() + 480
        with get_client(sync_client=True) as client:
            while time.time() < deadline and worker.poll() is None:
                train_state = client.read_flow_run(train_run.id).state
                analyses = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["analyze-gpu"]))
                )  # fmt: skip
                ours = [a for a in analyses if a.parameters.get("sae_uri", "").startswith(bucket)]
                if train_state.is_final() and not train_state.is_completed():
                    break
                if ours and all(a.state.is_final() for a in ours):
                    analyses = ours
                    break
                time.sleep(1)
    finally:
        worker.terminate()
        try:
            log, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            log, _ = worker.communicate()
    assert train_state.is_completed(), (train_state, log[-6000:])
    assert analyses, ("no analyze run was triggered", log[-6000:])
    assert all(a.state.is_completed() for a in analyses), ([a.state for a in analyses], log[-6000:])
    params = analyses[0].parameters
    assert params["storage_secret"] == "isup-deploy-s3"
    assert params["storage_options"] == {"endpoint_url": endpoint}
    sae = params["sae_uri"]
    assert sae == f"{bucket}/runs/smoke/trained/sae/layer2-topk-k128"
    fs = s3fs.S3FileSystem(**opts)
    assert fs.exists(f"{bucket}/runs/smoke/trained/analysis/layer2-topk-k128/manifest.json")


@pytest.mark.prefect
def test_the_zombie_run_automation_is_accepted_by_the_server(prefect_api):
    """Workers send heartbeats, and the shipped automation (created with Prefect's own CLI
    on a real server) marks a run Crashed 120 s after they stop."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    env = doc["definitions"]["work_pools"]["gpu_kubernetes"]["job_variables"]["env"]
    assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # Prefect's minimum
    path = REPO / "deployments" / "zombie-runs-automation.yaml"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "automation", "create", "--from-file",
         str(path)], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        (auto,) = client.read_automations_by_name("isup-crash-zombie-flow-runs")
    trigger = auto.trigger
    assert trigger.posture.value == "Proactive" and trigger.within.total_seconds() == 120
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    (action,) = auto.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
