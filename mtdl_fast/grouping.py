"""Task grouping: TAG's network selection rule (Fifty et al., 2021) and HOA's (Standley et al., 2020).

    res = mf.select_groups(tracker.affinity, budget=3)        # TAG, exact
    res.groups      # [[0, 2, 5], [1, 3], [4, 6]]   sorted lists of task indices, sorted
    res.serving     # [0, 1, 0, 1, 2, 0, 2]          serving[t]: index into res.groups of t's group
    res.score       # the collection's value (mean over tasks of each task's serving score)
    print(res)      # a table of the groups and of every task's serving group and score

The rule (TAG's network selection, as published). Every non-empty subset S of the K tasks is a
candidate group. TAG, on an affinity matrix ``Z`` (``Z[i, j]``: effect of task i's update on task
j): for ``|S| >= 2`` the score of member a is the mean over the other members b of ``Z[b, a]``; a
singleton scores -1e6. A collection of at most `budget` distinct subsets is feasible when it covers
every task (groups may overlap); each task is served by its best-scoring group in the collection
and the collection's value is the mean over tasks of that best score; the optimum is the feasible
collection of highest value. HOA, on pairwise losses ``P`` (``P[a, b]``: a's loss when trained with
b, ``P[a, a]``: a's single-task loss): member score of a in S is the mean over b in S\\{a} of
``P[a, b]``, a singleton scores ``P[a, a]``, and the value (a predicted mean loss) is minimised.

Numerics, shared by the compiled search and the scoring here: member sums run over the other
members in increasing index order and are then divided by ``|S| - 1``; a collection's total is the
sum over tasks, in index order, of each task's serving score, and its value is ``total / K``.

Ties. Collections are enumerated as the published exhaustive search does: sizes 1, 2, ..., budget,
each as ``itertools.combinations`` of the subsets in bitmask order 1 .. 2^K - 1; the first optimal
collection found wins (so among equally good collections the one with the fewest groups, then the
lexicographically smallest bitmasks). `exhaustive_groups` is that search, with strict improvement.
The exact search (`select_groups`) returns the first collection in that order whose total reaches
the proven optimum up to float noise (``8 (K + b + 2) 2^-53`` times the magnitude of the totals,
about 1e-14 relative): near-ties closer than that, which float rounding cannot order anyway, are
ties. A task's serving group is the first group in `groups` with the task's best score.

Paths:

- exact (default): branch and bound with a set-partition bound, in the compiled extension
  (`mtdl_fast._C.select_groups`, GIL released; every install builds it, and without it the exact
  search raises a RuntimeError saying how to build it). K <= 20 (tables of 2^K entries; memory
  about ``(8 K + 8 b + 12) 2^K`` bytes, time about ``b 3^K`` on one core: under a millisecond for
  K <= 10, a few milliseconds for K = 12, ~0.3 s for K = 16, ~2 s for K = 18, ~20 s for K = 20).
  See csrc/group_search.cpp for the bound and why it is valid.
- ``exact=False``: a greedy search for any K (candidate pool of pairs and greedily grown groups,
  forward selection, then single-group swaps until no swap improves). Not optimal in general;
  ``result.exact`` is False.
- `exhaustive_groups`: the plain reference (every collection; only for small K).

Stability: `bootstrap_groups(steps, budget)` resamples per-step affinity matrices (e.g.
``AffinityTracker.history``) with replacement, reruns the exact search on each resample's mean and
reports how often the grouping chosen on the full mean comes back, and how often each task keeps
its partners.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mtdl_fast._ext import ext

__all__ = ["BootstrapResult", "GroupingResult", "bootstrap_groups", "select_groups", "exhaustive_groups",
           "exhaustive_collections", "MAX_EXACT_TASKS", "TAG_SINGLETON"]

MAX_EXACT_TASKS = 20
MAX_MAGNITUDE = 1e100  # larger entries could overflow the float64 sums
TAG_SINGLETON = -1e6
_METHODS = ("tag", "hoa")


# ---- result -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupingResult:
    """A task grouping.

    Attributes:
        groups: the chosen groups, each a sorted list of task indices; the list is sorted.
        serving: for each task t, the index into `groups` of the group that serves it (its
            best-scoring group; the first such group on ties). ``groups[serving[t]]`` is the group.
        score: the collection's value: mean over tasks of their serving score (TAG: mean affinity
            onto each task from its group, higher is better; HOA: predicted mean loss, lower is
            better).
        task_scores: each task's score in its serving group.
        method: "tag" or "hoa".
        names: the task names given, or None.
        nodes: search effort: branch-and-bound nodes (exact), collections evaluated (exhaustive,
            greedy).
        exact: True when `score` is the proven optimum.
        budget: the budget searched with.
        backend: the search that chose it: "extension" (the exact branch and bound),
            "exhaustive" or "greedy".
    """

    groups: list[list[int]]
    serving: list[int]
    score: float
    method: str
    names: list[str] | None
    nodes: int
    exact: bool
    task_scores: list[float] = field(default_factory=list)
    budget: int = 0
    backend: str = ""

    def serving_group(self, task: int) -> list[int]:
        """The group that serves `task`."""
        return self.groups[self.serving[task]]

    def _name(self, t: int) -> str:
        return self.names[t] if self.names is not None else str(t)

    def __str__(self) -> str:
        k = len(self.serving)
        kind = "exact" if self.exact else "greedy, not proven optimal"
        better = "higher is better" if self.method == "tag" else "lower is better"
        lines = [
            f"{self.method.upper()} grouping of {k} task{'s' if k != 1 else ''}, budget {self.budget}: "
            f"{len(self.groups)} group{'s' if len(self.groups) != 1 else ''}, score {self.score:.6g} "
            f"({better}; {kind}, {self.nodes} nodes)"
        ]
        for g, members in enumerate(self.groups):
            lines.append(f"  group {g}: " + ", ".join(self._name(t) for t in members))
        width = max([len("task")] + [len(self._name(t)) for t in range(k)])
        lines.append(f"  {'task':<{width}}  group  score")
        for t in range(k):
            lines.append(f"  {self._name(t):<{width}}  {self.serving[t]:>5}  {self.task_scores[t]:.6g}")
        return "\n".join(lines)


# ---- validation ---------------------------------------------------------------------------------------


def _as_matrix(affinity: Any, name: str = "affinity") -> np.ndarray:
    if isinstance(affinity, torch.Tensor):
        if affinity.is_complex():
            raise ValueError(f"{name} must be real, got dtype {affinity.dtype}")
        arr = affinity.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(affinity)
        except Exception as err:  # noqa: BLE001 - anything unconvertible is a bad argument
            raise ValueError(f"{name} must be a (K, K) tensor or array, got {type(affinity).__name__}") from err
        if np.iscomplexobj(arr):
            raise ValueError(f"{name} must be real, got dtype {arr.dtype}")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square (K, K) matrix, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must have at least one task, got shape {tuple(arr.shape)}")
    _check_values(arr, name)
    return np.ascontiguousarray(arr)


def _check_values(arr: np.ndarray, name: str) -> None:
    """ValueError unless every entry is finite and at most MAX_MAGNITUDE in magnitude."""
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (NaN or inf), "
                         f"e.g. [{', '.join(map(str, first))}] = {arr[first]}")
    big = float(np.abs(arr).max())
    if big > MAX_MAGNITUDE:
        raise ValueError(
            f"{name} entries must have magnitude <= {MAX_MAGNITUDE:g} (sums must not overflow), got {big:g}"
        )


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_budget(budget: Any) -> int:
    return _check_count("budget", budget, minimum=1)


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method.lower()


def _check_names(names: Any, k: int) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of {k} names, got a string")
    names = [str(n) for n in names]
    if len(names) != k:
        raise ValueError(f"names must have one name per task ({k}), got {len(names)}")
    return names


def _check_exact_size(k: int) -> None:
    if k > MAX_EXACT_TASKS:
        raise ValueError(
            f"affinity has {k} tasks but the exact search supports at most {MAX_EXACT_TASKS} "
            f"(its tables have 2^K entries); use select_groups(..., exact=False) for the greedy search"
        )


# ---- scores -------------------------------------------------------------------------------------------


def _x_matrix(m: np.ndarray, minimize: bool) -> np.ndarray:
    """X[c, a]: what member c adds to member a's sum (Z[c, a] for TAG, P[a, c] for HOA), diagonal 0."""
    x = (m.T if minimize else m).copy()
    np.fill_diagonal(x, 0.0)
    return x


def _member_scores(m: np.ndarray, group: Sequence[int], minimize: bool) -> np.ndarray:
    """Scores (in the rule's own sign) of the members of `group` (sorted task indices)."""
    if len(group) == 1:
        a = group[0]
        return np.array([m[a, a] if minimize else TAG_SINGLETON])
    x = _x_matrix(m, minimize)
    idx = np.asarray(group)
    acc = np.zeros(len(group))
    for c in group:  # increasing order, zeros on the diagonal: the table's exact operations
        acc = acc + x[c, idx]
    return acc / float(len(group) - 1)


def _serve(m: np.ndarray, groups: list[list[int]], minimize: bool) -> tuple[list[int], list[float], float]:
    """serving index, task scores and value (total / K, tasks summed in order) of a collection."""
    k = m.shape[0]
    best = [math.inf if minimize else -math.inf] * k
    serving = [-1] * k
    for gi, g in enumerate(groups):
        for a, s in zip(g, _member_scores(m, g, minimize)):
            s = float(s)
            if (s < best[a]) if minimize else (s > best[a]):
                best[a], serving[a] = s, gi
    if min(serving) < 0:
        raise AssertionError("internal error: a collection that does not cover every task")
    total = 0.0
    for a in range(k):
        total += best[a]
    return serving, best, total / k


def _masks_to_groups(masks: Sequence[int], k: int) -> list[list[int]]:
    return sorted([a for a in range(k) if (int(mk) >> a) & 1] for mk in masks)


def _result(m, masks, method, names, nodes, exact, budget, backend) -> GroupingResult:
    k = m.shape[0]
    groups = _masks_to_groups(masks, k)
    serving, scores, value = _serve(m, groups, method == "hoa")
    return GroupingResult(groups=groups, serving=serving, score=value, method=method, names=names, nodes=int(nodes),
                          exact=exact, task_scores=scores, budget=budget, backend=backend)


# ---- public API ---------------------------------------------------------------------------------------


def select_groups(
    affinity: Any,
    budget: int,
    method: str = "tag",
    names: Sequence[str] | None = None,
    exact: bool = True,
) -> GroupingResult:
    """Choose at most `budget` task groups by TAG's network selection rule (or HOA's).

    Args:
        affinity: (K, K) torch tensor or array. TAG: ``Z[i, j]`` = effect of task i's update on task
            j (e.g. ``AffinityTracker.affinity``). HOA: ``P[a, b]`` = a's loss when trained with b,
            ``P[a, a]`` = a's single-task loss.
        budget: the most groups to choose (int >= 1; any value >= K is the same as K).
        method: "tag" (maximise the mean affinity onto each task from its group) or "hoa"
            (minimise the mean predicted loss).
        names: optional task names (one per task), used when printing.
        exact: True (default): the proven optimum, K <= 20, by the compiled branch and bound.
            False: greedy search for any K, not optimal in general.

    Returns:
        A `GroupingResult`.

    Raises:
        TypeError: budget not an int.
        ValueError: affinity not a finite real square matrix (entries up to 1e100 in magnitude),
            budget < 1, names of the wrong length, unknown method, or K > 20 with ``exact=True``
            (the message points to ``exact=False``).
        RuntimeError: ``exact=True`` without the compiled extension `mtdl_fast._C` (the message
            says how to build it).
    """
    m = _as_matrix(affinity)
    budget = _check_budget(budget)
    method = _check_method(method)
    k = m.shape[0]
    names = _check_names(names, k)
    minimize = method == "hoa"
    if not exact:
        masks, nodes = _greedy(m, budget, minimize)
        return _result(m, masks, method, names, nodes, False, budget, "greedy")
    _check_exact_size(k)
    masks, nodes = _exact_search(m, budget, minimize)
    return _result(m, masks, method, names, nodes, True, budget, "extension")


def _exact_search(m: np.ndarray, budget: int, minimize: bool) -> tuple[list[int], int]:
    """(bitmasks of the chosen groups, nodes visited) by the compiled branch and bound."""
    mod = ext()
    if mod is None or not hasattr(mod, "select_groups"):
        raise RuntimeError(
            "the exact group search runs in the compiled extension mtdl_fast._C, which is not available; "
            "build it with `pip install --no-build-isolation -e .` in the repository (or reinstall mtdl-fast), "
            "or pass exact=False for the greedy search"
        )
    _, masks, nodes = mod.select_groups(torch.from_numpy(m), budget, minimize)
    return list(masks), nodes


# ---- exhaustive reference -------------------------------------------------------------------------------


def exhaustive_groups(
    affinity: Any, budget: int, method: str = "tag", names: Sequence[str] | None = None
) -> GroupingResult:
    """The plain reference: every collection of 1 .. budget distinct subsets, in order.

    Collections are ``itertools.combinations`` of the subsets in bitmask order 1 .. 2^K - 1, sizes
    1, 2, ..., budget; a collection replaces the incumbent only when its total is strictly better,
    so the first optimum found wins ties. Work grows like (2^K)^budget: for small K only (K <= 7 in
    the tests). `nodes` is the number of collections evaluated.
    """
    m = _as_matrix(affinity)
    budget = _check_budget(budget)
    method = _check_method(method)
    k = m.shape[0]
    names = _check_names(names, k)
    _check_exact_size(k)
    masks, nodes = _exhaustive(m, budget, method == "hoa")
    return _result(m, masks, method, names, nodes, True, budget, "exhaustive")


def _plain_scores(m: np.ndarray, minimize: bool) -> np.ndarray:
    """(2^K, K): score of a in S in the rule's own sign, by the definition; NaN off S."""
    k = m.shape[0]
    n = 1 << k
    table = np.full((n, k), np.nan)
    for s in range(1, n):
        members = [a for a in range(k) if (s >> a) & 1]
        for a in members:
            if len(members) == 1:
                table[s, a] = m[a, a] if minimize else TAG_SINGLETON
                continue
            total = 0.0
            for b in members:
                if b != a:
                    total += m[a, b] if minimize else m[b, a]
            table[s, a] = total / (len(members) - 1)
    return table


def exhaustive_collections(k: int, budget: int) -> int:
    """Number of collections the exhaustive search evaluates: sum_{m <= budget} C(2^K - 1, m)."""
    n = (1 << k) - 1
    return sum(math.comb(n, m) for m in range(1, min(budget, n) + 1))


def _exhaustive(m: np.ndarray, budget: int, minimize: bool, stats: dict | None = None) -> tuple[list[int], int]:
    """(bitmasks of the first optimal collection, collections evaluated). With `stats`, also
    records there the optimum's total ("best") and the second-best distinct total ("second",
    +-inf when there is none)."""
    k = m.shape[0]
    n = (1 << k) - 1
    full = n
    table = _plain_scores(m, minimize)[1:]  # row i: subset with bitmask i + 1
    # best score of a task in a collection: min (HOA) or max (TAG) over its groups; off-group: +-inf
    fill = np.inf if minimize else -np.inf
    table = np.where(np.isnan(table), fill, table)
    pick = np.minimum if minimize else np.maximum
    masks = np.arange(1, n + 1, dtype=np.int64)
    worst = np.inf if minimize else -np.inf
    best_total, best_combo, count = worst, None, 0
    if stats is not None:
        stats["_top"] = []

    def consider(combos: np.ndarray) -> None:  # combos: (C, size) rows of subset indices, in order
        nonlocal best_total, best_combo, count
        count += combos.shape[0]
        served = table[combos[:, 0]]
        union = masks[combos[:, 0]].copy()
        for j in range(1, combos.shape[1]):
            served = pick(served, table[combos[:, j]])
            union |= masks[combos[:, j]]
        total = served[:, 0].copy()
        for a in range(1, k):  # tasks in index order
            total += served[:, a]
        total[union != full] = worst  # must cover every task
        i = int(np.argmin(total) if minimize else np.argmax(total))  # first best in this chunk
        if (total[i] < best_total) if minimize else (total[i] > best_total):
            best_total, best_combo = float(total[i]), combos[i]
        if stats is not None:  # the two best distinct totals, in maximise form
            flip = -total if minimize else total
            top = [float(flip.max())]
            below = flip[flip < top[0]]
            if below.size:
                top.append(float(below.max()))
            seen = sorted(set(top + stats["_top"]), reverse=True)
            stats["_top"] = seen[:2]

    # the last two members vectorised (all pairs above the prefix, lexicographic), the prefix
    # (size - 2 members) enumerated in lexicographic order
    pairs = np.array(list(itertools.combinations(range(n), 2)), dtype=np.int64).reshape(-1, 2)
    first = np.searchsorted(pairs[:, 0], np.arange(n + 1))  # pairs whose first member >= i
    for size in range(1, min(budget, n) + 1):
        if size == 1:
            consider(np.arange(n)[:, None])
            continue
        for prefix in itertools.combinations(range(n), size - 2):
            lo = prefix[-1] + 1 if prefix else 0
            tail = pairs[first[lo]:]
            if tail.shape[0] == 0:
                continue
            if prefix:
                head = np.broadcast_to(np.asarray(prefix, dtype=np.int64), (tail.shape[0], len(prefix)))
                consider(np.concatenate([head, tail], axis=1))
            else:
                consider(tail)
    assert best_combo is not None
    if stats is not None:
        top = stats.pop("_top") + [-math.inf]
        stats["best"] = -top[0] if minimize else top[0]
        stats["second"] = -top[1] if minimize else top[1]
    return [int(i) + 1 for i in best_combo], count


# ---- bootstrap stability --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """How stable a grouping is when the tracked steps are resampled.

    Attributes:
        chosen: the grouping selected on the mean of all the steps.
        selected: share of the resamples whose selection is exactly ``chosen.groups``.
        partners: for each task t, the share of the resamples in which t's serving group is the
            same set of tasks as ``chosen.serving_group(t)``.
        groupings: every grouping some resample selected, with its number of resamples, most
            frequent first (equal counts: first drawn first).
        n_resamples, n_steps, seed: the resampling (see `bootstrap_groups`).
    """

    chosen: GroupingResult
    selected: float
    partners: list[float]
    groupings: list[tuple[list[list[int]], int]]
    n_resamples: int
    n_steps: int
    seed: int

    def __str__(self) -> str:
        chosen = self.chosen
        k = len(chosen.serving)
        lines = [f"bootstrap over {self.n_steps} steps, {self.n_resamples} resamples (seed {self.seed}): "
                 f"the chosen grouping is selected in {self.selected:.1%}"]
        width = max([len("task")] + [len(chosen._name(t)) for t in range(k)])
        lines.append(f"  {'task':<{width}}  same partners")
        lines += [f"  {chosen._name(t):<{width}}  {self.partners[t]:>13.1%}" for t in range(k)]
        lines.append("  most frequent groupings:")
        for groups, count in self.groupings[:5]:
            text = " ".join("{" + ", ".join(chosen._name(t) for t in g) + "}" for g in groups)
            lines.append(f"  {count / self.n_resamples:>6.1%}  {text}")
        return "\n".join(lines)


def bootstrap_groups(
    steps: Any,
    budget: int,
    n_resamples: int = 1000,
    seed: int = 0,
    method: str = "tag",
    names: Sequence[str] | None = None,
) -> BootstrapResult:
    """Bootstrap the exact selection over per-step affinity matrices.

    Resample r = 0, 1, ... draws ``idx = rng.integers(0, n, size=n)`` from
    ``rng = numpy.random.default_rng(seed)`` (n step indices with replacement), averages those
    steps (``steps[idx].mean(axis=0)``) and runs the exact search (`select_groups`) on the mean.
    The grouping chosen on the mean of all n steps is then compared with each resample's.

    Args:
        steps: (n, K, K) tensor or array of per-step matrices, finite, n >= 2 (e.g.
            ``AffinityTracker.history``: per-step Z, source i onto target j).
        budget, method, names: as for `select_groups`.
        n_resamples: resamples to draw (int >= 1). The C++ search takes well under a millisecond
            at K = 10, so 1,000 resamples take about a second.
        seed: seeds the resampling (int >= 0): the same steps and seed give the same result.

    Returns:
        A `BootstrapResult`.

    Raises:
        TypeError: budget, n_resamples or seed not an int.
        ValueError: steps not (n, K, K) or not finite, fewer than 2 steps (naming the count), or
            the arguments `select_groups` refuses.
        RuntimeError: without the compiled extension (as `select_groups`).
    """
    data = _as_steps(steps)
    budget = _check_budget(budget)
    method = _check_method(method)
    n_resamples = _check_count("n_resamples", n_resamples, minimum=1)
    seed = _check_count("seed", seed, minimum=0)
    n, k = data.shape[0], data.shape[1]
    names = _check_names(names, k)
    _check_exact_size(k)
    minimize = method == "hoa"
    chosen = select_groups(data.mean(axis=0), budget, method, names)
    partners_of = [frozenset(chosen.serving_group(t)) for t in range(k)]
    rng = np.random.default_rng(seed)
    counts: dict[tuple[tuple[int, ...], ...], int] = {}
    same_partners = np.zeros(k, dtype=np.int64)
    for _ in range(n_resamples):
        mean = data[rng.integers(0, n, size=n)].mean(axis=0)
        groups = _masks_to_groups(_exact_search(mean, budget, minimize)[0], k)
        key = tuple(tuple(g) for g in groups)
        counts[key] = counts.get(key, 0) + 1
        serving = _serve(mean, groups, minimize)[0]
        same_partners += [frozenset(groups[serving[t]]) == partners_of[t] for t in range(k)]
    ranked = sorted(counts.items(), key=lambda item: -item[1])  # stable: equal counts keep their first draw
    chosen_key = tuple(tuple(g) for g in chosen.groups)
    return BootstrapResult(
        chosen=chosen, selected=counts.get(chosen_key, 0) / n_resamples,
        partners=[float(c) / n_resamples for c in same_partners],
        groupings=[([list(g) for g in key], count) for key, count in ranked],
        n_resamples=n_resamples, n_steps=n, seed=seed,
    )


def _as_steps(steps: Any) -> np.ndarray:
    """(n, K, K) float64 contiguous array of finite per-step matrices, n >= 2, or ValueError."""
    if isinstance(steps, torch.Tensor):
        arr = steps.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(steps, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] == 0:
        raise ValueError(f"steps must be an (n, K, K) stack of per-step matrices, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise ValueError(f"the bootstrap needs at least 2 tracked steps, got {arr.shape[0]}")
    _check_values(arr, "steps")
    return np.ascontiguousarray(arr)


# ---- greedy (exact=False) -------------------------------------------------------------------------------


def _greedy(m: np.ndarray, budget: int, minimize: bool) -> tuple[list[int], int]:
    """Greedy grouping for any K; returns (bitmasks, collections evaluated). Not optimal in general.

    1. Pool: every pair, the full set, the singletons (HOA only: TAG singletons score -1e6), and
       groups grown from each task's best pair and from the K best pairs by repeatedly adding the
       task that gives the grown group the best mean member score (every size is kept).
    2. Start from the full set (the one group that covers every task); add, while the budget allows,
       the pool group that increases the value most.
    3. Replace one chosen group by a pool group, or drop a group, while that keeps every task
       covered and improves the value (a drop: does not lower it); then add again (2); repeat until
       nothing changes.
    """
    k = m.shape[0]
    full = (1 << k) - 1
    sign = -1.0 if minimize else 1.0  # maximise form
    x = _x_matrix(m, minimize)
    single = -np.diag(m) if minimize else np.full(k, TAG_SINGLETON)
    pool: dict[int, np.ndarray] = {}

    def add(members: list[int]) -> None:
        mask = sum(1 << t for t in members)
        if mask in pool:
            return
        row = np.full(k, -np.inf)
        if len(members) == 1:
            row[members[0]] = single[members[0]]
        else:
            idx = np.asarray(members)
            row[idx] = sign * x[np.ix_(idx, idx)].sum(axis=0) / (len(members) - 1)
        pool[mask] = row

    add(list(range(k)))
    if k == 1 or minimize:
        for a in range(k):
            add([a])
    pair = sign * (x + x.T)  # sum of the two members' scores, maximise form
    pairs = [(float(pair[a, b]), a, b) for a in range(k) for b in range(a + 1, k)]
    for _, a, b in pairs:
        add([a, b])
    seeds = set()
    for a in range(k):
        mine = [p for p in pairs if a in (p[1], p[2])]
        if mine:
            seeds.add(max(mine)[1:])
    seeds.update(p[1:] for p in sorted(pairs, reverse=True)[:k])
    for a, b in sorted(seeds):
        members = [a, b]
        inside = np.zeros(k, dtype=bool)
        inside[members] = True
        onto = x[members].sum(axis=0)  # onto[t]: sum over members c of x[c, t]
        fro = x[:, members].sum(axis=1)  # fro[t]: sum over members a of x[t, a]
        inner = float(x[np.ix_(members, members)].sum())
        while len(members) < k:
            n = len(members)
            gain = np.where(inside, -np.inf, sign * (inner + onto + fro) / ((n + 1) * n))
            t = int(np.argmax(gain))
            inner += float(onto[t] + fro[t])
            members.append(t)
            inside[t] = True
            onto += x[t]
            fro += x[:, t]
            add(sorted(members))
    cand = sorted(pool)
    table = np.stack([pool[c] for c in cand])  # (P, K), maximise form
    evaluated = 0

    def totals(rows: np.ndarray) -> np.ndarray:
        tot = rows[:, 0].copy()
        for a in range(1, k):
            tot += rows[:, a]
        return tot

    def served(chosen: list[int]) -> np.ndarray:
        out = np.full(k, -np.inf)
        for i in chosen:
            out = np.maximum(out, table[i])
        return out

    chosen = [cand.index(full)]
    current = float(totals(served(chosen)[None])[0])
    while True:
        changed = False
        while len(chosen) < budget:  # forward additions
            tots = totals(np.maximum(served(chosen)[None], table))
            evaluated += len(cand)
            tots[chosen] = -np.inf
            i = int(np.argmax(tots))
            if not tots[i] > current:
                break
            chosen, current, changed = chosen + [i], float(tots[i]), True
        for pos in range(len(chosen)):  # swaps and drops
            rest = chosen[:pos] + chosen[pos + 1:]
            union = 0
            for i in rest:
                union |= cand[i]
            s = served(rest)
            if rest and union == full:
                evaluated += 1
                t = float(totals(s[None])[0])
                if t >= current:
                    chosen, current, changed = rest, t, True
                    break
            tots = totals(np.maximum(s[None], table))
            evaluated += len(cand)
            tots[[(union | c) != full for c in cand]] = -np.inf
            tots[chosen] = -np.inf
            i = int(np.argmax(tots))
            if tots[i] > current:
                chosen, current, changed = rest + [i], float(tots[i]), True
                break
        if not changed:
            break
    return sorted(cand[i] for i in chosen), evaluated
