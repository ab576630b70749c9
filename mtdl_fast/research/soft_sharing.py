"""Soft parameter sharing (Stanford CS330, "Multi-Task Learning"): K task-specific copies theta_k
of (part of) the trunk, tied by a penalty instead of being one tensor:

    loss = sum_k L_k(theta_k) + lam * sum_k ||theta_k - mean_k theta_k||^2

`SoftSharedTrunk(trunk, K, lam, layers)` copies the parameters (and buffers) of the chosen layers
K times, stacked (K, ...) as torch.func.stack_module_state builds them; the rest of the trunk stays
hard-shared. lam = 0 trains K independent copies of those layers; lam -> infinity forces the copies
onto their mean, i.e. hard sharing (the optimum; tested). The optimizer's dynamics differ: copy k
gets task k's gradient only, so with tied copies their mean moves by the *mean* of the task
gradients, where a hard-shared trunk trained on the summed losses moves by their sum (K times the
step at the same learning rate). All copies start equal to the given trunk (the penalty starts at
0 and the model starts as the hard-shared one).

    trunk = SoftSharedTrunk(SmallResNet(1, 8), num_tasks=K, lam=1e-2)        # the whole trunk per task
    features = trunk.forward_views(views)         # (K, B, C, H, W) -> (K, B, D): one vmapped call
    loss = sum(F.cross_entropy(heads[k](features[k]), y) for k in range(K)) + trunk.regularization()

It is a task-aware trunk (`mtdl_fast.research.task_aware`): ``forward(x, task)`` runs copy `task`,
``forward_views`` runs copy k on view k for all k in one torch.func.vmap over the stacked copies
(functional_call; not K forwards), ``regularization()`` is the penalty the engine adds to the
training loss, and ``task_parameter_names()`` lists every stacked per-task parameter.

TAG affinity for a soft-shared trunk. TAG's lookahead (Fifty et al., NeurIPS 2021) moves the
*shared* parameters with task i's gradient and holds task-specific ones (heads) fixed. A copy
theta_k is task-specific: task i's loss does not depend on theta_j (j != i), so task i's
one-step update changes no other task's loss through the copies: Z[i, j] = 0 for i != j by
construction, and the coupling acts only through the penalty on later steps. So the affinity
tracker holds the copies fixed like heads and measures transfer through the hard-shared
remainder of the trunk (`layers` a part of it); a trunk copied whole has no shared parameters
and the tracker should refuse it with a clear message rather than report a matrix of zeros, or
measure a model (the mean of the copies) that is not the one being trained.

BatchNorm: each copied BatchNorm layer keeps running statistics per copy (stacked (K, C) buffers,
copy k updated by view k only, in place under vmap); a hard-shared BatchNorm layer is updated as
the per-view loop updates it (`SequentialRunningStats`). ``forward(x, task)`` with an int task
updates copy `task`'s statistics; with a tensor task (the affinity tracker's batched path) it
reads them and updates nothing.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from mtdl_fast.models import _positive_int
from mtdl_fast.research.task_aware import SequentialRunningStats, check_task, check_views, task_row

__all__ = ["SoftSharedTrunk"]


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a number >= 0, got {lam!r}")
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return lam


def _check_layers(body: nn.Module, layers) -> list[str]:
    """The names of the submodules to copy per task ("" for the whole trunk when layers is None)."""
    if layers is None:
        return [""]
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of submodule names or None, got {layers!r}")
    names = list(layers)
    if not names:
        raise ValueError("layers must name at least one submodule (None copies the whole trunk)")
    modules = dict(body.named_modules())
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layers must hold submodule names (str), got {name!r}")
        if name not in modules or name == "":
            raise ValueError(f"layer {name!r} is not a submodule of the trunk")
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j and (a == b or b.startswith(a + ".")):
                raise ValueError(f"layers overlap: {b!r} is {'repeated' if a == b else f'inside {a!r}'}")
    return names


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _split(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule owning tensor `name` and the tensor's attribute name in it."""
    prefix, _, leaf = name.rpartition(".")
    return module.get_submodule(prefix), leaf


class SoftSharedTrunk(nn.Module):
    """K task copies of the chosen layers of a trunk, tied by lam * sum_k ||theta_k - mean||^2
    (module docstring: definition, affinity, BatchNorm).

    The trunk is deep-copied (the argument is left as it was). In the copy, every parameter and
    buffer of the chosen layers is replaced by a stacked (K, ...) tensor of the same name, row k
    being task k's copy, so ``named_parameters()`` reads ``trunk.<name>`` with a leading K for the
    per-task tensors and the usual shape for the hard-shared ones. The copy cannot be called on its
    own (its stacked tensors are swapped for rows by functional_call); call this module.

    Args:
        trunk: any nn.Module mapping (B, ...) to features.
        num_tasks: K.
        lam: the penalty's weight lambda >= 0.
        layers: names (as in ``trunk.named_modules()``) of the submodules copied per task, not
            nested in one another; None (default): the whole trunk.

    Raises:
        TypeError: trunk not an nn.Module; lam not a number; layers not a sequence of names.
        ValueError: lam < 0 or not finite; num_tasks not a positive int; a layer name that is not a
            submodule (named in the message); overlapping layers; chosen layers without parameters.
    """

    task_aware = True

    def __init__(self, trunk: nn.Module, num_tasks: int, lam: float, layers: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        self.lam = _check_lam(lam)
        body = copy.deepcopy(trunk)
        chosen = _check_layers(body, layers)
        self.layers = None if layers is None else tuple(chosen)
        self._chosen = chosen
        self._param_names: list[str] = []
        self._buffer_names: list[str] = []
        for prefix in chosen:
            params, buffers = stack_module_state([body.get_submodule(prefix)] * self.num_tasks)
            for name, stacked in params.items():
                owner, leaf = _split(body, _join(prefix, name))
                original = owner._parameters[leaf]
                owner._parameters[leaf] = nn.Parameter(stacked.detach(), requires_grad=original.requires_grad)
                self._param_names.append(_join(prefix, name))
            for name, stacked in buffers.items():
                owner, leaf = _split(body, _join(prefix, name))
                owner._buffers[leaf] = stacked
                self._buffer_names.append(_join(prefix, name))
        if not self._param_names:
            raise ValueError(f"layers {layers!r} hold no parameters to copy per task")
        self.trunk = body
        if hasattr(trunk, "out_features"):
            self.out_features = trunk.out_features

    def task_parameter_names(self) -> list[str]:
        """Every per-task (stacked) parameter, named as in ``named_parameters()``."""
        return [f"trunk.{name}" for name in self._param_names]

    def _stacked(self) -> dict[str, torch.Tensor]:
        """The stacked per-task tensors held now (names relative to the copy). Read by attribute so
        that tensors swapped in by an outer functional_call are the ones used; buffers that a
        batch-statistics copy of the module removed (None) are skipped."""
        out = {}
        for name in self._param_names + self._buffer_names:
            owner, leaf = _split(self.trunk, name)
            tensor = getattr(owner, leaf)
            if tensor is not None:
                out[name] = tensor
        return out

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        """Copy `task` on x (B, ...): the trunk's output for task `task`.

        task: an int in [0, K) or a 0-dim integer tensor (also batched under torch.func.vmap)."""
        check_task(task, self.num_tasks)
        rows = {name: task_row(tensor, task) for name, tensor in self._stacked().items()}
        return functional_call(self.trunk, rows, (x,))

    def forward_views(self, views: torch.Tensor) -> torch.Tensor:
        """Copy k on view k for every k, in one vmap over the stacked copies: views (K, B, ...) ->
        (K, B, D), equal to stacking forward(views[k], k) (outputs, gradients and running statistics)."""
        check_views(views, self.num_tasks)
        self._check_no_cumulative_batch_norm()
        stacked = self._stacked()
        stats = SequentialRunningStats(self.trunk, self.num_tasks, exclude=set(stacked))

        def one_copy(state: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.trunk, state, (x,))

        out = vmap(one_copy, randomness="different")({**stacked, **stats.copies}, views)
        stats.fold_()
        return out

    def _check_no_cumulative_batch_norm(self) -> None:
        """A copied BatchNorm layer with momentum=None (a cumulative average) reads its per-copy
        batch counter on the host, which vmap cannot do over the stacked counters."""
        for prefix in self._chosen:
            for name, layer in self.trunk.get_submodule(prefix).named_modules():
                if (isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
                        and layer.track_running_stats and layer.momentum is None):
                    where = _join(prefix, name)
                    raise ValueError(f"forward_views cannot run the copied BatchNorm layer {where!r} with "
                                     "momentum=None in training mode; give it a float momentum or call "
                                     "forward(x, k) per view")

    def spread(self) -> torch.Tensor:
        """sum_k ||theta_k - mean_k theta_k||^2 over every per-task parameter (a scalar tensor)."""
        params = [t for name, t in self._stacked().items() if name in self._param_names]
        return sum((p - p.mean(dim=0, keepdim=True)).square().sum() for p in params)

    def regularization(self) -> torch.Tensor:
        """lam * spread(): the soft-sharing penalty, to add to the training loss (scalar tensor)."""
        return self.lam * self.spread()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, lam={self.lam}, layers={self.layers}"
