"""bench/gpu_check.py: the quick CPU mode end to end, how it finds the news data, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


@pytest.mark.prefect
def test_quick_cpu_check_runs_every_item_and_writes_the_summary(gpu_check, tmp_path):
    out = tmp_path / "gpu-check"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ISUP_BENCH"))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-6000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "passed"
    m = summary["machine"]
    assert m["device"] == "cpu" and m["torch"] == torch.__version__
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["mode"] == "quick" and "demo corpus" in m["data"] and "tiny:gemma" in m["model"]
    items = {i["name"]: i for i in summary["items"]}
    assert list(items) == list(gpu_check.ITEMS)
    for name, item in items.items():
        assert item["status"] == "passed", (name, item)
        assert item["seconds"] > 0 and item["numbers"], (name, item)

    n = {name: item["numbers"] for name, item in items.items()}
    assert n["cuda-tests"]["passed"] >= 5 and n["cuda-tests"]["failures"] == 0
    assert n["dump"]["device"] == "cpu" and n["dump"]["ours_tok_s"] > 0
    assert n["dump"]["ours_vs_bare"] > 0 and n["dump"]["ours_vs_seed"] > 0
    (case,) = n["train"]["cases"].values()
    assert case["ours_tok_s"] > 0 and case["ours_vs_bare"] > 0
    assert n["topk-scan"]["d_sae"] == 256 and n["topk-scan"]["speedup_total_float32"] > 0
    assert set(n["steering"]["overhead"]) == {"batch_1", "batch_8"}
    steps = n["isup-run"]["steps"]
    assert {"dump", "train", "analyze", "steer_eval", "report"} <= {k.split()[0] for k in steps}
    assert all(s["state"] == "Completed" for s in steps.values()), steps

    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check: passed")
    assert f"torch {torch.__version__}" in md
    for name in gpu_check.ITEMS:
        assert f"| {name} | passed |" in md
    assert "cuda-tests: passed" in log and "===== isup-run" in log


def test_news_data_is_found_beside_a_parent_folder_or_replaced_by_the_demo_corpus(
    gpu_check, tmp_path, monkeypatch
):
    monkeypatch.delenv("ISUP_AG_NEWS", raising=False)
    repo = tmp_path / "work" / "wt" / "repo"
    repo.mkdir(parents=True)
    value, note = gpu_check.find_news_csv("auto", repo)
    assert value == gpu_check.DEMO_FALLBACK and "demo corpus" in note
    assert str(repo / "shared" / "data" / "ag_news_dev.csv") in note

    csv = tmp_path / "work" / "shared" / "data" / "ag_news_dev.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("title,topic,description\nA,World,x\n")
    assert gpu_check.find_news_csv("auto", repo) == (str(csv), str(csv))

    inside = repo / "shared" / "data" / "ag_news_dev.csv"
    inside.parent.mkdir(parents=True)
    inside.write_text(csv.read_text())
    assert gpu_check.find_news_csv("auto", repo)[0] == str(inside)  # the nearest wins

    other = tmp_path / "mine.csv"
    other.write_text(csv.read_text())
    monkeypatch.setenv("ISUP_AG_NEWS", str(other))
    value, note = gpu_check.find_news_csv("auto", repo)
    assert value == str(other) and "$ISUP_AG_NEWS" in note
    assert gpu_check.find_news_csv("demo", repo)[0] == gpu_check.DEMO_FALLBACK


def test_bad_arguments_name_the_argument_and_write_nothing(gpu_check, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--device", "tpu:0"], "--device='tpu:0'"),
        (["--only", "dump,nope"], "--only='dump,nope'"),
        (["--data", str(tmp_path / "missing.csv")], "--data="),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "sees no CUDA device"))
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
            gpu_check.main([*argv, "--out", str(out)])
        assert not out.exists()


def test_wheelhouse_list_follows_extras_and_the_target_python(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "bench" / "gpu_wheels.py")
    gpu_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_wheels)
    py312 = gpu_wheels.closure(python_version="3.12")
    py313 = gpu_wheels.closure(python_version="3.13")
    # prefect needs sqlalchemy[asyncio], whose extra needs greenlet
    assert {"prefect", "sqlalchemy", "greenlet", "gguf", "pydantic"} <= set(py312)
    assert "pendulum" in py312 and "pendulum" not in py313  # "python_version < '3.13'"
    pins = gpu_wheels.wanted(py312)
    names = {p.split("==")[0] for p in pins}
    assert {"prefect", "greenlet", "setuptools", "wheel"} <= names
    assert not names & {"torch", "numpy", "transformers", "pandas", "scipy"}  # preinstalled
    assert f"prefect=={py312['prefect']}" in pins


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of --device auto")
def test_auto_device_without_cuda_is_the_quick_check_and_the_budget_is_kept(gpu_check, tmp_path):
    rc = gpu_check.main(["--only", "dump,train", "--budget-s", "0.5", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 1 and summary["status"] == "failed"
    assert summary["machine"]["mode"] == "quick (--device auto found no CUDA device)"
    assert [(i["name"], i["status"]) for i in summary["items"]] == [
        ("dump", "skipped"),
        ("train", "skipped"),
    ]
    assert "| dump | skipped |" in (tmp_path / "summary.md").read_text()


def test_stand_in_model_has_the_architecture_and_decodes_every_id(gpu_check, tmp_path, monkeypatch):
    from integral_superposition.backends import HFCausalLM

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "head_dim": 16}
    small |= {"query_pre_attn_scalar": 16, "vocab_size": 4096}
    small["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"]
    monkeypatch.setattr(gpu_check, "GEMMA_270M", {**gpu_check.GEMMA_270M, **small})
    folder = gpu_check.stand_in_model(tmp_path)
    assert gpu_check.stand_in_model(tmp_path) == folder  # built once
    backend = HFCausalLM.from_pretrained(str(folder), dtype="fp32")
    cfg = backend.model.config
    assert (backend.n_layers, backend.d_model, cfg.vocab_size) == (3, 64, 4096)
    assert cfg.num_key_value_heads == 1 and cfg.sliding_window == 512
    assert len(backend.tokenizer) == 4096
    assert backend.tokenizer.decode([4095, 600]) == "<unused4095><unused600>"
    enc = backend.tokenizer(["The market rose"], return_tensors="pt")
    out = backend.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert backend.tokenizer.decode(out[0, enc["input_ids"].shape[1] :]).strip()
