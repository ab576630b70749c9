"""Task grouping: TAG's network selection rule (Fifty et al., 2021) and HOA's (Standley et al., 2020).

    res = mf.select_groups(tracker.affinity, budget=3)        # TAG, exact
    res.groups      # [[0, 2, 5], [1, 3], [4, 6]]   sorted lists of task indices, sorted
    res.serving     # [0, 1, 0, 1, 2, 0, 2]          serving[t]: index into res.groups of t's group
    res.score       # the collection's value (mean over tasks of each task's serving score)
    print(res)      # a table of the groups and of every task's serving group and score

The rule (SEMANTICS.md, "TAG network selection"). Every non-empty subset S of the K tasks is a
candidate group. TAG, on an affinity matrix ``Z`` (``Z[i, j]``: effect of task i's update on task
j): for ``|S| >= 2`` the score of member a is the mean over the other members b of ``Z[b, a]``; a
singleton scores -1e6. A collection of at most `budget` distinct subsets is feasible when it covers
every task (groups may overlap); each task is served by its best-scoring group in the collection
and the collection's value is the mean over tasks of that best score; the optimum is the feasible
collection of highest value. HOA, on pairwise losses ``P`` (``P[a, b]``: a's loss when trained with
b, ``P[a, a]``: a's single-task loss): member score of a in S is the mean over b in S\\{a} of
``P[a, b]``, a singleton scores ``P[a, a]``, and the value (a predicted mean loss) is minimised.

Numerics, shared by every path here so they agree to the last bit: member sums run over the other
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
  (`mtdl_fast._C.select_groups`, GIL released) or, when it is not built (or ``backend="python"``),
  in the pure-Python twin below, which performs the same float64 operations in the same order and
  visits the same nodes. K <= 20 (tables of 2^K entries; memory about ``(8 K + 8 b + 12) 2^K``
  bytes, time about ``b 3^K`` on one core: a few milliseconds for K <= 12, ~0.3 s for K = 16,
  ~2 s for K = 18, ~20 s for K = 20; the Python twin is roughly 100x slower).
  See csrc/group_search.cpp for the bound and why it is valid.
- ``exact=False``: a greedy search for any K (candidate pool of pairs and greedily grown groups,
  forward selection, then single-group swaps until no swap improves). Not optimal in general;
  ``result.exact`` is False.
- `exhaustive_groups`: the plain reference (every collection; only for small K).
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

__all__ = ["GroupingResult", "select_groups", "exhaustive_groups", "exhaustive_collections", "MAX_EXACT_TASKS",
           "TAG_SINGLETON"]

MAX_EXACT_TASKS = 20
MAX_MAGNITUDE = 1e100  # larger entries could overflow the float64 sums
TAG_SINGLETON = -1e6
_METHODS = ("tag", "hoa")
_BACKENDS = ("auto", "extension", "python")
_UNIT = 2.0**-53


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
        backend: "extension", "python", "exhaustive" or "greedy".
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
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (NaN or inf), e.g. [{i}, {j}] = {arr[i, j]}")
    big = float(np.abs(arr).max())
    if big > MAX_MAGNITUDE:
        raise ValueError(
            f"{name} entries must have magnitude <= {MAX_MAGNITUDE:g} (sums must not overflow), got {big:g}"
        )
    return np.ascontiguousarray(arr)


def _check_budget(budget: Any) -> int:
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"budget must be an int >= 1, got {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    return int(budget)


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


def _score_table(m: np.ndarray, minimize: bool) -> np.ndarray:
    """(2^K, K) float64: score of task a in subset S (maximise form: HOA negated), -inf off S.

    Same operations as csrc/group_search.cpp: raw[S] = raw[S - top(S)] + X[top(S)], then / (|S| - 1).
    """
    k = m.shape[0]
    n = 1 << k
    x = _x_matrix(m, minimize)
    raw = np.zeros((n, k))
    for t in range(k):
        raw[1 << t: 2 << t] = raw[: 1 << t] + x[t]
    masks = np.arange(n)
    member = ((masks[:, None] >> np.arange(k)) & 1).astype(bool)
    pc = member.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = raw / np.maximum(pc - 1, 1)[:, None].astype(np.float64)
    if minimize:
        sc = -sc
    for a in range(k):
        sc[1 << a, a] = -m[a, a] if minimize else TAG_SINGLETON
    sc[~member] = -np.inf
    return sc


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
    *,
    backend: str = "auto",
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
        exact: True (default): the proven optimum, K <= 20. False: greedy search for any K, not
            optimal in general.
        backend: exact search only: "auto" (compiled extension when built, else Python), "extension"
            (require it) or "python" (the pure-Python twin).

    Returns:
        A `GroupingResult`.

    Raises:
        ValueError: affinity not a finite real square matrix (entries up to 1e100 in magnitude),
            budget not an int >= 1, names of the wrong length, unknown method or backend, or
            K > 20 with ``exact=True`` (the message points to ``exact=False``).
        RuntimeError: ``backend="extension"`` without a built extension.
    """
    m = _as_matrix(affinity)
    budget = _check_budget(budget)
    method = _check_method(method)
    k = m.shape[0]
    names = _check_names(names, k)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    minimize = method == "hoa"
    if not exact:
        masks, nodes = _greedy(m, budget, minimize)
        return _result(m, masks, method, names, nodes, False, budget, "greedy")
    _check_exact_size(k)
    mod = None if backend == "python" else ext()
    if mod is None and backend == "extension":
        raise RuntimeError("backend='extension' but mtdl_fast._C is not available")
    if mod is not None and hasattr(mod, "select_groups"):
        _, masks, nodes = mod.select_groups(torch.from_numpy(m), budget, minimize)
        used = "extension"
    else:
        if backend == "extension":
            raise RuntimeError("backend='extension' but mtdl_fast._C has no select_groups (rebuild it)")
        _, masks, nodes = _search_python(m, budget, minimize)
        used = "python"
    return _result(m, masks, method, names, nodes, True, budget, used)


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


# ---- the exact search in Python (twin of csrc/group_search.cpp) -------------------------------------------


def _submasks(mask: int) -> np.ndarray:
    """All submasks of `mask`, increasing."""
    bits = [b for b in range(mask.bit_length()) if (mask >> b) & 1]
    idx = np.arange(1 << len(bits), dtype=np.int64)
    out = np.zeros_like(idx)
    for j, b in enumerate(bits):
        out |= ((idx >> j) & 1) << b
    return out


class _PySearch:
    """Line-for-line twin of the C++ `Search` class (see csrc/group_search.cpp for the reasoning)."""

    def __init__(self, m: np.ndarray, budget: int, minimize: bool):
        k = m.shape[0]
        self.k, self.n, self.full = k, 1 << k, (1 << k) - 1
        self.maxr = min(budget, k)
        self.sc = _score_table(m, minimize)
        self.best = self.sc.max(axis=0)
        masks = np.arange(self.n)
        pc = np.zeros(self.n, dtype=np.int64)
        for b in range(k):
            pc += (masks >> b) & 1
        pair_up = (pc >= 2)[:, None]
        with np.errstate(invalid="ignore"):
            mabs = np.where(np.isfinite(self.sc) & pair_up, np.abs(self.sc), 0.0).max(axis=0)
        self.mabs = np.maximum(mabs, np.abs(self.best))
        self._build_dp()

    # -- tables --
    def _build_dp(self) -> None:
        n, k, sc = self.n, self.k, self.sc
        w = np.full(n, -np.inf)
        w[0] = 0.0
        for s in range(1, n):
            bits = [a for a in range(k) if (s >> a) & 1]
            tsum = np.zeros(1 << len(bits))
            for hb, a in enumerate(bits):
                tsum[1 << hb: 2 << hb] = tsum[: 1 << hb] + sc[s, a]
            tmask = _submasks(s)  # distinct: a plain gather/scatter is exact
            w[tmask[1:]] = np.maximum(w[tmask[1:]], tsum[1:])
        self.h = [w]
        self.h_top = w[self.full] if self.maxr == 1 else None
        for r in range(2, self.maxr + 1):
            prev = self.h[r - 2]
            if r < self.maxr:
                cur = np.full(n, -np.inf)
                cur[0] = 0.0
                for u in range(1, n):
                    cur[u] = self._split_max(u, w, prev)
                self.h.append(cur)
            else:
                self.h_top = self._split_max(self.full, w, prev)

    @staticmethod
    def _split_max(u: int, w: np.ndarray, prev: np.ndarray) -> float:
        low = u & -u
        t = low | _submasks(u ^ low)
        return float((w[t] + prev[u ^ t]).max())

    def hval(self, r: int, u: int) -> float:
        if u == 0:
            return 0.0
        if r <= 0:
            return -math.inf
        if r < self.maxr or (self.maxr == 1 and r == 1):
            return float(self.h[r - 1][u])
        assert r == self.maxr and u == self.full
        return float(self.h_top)

    def _dp_collection_total(self) -> float:
        k, sc = self.k, self.sc
        groups = []
        u, r = self.full, self.maxr
        target = self.hval(r, u)
        while u:
            low = u & -u
            rest = u ^ low
            ts = (low | _submasks(rest))[::-1]  # the C++ loop walks R = rest .. 0
            if r == 1:
                ts = ts[ts == u]
                c = self.h[0][ts]
            else:
                c = np.array([self.h[0][t] + self.hval(r - 1, u ^ int(t)) for t in ts])
            hit = np.flatnonzero(c == target)
            assert hit.size, "internal error rebuilding the DP partition"
            pick = int(ts[hit[0]])
            supers = pick | _submasks(self.full ^ pick)
            s = np.zeros(supers.shape[0])
            for a in range(k):
                if (pick >> a) & 1:
                    s = s + sc[supers, a]
            hit = np.flatnonzero(s == self.h[0][pick])
            assert hit.size, "internal error rebuilding a DP group"
            groups.append(int(supers[hit[0]]))
            u ^= pick
            if u:
                target = self.hval(r - 1, u)
            r -= 1
        x = sc[groups].max(axis=0)
        t = 0.0
        for a in range(k):
            t += float(x[a])
        return t

    # -- search --
    def run(self) -> tuple[float, list[int], int]:
        k = self.k
        v = self.hval(self.maxr, self.full)
        sum_best = 0.0
        for a in range(k):
            sum_best += float(self.best[a])
        big_a, mabs_sum = 0.0, 0.0
        for a in range(k):
            ba = float(self.best[a])
            big_a += max(abs(ba), abs(v - (sum_best - ba)))
            mabs_sum += float(self.mabs[a])
        gamma = 8.0 * float(k + self.maxr + 2) * _UNIT
        tau = gamma * big_a
        self.base_tol = gamma * (big_a + mabs_sum)
        self.gamma, self.big_a = gamma, big_a
        self.theta = min(v - tau, self._dp_collection_total())
        self.nodes = 0
        self.found: tuple[float, list[int]] | None = None
        for m in range(1, self.maxr + 1):
            if self.hval(m, self.full) < self.theta - self.base_tol:
                continue
            if self._dfs([], 0, np.full(k, -np.inf), self.full, m):
                break
        assert self.found is not None, "internal error: no collection reached the DP optimum"
        total, groups = self.found
        return total / k, groups, self.nodes

    def _dfs(self, chosen: list[int], last: int, cur: np.ndarray, u: int, r: int) -> bool:
        k, sc = self.k, self.sc
        if r == 1:
            supers = u | _submasks(self.full ^ u)
            supers = supers[supers > last]
            served = np.maximum(cur, sc[supers])
            tot = np.zeros(supers.shape[0])
            for a in range(k):
                tot = tot + served[:, a]
            hit = np.flatnonzero(tot >= self.theta)
            if hit.size:
                i = int(hit[0])
                self.nodes += i + 1
                self.found = (float(tot[i]), chosen + [int(supers[i])])
                return True
            self.nodes += supers.shape[0]
            return False
        stop = self.n - r
        if last + 1 > stop:
            return False
        cand = np.arange(last + 1, stop + 1, dtype=np.int64)
        nxt = np.maximum(cur, sc[cand])
        u2 = u & ~cand
        status = self._root_checks(nxt, u2, r - 1)  # 1: survives, 0: pruned, -1: needs the E-search
        for i in range(cand.shape[0]):
            self.nodes += 1
            st = status[i]
            if st == 0 or (st < 0 and not self._may_reach(nxt[i], int(u2[i]), r - 1)):
                continue
            s = int(cand[i])
            if self._dfs(chosen + [s], s, nxt[i], int(u2[i]), r - 1):
                return True
        return False

    def _root_checks(self, nxt: np.ndarray, u2: np.ndarray, r: int) -> np.ndarray:
        """The first step of `_may_reach` (E = {}) for many children at once, same float ops."""
        k, best = self.k, self.best
        covered = ((u2[:, None] >> np.arange(k)) & 1) == 0
        with np.errstate(invalid="ignore"):
            in_i = covered & (best > nxt)
        settled = covered & ~in_i
        rows = nxt.shape[0]
        acc, accabs, mabsx = np.zeros(rows), np.zeros(rows), np.zeros(rows)
        for a in range(k):
            mabsx = np.where(covered[:, a], mabsx, mabsx + float(self.mabs[a]))
            acc = np.where(settled[:, a], acc + nxt[:, a], acc)
            accabs = np.where(settled[:, a], accabs + np.abs(nxt[:, a]), accabs)
        with np.errstate(invalid="ignore"):
            key = np.where(in_i, best - nxt, -np.inf)
        order = np.argsort(-key, axis=1, kind="stable")  # largest deficit first, ties by task index
        sufs = []
        for vals in (np.where(in_i, best, 0.0), np.where(in_i, nxt, 0.0), np.where(in_i, np.abs(best), 0.0)):
            vals = np.take_along_axis(vals, order, axis=1)
            suf = np.zeros(rows)
            for j in range(k - 1, -1, -1):  # right to left, as the C++ suffix sums
                suf = vals[:, j] + suf
            sufs.append(suf)
        sufbest, sufcur, sufbabs = sufs
        s = acc + self.h[r - 1][u2]  # r < maxr here; h tables hold 0 at the empty set
        target = self.theta - self.gamma * (self.big_a + (mabsx + (accabs + sufbabs)))
        status = np.full(rows, -1, dtype=np.int64)
        status[s + sufbest < target] = 0
        status[s + sufcur >= target] = 1
        return status

    def _may_reach(self, c: np.ndarray, u: int, r: int) -> bool:
        acc = accabs = mabsx = 0.0
        defs: list[float] = []
        ords: list[int] = []
        for a in range(self.k):
            if (u >> a) & 1:
                mabsx += float(self.mabs[a])
                continue
            ca, ba = float(c[a]), float(self.best[a])
            if ba > ca:
                defs.append(ba - ca)
                ords.append(a)
            else:
                acc += ca
                accabs += abs(ca)
        order = sorted(range(len(defs)), key=lambda i: -defs[i])  # stable: ties keep task order
        ords = [ords[i] for i in order]
        n = len(ords)
        sufbest, sufcur, sufbabs = [0.0] * (n + 1), [0.0] * (n + 1), [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            a = ords[i]
            sufbest[i] = float(self.best[a]) + sufbest[i + 1]
            sufcur[i] = float(c[a]) + sufcur[i + 1]
            sufbabs[i] = abs(float(self.best[a])) + sufbabs[i + 1]
        theta, gamma, big_a = self.theta, self.gamma, self.big_a

        def esearch(i: int, x: int, acc: float, accabs: float, mabsx: float) -> bool:
            s = acc + self.hval(r, x)
            target = theta - gamma * (big_a + (mabsx + (accabs + sufbabs[i])))
            if s + sufcur[i] >= target:
                return True
            if s + sufbest[i] < target:
                return False
            if i == n:
                return False
            a = ords[i]
            if esearch(i + 1, x | (1 << a), acc, accabs, mabsx + float(self.mabs[a])):
                return True
            ca = float(c[a])
            return esearch(i + 1, x, acc + ca, accabs + abs(ca), mabsx)

        return esearch(0, u, acc, accabs, mabsx)


def _search_python(m: np.ndarray, budget: int, minimize: bool) -> tuple[float, list[int], int]:
    """(value in the rule's sign, increasing bitmasks, nodes): the pure-Python exact search."""
    value, groups, nodes = _PySearch(m, budget, minimize).run()
    return (-value if minimize else value), sorted(groups), nodes


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
