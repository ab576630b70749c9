"""Fused lookahead head + cross-entropy: an (I, J) matrix of mean losses without materialised logits.

In TAG affinity with K tasks, lookahead parameter set i (the source task) is evaluated on every
task j's view: the trunk gives features ``F[i, j]`` of shape (B, D), task j's final linear head
(``W_j`` (C, D), ``b_j`` (C,)) and cross-entropy give a loss, and the K x K matrix of mean losses is
what the affinity step needs. Materialising logits of shape (I, J, B, C) costs I*J*B*C floats of
memory traffic; this kernel fuses the linear layer, a numerically stable cross-entropy (an online
log-sum-exp over class tiles) and the reduction over B, and writes only (I, J) (or (I, J, B)) floats.

Meaning (defined by :func:`lookahead_cross_entropy_torch`, the plain-PyTorch twin)::

    loss[i, j] = mean_b CE(features[i, j, b] @ weight[j].T + bias[j], targets[j, b])

with float32 accumulation whatever the input dtype, ``ignore_index`` entries excluded from the
mean (a (i, j) whose targets are all ignored gives NaN, as torch's ``cross_entropy``).

Design
------
* Grid: one program per (i, j, block of BLOCK_B rows of B), flattened on axis 0 as
  ``pid = (j * I + i) * n_bblocks + bblock`` so that programs using the same head ``W_j`` run next to
  each other and find it in L2.
* Each program loops over C in tiles of BLOCK_C. A tile's logits (BLOCK_B, BLOCK_C) are
  ``tl.dot`` products over D (in tiles of BLOCK_D, the features tile is loaded once and kept in
  registers when D fits in one tile), accumulated in float32 (float32 inputs use
  ``input_precision="ieee"``: no TF32 rounding), plus the bias.
* Online softmax per row: running max ``m`` and running ``s = sum exp(logit - m)``; each tile
  rescales ``s`` by ``exp(m_old - m_new)``. Padding columns are -inf, so they add exp(-inf) = 0.
  The target logit is picked when its tile passes. Row loss = ``m + log(s) - logit[target]``.
* Reduction: for "mean"/"sum" each program writes the sum of its rows' losses to a partials buffer
  (I, J, n_bblocks); torch sums it in a fixed order and divides by the per-j count of non-ignored
  targets. No float atomics, so results are bit-reproducible run to run. "none" writes the row
  losses (I, J, B) (0 for ignored rows, as torch).
* Targets outside [0, C) (other than ``ignore_index``): on CPU tensors a ValueError; on the GPU they
  are not checked on the host (that would synchronise) but the kernel turns such a row's loss into
  NaN, which propagates to its (i, j) entry, instead of reading out of bounds.

Forward only: the affinity step needs no gradient, so no backward is defined (the output does not
require grad; use the twin if a gradient is ever needed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, interpreting, sm_count

__all__ = ["lookahead_cross_entropy", "lookahead_cross_entropy_torch"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TWIN_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_REDUCTIONS = ("mean", "sum", "none")
_MAX_REGISTERS = 128     # per thread (ptxas' maxnreg); _pick_config's tiles fit it without spills


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in float32. float32 operands: IEEE (CUDA-core FMA, no TF32 rounding: TAG takes
    ratios of nearby losses, which TF32's ~1e-3 relative error per product could blur); half
    operands: the default tensor-core MMA (their products are exact in float32 either way)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _lookahead_ce_kernel(
    F, W, Bias, T, Out,
    I, J, B, C, D, n_bblocks, ignore_index,
    s_fi, s_fj, s_fb, s_fd,
    s_wj, s_wc, s_wd,
    s_bj, s_bc,
    s_tj, s_tb,
    HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, SINGLE_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bb = pid % n_bblocks
    ij = pid // n_bblocks
    i = ij % I
    j = ij // I
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)
    out_ij = i64 * J + j64          # outputs are laid out (I, J, ...), i-major

    rows = bb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BLOCK_C)
    dd0 = tl.arange(0, BLOCK_D)

    f_base = F + i64 * s_fi + j64 * s_fj + rows64[:, None] * s_fb      # (BLOCK_B, 1) pointers
    w_base = W + j64 * s_wj                                              # head j

    tgt = tl.load(T + j64 * s_tj + rows64 * s_tb, mask=row_ok, other=ignore_index)  # int64: no wrap
    ignored = tgt == ignore_index
    bad = (~ignored) & ((tgt < 0) | (tgt >= C))                          # out of range: loss NaN

    if SINGLE_D:  # D fits one tile: load this program's features once, reuse for every class tile
        f_hoist = tl.load(f_base + dd0[None, :] * s_fd,
                          mask=row_ok[:, None] & (dd0[None, :] < D), other=0.0)

    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    t_logit = tl.zeros((BLOCK_B,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
        if SINGLE_D:
            w = tl.load(w_base + cols64[None, :] * s_wc + dd0[:, None] * s_wd,
                        mask=col_ok[None, :] & (dd0[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_C)
            acc = _dot_acc(f_hoist, w, acc, IEEE)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + dd0
                d_ok = dd < D
                f = tl.load(f_base + dd[None, :] * s_fd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                w = tl.load(w_base + cols64[None, :] * s_wc + dd[:, None] * s_wd,
                            mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                acc = _dot_acc(f, w, acc, IEEE)
        if HAS_BIAS:
            bias = tl.load(Bias + j64 * s_bj + cols64 * s_bc, mask=col_ok, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        # online log-sum-exp: every tile holds >= 1 real column, so m_new is finite for finite logits
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        hit = cols64[None, :] == tgt[:, None]
        t_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)

    loss = m + tl.log(s) - t_logit
    loss = tl.where(ignored, 0.0, loss)
    loss = tl.where(bad, float("nan"), loss)
    if PER_ROW:
        tl.store(Out + out_ij * B + rows64, loss, mask=row_ok)
    else:
        loss = tl.where(row_ok, loss, 0.0)
        tl.store(Out + out_ij * n_bblocks + bb, tl.sum(loss, axis=0))


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def _pick_config(n_ij: int, B: int, C: int, D: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_D, num_warps), keyed on D and C (and B, I*J to fill the GPU).

    Every block dim is a power of two >= 16 (tl.dot's minimum; smaller shapes are masked/padded).
    The table comes from register budgets: every row, with and without bias, both output modes,
    compiles for sm_80 and sm_90 within 128 registers per thread (_MAX_REGISTERS, given to ptxas as
    maxnreg) with no spills, so two 8-warp programs fit per SM (tests/test_kernel_compile.py
    compiles them all ahead of time and prints the counts).

    * Half inputs (tensor-core MMA): 64 rows x 64 classes per tile. When D <= 128 the whole
      features tile (BLOCK_B, D) is loaded once and kept in registers across all class tiles
      (SINGLE_D; at D > 64 the class tile narrows to 32 to pay for it); above that the D loop
      steps 32, reloading features from L1/L2 (64 x 64 x 64 steps need ~170 registers).
    * float32 inputs (IEEE dot on CUDA cores, both operands held in registers per thread): much
      tighter. Larger tiles (16 x 64 at D = 64, 64 x 64 anywhere) reach ~240 registers or spill,
      and ptxas 13 erratically spills some of them entirely, so the tiles stay small: the hoisted
      tile shrinks as D grows, and D > 128 loops in steps of 16.
    * BLOCK_C is clamped to C (rounded up) so small heads waste no lanes; BLOCK_B (rows sharing each
      weight tile: its reuse) is clamped to B and halved down to 16 while the grid would give the
      SMs fewer than ~2 programs each (I*J = K^2 is small).
    Not autotuned on hardware (no timings behind it): retune here if this kernel dominates a step.
    """
    d_pow = max(16, triton.next_power_of_2(max(D, 1)))
    if dtype == torch.float32:
        if d_pow <= 32:
            block_b, block_c, block_d = 32, 32, d_pow
        elif d_pow <= 64:
            block_b, block_c, block_d = 16, 32, 64
        elif d_pow <= 128:
            block_b, block_c, block_d = 16, 32, 128
        else:
            block_b, block_c, block_d = 16, 32, 16
    elif d_pow <= 64:
        block_b, block_c, block_d = 64, 64, d_pow
    elif d_pow <= 128:
        block_b, block_c, block_d = 64, 32, 128
    else:
        block_b, block_c, block_d = 64, 64, 32
    block_c = max(16, min(block_c, triton.next_power_of_2(C)))
    block_b = max(16, min(block_b, triton.next_power_of_2(max(B, 1))))
    sms = sm_count(device)
    while block_b > 16 and n_ij * triton.cdiv(B, block_b) < 2 * sms:
        block_b //= 2
    return block_b, block_c, block_d, 8


def _new_buffer(shape: tuple, device: torch.device) -> torch.Tensor:
    """Uninitialised float32 output/partials buffer (the kernel writes every element)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check_operand(name: str, t, dims: dict[str, int], dtypes: tuple, device: torch.device,
                   optional: bool = False) -> None:
    """Type, shape (named dims), dtype and device checks of one operand after features."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(dims.values()):
        named = ", ".join(f"{k}={v}" for k, v in dims.items())
        raise ValueError(f"{name} must have shape ({named}), got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = str(dtypes[0]) if len(dtypes) == 1 else f"in ({', '.join(str(d) for d in dtypes)})"
        raise ValueError(f"{name} must have dtype {allowed}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on features' device {device}, got {t.device}")


def _validate(features, weight, bias, targets, reduction, ignore_index, dtypes) -> tuple:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features must have rank 4 (I, J, B, D), got rank {features.dim()} "
                         f"with shape {tuple(features.shape)}")
    I, J, B, D = (int(v) for v in features.shape)
    names = ", ".join(str(d) for d in dtypes)
    if features.dtype not in dtypes:
        raise ValueError(f"features must have dtype in ({names}), got {features.dtype}")
    dev = features.device
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3:
        raise ValueError(f"weight must have rank 3 (J, C, D), got rank {weight.dim()} "
                         f"with shape {tuple(weight.shape)}")
    if weight.shape[0] != J or weight.shape[2] != D:
        raise ValueError(f"weight must have shape (J={J}, C, D={D}) to match features "
                         f"{tuple(features.shape)}, got {tuple(weight.shape)}")
    C = int(weight.shape[1])
    if C < 1:
        raise ValueError(f"weight must have C >= 1 classes, got shape {tuple(weight.shape)}")
    if weight.dtype != features.dtype:
        raise ValueError(f"weight must have features' dtype {features.dtype}, got {weight.dtype}")
    if weight.device != dev:
        raise ValueError(f"weight must be on features' device {dev}, got {weight.device}")
    if bias is not None:
        _check_operand("bias", bias, {"J": J, "C": C}, dtypes, dev, optional=True)
    _check_operand("targets", targets, {"J": J, "B": B}, (torch.int64,), dev)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**31 <= ignore_index < 2**31:
        raise ValueError(f"ignore_index must fit in int32, got {ignore_index}")
    if dev.type == "cpu" and targets.numel():  # cheap here; on a GPU it would synchronise
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= C))
        if bool(bad.any()):
            jb = bad.nonzero()[0].tolist()
            raise ValueError(f"targets must be class indices in [0, C={C}) or ignore_index={ignore_index}, "
                             f"got targets[{jb[0]}, {jb[1]}] = {int(targets[jb[0], jb[1]])}")
    return I, J, B, D, C


def _reduce(row_or_block_sums: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            reduction: str) -> torch.Tensor:
    total = row_or_block_sums.sum(-1)                                     # (I, J), fixed order
    if reduction == "sum":
        return total
    count = (targets != ignore_index).sum(-1).to(total.dtype)            # (J,), no host sync
    return total / count                                                  # 0 / 0 = NaN like torch


def lookahead_cross_entropy(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, *, reduction: str = "mean",
                            ignore_index: int = -100) -> torch.Tensor:
    """Fused ``CE(features[i, j] @ weight[j].T + bias[j], targets[j])`` for every (i, j); forward only.

    Args:
        features: (I, J, B, D) float32 / float16 / bfloat16, any strides (a contiguous last dim
            gives vectorised loads). features[i, j] are lookahead set i's features of task j's view.
        weight: (J, C, D), features' dtype: task j's final linear layer.
        bias: (J, C) float (any of the three dtypes) or None.
        targets: (J, B) int64 class indices in [0, C), or ``ignore_index`` (excluded from the mean).
        reduction: "mean" (default): (I, J) mean over non-ignored rows (NaN where all are ignored);
            "sum": (I, J) sums; "none": (I, J, B) per-row losses (0 at ignored rows).
        ignore_index: the target value that marks a row as ignored (torch's default -100).

    Returns a float32 tensor on features' device, computed with float32 accumulation; never
    materialises the (I, J, B, C) logits. Deterministic (no atomics). Forward only: no autograd
    graph is recorded (the affinity step needs no gradient; use the twin if one is ever needed).

    Targets out of range raise ValueError for CPU tensors; for GPU tensors they are not checked on the
    host (no synchronisation) and make the affected rows' losses NaN. CPU tensors run only under
    TRITON_INTERPRET=1 (tests); otherwise use :func:`lookahead_cross_entropy_torch`.
    """
    I, J, B, D, C = _validate(features, weight, bias, targets, reduction, ignore_index, _KERNEL_DTYPES)
    dev = features.device
    if dev.type == "cpu" and not interpreting():
        raise ValueError("features is a CPU tensor: the Triton kernel runs on CPU tensors only under "
                         "TRITON_INTERPRET=1; use lookahead_cross_entropy_torch on the CPU")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"features must be a CUDA tensor (or CPU under TRITON_INTERPRET=1), got {dev}")

    if dev.type == "cpu" and features.dtype == torch.bfloat16:
        # The interpreter has no bfloat16 arithmetic. bf16 -> fp32 is exact and the kernel accumulates
        # bf16 products (exact in fp32) in fp32 anyway, so the meaning is unchanged.
        features, weight = features.float(), weight.float()
    if dev.type == "cpu" and bias is not None and bias.dtype == torch.bfloat16:
        bias = bias.float()

    per_row = reduction == "none"
    if I * J * B == 0:
        rows = torch.zeros((I, J, B), dtype=torch.float32, device=dev)
        return rows if per_row else _reduce(rows, targets, ignore_index, reduction)

    config = _pick_config(I * J, B, C, D, features.dtype, dev)
    out, launch = _plan(features, weight, bias, targets, reduction, ignore_index, config)
    with torch.no_grad():
        launch()
    return out if per_row else _reduce(out, targets, ignore_index, reduction)


def _plan(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
          reduction: str, ignore_index: int, config: tuple[int, int, int, int]) -> tuple[torch.Tensor, Launch]:
    """The output buffer ((I, J, B) rows for "none", else (I, J, n_bblocks) partial sums) and the
    launch of a validated call with I * J * B > 0; config is _pick_config's (BLOCK_B, BLOCK_C,
    BLOCK_D, num_warps)."""
    I, J, B, D = (int(v) for v in features.shape)
    C = int(weight.shape[1])
    block_b, block_c, block_d, num_warps = config
    n_bb = triton.cdiv(B, block_b)
    per_row = reduction == "none"
    out = _new_buffer((I, J, B) if per_row else (I, J, n_bb), features.device)
    has_bias = bias is not None
    b_arg = bias if has_bias else weight            # never read without HAS_BIAS
    s_bj, s_bc = (int(v) for v in bias.stride()) if has_bias else (0, 0)
    args = (features, weight, b_arg, targets, out, I, J, B, C, D, n_bb, ignore_index,
            *(int(v) for v in features.stride()), *(int(v) for v in weight.stride()), s_bj, s_bc,
            *(int(v) for v in targets.stride()))
    constexprs = dict(HAS_BIAS=has_bias, PER_ROW=per_row, SINGLE_D=block_d >= D, IEEE=features.dtype == torch.float32,
                      BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d)
    return out, Launch(_lookahead_ce_kernel, (I * J * n_bb,), args, constexprs, num_warps, _MAX_REGISTERS)


def lookahead_cross_entropy_torch(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  targets: torch.Tensor, *, reduction: str = "mean",
                                  ignore_index: int = -100) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`lookahead_cross_entropy` (it defines the meaning; any device).

    einsum for the logits (materialised: I*J*B*C floats) in float32 (float64 inputs stay float64),
    then ``torch.nn.functional.cross_entropy(reduction="none")``; "mean" divides each (i, j)'s sum by
    the number of non-ignored targets of task j, exactly torch's mean with ignore_index.
    Differentiable (unlike the kernel), though the affinity step does not need that.
    """
    _validate(features, weight, bias, targets, reduction, ignore_index, _TWIN_DTYPES)
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    logits = torch.einsum("ijbd,jcd->ijbc", features.to(acc), weight.to(acc))
    if bias is not None:
        logits = logits + bias.to(acc)[None, :, None, :]
    I, J, B, C = logits.shape
    tgt = targets.unsqueeze(0).expand(I, J, B)
    rows = torch.nn.functional.cross_entropy(logits.reshape(-1, C), tgt.reshape(-1),
                                             reduction="none", ignore_index=ignore_index)
    rows = rows.reshape(I, J, B)
    return rows if reduction == "none" else _reduce(rows, targets, ignore_index, reduction)
