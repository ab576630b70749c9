"""Augmentation on the CPU: K = 10 default tasks, uint8 in, float32 out, every contender of
benchmarks/augment.py side by side per configuration and thread count (a pytest-benchmark group
each), after its guard. In DataLoader workers: an epoch of 2,048 3x32x32 images, B=256,
num_workers=2 (persistent, warmed), views made by KViewCollate or augment.ViewsCollate.
Targets (one thread, the fused CPU backend): B=256 32x32 >= 5x kornia and torchvision batch, >= 20x
the torchvision per-image loop, within 3x of the copy floor; 224x224 >= 5x the per-image loop.
"""
import os
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mtdl_fast as mf
from benchmarks import augment
from mtdl_fast.app.data import load_sample_photos
from mtdl_fast.loader import KViewCollate

CONFIGS = {False: [(256, 32), (32, 224), (128, 224)], True: [(4, 32)]}
TARGETS = {  # (image side, contender) -> target of that row at one thread; None: the reference row's
    (32, "kornia per-sample"): ">= 5x ref", (32, "torchvision batch"): ">= 5x ref",
    (32, "torchvision per-image"): ">= 20x ref", (224, "torchvision per-image"): ">= 5x ref", None: "<= 3x floor"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    quick = metafunc.config.getoption("--quick")
    if metafunc.function is test_loader:
        metafunc.parametrize("images,batch", [(256, 64)] if quick else [(2048, 256)], ids=str)
        metafunc.parametrize("collate", [*(f"mtdl-fast {b}" for b in augment.mtdl_backends(torch.device("cpu"))),
                                         "torchvision per-image", "transfer floor"])
        return
    metafunc.parametrize("batch,size", CONFIGS[quick], ids=str)
    metafunc.parametrize("threads", [1] if quick else sorted({1, 2, os.cpu_count() or 1}), ids=lambda t: f"{t}thr")
    metafunc.parametrize("contender", augment.contenders(torch.device("cpu")))


def record(benchmark, group: str, case: str, contender: str, items: int, note: str, floor: str, **extra) -> bool:
    """Fill the benchmark's group and record (reference: the first mtdl-fast backend; ``floor`` the floor
    row); True for the reference row."""
    reference = f"mtdl-fast {augment.mtdl_backends(torch.device('cpu'))[0]}"
    role = {floor: "floor", reference: "reference"}.get(contender)
    benchmark.group = group
    benchmark.extra_info.update({"case": case, "contender": contender, "items": items, "note": note, **extra})
    benchmark.extra_info.update({"role": role} if role else {})
    return role == "reference"


def test_augment(benchmark, batch: int, size: int, threads: int, contender: str) -> None:
    torch.set_num_threads(threads)
    x = load_sample_photos(size, batch, seed=0)
    try:
        fn = augment.build(contender, x)
    except augment.Unavailable as why:
        pytest.skip(str(why))
    note = augment.guard(contender, fn, x)
    is_reference = record(benchmark, f"augment, {threads} thread{'s' if threads > 1 else ''}", f"B={batch} 3x{size}x"
                          f"{size}", contender, batch, note, "copy floor", bytes=augment.work_bytes(contender, x))
    target = TARGETS.get(None if is_reference else (size, contender))
    benchmark.extra_info.update({"target": target} if target and threads == 1 else {})
    benchmark(fn)


def test_loader(benchmark, images: int, batch: int, collate: str) -> None:
    x = load_sample_photos(32, images, seed=0)
    made = {"torchvision per-image": augment.ViewsCollate(partial(augment.per_image, augment.torchvision_transforms(
        32, x.device))), "transfer floor": augment.ViewsCollate()}.get(collate) or \
        KViewCollate(mf.DistributionTasks(augment.TASKS, seed=0, backend=collate.split()[-1]))
    loader = DataLoader(TensorDataset(x, torch.zeros(images, dtype=torch.int64)), batch_size=batch, num_workers=2,
                        collate_fn=made, persistent_workers=True)
    first = next(iter(loader))  # the guard (the workers' views against the torch path's), and the workers' start
    note = "views left uncomputed" if collate == "transfer floor" else augment.guard(
        collate, None, x[:batch], made=(first[0], first[2] if collate.startswith("mtdl") else None))
    record(benchmark, "augment in DataLoader workers, num_workers=2", f"{images} images 3x32x32, B={batch}", collate,
           images, note, "transfer floor")
    benchmark.pedantic(lambda: sum(len(b[1]) for b in loader), rounds=5, warmup_rounds=1, iterations=1)
