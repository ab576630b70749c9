"""The compiled reductions of the affinity step, with their pure-PyTorch twins.

- `affinity_moments`: one TAG step (Fifty et al., 2021, Eq. 1). From the base losses ``L`` (K,) and
  the lookahead losses ``LA`` (K, K), ``LA[i, j]`` = task j's loss after a lookahead step along task
  i's gradient, it forms ``Z[i, j] = 1 - LA[i, j] / L[j]`` in float64 and folds it into per-entry
  running moments (count, mean and the weighted sum of squared deviations, with the weights' sums):
  Welford's update, or West's weighted form with exponential decay, from which the tracker reads the
  mean and its standard error.
- `gram`: ``G = grads @ grads.T`` in float64 for per-task gradients (K, P), the reduction behind
  first-order affinity estimates.

Each dispatches to `mtdl_fast._C` when it is built for the tensors' device and otherwise to its
PyTorch twin (`_affinity_moments_torch`, `_gram_torch`), which defines the meaning.
``backend="torch"`` forces the twin and ``backend="extension"`` requires the compiled path (tests use
both).

Nothing here synchronises with the GPU: the skipped count comes back as a 0-dim device tensor.
"""
from __future__ import annotations

from typing import Literal

import torch

from mtdl_fast._ext import ext

Backend = Literal["auto", "extension", "torch"]

LOSS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "extension", "torch")


# ---- dispatch -------------------------------------------------------------------------------------


def _compiled_for(device: torch.device):
    """The extension module when it can run on `device`, else None."""
    mod = ext()
    if mod is None:
        return None
    if device.type == "cpu":
        return mod
    if device.type == "cuda" and mod.built_with_cuda():
        return mod
    return None


def _pick(backend: str, device: torch.device):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    mod = _compiled_for(device)
    if mod is None and backend == "extension":
        raise RuntimeError(
            f"backend='extension' but mtdl_fast._C is not available for device {device} "
            f"(extension loaded: {ext() is not None})"
        )
    return mod


# ---- validation -----------------------------------------------------------------------------------


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_state(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> None:
    """A running-state tensor updated in place: its shape, dtype, device (base's) and layout."""
    _check_tensor(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of base), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {t.stride()}")


def _check_decay(decay: object) -> float | None:
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be None or a float in (0, 1), got {decay!r}")
    d = float(decay)
    if not 0.0 < d < 1.0:  # also rejects NaN
        raise ValueError(f"decay must be in (0, 1), got {decay!r}")
    return d


def _check_losses(base, lookahead) -> int:
    """Checks base (K,) and lookahead (K, K); returns K."""
    _check_tensor("base", base)
    _check_tensor("lookahead", lookahead)
    if base.dim() != 1:
        raise ValueError(f"base must be a 1-D tensor of K losses, got shape {tuple(base.shape)}")
    k = base.shape[0]
    if base.dtype not in LOSS_DTYPES:
        raise ValueError(f"base must be float32, float64, float16 or bfloat16, got {base.dtype}")
    if lookahead.dtype not in LOSS_DTYPES:
        raise ValueError(f"lookahead must be float32, float64, float16 or bfloat16, got {lookahead.dtype}")
    if tuple(lookahead.shape) != (k, k):
        raise ValueError(f"lookahead must have shape ({k}, {k}) for K={k} base losses, got {tuple(lookahead.shape)}")
    if lookahead.device != base.device:
        raise ValueError(f"lookahead must be on {base.device} (the device of base), got {lookahead.device}")
    return k


def _check_moments_args(base, lookahead, count, moments, decay) -> float | None:
    k = _check_losses(base, lookahead)
    _check_state("count", count, torch.int64, (k, k), base.device)
    _check_state("moments", moments, torch.float64, (4, k, k), base.device)
    return _check_decay(decay)


# ---- affinity -------------------------------------------------------------------------------------


def _step_z(base: torch.Tensor, lookahead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's Z (K, K) float64, NaN where invalid, and the validity mask."""
    b = base.detach().to(torch.float64)[None, :]
    la = lookahead.detach().to(torch.float64)
    z = 1.0 - la / b
    valid = torch.isfinite(b) & (b > 0) & torch.isfinite(la) & torch.isfinite(z)
    return torch.where(valid, z, torch.full_like(z, float("nan"))), valid


def affinity_moments(
    base: torch.Tensor,
    lookahead: torch.Tensor,
    count: torch.Tensor,
    moments: torch.Tensor,
    decay: float | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one step's TAG affinity into running per-entry moments, in place.

    Args:
        base: (K,) task j's loss at the current parameters, ``L[j]``. float32, float64, float16 or
            bfloat16; any device.
        lookahead: (K, K) ``LA[i, j]``: task j's loss after the lookahead step along task i's gradient.
            Same device as `base`; any of the same dtypes.
        count: (K, K) int64, updated in place: the number n of valid observations of each entry.
        moments: (4, K, K) float64, contiguous, updated in place: ``[mean, m2, weight, weight_sq]``
            of each entry's valid observations z_1 .. z_n with weights ``w_t = keep^(n - t)``
            (``keep = decay``, or 1 without decay): the weighted mean, the weighted sum of squared
            deviations ``sum_t w_t (z_t - mean)^2``, ``sum_t w_t`` and ``sum_t w_t^2``. All zero
            before the first observation.
        decay: None (every observation weighs 1: Welford's running mean and variance) or the share
            d in (0, 1) an observation's weight keeps per later observation.
        backend: "auto" (the compiled extension when built for the device, else the PyTorch twin),
            "extension" (require the compiled path) or "torch" (force the twin).

    Returns:
        ``(z, skipped)``: this step's ``Z[i, j] = 1 - LA[i, j] / L[j]`` as a (K, K) float64 tensor
        (source i onto target j; NaN where invalid), and the number of invalid entries as a 0-dim
        int64 tensor on the device (read it when you need it: no host synchronisation here).

    An entry is valid when ``L[j]`` is finite and > 0, ``LA[i, j]`` is finite and the resulting Z is
    finite (the last can only fail for float64 losses near the overflow range). Invalid entries leave
    `count` and `moments` unchanged. Every input dtype converts to float64 exactly before the
    arithmetic.

    The update of a valid observation z, in this order of float64 operations (West, 1979, with the
    past weights scaled by keep): ``weight' = weight * keep + 1``, ``weight_sq' = weight_sq *
    (keep * keep) + 1``, ``delta = z - mean``, ``mean' = mean + delta / weight'``, ``m2' = m2 * keep
    + delta * (z - mean')``. The compiled and PyTorch paths perform exactly these operations, so
    they agree to the last bit. From the state: effective number of observations ``n_eff =
    weight^2 / weight_sq`` (n without decay), unbiased variance ``m2 / (weight - weight_sq /
    weight)`` (``m2 / (n - 1)`` without decay), standard error of the mean ``sqrt(variance / n_eff)``.

    Raises:
        TypeError: an argument that is not a tensor, or a decay that is not a number.
        ValueError: a shape, dtype, device or layout mismatch (naming the argument and the value),
            or `decay` outside (0, 1).
    """
    d = _check_moments_args(base, lookahead, count, moments, decay)
    mod = _pick(backend, base.device)
    base, lookahead = base.detach(), lookahead.detach()
    if mod is None:
        return _affinity_moments_torch(base, lookahead, count, moments, d)
    k = base.shape[0]
    z = torch.empty((k, k), dtype=torch.float64, device=base.device)
    skipped = mod.affinity_moments(base, lookahead, count, moments, d, z)
    return z, skipped


@torch.no_grad()
def _affinity_moments_torch(
    base: torch.Tensor,
    lookahead: torch.Tensor,
    count: torch.Tensor,
    moments: torch.Tensor,
    decay: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The meaning of `affinity_moments` in plain PyTorch (arguments already checked)."""
    z, valid = _step_z(base, lookahead)
    keep = 1.0 if decay is None else decay
    mean, m2, weight, weight_sq = moments.unbind(0)
    # The C++ and CUDA code's float64 operations, one per torch op, in the same order.
    new_weight = weight * keep + 1.0
    new_weight_sq = weight_sq * (keep * keep) + 1.0
    delta = z - mean
    new_mean = mean + delta / new_weight
    new_m2 = m2 * keep + delta * (z - new_mean)
    updated = torch.stack([new_mean, new_m2, new_weight, new_weight_sq])
    moments.copy_(torch.where(valid, updated, moments))
    count.add_(valid.to(torch.int64))
    return z, (~valid).sum()


# ---- Gram -----------------------------------------------------------------------------------------


def gram(grads: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Gram matrix of per-task gradients, accumulated in float64.

    Args:
        grads: (K, P) per-task gradients, one row per task (the flattened shared-parameter gradient).
            float32, float64, float16 or bfloat16; CPU or CUDA. Made contiguous if it is not.
        backend: "auto", "extension" or "torch", as for `affinity_moments`.

    Returns:
        G: (K, K) float64 on the device of `grads`, ``G[a, b] = sum_p grads[a, p] * grads[b, p]``.

    Every product and every partial sum is float64 (float32, float16 and bfloat16 products are exact
    in float64). The compiled paths are deterministic: the summation order depends on K and P only,
    not on the thread count or the GPU; G is exactly symmetric.

    Raises:
        ValueError: `grads` is not a 2-D floating tensor of a supported dtype.
    """
    _check_tensor("grads", grads)
    if grads.dim() != 2:
        raise ValueError(f"grads must be a 2-D tensor (K, P), got shape {tuple(grads.shape)}")
    if grads.dtype not in LOSS_DTYPES:
        raise ValueError(f"grads must be float32, float64, float16 or bfloat16, got {grads.dtype}")
    mod = _pick(backend, grads.device)
    x = grads.detach().contiguous()
    if mod is None:
        return _gram_torch(x)
    k = x.shape[0]
    out = torch.empty((k, k), dtype=torch.float64, device=x.device)
    mod.gram(x, out)
    return out


# Columns per float64 chunk in `_gram_torch`: bounds the float64 copy to about 256 MiB.
_TORCH_GRAM_ELEMENTS = 1 << 25


@torch.no_grad()
def _gram_torch(grads: torch.Tensor) -> torch.Tensor:
    """The meaning of `gram` in plain PyTorch: float64 matmuls over column chunks, symmetrised."""
    k, p = grads.shape
    g = torch.zeros((k, k), dtype=torch.float64, device=grads.device)
    step = max(1, _TORCH_GRAM_ELEMENTS // max(k, 1))
    for start in range(0, p, step):
        x = grads[:, start : start + step].to(torch.float64)
        g += x @ x.T
    upper = torch.triu(g)
    return upper + torch.triu(g, diagonal=1).T
