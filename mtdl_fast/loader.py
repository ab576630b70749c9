"""K task views made inside DataLoader workers.

`KViewCollate` is a ``collate_fn``: it stacks a list of ``(image, target)`` samples into a batch
(B, C, H, W), draws every view's per-image parameters and returns the K views (K, B, C, H, W) with
the targets and the parameters, all inside the worker process. The training loop receives finished
views (e.g. for `MTDLEngine.step_views`) while the workers prepare the next batches::

    from torch.utils.data import DataLoader
    import mtdl_fast as mf
    from mtdl_fast.loader import KViewCollate

    tasks = mf.DistributionTasks(mf.DEFAULT_TASKS, seed=0)   # "auto": the fused C++ path on CPU tensors
    loader = DataLoader(dataset, batch_size=256, shuffle=True, num_workers=4,
                        collate_fn=KViewCollate(tasks), generator=torch.Generator().manual_seed(0))
    for views, targets, params in loader:                  # views: (K, B, C, H, W)
        engine.step_views(views.to(device), targets.to(device))

Images may be uint8 (scaled by 1/255, as torchvision's ``to_dtype(scale=True)``) or float in
[0, 1]; views come out in ``tasks.out_dtype`` with the tasks' normalisation. DataLoader workers run
torch with one intra-op thread, so each worker computes its batches on one core and the workers
together use as many cores as there are workers.

Seeding: a worker draws its parameters from a generator seeded with the seed the DataLoader gives
that worker (``torch.utils.data.get_worker_info().seed``: the loader's per-epoch base seed plus the
worker id), so workers draw distinct parameters, every epoch afresh, and a DataLoader with a seeded
``generator`` reproduces every batch exactly. With ``num_workers=0`` the batches come from the
tasks' own stream (their ``seed``), reproducible too.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import default_collate, get_worker_info

from mtdl_fast.tasks import DistributionTasks, TaskParams


class ViewBatch(NamedTuple):
    """One batch of K views: what `KViewCollate` returns (a NamedTuple, so pin_memory keeps it)."""

    views: torch.Tensor   # (K, B, C, H, W) in tasks.out_dtype
    targets: Any          # the collated targets, e.g. (B,) int64
    params: TaskParams    # the per-view, per-image parameters that made `views` (tasks.apply(x, params))


class KViewCollate:
    """``collate_fn`` that turns ``(image, target)`` samples into a `ViewBatch` of K views.

    Args:
        tasks: the K distribution tasks; its backend decides the path ("auto": the fused C++ path
            for CPU tensors when every task fuses, the torch path otherwise).
        collate: how to batch the samples into ``(images (B, C, H, W), targets)``; default
            `torch.utils.data.default_collate`.
    """

    def __init__(self, tasks: DistributionTasks,
                 collate: Callable[[Sequence[Any]], tuple[torch.Tensor, Any]] = default_collate):
        if not isinstance(tasks, DistributionTasks):
            raise TypeError(f"tasks must be a DistributionTasks, got {type(tasks).__name__}")
        self.tasks = tasks
        self.collate = collate
        self._worker_seed: int | None = None
        self._generator: torch.Generator | None = None

    def __call__(self, samples: Sequence[Any]) -> ViewBatch:
        batch = self.collate(samples)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"collate must give (images, targets), got {type(batch).__name__}"
                             f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
        images, targets = batch
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must collate to a (B, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        params = self.tasks.sample(images.shape[0], tuple(images.shape[-2:]), generator=self._worker_generator())
        return ViewBatch(self.tasks.apply(images, params), targets, params)

    def _worker_generator(self) -> torch.Generator | None:
        """This worker's generator, reseeded when the DataLoader gives the worker a new seed (a new
        epoch); None in the main process (the tasks' own stream)."""
        info = get_worker_info()
        if info is None:
            return None
        if info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self._generator = torch.Generator().manual_seed(info.seed)
        return self._generator
