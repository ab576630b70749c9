"""Task weighting strategies (mtdl_fast.research.weighting): each on a case whose answer is known by hand
or from an independent computation (an explicit SVD for SVDReweighting), the `linear` contract,
state-dict resumption, the factory and input validation."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from mtdl_fast.research.weighting import (
    WEIGHTINGS,
    DynamicWeightAverage,
    MinMax,
    Static,
    Sum,
    SVDReweighting,
    UncertaintyWeighting,
    UniformTaskSampling,
    Weighting,
    make_weighting,
)


def leaf(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def grad_of(total, losses):
    (g,) = torch.autograd.grad(total, losses)
    return g


def roundtrip(module):
    """state_dict through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Sum / Static


def test_sum_total_weights_and_gradient():
    w = Sum(3)
    losses = leaf([1.0, 2.0, 3.5])
    total = w(losses)
    assert total.item() == 6.5
    assert torch.equal(w.weights(losses), torch.ones(3, dtype=torch.float64))
    assert torch.equal(grad_of(total, losses), torch.ones(3, dtype=torch.float64))
    assert w.linear


def test_static_total_and_gradient():
    w = Static([0.5, 2.0, 0.0])
    assert w.num_tasks == 3
    losses = leaf([4.0, 1.5, 100.0])
    total = w(losses)
    assert total.item() == 0.5 * 4.0 + 2.0 * 1.5
    assert torch.equal(grad_of(total, losses), torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64))
    from_tensor = Static(torch.tensor([1.0, 3.0]), num_tasks=2)
    assert torch.equal(from_tensor.weights(torch.ones(2)), torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -0.5], "non-negative"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([0.0, 0.0], "all be zero"),
        ([], "non-empty"),
        ([[1.0, 2.0]], "1-D"),
    ],
)
def test_static_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        Static(weights)


def test_static_length_must_match_num_tasks():
    with pytest.raises(ValueError, match="num_tasks = 3"):
        Static([1.0, 2.0], num_tasks=3)


# ---------------------------------------------------------------------------------------------
# MinMax


def test_minmax_picks_worst_task_and_gradient_flows_only_to_it():
    w = MinMax(4)
    losses = leaf([0.3, 2.5, 1.0, 2.4])
    total = w(losses)
    assert total.item() == 2.5
    expected = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(w.weights(losses), expected)
    assert torch.equal(grad_of(total, losses), expected)
    assert w.linear


def test_minmax_gradient_reaches_only_the_worst_tasks_parameters():
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    total = MinMax(2)(torch.stack([a * a, b * b]))
    total.backward()
    assert a.grad.item() == 0.0 and b.grad.item() == 6.0


def test_minmax_ties_pick_first_index():
    assert torch.equal(MinMax(3).weights(torch.tensor([1.0, 2.0, 2.0])), torch.tensor([0.0, 1.0, 0.0]))


def test_minmax_smooth_is_soft_maximum():
    t = 0.5
    w = MinMax(3, temperature=t)
    assert not w.linear
    losses = leaf([1.0, 2.0, 1.5])
    total = w(losses)
    expected = t * math.log(sum(math.exp(v / t) for v in [1.0, 2.0, 1.5]))
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert 2.0 <= total.item() <= 2.0 + t * math.log(3)
    # d total / d L = softmax(L / t) = weights
    weights = w.weights(losses)
    assert torch.allclose(weights, torch.softmax(losses.detach() / t, 0))
    assert torch.allclose(grad_of(total, losses), weights, atol=1e-14)
    # small temperature approaches the hard maximum
    assert MinMax(3, temperature=1e-3)(losses).item() == pytest.approx(2.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Uncertainty weighting


@pytest.mark.parametrize(
    "variant, optimum",
    [
        ("default", lambda L: torch.log(L)),
        ("regression", lambda L: torch.log(L)),
        ("classification", lambda L: torch.log(2 * L)),
    ],
)
def test_uncertainty_optimum_is_log_loss(variant, optimum):
    """For fixed L_k, exp(-s) L + s is minimised at s = log L (the regression form too; the
    classification form exp(-s) L + s/2 at log 2L): SGD on s alone finds it."""
    torch.manual_seed(0)
    fixed = torch.tensor([0.5, 1.0, 2.0, 4.0])
    w = UncertaintyWeighting(4, variant=variant)
    opt = torch.optim.SGD(w.parameters(), lr=0.2)
    for _ in range(250):
        opt.zero_grad()
        w(fixed).backward()
        opt.step()
    assert torch.allclose(w.log_vars.detach(), optimum(fixed), atol=1e-3)
    scale = 0.5 if variant == "regression" else 1.0
    assert torch.allclose(w.weights(fixed), scale * torch.exp(-w.log_vars.detach()))


def test_uncertainty_forward_value_weights_and_flags():
    w = UncertaintyWeighting(2, init_log_var=0.0)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([math.log(2.0), -1.0]))
    losses = leaf([3.0, 0.5])
    total = w(losses)
    expected = 3.0 / 2.0 + math.log(2.0) + 0.5 * math.e - 1.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(w.weights(losses), torch.tensor([0.5, math.e], dtype=torch.float64))
    assert not w.linear
    assert [name for name, _ in w.named_parameters()] == ["log_vars"]
    total.backward()
    assert w.log_vars.grad is not None  # learns through forward()
    assert w.weights(losses).requires_grad is False


def test_uncertainty_non_finite_loss_gives_non_finite_total():
    w = UncertaintyWeighting(2)
    assert not torch.isfinite(w(torch.tensor([1.0, float("nan")])))
    assert not torch.isfinite(w(torch.tensor([float("inf"), 1.0])))


def test_uncertainty_rejects_bad_variant():
    with pytest.raises(ValueError, match="variant"):
        UncertaintyWeighting(2, variant="bayes")


# ---------------------------------------------------------------------------------------------
# Dynamic Weight Average


def dwa_expected(prev2, prev1, T):
    r = torch.tensor(prev1, dtype=torch.float64) / torch.tensor(prev2, dtype=torch.float64)
    e = torch.exp(r / T)
    return len(prev1) * e / e.sum()


def test_dwa_hand_computed_weights():
    w = DynamicWeightAverage(3, temperature=2.0)
    ones = torch.ones(3, dtype=torch.float64)
    probe = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(w.weights(probe), ones)  # period 1
    w.step_end(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.equal(w.weights(probe), ones)  # period 2
    w.step_end(torch.tensor([0.5, 2.0, 6.0], dtype=torch.float64))
    # r = [0.5, 1, 2]; w = 3 exp(r/2) / sum exp(r/2)
    e = [math.exp(0.25), math.exp(0.5), math.exp(1.0)]
    expected = torch.tensor([3 * v / sum(e) for v in e], dtype=torch.float64)
    got = w.weights(probe)
    assert torch.allclose(got, expected, rtol=1e-12)
    assert got.sum().item() == pytest.approx(3.0, rel=1e-12)
    w.step_end(torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64))
    assert torch.allclose(w.weights(probe), dwa_expected([0.5, 2.0, 6.0], [0.5, 1.0, 3.0], 2.0), rtol=1e-12)


def test_dwa_period_averages_observations():
    w = DynamicWeightAverage(2, temperature=1.0, period=2)
    obs = [[1.0, 4.0], [3.0, 2.0], [1.0, 1.0], [1.0, 5.0]]  # period means [2, 3], [1, 3]
    probe = torch.zeros(2)
    for i, o in enumerate(obs):
        assert torch.equal(w.weights(probe), torch.ones(2))
        w.step_end(torch.tensor(o))
        assert int(w.periods_done) == (i + 1) // 2
    assert torch.allclose(w.weights(probe).double(), dwa_expected([2.0, 3.0], [1.0, 3.0], 1.0), rtol=1e-6)


def test_dwa_skips_non_finite_losses():
    w = DynamicWeightAverage(2, period=2)
    w.step_end(torch.tensor([1.0, 2.0]))
    before = {k: v.clone() for k, v in w.state_dict().items()}
    w.step_end(torch.tensor([float("nan"), 1.0]))
    w.step_end(torch.tensor([1.0, float("inf")]))
    after = w.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # history unchanged, not counted


def test_dwa_zero_loss_keeps_weights_finite():
    w = DynamicWeightAverage(3)
    w.step_end(torch.tensor([0.0, 0.0, 1.0]))
    w.step_end(torch.tensor([0.0, 1.0, 1.0]))
    got = w.weights(torch.zeros(3))
    assert torch.isfinite(got).all() and got.sum().item() == pytest.approx(3.0)
    assert got[1] == got.max()  # 0 -> 1 is the largest increase


# ---------------------------------------------------------------------------------------------
# SVD reweighting


def svd_data(K=4, B=240, D=12, C=4, noisy=3, seed=0):
    """K views of one labelled batch: features are class means plus per-view noise; tasks share
    the true labels except task `noisy`, whose labels are random."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.arange(B) % C
    features = means[y].unsqueeze(0) + 0.5 * torch.randn(K, B, D, generator=g, dtype=torch.float64)
    targets = y.unsqueeze(0).repeat(K, 1)
    targets[noisy] = torch.randint(0, C, (B,), generator=g)
    return features, targets


def reference_alpha(features, targets, C, r):
    """alpha_k = ||theta_k^T U_r|| from an explicit SVD of [theta_1 ... theta_K] (columns)."""
    cols = []
    for k in range(features.shape[0]):
        yk = F.one_hot(targets[k], C).double()
        cols.append((features[k].T @ yk).reshape(-1))
    m = torch.stack(cols, dim=1)  # (D*C, K)
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return (m.T @ u[:, :r]).norm(dim=1)


@pytest.mark.parametrize("center", [False, True])
def test_svd_noisy_task_gets_smallest_weight(center):
    features, targets = svd_data(noisy=3)
    w = SVDReweighting(4, num_classes=4, center=center)
    got = w.weights(torch.ones(4), features=features, targets=targets)
    assert got.argmin().item() == 3
    assert got[3] < 0.8 * got[:3].min()
    assert got.sum().item() == pytest.approx(4.0, rel=1e-6)
    assert w.linear


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_svd_matches_explicit_svd(rank):
    features, targets = svd_data(noisy=1, seed=1)
    w = SVDReweighting(4, rank=rank)  # num_classes read from the targets
    got = w.weights(torch.ones(4, dtype=torch.float64), features=features, targets=targets)
    alpha = reference_alpha(features, targets, 4, rank)
    assert torch.allclose(got, 4 * alpha / alpha.sum(), rtol=1e-8)


def test_svd_rank_above_bound_is_full_norm():
    features, targets = svd_data()
    norms = torch.stack([(features[k].T @ F.one_hot(targets[k], 4).double()).norm() for k in range(4)])
    for rank in (4, 100):
        w = SVDReweighting(4, rank=rank, num_classes=4)
        got = w.weights(torch.ones(4), features=features, targets=targets)
        assert torch.allclose(got.double(), 4 * norms / norms.sum(), rtol=1e-5)


def test_svd_keeps_weights_without_features_and_ema():
    features, targets = svd_data()
    w = SVDReweighting(4, num_classes=4, ema=0.5)
    probe = torch.ones(4, dtype=torch.float64)
    assert torch.equal(w.weights(probe), torch.ones(4, dtype=torch.float64))  # nothing seen yet
    first = w.weights(probe, features=features, targets=targets)
    assert torch.equal(w.weights(probe), first)  # kept
    features2, targets2 = svd_data(noisy=0, seed=5)
    fresh = SVDReweighting(4, num_classes=4).weights(probe, features=features2, targets=targets2)
    blended = w.weights(probe, features=features2, targets=targets2)
    assert torch.allclose(blended, 0.5 * first + 0.5 * fresh, rtol=1e-12)
    # non-finite features do not poison the estimate
    bad = features2.clone()
    bad[0, 0, 0] = float("nan")
    assert torch.equal(w.weights(probe, features=bad, targets=targets2), blended)


def test_svd_shared_and_float_targets():
    features, targets = svd_data(noisy=3)
    shared = SVDReweighting(4, num_classes=4).weights(torch.ones(4), features=features, targets=targets[0])
    per_task = targets.clone()
    per_task[3] = targets[0]
    w = SVDReweighting(4, num_classes=4)
    assert torch.allclose(shared, w.weights(torch.ones(4), features=features, targets=per_task))
    onehot = F.one_hot(targets, 4).double()  # (K, B, C) real-valued labels give the same theta
    assert torch.allclose(
        SVDReweighting(4).weights(torch.ones(4), features=features, targets=onehot),
        SVDReweighting(4, num_classes=4).weights(torch.ones(4), features=features, targets=targets),
    )


def test_svd_ignores_labels_outside_the_classes():
    features, targets = svd_data()
    ignored = targets.clone()
    ignored[:, :40] = -100
    got = SVDReweighting(4, num_classes=4).weights(torch.ones(4), features=features, targets=ignored)
    kept = SVDReweighting(4, num_classes=4).weights(
        torch.ones(4), features=features[:, 40:], targets=targets[:, 40:]
    )
    assert torch.allclose(got, kept, rtol=1e-10)


def test_svd_bad_inputs():
    features, targets = svd_data()
    with pytest.raises(ValueError, match="rank"):
        SVDReweighting(4, rank=0)
    with pytest.raises(ValueError, match="ema"):
        SVDReweighting(4, ema=1.0)
    with pytest.raises(ValueError, match="features"):
        SVDReweighting(3).weights(torch.ones(3), features=features, targets=targets[:3])
    with pytest.raises(ValueError, match="targets"):
        SVDReweighting(4).weights(torch.ones(4), features=features)
    with pytest.raises(ValueError, match="targets"):
        SVDReweighting(4).weights(torch.ones(4), features=features, targets=targets[:, :5])


# ---------------------------------------------------------------------------------------------
# Uniform task sampling


def test_uniform_sampling_frequencies_and_unbiased():
    K, m, N = 5, 2, 5000
    w = UniformTaskSampling(K, num_sampled=m, generator=123)
    draws = torch.stack([w.weights(torch.zeros(K, dtype=torch.float64)) for _ in range(N)])
    assert ((draws != 0).sum(dim=1) == m).all()  # m distinct tasks per draw
    assert torch.allclose(draws.sum(dim=1), torch.full((N,), float(K), dtype=torch.float64))
    assert set(draws.unique().tolist()) == {0.0, K / m}
    counts = (draws != 0).sum(dim=0).double()
    expected = N * m / K
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0  # 4 degrees of freedom: P(chi2 > 25) < 1e-4
    assert torch.allclose(draws.mean(dim=0), torch.ones(K, dtype=torch.float64), atol=0.08)


def test_uniform_sampling_reproducible_with_generator():
    a = UniformTaskSampling(6, 3, generator=torch.Generator().manual_seed(7))
    b = UniformTaskSampling(6, 3, generator=torch.Generator().manual_seed(7))
    losses = torch.ones(6)
    assert all(torch.equal(a.weights(losses), b.weights(losses)) for _ in range(20))
    torch.manual_seed(11)
    c = UniformTaskSampling(6, 3)
    torch.manual_seed(11)
    d = UniformTaskSampling(6, 3)
    assert all(torch.equal(c.weights(losses), d.weights(losses)) for _ in range(20))


def test_uniform_sampling_bad_arguments():
    for bad in (0, 4):
        with pytest.raises(ValueError, match="num_sampled"):
            UniformTaskSampling(3, num_sampled=bad)


# ---------------------------------------------------------------------------------------------
# the `linear` contract


def linear_cases():
    features, targets = svd_data()

    def dwa():
        w = DynamicWeightAverage(4)
        for o in ([1.0, 2.0, 3.0, 4.0], [0.7, 2.2, 2.0, 4.4]):
            w.step_end(torch.tensor(o))
        return w

    return [
        ("sum", Sum(4), {}),
        ("static", Static([0.1, 2.0, 0.0, 1.5]), {}),
        ("minmax", MinMax(4), {}),
        ("dwa", dwa(), {}),
        ("svd", SVDReweighting(4, num_classes=4), {"features": features, "targets": targets}),
        ("svd_kept", SVDReweighting(4, num_classes=4), {}),
        ("uniform", UniformTaskSampling(4, num_sampled=2, generator=3), {}),
    ]


@pytest.mark.parametrize("case", range(7))
def test_linear_forward_equals_weighted_sum_and_gradient_equals_weights(case):
    name, w, context = linear_cases()[case]
    assert w.linear, name
    losses = leaf([0.9, 1.7, 0.4, 2.2])
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in w.state_dict().items()}
    weights = w.weights(losses, **context)
    assert not weights.requires_grad
    w.load_state_dict(state)  # same draw / same estimate update for forward()
    total = w(losses, **context)
    assert torch.equal(total, (weights * losses).sum()), name
    assert torch.equal(w.last_weights, weights)
    assert torch.equal(grad_of(total, losses), weights), name


def test_nonlinear_strategies_say_so():
    assert not UncertaintyWeighting(3).linear
    assert not MinMax(3, temperature=1.0).linear
    assert MinMax(3).linear


# ---------------------------------------------------------------------------------------------
# state dict round trips


def test_dwa_state_dict_resumes_exactly():
    history = [[1.0, 2.0, 3.0], [0.8, 2.5, 2.0], [0.5, 2.0, 2.5], [0.6, 1.0, 3.0], [0.2, 0.9, 1.0]]
    a = DynamicWeightAverage(3, period=2)
    for o in history[:3]:
        a.step_end(torch.tensor(o))
    b = DynamicWeightAverage(3, period=2)
    b.load_state_dict(roundtrip(a))
    for o in history[3:]:
        a.step_end(torch.tensor(o))
        b.step_end(torch.tensor(o))
        assert torch.equal(a.weights(torch.zeros(3)), b.weights(torch.zeros(3)))
    assert int(b.periods_done) == 2


def test_uniform_state_dict_resumes_exactly():
    a = UniformTaskSampling(7, 3, generator=5)
    losses = torch.ones(7)
    for _ in range(10):
        a.weights(losses)
    b = UniformTaskSampling(7, 3, generator=999)
    b.load_state_dict(roundtrip(a))
    assert all(torch.equal(a.weights(losses), b.weights(losses)) for _ in range(30))


def test_uncertainty_and_svd_state_dict_round_trip():
    a = UncertaintyWeighting(3)
    with torch.no_grad():
        a.log_vars.copy_(torch.tensor([0.3, -0.2, 1.1]))
    b = UncertaintyWeighting(3)
    b.load_state_dict(roundtrip(a))
    losses = torch.tensor([1.0, 2.0, 0.5])
    assert torch.equal(a(losses), b(losses))

    features, targets = svd_data()
    s = SVDReweighting(4, num_classes=4)
    s.weights(torch.ones(4), features=features, targets=targets)
    t = SVDReweighting(4, num_classes=4)
    t.load_state_dict(roundtrip(s))
    assert torch.equal(s.weights(torch.ones(4)), t.weights(torch.ones(4)))
    assert bool(t.has_estimate)


# ---------------------------------------------------------------------------------------------
# factory, validation, dtypes


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_make_weighting_names(name):
    kwargs = {"weights": [1.0, 2.0, 3.0]} if name == "static" else {}
    w = make_weighting(name, 3, **kwargs)
    assert isinstance(w, WEIGHTINGS[name]) and isinstance(w, Weighting)
    assert w.num_tasks == 3
    assert w(torch.tensor([1.0, 2.0, 3.0])).ndim == 0


def test_make_weighting_kwargs_and_errors():
    assert make_weighting("dwa", 2, temperature=3.0).temperature == 3.0
    assert make_weighting("MinMax", 2, temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="sum, static, minmax, uncertainty, dwa, svd, uniform"):
        make_weighting("gradnorm", 3)
    with pytest.raises(ValueError, match="weights"):
        make_weighting("static", 3)
    with pytest.raises(ValueError, match="num_tasks = 3"):
        make_weighting("static", 3, weights=[1.0, 1.0])


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_losses_shape_is_checked(name):
    kwargs = {"weights": [1.0, 2.0, 3.0]} if name == "static" else {}
    w = make_weighting(name, 3, **kwargs)
    for bad in (torch.ones(4), torch.ones(3, 1), torch.ones(()), torch.ones(3, dtype=torch.int64)):
        with pytest.raises(ValueError, match="losses"):
            w(bad)
        with pytest.raises(ValueError, match="losses"):
            w.weights(bad)
    with pytest.raises(ValueError, match="losses"):
        w.step_end(torch.ones(2))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MinMax(3, temperature=0.0), "temperature"),
        (lambda: MinMax(3, temperature=-1.0), "temperature"),
        (lambda: MinMax(3, temperature=float("nan")), "temperature"),
        (lambda: DynamicWeightAverage(3, temperature=0.0), "temperature"),
        (lambda: DynamicWeightAverage(3, period=0), "period"),
        (lambda: Sum(0), "num_tasks"),
        (lambda: SVDReweighting(3, rank=-1), "rank"),
        (lambda: UncertaintyWeighting(3, init_log_var=float("inf")), "init_log_var"),
    ],
)
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_arguments_of_the_wrong_type_raise_type_error():
    with pytest.raises(TypeError, match="num_tasks"):
        Sum(2.5)
    with pytest.raises(TypeError, match="generator"):
        UniformTaskSampling(3, generator="seed")


def test_weights_dtype_and_device_follow_losses():
    pairs = ((torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32))
    strategies = (Sum(2), Static([1.0, 2.0]), MinMax(2), DynamicWeightAverage(2), UniformTaskSampling(2, generator=0))
    for dtype, expected in pairs:
        for w in strategies:
            out = w.weights(torch.ones(2, dtype=dtype))
            assert out.dtype == expected and out.device.type == "cpu"
