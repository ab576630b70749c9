"""Inter-task affinity: TAG's naive loop against the batched AffinityTracker and a plain training step.

K = 10 default tasks (views made once, untimed), ResNet-8 (64 features), K linear heads, 32x32, float32.
Contenders: ``naive loop`` (``lookahead.naive_affinity``: K gradients, K x K forwards), ``batched
exact`` (the tracker's default; on CUDA also without the fused head + CE kernel; at chunk sizes 5, 2, 1
for peak memory), ``first_order``, ``plain step`` (what training pays anyway) and ``plain step
(stacked)`` (the trunk once on all K*B views). Guard: every batched exact Z equals the naive loop's
within 1e-4 (TF32 off). Floor: each row's FLOPs at the published TF32 peak (GPU) or a measured
``torch.mm`` rate (CPU); peak memory from CUDA's allocator or the process's peak resident set (Linux).

    python -m benchmarks.affinity                      # cuda when present, else cpu (B=64)
    python -m benchmarks.affinity --device cpu --quick # B=4, K=3: a smoke run, not written
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import mtdl_fast as mf
from benchmarks import common
from mtdl_fast.app.data import load_sample_photos
from mtdl_fast.lookahead import naive_affinity

LR, CLASSES, SIZE = 0.1, 10, 32
GUARD_ATOL = 1e-4
CHUNK_SIZES = (None, 5, 2, 1)
TARGETS = {"cpu": {"naive loop": ">= 1.5x ref"},
           "cuda": {"naive loop": ">= 4x ref", "first_order": "<= 1.3x plain step"}}


def make_problem(batch: int, k: int, device: torch.device, seed: int = 0):
    """(trunk, heads, views (K, B, 3, 32, 32) float32 in [0, 1], labels (B,)) on ``device``."""
    torch.manual_seed(seed)
    trunk = mf.models.SmallResNet(3).to(device).train()
    heads = mf.models.linear_heads(k, trunk.out_features, CLASSES).to(device).train()
    names = [mf.DEFAULT_TASKS[i % len(mf.DEFAULT_TASKS)] for i in range(k)]
    tasks = mf.DistributionTasks(names, seed=seed, backend="torch")  # the reference views, on any machine
    views = tasks(load_sample_photos(SIZE, batch, seed=seed)).clamp_(0.0, 1.0).to(device)
    labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    return trunk, heads, views, labels


def plain_step(trunk, heads, views, labels, stacked: bool = False) -> Callable[[], torch.Tensor]:
    """One SGD step of the summed per-view losses, on a copy of the model (the originals stay put)."""
    trunk, heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=LR)
    k, b = views.shape[:2]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        feats = trunk(views.flatten(0, 1)).unflatten(0, (k, b)) if stacked else [trunk(v) for v in views]
        loss = sum(F.cross_entropy(heads[j](feats[j]), labels) for j in range(k))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def contenders(trunk, heads, views, labels, device: torch.device) -> dict[str, Callable[[], Any]]:
    fns: dict[str, Callable[[], Any]] = {"naive loop": lambda: naive_affinity(trunk, heads, views, labels, lr=LR)[0]}
    variants = {"batched exact": {}, "first_order": {"mode": "first_order"}}
    if device.type == "cuda":
        variants["batched exact, fused_ce=False"] = {"fused_ce": False}
    variants.update({f"batched exact, chunk_size={c}": {"chunk_size": c} for c in CHUNK_SIZES
                     if c is None or c < len(heads)})
    for name, kwargs in variants.items():
        tracker = mf.AffinityTracker(trunk, heads, lr=LR, **kwargs)
        fns[name] = lambda t=tracker: t.step(views, labels)
    fns["plain step"] = plain_step(trunk, heads, views, labels)
    fns["plain step (stacked)"] = plain_step(trunk, heads, views, labels, stacked=True)
    return fns


def peak_memory_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float | None]:
    """(fn(), seconds, MiB the call added at its peak): CUDA's allocator peak, on Linux the process's peak
    resident set (reset through /proc/self/clear_refs) over its resident set before the call; None elsewhere."""
    def status_kib(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))

    cuda, before = device.type == "cuda", None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with contextlib.suppress(OSError, AttributeError):  # malloc_trim first: the call's peak shows in the RSS
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            before = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if before is None:
        return out, seconds, None
    return out, seconds, ((torch.cuda.max_memory_allocated(device) if cuda else status_kib("VmHWM") * 1024)
                          - before) / 2**20


def flops_per_call(batch: int, k: int, device: torch.device) -> dict[str, int]:
    """FLOPs of one call of every contender at ``batch``."""
    return common.flops_at(batch, device, lambda b: {
        n: common.count_flops(fn) for n, fn in contenders(*make_problem(b, k, device), device).items()})


def run(device: torch.device, batch: int, k: int, budget_s: float) -> list[dict[str, Any]]:
    """Guard, then time every contender; the records of the results file."""
    load = common.load_average()
    trunk, heads, views, labels = make_problem(batch, k, device)
    fns = contenders(trunk, heads, views, labels, device)
    first: dict[str, tuple[float, float | None]] = {}
    with common.strict_fp32():
        z_naive, *first["naive loop"] = peak_memory_call(fns["naive loop"], device)
        guard = {}
        for name in (n for n in fns if n.startswith("batched exact")):
            z, *first[name] = peak_memory_call(fns[name], device)
            guard[name] = float((z - z_naive).abs().max())
            assert guard[name] <= GUARD_ATOL, f"{name}: Z differs from the naive loop's by {guard[name]:.2e}"
    flops = flops_per_call(batch, k, device)
    peak, peak_what = common.peak_flops_per_s(device)
    group = f"affinity, K={k}, B={batch}, 3x{SIZE}x{SIZE} (floor: the row's FLOPs at the {peak_what})"
    records = []
    for name, fn in fns.items():
        if name not in first:
            out, *first[name] = peak_memory_call(fn, device)
            assert bool(torch.isfinite(out).all()), f"{name}: non-finite output {out}"
        sweep = "chunk_size=" in name
        one_call = sweep and device.type == "cpu"  # a slow CPU step: the guard's call is the timing
        times = [first[name][0]] if one_call else common.time_call(fn, budget_s)
        note = f"Z equals the naive loop's (max abs diff {guard[name]:.1e})" + "; one call" * one_call \
            if name in guard else None
        info: dict[str, Any] = {"items": batch, "flops": flops[name], "floor_s": flops[name] / peak, "note": note,
                                "columns": {"peak MiB": first[name][1]}, "target": TARGETS[device.type].get(name),
                                "role": "reference" if name == "batched exact" else None, **common.conditions(load)}
        case = "chunk sweep" if sweep else "one step"
        records.append(common.record(group, case, name.replace("batched exact, ", "") if sweep else name,
                                     times, **info))
    return records


def main(argv: list[str] | None = None) -> None:
    args = common.script_args(argv, __doc__, "default 128 on CUDA, 64 on the CPU (one core: minutes)")
    batch = args.batch or (4 if args.quick else 128 if args.device.type == "cuda" else 64)
    common.report(run(args.device, batch, 3 if args.quick else 10, args.budget or (0.05 if args.quick else 3.0)), args)


if __name__ == "__main__":
    main()
