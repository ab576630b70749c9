"""Soft parameter sharing (CS330): the vmapped forward over the stacked copies equals K separate
forwards (outputs, gradients, BatchNorm running statistics), the penalty against a plain loop,
lambda -> infinity approaches hard sharing on a toy problem, the task-aware contract under vmap
and the affinity tracker's batch-statistics copy, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_alignment import B, K, buffers_equal, resnet, views
from torch import nn
from torch.func import functional_call, vmap

from mtdl_fast.affinity import AffinityTracker, _batch_stat_copy
from mtdl_fast.lookahead import naive_affinity
from mtdl_fast.models import linear_heads
from mtdl_fast.research.soft_sharing import SoftSharedTrunk


def diverged(trunk: SoftSharedTrunk, seed: int = 2) -> SoftSharedTrunk:
    """Copies moved apart, as training would move them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in trunk.task_parameter_names():
            p = trunk.get_parameter(name)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return trunk


def test_copies_start_as_the_given_trunk_which_is_left_alone():
    plain = resnet()
    before = copy.deepcopy(plain.state_dict())
    soft = SoftSharedTrunk(plain, K, lam=0.5).eval()
    plain.eval()
    x = views()
    for k in range(K):
        assert torch.equal(soft(x[k], k), plain(x[k]))
    assert soft.spread().item() == pytest.approx(0.0, abs=1e-10)  # the mean of equal copies rounds
    for name, value in plain.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("layers", [None, ["stem", "layers.1"]])
@pytest.mark.parametrize("train", [True, False])
def test_forward_views_equals_k_separate_forwards(layers, train):
    batched = diverged(SoftSharedTrunk(resnet(), K, lam=0.3, layers=layers)).train(train)
    looped = copy.deepcopy(batched)
    x = views()
    out = batched.forward_views(x)
    expected = torch.stack([looped(x[k], k) for k in range(K)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    buffers_equal(batched, looped, atol=1e-6)  # per-copy and shared running statistics
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * weights).sum() + batched.regularization()).backward()
    ((expected * weights).sum() + looped.regularization()).backward()
    for (name, p), (_, q) in zip(batched.named_parameters(), looped.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_copy_k_sees_only_view_k():
    soft = diverged(SoftSharedTrunk(resnet(), K, lam=0.0))
    x = views()
    out = soft.forward_views(x)
    out[1].sum().backward()
    for name in soft.task_parameter_names():
        g = soft.get_parameter(name).grad
        assert g[1].abs().sum() > 0 and torch.all(g[[0, 2]] == 0), name


def test_penalty_against_a_plain_loop():
    soft = diverged(SoftSharedTrunk(resnet(), K, lam=0.7, layers=["stem"]))
    expected = 0.0
    for name in soft.task_parameter_names():
        p = soft.get_parameter(name).detach().double()
        mean = sum(p[k] for k in range(K)) / K
        expected += sum(((p[k] - mean) ** 2).sum().item() for k in range(K))
    assert soft.regularization().item() == pytest.approx(0.7 * expected, rel=1e-5)
    assert soft.spread().item() == pytest.approx(expected, rel=1e-5)
    assert soft.task_parameter_names() == ["trunk.stem.0.weight", "trunk.stem.1.weight", "trunk.stem.1.bias"]


def test_task_tensor_under_vmap_and_the_trackers_batch_statistics_copy():
    soft = diverged(SoftSharedTrunk(resnet(), K, lam=0.1, layers=["stem"]))
    x = views()
    looped = copy.deepcopy(soft)
    expected = torch.stack([looped(x[k], k) for k in range(K)])  # train mode: batch statistics
    clone = _batch_stat_copy(soft).train()  # what AffinityTracker calls, with the real tensors
    held = {**dict(clone.named_parameters()), **dict(clone.named_buffers())}
    state = {n: t for n, t in [*soft.named_parameters(), *soft.named_buffers()] if n in held}
    out = vmap(lambda k, v: functional_call(clone, state, (v, k)))(torch.arange(K), x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    soft.eval()
    for k in range(K):
        assert torch.equal(soft(x[k], torch.tensor(k)), soft(x[k], k))


def test_lambda_to_infinity_approaches_hard_sharing():
    """A linear trunk under K fixed, different linear heads: the soft optimum tends to the
    hard-shared optimum as lambda grows (the copies' spread and the prediction gap fall ~1/lambda)."""
    d, h, n = 3, 2, 24
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(K, n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    heads = [nn.Linear(h, 1).double().requires_grad_(False) for _ in range(K)]
    start = nn.Linear(d, h).double()

    def fit(params, loss_fn):
        optimizer = torch.optim.LBFGS(params, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-16,
                                      history_size=50, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)

    hard = copy.deepcopy(start)
    fit(list(hard.parameters()), lambda: sum(F.mse_loss(heads[k](hard(x[k])), y[k]) for k in range(K)))
    hard_pred = torch.stack([heads[k](hard(x[k])) for k in range(K)]).detach()

    spreads, gaps = [], []
    for lam in (1.0, 10.0, 100.0, 1000.0):
        soft = SoftSharedTrunk(start, K, lam=lam)

        def soft_loss(soft=soft):
            features = soft.forward_views(x)
            return sum(F.mse_loss(heads[k](features[k]), y[k]) for k in range(K)) + soft.regularization()

        fit(list(soft.parameters()), soft_loss)
        features = soft.forward_views(x).detach()
        soft_pred = torch.stack([heads[k](features[k]) for k in range(K)])
        spreads.append(soft.spread().item())
        gaps.append((soft_pred - hard_pred).abs().max().item())
    # Measured: spreads 7e-2, 1e-3, 1e-5, 1e-7 and gaps 0.28, 0.034, 0.0035, 0.00035.
    for bigger in range(1, len(gaps)):
        assert spreads[bigger] < spreads[bigger - 1] / 50
        assert gaps[bigger] < gaps[bigger - 1] / 5
    assert gaps[-1] < 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match="lam must be a finite number >= 0, got -0.1"):
        SoftSharedTrunk(resnet(), K, lam=-0.1)
    with pytest.raises(ValueError, match="lam must be .*got inf"):
        SoftSharedTrunk(resnet(), K, lam=float("inf"))
    with pytest.raises(TypeError, match="lam must be a number"):
        SoftSharedTrunk(resnet(), K, lam="big")
    with pytest.raises(TypeError, match="trunk must be an nn.Module"):
        SoftSharedTrunk(None, K, lam=1.0)
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        SoftSharedTrunk(resnet(), 0, lam=1.0)
    with pytest.raises(ValueError, match="layer 'stme' is not a submodule of the trunk"):
        SoftSharedTrunk(resnet(), K, lam=1.0, layers=["stme"])
    with pytest.raises(TypeError, match="layers must be a sequence of submodule names"):
        SoftSharedTrunk(resnet(), K, lam=1.0, layers="stem")
    with pytest.raises(ValueError, match="layers overlap: 'stem.0' is inside 'stem'"):
        SoftSharedTrunk(resnet(), K, lam=1.0, layers=["stem", "stem.0"])
    with pytest.raises(ValueError, match="layers overlap: 'stem' is repeated"):
        SoftSharedTrunk(resnet(), K, lam=1.0, layers=["stem", "stem"])
    with pytest.raises(ValueError, match="hold no parameters"):
        SoftSharedTrunk(resnet(), K, lam=1.0, layers=["stem.2"])  # a ReLU
    soft = SoftSharedTrunk(resnet(), K, lam=1.0)
    with pytest.raises(ValueError, match=r"task must be in \[0, 3\), got -1"):
        soft(views()[0], -1)
    with pytest.raises(ValueError, match=r"views must have shape \(K=3, B, ...\)"):
        soft.forward_views(views()[0])
    soft.trunk.stem[1].momentum = None
    with pytest.raises(ValueError, match="copied BatchNorm layer 'stem.1' with momentum=None"):
        soft.forward_views(views())


def test_affinity_tracker_moves_only_the_hard_shared_remainder():
    """Partial soft sharing: the tracker holds the copies fixed like heads and equals TAG's plain
    loop (float64); a trunk copied whole has no shared parameters and is refused."""
    soft = diverged(SoftSharedTrunk(resnet(), K, lam=0.1, layers=["stem"])).double()
    heads = linear_heads(K, soft.out_features, 5).double()
    x = views().double()
    y = torch.randint(0, 5, (B,), generator=torch.Generator().manual_seed(5))
    z = AffinityTracker(soft, heads, lr=0.1, chunk_size=None).step(x, y)
    torch.testing.assert_close(z, naive_affinity(soft, heads, x, y, 0.1)[0], atol=1e-9, rtol=1e-7)
    whole = SoftSharedTrunk(resnet(), K, lam=0.1)
    with pytest.raises(ValueError, match="shared parameters"):
        AffinityTracker(whole, linear_heads(K, whole.out_features, 5), lr=0.1).step(views(), y)
