"""``isup run`` with online training: no dump step, a bounded sample for the later steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from integral_superposition import storage
from integral_superposition.dump import ActivationStore
from integral_superposition.dump.shards import verify_dump
from integral_superposition.sae import load_sae

pytestmark = pytest.mark.prefect


def test_isup_run_online_completes_analysis_merge_and_steering(prefect_api, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_API_URL": prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    exe = Path(sys.executable).with_name("isup")
    proc = subprocess.run(
        [
            str(exe), "run", "--preset", "smoke", "--storage", str(tmp_path), "--run", "online",
            "--set", "online.enabled=true", "--set", "online.sample_tokens=3000",
            "--set", "fanout.partitions=1",
        ],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "smoke" / "online"
    index = json.loads((root / "run.json").read_text())
    done = {s["step"] for s in index["steps"] if s["state"] in ("Completed", "Cached")}
    assert {"data", "train", "analyze", "merge", "steer_eval", "report"} <= done
    assert "dump" not in {s["step"] for s in index["steps"]}

    # the later steps read a bounded sample, held-out documents first
    acts = str(root / "acts")
    assert verify_dump(acts)
    sample = ActivationStore(acts)
    longest = int(sample.docs["n_tokens"].max())
    assert 3000 <= sample.n_tokens < 3000 + longest
    assert sample.split_mask("test").any()
    sae_dir = next(p for p in (root / "sae").iterdir() if p.is_dir())
    sae = load_sae(str(sae_dir))
    assert sae.metadata["isup_source"] == "online"
    m = storage.read_manifest(str(sae_dir))
    assert m["metrics"]["train_tokens"] > sample.n_tokens  # trained on far more than it kept
    assert (root / "report" / "report.html").exists()


def test_online_with_a_training_fanout_is_refused_naming_the_field():
    from integral_superposition.experiment import ConfigError
    from integral_superposition.flows.config import load_preset

    with pytest.raises(ConfigError, match=r"fanout\.train='per_sae'.*online\.enabled"):
        load_preset("smoke", ["online.enabled=true", "fanout.train=per_sae"])
    with pytest.raises(ConfigError, match=r"fanout\.gpus_per_run=2"):
        load_preset("smoke", ["online.enabled=true", "fanout.gpus_per_run=2"])
    assert load_preset("smoke", ["online.enabled=true"]).online.enabled
