"""Small ``@triton.jit`` helpers shared by more than one kernel file."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rint(v):
    """Round half to even (std::nearbyint in the default rounding mode, Python's round, torch.round)
    without libdevice."""
    fl = tl.floor(v)
    d = v - fl
    half = fl * 0.5
    odd = (half - tl.floor(half)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, fl + 1.0, fl)
