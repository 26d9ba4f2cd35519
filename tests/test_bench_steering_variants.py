"""The steering-variants benchmark refuses a bad plan naming the variant, the field and the
value, before it loads any model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "bench" / "bench_steering_variants.py"
    spec = importlib.util.spec_from_file_location("bench_steering_variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plan(tmp_path, variants) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"variants": variants}))
    return str(path)


def test_a_good_plan_is_read(bench, tmp_path):
    v = [
        {"label": "b", "latents": [0, 3], "strength": 0.25, "op": "add", "control": True},
        {"label": "a", "latents": [1], "strength": 0.5, "ablate": [0, 2]},
        {"label": "a", "latents": [1, 2], "strength": 8, "op": "add", "values": [0.5, 1]},
        {"label": "b", "mean_diff": 4, "strength": 8, "control": True},
    ]
    assert bench.read_plan(_plan(tmp_path, v), ["a", "b"], 4)["variants"] == v


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"label": "c", "latents": [0], "strength": 1}, r"variants\[0\].label='c': expected one of \['a', 'b'\]"),
        ({"label": "a", "latents": [4], "strength": 1}, r"variants\[0\].latents=\[4\]: expected latent indices in \[0, 4\)"),
        ({"label": "a", "latents": [], "strength": 1}, r"variants\[0\].latents=\[\]"),
        ({"label": "a", "latents": [1], "strength": "x"}, r"variants\[0\].strength='x': expected a finite number"),
        ({"label": "a", "latents": [1], "strength": 1, "op": "scale"}, r"variants\[0\].op='scale': expected 'set' or 'add'"),
        ({"label": "a", "latents": [1], "strength": 1, "colour": 2}, r"variants\[0\] has keys \['colour'\]"),
        ({"label": "a", "latents": [1], "strength": 1, "ablate": [1]}, r"variants\[0\].ablate=\[1\]: expected latent indices in \[0, 4\) that are not among its latents"),
        ({"label": "a", "latents": [1], "strength": 1, "ablate": 2}, r"variants\[0\].ablate=2"),
        ({"label": "a", "latents": [1, 2], "strength": 1, "values": [1.0]}, r"variants\[0\].values=\[1.0\]: expected 2 finite numbers, one per latent"),
        ({"label": "a", "latents": [1], "strength": 1, "values": [float("nan")]}, r"variants\[0\].values=\[nan\]"),
        ({"label": "a", "mean_diff": 5, "strength": 1}, r"variants\[0\].mean_diff=5: expected a number of latents in \[1, 4\]"),
        ({"label": "a", "mean_diff": 2, "latents": [1], "strength": 1}, r"variants\[0\] has mean_diff and \['latents'\]: expected mean_diff alone"),
        ({"label": "a", "mean_diff": 2, "strength": 1, "op": "set"}, r"has mean_diff and \['op'\]"),
    ],
)  # fmt: skip
def test_a_bad_variant_is_refused_naming_it(bench, tmp_path, variant, message):
    with pytest.raises(SystemExit, match=message):
        bench.read_plan(_plan(tmp_path, [variant]), ["a", "b"], 4)


def test_a_missing_or_empty_plan_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"--plan .*nope.json: expected a readable JSON file"):
        bench.read_plan(str(tmp_path / "nope.json"), ["a"], 4)
    with pytest.raises(SystemExit, match="expected a JSON object with a non-empty 'variants' list"):
        bench.read_plan(_plan(tmp_path, []), ["a"], 4)


@pytest.mark.parametrize(
    "name",
    [
        "ag_news_business.json",
        "ag_news_everyday.json",
        "ag_news_business_ablate.json",
        "ag_news_everyday_vocab_gain.json",
        "ag_news_business_vocab_gain_generated.json",
        "ag_news_mean_diff.json",
        "ag_news_everyday_mean_diff.json",
        "ag_news_informational.json",
    ],
)
def test_the_shipped_plans_are_valid_for_the_ag_news_sae(bench, name):
    plan = bench.read_plan(
        str(ROOT / "bench" / "plans" / name), ["Business", "Sci/Tech", "Sports", "World"], 4096
    )
    assert plan["variants"]


def test_a_plan_whose_none_openings_are_evaluated_is_refused(bench, tmp_path):
    path = tmp_path / "plan.json"
    v = [{"label": "a", "latents": [1], "strength": 1}]
    path.write_text(
        json.dumps({"prompts": ["I think", "We"], "none_prompts": ["We", "You"], "variants": v})
    )
    with pytest.raises(SystemExit, match=r"prompts and none_prompts share \['We'\]"):
        bench.read_plan(str(path), ["a"], 4)
