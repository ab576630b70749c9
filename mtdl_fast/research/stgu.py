"""Selective Task Group Updates (Jeong & Yoon, "Selective Task Group Updates for Multi-Task
Optimization", ICLR 2025) as a training strategy for a shared trunk and K task heads.

Per batch the tasks are split into groups and the groups are updated one after another on that
same batch, in a random order; the losses seen between the group steps measure how each group's
update moved every task (the "proximal inter-task affinity"), tracked as an exponential moving
average, and after a warm-up the groups are re-formed every batch by affinity propagation on that
matrix, so the number of groups adapts.

    stgu = SelectiveGroupUpdates(trunk, heads, optimizer, decay=1e-3, warmup=100)
    for x, y in loader:
        out = stgu.step(tasks(x), y)      # out["losses"], out["groups"], out["order"]
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelectiveGroupUpdates", "affinity_propagation_labels", "grouping_similarity", "groups_from_labels"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def grouping_similarity(affinity: torch.Tensor | np.ndarray) -> np.ndarray:
    """The similarity matrix the groups are clustered from: (K, K) float64 numpy.

    Each column t of the affinity A (source s -> target t) is divided by its diagonal entry
    A[t, t], so an entry reads "the effect of s's group on t relative to the effect of t's own
    group on t"; then the matrix is symmetrised, S = (N + N^T) / 2.

    Guard: a diagonal entry that is not > 0 (t's own updates have not lowered its loss on
    average, or nothing was recorded yet) cannot serve as a scale; that column is divided by its
    largest absolute entry instead (so it lies in [-1, 1], like a column whose diagonal dominates),
    and an all-zero column is left as zeros. Division is by a positive number either way, so the
    signs of A are kept.
    """
    if isinstance(affinity, torch.Tensor):
        affinity = affinity.detach().to("cpu", torch.float64).numpy()
    a = np.array(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be a square (K, K) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("affinity must be finite")
    diagonal = np.diag(a)
    largest = np.abs(a).max(axis=0)
    scale = np.where(diagonal > 0, diagonal, np.where(largest > 0, largest, 1.0))
    normalised = a / scale[None, :]
    return (normalised + normalised.T) / 2


def affinity_propagation_labels(similarity: np.ndarray, preference: float | None, damping: float) -> np.ndarray:
    """scikit-learn's affinity propagation (Frey & Dueck, Science 2007) on a precomputed (K, K)
    similarity: one cluster label per task, all -1 when it did not converge."""
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # all-equal similarities (e.g. an untouched affinity matrix) are an expected input here
        warnings.filterwarnings("ignore", "All samples have mutually equal similarities")
        model = AffinityPropagation(affinity="precomputed", damping=damping, preference=preference, random_state=0)
        return model.fit(similarity).labels_


def groups_from_labels(labels: Sequence[int] | np.ndarray) -> list[list[int]]:
    """Cluster labels -> groups: sorted lists of task indices, ordered by their smallest task."""
    members: dict[int, list[int]] = {}
    for task, label in enumerate(np.asarray(labels).tolist()):
        members.setdefault(int(label), []).append(task)
    return sorted(members.values(), key=lambda g: g[0])


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class SelectiveGroupUpdates:
    """Train a shared trunk and K heads by sequential task-group updates (STGU).

    One `step(views, targets)` on one batch:

    1. Groups. During the first `warmup` iterations all tasks form one group. From then on, at
       the start of every iteration, the groups are re-formed by `affinity_propagation_labels` (scikit-learn, with
       `preference` and `damping`) on `grouping_similarity(affinity)`: the column-normalised,
       symmetrised affinity matrix. If affinity propagation finds no exemplar (it did not
       converge), the previous groups are kept.
    2. Order. The groups are stepped in a random order, a permutation drawn from `generator`.
    3. Updates. Forward f_0 of every task; then for the m-th group G in that order: zero the
       gradients, backward of G's summed loss from the latest forward f_{m-1}, optimizer.step(),
       and a fresh forward f_m of every task (the last one, f_M, without autograd). Parameters
       that G's loss does not reach (other tasks' heads) get no gradient, so the optimizer leaves
       them alone. Task k's loss is `loss_fn(heads[k](trunk(views[k])), targets_k)`.
    4. Proximal inter-task affinity. The step of G is exactly what happened between f_{m-1} and
       f_m, so its effect on every task t is credited to G (not to the group updated next, the
       off-by-one of the public code):

           r_t = 1 - L_t(f_m) / L_t(f_{m-1}).

       The paper can only observe a group's effect, not a single member's; the group's effect is
       split evenly among its members (to first order the group's step is the sum of its members'
       gradient steps), share_t = r_t / |G|. For every source s in G and every task t the EMA
       (zero at the start, no bias correction) is

           A[s, t] <- (1 - decay) * A[s, t] + decay * v(s, t),   with
           v(s, t) = share_t                                  for t not in G, and for t = s;
           v(s, t) = share_t                                  for t in G, t != s, when r_s and r_t
                                                              have the same sign (or one is 0);
           v(s, t) = -max(|share_s|, |share_t|)               for t in G, t != s, when r_s and r_t
                                                              have opposite signs.

       The last line is the paper's "opposite signs within a group are recorded as negative
       affinity": one joint step that lowers one member's loss and raises the other's shows the
       pair in conflict, so both A[s, t] and A[t, s] record the negative of the larger of the two
       effects. (The public code records minus the positive one; this records minus the larger
       magnitude, so A[s, t] is never less negative than the raw share_t it replaces.) Each row
       s is updated once per iteration, when s's group steps; the diagonal A[t, t] is the EMA of
       t's share of the change its own group's step made to it.
    5. Non-finite losses. A group whose summed loss (in f_{m-1}) is not finite is not stepped (no
       backward, no optimizer.step, and its measurement is dropped): a NaN never reaches the
       parameters or A. In a measurement where some loss of f_{m-1} or f_m is not finite, the
       entries that need that loss are left unchanged and the others are updated; every such
       measurement (and every dropped one) adds 1 to `skipped`. A target t whose loss in
       f_{m-1} is <= 0 has no ratio: its entries are left unchanged (not counted as skipped).

    Forwards run in whatever mode the modules are in (normally train): BatchNorm running
    statistics update once per forward, M + 1 times per iteration for M groups, and nothing else is
    done with them. The trunk runs once per view (K calls per forward), never on the K views
    stacked: per-view batch statistics are the project's semantics, and a stacked call would also
    let a non-finite view of one task reach the trunk gradient of every group (0 * NaN in the
    weight gradient).

    Args:
        trunk: the trunk, (B, ...) -> (B, D) features.
        heads: K task heads; head k reads the features of view k.
        optimizer: steps every parameter that should train (trunk and heads).
        decay: EMA weight of a new measurement, in (0, 1) (1e-3 in the paper's configs).
        warmup: iterations with all tasks in one group before grouping starts (>= 0).
        loss_fn: loss(output, target) -> scalar (the mean over the batch).
        damping: affinity propagation damping, in [0.5, 1).
        generator: draws the group order; None: a private CPU generator seeded with
            torch.initial_seed(). Its state is part of `state_dict`.
        preference: affinity propagation preference; None: the median of the similarities.
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        decay: float = 1e-3,
        warmup: int = 100,
        loss_fn: LossFn = F.cross_entropy,
        damping: float = 0.5,
        generator: torch.Generator | None = None,
        preference: float | None = None,
    ):
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        if isinstance(heads, nn.Module) and not isinstance(heads, (nn.ModuleList, nn.Sequential)):
            raise ValueError("heads must be a sequence of nn.Module, got a single module")
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError("heads must be a non-empty sequence of nn.Module")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not _is_real(decay) or not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if not _is_real(damping) or not 0.5 <= float(damping) < 1.0:
            raise ValueError(f"damping must be in [0.5, 1), got {damping!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if preference is not None and (not _is_real(preference) or not math.isfinite(preference)):
            raise ValueError(f"preference must be a finite number or None, got {preference!r}")
        self.trunk, self.heads, self.optimizer = trunk, heads, optimizer
        self.decay, self.warmup, self.loss_fn = float(decay), int(warmup), loss_fn
        self.damping, self.preference = float(damping), preference
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        self.generator = generator
        self.num_tasks = len(heads)
        self._affinity = np.zeros((self.num_tasks, self.num_tasks))
        self._groups = [list(range(self.num_tasks))]
        self._iteration = 0
        self._skipped = 0

    # ------------------------------------------------------------------ state
    @property
    def affinity(self) -> torch.Tensor:
        """(K, K) float64 (CPU): the EMA proximal affinity, A[s, t] = source s onto target t."""
        return torch.from_numpy(self._affinity.copy())

    @property
    def groups(self) -> list[list[int]]:
        """The groups of the latest step (before any step: all tasks in one group)."""
        return [list(g) for g in self._groups]

    @property
    def iteration(self) -> int:
        """Steps taken."""
        return self._iteration

    @property
    def skipped(self) -> int:
        """Group-step measurements with a non-finite loss (dropped or partly applied)."""
        return self._skipped

    def state_dict(self) -> dict:
        return {
            "num_tasks": self.num_tasks,
            "decay": self.decay,
            "warmup": self.warmup,
            "affinity": torch.from_numpy(self._affinity.copy()),
            "groups": self.groups,
            "iteration": self._iteration,
            "skipped": self._skipped,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the running state (affinity, groups, counters, the order generator's state).
        The constructor's settings stay; num_tasks and decay must match."""
        if state.get("num_tasks") != self.num_tasks:
            raise ValueError(f"state_dict is for {state.get('num_tasks')} tasks, this has {self.num_tasks}")
        if state.get("decay") != self.decay:
            raise ValueError(f"state_dict has decay={state.get('decay')}, this has decay={self.decay}")
        affinity = torch.as_tensor(state["affinity"]).detach().to("cpu", torch.float64).numpy().copy()
        if affinity.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(f"state_dict affinity has shape {affinity.shape}, expected {(self.num_tasks,) * 2}")
        groups = self._check_groups(state["groups"])
        self._affinity = affinity
        self._groups = groups
        self._iteration = int(state["iteration"])
        self._skipped = int(state["skipped"])
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ step
    def step(
        self,
        views: torch.Tensor,
        targets: torch.Tensor,
        *,
        groups: Sequence[Sequence[int]] | None = None,
        order: Sequence[int] | None = None,
    ) -> dict:
        """One training iteration on one batch (see the class docstring).

        Args:
            views: (K, B, ...) one input batch per task.
            targets: (B, ...) shared by every task, or (K, B, ...) one per task (this reading wins
                when both fit).
            groups: use this partition of range(K) for this step instead of the scheduled one.
            order: update the groups in this order (a permutation of range(len(groups))) instead
                of a random one (then the generator is not drawn from).

        Returns:
            {"losses": (K,) detached losses of the first forward, before any group step,
             "groups": the groups used (sorted lists of task indices),
             "order": indices into "groups", in the order the groups were updated}.
        """
        per_task = self._check_inputs(views, targets)
        groups = self._schedule() if groups is None else self._check_groups(groups)
        if order is None:
            order = torch.randperm(len(groups), generator=self.generator, device=self.generator.device).tolist()
        else:
            order = self._check_order(order, len(groups))
        self._groups = groups

        with torch.enable_grad():
            losses = self._losses(views, targets, per_task)
        first = torch.stack([loss.detach() for loss in losses])
        before = self._host(losses)
        for position, index in enumerate(order):
            members = groups[index]
            last = position == len(order) - 1
            self.optimizer.zero_grad()
            if not math.isfinite(float(before[members].sum())):
                self._skipped += 1  # not stepped: nothing to measure, parameters untouched
                continue
            # Sum the members' own scalars: backward then never enters another task's graph
            # (indexing a stacked loss vector would send zeros through it, and 0 * inf = NaN).
            torch.stack([losses[j] for j in members]).sum().backward()
            self.optimizer.step()
            if last:
                with torch.no_grad():
                    losses = self._losses(views, targets, per_task)
            else:
                with torch.enable_grad():
                    losses = self._losses(views, targets, per_task)
            after = self._host(losses)
            self._credit(members, before, after)
            before = after
        self._iteration += 1
        return {"losses": first, "groups": self.groups, "order": list(order)}

    # ------------------------------------------------------------------ internals
    def _schedule(self) -> list[list[int]]:
        if self._iteration < self.warmup:
            return [list(range(self.num_tasks))]
        labels = affinity_propagation_labels(grouping_similarity(self._affinity), self.preference, self.damping)
        if (labels < 0).any():
            return self.groups
        return groups_from_labels(labels)

    def _losses(self, views: torch.Tensor, targets: torch.Tensor, per_task: bool) -> list[torch.Tensor]:
        """The K task losses as separate scalars (separate graphs)."""
        return [
            self.loss_fn(self.heads[j](self.trunk(views[j])), targets[j] if per_task else targets).reshape(())
            for j in range(self.num_tasks)
        ]

    @staticmethod
    def _host(losses: list[torch.Tensor]) -> np.ndarray:
        return torch.stack([loss.detach() for loss in losses]).to("cpu", torch.float64).numpy()

    def _credit(self, members: list[int], before: np.ndarray, after: np.ndarray) -> None:
        finite = np.isfinite(before) & np.isfinite(after)
        if not finite.all():
            self._skipped += 1
        valid = finite & (before > 0)
        ratio = np.divide(after, before, out=np.ones_like(before), where=valid)
        share = (1.0 - ratio) / len(members)
        rows = np.asarray(members)
        value = np.tile(share, (rows.size, 1))
        use = np.tile(valid, (rows.size, 1))
        for a, s in enumerate(members):
            for t in members:
                if t == s:
                    continue
                if not (valid[s] and valid[t]):
                    use[a, t] = False
                elif share[s] * share[t] < 0:
                    value[a, t] = -max(abs(share[s]), abs(share[t]))
        old = self._affinity[rows]
        self._affinity[rows] = np.where(use, (1.0 - self.decay) * old + self.decay * value, old)

    def _check_inputs(self, views: torch.Tensor, targets: torch.Tensor) -> bool:
        if not isinstance(views, torch.Tensor) or views.ndim < 2:
            raise ValueError(f"views must be a (K, B, ...) tensor, got {getattr(views, 'shape', type(views))}")
        if views.shape[0] != self.num_tasks:
            raise ValueError(f"views has K={views.shape[0]} task views but there are {self.num_tasks} heads")
        if not isinstance(targets, torch.Tensor) or targets.ndim < 1:
            raise ValueError(f"targets must be a tensor of shape (B,) or (K, B), got {type(targets).__name__}")
        batch = views.shape[1]
        if targets.ndim >= 2 and targets.shape[:2] == (self.num_tasks, batch):
            return True
        if targets.shape[0] == batch:
            return False
        raise ValueError(
            f"targets must have shape (B,)=({batch},) or (K, B)=({self.num_tasks}, {batch}), got {tuple(targets.shape)}"
        )

    def _check_groups(self, groups) -> list[list[int]]:
        try:
            out = [sorted(int(t) for t in g) for g in groups]
            flat = [t for g in groups for t in g]
        except (TypeError, ValueError):
            raise ValueError(f"groups must be a list of lists of task indices, got {groups!r}") from None
        if any(not g for g in out) or sorted(int(t) for t in flat) != list(range(self.num_tasks)):
            raise ValueError(
                f"groups must partition the tasks 0..{self.num_tasks - 1} into non-empty groups, got {groups!r}"
            )
        return out

    @staticmethod
    def _check_order(order, count: int) -> list[int]:
        try:
            out = [int(i) for i in order]
        except (TypeError, ValueError):
            raise ValueError(f"order must be a permutation of range({count}), got {order!r}") from None
        if sorted(out) != list(range(count)):
            raise ValueError(f"order must be a permutation of range({count}), got {order!r}")
        return out
