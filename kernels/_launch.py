"""Launch-time facts and the launch record shared by the kernel launchers."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

_SM_COUNT: dict[int, int] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere (grid heuristics)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


class Launch(NamedTuple):
    """One kernel launch, ``kernel[grid](*args, **constexprs, num_warps=..., maxnreg=...)``.

    A launcher's plan function builds these and the launcher runs them; tests/test_kernel_compile.py
    compiles the very same records ahead of time for sm_80/sm_90, so the signature it checks is the
    one a real launch binds. ``maxnreg`` is the register budget per thread the launcher states: given
    to ptxas, it replaces ptxas' own occupancy target, which otherwise spills a few loop-invariant
    registers of these long kernels even where registers are plentiful.
    """

    kernel: Any                  # a triton.JITFunction (the interpreter's stand-in under TRITON_INTERPRET)
    grid: tuple[int, ...]
    args: tuple                  # the runtime arguments, in the kernel's parameter order
    constexprs: dict[str, Any]   # the tl.constexpr parameters by name
    num_warps: int
    maxnreg: int

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, maxnreg=self.maxnreg)
