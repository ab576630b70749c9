"""GPU sweeps on triton.testing: ``do_bench`` times (L2 flushed before every call), ``perf_report``
writes a CSV and a plot per sweep to ``results/<gpu>-sweeps/``; headline points go to
``results/<gpu>.json``.

* ``augment-32``, ``augment-224``: GB/s (uint8 input read once, K float32 views written) of every
  contender of benchmarks/augment.py over the batch size; floor: the bytes at the measured copy
  bandwidth; share of the peak DRAM bandwidth recorded; triton-augment also on its own five tasks.
* ``lookahead-ce``: the fused head + cross-entropy kernel against its torch twin, K x K sets of B rows.

Guards: augment.guard, the kernel's losses against the twin's. Without CUDA nothing runs.

    python -m benchmarks.gpu_sweeps
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton.testing

from benchmarks import augment, common
from mtdl_fast.app.data import load_sample_photos
from mtdl_fast.kernels.lookahead_ce import lookahead_cross_entropy, lookahead_cross_entropy_torch

Timer = Callable[[Callable[[], Any]], list[float]]  # fn -> milliseconds per call
SWEEPS = {32: [64, 256, 1024], 224: [32, 128]}  # image side -> batch sizes
HEADLINE = {(32, 256), (224, 128)}  # the points recorded in the results file
CE_BATCHES, CE_CONTENDERS = [64, 128, 512, 2048], ["fused kernel", "torch twin"]
PER_IMAGE_MAX_BATCH = 256
K, FEATURES, CLASSES = len(augment.TASKS), 64, 10
# contender -> (target, smallest image side it applies to): >= 70% of the copy bandwidth at 224x224,
# >= 20x kornia, >= 5x triton-augment on its own tasks.
GPU_TARGETS = {"mtdl-fast triton (apply)": ("<= 1.43x floor", 224), "kornia per-sample": (">= 20x ref", 0),
               "triton-augment": (">= 5x ref", 0)}


def do_bench_ms(fn: Callable[[], Any]) -> list[float]:
    return list(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))


def augment_record(contender: str, x: torch.Tensor, timer: Timer, copy_gbps: float, peak_gbps: float | None,
                   tasks: list[str] = augment.TASKS, case: str | None = None) -> dict[str, Any] | None:
    """Guard and time one contender on ``x`` (for ``tasks``: all, or triton-augment's for the same-work
    comparison); its record, or None where it cannot run."""
    try:
        fn = augment.build(contender, x, tasks)
    except augment.Unavailable:
        return None
    note = augment.guard(contender, fn, x) if tasks == augment.TASKS else "triton-augment's tasks"
    assert fn().shape == (len(tasks), *x.shape), f"{contender}: wrong output shape"
    nbytes = augment.work_bytes(contender, x, len(tasks))
    ms = timer(fn)
    gbps = nbytes / (statistics.median(ms) * 1e6)
    info = {"items": x.shape[0], "bytes": nbytes, "floor_s": nbytes / (copy_gbps * 1e9), "note": note,
            "columns": {"% of peak BW": 100 * gbps / peak_gbps if peak_gbps else None}}
    if contender == "mtdl-fast triton":
        info["role"] = "reference"
    target, min_size = GPU_TARGETS.get(contender, (None, 0))
    if target and x.shape[-1] >= min_size:
        info["target"] = target
    case = case or f"B={x.shape[0]} 3x{x.shape[-1]}x{x.shape[-1]}"
    return common.record("augment sweeps (floor: bytes at the measured copy bandwidth)", case, contender,
                         [t / 1e3 for t in ms], **info, **common.conditions(common.load_average()))


def ce_record(contender: str, batch: int, device: torch.device, timer: Timer, copy_gbps: float) -> dict[str, Any]:
    """Guard and time the lookahead cross-entropy (kernel or twin) on K x K sets of ``batch`` rows."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(K, K, batch, FEATURES, generator=gen).to(device)
    weight = torch.randn(K, CLASSES, FEATURES, generator=gen).to(device)
    bias = torch.randn(K, CLASSES, generator=gen).to(device)
    targets = torch.randint(0, CLASSES, (K, batch), generator=gen).to(device)
    twin = lookahead_cross_entropy_torch(features, weight, bias, targets)
    fn = {"fused kernel": lambda: lookahead_cross_entropy(features, weight, bias, targets),
          "torch twin": lambda: lookahead_cross_entropy_torch(features, weight, bias, targets)}[contender]
    torch.testing.assert_close(fn(), twin, rtol=1e-5, atol=1e-5)
    nbytes = features.numel() * 4
    return common.record("lookahead cross-entropy sweep (floor: features read at the measured copy bandwidth)",
                         f"K x K = {K * K} sets of B={batch}", contender, [t / 1e3 for t in timer(fn)],
                         items=batch, bytes=nbytes, floor_s=nbytes / (copy_gbps * 1e9), note="losses == twin's",
                         role="reference" if contender == "fused kernel" else None,
                         **common.conditions(common.load_average()))


def run(out_dir: Path, device: torch.device, timer: Timer = do_bench_ms) -> list[dict[str, Any]]:
    """Every sweep through perf_report (CSV + plot in ``out_dir``); the headline records."""
    peak_gbps = triton.testing.get_dram_gbps() if device.type == "cuda" else None
    copy_gbps = common.copy_gbps(device)
    out_dir.mkdir(parents=True, exist_ok=True)  # perf_report saves the plot before it makes the folder
    headline: list[dict[str, Any]] = []
    names = augment.contenders(device)
    for size, batches in SWEEPS.items():
        @triton.testing.perf_report(triton.testing.Benchmark(
            x_names=["batch"], x_vals=batches, line_arg="contender", line_vals=names, line_names=names,
            plot_name=f"augment-{size}", ylabel="GB/s", x_log=True, y_log=True, args={"size": size}))
        def sweep(batch: int, contender: str, size: int) -> float:
            if contender == "torchvision per-image" and batch > PER_IMAGE_MAX_BATCH:
                return math.nan
            x = load_sample_photos(size, batch, seed=0).to(device)
            rec = augment_record(contender, x, timer, copy_gbps, peak_gbps)
            if rec and (size, batch) in HEADLINE:
                headline.append(rec)
            return rec["extra_info"]["bytes"] / rec["stats"]["median"] / 1e9 if rec else math.nan

        sweep.run(save_path=str(out_dir), print_data=True)
    x = load_sample_photos(224, 32, seed=0).to(device)
    for contender in ("triton-augment", "mtdl-fast triton"):
        rec = augment_record(contender, x, timer, copy_gbps, peak_gbps, augment.TRITON_AUGMENT_TASKS,
                             case="B=32 3x224x224, triton-augment's tasks")
        headline += [rec] if rec else []

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["batch"], x_vals=CE_BATCHES, line_arg="contender", line_vals=CE_CONTENDERS, line_names=CE_CONTENDERS,
        plot_name="lookahead-ce", ylabel="GB/s", x_log=True, y_log=True, args={}))
    def ce_sweep(batch: int, contender: str) -> float:
        rec = ce_record(contender, batch, device, timer, copy_gbps)
        headline.append(rec)
        return rec["extra_info"]["bytes"] / rec["stats"]["median"] / 1e9 if rec else math.nan

    ce_sweep.run(save_path=str(out_dir), print_data=True)
    return headline


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_sweeps: skipped, no CUDA GPU")
        return
    device = torch.device("cuda")
    path = common.results_path(device)
    print("wrote", common.merge(path, run(path.with_name(path.stem + "-sweeps"), device), device))


if __name__ == "__main__":
    main()
