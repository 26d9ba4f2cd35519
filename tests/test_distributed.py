"""``distributed``: the no-op single process, batch and module partitions, torchrun commands."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
from integral_superposition import distributed


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_single_process_is_rank_zero_of_one_and_collectives_are_identity(no_torchrun):
    assert not distributed.launched()
    info = distributed.init("cpu")
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    assert info.device == torch.device("cpu") and info.backend is None
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_objects(3) == [3]
    assert distributed.all_reduce_metrics({"loss": 2.5}, weight=7) == {"loss": 2.5}
    assert distributed.is_main()
    distributed.barrier()
    with pytest.raises(ValueError, match=r"op='mean'"):
        distributed.all_reduce_(t, "mean")


def test_incomplete_torchrun_environment_is_named(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init("cpu")
    for k, v in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match=r"RANK='two': expected an integer"):
        distributed.init("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2, WORLD_SIZE=2"):
        distributed.init("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"device='tpu'"):
        distributed.init("tpu")


@pytest.mark.parametrize("n, world", [(10, 3), (64, 2), (5, 8), (0, 2), (4097, 4)])
def test_shard_range_partitions_a_batch_in_rank_order(n, world):
    parts = [distributed.shard_range(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match=r"rank=3, world_size=3"):
        distributed.shard_range(n, 3, 3)


def test_assign_modules_balances_cost_deterministically():
    costs = [8.0, 1.0, 4.0, 4.0, 2.0, 1.0]
    owner = distributed.assign_modules(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert loads == [10.0, 10.0]
    assert owner[0] == 0  # the most expensive goes first, to rank 0
    assert distributed.assign_modules(costs, 1) == [0] * len(costs)
    # more ranks than modules: each module on its own rank, some ranks idle
    assert sorted(distributed.assign_modules([3.0, 1.0], 4)) == [0, 1]
    with pytest.raises(ValueError, match=r"world_size=0"):
        distributed.assign_modules(costs, 0)


def test_torchrun_command():
    cmd = distributed.torchrun_command(2, "pkg.mod", ["--x", 1])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-4:] == ["-m", "pkg.mod", "--x", "1"]
    script = distributed.torchrun_command(1, "bench/run.py", ["--y"])
    assert script[-2:] == ["bench/run.py", "--y"] and "-m" not in script[3:]
    multi = distributed.torchrun_command(
        4, "m", nnodes=2, rdzv_endpoint="head:29400", rdzv_id="job7", max_restarts=3
    )
    assert "--standalone" not in multi
    assert multi[multi.index("--rdzv-endpoint") + 1] == "head:29400"
    assert multi[multi.index("--max-restarts") + 1] == "3"
    with pytest.raises(ValueError, match=r"nproc=0"):
        distributed.torchrun_command(0, "m")
    with pytest.raises(ValueError, match=r"nnodes=2: a multi-node run needs rdzv_endpoint"):
        distributed.torchrun_command(1, "m", nnodes=2)


def test_store_parts_of_every_batch_concatenate_to_the_whole_batch(tmp_path):
    from integral_superposition.dump.synthetic import write_activation_store

    x = torch.randn(1000, 6)
    store = write_activation_store({"a": x, "b": -x}, str(tmp_path / "acts"))
    kw = dict(hook_points=["a", "b"], seed=3, n_batches=9, buffer_tokens=256, block_tokens=64)
    whole = list(store.iter_batches(50, **kw))
    world = 3
    parts = [
        list(store.iter_batches(50, part=distributed.shard_range(50, r, world), **kw))
        for r in range(world)
    ]
    assert len(whole) == 9 and all(len(p) == 9 for p in parts)
    for i, b in enumerate(whole):
        for h in ("a", "b"):
            got = torch.cat([p[i].acts[h] for p in parts])
            assert torch.equal(got, b.acts[h])
        assert (np.concatenate([p[i].index for p in parts]) == b.index).all()
    # resuming at a batch gives the same parts; an empty part yields empty batches
    late = list(store.iter_batches(50, part=(17, 34), start_batch=5, **kw))
    assert all(
        torch.equal(q.acts["a"], p.acts["a"]) for q, p in zip(late, parts[1][5:], strict=True)
    )
    empty = list(store.iter_batches(50, part=(20, 20), **kw))
    assert len(empty) == 9 and empty[0].acts["a"].shape == (0, 6)
    with pytest.raises(ValueError, match=r"part=\(3, 60\)"):
        next(store.iter_batches(50, part=(3, 60), **kw))
