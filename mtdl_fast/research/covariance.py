"""Covariance similarity between tasks' data (Wu, Zhang & Ré, "Understanding and Improving
Information Transfer in Multi-Task Learning", ICLR 2020): a training-free relatedness signal.

    s = covariance_similarity(x_i, x_j)                 # two tasks' (N, D...) features -> float in [0, 1]
    S = covariance_similarity_matrix(views)             # the K views of a batch (K, N, D...) -> (K, K)
    mf.select_groups(S, budget=3)                       # usable as a similarity by the group search

Definition. For task i with data X_i (N_i x D, rows the samples, uncentered), take the rank-r_i
approximation C_i = U_i D_i U_i^T of X_i^T X_i that keeps `energy` (the paper: 99%) of its singular
values, then

    score(i, j) = ||(U_i D_i^1/2)^T U_j D_j^1/2||_F / (||U_i D_i^1/2||_F ||U_j D_j^1/2||_F)
                = sqrt(tr(C_i C_j) / (tr C_i tr C_j)).

"Keeping `energy` of the singular values" is read here as: r_i is the smallest rank whose leading
singular values of X_i^T X_i (its eigenvalues, the squares of X_i's singular values) sum to at
least `energy` times the sum of all of them (cumulative sum of the singular values, in decreasing
order). `energy=1` keeps the exact X_i^T X_i.

Properties (tested): symmetric; in [0, 1] (tr(C_i C_j) <= ||C_i||_F ||C_j||_F <= tr C_i tr C_j for
positive semi-definite C); independent of the factorisation (any M_i with M_i M_i^T = C_i, e.g.
U_i D_i^1/2 Q for an orthogonal Q, gives the same score); unchanged by a rotation applied to both
tasks' features (X -> X Q) and by scale; changed by rotating one task alone, which is what
covariance alignment (`mtdl_fast.research.alignment`) undoes. Note that a task's score with
itself is ||C_i||_F / tr C_i, 1 only when C_i has rank one: the diagonal of the matrix is not 1.

Numerics: float64 SVD of each X_i (not an eigendecomposition of X_i^T X_i, which would square the
condition number); torch.linalg.svd runs on the input's device. The check that every task has a
non-zero covariance reads one value on the host.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["covariance_similarity", "covariance_similarity_matrix"]


def _check_energy(energy) -> float:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
        raise TypeError(f"energy must be a real number in (0, 1], got {energy!r}")
    energy = float(energy)
    if not (math.isfinite(energy) and 0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    return energy


def _as_float64_rows(name: str, x, leading: int) -> torch.Tensor:
    """x (lead..., N, D...) -> float64 (lead..., N, D), after checking type, rank, dtype, N and finiteness."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < leading + 2:
        shape = "(K, N, D...)" if leading else "(N, D...)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a real (floating or integer) tensor, got dtype {x.dtype}")
    if leading and x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one task (dimension 0), got shape {tuple(x.shape)}")
    samples = x.shape[leading]
    if samples < 2:
        raise ValueError(f"{name} must hold at least 2 samples (dimension {leading}), got {samples}")
    if math.prod(x.shape[leading + 1:]) == 0:
        raise ValueError(f"{name} has an empty feature dimension, shape {tuple(x.shape)}")
    rows = x.detach().reshape(*x.shape[: leading + 1], -1).to(torch.float64)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return rows


def _scaled_bases(x: torch.Tensor, energy: float) -> torch.Tensor:
    """(K, N, D) float64 -> (K, D, m) float64, m = min(N, D): U_k D_k^1/2 of each rank-r_k
    approximation of X_k^T X_k, the dropped components' columns zero.

    With X = W S V^T, X^T X = V S^2 V^T: U = V, D^1/2 = S. Component c is kept when the singular
    values of X^T X before it (S^2 in decreasing order) sum to less than `energy` of their total,
    i.e. r_k is the smallest rank reaching `energy`."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    power = s.square()
    before = torch.cumsum(power, dim=-1) - power
    kept = before < energy * power.sum(dim=-1, keepdim=True)
    return vh.transpose(-1, -2) * (s * kept).unsqueeze(-2)


def _traces(bases: torch.Tensor, names: list[str]) -> torch.Tensor:
    """||U_k D_k^1/2||_F^2 = tr C_k for each task; a zero trace (all-zero data) has no score."""
    traces = bases.square().sum(dim=(-2, -1))
    zero = traces == 0
    if bool(zero.any()):
        k = int(zero.nonzero()[0, 0])
        raise ValueError(f"{names[k]} is all zeros: its covariance has trace 0 and the score is undefined")
    return traces


def _scores(a: torch.Tensor, b: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """(Ka, D, ma), (Kb, D, mb) bases and their traces -> (Ka, Kb) float64 scores.

    One matmul per row task (memory Kb * ma * mb, not Ka * Kb * ma * mb): ||a_i^T b_j||_F^2 for all j."""
    kb, d, mb = b.shape
    flat_b = b.permute(1, 0, 2).reshape(d, kb * mb)
    cross = torch.stack([(a_i.T @ flat_b).reshape(-1, kb, mb).square().sum(dim=(0, 2)) for a_i in a])
    # tr(C_i C_j) <= tr C_i tr C_j exactly; clamping removes rounding above 1.
    return (cross / (ta[:, None] * tb[None, :])).sqrt().clamp(0.0, 1.0)


def covariance_similarity(features_i: torch.Tensor, features_j: torch.Tensor, energy: float = 0.99) -> float:
    """Covariance similarity score of two tasks' data (module docstring: definition and properties).

    Args:
        features_i: (N_i, D...) samples of task i (inputs or features; trailing dimensions are
            flattened to D; any real dtype, computed in float64), N_i >= 2.
        features_j: (N_j, D...) samples of task j, the same D... (N_j may differ from N_i).
        energy: share of the singular values of X^T X kept by each rank-r approximation, in (0, 1].

    Returns:
        The score, a float in [0, 1].

    Raises:
        TypeError: a non-tensor feature argument, or a non-number energy.
        ValueError: energy outside (0, 1]; fewer than 2 samples; feature shapes that differ; a
            complex or bool dtype; non-finite entries; all-zero data (the score is undefined).
    """
    energy = _check_energy(energy)
    x_i = _as_float64_rows("features_i", features_i, leading=0)
    x_j = _as_float64_rows("features_j", features_j, leading=0)
    if features_i.shape[1:] != features_j.shape[1:]:
        raise ValueError(f"features_i and features_j must have the same feature shape, got "
                         f"{tuple(features_i.shape[1:])} and {tuple(features_j.shape[1:])}")
    a = _scaled_bases(x_i.unsqueeze(0), energy)
    b = _scaled_bases(x_j.to(a.device).unsqueeze(0), energy)
    ta, tb = _traces(a, ["features_i"]), _traces(b, ["features_j"])
    return float(_scores(a, b, ta, tb)[0, 0])


def covariance_similarity_matrix(views_or_features: torch.Tensor, energy: float = 0.99) -> torch.Tensor:
    """The K x K covariance similarity scores of K tasks' data sets of N samples each.

    Args:
        views_or_features: (K, N, D...): the K views of a batch ((K, B, C, H, W), flattened per
            image) or trunk features ((K, B, D)); any real dtype, computed in float64; N >= 2.
        energy: share of the singular values kept by each rank-r approximation, in (0, 1].

    Returns:
        (K, K) float64 tensor on the input's device: S[i, j] = score(i, j), symmetric, in [0, 1].
        As a (K, K) similarity it can be passed to `mtdl_fast.select_groups` (TAG's rule reads the
        off-diagonal entries as the benefit of grouping).

    Raises:
        TypeError / ValueError: as `covariance_similarity` (a view of all zeros is named by index).
    """
    energy = _check_energy(energy)
    x = _as_float64_rows("views_or_features", views_or_features, leading=1)
    bases = _scaled_bases(x, energy)
    traces = _traces(bases, [f"views_or_features[{k}]" for k in range(x.shape[0])])
    scores = _scores(bases, bases, traces, traces)
    return (scores + scores.T) / 2  # exactly symmetric (the two triangles round differently)
