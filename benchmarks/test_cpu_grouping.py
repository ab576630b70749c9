"""Task grouping on one thread: the exact branch and bound (C++, ``mtdl_fast.select_groups``) against
the exhaustive reference (``mtdl_fast.grouping.exhaustive_groups``) where that finishes in a minute.
Matrices: "clustered" (symmetric N(0, 0.1) noise plus a bonus inside 2-4 hidden clusters, like measured
affinities) and "uniform" U(-1, 1); HOA: pair losses ``1 - clustered``, single-task losses on the
diagonal. Guard: the branch and bound finds the exhaustive optimum (to 1e-12) wherever that ran.
Targets: K=10 budget 4 under 2 s, K=12 budget 3 under 10 s.
"""
import numpy as np
import pytest

from mtdl_fast import grouping, select_groups

# (method, K, budget): the exhaustive search runs where ``collections`` is small enough.
CASES = {False: [("tag", 8, 3), ("tag", 8, 4), ("tag", 9, 3), ("tag", 9, 4), ("tag", 10, 3), ("tag", 10, 4),
                 ("tag", 12, 3), ("tag", 14, 4), ("tag", 16, 4), ("hoa", 10, 4), ("hoa", 12, 3)],
         True: [("tag", 6, 2), ("tag", 7, 3), ("hoa", 6, 3)]}
EXHAUSTIVE_MAX_COLLECTIONS = 2e8      # about 35 s at the reference's ~6 M collections/s
TARGETS = {(10, 4): "< 2 s", (12, 3): "< 10 s"}
_optimum: dict[tuple, float] = {}       # exhaustive optimum by (method, K, budget, kind)


def matrix(kind: str, method: str, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 100 * k)
    if kind == "uniform":
        z = rng.uniform(-1.0, 1.0, (k, k))
    else:
        a = rng.normal(0.0, 0.1, (k, k))
        cluster = rng.integers(0, int(rng.integers(2, 5)), k)
        z = 0.5 * (a + a.T) + 0.03 * rng.normal(size=(k, k)) + 0.1 * (cluster[:, None] == cluster[None, :])
    if method == "hoa":
        z = 1.0 - z
        np.fill_diagonal(z, 1.0 + 0.05 * rng.normal(size=k))
    return z


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    metafunc.parametrize("method,k,budget", CASES[metafunc.config.getoption("--quick")], ids=str)
    metafunc.parametrize("kind", ["clustered", "uniform"])


def _info(method: str, k: int, budget: int, kind: str, contender: str) -> dict:
    return {"case": f"{method.upper()} K={k} budget={budget} {kind}", "contender": contender,
            "columns": {"collections": grouping.exhaustive_collections(k, budget)}}


def test_exhaustive(benchmark, method: str, k: int, budget: int, kind: str) -> None:
    if grouping.exhaustive_collections(k, budget) > EXHAUSTIVE_MAX_COLLECTIONS:
        pytest.skip("the exhaustive search would take more than a minute")
    benchmark.group = "grouping"
    benchmark.extra_info.update(_info(method, k, budget, kind, "exhaustive"))
    res = benchmark.pedantic(grouping.exhaustive_groups, args=(matrix(kind, method, k), budget, method), rounds=1)
    _optimum[(method, k, budget, kind)] = res.score


def test_branch_and_bound(benchmark, method: str, k: int, budget: int, kind: str) -> None:
    m = matrix(kind, method, k)
    res = select_groups(m, budget, method)
    info = {**_info(method, k, budget, kind, "branch and bound (C++)"), "role": "reference"}
    info["columns"]["nodes"] = res.nodes
    if grouping.exhaustive_collections(k, budget) <= EXHAUSTIVE_MAX_COLLECTIONS:
        key = (method, k, budget, kind)
        best = _optimum[key] if key in _optimum else grouping.exhaustive_groups(m, budget, method).score
        assert abs(res.score - best) <= 1e-12, f"{key}: branch and bound {res.score} != exhaustive {best}"
        info["note"] = "finds the exhaustive optimum"
    benchmark.group = "grouping"
    benchmark.extra_info.update(info, **({"target": TARGETS[(k, budget)]} if (k, budget) in TARGETS else {}))
    benchmark(select_groups, m, budget, method)
