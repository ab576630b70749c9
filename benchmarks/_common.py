"""Shared helpers of the benchmark scripts: timing, device description, bandwidth, result files.

Every benchmark under ``benchmarks/`` times mtdl-fast against its peers in the same run and writes
one section (its own top-level key) of ``benchmarks/results/<device-slug>.json``; other sections of
that file are kept. Conventions:

* CUDA timings: ``triton.testing.do_bench`` (median, L2 flushed between calls) when Triton is
  importable, else CUDA events around each call after warm-up; median over the repeats.
* CPU timings: ``time.perf_counter`` around each call after warm-up; median over the repeats.
  The number of repeats adapts to a time budget so slow peers do not dominate the run.
* Bandwidth figures are in GB/s with GB = 1e9 bytes.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from _format import fmt  # noqa: F401  (re-exported: the scripts call C.fmt)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Published peak DRAM bandwidth in GB/s, matched against torch.cuda.get_device_name() (lower-case
# substrings, first match wins; the more specific names come first).
SPEC_PEAK_GBPS: list[tuple[tuple[str, ...], float, str]] = [
    (("gh200",), 4000.0, "GH200 (HBM3) 4.0 TB/s"),
    (("h200",), 4800.0, "H200 (HBM3e) 4.8 TB/s"),
    (("h100", "nvl"), 3900.0, "H100 NVL 3.9 TB/s"),
    (("h100", "pcie"), 2000.0, "H100 PCIe 2.0 TB/s"),
    (("h100",), 3350.0, "H100 SXM (HBM3) 3.35 TB/s"),
    (("b200",), 8000.0, "B200 8.0 TB/s"),
    (("a100", "80gb", "pcie"), 1935.0, "A100 80GB PCIe 1.94 TB/s"),
    (("a100", "80gb"), 2039.0, "A100 80GB SXM 2.04 TB/s"),
    (("a100",), 1555.0, "A100 40GB 1.56 TB/s"),
    (("l40s",), 864.0, "L40S 864 GB/s"),
    (("l40",), 864.0, "L40 864 GB/s"),
    (("l4",), 300.0, "L4 300 GB/s"),
    (("a10g",), 600.0, "A10G 600 GB/s"),
    (("t4",), 320.0, "T4 320 GB/s"),
    (("v100",), 900.0, "V100 900 GB/s"),
    (("4090",), 1008.0, "RTX 4090 1.01 TB/s"),
]


# Published dense peaks in TFLOP/s (fp32 without tensor cores, tf32 and bf16 tensor cores, no
# sparsity), matched like SPEC_PEAK_GBPS. cuDNN convolutions run in TF32 under torch's defaults
# (torch.backends.cudnn.allow_tf32), float32 matmuls do not (torch.backends.cuda.matmul.allow_tf32).
SPEC_PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float], str]] = [
    (("gh200",), {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "GH200 (H100 SXM compute)"),
    (("h200",), {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "H200 SXM"),
    (("h100", "nvl"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}, "H100 NVL"),
    (("h100", "pcie"), {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}, "H100 PCIe"),
    (("h100",), {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "H100 SXM"),
    (("a100",), {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}, "A100"),
]


# ----------------------------------------------------------------------------------------------
# Device description
# ----------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``/``"cuda"``/``"cuda:N"`` -> torch.device; ValueError when unknown or unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {str(device)!r} (use cpu or cuda)") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r} (use cpu or cuda)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA requested but no GPU is available (torch.cuda.is_available() is False)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slugify(text: str) -> str:
    """Lower-case, runs of other characters -> '-': 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """File stem of the device's result file: the GPU name, or 'cpu-' + the CPU model."""
    if device.type == "cuda":
        return slugify(device_name(device))
    return "cpu-" + slugify(re.sub(r"\(R\)|\(TM\)|\bprocessor\b|\d+-core", "", cpu_model(), flags=re.I))


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception as err:  # noqa: BLE001 - any import failure means "absent"
        return f"unavailable: {type(err).__name__}: {err}".splitlines()[0][:200]


def load_average() -> float | None:
    """1-minute load average (other work on a shared CPU skews CPU timings), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def spec_peak_gbps(name: str) -> tuple[float | None, str | None]:
    """Published peak memory bandwidth (GB/s, description) for a GPU name, or (None, None)."""
    low = name.lower()
    for keys, gbps, desc in SPEC_PEAK_GBPS:
        if all(k in low for k in keys):
            return gbps, desc
    return None, None


def spec_peak_tflops(name: str) -> tuple[dict[str, float] | None, str | None]:
    """Published dense peaks (TFLOP/s by dtype, description) for a GPU name, or (None, None)."""
    low = name.lower()
    for keys, peaks, desc in SPEC_PEAK_TFLOPS:
        if all(k in low for k in keys):
            return dict(peaks), desc
    return None, None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, thread count and the date: the header of every result."""
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "kornia": _version("kornia"),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        peak, desc = spec_peak_gbps(env["device_name"])
        env["spec_peak_GBps"] = peak
        env["spec_peak_source"] = desc
    else:
        env["spec_peak_GBps"] = None
        env["spec_peak_source"] = None
    return env


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(samples_s: Sequence[float], method: str) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples_s),
        "min_s": min(samples_s),
        "mean_s": statistics.fmean(samples_s),
        "repeats": len(samples_s),
        "method": method,
    }


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    budget_s: float = 5.0,
    min_repeats: int = 3,
    max_repeats: int = 100,
    warmup: int = 1,
    estimate_s: float | None = None,
) -> dict[str, Any]:
    """Time ``fn()`` on ``device``; returns median/min/mean seconds per call and the repeat count.

    The warm-up calls also estimate the cost of one call; the number of timed repeats is then
    ``budget_s / estimate`` clipped to [min_repeats, max_repeats]. On the CPU, a caller that has
    already run ``fn`` once (e.g. to check its output) may pass that call's time as ``estimate_s``
    to skip the warm-up of calls slower than a second. On CUDA, Triton's ``do_bench`` (median mode;
    it flushes the L2 cache before each call) is used when available, else CUDA events.
    """
    if device.type == "cuda":
        return _time_cuda(fn, device, budget_s=budget_s, min_repeats=min_repeats,
                          max_repeats=max_repeats, warmup=warmup)
    if estimate_s is not None and estimate_s > 1.0:
        warmup = 0
    return _time_cpu(fn, budget_s=budget_s, min_repeats=min_repeats, max_repeats=max_repeats, warmup=warmup,
                     estimate=estimate_s)


def _time_cpu(fn, *, budget_s, min_repeats, max_repeats, warmup, estimate=None) -> dict[str, Any]:
    estimate = math.inf if estimate is None or warmup > 0 else estimate
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        estimate = min(estimate, time.perf_counter() - t0)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(estimate, 1e-9))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return _summary(samples, "perf_counter")


def _time_cuda(fn, device, *, budget_s, min_repeats, max_repeats, warmup) -> dict[str, Any]:
    with torch.cuda.device(device):
        for _ in range(max(1, warmup)):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        estimate = time.perf_counter() - t0
        repeats = int(min(max_repeats * 10, max(min_repeats, budget_s / max(estimate, 1e-9))))
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001 - no Triton: CUDA events below
            do_bench = None
        if do_bench is not None:
            # do_bench sizes its own repeat count from `rep` (ms); cap it by the budget.
            rep_ms = max(1.0, min(budget_s, repeats * estimate) * 1e3)
            warm_ms = max(1.0, min(25.0, estimate * 1e3))
            try:
                ms = do_bench(fn, warmup=warm_ms, rep=rep_ms, return_mode="all")
            except (AssertionError, TypeError, ValueError):  # older Triton: no "all" mode
                ms = do_bench(fn, warmup=warm_ms, rep=rep_ms, return_mode="median")
            samples = [float(m) / 1e3 for m in (ms if isinstance(ms, (list, tuple)) else [ms])]
            return _summary(samples, "triton.testing.do_bench")
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return _summary(samples, "cuda events")


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, budget_s: float = 1.0) -> float:
    """Measured device memory bandwidth: a large ``dst.copy_(src)``, counting read + write bytes."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    res = time_fn(lambda: dst.copy_(src), device, budget_s=budget_s, min_repeats=5, max_repeats=50, warmup=2)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / res["median_s"] / 1e9


def matmul_tflops(device: torch.device, n: int | None = None, budget_s: float = 0.5) -> dict[str, Any]:
    """Measured float32 matmul rate: ``torch.mm`` of two n x n matrices (2 n^3 FLOPs), median.

    The practical compute ceiling where no published peak exists (CPUs): it runs with the current
    ``torch.get_num_threads()`` and, on CUDA, torch's current TF32 setting for matmuls (recorded).
    Default n: 1024 on the CPU, 8192 on CUDA.
    """
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    res = time_fn(lambda: torch.mm(a, b, out=out), device, budget_s=budget_s, min_repeats=3, max_repeats=50,
                  warmup=2)
    del a, b, out
    info: dict[str, Any] = {"TFLOPs": 2 * n**3 / res["median_s"] / 1e12, "n": n, "dtype": "float32",
                            "median_s": res["median_s"], "repeats": res["repeats"],
                            "threads": torch.get_num_threads() if device.type == "cpu" else None,
                            "method": f"torch.mm {n}x{n} float32, median of {res['repeats']} ({res['method']})"}
    if device.type == "cuda":
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        torch.cuda.empty_cache()
    return info


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def command_line(argv: Sequence[str] | None = None) -> str:
    """How this process was started, for the record: ``python benchmarks/bench_x.py --flag`` for a
    script (path relative to the repository when inside it), else the program name and arguments."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    prog, rest = argv[0], argv[1:]
    if prog.endswith(".py"):
        path = Path(prog).resolve()
        try:
            prog = str(path.relative_to(RESULTS_DIR.parent.parent))
        except ValueError:
            prog = str(path)
        return "python " + shlex.join([prog, *rest])
    return shlex.join([Path(prog).name, *rest])


def result_path(device: torch.device, results_dir: Path | str | None = None) -> Path:
    """``benchmarks/results/<device-slug>.json``."""
    return Path(results_dir or RESULTS_DIR) / f"{device_slug(device)}.json"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)


def merge_results(path: Path | str, key: str, section: dict[str, Any]) -> Path:
    """Write ``section`` under ``key`` of the JSON file at ``path``, keeping its other keys.

    The file is replaced atomically; an unreadable existing file is kept aside as ``*.bad``. A
    section without a ``"command"`` gets this process's command line (``command_line()``), so the
    README renderer can say which command produced the numbers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
        except (ValueError, OSError):
            path.replace(path.with_suffix(path.suffix + ".bad"))
            data = {}
    data[key] = _jsonable(section)
    data[key].setdefault("command", command_line())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def markdown_table(rows: Iterable[Sequence[Any]], header: Sequence[str], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column ('l' or 'r', default 'l')."""
    header = [str(h) for h in header]
    align = align or "l" * len(header)
    seps = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)




def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The scripts' command lines
# ----------------------------------------------------------------------------------------------

class GuardError(AssertionError):
    """A contender does not do the work it claims (checked before timing): nothing is reported."""


def write_section(section: dict[str, Any], name: str, path: Path | str | None = None) -> Path:
    """Merge ``section`` under key ``name`` into the result file (default: the one of the device the
    section ran on) and save its table beside it as ``<stem>-<name>.md``."""
    if path is None:
        path = result_path(torch.device("cuda" if section["env"]["device"] == "cuda" else "cpu"))
    path = Path(merge_results(path, name, section))
    path.with_name(f"{path.stem}-{name}.md").write_text(section["table"] + "\n")
    return path


def add_output_args(parser) -> None:
    parser.add_argument("--json", default=None, help="result file (default benchmarks/results/<device>.json)")
    parser.add_argument("--no-write", action="store_true", help="print only")


def finish(prog: str, args, make_section: Callable[[], dict[str, Any]],
           write: Callable[[dict[str, Any], str | None], Path]) -> int:
    """Run a script's benchmark and print its table; write it unless --no-write, or --quick without
    --json. Exit code 2 for bad arguments (ValueError), 1 for a failed correctness guard."""
    try:
        section = make_section()
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except GuardError as err:
        print(f"{prog}: correctness guard failed: {err}", file=sys.stderr)
        return 1
    print(section["table"])
    if not args.no_write and (args.json or not getattr(args, "quick", False)):
        print(f"\nwrote {write(section, args.json)}")
    return 0
