"""What the benchmarks share: the device's results file, records in pytest-benchmark's JSON schema,
the measured floors (copy bandwidth, float32 matmul rate) and the published GPU peaks.

A results file, ``benchmarks/results/<device>.json``, is pytest-benchmark's ``--benchmark-json``
output; the scripts that time with torch.utils.benchmark or triton.testing (step, affinity, GPU
sweeps) merge records of the same schema into it, so ``pytest-benchmark compare`` and readme.py read
every measurement the same way. A record's ``extra_info``:

    case, contender        the table row; a case groups contenders that do the same work
    role                   "reference" (the case's ratios are against it) or "floor" (its physical floor)
    items, bytes, flops    work per call -> images/s, GB/s, GFLOP/s
    floor_s                the row's own floor (its FLOPs at the peak rate), where the case has no floor row
    target                 ">= 5x ref", "<= 3x floor", "< 2 s", ... (judged by readme.py)
    columns                further named values (peak MiB, aten ops/call, ...)
    note                   the guard that passed before timing, or what makes the row special
    threads, load_average, date, command   the conditions of the measurement
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pytest_benchmark.stats import Stats
from torch.utils import benchmark as torch_benchmark
from torch.utils.benchmark.utils.timer import timer as clock

RESULTS = Path(__file__).resolve().parent / "results"

# Published dense TF32 tensor-core peaks in TFLOP/s (no sparsity), by GPU name (lower-case substrings,
# first match wins): cuDNN runs float32 convolutions in TF32 under torch's defaults.
PEAK_TF32_TFLOPS = [(("h100", "pcie"), 378.0), (("h100", "nvl"), 417.5), (("gh200",), 494.7), (("h200",), 494.7),
                    (("h100",), 494.7), (("a100",), 156.0), (("l40s",), 183.0), (("a10g",), 35.0)]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (Linux's /proc/cpuinfo; the architecture elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    lines = info.read_text(errors="replace").splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def results_path(device: torch.device) -> Path:
    """``results/<gpu-name>.json`` or ``results/<cpu-model>-cpu.json``, names in lower-case-dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(R\)|\(TM\)|\d+-core|processor", "", device_name(device),
                                             flags=re.I).lower()).strip("-")
    return RESULTS / (f"{slug}.json" if device.type == "cuda" else f"{slug}-cpu.json")


def load_average() -> float | None:
    """The 1-minute load average: other work on a shared machine skews CPU timings."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def conditions(load_before: float | None) -> dict[str, Any]:
    """The ``threads``/``load_average``/``date``/``command`` fields of a record."""
    script = Path(sys.argv[0])
    prog = f"python -m benchmarks.{script.stem}" if script.parent == RESULTS.parent else script.name
    return {"threads": torch.get_num_threads(), "load_average": [load_before, load_average()],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([prog, shlex.join(sys.argv[1:])]).strip()}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What identifies the machine and the software a results file was measured with."""
    info = {"device": device_name(device), "node": platform.node(), "system": platform.system(),
            "python_version": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    for name in ("torchvision", "triton", "kornia"):
        info[name] = importlib.import_module(name).__version__ if importlib.util.find_spec(name) else None
    return info


def record(group: str, case: str, contender: str, times_s: Iterable[float], **extra: Any) -> dict[str, Any]:
    """A pytest-benchmark JSON record of per-call times (seconds) measured outside pytest; ``extra``
    entries that are None are left out."""
    stats = Stats()
    for t in times_s:
        stats.update(t)
    name = f"{case} | {contender}" if case else contender
    return {"group": group, "name": name, "fullname": f"{group}::{name}", "params": None, "param": None,
            "extra_info": {"case": case, "contender": contender, **{k: v for k, v in extra.items() if v is not None}},
            "options": {},
            "stats": {**stats.as_dict(), "iterations": 1}}


def merge(path: Path, records: list[dict[str, Any]], device: torch.device) -> Path:
    """Write ``records`` into the results file at ``path``, replacing those of the same group and name
    and keeping the others (pytest-benchmark's own, or another script's)."""
    data = json.loads(path.read_text()) if path.exists() else {"machine_info": {}, "commit_info": {},
                                                                  "benchmarks": [], "version": "mtdl-fast"}
    data["machine_info"].update(machine_info(device))
    data["benchmarks"] = merged(data["benchmarks"], records)
    data["datetime"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def merged(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` without the (group, name) pairs of ``new``, then ``new``."""
    keys = {(r["group"], r["name"]) for r in new}
    return [r for r in old if (r["group"], r["name"]) not in keys] + new


def script_args(argv: list[str] | None, doc: str, batch_help: str) -> argparse.Namespace:
    """The command line of the step and affinity scripts; sets the thread count."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the smallest sizes, a short budget; printed, not written")
    p.add_argument("--batch", type=int, default=None, help=batch_help)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per contender")
    p.add_argument("--json", type=Path, default=None, help="results file to merge into (default: the device's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def report(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the records; merge them into the results file unless a quick run names none."""
    for r in records:
        print(f"{r['name']:<90} {r['stats']['median'] * 1e3:10.3f} ms  {r['extra_info'].get('note', '')}")
    if args.json or not args.quick:
        print("wrote", merge(args.json or results_path(args.device), records, args.device))


@contextlib.contextmanager
def strict_fp32():
    """TF32 off on CUDA (convolutions and matmuls) for a guard: float32 means float32 there."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def time_call(fn: Callable[[], Any], budget_s: float, min_rounds: int = 3) -> list[float]:
    """Seconds per call of ``fn`` on torch.utils.benchmark's clock (it synchronises an accelerator). One
    call warms up and sizes the rest: calls slower than ``budget_s / min_rounds`` get single-call rounds
    (at least two), faster ones ``Timer.blocked_autorange`` over ``budget_s``."""
    def once() -> float:
        start = clock()
        fn()
        return clock() - start

    first = once()
    if first * min_rounds > budget_s:
        return [once() for _ in range(max(2, min(min_rounds, int(budget_s / first))))]
    return list(torch_benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=budget_s).times)


def copy_gbps(device: torch.device) -> float:
    """Measured copy bandwidth in GB/s (1e9 bytes), read and written bytes counted: ``dst.copy_(src)``
    of 1 GiB on a GPU, 256 MiB on a CPU."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / statistics.median(time_call(lambda: dst.copy_(src), 0.5, min_rounds=5)) / 1e9


def peak_flops_per_s(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, what it is): the published TF32 peak of a known GPU, else a measured float32 ``torch.mm``
    rate (n = 1024 on a CPU, which has no published peak; 8192 on a GPU)."""
    name = device_name(device).lower()
    for keys, tflops in PEAK_TF32_TFLOPS if device.type == "cuda" else []:
        if all(k in name for k in keys):
            return tflops * 1e12, "published TF32 dense peak"
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / statistics.median(time_call(lambda: torch.mm(a, b), 0.5)), "measured float32 torch.mm rate"


def flops_at(batch: int, device: torch.device, count: Callable[[int], dict[str, int]]) -> dict[str, int]:
    """``count(batch)`` on CUDA; on the CPU ``count(8)`` and ``count(4)``, checked linear in the batch (a
    conv net's convolutions and matmuls are) and scaled: counting a full-size CPU step takes minutes."""
    if device.type == "cuda" or batch <= 8:
        return count(batch)
    at, half = count(8), count(4)
    assert all(at[n] == 2 * half[n] for n in at), f"FLOPs not linear in the batch: {at} at B=8, {half} at B=4"
    return {n: f * batch // 8 for n, f in at.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """Convolution and matmul FLOPs of one call (FlopCounterMode), grouped convolutions' weight
    gradients counted once: torch's formula counts them ``groups`` times, and vmap turns the K
    per-task gradients into exactly such convolutions (groups = K)."""
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    def conv_backward(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _out_pad, groups,
                      mask, out_shape, **_):
        def swap(s):
            return [s[1], s[0], *s[2:]]

        flops = conv_flop_count(grad_out, w, out_shape[0], transposed=not transposed) if mask[0] else 0
        if mask[1]:
            a, b = (grad_out, x) if transposed else (x, grad_out)
            flops += conv_flop_count(swap(a), swap(b), swap(out_shape[1]), transposed=False) // max(1, groups)
        return flops

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward}) as c:
        fn()
    return int(c.get_total_flops())
