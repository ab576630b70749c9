"""mtdl_fast.loader.KViewCollate: K views made inside DataLoader workers (num_workers=2), equal to
the tasks applied to the same images with the returned params, seeded per worker and epoch,
reproducible from the loader's generator."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mtdl_fast as mf
from mtdl_fast.fused_cpu import available
from mtdl_fast.loader import KViewCollate, ViewBatch

TASKS = ["identity", "horizontal_flip", "rotate", "resized_crop", "contrast", "gaussian_blur", "gaussian_noise",
         "hue+erase"]
N, C, H, W, BATCH = 24, 3, 12, 10, 4


def dataset(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    return TensorDataset(images, torch.arange(N))


def loader(tasks, seed: int, num_workers: int = 2, data: TensorDataset | None = None) -> DataLoader:
    return DataLoader(data or dataset(), batch_size=BATCH, shuffle=True, num_workers=num_workers,
                      collate_fn=KViewCollate(tasks), generator=torch.Generator().manual_seed(seed))


def epoch(dl: DataLoader) -> list[ViewBatch]:
    return list(dl)


def test_workers_return_the_views_of_their_params():
    tasks = mf.DistributionTasks(TASKS, seed=0)
    data = dataset()
    batches = epoch(loader(tasks, seed=1, data=data))
    assert len(batches) == N // BATCH
    seen = torch.cat([b.targets for b in batches])
    assert sorted(seen.tolist()) == list(range(N))  # every sample once, shuffled
    for batch in batches:
        assert isinstance(batch, ViewBatch)
        assert batch.views.shape == (len(TASKS), BATCH, C, H, W) and batch.views.dtype == torch.float32
        images = data.tensors[0][batch.targets]
        assert torch.equal(batch.views, tasks.apply(images, batch.params))
    if available():
        assert tasks.resolve_backend(images) == "cpu"  # the workers ran the fused C++ path


def test_workers_draw_distinct_parameters_reproducibly():
    tasks = mf.DistributionTasks(TASKS, seed=0)
    same = TensorDataset(torch.full((N, C, H, W), 100, dtype=torch.uint8), torch.arange(N))  # identical images
    first = epoch(loader(tasks, seed=7, data=same))
    # consecutive batches alternate between the two workers: all differ (rotate draws fresh angles)
    for a, b in zip(first, first[1:]):
        assert not torch.equal(a.params.table, b.params.table)
    again = epoch(loader(tasks, seed=7, data=same))
    assert all(torch.equal(a.views, b.views) and torch.equal(a.targets, b.targets) for a, b in zip(first, again))
    other = epoch(loader(tasks, seed=8, data=same))
    assert not torch.equal(first[0].views, other[0].views)
    # a second epoch of the same loader draws new parameters
    dl = loader(tasks, seed=7, data=same)
    one, two = epoch(dl), epoch(dl)
    assert not torch.equal(one[0].params.table, two[0].params.table)


def test_main_process_uses_the_tasks_stream():
    tasks = mf.DistributionTasks(TASKS, seed=3)
    data = dataset()
    batches = epoch(loader(tasks, seed=1, num_workers=0, data=data))
    replay = mf.DistributionTasks(TASKS, seed=3)
    for batch in batches:
        params = replay.sample(BATCH, (H, W))
        assert torch.equal(params.table, batch.params.table)


def test_bad_collate_output_raises():
    tasks = mf.DistributionTasks(["identity"], seed=0)
    with pytest.raises(TypeError, match="tasks"):
        KViewCollate(["identity"])
    with pytest.raises(ValueError, match="images, targets"):
        KViewCollate(tasks, collate=lambda samples: torch.stack(samples))([torch.zeros(C, H, W)])
    with pytest.raises(ValueError, match="images"):
        KViewCollate(tasks)([(torch.zeros(H, W), 0)])
