"""Every benchmark of a machine in one command, each step with its time budget.

    python -m benchmarks.run cpu              # make bench: the CPU suite (one core: ~15 min)
    python -m pytest benchmarks --benchmark-enable --quick   # the micro-benchmarks at the smallest sizes
    python -m benchmarks.run gpu              # make gpu-check: on a CUDA machine without network
    python -m benchmarks.run gpu --dry-run    # list the steps and budgets; check every script and test imports

``gpu`` builds ``mtdl_fast._C`` against the machine's torch, runs the CUDA tests natively, then the GPU
benchmarks (under 8 minutes on an H100/H200) into ``results/<gpu-name>.json`` and the README. A failed
step (or one killed at twice its budget) is reported, the rest still run; exit status 1.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CPU_BENCH_TESTS = ["benchmarks/test_cpu_augment.py", "benchmarks/test_cpu_grouping.py",
                   "benchmarks/test_reductions.py", "benchmarks/test_host_overhead.py"]
GPU_BENCH_TESTS = ["benchmarks/test_reductions.py", "benchmarks/test_host_overhead.py"]
SCRIPTS = ["benchmarks.step", "benchmarks.affinity", "benchmarks.gpu_sweeps", "benchmarks.readme"]


@dataclass
class Step:
    name: str
    budget_s: int
    command: list[str]
    ok_codes: tuple[int, ...] = (0,)


def cuda_tests() -> list[str]:
    """The test files whose paths run on a GPU when one is present: the kernels, reductions, tasks and
    mixed-precision engine (CUDA twins of CPU tests)."""
    named = ["tests/test_reductions.py", "tests/test_tasks.py", "tests/test_engine_amp.py", "tests/test_affinity.py"]
    return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("tests/test_kernel_*.py")) + named


def pytest_bench(tests: list[str], results: Path, *options: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", *tests, "--benchmark-enable", f"--benchmark-json={results.relative_to(ROOT)}",
            *options]


def cpu_plan() -> list[Step]:
    """``make bench``: every CPU benchmark at full size into the CPU's results file, then the README."""
    results = common.results_path(torch.device("cpu"))
    script = [f"--json={results.relative_to(ROOT)}", "--device", "cpu"]
    return [Step("CPU micro-benchmarks (pytest-benchmark)", 600, pytest_bench(
                CPU_BENCH_TESTS, results, "--benchmark-min-rounds=3", "--benchmark-max-time=2")),
            Step("training step, six variants", 420, [PY, "-m", "benchmarks.step", *script]),
            Step("affinity", 300, [PY, "-m", "benchmarks.affinity", *script]),
            Step("README tables", 10, [PY, "-m", "benchmarks.readme"])]


def gpu_plan() -> list[Step]:
    results = common.results_path(torch.device("cuda")) if torch.cuda.is_available() else \
        common.RESULTS / "<gpu-name>.json"
    return [Step("build mtdl_fast._C against this torch", 120,
                 [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]),
            Step("the extension has its CUDA kernels", 10,
                 [PY, "-c", "from mtdl_fast._ext import ext; assert ext() is not None and ext().built_with_cuda()"]),
            Step("CUDA tests, native Triton", 120, [PY, "-m", "pytest", "-q", "--maxfail=20", *cuda_tests()]),
            Step("tests marked gpu", 30, [PY, "-m", "pytest", "-q", "-m", "gpu", "tests"], ok_codes=(0, 5)),
            Step("host overhead and reductions on CUDA (pytest-benchmark)", 30,
                 pytest_bench(GPU_BENCH_TESTS, results, "--device=cuda")),
            Step("GPU sweeps (triton.testing.perf_report)", 75, [PY, "-m", "benchmarks.gpu_sweeps"]),
            Step("training step, six variants", 40, [PY, "-m", "benchmarks.step", "--device", "cuda", "--budget", "1"]),
            Step("affinity", 45, [PY, "-m", "benchmarks.affinity", "--device", "cuda", "--budget", "1"]),
            Step("README tables", 10, [PY, "-m", "benchmarks.readme"])]


def dry_run(steps: list[Step]) -> int:
    """List the steps; check that every script imports and every test file named exists and collects
    (``pytest --collect-only`` fails on a missing file as on a broken import)."""
    for step in steps:
        print(f"{step.budget_s:>5} s  {step.name}: {shlex.join(['python', *step.command[1:]])}")
    print(f"{sum(s.budget_s for s in steps):>5} s  in all")
    for module in SCRIPTS:
        importlib.import_module(module)
    tests = sorted({a for s in steps for a in s.command if a.endswith(".py")})
    collect = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", *tests], cwd=ROOT, capture_output=True,
                             text=True)
    if collect.returncode != 0:
        print(collect.stdout[-3000:], collect.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"ok: {len(SCRIPTS)} scripts import, {len(tests)} test files collect")
    return 0


def execute(steps: list[Step]) -> int:
    failed = []
    for step in steps:
        print(f"==> {step.name} (budget {step.budget_s} s)", flush=True)
        t0 = time.perf_counter()
        try:
            code = subprocess.run(step.command, cwd=ROOT, timeout=2 * step.budget_s).returncode
        except subprocess.TimeoutExpired:
            code = "killed at twice its budget"
        wall = time.perf_counter() - t0
        over = " OVER BUDGET" if wall > step.budget_s else ""
        print(f"<== {step.name}: {'ok' if code in step.ok_codes else f'FAILED ({code})'}, {wall:.0f} s{over}",
              flush=True)
        if code not in step.ok_codes:
            failed.append(step.name)
    print("failed: " + ", ".join(failed) if failed else "all steps passed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", choices=["cpu", "gpu"])
    p.add_argument("--dry-run", action="store_true", help="list the steps, check the scripts and tests; run nothing")
    args = p.parse_args(argv)
    steps = cpu_plan() if args.plan == "cpu" else gpu_plan()
    if args.dry_run:
        return dry_run(steps)
    if args.plan == "gpu" and not torch.cuda.is_available():
        print("gpu plan: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    return execute(steps)


if __name__ == "__main__":
    sys.exit(main())
