"""AffinityTracker statistics under torch.distributed: two gloo processes on the CPU, each passing
its shard of every global batch, fold bit-identical moments, counts and histories, equal (to float
rounding of the averaged losses) to one process on the global batches."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawned_rank import run_rank
from torch import nn

from mtdl_fast.affinity import AffinityTracker

WORLD, K, B, STEPS = 2, 3, 12, 4  # B is the global batch


def _tracker(distributed: bool) -> AffinityTracker:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU()).double()
    heads = nn.ModuleList(nn.Linear(8, 4) for _ in range(K)).double()
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1, momentum=0.9)
    for p in trunk.parameters():  # a momentum buffer for the shared step to preview
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    return AffinityTracker(trunk, heads, optimizer=optimizer, baseline="shared_step", decay=0.8,
                           distributed=distributed)


def _track(distributed: bool) -> dict:
    tracker = _tracker(distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = slice(rank * B // world, (rank + 1) * B // world)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        views = torch.rand(K, B, 1, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (B,), generator=g)
        tracker.step(views[:, shard], y[shard])
    return {"state": tracker.state_dict(), "stderr": tracker.affinity_stderr}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(rank, WORLD, init_file, lambda: torch.save(_track(distributed=True), Path(out_dir) / f"rank{rank}.pt"))


def test_ranks_fold_identical_statistics_equal_to_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b = ranks
    for key in ("count", "moments", "history", "skipped"):
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert torch.equal(a["stderr"], b["stderr"])
    single = _track(distributed=False)
    assert torch.equal(single["state"]["count"], a["state"]["count"])
    torch.testing.assert_close(a["state"]["history"], single["state"]["history"], atol=1e-12, rtol=0)
    torch.testing.assert_close(a["stderr"], single["stderr"], atol=1e-12, rtol=1e-9)
    assert single["state"]["history"].abs().max() > 1e-3
