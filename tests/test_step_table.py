"""The steps run on their own: each row of the table gives a flow and an ``isup`` command
with the same name, parameters and help - on one trained SAE, or on a finished run."""

from __future__ import annotations

import pytest
from integral_superposition.flows import steps
from integral_superposition.flows.cli import app
from integral_superposition.flows.sae_steps import RUN_STEPS, SAE_STEPS, STEPS, Step
from typer.main import get_command

SAE_FLOW_PARAMETERS = [
    "sae_uri",
    "store_uri",
    "params",
    "model_id",
    "run_root",
    "storage_options",
    "storage_secret",
    "allow_other_store",
]
RUN_FLOW_PARAMETERS = ["run_root", "options", "storage_options", "storage_secret"]
TASK_NAMES = {
    "analyze": "analyze-sae",
    "merge": "merge-sae",
    "steer-eval": "steer-eval",
    "report": "build-report",
}


def test_the_table_has_the_sae_steps_and_the_run_steps():
    assert [s.name for s in SAE_STEPS] == ["analyze", "merge", "steer-eval"]
    assert [s.name for s in RUN_STEPS] == ["report"]
    assert set(STEPS) == {*SAE_STEPS, *RUN_STEPS}


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_each_step_has_its_flow(step):
    flow = getattr(steps, step.flow_name)  # prefect.yaml loads flows/steps.py:<flow_name>
    assert flow is steps.STEP_FLOWS[step.name]
    assert flow.name == step.name and flow.fn.__name__ == step.flow_name
    assert flow.description == step.help
    schema = flow.parameters
    expected = SAE_FLOW_PARAMETERS if step.scope == "sae" else RUN_FLOW_PARAMETERS
    assert list(schema.properties) == expected
    model = step.load_params().__name__
    arg = "params" if step.scope == "sae" else "options"
    assert schema.properties[arg]["anyOf"][0] == {"$ref": f"#/definitions/{model}"}
    assert model in schema.definitions
    assert step.load_task().name == TASK_NAMES[step.name]


@pytest.mark.parametrize("step", SAE_STEPS, ids=lambda s: s.name)
def test_each_sae_step_has_its_command(step):
    command = get_command(app).commands[step.name]
    options = {o for p in command.params for o in p.opts}
    assert {"--sae", "--store", "--model", "--run-root", "--param", "--other-store"} <= options
    assert {"--storage-option", "--storage-secret"} <= options
    assert command.help == step.help.replace("``", "")


@pytest.mark.parametrize("step", RUN_STEPS, ids=lambda s: s.name)
def test_each_run_step_has_its_command(step):
    command = get_command(app).commands[step.name]
    assert [p.name for p in command.params if p.param_type_name == "argument"] == ["run_root"]
    options = {o for p in command.params for o in p.opts}
    assert options == {"run_root", "--param", "--storage-option", "--storage-secret"}
    assert command.help == step.help.replace("``", "")
    assert callable(step.load_publish())


def test_the_report_step_is_the_report_flow_users_call():
    assert steps.report_flow.name == "report" and steps.report_flow.fn.__name__ == "report_flow"
    assert RUN_STEPS[0].inputs == ("sae", "analysis", "merge", "steering")


def test_a_row_of_the_wrong_scope_is_refused():
    with pytest.raises(ValueError, match=r"scope='runs': expected 'sae' or 'run'"):
        Step(name="x", task="m:t", params="m:p", output="x", help="x", scope="runs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"step 'x': inputs and publish are for scope 'run'"):
        Step(name="x", task="m:t", params="m:p", output="x", help="x", inputs=("sae",))
