"""The fused K-view augmentation on the CPU: the Triton kernel's program run by C++ (`mtdl_fast._C`).

`fused_views_cpu` takes the same arguments as `mtdl_fast.kernels.fused_views.fused_views` (the program
ABI: spatial codes, op rows, the (K, B, N_SLOTS) parameter table), passes the same checks with the
same messages, and returns the same views: every formula is the kernel's, in float32, so most views
agree with it bit for bit and the rest (blur taps, contrast means, noise) to float rounding. Noise
draws the kernel's Philox4x32-10 stream: the same seed gives the same noise on either backend.

The loop runs in the extension without the GIL, parallel over (image, row tile) on torch's intra-op
threads (`torch.set_num_threads`; one thread inside DataLoader workers). It reads each source pixel
once per thread and keeps a view's state for a tile of rows in L1. An output it allocates of 1 MiB or
more comes from the extension's own mappings (Linux): advised onto transparent huge pages before the
first write and, once the tensor is freed, kept for the next call of the same size (at most two), so
a loop does not pay a fresh mapping's page faults every call (at B=32 3x224x224 about 10 ms against
24 ms for the views). `empty_cache` unmaps the kept ones. Such an output holds a fixed mapping: its
storage cannot be resized (`resize_` raises), as with any tensor over external memory.
"""
from __future__ import annotations

from typing import Any

import torch

from mtdl_fast._ext import ext
from mtdl_fast.kernels import fused_views as fv


def available() -> bool:
    """True when the compiled extension provides the CPU path."""
    compiled = ext()
    return compiled is not None and hasattr(compiled, "fused_views_cpu")


def empty_cache() -> int:
    """Unmap the freed outputs `fused_views_cpu` keeps for reuse (see the module docstring); returns
    their bytes (0 without the extension)."""
    return ext().release_cached_outputs() if available() else 0


def fused_views_cpu(
    x: torch.Tensor,
    spatial: torch.Tensor,
    ops: torch.Tensor,
    params: torch.Tensor,
    **options: Any,
) -> torch.Tensor:
    """All K views of a CPU batch: the fused program of `kernels/fused_views.py` in C++.

    Args:
        x: (B, C, H, W) CPU images, C in {1, 3}; uint8 (scaled by 1/255), float16, bfloat16 or
            float32 in [0, 1]; any strides (contiguous and channels_last).
        spatial: (K,) int32 CPU tensor, the ``SPATIAL_*`` code of each view.
        ops: (K, MAX_OPS) int32 CPU tensor, ``OP_*`` codes applied left to right (``OP_END`` pads).
        params: (K, B, N_SLOTS) float32 CPU tensor of per-view, per-image parameters (``SLOT_*``).
            Out-of-range values never read or write out of bounds (clamped as in the kernel).
        options: the keyword options of `fused_views` but ``block_size`` (`fused_views.ViewOptions`
            holds them with their defaults): ``seed`` (OP_NOISE's Philox seed, the kernel's stream),
            ``out_dtype`` (float32, float16 or bfloat16, rounded to nearest even like ``.to()``),
            ``mean`` and ``std`` (the fused normalisation) and ``out`` (a preallocated contiguous
            (K, B, C, H, W) CPU tensor of out_dtype, overwritten).

    Returns:
        (K, B, C, H, W) tensor of out_dtype (``out`` itself when given); empty without work when
        K, B or H * W is 0.

    Raises:
        TypeError / ValueError: the Triton launcher's checks and messages (x must be a CPU tensor);
            TypeError for a keyword that is not an option.
        RuntimeError: the extension `mtdl_fast._C` is not built.
    """
    prog = fv.check_program(x, spatial, ops, params, devices=("cpu",), **options)
    shape = (prog.K, prog.B, prog.C, prog.H, prog.W)
    if prog.K == 0 or prog.B == 0 or prog.H * prog.W == 0:
        return prog.out if prog.out is not None else torch.empty(shape, dtype=prog.out_dtype)
    if not available():
        raise RuntimeError("fused_views_cpu needs the compiled extension mtdl_fast._C; build it with "
                           "`pip install --no-build-isolation -e .` (or use DistributionTasks(backend='torch'))")
    result = prog.out if prog.out is not None else ext().empty_output(shape, prog.out_dtype)
    ext().fused_views_cpu(x, prog.spatial.contiguous(), prog.ops.contiguous(), params.contiguous(), prog.seed,
                          list(prog.mean), list(prog.std), prog.normalize, result)
    return result
