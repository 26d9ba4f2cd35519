"""The steps on one trained SAE: each row of the table gives a flow and an ``isup`` command
with the same name, parameters and help."""

from __future__ import annotations

import pytest
from integral_superposition.flows import steps
from integral_superposition.flows.cli import app
from integral_superposition.flows.sae_steps import SAE_STEPS
from typer.main import get_command

FLOW_PARAMETERS = [
    "sae_uri",
    "store_uri",
    "params",
    "model_id",
    "run_root",
    "storage_options",
    "storage_secret",
    "allow_other_store",
]


def test_the_table_has_the_three_steps():
    assert [s.name for s in SAE_STEPS] == ["analyze", "merge", "steer-eval"]


@pytest.mark.parametrize("step", SAE_STEPS, ids=lambda s: s.name)
def test_each_step_has_its_flow(step):
    flow = getattr(steps, step.flow_name)  # prefect.yaml loads flows/steps.py:<flow_name>
    assert flow is steps.SAE_STEP_FLOWS[step.name]
    assert flow.name == step.name and flow.fn.__name__ == step.flow_name
    assert flow.description == step.help
    schema = flow.parameters
    assert list(schema.properties) == FLOW_PARAMETERS
    model = step.load_params().__name__
    assert schema.properties["params"]["anyOf"][0] == {"$ref": f"#/definitions/{model}"}
    assert model in schema.definitions
    task_names = {"analyze": "analyze-sae", "merge": "merge-sae", "steer-eval": "steer-eval"}
    assert step.load_task().name == task_names[step.name]


@pytest.mark.parametrize("step", SAE_STEPS, ids=lambda s: s.name)
def test_each_step_has_its_command(step):
    command = get_command(app).commands[step.name]
    options = {o for p in command.params for o in p.opts}
    assert {"--sae", "--store", "--model", "--run-root", "--param", "--other-store"} <= options
    assert {"--storage-option", "--storage-secret"} <= options
    assert command.help == step.help.replace("``", "")
