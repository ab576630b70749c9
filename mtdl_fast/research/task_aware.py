"""Helpers of task-aware trunks: trunks with per-task parameters that the engine and the
affinity tracker call as ``trunk(x, task)``.

The contract (what `mtdl_fast.engine` and `mtdl_fast.affinity` look for): a task-aware trunk has
``task_aware = True``; ``forward(x, task)`` with ``task`` a Python int or a 0-dim integer tensor
(possibly batched under torch.func.vmap); ``task_parameter_names()``, the names (as in
``named_parameters()``) of its per-task parameters, which the affinity lookahead holds fixed like
heads; optionally ``forward_views(views) -> (K, B, D)``, all K views in one vectorised call with the
per-view loop's meaning, and ``regularization() -> scalar``, a term the engine adds to the training
loss.

Here: the task check, vmap-safe per-task rows of a stacked (K, ...) tensor, the views check, and
`SequentialRunningStats`, which keeps BatchNorm's running statistics right when K views run through
shared BatchNorm layers in one vmapped call.
"""
from __future__ import annotations

import torch
from torch import nn

from mtdl_fast.research.conditioning import _rows

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def check_task(task, num_tasks: int) -> None:
    """A task index: an int in [0, num_tasks) or a 0-dim integer tensor (not range-checked: that
    would synchronise with the device; an index out of range fails in the lookup)."""
    if isinstance(task, torch.Tensor):
        if task.dtype.is_floating_point or task.dtype.is_complex or task.dtype == torch.bool:
            raise ValueError(f"task must be an integer tensor, got dtype {task.dtype}")
        if task.ndim != 0:
            raise ValueError(f"task must be a 0-dim tensor (one task for the batch), got shape {tuple(task.shape)}")
    elif isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task must be an int or a 0-dim integer tensor, got {type(task).__name__}")
    elif not 0 <= task < num_tasks:
        raise ValueError(f"task must be in [0, {num_tasks}), got {task}")


def task_row(stacked: torch.Tensor, task) -> torch.Tensor:
    """stacked[task] for a (K, ...) tensor: a view for an int task (in-place updates, e.g.
    BatchNorm's running statistics, reach the stacked tensor); a gathered copy for a tensor task,
    through F.embedding so that it also runs under grad inside vmap."""
    if isinstance(task, int):
        return stacked[task]
    return _rows(stacked.reshape(stacked.shape[0], -1), task).reshape(stacked.shape[1:])


def check_views(views, num_tasks: int) -> None:
    if not isinstance(views, torch.Tensor):
        raise TypeError(f"views must be a (K, B, ...) tensor, got {type(views).__name__}")
    if views.ndim < 2 or views.shape[0] != num_tasks:
        raise ValueError(f"views must have shape (K={num_tasks}, B, ...), got {tuple(views.shape)}")


class SequentialRunningStats:
    """BatchNorm running statistics for K views run through shared BatchNorm layers in one vmap.

    The per-view loop (the engine's meaning of a step) normalises view k with its own batch
    statistics and updates a shared layer's running statistics once per view, in order. Under vmap
    an unbatched buffer cannot be updated in place with per-view values, so `copies` holds K copies
    of every shared running mean and variance, to be passed batched (in_dims 0) to the vmapped
    functional_call: copy k is updated once, from view k, to u_k. `fold_()` then writes what K
    sequential updates give:

    - momentum m: u_k = (1 - m) r_0 + m mu_k, and the loop gives
      r_K = (1 - m)^K r_0 + sum_k (1 - m)^(K-1-k) m mu_k = (1 - m)^K r_0 + sum_k (1 - m)^(K-1-k) (u_k - (1 - m) r_0);
    - momentum None (cumulative average over the n_0 batches seen): u_k = r_0 + (mu_k - r_0) / (n_0 + 1),
      and the loop gives r = r_0 + (n_0 + 1) sum_k (u_k - r_0) / (n_0 + K);
    - num_batches_tracked stays unbatched (BatchNorm reads it on the host when momentum is None):
      the vmapped call adds 1 to it once, `fold_` makes that K.

    Only layers in training mode that track running statistics take part (in eval mode nothing is
    updated and the unbatched buffers are read as they are); buffers named in `exclude` are
    per-task (already stacked (K, ...)) and are updated in place by the vmapped call itself.

    Args:
        module: the module the vmapped call runs (buffer names are relative to it).
        num_views: K.
        exclude: buffer names not to copy.
    """

    def __init__(self, module: nn.Module, num_views: int, exclude: frozenset[str] | set[str] = frozenset()):
        self.num_views = num_views
        self.layers: list[tuple[nn.modules.batchnorm._BatchNorm, dict[str, str], torch.Tensor]] = []
        self.copies: dict[str, torch.Tensor] = {}
        for prefix, layer in module.named_modules():
            if not (isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
                    and layer.track_running_stats and layer.running_mean is not None):
                continue
            names = {leaf: f"{prefix}.{leaf}" if prefix else leaf for leaf in _RUNNING}
            if names["running_mean"] in exclude:
                continue
            self.layers.append((layer, names, layer.num_batches_tracked.detach().clone()))
            for leaf in ("running_mean", "running_var"):
                buffer = getattr(layer, leaf)
                self.copies[names[leaf]] = buffer.detach().expand(num_views, *buffer.shape).clone()

    @torch.no_grad()
    def fold_(self) -> None:
        """Write the sequential result of the K updated copies into the layers' buffers."""
        k = self.num_views
        for layer, names, seen in self.layers:
            calls = layer.num_batches_tracked - seen  # 1, or 0 for a layer the call did not run
            for leaf in ("running_mean", "running_var"):
                r0 = getattr(layer, leaf)
                updates = self.copies[names[leaf]]
                if layer.momentum is None:
                    n0 = seen.to(r0.dtype)
                    folded = r0 + (n0 + 1) * (updates - r0).sum(0) / (n0 + k)
                else:
                    keep = 1.0 - layer.momentum
                    powers = keep ** torch.arange(k - 1, -1, -1, dtype=r0.dtype, device=r0.device)
                    steps = updates - keep * r0
                    folded = keep**k * r0 + torch.tensordot(powers, steps, dims=1)
                r0.copy_(folded)
            layer.num_batches_tracked.copy_(seen + k * calls)
