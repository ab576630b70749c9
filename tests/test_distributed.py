"""torch.distributed: two gloo processes on the CPU take the same steps as one process on the
global batches -- affinity, losses and final parameters within 1e-5 -- through the engine and
through `torchrun -m mtdl_fast run`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawned_rank import run_rank

from mtdl_fast import distributed as dist_utils
from mtdl_fast.engine import MTDLEngine
from mtdl_fast.models import MLPTrunk, linear_heads
from mtdl_fast.research.stgu import SelectiveGroupUpdates
from mtdl_fast.tasks import DistributionTasks

WORLD = 2
K, B, STEPS = 3, 12, 6  # B is the global batch
NAN_STEP = 3  # a NaN pixel in rank 1's shard: every rank must skip this step, like one process

SCENARIOS = [
    {"mode": "exact", "every": 2, "weighting": "sum"},
    {"mode": "first_order", "every": 3, "weighting": "sum"},
    {"mode": "exact", "every": 2, "weighting": "uncertainty"},
]


def _global_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        views = torch.rand(K, B, 1, 6, 6, generator=g)
        if step == NAN_STEP:
            views[1, B - 1, 0, 2, 3] = float("nan")
        yield views, torch.randint(0, 4, (B,), generator=g)


def _engine(scenario: dict, distributed: bool) -> MTDLEngine:
    from mtdl_fast.research.weighting import make_weighting

    torch.manual_seed(0)
    trunk, heads = MLPTrunk(36, (16,)), linear_heads(K, 16, 4)
    weighting = make_weighting(scenario["weighting"], K)
    params = [*trunk.parameters(), *heads.parameters(), *weighting.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return MTDLEngine(DistributionTasks(["identity"] * K), trunk, heads, optimizer, weighting=weighting,
                      affinity_every=scenario["every"], affinity_mode=scenario["mode"], distributed=distributed)


def _train(scenario: dict, distributed: bool) -> dict:
    engine = _engine(scenario, distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = slice(rank * B // world, (rank + 1) * B // world)
    losses = []
    for views, y in _global_batches():
        loss, _ = engine.step_views(views[:, shard], y[shard])
        losses.append(float(loss))
    params = {n: p.detach().clone() for n, p in engine._loss_module.named_parameters()}
    return {"params": params, "affinity": engine.tracker.affinity.clone(), "losses": losses,
            "skipped": engine.skipped_steps, "tracker_steps": engine.tracker.steps}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(rank, WORLD, init_file, lambda: _record(rank, out_dir))


def _record(rank: int, out_dir: str) -> None:
    record = {"runs": [_train(s, distributed=True) for s in SCENARIOS]}
    mixed = [torch.full((2, 3), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1), dtype=torch.float64)]
    dist_utils.all_reduce_mean_(mixed)
    record["mixed"] = mixed
    errors = {}
    trunk, heads = MLPTrunk(36, (16,)), linear_heads(K, 16, 4)
    opt = torch.optim.SGD(trunk.parameters(), lr=0.1)
    for name, call in {
        "divisible": lambda: dist_utils.check_divisible(7),
        "stgu": lambda: MTDLEngine(DistributionTasks(["identity"] * K), trunk, heads, opt,
                                   strategy=SelectiveGroupUpdates(trunk, heads, opt)),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    record["errors"] = errors
    record["auto"] = MTDLEngine(DistributionTasks(["identity"] * K), MLPTrunk(36, (16,)), linear_heads(K, 16, 4),
                                torch.optim.SGD(MLPTrunk(36).parameters(), lr=0.1)).distributed
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("index", range(len(SCENARIOS)), ids=[f"{s['mode']}-{s['weighting']}" for s in SCENARIOS])
def test_two_ranks_take_the_single_process_steps(two_ranks, index):
    single = _train(SCENARIOS[index], distributed=False)
    assert single["skipped"] == 1, "the reference must see the injected NaN"
    for record in two_ranks:
        run = record["runs"][index]
        assert run["skipped"] == single["skipped"] and run["tracker_steps"] == single["tracker_steps"]
        torch.testing.assert_close(run["affinity"], single["affinity"], atol=1e-5, rtol=0, equal_nan=True)
        assert torch.isfinite(run["affinity"]).all()
        np.testing.assert_allclose(run["losses"], single["losses"], atol=1e-5, rtol=0)
        assert run["params"].keys() == single["params"].keys()
        for name, value in single["params"].items():
            torch.testing.assert_close(run["params"][name], value, atol=1e-5, rtol=0, msg=name)
    # and the ranks agree with each other exactly: the same averaged numbers were applied
    a, b = (r["runs"][index] for r in two_ranks)
    assert torch.equal(a["affinity"].nan_to_num(), b["affinity"].nan_to_num())
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


def test_all_reduce_mean_over_dtypes(two_ranks):
    for record in two_ranks:
        f32, f64 = record["mixed"]
        assert torch.equal(f32, torch.full((2, 3), 1.5)) and f32.dtype == torch.float32
        assert torch.equal(f64, torch.full((4,), 15.0, dtype=torch.float64)) and f64.dtype == torch.float64


def test_distributed_errors_name_the_value(two_ranks):
    errors = two_ranks[0]["errors"]
    assert "batch_size=7" in errors["divisible"] and "world size 2" in errors["divisible"]
    assert "group-update strategy" in errors["stgu"]
    assert all(r["auto"] for r in two_ranks), "an engine inside a 2-rank group must default to distributed"


def test_rank_seeds_are_distinct_streams():
    assert dist_utils.rank_seed(5, 0) == 5  # one process: unchanged
    seeds = [dist_utils.rank_seed(5, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [dist_utils.rank_seed(5, r) for r in range(8)]
    draws = [DistributionTasks(["rotate"], seed=s).sample(16).views[0][0]["angle"] for s in seeds[:2]]
    assert not torch.allclose(draws[0], draws[1])


def test_shutdown_leaves_the_group_even_when_a_peer_is_gone(monkeypatch):
    """A peer that left on an error makes the barrier raise: the group is still destroyed, with a
    warning; after failed work there is no barrier at all."""
    calls = []

    def barrier():
        calls.append("barrier")
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.warns(RuntimeWarning, match="Connection closed by peer"):
        dist_utils.shutdown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    dist_utils.shutdown(completed=False)
    assert calls == ["destroy"]


def test_single_process_helpers_are_identities():
    t = torch.randn(3)
    before = t.clone()
    dist_utils.all_reduce_mean_([t])
    assert torch.equal(t, before)
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1} and dist_utils.gather_objects(3) == [3]
    assert (dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main()) == (0, 1, True)
    assert dist_utils.check_divisible(7) == 7


RUN_ARGS = ["--tasks", "identity,horizontal_flip,vertical_flip,invert", "--trunk", "mlp", "--steps", "6",
            "--affinity-every", "2", "--batch-size", "16", "--checkpoint-every", "3", "--image-size", "8"]


def _cli(prefix: list[str], out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([*prefix, "-m", "mtdl_fast", "run", *RUN_ARGS, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_torchrun_run_matches_single_process(tmp_path):
    """Deterministic tasks, so one process and two ranks see the same views of each global batch."""
    from mtdl_fast.app.checkpoint import load_checkpoint

    two, one = tmp_path / "two", tmp_path / "one"
    stdout = _cli([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"], two)
    _cli([sys.executable], one)
    assert stdout.count("groups:") == 1, "only rank 0 reports"
    np.testing.assert_allclose(np.load(two / "affinity.npy"), np.load(one / "affinity.npy"), atol=1e-5, rtol=0)
    groups_two, groups_one = (json.loads((d / "groups.json").read_text()) for d in (two, one))
    assert groups_two.pop("score") == pytest.approx(groups_one.pop("score"), abs=1e-5)
    assert groups_two == groups_one
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)), "rank 0 alone writes the metrics"
    ref = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], atol=1e-5, rtol=0)
    state_two, state_one = load_checkpoint(two / "checkpoint.pt"), load_checkpoint(one / "checkpoint.pt")
    assert state_two["world_size"] == WORLD and state_one["world_size"] == 1
    seeds = [s["_extra_state"]["seed"] for s in state_two["tasks_by_rank"]]
    assert seeds[0] == 0 and seeds[1] == dist_utils.rank_seed(0, 1)
    for part in ("trunk", "heads"):
        for name, value in state_one["engine"][part].items():
            torch.testing.assert_close(state_two["engine"][part][name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_rank_ends_without_interpreter_teardown(world):
    """The console script under torchrun: its exit code and flushed output, no teardown (an atexit
    handler stands for it); in one process the usual exit."""
    code = ("import atexit, sys; atexit.register(lambda: print('teardown')); "
            "sys.argv = ['mtdl-fast', 'groups', '/no/such/affinity.csv']; "
            "from mtdl_fast.app.cli import script_main; script_main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": world})
    assert proc.returncode == 2 and "/no/such/affinity.csv does not exist" in proc.stderr
    assert ("teardown" in proc.stdout) == (world == "1")


def test_resume_needs_the_same_world_size(tmp_path):
    from mtdl_fast.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from mtdl_fast.app.trainer import RunConfig, build_engine, load_dataset, load_run_checkpoint, save_run_checkpoint

    config = RunConfig(tasks=["identity", "invert"], trunk="mlp", steps=2, image_size=8)
    data = load_dataset(config)
    engine = build_engine(config, config.tasks, data, torch.device("cpu"))
    path = tmp_path / "checkpoint.pt"
    save_run_checkpoint(path, config, engine, 2)
    assert load_run_checkpoint(path, config, engine) == 2
    state = load_checkpoint(path)
    state["world_size"], state["tasks_by_rank"] = 2, state["tasks_by_rank"] * 2
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="written by 2 process"):
        load_run_checkpoint(path, config, engine)
