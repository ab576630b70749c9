"""Covariance alignment (Wu, Zhang & Ré, "Understanding and Improving Information Transfer in
Multi-Task Learning", ICLR 2020, Algorithm 1): a per-task alignment matrix in front of the shared
module.

Task i's embedding E_i (the output of the trunk's `layer`, (B, d, ...)) is multiplied by its own
d x d matrix R_i, initialised to the identity, and Z_i = E_i R_i goes on through the rest of the
trunk: for an image trunk a per-task 1x1 convolution on the embedding's d channels, for a feature
embedding a per-task linear map. The paper's motivation: tasks whose data covariances are
misaligned transfer badly through a shared module; R_i can rotate task i's embedding towards the
others (it raises their covariance similarity, `mtdl_fast.research.covariance`). Algorithm 1
trains the R_i and the heads with the shared module held fixed, then everything is fine-tuned:
`AlignmentSchedule`.

    trunk = CovarianceAlignedTrunk(SmallResNet(1, 8), num_tasks=K)       # aligns after `.stem`
    features = trunk(views[k], k)                   # task k: (B, C, H, W) -> (B, D)
    features = trunk.forward_views(views)           # all K at once: (K, B, C, H, W) -> (K, B, D)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=0.9)
    schedule = AlignmentSchedule(trunk, optimizer, align_steps=50)
    for step, (x, y) in enumerate(loader):
        schedule.update(step)                       # phase 1: shared module fixed; phase 2: all train
        ...                                         # the usual step (e.g. MTDLEngine.step)

It is a task-aware trunk (`mtdl_fast.research.task_aware`): `task_aware = True`, `forward(x, task)`,
`forward_views(views)` and `task_parameter_names() == ["alignment"]` (the affinity lookahead holds
the R_i fixed, like heads).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap

from mtdl_fast.models import _positive_int
from mtdl_fast.research.task_aware import SequentialRunningStats, check_task, check_views, task_row

__all__ = ["AlignmentSchedule", "CovarianceAlignedTrunk"]

_WIDTH_ATTRIBUTES = ("num_features", "out_channels", "out_features")


def _embedding_width(module: nn.Module) -> int | None:
    """The width of a module's output read from its last layer that declares one (BatchNorm's
    num_features, a convolution's out_channels, a Linear's out_features), or None."""
    for sub in reversed(list(module.modules())):
        for attribute in _WIDTH_ATTRIBUTES:
            width = getattr(sub, attribute, None)
            if isinstance(width, int) and not isinstance(width, bool):
                return width
    return None


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _align(embedding: torch.Tensor, matrix: torch.Tensor, where: str) -> torch.Tensor:
    """Z = E R along dimension 1: (B, d, ...) x (d, d) -> (B, d, ...), z[:, e] = sum_c E[:, c] R[c, e]."""
    d = matrix.shape[-1]
    if embedding.ndim < 2 or embedding.shape[1] != d:
        raise ValueError(f"{where} must have shape (B, {d}, ...) to be aligned by {d} x {d} matrices, "
                         f"got {tuple(embedding.shape)}")
    # contiguous: einsum returns a channels-last-like layout, on which the layers that follow
    # would sum in another order (not bit-identical to the unaligned trunk at R = I).
    return torch.einsum("bc...,ce->be...", embedding, matrix.to(embedding.dtype)).contiguous()


class CovarianceAlignedTrunk(nn.Module):
    """A trunk with a per-task alignment matrix R_k (d x d, initialised to the identity) applied to
    the output of one of its layers (module docstring).

    The trunk is deep-copied (the argument is left as it was) and a forward hook on the copy's
    `layer` applies the current task's R, so the copy is called through this module only (calling
    it directly raises). Its parameters keep their names under ``trunk.``; the alignment matrices
    are ``alignment`` (K, d, d), row k is task k's R (Z = E R). (A layer that the trunk calls more
    than once per forward is aligned at every call.)

    Args:
        trunk: any nn.Module mapping (B, ...) to features.
        num_tasks: K.
        layer: the name (as in ``trunk.named_modules()``) of the layer whose output is the embedding
            E, (B, d, ...) with d along dimension 1; for `mtdl_fast.models.SmallResNet` "stem"
            (the default). None aligns the trunk's input itself (d = its dimension 1).
        channels: d; default: read from the layer (its last BatchNorm's num_features, convolution's
            out_channels or Linear's out_features). Required when `layer` is None.

    Raises:
        TypeError: trunk not an nn.Module, layer not a string or None.
        ValueError: a layer name that is not a submodule of the trunk (named in the message),
            num_tasks or channels not a positive int, channels that cannot be read from the layer.
    """

    task_aware = True

    def __init__(self, trunk: nn.Module, num_tasks: int, layer: str | None = "stem", channels: int | None = None):
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a submodule name (str) or None, got {type(layer).__name__}")
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        self.trunk = trunk = copy.deepcopy(trunk)
        self.layer = layer
        self._matrix: torch.Tensor | None = None
        if layer is not None:
            modules = dict(trunk.named_modules())
            if layer not in modules or layer == "":
                names = [n for n in modules if n]
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ValueError(f"layer {layer!r} is not a submodule of the trunk (its submodules: {shown})")
            if channels is None:
                channels = _embedding_width(modules[layer])
                if channels is None:
                    raise ValueError(f"cannot read the width of layer {layer!r}; pass channels=")
            modules[layer].register_forward_hook(self._align_hook)
        elif channels is None:
            raise ValueError("channels is required when layer is None (the input's dimension 1)")
        self.channels = _positive_int("channels", channels)
        identity = torch.eye(self.channels, device=_device_of(trunk))
        self.alignment = nn.Parameter(identity.expand(self.num_tasks, -1, -1).clone())
        if hasattr(trunk, "out_features"):
            self.out_features = trunk.out_features

    def task_parameter_names(self) -> list[str]:
        """The per-task parameters: the alignment matrices."""
        return ["alignment"]

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        """Task `task`'s features: x (B, ...) -> trunk output with `layer`'s output times R_task.

        task: an int in [0, K) or a 0-dim integer tensor (also batched under torch.func.vmap)."""
        check_task(task, self.num_tasks)
        return self._run(x, task_row(self.alignment, task))

    def forward_views(self, views: torch.Tensor) -> torch.Tensor:
        """All K tasks at once: views (K, B, ...) -> (K, B, D), equal to stacking forward(views[k], k).

        One vmapped call over the views: the trunk's layers fold the K views into one batch (shared
        weights) and the K alignments are one batched matmul. BatchNorm keeps the per-view meaning:
        each view is normalised with its own batch statistics, and in training mode the shared
        running statistics end as K sequential per-view updates leave them (`SequentialRunningStats`).
        """
        check_views(views, self.num_tasks)
        stats = SequentialRunningStats(self.trunk, self.num_tasks)

        def one_view(state: dict, matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self._run(x, matrix, state)

        out = vmap(one_view, randomness="different")(stats.copies, self.alignment, views)
        stats.fold_()
        return out

    def _run(self, x: torch.Tensor, matrix: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """The trunk on x with `matrix` aligning the embedding; `state` swaps tensors of the wrapped
        trunk for this call (the running-statistics copies of `forward_views`)."""
        if self.layer is None:
            x = _align(x, matrix, "the trunk's input")
        previous, self._matrix = self._matrix, matrix
        try:
            return functional_call(self.trunk, state, (x,)) if state else self.trunk(x)
        finally:
            self._matrix = previous

    def _align_hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self._matrix is None:
            raise RuntimeError(f"the trunk's layer {self.layer!r} is aligned per task: call the "
                               "CovarianceAlignedTrunk (trunk(x, task)), not the wrapped trunk")
        return _align(output, self._matrix, f"the output of layer {self.layer!r}")

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, layer={self.layer!r}, channels={self.channels}"


class AlignmentSchedule:
    """The two phases of Algorithm 1 (Wu, Zhang & Ré, ICLR 2020): for the first `align_steps`
    training steps the shared module (the wrapped trunk's parameters) is held fixed while the
    alignment matrices and the heads train; from then on everything is fine-tuned.

    Call ``update(step)`` before each training step (`step` counts from 0; the schedule keeps no
    other state, so a resumed run calls it with its own step count). In phase 1 a step pre-hook on
    the optimizer drops the shared parameters' gradients (``grad = None``) just before every
    ``optimizer.step()``: SGD and Adam then skip those parameters entirely (no update, no weight
    decay, no momentum or moment estimates built up from phase 1), whatever wrote the gradients
    (a backward, or `AffinityTracker.apply_gradients`). The shared parameters keep
    ``requires_grad``, so the affinity tracker, DistributedDataParallel and gradient scaling see
    the same parameters in both phases; the price is that phase 1 still computes the shared
    parameters' gradients. (An affinity measured in phase 1 previews a shared step that the phase
    does not take; a trainer may measure only in phase 2: ``schedule.phase(step) == "finetune"``.)

    Args:
        trunk: the `CovarianceAlignedTrunk` being trained.
        optimizer: the optimizer that steps it.
        align_steps: the length of phase 1 (0: fine-tune from the start).
    """

    def __init__(self, trunk: CovarianceAlignedTrunk, optimizer: torch.optim.Optimizer, align_steps: int):
        if not isinstance(trunk, CovarianceAlignedTrunk):
            raise TypeError(f"trunk must be a CovarianceAlignedTrunk, got {type(trunk).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(align_steps, bool) or not isinstance(align_steps, int):
            raise TypeError(f"align_steps must be an int >= 0, got {align_steps!r}")
        if align_steps < 0:
            raise ValueError(f"align_steps must be >= 0, got {align_steps}")
        self.align_steps = align_steps
        per_task = set(trunk.task_parameter_names())
        self.shared = [p for name, p in trunk.named_parameters() if name not in per_task]
        self.current = self.phase(0)
        self._hook = optimizer.register_step_pre_hook(self._drop_shared_gradients)

    def phase(self, step: int) -> str:
        """"align" (shared module fixed) for steps before `align_steps`, else "finetune"."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int >= 0, got {step!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return "align" if step < self.align_steps else "finetune"

    def update(self, step: int) -> str:
        """Enter `step`'s phase (call before the step); returns it."""
        self.current = self.phase(step)
        return self.current

    def remove(self) -> None:
        """Detach the schedule from the optimizer (the shared module trains from then on)."""
        self._hook.remove()

    def _drop_shared_gradients(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self.current == "align":
            for p in self.shared:
                p.grad = None
