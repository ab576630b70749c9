"""Every Triton kernel variant the launchers choose on a GPU, compiled ahead of time for sm_90 and
sm_80 (no GPU needed): it must compile, with no spills and no local-memory stack frame, within the
register budget its launcher states.

Each case is a :class:`~mtdl_fast.kernels._launch.Launch` built by the launcher's own plan function
(``fused_views._plan``, ``lookahead_ce._plan``) from meta tensors of a realistic shape, so the
signature compiled here is the one a real launch binds: Triton's own binder specialises the runtime
arguments (ints equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get the
divisibility attribute) exactly as ``JITFunction.run`` does, then ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32))`` (32: NVIDIA's warp size) runs the whole pipeline down to
ptxas. Registers, spills and the stack frame come from ptxas' own ``-v`` report of that compile
(Triton prints it when TRITON_DUMP_PTXAS_LOG=1), shared memory from the compiled kernel's metadata;
``pytest -s`` prints the table. The compiles run in one worker process (this file run as a script)
with the interpreter off and a fresh Triton cache that is deleted afterwards.

Triton 3.6 (the GPU image) and 3.8 (pinned here) both pass, with no version branch: both have
``triton.compile``, ``ASTSource(fn, signature, constexprs, attrs)``, ``GPUTarget``,
``make_backend``, the ``maxnreg`` option and the same binder (``create_function_from_signature`` +
``JITFunction._pack_args``, the one private step, taken verbatim from ``JITFunction.run``).

Adding a kernel: write a ``<kernel>_cases()`` generator yielding ``Case``s (a label, the Launch its
plan function builds, the register budget, whether it is rare) and add it to ``CASES``.

The rarer part is marked ``slow``: sm_80; fp16/bf16 input images; the flag sweep at BLOCK 64 (small
images or batches); the lookahead head's class tiles clamped to C = 10.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from mtdl_fast.kernels import fused_views as fv
from mtdl_fast.kernels import lookahead_ce as lce
from mtdl_fast.kernels._launch import Launch

CAPABILITIES = (90, 80)      # H100/H200, A100
COMMON_CAPABILITY = 90
META = torch.device("meta")  # shapes, dtypes and strides without memory
SMS = (132, 108)             # H100 SXM and A100 multiprocessor counts, for the grid heuristics


class Case(NamedTuple):
    label: str
    launch: Launch
    budget: int       # registers per thread the launcher's docstring promises
    rare: bool        # marked slow

    @property
    def id(self) -> str:
        return f"{self.launch.kernel.__name__}-{self.label}"


# --------------------------------------------------------------------------------------------------
# The launchers' variants
# --------------------------------------------------------------------------------------------------
def _gpu_blocks() -> set[tuple[int, int]]:
    """Every (BLOCK, num_warps) fused_views' GPU heuristic returns, over image sizes from 4x4 to
    512x512, batches 1..1024 and both devices."""
    return {fv._gpu_block(hw, batch, sms) for hw in (16, 64, 256, 1024, 4096, 50176, 262144)
            for batch in (1, 8, 64, 256, 1024) for sms in SMS}


def fused_views_cases() -> Iterator[Case]:
    """The main kernel and the contrast pre-pass for every C, input dtype, layout, block and
    specialisation flag, at K=10 views of a B=256 batch. The image size sets the number of contrast
    partials and so PBLOCK: 32x32 (PBLOCK 16) everywhere, 512x512 (PBLOCK = BLOCK) in the flag sweep."""
    for (block, num_warps) in sorted(_gpu_blocks()):
        for C in (1, 3):
            for dtype in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
                rare = dtype in (torch.float16, torch.bfloat16)
                for channels_last in ((False, True) if C == 3 else (False,)):
                    # The heaviest main kernel (normalise, contrast, bfloat16 rounding) and the pre-pass.
                    yield from _fused_views_case(C, dtype, channels_last, block, num_warps, 32, True, True,
                                                 torch.bfloat16, rare)
            # The other flags, on the common input (uint8 NCHW) and a large image (the most contrast tiles).
            for size, normalize, contrast, out_dtype in ((32, False, False, torch.float32),
                                                         (32, True, False, torch.float16),
                                                         (512, False, True, torch.float32)):
                yield from _fused_views_case(C, torch.uint8, False, block, num_warps, size, normalize, contrast,
                                             out_dtype, block != 32 * fv._MAX_WARPS, prepass=size != 32)


def _fused_views_case(C, dtype, channels_last, block, num_warps, size, normalize, contrast, out_dtype, rare,
                      prepass=True) -> Iterator[Case]:
    K, B = 10, 256
    x = torch.empty((B, C, size, size), dtype=dtype, device=META)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    spatial = torch.tensor([fv.SPATIAL_NONE, fv.SPATIAL_WARP, fv.SPATIAL_BLUR, fv.SPATIAL_SHARPEN] * 2 + [0, 0],
                           dtype=torch.int32)
    ops = torch.zeros((K, fv.MAX_OPS), dtype=torch.int32)
    ops[:, 0] = fv.OP_NOISE
    if contrast:
        ops[1, 1] = fv.OP_CONTRAST
    params = torch.empty((K, B, fv.N_SLOTS), device=META)
    mean = [0.5] * C if normalize else None
    prog = fv.check_program(x, spatial, ops, params, seed=123, out_dtype=out_dtype, mean=mean, std=mean,
                            devices=("meta",))
    _, launches = fv._plan(x, params, prog, block, num_warps)
    budgets = {fv._fused_views_kernel: fv._REGISTERS_MAIN[C], fv._contrast_prepass_kernel: fv._REGISTERS_PREPASS[C]}
    for launch in launches:
        if launch.kernel is fv._contrast_prepass_kernel and not prepass:
            continue
        layout = "channels_last" if channels_last else "NCHW"
        label = (f"C={C} {str(dtype)[6:]} {layout} {size}x{size} block={block} warps={num_warps} "
                 + " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if k not in ("C", "BLOCK")))
        yield Case(label, launch, budgets[launch.kernel], rare)


def lookahead_ce_cases() -> Iterator[Case]:
    """Every _pick_config row (keyed on D and the dtype) with and without bias, per-row ("none") and
    block-sum ("mean"/"sum" share one kernel) outputs, at K=10 tasks, B=256, C=100 classes (no tile
    clamping) and C=10 (CIFAR-10: clamped class tiles)."""
    rows = {torch.float32: (32, 64, 128, 512), torch.float16: (64, 128, 512), torch.bfloat16: (64, 128, 512)}
    K, B = 10, 256
    for dtype, dims in rows.items():
        for D in dims:
            for C in (100, 10):
                for has_bias in (True, False):
                    for reduction in ("mean", "none"):
                        features = torch.empty((K, K, B, D), dtype=dtype, device=META)
                        weight = torch.empty((K, C, D), dtype=dtype, device=META)
                        bias = torch.empty((K, C), dtype=dtype, device=META) if has_bias else None
                        targets = torch.empty((K, B), dtype=torch.int64, device=META)
                        config = lce._pick_config(K * K, B, C, D, dtype, META)
                        _, launch = lce._plan(features, weight, bias, targets, reduction, -100, config)
                        label = (f"{str(dtype)[6:]} D={D} C={C} bias={has_bias} {reduction} config={config}")
                        yield Case(label, launch, lce._MAX_REGISTERS, C == 10)


CASES = [*fused_views_cases(), *lookahead_ce_cases()]


# --------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------
class Stats(NamedTuple):
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
                    r".*?Used (\d+) registers")


def compile_launch(launch: Launch, capability: int) -> Stats:
    """Compiles launch's kernel as a real launch would specialise it, for sm_<capability>."""
    kernel = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, maxnreg=launch.maxnreg)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    found = _PTXAS.search(log.getvalue())
    assert found, f"no ptxas report in:\n{log.getvalue()}"
    stack, stores, loads, registers = (int(v) for v in found.groups())
    return Stats(registers, stores, loads, stack, int(compiled.metadata.shared))


@pytest.fixture(scope="module")
def compiler() -> Iterator[Callable[[Case, int], Stats]]:
    """compile(case, capability) -> Stats, run by a worker process: conftest.py sets TRITON_INTERPRET=1
    without a GPU, and Triton then builds every jit function, its own library's included, as an
    interpreter stand-in that cannot be compiled. The worker runs this file with the interpreter off
    and a fresh Triton cache, removed afterwards (nothing is reused between runs). The table of
    every compiled variant is printed at the end (pytest -s)."""
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        worker = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)

        def compile_case(case: Case, capability: int) -> Stats:
            worker.stdin.write(json.dumps([case.id, capability]) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:
                pytest.fail(f"the compiling worker died (exit code {worker.wait()})")
            reply = json.loads(line)
            if "error" in reply:
                pytest.fail(reply["error"], pytrace=False)
            stats = Stats(**reply)
            rows.append((case, capability, stats))
            return stats

        try:
            yield compile_case
        finally:
            worker.stdin.close()
            worker.wait(timeout=60)
    print(f"\n{'kernel':<26} {'sm':>3} {'regs':>4} {'budget':>6} {'spill':>5} {'stack':>5} {'smem':>6}  variant")
    for case, capability, stats in rows:
        spills = stats.spill_stores + stats.spill_loads
        print(f"{case.launch.kernel.__name__:<26} {capability:>3} {stats.registers:>4} {case.budget:>6} {spills:>5} "
              f"{stats.stack:>5} {stats.shared:>6}  {case.label}")


def _serve() -> None:
    """The worker: reads [case id, capability] lines, answers each with a JSON line of Stats."""
    cases = {case.id: case for case in CASES}
    for line in sys.stdin:
        case_id, capability = json.loads(line)
        try:
            reply = compile_launch(cases[case_id].launch, capability)._asdict()
        except Exception:  # reported by the test that asked
            reply = {"error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


def _params():
    for capability in CAPABILITIES:
        for case in CASES:
            marks = [pytest.mark.slow] if case.rare or capability != COMMON_CAPABILITY else []
            yield pytest.param(case, capability, marks=marks, id=f"sm{capability}-{case.id}")


@pytest.mark.parametrize(("case", "capability"), list(_params()))
def test_compiles_without_spills(case: Case, capability: int, compiler: Callable[[Case, int], Stats]) -> None:
    stats = compiler(case, capability)
    assert stats.spill_stores == 0 and stats.spill_loads == 0, (case.label, stats)
    assert stats.stack == 0, f"local-memory stack frame in {case.label}: {stats}"
    assert stats.registers <= case.budget, (case.label, stats)
    assert case.launch.maxnreg == case.budget  # the budget is what ptxas was given


def test_cases_cover_the_launch_choices() -> None:
    """The matrix holds every block the GPU heuristic picks and every flag value of each kernel."""
    assert _gpu_blocks() == {(64, 2), (128, 4)}
    for kernel, flags in ((fv._fused_views_kernel, ("C", "SCALE", "FLAT", "NORMALIZE", "HAS_CONTRAST", "OUT_KIND",
                                                    "BLOCK", "PBLOCK")),
                          (fv._contrast_prepass_kernel, ("C", "SCALE", "FLAT", "BLOCK", "PBLOCK")),
                          (lce._lookahead_ce_kernel, ("HAS_BIAS", "PER_ROW", "SINGLE_D", "IEEE", "BLOCK_B",
                                                      "BLOCK_C", "BLOCK_D"))):
        seen = {flag: {c.launch.constexprs[flag] for c in CASES if c.launch.kernel is kernel} for flag in flags}
        for flag in ("C", "SCALE", "FLAT", "NORMALIZE", "HAS_CONTRAST", "HAS_BIAS", "PER_ROW", "SINGLE_D", "IEEE"):
            if flag in seen:
                assert len(seen[flag]) == 2, (kernel.__name__, flag, seen[flag])
        if "OUT_KIND" in seen:
            assert seen["OUT_KIND"] == {0, 1, 2}
        if "PBLOCK" in seen:
            assert seen["PBLOCK"] == {16, 64, 128}
    configs = {c.launch.constexprs["BLOCK_D"] for c in CASES if c.launch.kernel is lce._lookahead_ce_kernel}
    assert configs == {16, 32, 64, 128}
    assert len({case.id for case in CASES}) == len(CASES)


if __name__ == "__main__":
    _serve()
