"""affinity_propagation against scikit-learn's AffinityPropagation(affinity="precomputed",
random_state=0), the degenerate cases, and input validation."""
import warnings

import numpy as np
import pytest
import torch

from mtdl_fast.research.affinity_propagation import AffinityPropagationWarning, affinity_propagation

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def sklearn_labels(s, **kwargs):
    """scikit-learn's labels and whether it warned about convergence."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sklearn_cluster.AffinityPropagation(affinity="precomputed", random_state=0, **kwargs)
        labels = model.fit(np.array(s, dtype=np.float64)).labels_
    return labels, any("did not converge" in str(w.message) for w in caught)


def ours(s, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = affinity_propagation(s, **kwargs)
    return labels, any(issubclass(w.category, AffinityPropagationWarning) for w in caught)


def assert_same_partition(a, b):
    """Equal up to a permutation of the cluster labels (-1 only where the other has -1)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(a < 0, b < 0), (a, b)
    forward, backward = {}, {}
    for x, y in zip(a.tolist(), b.tolist()):
        assert forward.setdefault(x, y) == y, (a, b)
        assert backward.setdefault(y, x) == x, (a, b)


def blobs(rng, n, centres):
    """Negative squared distances of n points around `centres` well-separated centres."""
    which = rng.integers(0, centres, n)
    x = rng.standard_normal((centres, 2))[which] * 6 + rng.standard_normal((n, 2)) * 0.4
    return -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), which


def random_case(rng, kind, n):
    if kind == "asymmetric":
        return rng.standard_normal((n, n))
    if kind == "symmetric":
        s = rng.standard_normal((n, n))
        return (s + s.T) / 2
    return blobs(rng, n, int(rng.integers(2, 5)))[0]


@pytest.mark.parametrize("kind", ["asymmetric", "symmetric", "blobs"])
@pytest.mark.parametrize("damping", [0.5, 0.75, 0.9])
def test_matches_sklearn_on_random_matrices(kind, damping):
    rng = np.random.default_rng([["asymmetric", "symmetric", "blobs"].index(kind), int(damping * 100)])
    for trial in range(16):
        n = int(rng.integers(2, 40))
        s = random_case(rng, kind, n)
        preference = [None, float(s.min()), float(np.median(s)), rng.standard_normal(n) - 1.0][trial % 4]
        ref, ref_warned = sklearn_labels(s, preference=preference, damping=damping)
        got, warned = ours(s, preference=preference, damping=damping)
        assert_same_partition(got, ref)
        assert warned == ref_warned


def test_well_separated_clusters_found():
    rng = np.random.default_rng(3)
    for centres in (2, 3, 4):
        s, truth = blobs(rng, 30, centres)
        got, _ = ours(s, preference=float(s.min()))
        ref, _ = sklearn_labels(s, preference=float(s.min()))
        assert_same_partition(got, ref)
    # Two tight, distant groups: exactly those two clusters with the default preference.
    x = np.array([0.0, 0.1, 0.2, 0.15, 10.0, 10.1, 10.3])
    s = -((x[:, None] - x[None, :]) ** 2)
    assert_same_partition(affinity_propagation(s), [0, 0, 0, 0, 1, 1, 1])


def test_ties_are_broken_like_sklearn_and_deterministically():
    # Small integer matrices are full of exact ties; the fixed perturbation decides them as
    # scikit-learn's random_state=0 does, and the same way on every call.
    rng = np.random.default_rng(11)
    for trial in range(40):
        n = int(rng.integers(2, 10))
        s = rng.integers(-3, 3, (n, n)).astype(float)
        if trial % 2:
            s = np.round((s + s.T) / 2)
        preference = [None, -1.0, 0.0, 1.0][trial % 4]
        ref, _ = sklearn_labels(s, preference=preference)
        got, _ = ours(s, preference=preference)
        assert_same_partition(got, ref)
        assert np.array_equal(ours(s, preference=preference)[0], got)


def test_torch_input_and_input_unchanged():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((12, 12))
    before = s.copy()
    t = torch.from_numpy(s.copy())
    assert np.array_equal(affinity_propagation(s), affinity_propagation(t))
    assert np.array_equal(s, before)
    assert torch.equal(t, torch.from_numpy(before))
    labels = affinity_propagation(t.to(torch.float32), preference=torch.tensor(-1.0))
    assert labels.dtype == np.int64 and labels.shape == (12,)


def test_single_point():
    assert affinity_propagation(np.array([[3.0]])).tolist() == [0]
    assert affinity_propagation(np.array([[3.0]]), preference=-10.0).tolist() == [0]
    assert sklearn_labels(np.array([[3.0]]))[0].tolist() == [0]


@pytest.mark.parametrize("n", [2, 3, 6])
@pytest.mark.parametrize("preference", [None, -2.0, 0.5, 1.0, 4.0])
def test_all_similarities_equal(n, preference):
    s = np.full((n, n), 1.0)
    s[np.diag_indices(n)] = np.linspace(-1, 2, n)  # the diagonal plays no part (preferences replace it)
    got, warned = ours(s, preference=preference)
    ref, _ = sklearn_labels(s, preference=preference)
    assert_same_partition(got, ref)
    assert not warned
    pref = np.median(s) if preference is None else preference
    # preference > similarity: every point its own cluster; otherwise (equality included) one cluster
    expected = np.arange(n) if pref > 1.0 else np.zeros(n, dtype=int)
    assert np.array_equal(got, expected)


def test_no_convergence_matches_sklearn():
    rng = np.random.default_rng(7)
    empty = partial = 0
    for trial in range(60):
        n = int(rng.integers(3, 12))
        s = rng.standard_normal((n, n))
        max_iter = [1, 2, 3, 5][trial % 4]
        ref, ref_warned = sklearn_labels(s, max_iter=max_iter)
        got, warned = ours(s, max_iter=max_iter)
        assert_same_partition(got, ref)
        assert warned == ref_warned
        if warned:
            empty += bool((got < 0).all())
            partial += bool((got >= 0).all())
    assert empty > 0 and partial > 0  # both outcomes exercised: -1 labels and last-iteration clusters
    with pytest.warns(AffinityPropagationWarning):
        affinity_propagation(rng.standard_normal((8, 8)), max_iter=3)


def test_convergence_iter_matches_sklearn():
    rng = np.random.default_rng(9)
    for convergence_iter in (1, 3, 30):
        for _ in range(5):
            s = rng.standard_normal((15, 15))
            ref, ref_warned = sklearn_labels(s, convergence_iter=convergence_iter)
            got, warned = ours(s, convergence_iter=convergence_iter)
            assert_same_partition(got, ref)
            assert warned == ref_warned


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(similarity=np.zeros((3, 4))), "similarity"),
        (dict(similarity=np.zeros(3)), "similarity"),
        (dict(similarity=np.zeros((0, 0))), "similarity"),
        (dict(similarity=np.array([[0.0, np.nan], [1.0, 0.0]])), "similarity"),
        (dict(similarity=np.array([[0.0, np.inf], [1.0, 0.0]])), "similarity"),
        (dict(similarity=[["a", "b"], ["c", "d"]]), "similarity"),
        (dict(similarity=np.zeros((3, 3)), preference=np.zeros(2)), "preference"),
        (dict(similarity=np.zeros((3, 3)), preference=float("nan")), "preference"),
        (dict(similarity=np.zeros((3, 3)), damping=0.4), "damping"),
        (dict(similarity=np.zeros((3, 3)), damping=1.0), "damping"),
        (dict(similarity=np.zeros((3, 3)), max_iter=0), "max_iter"),
        (dict(similarity=np.zeros((3, 3)), convergence_iter=0), "convergence_iter"),
    ],
)
def test_bad_input_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        affinity_propagation(**kwargs)
