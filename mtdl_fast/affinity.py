"""AffinityTracker: TAG inter-task affinity, batched with torch.func, with its uncertainty.

One exact affinity step costs one batched backward (vmap of grad over the K tasks: every task's
gradient of the shared parameters, and of its own head) and one batched lookahead evaluation (vmap
over the K lookahead parameter sets and, inside, over the K task views), chunked to bound memory.
The plain loop in `mtdl_fast.lookahead.naive_affinity` defines the result.

Semantics kept from the loop: task j's loss is head j on trunk(view_j) alone, so BatchNorm in train
mode normalises each view with its own batch statistics (a BatchNorm-free functional copy of the
trunk does this under vmap); the model's parameters, buffers and .grad are never touched.

Statistics: per entry, the running mean and variance of the per-step Z over the tracked steps
(`mtdl_fast.reductions.affinity_moments`, in C++/CUDA), hence `affinity`, `affinity_stderr` and
`affinity_count`; and the last `history_size` per-step matrices (`history`), which
`mtdl_fast.grouping.bootstrap_groups` resamples to measure how stable a grouping is.
"""
from __future__ import annotations

import copy
import random
import warnings
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, stack_module_state, vmap
from torch.profiler import record_function

from mtdl_fast import distributed as dist_utils
from mtdl_fast import reductions
from mtdl_fast.lookahead import (
    LossFn,
    check_baseline,
    check_optimizer,
    fixed_randomness,
    is_task_aware,
    naive_affinity,
    preview_update,
    task_parameter_names,
)

_MODES = ("exact", "first_order")
STATE_VERSION = 2  # state_dict layout: moments, history and generator (1: running sums only)


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _batch_stat_copy(module: nn.Module) -> nn.Module:
    """A weightless (meta) copy whose BatchNorm layers use batch statistics only and update
    nothing, so it runs under vmap; every tensor it uses is passed in by functional_call."""
    clone = copy.deepcopy(module).to("meta")
    replace_all_batch_norm_modules_(clone)
    return clone


class _Functional:
    """The trunk and the stacked heads as pure functions of their parameters."""

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module], loss_fn: LossFn):
        self.trunk_module = trunk
        self.loss_fn = loss_fn
        self.num_tasks = len(heads)
        self.task_aware = is_task_aware(trunk)
        per_task = task_parameter_names(trunk)
        named = list(trunk.named_parameters())
        self.trainable = [n for n, p in named if p.requires_grad and n not in per_task]
        self.task_trainable = [n for n, p in named if p.requires_grad and n in per_task]
        self.head_trainable = {n for n, p in heads[0].named_parameters() if p.requires_grad}
        self.head_template = copy.deepcopy(heads[0]).to("meta")
        self._bn_copy: nn.Module | None = None
        self._bn_head: nn.Module | None = None
        last = self.head_template[-1] if isinstance(self.head_template, nn.Sequential) else self.head_template
        # Split off the final nn.Linear so the lookahead can fuse it with the cross-entropy.
        self.final_prefix = None
        if isinstance(last, nn.Linear):
            if isinstance(self.head_template, nn.Sequential):
                self.final_prefix = f"{len(self.head_template) - 1}."
                self.head_body: nn.Module | None = nn.Sequential(*list(self.head_template)[:-1])
            else:
                self.final_prefix = ""
                self.head_body = None

    def trunk(self) -> nn.Module:
        if self.trunk_module.training and _has_batch_norm(self.trunk_module):
            if self._bn_copy is None:
                self._bn_copy = _batch_stat_copy(self.trunk_module)
            return self._bn_copy.train()
        return self.trunk_module

    def head(self, training: bool) -> nn.Module:
        if training and _has_batch_norm(self.head_template):
            if self._bn_head is None:
                self._bn_head = _batch_stat_copy(self.head_template)
            return self._bn_head.train()
        return self.head_template.train(training)

    def task_indices(self, device: torch.device) -> tuple[torch.Tensor | None, int | None]:
        """(the K task indices, their batch dim) for a task-aware trunk; (None, None) otherwise."""
        if not self.task_aware:
            return None, None
        return torch.arange(self.num_tasks, device=device), 0

    def call_trunk(self, trunk: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                   task: torch.Tensor | None) -> torch.Tensor:
        """trunk(x) with `params`; a task-aware trunk also gets the task (a 0-dim int64 tensor)."""
        return functional_call(trunk, params, (x, task) if self.task_aware else (x,))

    def shared_params(self) -> dict[str, torch.Tensor]:
        named = dict(self.trunk_module.named_parameters())
        return {n: named[n].detach() for n in self.trainable}

    def task_params(self) -> dict[str, torch.Tensor]:
        """A task-aware trunk's trainable per-task parameters (empty for other trunks)."""
        named = dict(self.trunk_module.named_parameters())
        return {n: named[n].detach() for n in self.task_trainable}

    def constants(self, trunk: nn.Module) -> dict[str, torch.Tensor]:
        """The original's frozen parameters, and its buffers that the called trunk still has."""
        frozen = {n: p.detach() for n, p in self.trunk_module.named_parameters() if not p.requires_grad}
        buffers = dict(self.trunk_module.named_buffers())
        return {**frozen, **{n: buffers[n] for n, _ in trunk.named_buffers()}}


class AffinityTracker:
    """Running TAG affinity between K tasks that share a trunk, with its standard error.

    Args:
        trunk: the trunk (an nn.Module); its trainable parameters are the shared parameters.
            A task-aware trunk (``task_aware = True``) is called as ``trunk(view_k, k)`` and its
            ``task_parameter_names()`` are per-task parameters: per-task gradients, held fixed in
            the lookahead (see `mtdl_fast.lookahead`). (`shared=` is the trunk's former keyword,
            still accepted with a FutureWarning.)
        heads: K task heads (same architecture; head j maps trunk(view_j) to task j's output).
        lr: lookahead step size (plain SGD). With `optimizer`, None means the optimizer's own lr.
        mode: "exact" (TAG's lookahead losses) or "first_order" (Z[i, j] ~= lr <g_i, g_j> / L_j
            from the Gram matrix of per-task gradients).
        every: compute on every `every`-th call of `step` (others return None).
        optimizer: preview this SGD/Adam/AdamW optimizer's real update (momentum, weight decay,
            moment estimates) without changing its state.
        chunk_size: lookahead sources evaluated in one batched call. "auto" (default): on CUDA
            as many sources as fit the memory budget, fewer target views per call when even one
            source does not; on the CPU a plain loop over (source, target) pairs, the fastest
            measured there (the per-task gradients are a loop over tasks there too). An int: that
            many sources per call, their K targets batched; None: all sources at once. Whatever
            the choice, an out-of-memory error halves the work per call and retries (the per-task
            gradients' batch over tasks likewise); the smaller size is kept.
        memory_budget: bytes a lookahead call may use for activations, the "auto" chunk's bound;
            default: half the device's free memory on CUDA, unbounded on the CPU.
        decay: None: `affinity` is the mean of the per-step Z over the tracked steps. A float d in
            (0, 1): the exponentially weighted mean, step t of n weighing d^(n - t) (an EMA,
            affinity ~ d * affinity + (1 - d) * Z, without the bias of its first value).
        fused_ce: fuse the heads' final Linear with cross-entropy in a Triton kernel (default: on
            CUDA when the heads end in nn.Linear and loss_fn is cross_entropy).
        distributed: each rank passes its shard of the batch; the per-task gradients, base losses
            and lookahead losses are averaged over the ranks of torch.distributed's default group,
            so every rank measures the global batch's Z and folds identical statistics (loss_fn
            must be a mean and the shards of equal size). None (default): when one of more than
            one rank is initialised.
        baseline: "tag" (default): TAG's ``Z[i, j] = 1 - L_j(theta + u(g_i)) / L_j(theta)``, u the
            previewed update. "shared_step": ``1 - L_j(theta + u(g_i)) / L_j(theta + u(0))``, each
            source against the step every source shares (momentum, weight decay): K extra target
            evaluations; the same as "tag" for plain SGD. Exact mode only.
        seed: seeds the tracker's own random generator (see Randomness).
        history_size: how many per-step Z matrices `history` keeps (the most recent ones).

    Randomness: the tracker never draws from, or advances, the global random streams. Each exact
    step draws one seed from the tracker's generator (saved in state_dict), and every forward of
    the step -- the base losses and all lookahead losses, for every target -- starts from that
    seed. With Dropout in the model, base and lookahead evaluations of a target therefore use the
    same masks (so do all targets, whose views have the same shape), and Z measures the parameter
    change, not the difference between two mask draws; the masks change from step to step, so the
    average over steps still averages over Dropout. Two trackers with the same seed, device and
    thread count measure bit-identical Z.
    """

    def __init__(
        self,
        trunk: nn.Module | None = None,
        heads: Sequence[nn.Module] | None = None,
        lr: float | None = None,
        mode: str = "exact",
        every: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        chunk_size: int | str | None = "auto",
        decay: float | None = None,
        fused_ce: bool | None = None,
        distributed: bool | None = None,
        memory_budget: int | None = None,
        *,
        baseline: str = "tag",
        seed: int = 0,
        history_size: int = 1000,
        shared: nn.Module | None = None,
    ):
        if shared is not None:
            if trunk is not None:
                raise TypeError("pass the trunk once: trunk= (shared= is its former name)")
            warnings.warn("AffinityTracker(shared=...) is now AffinityTracker(trunk=...)", FutureWarning, stacklevel=2)
            trunk = shared
        if heads is None:
            raise TypeError("AffinityTracker needs heads: a sequence of K nn.Module")
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        heads = list(heads)
        if len(heads) < 1 or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError("heads must be a non-empty sequence of nn.Module")
        for k, head in enumerate(heads):
            if not any(p.requires_grad for p in head.parameters()):
                raise ValueError(f"heads[{k}] has no trainable parameters")
        per_task = task_parameter_names(trunk)
        if not any(p.requires_grad for n, p in trunk.named_parameters() if n not in per_task):
            raise ValueError("trunk has no trainable shared parameters (a task-aware trunk's "
                             "task_parameter_names() may name them all): the lookahead has nothing to move")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if lr is None and optimizer is None:
            raise ValueError("lr is required when no optimizer is given")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if chunk_size not in (None, "auto") and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        if decay is not None and not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1) or None, got {decay}")
        if check_baseline(baseline) != "tag" and mode != "exact":
            raise ValueError(f"baseline={baseline!r} needs mode='exact', got mode={mode!r}")
        _check_int("seed", seed, minimum=0)
        _check_int("history_size", history_size, minimum=1)
        check_optimizer(optimizer)
        self.trunk, self.heads = trunk, heads
        self.lr, self.mode, self.every = lr, mode, every
        self.optimizer, self.chunk_size, self.decay = optimizer, chunk_size, decay
        self.memory_budget = memory_budget
        self.fused_ce = fused_ce
        self.baseline, self.history_size = baseline, history_size
        # Work per batched call, chosen at the first exact step and halved on out-of-memory:
        # (source, target) lookahead evaluations, and tasks per vmap(grad) call (None: all K).
        self.pairs_per_call: int | None = None
        self.grad_chunk: int | None = None
        self.num_tasks = len(heads)
        self._calls = 0
        self._attempted = 0
        self._functional: _Functional | None = None
        self._homogeneous = _same_architecture(heads)
        self.distributed = dist_utils.is_distributed() if distributed is None else bool(distributed)
        if self.distributed and not self._homogeneous:
            raise ValueError("distributed affinity needs heads of one architecture (the batched path)")
        if not self._homogeneous:
            warnings.warn("heads differ in architecture: AffinityTracker falls back to the plain loop", stacklevel=2)
        self._generator = random.Random(seed)  # draws on the host: no device work, no synchronisation
        self._step_seed: int | None = None
        self.last_losses: torch.Tensor | None = None
        self.last_task_grads: dict[str, dict[str, torch.Tensor]] | None = None
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def reset(self) -> None:
        """Forget every accumulated step (the random generator continues)."""
        k = self.num_tasks
        self._count = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        self._moments = torch.zeros(4, k, k, dtype=torch.float64, device=self.device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self._history: deque[torch.Tensor] = deque(maxlen=self.history_size)
        self._attempted = 0

    @property
    def affinity(self) -> torch.Tensor:
        """(K, K) float64: mean of Z[i, j] over the tracked steps (weighted with `decay`); NaN
        where nothing was accumulated yet."""
        mean = self._moments[0]
        return torch.where(self._count > 0, mean, torch.full_like(mean, float("nan")))

    @property
    def affinity_count(self) -> torch.Tensor:
        """(K, K) int64: the steps that entered each entry (valid Z observations)."""
        return self._count.clone()

    @property
    def affinity_n_eff(self) -> torch.Tensor:
        """(K, K) float64: effective number of steps, (sum w)^2 / sum w^2 (the count without
        decay; with decay d at most (1 + d) / (1 - d)); NaN where nothing was accumulated."""
        weight, weight_sq = self._moments[2], self._moments[3]
        return torch.where(self._count > 0, weight * weight / weight_sq, torch.full_like(weight, float("nan")))

    @property
    def affinity_stderr(self) -> torch.Tensor:
        """(K, K) float64: standard error of `affinity`, sqrt(var / n_eff), var the unbiased
        (reliability-weighted) variance of the per-step Z; NaN where fewer than 2 steps entered.

        Raises:
            ValueError: fewer than 2 tracked steps.
        """
        steps = self.steps
        if steps < 2:
            raise ValueError(f"affinity_stderr needs at least 2 tracked steps, got {steps}")
        _, m2, weight, weight_sq = self._moments
        variance = m2 / (weight - weight_sq / weight)
        stderr = torch.sqrt(variance * weight_sq / (weight * weight))
        return torch.where(self._count >= 2, stderr, torch.full_like(stderr, float("nan")))

    @property
    def history(self) -> torch.Tensor:
        """(n, K, K) float64: the per-step Z of the last `history_size` tracked steps, oldest
        first, less those with a non-finite entry (skipped steps, entries the reduction left
        out): the complete matrices `mtdl_fast.grouping.bootstrap_groups` resamples."""
        if not self._history:
            return torch.empty(0, self.num_tasks, self.num_tasks, dtype=torch.float64, device=self.device)
        steps = torch.stack(list(self._history))
        return steps[torch.isfinite(steps).flatten(1).all(1)]

    @property
    def skipped_steps(self) -> int:
        """Steps whose losses were not all finite: skipped, the statistics left unchanged. Reads
        a device counter (a host synchronisation on CUDA), so only when asked."""
        return int(self._skipped.item())

    @property
    def steps(self) -> int:
        """Affinity steps accumulated (computed and not skipped)."""
        return self._attempted - self.skipped_steps

    def state_dict(self) -> dict:
        history = (torch.stack(list(self._history)) if self._history
                   else torch.empty(0, self.num_tasks, self.num_tasks, dtype=torch.float64, device=self.device))
        return {
            "version": STATE_VERSION,
            "num_tasks": self.num_tasks,
            "decay": self.decay,
            "baseline": self.baseline,
            "count": self._count.clone(),
            "moments": self._moments.clone(),
            "skipped": self._skipped.clone(),
            "history": history,
            "generator": self._generator.getstate(),
            "attempted": self._attempted,
            "calls": self._calls,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict of this version. An older one (running sums only, no variance,
        history or generator) is refused with a ValueError: it cannot continue these statistics."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state_dict has version {state.get('version', 1)}, this AffinityTracker reads version "
                f"{STATE_VERSION}: older states hold running sums only (no variance, history or random "
                f"generator), from which the statistics cannot continue; start the affinity afresh"
            )
        for key, mine in (("num_tasks", self.num_tasks), ("decay", self.decay), ("baseline", self.baseline)):
            if state.get(key) != mine:
                raise ValueError(f"state_dict has {key}={state.get(key)!r}, this tracker has {key}={mine!r}")
        device = self.device
        self._count = state["count"].to(device=device, dtype=torch.int64).clone()
        self._moments = state["moments"].to(device=device, dtype=torch.float64).clone()
        self._skipped = state["skipped"].to(device=device, dtype=torch.int64).clone()
        history = state["history"].to(device=device, dtype=torch.float64)
        self._history = deque(history.unbind(0), maxlen=self.history_size)
        self._generator.setstate(state["generator"])
        self._attempted = int(state["attempted"])
        self._calls = int(state["calls"])

    # ------------------------------------------------------------------ step
    def step(
        self, views: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn = F.cross_entropy
    ) -> torch.Tensor | None:
        """Measure this step's affinity and fold it into the running statistics.

        Args:
            views: (K, B, ...) one input batch per task.
            targets: (B,) shared by every task or (K, B) per task.
            loss_fn: loss(output, target) -> scalar, the mean over the batch.

        Returns:
            This step's Z (K, K) float64 (NaN everywhere when the step was skipped), or None on
            calls that `every` skips.
        """
        self._calls += 1
        if (self._calls - 1) % self.every != 0:
            return None
        per_task = self._check(views, targets)
        self._step_seed = self._generator.getrandbits(63)
        if not self._homogeneous:
            _, base, lookahead = naive_affinity(
                self.trunk, self.heads, views, targets, self.lr, loss_fn, self.optimizer, per_task,
                baseline=self.baseline, seed=self._step_seed,
            )
        elif self.mode == "exact":
            base, lookahead = self._exact(views, targets, per_task, loss_fn)
        else:
            base, lookahead = self._first_order(views, targets, per_task, loss_fn)
        with record_function("reduction"):
            finite = torch.isfinite(base).all() & torch.isfinite(lookahead).all()
            base = torch.where(finite, base, torch.full_like(base, float("nan")))
            self._skipped += (~finite).to(torch.int64)
            self._attempted += 1
            z, _ = reductions.affinity_moments(base, lookahead, self._count, self._moments, self.decay)
            self._history.append(z.clone())  # the caller may modify the z it gets
        return z

    def _same_masks(self):
        """Context for one forward (or batched forward) of this step: starts from the step's seed."""
        return fixed_randomness(self.device, self._step_seed)

    def _check(self, views: torch.Tensor, targets: torch.Tensor) -> bool:
        if not isinstance(views, torch.Tensor) or views.ndim < 2:
            raise ValueError(f"views must be a (K, B, ...) tensor, got {getattr(views, 'shape', type(views))}")
        if views.shape[0] != self.num_tasks:
            raise ValueError(f"views has K={views.shape[0]} task views but there are {self.num_tasks} heads")
        batch = views.shape[1]
        if targets.shape[:1] == (batch,) and not (targets.ndim >= 2 and targets.shape[:2] == (self.num_tasks, batch)):
            return False
        if targets.ndim >= 2 and targets.shape[:2] == (self.num_tasks, batch):
            return True
        raise ValueError(
            f"targets must have shape (B,)=({batch},) or (K, B)=({self.num_tasks}, {batch}), got {tuple(targets.shape)}"
        )

    def _model(self, loss_fn: LossFn) -> _Functional:
        if self._functional is None or self._functional.loss_fn is not loss_fn:
            self._functional = _Functional(self.trunk, self.heads, loss_fn)
        return self._functional

    def _task_grads(self, views, targets, per_task, loss_fn):
        """Every task's loss and gradients (shared, per-task trunk and own head) in one batched backward."""
        fm = self._model(loss_fn)
        trunk = fm.trunk()
        head = fm.head(self.heads[0].training)
        consts = fm.constants(trunk)
        head_params, head_buffers = stack_module_state(self.heads)
        # Detached: stack_module_state's leaves require grad, which would keep an outer autograd
        # graph (and its activations) alive behind every per-task gradient.
        head_params = {n: p.detach() for n, p in head_params.items() if n in fm.head_trainable}
        # Buffers are constants (never differentiated: BatchNorm's step counter is an integer);
        # a batch-statistics head copy has no running statistics, so keep only what it holds.
        called = {n for n, _ in head.named_buffers()}
        head_buffers = {n: b for n, b in head_buffers.items() if n in called}
        head_state = {**head_params, **head_buffers}
        sp, tp = fm.shared_params(), fm.task_params()
        tasks, task_dim = fm.task_indices(views.device)

        def loss(sp_, tp_, hp_, hb_, x, y, task):
            out = functional_call(head, {**hb_, **hp_}, (fm.call_trunk(trunk, {**consts, **tp_, **sp_}, x, task),))
            return loss_fn(out, y)

        in_dims = (None, None, 0, 0, 0, 0 if per_task else None, task_dim)
        args = (sp, tp, head_params, head_buffers, views, targets, tasks)

        def run(chunk: int) -> tuple:
            self.grad_chunk = chunk
            return self._task_grad_call(grad_and_value(loss, argnums=(0, 1, 2)), in_dims, chunk, args)

        # CPU: a loop over the tasks (vmap's batching rules cost more there than they save).
        first = self.grad_chunk or (self.num_tasks if views.is_cuda else 1)
        grads, losses = _halving_on_oom(run, first, "tasks per gradient call", views.device)
        losses = losses.detach()
        if self.distributed:
            dist_utils.all_reduce_mean_([*(g for part in grads for g in part.values()), losses])
        shared_grads, task_grads, head_grads = grads
        self.last_losses = losses
        self.last_task_grads = {"shared": shared_grads, "task": task_grads, "heads": head_grads}
        fixed = {**consts, **tp}  # the lookahead moves the shared parameters only
        return fm, trunk, head, fixed, sp, head_state, shared_grads, losses

    def _task_grad_call(self, fn, in_dims: tuple, chunk: int, args: tuple):
        """fn over the tasks, `chunk` tasks per vmap call (the unit an out-of-memory retry halves);
        one task per call is a plain loop (no vmap at all). Every call starts from the step's seed."""
        k = self.num_tasks
        if chunk > 1:
            batched = vmap(fn, in_dims=in_dims, randomness="same")
            parts = []
            for block in zip(*(_blocks(a, d, chunk, k) for a, d in zip(args, in_dims))):
                with self._same_masks():
                    parts.append(batched(*block))
            return parts[0] if len(parts) == 1 else torch.utils._pytree.tree_map(lambda *x: torch.cat(x), *parts)
        outs = []
        for task in range(k):
            with self._same_masks():
                outs.append(fn(*(_take(a, d, task) for a, d in zip(args, in_dims))))
        return torch.utils._pytree.tree_map(lambda *leaves: torch.stack(leaves), *outs)

    def _exact(self, views, targets, per_task, loss_fn):
        fm, trunk, head, fixed, sp, head_state, shared_grads, base = self._task_grads(
            views, targets, per_task, loss_fn)
        names = list(sp)
        params = dict(self.trunk.named_parameters())  # the real tensors: the optimizer's state is keyed by them
        steps = [shared_grads[n] for n in names]
        if self.baseline == "shared_step":  # one more source: the zero gradient, i.e. the shared step u(0)
            steps = [torch.cat([g, torch.zeros_like(g[:1])]) for g in steps]
        new = preview_update([params[n] for n in names], steps, self.optimizer, self.lr)
        sources = dict(zip(names, new))
        y_dim = 0 if per_task else None
        tasks, task_dim = fm.task_indices(views.device)
        with torch.no_grad(), record_function("lookahead"):
            if self.pairs_per_call is None:
                self.pairs_per_call = self._initial_pairs(fm, trunk, head, fixed, sp, head_state, views)
            if self._use_fused_ce(fm, views, loss_fn):
                lookahead = self._lookahead_fused(fm, trunk, fixed, sources, head_state, views, targets, per_task)
            else:

                def loss(sp_, hp_, x, y, task):
                    out = functional_call(head, hp_, (fm.call_trunk(trunk, {**fixed, **sp_}, x, task),))
                    return loss_fn(out, y)

                lookahead = self._over_sources(loss, sources, (head_state, views, targets, tasks),
                                               (0, 0, y_dim, task_dim))
            if self.distributed:
                dist_utils.all_reduce_mean_([lookahead])
        if self.baseline == "shared_step":
            base, lookahead = lookahead[self.num_tasks], lookahead[: self.num_tasks]
        return base.to(torch.float64), lookahead.to(torch.float64)

    def _over_sources(self, fn, sources: dict[str, torch.Tensor], args: tuple, target_dims: tuple):
        """fn(params_i, *args_j) for every lookahead source i and target j, stacked (S, K, ...);
        args are batched over the K targets along `target_dims` (None: shared by every target).

        `pairs_per_call` (source, target) evaluations per call; an out-of-memory error halves it."""

        def run(pairs: int) -> torch.Tensor:
            self.pairs_per_call = pairs
            return self._lookahead_blocks(fn, sources, args, target_dims, pairs)

        device = next(iter(sources.values())).device
        return _halving_on_oom(run, self.pairs_per_call, "lookahead (source, target) pairs per call", device)

    def _lookahead_blocks(self, fn, sources, args: tuple, target_dims: tuple, pairs: int) -> torch.Tensor:
        """The lookahead losses with `pairs` (source, target) evaluations per call.

        With fewer than 2K pairs the sources run one after another, and inside each call the
        target views (all K, or blocks of `pairs`) are batched with *unbatched* weights: every
        layer folds the views into one large batch (one large convolution). Batching the sources
        too makes the weights batched, i.e. grouped convolutions: measured 3x slower on the CPU
        at K=10. One pair per call is a plain loop without vmap. Every call starts from the
        step's seed (randomness "same" inside vmap: one draw shared by the batch).
        """
        k = self.num_tasks
        n_sources = next(iter(sources.values())).shape[0]
        on_targets = vmap(fn, in_dims=(None, *target_dims), randomness="same")
        sources_per_call = min(n_sources, pairs // k)
        if sources_per_call > 1:
            on_sources = vmap(on_targets, in_dims=(0,) + (None,) * len(args), randomness="same")
            parts = []
            for chunk in _blocks(sources, 0, sources_per_call, n_sources):
                with self._same_masks():
                    parts.append(on_sources(chunk, *args))
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        block = min(k, pairs)
        rows = []
        for i in range(n_sources):
            params = {n: t[i] for n, t in sources.items()}
            if block == 1:
                row = []
                for j in range(k):
                    with self._same_masks():
                        row.append(fn(params, *(_take(a, d, j) for a, d in zip(args, target_dims))))
                rows.append(torch.stack(row))
                continue
            parts = []
            for j in range(0, k, block):
                with self._same_masks():
                    targets = (_take(a, d, slice(j, j + block)) for a, d in zip(args, target_dims))
                    parts.append(on_targets(params, *targets))
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return torch.stack(rows)

    def _initial_pairs(self, fm, trunk, head, fixed, sp, head_state, views) -> int:
        """(source, target) pairs per lookahead call before any out-of-memory retry."""
        k = self.num_tasks
        if self.chunk_size is None:
            return k * (k + (self.baseline == "shared_step"))  # every source, the shared step's included
        if isinstance(self.chunk_size, int):
            return k * self.chunk_size
        preferred = _preferred_pairs(k, views.device)  # a budget can only lower it
        budget = self.memory_budget
        if budget is None and views.is_cuda:
            budget = torch.cuda.mem_get_info(views.device)[0] // 2
        if budget is None:
            return preferred
        with self._same_masks():
            per_pair = _activation_bytes(fm, trunk, head, fixed, sp, head_state, views[0])
        per_pair += sum(t.nbytes for t in sp.values()) // k  # a batched source's own weights
        return int(min(preferred, max(1, budget // max(per_pair, 1))))

    def _use_fused_ce(self, fm: _Functional, views: torch.Tensor, loss_fn: LossFn) -> bool:
        applicable = fm.final_prefix is not None and loss_fn is F.cross_entropy
        if self.fused_ce is None:
            return applicable and views.is_cuda
        if self.fused_ce and not applicable:
            raise ValueError("fused_ce=True needs heads ending in nn.Linear and loss_fn=F.cross_entropy")
        return self.fused_ce

    def _lookahead_fused(self, fm, trunk, fixed, sources, head_state, views, targets, per_task):
        from mtdl_fast.kernels.lookahead_ce import lookahead_cross_entropy

        prefix = fm.final_prefix
        body_state = {n: t for n, t in head_state.items() if not n.startswith(prefix)} if prefix else {}

        def features(sp_, hp_, x, task):
            f = fm.call_trunk(trunk, {**fixed, **sp_}, x, task)
            return functional_call(fm.head_body, hp_, (f,)) if fm.head_body is not None else f

        tasks, task_dim = fm.task_indices(views.device)
        feats = self._over_sources(features, sources, (body_state, views, tasks), (0, 0, task_dim))
        weight = head_state[f"{prefix}weight"]
        bias = head_state.get(f"{prefix}bias")
        tgt = targets if per_task else targets.expand(self.num_tasks, *targets.shape)
        return lookahead_cross_entropy(feats.flatten(3) if feats.ndim > 4 else feats, weight, bias, tgt)

    def _first_order(self, views, targets, per_task, loss_fn):
        *_, shared_grads, base = self._task_grads(views, targets, per_task, loss_fn)
        flat = torch.cat([g.reshape(self.num_tasks, -1) for g in shared_grads.values()], dim=1)
        gram = reductions.gram(flat)
        lr = self.lr if self.lr is not None else self.optimizer.param_groups[0]["lr"]
        base64 = base.to(torch.float64)
        # Pseudo lookahead losses L_j - lr <g_i, g_j>, so the reduction yields lr <g_i, g_j> / L_j.
        return base64, base64[None, :] - lr * gram

    def apply_gradients(self, weights: torch.Tensor | Sequence[float] | None = None) -> None:
        """Write the last step's gradients into .grad, as backward() of sum_k w_k L_k would.

        The per-task gradients of the last affinity step are the training gradient too: a training
        step that tracks affinity calls this instead of a second backward. weights: (K,), default 1.
        Each .grad is written in its parameter's dtype; the weighted sums run outside any autocast
        region (in the gradients' own dtype), as backward() would accumulate them.
        """
        if self.last_task_grads is None:
            raise ValueError("apply_gradients needs a preceding step() that computed task gradients")
        device = self.last_losses.device
        w = torch.ones(self.num_tasks, device=device) if weights is None else torch.as_tensor(weights, device=device)
        if w.shape != (self.num_tasks,):
            raise ValueError(f"weights must have shape ({self.num_tasks},), got {tuple(w.shape)}")
        named = dict(self.trunk.named_parameters())
        with torch.autocast(device.type, enabled=False):
            for name, g in {**self.last_task_grads["shared"], **self.last_task_grads["task"]}.items():
                _add_grad(named[name], torch.tensordot(w.to(g.dtype), g, dims=1))
            for k, head in enumerate(self.heads):
                for name, p in head.named_parameters():
                    if name in self.last_task_grads["heads"]:
                        _add_grad(p, w[k].to(p.dtype) * self.last_task_grads["heads"][name][k])


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _preferred_pairs(k: int, device: torch.device) -> int:
    """(source, target) pairs per lookahead call when memory allows: everything batched on CUDA;
    on the CPU a plain loop, one pair per call, the fastest measured there (1.6x faster than
    batching the K targets with vmap, K=10, ResNet-8, B=32, one thread)."""
    return k * k if device.type == "cuda" else 1


def _take(arg, dim: int | None, block: slice):
    """Targets `block` of a per-target argument (a tensor or a dict of tensors batched on dim 0)."""
    if dim is None:
        return arg
    if isinstance(arg, dict):
        return {n: t[block] for n, t in arg.items()}
    return arg[block]


def _blocks(arg, dim: int | None, size: int, total: int) -> list:
    """`arg` (as for `_take`) in consecutive blocks of `size` of its `total` rows; itself when one
    block covers it (no slicing ops)."""
    if size >= total:
        return [arg]
    return [_take(arg, dim, slice(start, start + size)) for start in range(0, total, size)]


def _activation_bytes(fm: _Functional, trunk, head, consts, sp, head_state, view: torch.Tensor) -> int:
    """Bytes of every layer's output for one target view (B images) through trunk and head: an
    upper bound on what a no-grad forward holds at once, as the memory of one (source, target)."""
    total = view.nbytes

    def count(module, inputs, output):
        nonlocal total
        total += sum(t.nbytes for t in (output if isinstance(output, (tuple, list)) else [output])
                     if isinstance(t, torch.Tensor))

    leaves = [m for m in (*trunk.modules(), *head.modules()) if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        one_head = {n: t[0] for n, t in head_state.items()}
        tasks, task_dim = fm.task_indices(view.device)
        task = _take(tasks, task_dim, 0)  # task 0's view stands for every target
        functional_call(head, one_head, (fm.call_trunk(trunk, {**consts, **sp}, view, task),))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _halving_on_oom(run, size: int, what: str, device: torch.device):
    """run(size), halving `size` after each out-of-memory error down to 1, then a clear error."""
    while True:
        try:
            return run(size)
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size <= 1:
                raise torch.OutOfMemoryError(
                    f"AffinityTracker: out of memory with 1 {what}; use a smaller batch or model ({err})"
                ) from err
            warnings.warn(f"AffinityTracker: out of memory with {size} {what}; retrying with {size // 2}",
                          stacklevel=3)
            size //= 2


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.detach().to(p.dtype)
    p.grad = g.clone() if p.grad is None else p.grad + g


def _same_architecture(heads: Sequence[nn.Module]) -> bool:
    shapes = [[(n, t.shape) for n, t in list(h.named_parameters()) + list(h.named_buffers())] for h in heads]
    return all(type(h) is type(heads[0]) for h in heads) and all(s == shapes[0] for s in shapes)
