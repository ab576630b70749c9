"""Augmentation on the CPU: K = 10 default tasks, uint8 in, float32 out, every contender of
benchmarks/augment.py side by side per configuration and thread count (one pytest-benchmark group
each). The guard runs first (and warms up): views checked against exact answers and, for a fused
backend, against the torch path for the same parameters.

Targets (one thread; the fused CPU backend's): B=256 32x32 >= 5x kornia and torchvision batch,
>= 20x the torchvision per-image loop, within 3x of the copy floor; 224x224 >= 5x the per-image loop.
"""
import os

import pytest
import torch

from benchmarks import augment
from mtdl_fast.app.data import load_sample_photos

CONFIGS = {False: [(256, 32), (32, 224), (128, 224)], True: [(4, 32)]}
TARGETS = {  # (image side, contender) -> target of that row at one thread
    (32, "kornia per-sample"): ">= 5x ref", (32, "torchvision batch"): ">= 5x ref",
    (32, "torchvision per-image"): ">= 20x ref", (224, "torchvision per-image"): ">= 5x ref",
}
REFERENCE_TARGET = "<= 3x floor"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    quick = metafunc.config.getoption("--quick")
    threads = [1] if quick else sorted({1, 2, os.cpu_count() or 1})
    metafunc.parametrize("batch,size", CONFIGS[quick], ids=lambda v: str(v))
    metafunc.parametrize("threads", threads, ids=lambda t: f"{t}thr")
    metafunc.parametrize("contender", augment.contenders(torch.device("cpu")))


def test_augment(benchmark, batch: int, size: int, threads: int, contender: str) -> None:
    torch.set_num_threads(threads)
    x = load_sample_photos(size, batch, seed=0)
    try:
        fn = augment.build(contender, x)
    except augment.Unavailable as why:
        pytest.skip(str(why))
    note = augment.guard(contender, fn, x)
    reference = augment.contenders(x.device)[0]
    info = {"case": f"B={batch} 3x{size}x{size}", "contender": contender, "items": batch, "note": note,
            "bytes": augment.work_bytes(contender, x)}
    if contender in (reference, "copy floor"):
        info["role"] = "reference" if contender == reference else "floor"
    target = REFERENCE_TARGET if contender == reference else TARGETS.get((size, contender))
    if target and threads == 1:
        info["target"] = target
    benchmark.group = f"augment, {threads} thread{'s' if threads > 1 else ''}"
    benchmark.extra_info.update(info)
    benchmark(fn)
