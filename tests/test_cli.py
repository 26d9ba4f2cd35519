"""The ``isup`` command line: every subcommand's help, config errors, a real run on the smoke
preset, ``ls``, ``report`` and ``steer``; and ``isup run`` on the real gemma-3-270m."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from integral_superposition.flows.cli import app
from typer.testing import CliRunner

COMMANDS = [
    "run",
    "dump",
    "train",
    "analyze",
    "merge",
    "steer",
    "steer-eval",
    "report",
    "ls",
    "server",
    "schema",
]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and command in result.output


def test_top_level_help_lists_the_commands():
    out = invoke("--help").output
    for command in COMMANDS:
        assert re.search(rf"\b{command}\b", out), command


def test_run_dry_run_prints_the_resolved_config():
    result = invoke("run", "--preset", "smoke", "--set", "sae.k=64", "--name", "x", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "k: 64" in result.output and "name: x" in result.output


def test_run_with_a_bad_config_fails_naming_the_field(tmp_path):
    result = CliRunner().invoke(app, ["run", "--preset", "smoke", "--set", "sae.k=0"])
    assert result.exit_code == 2
    assert "sae.k" in result.output
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("sae:\n  architecture: dense\n")
    result = CliRunner().invoke(app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2 and "sae.architecture" in result.output


def test_schema_command_prints_the_schema():
    from integral_superposition.flows.config import json_schema

    assert json.loads(invoke("schema").output) == json_schema()


def isup(
    *args: str, api_url: str | None = None, cwd: Path | None = None, env_extra=None, timeout=600
):
    """The installed ``isup`` console script in a subprocess (as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(env_extra or {})
    exe = Path(sys.executable).with_name("isup")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cli_run(prefect_api, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cli-runs")
    proc = isup(
        "run", "--preset", "smoke", "--storage", str(storage), "--run", "cli",
        "--set", "fanout.partitions=1", "--set", "steps.merge=false", "--set", "steps.steer_eval=false",
        api_url=prefect_api,
    )  # fmt: skip
    return storage, proc


@pytest.mark.prefect
def test_run_prints_the_report_and_the_prefect_ui_link(cli_run):
    storage, proc = cli_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    root = storage / "smoke" / "cli"
    report = root / "report" / "report.html"
    assert report.exists()
    assert f"report:     {report}" in proc.stdout
    assert f"file://{report}" in proc.stdout
    assert re.search(
        r"Prefect UI: http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}", proc.stdout
    )
    for step in ("dump", "train", "analyze", "report"):  # the per-step table with timings
        assert re.search(rf"{step}\s+\S+\s+Completed\s+\d+\.\d", proc.stdout), step
    # progress lines with done/total, rate, ETA
    assert re.search(
        r"train layer2-topk-k128 (\d+)/\1 steps \(100%\) \| [\d.e+]+ steps/s \| ETA ", proc.stderr
    ), proc.stderr[-3000:]
    # the first line says what runs, where, in which dtype, and about how long
    first = proc.stdout.splitlines()[0]
    assert first.startswith("isup run: demo:400 through tiny:gemma on cpu, float32 (fp32): dump")
    idle_or_busy = r"( when idle; busy now: the speed probe got \d+% of its CPU)?"
    assert re.search(rf"; about \d+ (s|min) on this machine{idle_or_busy}$", first), first


@pytest.mark.prefect
def test_ls_lists_runs_and_outputs(cli_run):
    storage, _ = cli_run
    result = invoke("ls", str(storage), "--outputs")
    assert result.exit_code == 0, result.output
    assert "smoke" in result.output and "cli" in result.output
    assert str(storage / "smoke" / "cli" / "sae" / "layer2-topk-k128") in result.output
    assert "(reused)" not in result.output  # every output of this run was made by it
    assert "no runs" in invoke("ls", str(storage / "nothing")).output


@pytest.mark.prefect
def test_dump_and_train_subcommands_reuse_the_runs_outputs(cli_run):
    """``isup dump`` and ``isup train`` run the experiment's cached tasks: on the same inputs
    they name the outputs of the ``isup run`` above instead of writing new ones."""
    storage, _ = cli_run
    root = storage / "smoke" / "cli"
    same = ["--preset", "smoke", "--storage", str(storage), "--run", "steps",
            "--set", "fanout.partitions=1"]  # fmt: skip
    result = invoke("dump", *same)
    assert result.exit_code == 0, result.output
    assert f"activation store: {root / 'acts'}\n" in result.output
    assert '"n_tokens": ' in result.output
    result = invoke("train", *same, "--store", str(root / "acts"))
    assert result.exit_code == 0, result.output
    assert f"layer2-topk-k128: {root / 'sae' / 'layer2-topk-k128'}" in result.output
    assert not (storage / "smoke" / "steps" / "sae").exists()
    result = CliRunner().invoke(app, ["train", *same, "--store", str(storage / "no-store")])
    assert result.exit_code == 1 and "no-store" in result.output


@pytest.mark.prefect
def test_report_rebuilds_from_the_run_index(prefect_api, cli_run):
    storage, _ = cli_run
    root = storage / "smoke" / "cli"
    (root / "report" / "report.html").unlink()
    proc = isup("report", str(root), "--param", "title=Rebuilt run", api_url=prefect_api)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    page = root / "report" / "report.html"
    assert page.exists() and "<title>Rebuilt run" in page.read_text()
    assert f"report: {page}\n" in proc.stdout
    # the report's options are checked before any flow runs
    bad = CliRunner().invoke(app, ["report", str(root), "--param", "top_per_label=0"])
    assert bad.exit_code == 2, bad.output
    assert "invalid ReportOptions: top_per_label" in bad.output


@pytest.mark.prefect
def test_steer_prints_generations_side_by_side(cli_run):
    storage, _ = cli_run
    sae = storage / "smoke" / "cli" / "sae" / "layer2-topk-k128"
    result = invoke(
        "steer", "--sae", str(sae), "--latent", "3", "--set-to", "50",
        "--prompt", "Breaking news:", "--max-new-tokens", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "steered" in result.output
    assert "Breaking news:" in result.output and "3=50 at layer.2 of tiny:gemma" in result.output
    bad = CliRunner().invoke(
        app,
        [
            "steer",
            "--sae",
            str(sae),
            "--latent",
            "3",
            "--set-to",
            "5",
            "--scale",
            "2",
            "--prompt",
            "x",
        ],
    )
    assert bad.exit_code == 2 and "exactly one of set_to and scale" in bad.output
    bad = CliRunner().invoke(
        app, ["steer", "--sae", str(sae), "--latent", "100000", "--set-to", "5", "--prompt", "x"]
    )
    assert bad.exit_code == 2 and "100000" in bad.output


@pytest.mark.gemma
def test_isup_run_on_gemma_as_the_readme_says(tmp_path):
    """``isup run`` as a fresh user runs it (the console script, no Prefect server
    configured), on the default model and corpus with a small budget."""
    budget = [
        "data.source=demo:240", "sae.k=512", "sae.epochs=2", "analysis.dashboards=none",
        "analysis.reducer=pca",  # auto's UMAP: test_analysis_stats, in-process
        "merge.sweep=false", "merge.ce_docs=8", "steering.labels=[Sports]",
        "steering.strengths=[4.0]", "steering.max_new_tokens=6", "steering.own_label_prompts=2",
        'steering.prompts=["Breaking news:"]', "steering.controls=[alpha0]",
    ]  # fmt: skip
    args = ["run", "--storage", str(tmp_path / "runs")]
    for b in budget:
        args += ["--set", b]
    # no Prefect server configured: isup starts its temporary one, as on a fresh machine
    proc = isup(
        *args, cwd=tmp_path, timeout=900,
        env_extra={"PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    runs = [p for p in (tmp_path / "runs" / "demo").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1
    report = runs[0] / "report" / "report.html"
    assert report.exists() and "layer6-topk-k512" in report.read_text()
    assert f"report:     {report}" in proc.stdout
    assert "temporary local Prefect server" in proc.stdout and "isup server" in proc.stdout
    index = json.loads((runs[0] / "run.json").read_text())
    assert {s["step"] for s in index["steps"]} >= {
        "dump",
        "train",
        "analyze",
        "merge",
        "steer_eval",
        "report",
    }


def test_steer_refuses_a_prompt_with_nothing_to_steer(tiny_backend, tmp_path):
    from integral_superposition.sae import SparseAutoencoder, save_sae

    sae = save_sae(SparseAutoencoder(tiny_backend.d_model, 64, seed=0), str(tmp_path / "sae"))
    common = ["steer", "--sae", sae, "--model", "tiny:gemma", "--hook-point", "layer.2",
              "--latent", "3", "--set-to", "5", "--max-new-tokens", "2"]  # fmt: skip
    bad = CliRunner().invoke(app, [*common, "--prompt", "Breaking news:", "--prompt", ""])
    assert bad.exit_code == 2, bad.output
    assert "prompts[1]='' is empty" in bad.output and "never steered" in bad.output
    eos = tiny_backend.tokenizer.eos_token
    bad = CliRunner().invoke(app, [*common, "--prompt", eos])
    assert bad.exit_code == 2 and f"prompts[0]='{eos}' has only special tokens" in bad.output
