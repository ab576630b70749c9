"""Affinity propagation (Frey & Dueck, "Clustering by Passing Messages Between Data Points",
Science 315, 2007) on a precomputed similarity matrix, in numpy.

The grouping step of Selective Task Group Updates (`mtdl_fast.research.stgu`) clusters a K x K task
affinity matrix with it every batch, so the number of groups is chosen by the data. The result is
meant to equal `sklearn.cluster.AffinityPropagation(affinity="precomputed", random_state=0)` (see
`affinity_propagation` for the points where behaviour had to be chosen); scikit-learn is not a
runtime dependency.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

__all__ = ["AffinityPropagationWarning", "affinity_propagation"]


class AffinityPropagationWarning(UserWarning):
    """Affinity propagation stopped at max_iter without a stable set of exemplars."""


@functools.lru_cache(maxsize=64)
def _tie_noise(n: int) -> np.ndarray:
    """The fixed N(0, 1) draws of the tie-breaking perturbation (numpy's legacy RandomState(0))."""
    noise = np.random.RandomState(0).standard_normal(size=(n, n))
    noise.flags.writeable = False
    return noise


def _as_matrix(similarity) -> np.ndarray:
    if isinstance(similarity, torch.Tensor):
        similarity = similarity.detach().to("cpu", torch.float64).numpy()
    try:
        s = np.array(similarity, dtype=np.float64)  # always a copy: the caller's matrix is never touched
    except (TypeError, ValueError) as err:
        raise ValueError(f"similarity must be a square numeric matrix: {err}") from None
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
        raise ValueError(f"similarity must be a non-empty square (n, n) matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity must be finite (it contains NaN or inf)")
    return s


def _preferences(preference, s: np.ndarray) -> np.ndarray:
    n = s.shape[0]
    if preference is None:
        # scikit-learn's default: the median of the whole matrix, diagonal included.
        return np.full(n, np.median(s))
    if isinstance(preference, torch.Tensor):
        preference = preference.detach().to("cpu", torch.float64).numpy()
    try:
        p = np.array(preference, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"preference must be a number or an (n,) array: {err}") from None
    if p.ndim == 0:
        p = np.full(n, float(p))
    if p.shape != (n,):
        raise ValueError(f"preference must be a scalar or have shape ({n},), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("preference must be finite")
    return p


def _exemplar_labels(s: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
    """Assign every point to its most similar exemplar, refine each cluster's exemplar to the member
    with the largest summed similarity from the cluster (Frey & Dueck's final refinement), assign
    again, and number the clusters 0.. in the order of their exemplars' indices."""
    count = exemplars.size
    assign = np.argmax(s[:, exemplars], axis=1)
    assign[exemplars] = np.arange(count)
    refined = exemplars.copy()
    for c in range(count):
        members = np.flatnonzero(assign == c)
        within = s[np.ix_(members, members)].sum(axis=0)
        refined[c] = members[np.argmax(within)]
    assign = np.argmax(s[:, refined], axis=1)
    assign[refined] = np.arange(count)
    centres = refined[assign]
    return np.searchsorted(np.unique(centres), centres)


def affinity_propagation(
    similarity: torch.Tensor | np.ndarray,
    preference=None,
    damping: float = 0.5,
    max_iter: int = 200,
    convergence_iter: int = 15,
) -> np.ndarray:
    """Cluster n points from their pairwise similarities; returns the labels, an (n,) int64 array.

    Algorithm (Frey & Dueck 2007). Every point k is a candidate exemplar; s(i, k) is how well k
    would serve as i's exemplar, and the diagonal s(k, k) is replaced by the preference p_k (larger:
    more clusters). Two messages are exchanged, both starting at zero:

        responsibility  r(i, k) <- s(i, k) - max_{k' != k} [a(i, k') + s(i, k')]
        availability    a(i, k) <- min(0, r(k, k) + sum_{i' not in {i, k}} max(0, r(i', k)))  (i != k)
                        a(k, k) <- sum_{i' != k} max(0, r(i', k))

    each damped: message <- damping * old + (1 - damping) * new (responsibilities first, then the
    availabilities from the new responsibilities). After every iteration the exemplars are the
    points with r(k, k) + a(k, k) > 0. The run has converged when the exemplar set was the same in
    each of the last `convergence_iter` iterations, at least `convergence_iter + 1` iterations have
    run, and the set is not empty. Each point then goes to its most similar exemplar, each
    cluster's exemplar is re-chosen as the member with the largest summed similarity from the
    cluster's members (its own preference included), and the points are assigned once more. Labels are
    0..m-1, numbered in the order of the exemplars' indices.

    Args:
        similarity: (n, n) similarities, finite, any sign; a torch tensor or anything numpy reads.
            Not modified.
        preference: a number or (n,) array for the diagonal; None: the median of the whole matrix
            (diagonal included), scikit-learn's default.
        damping: in [0.5, 1).
        max_iter: most message-passing iterations (>= 1).
        convergence_iter: iterations with an unchanged exemplar set that stop the run (>= 1).

    Decisions (each matches scikit-learn's AffinityPropagation(affinity="precomputed",
    random_state=0)):

    * Ties: before the messages start, the matrix (preferences on its diagonal) gets the tiny
      deterministic perturbation Frey & Dueck use to remove degeneracies,
      s += (eps * s + 100 * tiny) * z with z ~ N(0, 1) drawn from numpy's legacy
      RandomState(0) (eps and tiny of float64). It only decides exact ties (common with
      integer-valued or constant-block similarities), deterministically, and the same way
      scikit-learn does with random_state=0. Remaining ties take the lowest index.
    * n == 1: label [0].
    * All off-diagonal similarities equal and all preferences equal: no messages are passed; if the
      preference is greater than the common similarity every point is its own cluster (labels
      0..n-1), otherwise (smaller or equal) one cluster (all labels 0). scikit-learn documents
      "smaller -> one cluster, otherwise n clusters" but its code sends equality to one cluster;
      this follows the code. scikit-learn also warns here; this function does not.
    * No convergence within max_iter: the exemplars of the last iteration are used as above with an
      `AffinityPropagationWarning`; if that set is empty, every label is -1 (also with the warning).

    Raises:
        ValueError: naming the argument, for a non-square, empty or non-finite similarity, a
            preference of the wrong shape or not finite, damping outside [0.5, 1), max_iter or
            convergence_iter < 1.
    """
    s = _as_matrix(similarity)
    if not isinstance(damping, (int, float, np.floating, np.integer)) or not 0.5 <= float(damping) < 1.0:
        raise ValueError(f"damping must be in [0.5, 1), got {damping!r}")
    for name, value in (("max_iter", max_iter), ("convergence_iter", convergence_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    damping = float(damping)
    n = s.shape[0]
    pref = _preferences(preference, s)

    if n == 1:
        return np.zeros(1, dtype=np.int64)
    off = ~np.eye(n, dtype=bool)
    if np.all(s[off] == s[off][0]) and np.all(pref == pref[0]):
        if pref[0] > s[off][0]:
            return np.arange(n, dtype=np.int64)
        return np.zeros(n, dtype=np.int64)

    diag = np.arange(n)
    s[diag, diag] = pref
    s += (np.finfo(np.float64).eps * s + np.finfo(np.float64).tiny * 100) * _tie_noise(n)

    resp = np.zeros((n, n))
    avail = np.zeros((n, n))
    work = np.empty((n, n))
    flat_work, flat_s = work.reshape(-1), s.reshape(-1)
    rows = np.arange(n) * n  # flat index of each row's first entry
    keep, take = damping, 1.0 - damping
    previous = b""
    stable = 0  # consecutive iterations (this one included) with the current exemplar set
    converged = False
    exemplar = np.zeros(n, dtype=bool)
    for it in range(max_iter):
        # Responsibilities: subtract the best competing a + s; for the best k itself, the runner-up.
        np.add(avail, s, out=work)
        best = rows + work.argmax(axis=1)
        first = flat_work[best]
        flat_work[best] = -np.inf
        second = work.max(axis=1)
        np.subtract(s, first[:, None], out=work)
        flat_work[best] = flat_s[best] - second
        resp *= keep
        work *= take
        resp += work

        # Availabilities: positive support each candidate collects, plus its self-responsibility.
        np.maximum(resp, 0.0, out=work)
        work[diag, diag] = resp[diag, diag]
        column = work.sum(axis=0)
        self_avail = column - work[diag, diag]
        np.subtract(column[None, :], work, out=work)
        np.minimum(work, 0.0, out=work)
        work[diag, diag] = self_avail
        avail *= keep
        work *= take
        avail += work

        exemplar = (avail[diag, diag] + resp[diag, diag]) > 0
        signature = exemplar.tobytes()
        stable = stable + 1 if signature == previous else 1
        previous = signature
        if it >= convergence_iter and stable >= convergence_iter and exemplar.any():
            converged = True
            break

    exemplars = np.flatnonzero(exemplar)
    if not converged:
        what = "returns the last iteration's clusters" if exemplars.size else "found no exemplar: labels are -1"
        warnings.warn(
            f"affinity propagation did not converge in {max_iter} iterations and {what}",
            AffinityPropagationWarning,
            stacklevel=2,
        )
    if exemplars.size == 0:
        return np.full(n, -1, dtype=np.int64)
    return _exemplar_labels(s, exemplars).astype(np.int64)
