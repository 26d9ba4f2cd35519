"""``storage.canonical_json``: the text every content hash is made of. The hashes of a
representative set of configs and manifests are pinned (computed once, pasted as literals):
a change to the conversion that moved any of them would invalidate every cached output."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from integral_superposition import storage
from pydantic import BaseModel, ConfigDict, field_serializer
from pydantic_core import to_jsonable_python


class Arch(enum.StrEnum):
    topk = "topk"


class Schedule(BaseModel):
    model_config = ConfigDict(frozen=True)
    lr: float = 3e-4
    l1_warmup_frac: float = 0.05
    train_tokens: int | None = None
    hook_point: str | None = "layer.6"


class StepConfig(BaseModel):
    k: int = 2048
    architecture: Literal["relu", "topk"] = "topk"
    arch: Arch = Arch.topk
    top_k: int = 32
    schedule: Schedule = Schedule()
    sweep_fractions: tuple[float, ...] = (0.25, 1 / 16)
    cache_dir: Path = Path("/cache/isup")
    storage_options: dict[str, str] = {"endpoint_url": "http://127.0.0.1:9000", "key": "AK"}
    labels: list[str] = ["World", "Sports", "Business", "Sci/Tech", "Überblick ☃"]

    @field_serializer("storage_options", when_used="json")
    def _mask(self, v: dict[str, str]) -> dict[str, str]:
        return {k: ("***" if k == "key" else x) for k, x in v.items()}


def cases() -> dict:
    """Configs and manifests as the steps write them: pydantic models (paths, tuples, enums, a
    field serialised for JSON only), numpy and torch scalars, int-keyed dicts, unicode."""
    files = {
        "sae_weights.safetensors": {"size": 5_251_072, "sha256": "ab" * 32},
        "cfg.json": {"size": 713, "sha256": "0f" * 32},
    }
    return {
        "sae manifest": {"kind": "sae", "config": StepConfig(), "files": files},
        "analysis manifest": {
            "kind": "analysis",
            "config": {
                "n_docs": np.int64(4000),
                "fvu": np.float32(0.1234),
                "dead": np.bool_(False),
                "l0": torch.tensor(31.5),
                "mean_norm": np.array(12.25),
                "one": np.array([7]),
                "per_label": {i: np.float64(i / 7) for i in range(12)},
                "thresholds": (0.5, 1e-7, 3.0e12),
                "missing": None,
                "where": Path("/runs/e/r/analysis/x"),
            },
            "files": {"tables/latents.parquet": {"size": 88_001, "sha256": "cd" * 32}},
        },
        "activations manifest": {
            "kind": "activations",
            "config": {
                "layer": 6,
                "dtype": "bf16",
                "hook_points": ["layer.6"],
                "model": {"model_id": "gemma-3-270m", "dtype": "float32", "revision": None},
            },
            "files": {
                f"shards/{i:05d}.safetensors": {"size": 1 << 20, "sha256": f"{i:064x}"}
                for i in range(11)
            },
        },
    }


# name -> (content_hash of the manifest, sha256 of canonical_json(config, indent=2))
PINNED = {
    "sae manifest": (
        "9f0e1f2dba27f432d5960af948bb6c778eb1373d5c7a9cc8b4857c26b55ebc54",
        "0f91e607e1b2cef75807130f0bba8bf2b3b6bc5f3a86c2ed49fce569229c8f1b",
    ),
    "analysis manifest": (
        "2944e626ca8236c5c90a87dd6f7a634bd28f82dd7bb19259347ad33d64abe6f3",
        "867d60d3104a90cee1e6cf99290d901269698fa2e6f6ddb05f72b125013e2f5b",
    ),
    "activations manifest": (
        "cb38324f92301927598e89d6c3151899be5e358cb19dd4e0297617dd5a41aafb",
        "aec877735328bad74bfd2192e7ac8387cca9166f8b48597f0ac5a31e4f0eaba8",
    ),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_content_hashes_stay_the_same(name):
    manifest = cases()[name]
    content, config = PINNED[name]
    assert storage.content_hash(manifest) == content
    text = storage.canonical_json(manifest["config"], indent=2)
    assert storage.sha256_bytes(text.encode()) == config


# a written manifest holds its config as JSON (int keys as strings, sorted as strings)
WRITTEN = {
    "sae manifest": "9f0e1f2dba27f432d5960af948bb6c778eb1373d5c7a9cc8b4857c26b55ebc54",
    "analysis manifest": "dabf9511ec6513cd6e5112dfccc11a146e3863a80d67015c5d2ccbae17184f4d",
    "activations manifest": "cb38324f92301927598e89d6c3151899be5e358cb19dd4e0297617dd5a41aafb",
}


@pytest.mark.parametrize("name", list(WRITTEN))
def test_a_written_manifest_has_the_pinned_hash(name, tmp_path):
    m = cases()[name]
    written = storage.write_manifest(str(tmp_path), m["kind"], m["config"], m["files"])
    assert written["content_hash"] == WRITTEN[name]
    assert storage.content_hash(storage.read_manifest(str(tmp_path))) == WRITTEN[name]


def test_what_to_jsonable_python_would_change():
    """Why the conversion stays hand-written (see ``canonical_json``'s docstring)."""
    by_int = {2: "b", 10: "a"}
    assert storage.canonical_json(by_int) == '{"2": "b", "10": "a"}'
    assert json.dumps(to_jsonable_python(by_int), sort_keys=True) == '{"10": "a", "2": "b"}'
    one = np.array([7])
    assert storage.canonical_json(one) == "7"
    assert to_jsonable_python(one, fallback=lambda o: o.tolist()) == [7]


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (np.array([1.0, 2.0]), "ndarray of shape (2,)"),
        (torch.zeros(2, 3), "Tensor of shape (2, 3)"),
        ({"a", "b"}, "set"),
        (object(), "object"),
    ],
)
def test_what_has_no_canonical_form_is_refused_by_name(value, named):
    with pytest.raises(TypeError, match=re.escape(f"not JSON serialisable: {named}; expected")):
        storage.canonical_json({"x": value})
