"""mtdl_fast.grouping: the exact branch and bound (compiled) against the exhaustive reference on
random matrices (TAG and HOA, K <= 7 with budgets 1..4, K up to 10 with budget 2), hand-made cases
with a known answer, ties, edge cases, the greedy mode, the bootstrap against a plain loop, and bad
input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtdl_fast import grouping as G
from mtdl_fast._ext import ext

NEAR_TIE = 1e-9  # groups are compared when the second-best distinct total is further than this


def masks_of(groups):
    return sorted(sum(1 << t for t in g) for g in groups)


def make_matrix(kind: str, k: int, method: str, seed: int) -> np.ndarray:
    """Random matrices: "normal" (symmetric-ish N(0, 0.1), like measured affinities), "clusters"
    (plus a block structure), "uniform", "ties" (small integers: many exactly equal totals)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        a = rng.normal(0.0, 0.1, (k, k))
        m = 0.5 * (a + a.T) + 0.05 * rng.normal(size=(k, k))
    elif kind == "clusters":
        lab = rng.integers(0, 3, k)
        m = rng.normal(0.0, 0.1, (k, k)) + 0.2 * (lab[:, None] == lab[None, :])
    elif kind == "uniform":
        m = rng.uniform(-1.0, 1.0, (k, k))
    else:
        m = rng.integers(-2, 3, (k, k)).astype(np.float64)
    if method == "hoa":  # pairwise losses: positive, diagonal = single-task loss
        m = 1.0 + 0.5 * m if kind != "ties" else 3.0 + m
    return m


def check_against_reference(m: np.ndarray, budget: int, method: str) -> None:
    minimize = method == "hoa"
    stats: dict = {}
    ref_masks, _ = G._exhaustive(m, budget, minimize, stats)
    ref = G._result(m, ref_masks, method, None, 0, True, budget, "exhaustive")
    res = G.select_groups(torch.from_numpy(m), budget, method)
    assert res.backend == "extension" and res.exact
    assert abs(res.score - ref.score) <= 1e-12, (res.score, ref.score)
    # The optimum's value, as the exhaustive search sums it, agrees too.
    assert abs(ref.score - stats["best"] / m.shape[0]) <= 1e-12
    if abs(stats["best"] - stats["second"]) > NEAR_TIE:  # no near-tie: the same collection (exact ties included)
        assert res.groups == ref.groups, (res.groups, ref.groups)
        assert masks_of(res.groups) == sorted(ref_masks)
        assert res.serving == ref.serving


# ---- random matrices: compiled == exhaustive -----------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 7),
    budget=st.integers(1, 4),
    method=st.sampled_from(["tag", "hoa"]),
    kind=st.sampled_from(["normal", "clusters", "uniform", "ties"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_matches_exhaustive(k, budget, method, kind, seed):
    if k == 7:
        budget = min(budget, 3)  # K = 7, budget 4 (10.7 M collections) has its own test
    check_against_reference(make_matrix(kind, k, method, seed), budget, method)


@pytest.mark.parametrize("method,kind,seed", [("tag", "normal", 1), ("hoa", "uniform", 2), ("tag", "ties", 3)])
def test_k7_budget4_matches_exhaustive(method, kind, seed):
    check_against_reference(make_matrix(kind, 7, method, seed), 4, method)


@pytest.mark.parametrize("k,kind", [(8, "normal"), (9, "clusters"), (10, "ties")])
@pytest.mark.parametrize("method", ["tag", "hoa"])
def test_larger_k_budget2_matches_exhaustive(k, kind, method):
    """Up to ~0.5 M collections: the search's pruning at the sizes the tracker measures (K = 10)."""
    check_against_reference(make_matrix(kind, k, method, 100 + k), 2, method)


# ---- hand-made cases -----------------------------------------------------------------------------------


def two_clusters(method: str) -> np.ndarray:
    lab = np.array([0, 1, 0, 1, 1, 0])  # tasks {0, 2, 5} and {1, 3, 4}
    same = lab[:, None] == lab[None, :]
    if method == "tag":
        return np.where(same, 0.5, -0.5)
    return np.where(same, 1.0, 3.0)


@pytest.mark.parametrize("method", ["tag", "hoa"])
@pytest.mark.parametrize("exact", [True, False])
def test_two_clusters(method, exact):
    m = two_clusters(method)
    res = G.select_groups(m, 2, method, exact=exact)
    assert res.groups == [[0, 2, 5], [1, 3, 4]]
    assert res.serving == [0, 1, 0, 1, 1, 0]
    assert res.score == (0.5 if method == "tag" else 1.0)
    assert res.exact is exact
    ref = G.exhaustive_groups(m, 2, method)
    assert ref.groups == res.groups and ref.score == res.score


def test_budget_at_least_k():
    m = make_matrix("normal", 5, "tag", 7)
    at_k = G.select_groups(m, 5)
    for budget in (6, 31, 1000):
        res = G.select_groups(m, budget)
        assert res.groups == at_k.groups and res.score == at_k.score and res.budget == budget
    small = make_matrix("uniform", 3, "hoa", 8)  # 7 subsets only: budget 9 > 2^K - 1
    ref = G.exhaustive_groups(small, 9, "hoa")
    res = G.select_groups(small, 9, "hoa")
    assert res.groups == ref.groups and res.score == ref.score


def test_single_task():
    tag = G.select_groups(np.array([[0.3]]), 3, "tag")
    assert tag.groups == [[0]] and tag.serving == [0] and tag.score == G.TAG_SINGLETON
    hoa = G.select_groups(torch.tensor([[0.7]]), 1, "hoa", names=["only"])
    assert hoa.groups == [[0]] and hoa.score == pytest.approx(0.7) and "only" in str(hoa)


def test_ties_first_found_wins():
    # All collections covering the tasks without singletons score 0: the full set, found first.
    res = G.select_groups(np.zeros((5, 5)), 3)
    assert res.groups == [[0, 1, 2, 3, 4]] and res.score == 0.0
    hoa = G.select_groups(np.ones((4, 4)), 4, "hoa")
    assert hoa.groups == [[0, 1, 2, 3]] and hoa.score == 1.0
    # {0,1}+{2,3} and {0,2}+{1,3} both score 1; masks (3, 12) come before (5, 10).
    z = np.array([[0, 1, 1, -1], [1, 0, -1, 1], [1, -1, 0, 1], [-1, 1, 1, 0]], dtype=float)
    res = G.select_groups(z, 2)
    ref = G.exhaustive_groups(z, 2)
    assert res.groups == ref.groups == [[0, 1], [2, 3]] and res.score == ref.score == 1.0


def test_serving_and_scores_consistent():
    m = make_matrix("clusters", 7, "tag", 11)
    names = [f"task{i}" for i in range(7)]
    res = G.select_groups(m, 3, names=names)
    for t in range(7):
        g = res.serving_group(t)
        assert t in g
        best = max(G._member_scores(m, grp, False)[grp.index(t)] for grp in res.groups if t in grp)
        assert res.task_scores[t] == best
    assert res.score == pytest.approx(np.mean(res.task_scores), abs=1e-15)
    assert set().union(*map(set, res.groups)) == set(range(7))
    assert res.groups == sorted(res.groups) and all(g == sorted(g) for g in res.groups)
    text = str(res)
    assert "TAG grouping of 7 tasks" in text and all(n in text for n in names)


def test_input_types_agree():
    m = make_matrix("normal", 6, "tag", 5)
    a = G.select_groups(m, 3)
    assert G.select_groups(torch.from_numpy(m), 3).groups == a.groups
    assert G.select_groups(m.tolist(), np.int64(3)).groups == a.groups
    f32 = torch.from_numpy(m).float()
    assert G.select_groups(f32, 3).groups == G.select_groups(f32.double().numpy(), 3).groups


# ---- greedy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tag", "hoa"])
def test_greedy_feasible_and_not_better_than_exact(method):
    for seed in range(12):
        k, budget = 3 + seed % 6, 1 + seed % 4
        m = make_matrix(["normal", "clusters", "uniform"][seed % 3], k, method, 200 + seed)
        greedy = G.select_groups(m, budget, method, exact=False)
        best = G.select_groups(m, budget, method)
        assert not greedy.exact and greedy.backend == "greedy"
        assert 1 <= len(greedy.groups) <= budget
        assert set().union(*map(set, greedy.groups)) == set(range(k))
        if method == "tag":
            assert greedy.score <= best.score + 1e-12
        else:
            assert greedy.score >= best.score - 1e-12


def test_greedy_large_k():
    m = make_matrix("clusters", 40, "tag", 3)
    res = G.select_groups(m, 4, exact=False)
    assert not res.exact and len(res.groups) <= 4 and len(res.serving) == 40
    assert set().union(*map(set, res.groups)) == set(range(40))


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(affinity=np.zeros((3, 4))), "affinity must be a square"),
        (dict(affinity=np.zeros((2, 2, 2))), "affinity must be a square"),
        (dict(affinity=np.zeros((0, 0))), "at least one task"),
        (dict(affinity=np.array([[0.0, np.nan], [0.0, 0.0]])), "non-finite"),
        (dict(affinity=torch.tensor([[0.0, math.inf], [0.0, 0.0]])), "non-finite"),
        (dict(affinity=np.full((2, 2), 1e200)), "magnitude"),
        (dict(affinity=np.zeros((2, 2), dtype=complex)), "must be real"),
        (dict(affinity=np.array([["a", "b"], ["c", "d"]])), "must be numeric"),
        (dict(budget=0), "budget must be >= 1"),
        (dict(names=["a", "b"]), "names must have one name per task"),
        (dict(names="abc"), "names must be a sequence"),
        (dict(method="svd"), "method must be one of"),
        (dict(affinity=np.zeros((21, 21))), "exact=False"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(affinity=np.zeros((3, 3)), budget=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        G.select_groups(**args)


@pytest.mark.parametrize("budget", [1.5, True, "2"])
def test_budget_of_the_wrong_type_is_a_type_error(budget):
    with pytest.raises(TypeError, match="budget must be an int"):
        G.select_groups(np.zeros((3, 3)), budget)


def test_bad_input_exhaustive():
    with pytest.raises(ValueError, match="budget"):
        G.exhaustive_groups(np.zeros((3, 3)), 0)
    with pytest.raises(ValueError, match="method"):
        G.exhaustive_groups(np.zeros((3, 3)), 1, "nope")


def test_compiled_rejects_bad_input():
    with pytest.raises(RuntimeError, match="K <= 20"):
        ext().select_groups(torch.zeros(21, 21, dtype=torch.float64), 2, False)
    with pytest.raises(RuntimeError, match="budget"):
        ext().select_groups(torch.zeros(3, 3, dtype=torch.float64), 0, False)
    with pytest.raises(RuntimeError, match="non-finite"):
        ext().select_groups(torch.full((3, 3), math.nan, dtype=torch.float64), 1, False)
    with pytest.raises(RuntimeError, match="magnitude"):
        ext().select_groups(torch.full((3, 3), 1e200, dtype=torch.float64), 1, False)


def test_exhaustive_collection_count():
    assert G.exhaustive_collections(3, 2) == 7 + 21
    assert G.exhaustive_groups(np.zeros((3, 3)), 2).nodes == 28
    assert G.exhaustive_collections(2, 10) == sum(math.comb(3, m) for m in range(1, 4))


def test_without_the_extension_the_exact_search_says_how_to_build_it(monkeypatch):
    m = make_matrix("clusters", 6, "tag", 21)
    monkeypatch.setattr(G, "ext", lambda: None)
    with pytest.raises(RuntimeError, match=r"mtdl_fast\._C.*pip install --no-build-isolation -e \."):
        G.select_groups(m, 3)
    with pytest.raises(RuntimeError, match="mtdl_fast._C"):
        G.bootstrap_groups(np.stack([m, m]), 3, n_resamples=2)
    # the greedy search and the exhaustive reference are plain Python
    assert G.select_groups(m, 3, exact=False).backend == "greedy"
    assert G.exhaustive_groups(make_matrix("normal", 4, "tag", 1), 2).backend == "exhaustive"


# ---- bootstrap ------------------------------------------------------------------------------------------


def clustered_steps(n: int, noise: float, seed: int) -> np.ndarray:
    """n per-step affinity matrices: three clusters of tasks (affinity 0.05 inside, 0 across) plus
    independent N(0, noise) per entry and step."""
    lab = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    rng = np.random.default_rng(seed)
    return 0.05 * (lab[:, None] == lab[None, :]) + noise * rng.normal(size=(n, 10, 10))


def bootstrap_by_plain_loop(steps: np.ndarray, budget: int, n_resamples: int, seed: int):
    """The documented resampling, one select_groups call per resample, counted by hand."""
    n, k = steps.shape[0], steps.shape[1]
    chosen = G.select_groups(steps.mean(axis=0), budget)
    rng = np.random.default_rng(seed)
    selected, partners, seen = 0, [0] * k, {}
    for _ in range(n_resamples):
        res = G.select_groups(steps[rng.integers(0, n, size=n)].mean(axis=0), budget)
        selected += res.groups == chosen.groups
        for t in range(k):
            partners[t] += set(res.serving_group(t)) == set(chosen.serving_group(t))
        key = str(res.groups)
        seen[key] = seen.get(key, 0) + 1
    return chosen, selected, partners, seen


@pytest.mark.parametrize("noise,seed", [(0.01, 0), (0.05, 1), (0.2, 2)])
def test_bootstrap_counts_equal_a_plain_loop(noise, seed):
    steps = clustered_steps(12, noise, seed)
    got = G.bootstrap_groups(torch.from_numpy(steps), 3, n_resamples=60, seed=seed)
    chosen, selected, partners, seen = bootstrap_by_plain_loop(steps, 3, 60, seed)
    assert got.chosen.groups == chosen.groups and got.chosen.serving == chosen.serving
    assert got.selected == selected / 60
    assert got.partners == [p / 60 for p in partners]
    assert {str(g): c for g, c in got.groupings} == seen
    assert sum(c for _, c in got.groupings) == 60
    assert [c for _, c in got.groupings] == sorted((c for _, c in got.groupings), reverse=True)
    assert (got.n_resamples, got.n_steps, got.seed) == (60, 12, seed)


def test_bootstrap_clear_structure_is_stable_and_noise_is_not():
    clear = G.bootstrap_groups(clustered_steps(20, 0.01, 3), 3, n_resamples=200)
    assert clear.chosen.groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert clear.selected >= 0.99 and min(clear.partners) >= 0.99
    noise = G.bootstrap_groups(np.random.default_rng(4).normal(0.0, 0.01, (20, 10, 10)), 3, n_resamples=200)
    assert noise.selected <= 0.2 and np.mean(noise.partners) <= 0.5
    assert len(noise.groupings) > 20
    text = str(clear)
    assert "selected in 100.0%" in text and "same partners" in text


def test_bootstrap_is_deterministic_for_a_seed():
    steps = clustered_steps(10, 0.05, 5)
    a = G.bootstrap_groups(steps, 3, n_resamples=50, seed=7)
    b = G.bootstrap_groups(steps, 3, n_resamples=50, seed=7)
    c = G.bootstrap_groups(steps, 3, n_resamples=50, seed=8)
    assert a == b
    assert (a.selected, a.partners, a.groupings) != (c.selected, c.partners, c.groupings)


def test_bootstrap_bad_input():
    steps = clustered_steps(4, 0.01, 6)
    with pytest.raises(ValueError, match="at least 2 tracked steps, got 1"):
        G.bootstrap_groups(steps[:1], 2)
    with pytest.raises(ValueError, match="at least 2 tracked steps, got 0"):
        G.bootstrap_groups(steps[:0], 2)
    with pytest.raises(ValueError, match=r"\(n, K, K\)"):
        G.bootstrap_groups(steps[0], 2)
    bad = steps.copy()
    bad[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite entries.*\[2, 1, 3\]"):
        G.bootstrap_groups(bad, 2)
    with pytest.raises(TypeError, match="n_resamples must be an int"):
        G.bootstrap_groups(steps, 2, n_resamples=10.0)
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        G.bootstrap_groups(steps, 2, n_resamples=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        G.bootstrap_groups(steps, 2, seed=-1)
    with pytest.raises(TypeError, match="budget must be an int"):
        G.bootstrap_groups(steps, "2")
