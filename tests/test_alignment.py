"""Covariance alignment (Wu, Zhang & Ré, ICLR 2020, Algorithm 1): identity alignment is the
unaligned trunk bit for bit, the batched path equals the per-view loop (outputs, gradients,
BatchNorm running statistics), the task-aware contract under vmap and the affinity tracker's
batch-statistics copy, the rotated-copy toy, the two-phase schedule, bad input."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtdl_fast.affinity import AffinityTracker, _batch_stat_copy
from mtdl_fast.lookahead import naive_affinity
from mtdl_fast.models import MLPTrunk, SmallResNet, linear_heads
from mtdl_fast.research.alignment import AlignmentSchedule, CovarianceAlignedTrunk
from mtdl_fast.research.covariance import covariance_similarity

K, B = 3, 4


def resnet(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet(1, width=4)


def views(seed: int = 1) -> torch.Tensor:
    return torch.rand(K, B, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def perturbed(trunk: CovarianceAlignedTrunk, seed: int = 2) -> CovarianceAlignedTrunk:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        trunk.alignment.add_(0.2 * torch.randn(trunk.alignment.shape, generator=g))
    return trunk


def buffers_equal(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


def test_identity_alignment_is_the_unaligned_trunk_exactly():
    plain = resnet()
    aligned = CovarianceAlignedTrunk(plain, K)  # a copy: `plain` is left as it was
    x = views()
    for k in range(K):  # train mode: batch statistics and running-statistic updates
        assert torch.equal(aligned(x[k], k), plain(x[k]))
    buffers_equal(aligned.trunk, plain)
    assert torch.equal(aligned.forward_views(x), torch.stack([plain(x[k]) for k in range(K)]))
    fresh = CovarianceAlignedTrunk(plain, K).eval()
    plain.eval()
    assert torch.equal(fresh(x[1], torch.tensor(1)), plain(x[1]))
    assert torch.equal(fresh.forward_views(x), torch.stack([plain(x[k]) for k in range(K)]))


@pytest.mark.parametrize("train", [True, False])
def test_forward_views_equals_the_per_view_loop(train):
    batched = perturbed(CovarianceAlignedTrunk(resnet(), K)).train(train)
    looped = copy.deepcopy(batched)
    x = views()
    out = batched.forward_views(x)
    expected = torch.stack([looped(x[k], k) for k in range(K)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    buffers_equal(batched, looped, atol=1e-6)  # running statistics: K sequential updates
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, p), (_, q) in zip(batched.named_parameters(), looped.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert batched.alignment.grad.abs().sum() > 0


def test_forward_views_with_momentum_none_batch_norm():
    trunk = resnet()
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    batched = perturbed(CovarianceAlignedTrunk(trunk, K))
    looped = copy.deepcopy(batched)
    for seed in (1, 2):  # a second step starts from n_0 = K batches already averaged
        x = views(seed)
        torch.testing.assert_close(batched.forward_views(x), torch.stack([looped(x[k], k) for k in range(K)]),
                                   atol=1e-6, rtol=1e-5)
        buffers_equal(batched, looped, atol=1e-6)


def test_task_tensor_under_vmap_and_the_trackers_batch_statistics_copy():
    aligned = perturbed(CovarianceAlignedTrunk(resnet(), K))
    x = views()
    expected = torch.stack([aligned(x[k], k) for k in range(K)])  # train mode: batch statistics
    # What AffinityTracker does: a weightless copy with batch-statistics BatchNorm, called with
    # the real tensors and a batched task index.
    clone = _batch_stat_copy(aligned).train()
    held = {**dict(clone.named_parameters()), **dict(clone.named_buffers())}
    called = {n: t for n, t in [*aligned.named_parameters(), *aligned.named_buffers()] if n in held}
    out = vmap(lambda k, v: functional_call(clone, called, (v, k)))(torch.arange(K), x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # Per-task gradients of the alignment under vmap(grad): only row k moves for task k.
    def loss(alignment, k, v):
        return functional_call(clone, {**called, "alignment": alignment}, (v, k)).square().sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(aligned.alignment.detach(), torch.arange(K), x)
    for k in range(K):
        others = [j for j in range(K) if j != k]
        assert grads[k, k].abs().sum() > 0 and torch.all(grads[k, others] == 0)


def test_align_the_input_of_an_mlp_trunk():
    torch.manual_seed(0)
    trunk = MLPTrunk(4, (6,))
    aligned = CovarianceAlignedTrunk(trunk, K, layer=None, channels=4)
    assert aligned.trunk is not trunk
    perturbed(aligned)
    x = torch.randn(B, 4)
    for k in range(K):
        torch.testing.assert_close(aligned(x, k), trunk(x @ aligned.alignment[k]))


def test_rotated_copy_regains_its_covariance_similarity_once_alignment_learns_the_inverse():
    """Task 1 is task 0's data rotated by Q. With the shared module and task 0 fixed, training
    only R_1 to reproduce task 0's outputs learns R_1 = Q^-1, and the covariance similarity of the
    aligned embedding X Q R_1 with X rises back to its unrotated value score(X, X)."""
    d, n = 4, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    shared = nn.Sequential(OrderedDict(embed=nn.Identity(), shared=nn.Linear(d, 6))).double()
    shared.requires_grad_(False)
    aligned = CovarianceAlignedTrunk(shared, 2, layer="embed", channels=d).double()
    target = aligned(x, 0).detach()
    rotated = x @ q
    unrotated, before = covariance_similarity(x, x), covariance_similarity(x, rotated)
    assert before < unrotated - 0.05
    optimizer = torch.optim.LBFGS([aligned.alignment], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(aligned(rotated, 1), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    learned = aligned.alignment[1].detach()
    torch.testing.assert_close(learned, q.T, atol=1e-5, rtol=0)
    assert torch.equal(aligned.alignment[0].detach(), torch.eye(d, dtype=torch.float64))  # task 0 untouched
    assert covariance_similarity(x, rotated @ learned) == pytest.approx(unrotated, abs=1e-6)


def test_schedule_holds_the_shared_module_fixed_then_fine_tunes_everything():
    aligned = CovarianceAlignedTrunk(resnet(), K)
    heads = linear_heads(K, aligned.out_features, 5)
    optimizer = torch.optim.SGD([*aligned.parameters(), *heads.parameters()], lr=0.1, momentum=0.9,
                                weight_decay=1e-3)
    schedule = AlignmentSchedule(aligned, optimizer, align_steps=2)
    y = torch.randint(0, 5, (B,), generator=torch.Generator().manual_seed(4))
    shared = {f"trunk.{n}" for n, _ in aligned.trunk.named_parameters()}

    def snapshot():
        return {n: p.detach().clone() for n, p in [*aligned.named_parameters(), *heads.named_parameters()]}

    def train_step(step: int) -> str:
        phase = schedule.update(step)
        features = aligned.forward_views(views(step))
        loss = sum(F.cross_entropy(heads[k](features[k]), y) for k in range(K))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return phase

    start = snapshot()
    assert [train_step(0), train_step(1)] == ["align", "align"]
    after_align = snapshot()
    for name, value in after_align.items():
        assert torch.equal(value, start[name]) == (name in shared), name  # only R and the heads moved
    assert not any(p in optimizer.state for p in aligned.trunk.parameters())  # no momentum from phase 1
    assert all(p.requires_grad for p in aligned.parameters())
    assert train_step(2) == "finetune"
    end = snapshot()
    assert all(not torch.equal(end[name], after_align[name]) for name in shared)
    schedule.remove()
    assert schedule.update(0) == "align" and schedule.phase(5) == "finetune"


def test_contract_and_names():
    aligned = CovarianceAlignedTrunk(resnet(), K)
    assert aligned.task_aware is True
    assert aligned.task_parameter_names() == ["alignment"]
    assert aligned.alignment.shape == (K, 4, 4) and aligned.channels == 4
    assert aligned.out_features == 16
    assert torch.equal(aligned.alignment, torch.eye(4).expand(K, 4, 4))
    assert {n for n, _ in aligned.named_parameters()} == {"alignment"} | {
        f"trunk.{n}" for n, _ in aligned.trunk.named_parameters()}


def test_bad_input():
    with pytest.raises(ValueError, match="layer 'stme' is not a submodule of the trunk"):
        CovarianceAlignedTrunk(resnet(), K, layer="stme")
    with pytest.raises(TypeError, match="trunk must be an nn.Module"):
        CovarianceAlignedTrunk("resnet", K)
    with pytest.raises(TypeError, match="layer must be a submodule name"):
        CovarianceAlignedTrunk(resnet(), K, layer=3)
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        CovarianceAlignedTrunk(resnet(), 0)
    with pytest.raises(ValueError, match="channels is required when layer is None"):
        CovarianceAlignedTrunk(resnet(), K, layer=None)
    with pytest.raises(ValueError, match="cannot read the width of layer 'stem.2'"):
        CovarianceAlignedTrunk(resnet(), K, layer="stem.2")  # a ReLU
    wrong = CovarianceAlignedTrunk(resnet(), K, channels=5)
    with pytest.raises(ValueError, match=r"output of layer 'stem' must have shape \(B, 5, ...\).*got \(4, 4, 8, 8\)"):
        wrong(views()[0], 0)
    aligned = CovarianceAlignedTrunk(resnet(), K)
    with pytest.raises(RuntimeError, match="call the CovarianceAlignedTrunk"):
        aligned.trunk(views()[0])
    with pytest.raises(ValueError, match=r"task must be in \[0, 3\), got 3"):
        aligned(views()[0], 3)
    with pytest.raises(TypeError, match="task must be an int or a 0-dim integer tensor, got float"):
        aligned(views()[0], 1.0)
    with pytest.raises(ValueError, match="task must be an integer tensor"):
        aligned(views()[0], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"views must have shape \(K=3, B, ...\), got \(2, 4, 1, 8, 8\)"):
        aligned.forward_views(views()[:2])
    optimizer = torch.optim.SGD(aligned.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="align_steps must be an int"):
        AlignmentSchedule(aligned, optimizer, 1.5)
    with pytest.raises(ValueError, match="align_steps must be >= 0, got -1"):
        AlignmentSchedule(aligned, optimizer, -1)
    with pytest.raises(TypeError, match="trunk must be a CovarianceAlignedTrunk"):
        AlignmentSchedule(resnet(), optimizer, 1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        AlignmentSchedule(aligned, [optimizer], 1)
    with pytest.raises(ValueError, match="step must be >= 0, got -2"):
        AlignmentSchedule(aligned, optimizer, 1).update(-2)


def test_affinity_tracker_holds_the_alignment_fixed_like_heads():
    """The tracker's batched path on an aligned trunk equals TAG's plain loop (float64)."""
    aligned = perturbed(CovarianceAlignedTrunk(resnet(), K)).double()
    heads = linear_heads(K, aligned.out_features, 5).double()
    x = views().double()
    y = torch.randint(0, 5, (B,), generator=torch.Generator().manual_seed(5))
    z = AffinityTracker(aligned, heads, lr=0.1, chunk_size=None).step(x, y)
    expected = naive_affinity(aligned, heads, x, y, 0.1)[0]
    torch.testing.assert_close(z, expected, atol=1e-9, rtol=1e-7)
