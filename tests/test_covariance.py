"""Covariance similarity (Wu, Zhang & Ré, ICLR 2020): against a float64 NumPy reference built
another way (eigendecomposition of X^T X instead of the SVD of X), hand-computed cases, the
invariances, the K x K matrix over views, use by select_groups, bad input."""
import math

import numpy as np
import pytest
import torch

import mtdl_fast as mf
from mtdl_fast.research.covariance import covariance_similarity, covariance_similarity_matrix


def reference_covariance(x: np.ndarray, energy: float) -> np.ndarray:
    """The rank-r approximation of X^T X keeping `energy` of its singular values (eigenvalues),
    r the smallest rank whose leading values reach energy * total."""
    values, vectors = np.linalg.eigh(x.T @ x)
    values, vectors = values[::-1].clip(min=0), vectors[:, ::-1]
    r = int(np.searchsorted(np.cumsum(values), energy * values.sum() * (1 - 1e-12))) + 1
    return (vectors[:, :r] * values[:r]) @ vectors[:, :r].T


def reference_score(x_i: np.ndarray, x_j: np.ndarray, energy: float = 0.99) -> float:
    c_i, c_j = reference_covariance(x_i, energy), reference_covariance(x_j, energy)
    return math.sqrt(np.trace(c_i @ c_j) / (np.trace(c_i) * np.trace(c_j)))


def anisotropic(n: int, d: int, seed: int) -> torch.Tensor:
    """Features with well separated principal variances, float64."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis


def rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(40, 6), (5, 12)])  # more samples than features, and fewer
def test_trace_identity_against_eigendecomposition_reference(energy, shape):
    x_i, x_j = anisotropic(*shape, seed=1), anisotropic(*shape, seed=2)
    got = covariance_similarity(x_i, x_j, energy)
    assert got == pytest.approx(reference_score(x_i.numpy(), x_j.numpy(), energy), rel=1e-10, abs=1e-12)


def test_hand_computed_cases():
    # X^T X = diag(9, 1) and diag(0, 2): tr(C_i C_j) = 2, tr C_i = 10, tr C_j = 2.
    x_i = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    x_j = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert covariance_similarity(x_i, x_j, energy=0.99) == pytest.approx(math.sqrt(2 / 20))
    # 85% keeps only the first direction of x_i (9 of 10), which x_j does not have.
    assert covariance_similarity(x_i, x_j, energy=0.85) == 0.0
    # C_i = I, C_j = diag(2, 0): sqrt(2 / (2 * 2)).
    assert covariance_similarity(torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(
        1 / math.sqrt(2))
    # Rank one and the same direction: the score is 1; orthogonal directions: 0.
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert covariance_similarity(a, 3 * a) == pytest.approx(1.0)
    assert covariance_similarity(a, torch.tensor([[2.0, -1.0], [4.0, -2.0]])) == pytest.approx(0.0, abs=1e-15)


def test_energy_chooses_the_smallest_rank_reaching_it():
    # X^T X = diag(6, 3, 1): 59% keeps one direction, 61% two, 89% two, 91% all three (boundaries
    # avoided: at exactly 60% the kept rank would hang on the last bit of the SVD).
    x = torch.diag(torch.tensor([6.0, 3.0, 1.0]).sqrt())
    probe = torch.diag(torch.tensor([0.0, 0.0, 1.0]))  # sees only the third direction
    assert covariance_similarity(x, probe, energy=0.89) == 0.0
    assert covariance_similarity(x, probe, energy=0.91) == pytest.approx(math.sqrt(1 / 10))
    second = torch.diag(torch.tensor([0.0, 1.0, 0.0]))
    assert covariance_similarity(x, second, energy=0.59) == 0.0
    assert covariance_similarity(x, second, energy=0.61) == pytest.approx(math.sqrt(3 / 9))


def test_symmetric_and_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        d = 2 + trial
        x_i = torch.randn(12, d, generator=g) * torch.rand(d, generator=g)
        x_j = torch.randn(9, d, generator=g).abs()  # non-negative features (ReLU-like)
        s = covariance_similarity(x_i, x_j)
        assert s == pytest.approx(covariance_similarity(x_j, x_i), rel=1e-12)
        assert 0.0 <= s <= 1.0


def test_independent_of_the_factorisation():
    x_i, x_j = anisotropic(30, 5, seed=3), anisotropic(30, 5, seed=4)
    s = covariance_similarity(x_i, x_j)
    # The paper's formula on another factor M_i Q of the same C_i (M_i M_i^T = C_i): same score.
    c_i, c_j = reference_covariance(x_i.numpy(), 0.99), reference_covariance(x_j.numpy(), 0.99)
    w_i, v_i = np.linalg.eigh(c_i)
    w_j, v_j = np.linalg.eigh(c_j)
    m_i = (v_i * np.sqrt(w_i.clip(min=0))) @ rotation(5, 5).numpy()
    m_j = (v_j * np.sqrt(w_j.clip(min=0))) @ rotation(5, 6).numpy()
    formula = np.linalg.norm(m_i.T @ m_j) / (np.linalg.norm(m_i) * np.linalg.norm(m_j))
    assert s == pytest.approx(formula, rel=1e-9)
    # Data with the same X^T X (X -> P X, P orthogonal on the samples): the SVD's singular vectors
    # and their signs change, the score does not.
    assert covariance_similarity(rotation(30, 7) @ x_i, x_j) == pytest.approx(s, rel=1e-10)


def test_rotation_of_both_and_scale_leave_it_unchanged_rotating_one_does_not():
    x_i, x_j = anisotropic(50, 6, seed=8), anisotropic(50, 6, seed=9)
    q = rotation(6, 10)
    s = covariance_similarity(x_i, x_j)
    assert covariance_similarity(x_i @ q, x_j @ q) == pytest.approx(s, rel=1e-10)
    assert covariance_similarity(7.5 * x_i, 0.01 * x_j) == pytest.approx(s, rel=1e-10)
    assert abs(covariance_similarity(x_i @ q, x_j) - s) > 0.05
    # A task against a rotated copy of itself scores below its unrotated value.
    assert covariance_similarity(x_i, x_i @ q) < covariance_similarity(x_i, x_i) - 0.05


def test_matrix_over_views_equals_pairwise_scores():
    g = torch.Generator().manual_seed(11)
    views = torch.rand(4, 16, 1, 3, 3, generator=g) * torch.rand(4, 1, 1, 3, 3, generator=g)
    m = covariance_similarity_matrix(views, energy=0.95)
    assert m.shape == (4, 4) and m.dtype == torch.float64
    assert torch.equal(m, m.T)
    flat = views.flatten(2).double()
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == pytest.approx(covariance_similarity(flat[i], flat[j], 0.95), rel=1e-10)
            assert m[i, j].item() == pytest.approx(reference_score(flat[i].numpy(), flat[j].numpy(), 0.95),
                                                   rel=1e-9)


def test_uint8_images_are_read_as_numbers():
    g = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (3, 10, 1, 4, 4), generator=g, dtype=torch.uint8)
    expected = covariance_similarity_matrix(images.double())
    assert torch.equal(covariance_similarity_matrix(images), expected)


def test_select_groups_takes_the_matrix_as_a_similarity():
    # Two families of views: 0-2 share one covariance (up to noise), 3-5 another (rotated).
    base = anisotropic(60, 5, seed=13)
    q = rotation(5, 14)
    noise = torch.Generator().manual_seed(15)
    views = torch.stack([base + 0.05 * torch.randn(base.shape, generator=noise, dtype=torch.float64)
                         for _ in range(3)] + [base @ q + 0.05 * torch.randn(base.shape, generator=noise,
                                                                                dtype=torch.float64)
                                               for _ in range(3)])
    s = covariance_similarity_matrix(views)
    result = mf.select_groups(s, budget=2)
    assert result.groups == [[0, 1, 2], [3, 4, 5]]


def test_bad_input_names_the_argument_and_value():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 0.0"):
        covariance_similarity(x, x, energy=0.0)
    with pytest.raises(ValueError, match="energy must be in .*got 1.5"):
        covariance_similarity_matrix(x[None], energy=1.5)
    with pytest.raises(ValueError, match="energy .*got nan"):
        covariance_similarity(x, x, energy=float("nan"))
    with pytest.raises(TypeError, match="energy must be a real number"):
        covariance_similarity(x, x, energy="0.9")
    with pytest.raises(TypeError, match="energy must be a real number"):
        covariance_similarity(x, x, energy=True)
    with pytest.raises(ValueError, match="features_j must hold at least 2 samples .*got 1"):
        covariance_similarity(x, x[:1])
    with pytest.raises(ValueError, match=r"views_or_features must hold at least 2 samples \(dimension 1\), got 1"):
        covariance_similarity_matrix(torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match=r"same feature shape, got \(3,\) and \(4,\)"):
        covariance_similarity(x, torch.randn(5, 4))
    with pytest.raises(TypeError, match="features_i must be a torch.Tensor, got ndarray"):
        covariance_similarity(x.numpy(), x)
    with pytest.raises(ValueError, match=r"features_i must have shape \(N, D...\), got \(5,\)"):
        covariance_similarity(x[:, 0], x)
    with pytest.raises(ValueError, match=r"views_or_features must have shape \(K, N, D...\), got \(5, 3\)"):
        covariance_similarity_matrix(x)
    with pytest.raises(ValueError, match="dtype torch.complex64"):
        covariance_similarity(x.to(torch.complex64), x)
    with pytest.raises(ValueError, match="non-finite"):
        covariance_similarity(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), x[:, :2])
    with pytest.raises(ValueError, match=r"views_or_features\[1\] is all zeros"):
        covariance_similarity_matrix(torch.stack([x, torch.zeros_like(x)]))
    with pytest.raises(ValueError, match="empty feature dimension"):
        covariance_similarity(torch.zeros(4, 0), torch.zeros(4, 0))
