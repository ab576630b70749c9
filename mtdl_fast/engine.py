"""MTDLEngine: one Multi-Task Distribution Learning step, usable whole or piece by piece.

    augment (K views, one fused launch on CUDA) -> per-view forward -> per-task losses (K,)
    -> weighting -> backward -> optimizer step; every `affinity_every` steps the TAG affinity is
    measured, and its per-task gradients are reused as the training gradient (no second backward).

Under torch.distributed (more than one rank) each rank steps on its shard of the global batch:
the forward runs through DistributedDataParallel, which averages the gradients in the backward,
and an affinity step averages the per-task gradients and lookahead losses (see
`mtdl_fast.distributed`), so every rank takes the step a single process would take on the global
batch (BatchNorm statistics stay per rank, as under DDP).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mtdl_fast import distributed as dist_utils
from mtdl_fast.affinity import AffinityTracker, _has_batch_norm
from mtdl_fast.lookahead import LossFn
from mtdl_fast.tasks import DistributionTasks
from mtdl_fast.weighting import Sum

_GROUP_UPDATE_API = ("step", "state_dict", "load_state_dict")


class MTDLEngine:
    """Trains a shared trunk and K heads on K distribution tasks of each batch.

    Args:
        tasks: the K distribution tasks (views of each batch).
        trunk, heads: the model; head k reads trunk(view_k). Each view is its own forward, so
            BatchNorm normalises each distribution with its own statistics.
        optimizer: holds the trunk's and heads' parameters (and the weighting's, if it has any).
        weighting: a `mtdl_fast.research.weighting.Weighting`; default: the plain sum of the task losses.
        loss_fn: loss(output, target) -> scalar mean; default cross-entropy.
        affinity_every: measure TAG affinity every this many steps (None: never).
        affinity_mode: "exact" or "first_order" (see AffinityTracker).
        affinity_lr: lookahead step size; default: preview the optimizer's own update rule.
        chunk_size, decay: passed to the AffinityTracker.
        skip_nonfinite: skip (and count) an optimizer step whose loss is not finite. This reads the
            loss on the host once per step; pass False for a step without host synchronisation.
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
        chunk_size: int | str | None = "auto",
        decay: float | None = None,
        skip_nonfinite: bool = True,
        strategy: str | object = "joint",
        distributed: bool | None = None,
        ddp_kwargs: dict | None = None,
    ):
        group_updates = None if isinstance(strategy, str) and strategy == "joint" else strategy
        if group_updates is not None and not all(hasattr(group_updates, a) for a in _GROUP_UPDATE_API):
            raise ValueError(f"strategy must be 'joint' or an object with {', '.join(_GROUP_UPDATE_API)} "
                             f"(e.g. mtdl_fast.research.stgu.SelectiveGroupUpdates), got {strategy!r}")
        heads = nn.ModuleList(heads) if not isinstance(heads, nn.ModuleList) else heads
        if len(heads) != len(tasks):
            raise ValueError(f"heads has {len(heads)} modules but tasks defines {len(tasks)} distributions")
        if affinity_every is not None and (not isinstance(affinity_every, int) or affinity_every < 1):
            raise ValueError(f"affinity_every must be a positive int or None, got {affinity_every!r}")
        self.tasks, self.trunk, self.heads, self.optimizer = tasks, trunk, heads, optimizer
        self.weighting = weighting if weighting is not None else Sum(len(tasks))
        if getattr(self.weighting, "num_tasks", len(tasks)) != len(tasks):
            raise ValueError(f"weighting is for {self.weighting.num_tasks} tasks, tasks defines {len(tasks)}")
        self.affinity_every = affinity_every
        self.skip_nonfinite = skip_nonfinite
        self.distributed = dist_utils.is_distributed() if distributed is None else bool(distributed)
        if self.distributed and group_updates is not None:
            raise ValueError("a group-update strategy runs in one process; "
                             "use strategy='joint' under torch.distributed")
        self._loss_module = _StepLoss(trunk, heads, self.weighting, loss_fn)
        self._forward: nn.Module = self._loss_module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device = next(trunk.parameters()).device
            ids = [device.index] if device.type == "cuda" else None
            self._forward = DistributedDataParallel(self._loss_module, device_ids=ids, **(ddp_kwargs or {}))
        self.tracker = None
        if affinity_every is not None:
            self.tracker = AffinityTracker(
                trunk, heads, lr=affinity_lr, mode=affinity_mode,
                optimizer=optimizer if affinity_lr is None else None, chunk_size=chunk_size, decay=decay,
                distributed=self.distributed,
            )
        self.group_updates = group_updates
        self.step_count = 0
        self.skipped_steps = 0

    @property
    def loss_fn(self) -> LossFn:
        """loss(output, target) -> scalar mean, of the training step and the affinity alike."""
        return self._loss_module.loss_fn

    @loss_fn.setter
    def loss_fn(self, value: LossFn) -> None:
        self._loss_module.loss_fn = value

    # ------------------------------------------------------------- the pieces
    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (K, B, C, H, W) views, fresh per-image parameters."""
        return self.tasks(x)

    def task_losses(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) losses, head k on trunk(views[k]), each view its own forward (with autograd), and
        the detached trunk features (K, B, D) (SVD reweighting reads them). This process's
        shard only: no gradient or loss is averaged over ranks here."""
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
            with record_function("affinity"):
                z = self.tracker.step(views, targets, self.loss_fn) if track else None
            out = self.group_updates.step(views, targets)
            losses = out["losses"].detach()
            info = {"losses": losses, "weights": None, "affinity": z, "skipped": None, "groups": out["groups"]}
            return losses.sum(), info
        if track and getattr(self.weighting, "linear", False):
            return self._tracked_step(views, targets)
        with record_function("affinity"):
            z = self.tracker.step(views, targets, self.loss_fn) if track else None
        saved = self._save_buffers()
        with record_function("forward"):
            total, losses, _ = self._forward(views, targets)
        # The global batch's losses: the same on every rank, so every rank skips (or not) alike
        # and stateful weightings see the same values.
        seen = torch.cat([total.detach().reshape(1), losses.detach()])
        if self.distributed:
            dist_utils.all_reduce_mean_([seen])
        seen_total, seen_losses = seen[0], seen[1:]
        skipped = self._skip(seen_total)
        if skipped:
            self._restore_buffers(saved)  # the forward moved BatchNorm's running statistics
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with record_function("backward"):
                total.backward()
            with record_function("optimizer"):
                self.optimizer.step()
            self.weighting.step_end(seen_losses)
        weights = self.weighting.last_weights  # the weights this step used (a sampler draws once)
        return seen_total, {"losses": seen_losses, "weights": weights, "affinity": z, "skipped": skipped}

    def _tracked_step(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Affinity step whose per-task gradients also train: tracker, then sum_k w_k g_k."""
        with record_function("affinity"):
            z = self.tracker.step(views, targets, self.loss_fn)
        losses = self.tracker.last_losses
        weights = self.weighting.weights(losses)
        total = (weights.to(losses.dtype) * losses).sum()
        skipped = self._skip(total)
        if not skipped:
            self._update_running_stats(views)
            self.optimizer.zero_grad(set_to_none=True)
            self.tracker.apply_gradients(weights)
            with record_function("optimizer"):
                self.optimizer.step()
            self.weighting.step_end(losses)
        return total, {"losses": losses, "weights": weights, "affinity": z, "skipped": skipped}

    def _update_running_stats(self, views: torch.Tensor) -> None:
        # The tracker's functional forward leaves BatchNorm running statistics alone; a normal
        # step's forward (same parameters, before the update) would have moved them.
        modules = [self.trunk, *self.heads]
        if not any(m.training and _has_batch_norm(m) for m in modules):
            return
        with torch.no_grad():
            for k, head in enumerate(self.heads):
                head(self.trunk(views[k]))

    def _save_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) of the model's buffers, for a step that may be skipped."""
        if not self.skip_nonfinite:
            return []
        return [(b, b.detach().clone()) for module in (self.trunk, self.heads) for b in module.buffers()]

    @staticmethod
    @torch.no_grad()
    def _restore_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for buffer, copy in saved:
            buffer.copy_(copy)

    def _skip(self, total: torch.Tensor) -> bool | None:
        if not self.skip_nonfinite:
            return None
        if bool(torch.isfinite(total)):
            return False
        self.skipped_steps += 1
        return True

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: model, optimizer, weighting,
        augmentation RNG, affinity statistics and counters."""
        return {
            "trunk": self.trunk.state_dict(),
            "heads": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weighting": self.weighting.state_dict(),
            "tasks": self.tasks.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "group_updates": None if self.group_updates is None else self.group_updates.state_dict(),
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
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])


class _StepLoss(nn.Module):
    """Trunk, heads and weighting as one module returning (total, losses (K,), features), so that
    DistributedDataParallel sees every trainable parameter of a step in one forward and averages
    all their gradients in its one backward."""

    def __init__(self, trunk: nn.Module, heads: nn.ModuleList, weighting: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.trunk, self.heads, self.weighting = trunk, heads, weighting
        self.loss_fn = loss_fn

    def task_losses(self, views: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_task = targets.ndim >= 2 and targets.shape[0] == len(self.heads)
        losses, features = [], []
        for k, head in enumerate(self.heads):
            feats = self.trunk(views[k])
            losses.append(self.loss_fn(head(feats), targets[k] if per_task else targets))
            features.append(feats.detach().flatten(1))
        return torch.stack(losses), torch.stack(features)

    def forward(self, views: torch.Tensor, targets: torch.Tensor):
        losses, features = self.task_losses(views, targets)
        return self.weighting(losses, features=features, targets=targets), losses, features
