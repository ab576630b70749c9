"""MTDLEngine: one Multi-Task Distribution Learning step, usable whole or piece by piece.

    augment (K views, one fused launch on CUDA) -> per-view forward -> per-task losses (K,)
    -> weighting -> backward -> optimizer step; every `affinity_every` steps the TAG affinity is
    measured, and its per-task gradients are reused as the training gradient (no second backward).

Under torch.distributed (more than one rank) each rank steps on its shard of the global batch:
the forward runs through DistributedDataParallel, which averages the gradients in the backward,
and an affinity step averages the per-task gradients and lookahead losses (see
`mtdl_fast.distributed`), so every rank takes the step a single process would take on the global
batch (BatchNorm statistics stay per rank, as under DDP).

Mixed precision (`amp=`): the forward passes (training, the affinity measurement, the BatchNorm
refresh) run under torch.autocast; parameters, gradients and optimizer state stay in the
parameters' dtype, and the losses the weighting sees are at least float32.

Host synchronisation: none in a step with `skip_nonfinite=False` (amp None or "bf16"); with
`skip_nonfinite=True` one read of the step's loss; with amp="fp16" the GradScaler's inf check and
one read of its new scale.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mtdl_fast import distributed as dist_utils
from mtdl_fast.affinity import AffinityTracker, _has_batch_norm
from mtdl_fast.lookahead import LossFn, check_optimizer
from mtdl_fast.models import check_trunk, trunk_regularization, view_features
from mtdl_fast.tasks import DistributionTasks
from mtdl_fast.weighting import Sum

_GROUP_UPDATE_API = ("step", "state_dict", "load_state_dict")

#: amp= values: autocast dtype of the forward passes.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MTDLEngine:
    """Trains a shared trunk and K heads on K distribution tasks of each batch.

    Args:
        tasks: the K distribution tasks (views of each batch).
        trunk, heads: the model; head k reads trunk(view_k). Each view is its own forward, so
            BatchNorm normalises each distribution with its own statistics. The trunk may implement
            the hooks of `mtdl_fast.models`: task-aware (called as trunk(view_k, k)),
            `forward_views` (all K views in one call) and `regularization()` (added to the
            training loss, not to the per-task losses nor to the affinity).
        optimizer: holds the trunk's and heads' parameters (and the weighting's, if it has any).
        weighting: a `mtdl_fast.weighting.Weighting` (strategies in `mtdl_fast.research.weighting`);
            default: the plain sum of the task losses.
        loss_fn: loss(output, target) -> scalar mean; default cross-entropy.
        affinity_every: measure TAG affinity every this many steps (None: never).
        affinity_mode: "exact" or "first_order" (see AffinityTracker).
        affinity_lr: lookahead step size; default: preview the optimizer's own update rule.
        affinity_baseline: "tag" (TAG's Z, against the current parameters) or "shared_step" (against
            the step every source shares, u(0): isolates each task's own gradient from the momentum
            step); see AffinityTracker's `baseline`.
        affinity_seed: seeds the tracker's own generator (Dropout in the lookahead forwards).
        chunk_size, decay: passed to the AffinityTracker.
        skip_nonfinite: skip (and count) an optimizer step whose loss is not finite, leaving
            parameters, optimizer state and BatchNorm statistics as they were. This reads the loss
            on the host once per step; pass False for a step without host synchronisation.
        amp: mixed precision of the forward passes: None (off), "bf16" (autocast to bfloat16, on
            the CPU or CUDA) or "fp16" (autocast to float16 with a `torch.amp.GradScaler`, the
            `scaler` attribute: the loss is scaled for the backward, the gradients unscaled
            before the optimizer step, and a step whose gradients hold inf or NaN is skipped and
            counted in `skipped_steps`, as GradScaler skips it). Under fp16 an affinity step
            trains with its own scaled backward instead of reusing the tracker's (unscaled)
            per-task gradients; a group-update strategy takes "bf16" only.
        strategy: "joint" (one step on the weighted sum of the task losses) or a group-update
            strategy that steps the model itself on each batch, e.g.
            `mtdl_fast.research.stgu.SelectiveGroupUpdates(trunk, heads, optimizer)` (Selective
            Task Group Updates): an object with `step(views, targets) -> {"losses": (K,), "groups":
            ...}`, `state_dict()` and `load_state_dict()`. The weighting does not apply then.
        distributed: average gradients, losses and affinity over the ranks of torch.distributed's
            default process group; None (default): when one of more than one rank is initialised.
        ddp_kwargs: extra DistributedDataParallel arguments (e.g. {"bucket_cap_mb": 50}).
    """

    def __init__(
        self,
        tasks: DistributionTasks,
        trunk: nn.Module,
        heads: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        weighting: nn.Module | None = None,
        loss_fn: LossFn = F.cross_entropy,
        affinity_every: int | None = 10,
        affinity_mode: str = "exact",
        affinity_lr: float | None = None,
        affinity_baseline: str = "tag",
        affinity_seed: int = 0,
        chunk_size: int | str | None = "auto",
        decay: float | None = None,
        skip_nonfinite: bool = True,
        strategy: str | object = "joint",
        distributed: bool | None = None,
        ddp_kwargs: dict | None = None,
        amp: str | None = None,
    ):
        group_updates = None if isinstance(strategy, str) and strategy == "joint" else strategy
        if group_updates is not None and not all(hasattr(group_updates, a) for a in _GROUP_UPDATE_API):
            raise ValueError(f"strategy must be 'joint' or an object with {', '.join(_GROUP_UPDATE_API)} "
                             f"(e.g. mtdl_fast.research.stgu.SelectiveGroupUpdates), got {strategy!r}")
        check_trunk(trunk)
        heads = nn.ModuleList(heads) if not isinstance(heads, nn.ModuleList) else heads
        if len(heads) != len(tasks):
            raise ValueError(f"heads has {len(heads)} modules but tasks defines {len(tasks)} distributions")
        if affinity_every is not None and (not isinstance(affinity_every, int) or affinity_every < 1):
            raise ValueError(f"affinity_every must be a positive int or None, got {affinity_every!r}")
        if affinity_every is not None and affinity_lr is None:
            check_optimizer(optimizer)  # its message names the ways out (affinity_lr=, affinity_every=None)
        self.amp = _check_amp(amp, group_updates)
        self.tasks, self.trunk, self.heads, self.optimizer = tasks, trunk, heads, optimizer
        device = _model_device(trunk, heads)
        self._device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        self._scale = None if self.scaler is None else self.scaler.get_scale()  # host copy: no read per step
        self.weighting = weighting if weighting is not None else Sum(len(tasks))
        if getattr(self.weighting, "num_tasks", len(tasks)) != len(tasks):
            raise ValueError(f"weighting is for {self.weighting.num_tasks} tasks, tasks defines {len(tasks)}")
        self.affinity_every = affinity_every
        self.skip_nonfinite = skip_nonfinite
        self.distributed = dist_utils.is_distributed() if distributed is None else bool(distributed)
        if self.distributed and group_updates is not None:
            raise ValueError("a group-update strategy runs in one process; "
                             "use strategy='joint' under torch.distributed")
        if group_updates is not None and hasattr(trunk, "regularization"):
            raise ValueError(f"a group-update strategy trains without the trunk's regularization(); "
                             f"use strategy='joint' with {type(trunk).__name__}")
        self._loss_module = _StepLoss(trunk, heads, self.weighting, loss_fn, self.autocast)
        self._forward: nn.Module = self._loss_module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self._forward = DistributedDataParallel(self._loss_module, device_ids=ids, **(ddp_kwargs or {}))
        self.tracker = None
        if affinity_every is not None:
            self.tracker = AffinityTracker(
                trunk, heads, lr=affinity_lr, mode=affinity_mode,
                optimizer=optimizer if affinity_lr is None else None, chunk_size=chunk_size, decay=decay,
                distributed=self.distributed, baseline=affinity_baseline, seed=affinity_seed,
            )
        self.group_updates = group_updates
        self._snapshot = _BufferSnapshot((trunk, heads))
        self.step_count = 0
        self.skipped_steps = 0

    @property
    def loss_fn(self) -> LossFn:
        """loss(output, target) -> scalar mean, of the training step and the affinity alike."""
        return self._loss_module.loss_fn

    @loss_fn.setter
    def loss_fn(self, value: LossFn) -> None:
        self._loss_module.loss_fn = value

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of the engine's forward passes: torch.autocast to the `amp` dtype on the
        model's device, or a no-op context without amp (an outer autocast then stays in force).
        Use it to evaluate the trained model in the precision it trained in."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=AMP_DTYPES[self.amp])

    # ------------------------------------------------------------- the pieces
    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (K, B, C, H, W) views, fresh per-image parameters."""
        return self.tasks(x)

    def task_losses(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) losses, head k on trunk(views[k]), each view its own forward (with autograd, under
        `autocast()`), and the detached trunk features (K, B, D) (SVD reweighting reads them);
        both at least float32. This process's shard only: no gradient or loss is averaged over
        ranks here."""
        return self._loss_module.task_losses(views, targets)

    def track_now(self) -> bool:
        """Whether the next `step` measures affinity."""
        return self.tracker is not None and self.step_count % self.affinity_every == 0

    # ------------------------------------------------------------- one step
    def step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One training step on batch `x` (B, C, H, W) with labels `targets` (B,) or (K, B).

        Returns:
            (loss, info): the weighted training loss (detached) and {"losses": (K,), "weights":
            (K,), "affinity": this step's Z (K, K) or None, "skipped": bool or None}.
        """
        with record_function("augment"):
            views = self.augment(x)
        return self.step_views(views, targets)

    def step_views(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """`step` on precomputed views (K, B, ...)."""
        track = self.track_now()
        self.step_count += 1
        if self.group_updates is not None:
            return self._group_step(views, targets, track)
        if track and getattr(self.weighting, "linear", False) and self.scaler is None:
            return self._tracked_step(views, targets)
        with record_function("affinity"), self.autocast():
            z = self.tracker.step(views, targets, self.loss_fn) if track else None
        return self._joint_step(views, targets, z)

    def _joint_step(self, views: torch.Tensor, targets: torch.Tensor, z: torch.Tensor | None):
        """Forward, backward of the weighted loss, optimizer step (or a skip that undoes the forward)."""
        saved = self._save_buffers()
        with record_function("forward"):
            total, losses, _ = self._forward(views, targets)
        seen_total, seen_losses = self._global(total.detach(), losses.detach())
        skipped = self._skip(seen_total)
        if not skipped:
            self.optimizer.zero_grad(set_to_none=True)
            with record_function("backward"):
                (total if self.scaler is None else self.scaler.scale(total)).backward()
            with record_function("optimizer"):
                skipped = self._optimizer_step(skipped)
            if not skipped:
                self.weighting.step_end(seen_losses)
        if skipped:
            saved.restore()  # the forward moved BatchNorm's running statistics
        weights = self.weighting.last_weights  # the weights this step used (a sampler draws once)
        return seen_total, {"losses": seen_losses, "weights": weights, "affinity": z, "skipped": skipped}

    def _group_step(self, views: torch.Tensor, targets: torch.Tensor, track: bool):
        """The group-update strategy steps the model itself (amp: bf16 only, no loss scaling)."""
        with record_function("affinity"), self.autocast():
            z = self.tracker.step(views, targets, self.loss_fn) if track else None
        with self.autocast():
            out = self.group_updates.step(views, targets)
        losses = out["losses"].detach()
        return losses.sum(), {"losses": losses, "weights": None, "affinity": z, "skipped": None,
                              "groups": out["groups"]}

    def _tracked_step(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Affinity step whose per-task gradients also train: tracker, then sum_k w_k g_k (plus
        the trunk's regularization, backpropagated on its own)."""
        with record_function("affinity"), self.autocast():
            z = self.tracker.step(views, targets, self.loss_fn)
        losses = _at_least_float32(self.tracker.last_losses)
        weights = self.weighting.weights(losses)
        total = (weights.to(losses.dtype) * losses).sum()
        penalty = trunk_regularization(self.trunk)
        if penalty is not None:
            total = total + penalty.detach().to(total.dtype)
        skipped = self._skip(total)
        if not skipped:
            self._update_running_stats(views)
            self.optimizer.zero_grad(set_to_none=True)
            # sum_k w_k g_k in the gradients' own precision, even inside a caller's autocast
            with torch.autocast(self._device_type, enabled=False):
                self.tracker.apply_gradients(weights)
            if penalty is not None:
                penalty.backward()  # accumulates onto the tasks' gradients
            with record_function("optimizer"):
                self.optimizer.step()
            self.weighting.step_end(losses)
        return total, {"losses": losses, "weights": weights, "affinity": z, "skipped": skipped}

    def _global(self, total: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's loss and per-task losses: the same on every rank, so every rank
        skips (or not) alike and stateful weightings see the same values."""
        if not self.distributed:
            return total, losses
        seen = torch.cat([total.reshape(1), losses])
        dist_utils.all_reduce_mean_([seen])
        return seen[0], seen[1:]

    def _optimizer_step(self, skipped: bool | None) -> bool | None:
        """The optimizer step; returns `skipped`, or with a GradScaler its verdict: it unscales
        the gradients, steps unless one is inf or NaN, and updates the scale, which drops exactly
        when it skipped (a skip counted in skipped_steps)."""
        if self.scaler is None:
            self.optimizer.step()
            return skipped
        self.scaler.step(self.optimizer)
        self.scaler.update()
        scale, self._scale = self._scale, self.scaler.get_scale()
        skipped = self._scale < scale
        self.skipped_steps += int(skipped)
        return skipped

    def _update_running_stats(self, views: torch.Tensor) -> None:
        # The tracker's functional forward leaves BatchNorm running statistics alone; a normal
        # step's forward (same parameters, before the update) would have moved them.
        modules = [self.trunk, *self.heads]
        if not any(m.training and _has_batch_norm(m) for m in modules):
            return
        with torch.no_grad(), self.autocast():
            features = view_features(self.trunk, views)
            for k, head in enumerate(self.heads):
                head(features[k])

    def _save_buffers(self) -> _BufferSnapshot | None:
        """The model's buffers before a step that may be skipped (a GradScaler may skip any)."""
        if not self.skip_nonfinite and self.scaler is None:
            return None
        self._snapshot.save()
        return self._snapshot

    def _skip(self, total: torch.Tensor) -> bool | None:
        """Whether to skip this step for a non-finite loss (one host read); None when not checked."""
        if not self.skip_nonfinite:
            return None
        if math.isfinite(total.item()):  # the read itself, not isfinite's device ops first
            return False
        self.skipped_steps += 1
        return True

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: model, optimizer, weighting,
        augmentation RNG, affinity statistics, the fp16 loss scale and counters."""
        return {
            "trunk": self.trunk.state_dict(),
            "heads": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weighting": self.weighting.state_dict(),
            "tasks": self.tasks.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "group_updates": None if self.group_updates is None else self.group_updates.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.trunk.load_state_dict(state["trunk"])
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weighting.load_state_dict(state["weighting"])
        self.tasks.load_state_dict(state["tasks"])
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        if self.group_updates is not None and state.get("group_updates") is not None:
            self.group_updates.load_state_dict(state["group_updates"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
            self._scale = self.scaler.get_scale()
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])


class _StepLoss(nn.Module):
    """Trunk, heads and weighting as one module returning (total, losses (K,), features), so that
    DistributedDataParallel sees every trainable parameter of a step in one forward and averages
    all their gradients in its one backward. `autocast` gives the context of the forward passes;
    the weighting and the trunk's regularization run outside it, on float32 (or wider) values."""

    def __init__(self, trunk: nn.Module, heads: nn.ModuleList, weighting: nn.Module, loss_fn: LossFn,
                 autocast):
        super().__init__()
        self.trunk, self.heads, self.weighting = trunk, heads, weighting
        self.loss_fn = loss_fn
        self.autocast = autocast

    def task_losses(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_task = targets.ndim >= 2 and targets.shape[0] == len(self.heads)
        with self.autocast():
            features = view_features(self.trunk, views)
            losses = torch.stack([self.loss_fn(head(features[k]), targets[k] if per_task else targets)
                                  for k, head in enumerate(self.heads)])
        with torch.no_grad():  # detached without a per-view detach
            stacked = features if isinstance(features, torch.Tensor) else torch.stack(features)
            stacked = stacked.flatten(2)
        return _at_least_float32(losses), _at_least_float32(stacked)

    def forward(self, views: torch.Tensor, targets: torch.Tensor):
        losses, features = self.task_losses(views, targets)
        total = self.weighting(losses, features=features, targets=targets)
        penalty = trunk_regularization(self.trunk)
        if penalty is not None:
            total = total + penalty.to(total.dtype)
        return total, losses, features


class _BufferSnapshot:
    """A copy of modules' buffers (BatchNorm's running statistics) that a skipped step restores:
    one foreach copy each way, into storage kept across steps (re-made when the buffers change)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = modules
        self.buffers: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []

    @torch.no_grad()
    def save(self) -> None:
        self.buffers = [b for module in self.modules for b in module.buffers()]
        if [_layout(b) for b in self.buffers] != [_layout(c) for c in self.copies]:
            self.copies = [torch.empty_like(b) for b in self.buffers]
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    @torch.no_grad()
    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copies)


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.device


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_amp(amp: str | None, group_updates: object | None) -> str | None:
    if amp is None:
        return None
    if not isinstance(amp, str):
        raise TypeError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {type(amp).__name__}")
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
    if amp == "fp16" and group_updates is not None:
        raise ValueError("amp='fp16' needs loss scaling, which a group-update strategy does not do: "
                         "use amp='bf16' or strategy='joint'")
    return amp


def _model_device(trunk: nn.Module, heads: nn.ModuleList) -> torch.device:
    for p in (*trunk.parameters(), *heads.parameters()):
        return p.device
    raise ValueError("the trunk and heads have no parameters to train")
