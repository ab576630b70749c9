"""How the K per-task losses of a step become one training loss: the engine's contract.

The engine needs one weighting; its default is :class:`Sum`. The strategies of the literature
(static, min-max, uncertainty, DWA, SVD, uniform sampling) live in `mtdl_fast.research.weighting`.
Every strategy is an ``nn.Module`` subclass of :class:`Weighting` with two views of the same rule:

    weighting = make_weighting("dwa", num_tasks=K)
    total = weighting(losses)              # scalar training loss; losses is (K,) with its graph
    w = weighting.weights(losses)          # (K,) detached weights of this step
    weighting.step_end(losses.detach())    # bookkeeping after the optimizer step (DWA history)

``linear`` is True when ``forward(losses) == (weights(losses) * losses).sum()`` exactly; then an
engine that already holds the per-task gradients g_k may form the update as ``sum_k w_k g_k``
instead of a backward of ``forward()``. It is False for strategies with learnable parameters of
their own (:class:`UncertaintyWeighting`) or a nonlinear combination (smooth :class:`MinMax`).

One call per step. Some strategies advance state on every call of ``weights()`` or ``forward()``
(:class:`UniformTaskSampling` draws a new sample; :class:`SVDReweighting` takes in new features).
Call one of them once per step; the weights the last call used are kept in ``last_weights``
(a plain attribute, not part of the state dict) for logging or for combining gradients after a
``forward()``.

Non-finite losses: a non-finite loss gives a non-finite total (the engine skips such steps);
history (DWA) and stored estimates (SVD) are never updated from non-finite values.

Mixed precision: the engine runs its forward passes under autocast but calls the weighting outside
that region, with losses and features in at least float32.

Devices: weights come back on ``losses.device`` in ``losses.dtype`` promoted to at least float32.
Nothing here synchronises with the host except where a docstring says so (``SVDReweighting``
without ``num_classes``). Move the module to the losses' device (``weighting.to(device)``) so
its buffers live there too.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

__all__ = ["Sum", "Weighting"]


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_count(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _weight_dtype(losses: torch.Tensor) -> torch.dtype:
    """losses.dtype promoted to at least float32 (losses are floating point), on the host alone."""
    return torch.float64 if losses.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# base class


class Weighting(nn.Module):
    """Base class: K per-task losses -> weights (K,) and a scalar training loss.

    Subclasses implement ``_weights(losses, **context)`` (detached (K,) weights) and, when the
    combination is not the weighted sum, ``forward``. ``context`` may carry ``features``
    ((K, B, D) trunk features of each task's view, detached) and ``targets`` ((B,) or (K, B));
    strategies that do not use them ignore them.
    """

    #: True when forward(losses) == (weights(losses) * losses).sum() exactly (see module docs).
    linear: bool = True

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = _check_count("num_tasks", num_tasks)
        self.last_weights: torch.Tensor | None = None

    # -- input checks --------------------------------------------------------------------------
    def _check_losses(self, losses: Any, name: str = "losses") -> torch.Tensor:
        if not isinstance(losses, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape ({self.num_tasks},), got {type(losses).__name__}"
            )
        if losses.ndim != 1 or losses.shape[0] != self.num_tasks:
            raise ValueError(
                f"{name} must have shape (num_tasks,) = ({self.num_tasks},), got {tuple(losses.shape)}"
            )
        if not losses.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {losses.dtype}")
        return losses

    # -- the two views -------------------------------------------------------------------------
    def _weights(self, losses: torch.Tensor, **context: Any) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, losses: torch.Tensor, **context: Any) -> torch.Tensor:
        """(K,) detached weights of this step, on ``losses.device``."""
        losses = self._check_losses(losses)
        with torch.no_grad():
            w = self._weights(losses.detach(), **context)
        w = w.to(device=losses.device, dtype=_weight_dtype(losses), copy=True).detach()
        self.last_weights = w
        return w

    def forward(self, losses: torch.Tensor, **context: Any) -> torch.Tensor:
        """Scalar training loss; for linear strategies ``(weights(losses) * losses).sum()``."""
        w = self.weights(losses, **context)
        return (w * losses).sum()

    def step_end(self, losses: torch.Tensor) -> None:
        """Bookkeeping after an optimizer step (e.g. DWA's loss history). Default: nothing."""
        self._check_losses(losses)


# ---------------------------------------------------------------------------------------------
# fixed weights


class Sum(Weighting):
    """Equal weighting: total = sum_k L_k, weights 1."""

    def _weights(self, losses, **context):
        return torch.ones(self.num_tasks, device=losses.device, dtype=_weight_dtype(losses))
