"""AffinityTracker against the plain TAG loop (float64, CPU), the optimizer preview against the real
optimizer step, and the tracker's bookkeeping, side effects and errors."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtdl_fast as mf
from mtdl_fast.affinity import AffinityTracker
from mtdl_fast.lookahead import naive_affinity, preview_update

K, B, CLASSES = 3, 6, 4


def mlp_model(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU()).double()
    heads = nn.ModuleList([nn.Linear(8, CLASSES) for _ in range(K)]).double()
    views = torch.randn(K, B, 3, 2, 2, dtype=torch.float64)
    return trunk, heads, views


def conv_bn_model(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2), nn.BatchNorm2d(6),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).double()
    heads = nn.ModuleList([nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, CLASSES)) for _ in range(K)]).double()
    views = torch.rand(K, B, 3, 7, 7, dtype=torch.float64)
    return trunk, heads, views


def labels(per_task: bool, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CLASSES, (K, B) if per_task else (B,), generator=g)


def snapshot(*modules):
    return [t.detach().clone() for m in modules for t in list(m.parameters()) + list(m.buffers())]


@pytest.mark.parametrize("model", [mlp_model, conv_bn_model])
@pytest.mark.parametrize("per_task", [False, True])
def test_batched_exact_equals_naive_loop(model, per_task):
    trunk, heads, views = model()
    y = labels(per_task)
    want, _, _ = naive_affinity(trunk, heads, views, y, lr=0.3)
    got = AffinityTracker(trunk, heads, lr=0.3).step(views, y)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert want.abs().max() > 1e-3  # the test compares something that moves


def make_optimizer(kind: str, params):
    return {
        "sgd_momentum": lambda: torch.optim.SGD(params, lr=0.2, momentum=0.9, dampening=0.1),
        "sgd_nesterov_wd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
        "adam": lambda: torch.optim.Adam(params, lr=0.01, weight_decay=0.001),
        "adamw_amsgrad": lambda: torch.optim.AdamW(params, lr=0.02, weight_decay=0.05, amsgrad=True),
    }[kind]()


def warm_up(optimizer, trunk, heads, views, y, steps=2):
    """A few real steps so the optimizer has momentum / moment state to preview."""
    for _ in range(steps):
        optimizer.zero_grad()
        sum(F.cross_entropy(heads[j](trunk(views[j])), y) for j in range(K)).backward()
        optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["sgd_momentum", "sgd_nesterov_wd", "adam", "adamw_amsgrad"])
def test_preview_equals_the_real_optimizer_step(kind):
    trunk, heads, views = mlp_model()
    y = labels(False)
    opt = make_optimizer(kind, list(trunk.parameters()) + list(heads.parameters()))
    warm_up(opt, trunk, heads, views, y)
    grads = [torch.randn_like(p) for p in trunk.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    preview = preview_update(list(trunk.parameters()), [g.unsqueeze(0) for g in grads], opt)
    assert str(opt.state_dict()) == str(state_before)  # the preview changed no optimizer state
    # reference: really step a copy of the optimizer with those gradients
    trunk_copy = copy.deepcopy(trunk)
    opt_copy = make_optimizer(kind, list(trunk_copy.parameters()))
    full = opt.state_dict()
    n = len(list(trunk.parameters()))
    opt_copy.load_state_dict({"state": {i: full["state"][i] for i in range(n) if i in full["state"]},
                              "param_groups": [{**full["param_groups"][0], "params": list(range(n))}]})
    for p, g in zip(trunk_copy.parameters(), grads):
        p.grad = g.clone()
    opt_copy.step()
    for got, want in zip(preview, trunk_copy.parameters()):
        assert torch.allclose(got[0], want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["sgd_momentum", "adam"])
def test_batched_exact_with_optimizer_equals_naive(kind):
    trunk, heads, views = conv_bn_model()
    y = labels(False)
    opt = make_optimizer(kind, list(trunk.parameters()) + list(heads.parameters()))
    warm_up(opt, trunk, heads, views, y)
    want, _, _ = naive_affinity(trunk, heads, views, y, optimizer=opt)
    got = AffinityTracker(trunk, heads, optimizer=opt).step(views, y)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_tracker_leaves_parameters_buffers_and_grads_untouched():
    trunk, heads, views = conv_bn_model()
    y = labels(False)
    for p in list(trunk.parameters()) + list(heads.parameters()):
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in list(trunk.parameters()) + list(heads.parameters())]
    before = snapshot(trunk, heads)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    tracker.step(views, y)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trunk, heads)))  # BN running stats included
    assert all(torch.equal(p.grad, g) for p, g in zip(list(trunk.parameters()) + list(heads.parameters()), grads))


@pytest.mark.parametrize("chunk_size, budget, pairs", [
    (None, None, K * K), (2, None, 2 * K), (1, None, K),
    ("auto", None, 1),   # CPU: a plain loop over (source, target) pairs
    ("auto", 10**12, 1),  # a budget only lowers the preferred size
    ("auto", 1, 1),
])
def test_chunking_and_memory_budget_do_not_change_the_result(chunk_size, budget, pairs):
    trunk, heads, views = conv_bn_model()
    y = labels(True)
    want, _, _ = naive_affinity(trunk, heads, views, y, lr=0.2)
    tracker = AffinityTracker(trunk, heads, lr=0.2, chunk_size=chunk_size, memory_budget=budget)
    got = tracker.step(views, y)
    assert tracker.pairs_per_call == pairs
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget, pairs", [(10**12, K * K), (4 * 1000, 4), (2 * 1000, 2), (10, 1)])
def test_budget_sets_the_pairs_per_call(monkeypatch, budget, pairs):
    """With CUDA's preference (everything batched) and a known cost per pair, the budget decides."""
    import mtdl_fast.affinity as affinity

    trunk, heads, views = conv_bn_model()
    y = labels(True)
    param_share = sum(p.nbytes for p in trunk.parameters()) // K
    monkeypatch.setattr(affinity, "_preferred_pairs", lambda k, device: k * k)
    monkeypatch.setattr(affinity, "_activation_bytes", lambda *args: 1000 - param_share)
    tracker = AffinityTracker(trunk, heads, lr=0.2, memory_budget=budget)
    got = tracker.step(views, y)
    assert tracker.pairs_per_call == pairs
    assert torch.allclose(got, naive_affinity(trunk, heads, views, y, lr=0.2)[0], atol=1e-6, rtol=0)


def test_activation_estimate_counts_layer_outputs_and_touches_nothing():
    from mtdl_fast.affinity import _activation_bytes

    trunk, heads, views = conv_bn_model()
    before = snapshot(trunk, heads)
    tracker = AffinityTracker(trunk, heads, lr=0.2)
    fm = tracker._model(F.cross_entropy)
    head = fm.head(True)
    head_state = {n: torch.stack([dict(h.named_parameters())[n].detach() for h in heads])
                  for n, _ in heads[0].named_parameters()}
    got = _activation_bytes(fm, fm.trunk(), head, fm.constants(fm.trunk()), fm.shared_params(), head_state, views[0])
    # input, then conv 5x7x7, BN, ReLU, conv 6x3x3, BN, ReLU, pool 6, flatten 6; head 7, 7, CLASSES
    per_image = 3 * 49 + 3 * 5 * 49 + 3 * 6 * 9 + 6 + 6 + 7 + 7 + CLASSES
    assert got == per_image * B * 8  # float64
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trunk, heads)))


def test_ragged_target_blocks():
    trunk, heads, views = conv_bn_model()
    y = labels(False)
    want, _, _ = naive_affinity(trunk, heads, views, y, lr=0.2)
    tracker = AffinityTracker(trunk, heads, lr=0.2)
    tracker.pairs_per_call = 2  # targets in blocks [0, 1], [2]
    assert torch.allclose(tracker.step(views, y), want, atol=1e-6, rtol=0)


def test_out_of_memory_halves_the_work_and_retries(monkeypatch):
    trunk, heads, views = conv_bn_model()
    y = labels(True)
    want, _, _ = naive_affinity(trunk, heads, views, y, lr=0.2)
    lookahead_calls, grad_calls = [], []
    real_blocks, real_grads = AffinityTracker._lookahead_blocks, AffinityTracker._task_grad_call

    def blocks(self, on_targets, sources, args, dims, pairs):
        lookahead_calls.append(pairs)
        if pairs > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_blocks(self, on_targets, sources, args, dims, pairs)

    def grads(self, fn, in_dims, chunk, args):
        grad_calls.append(chunk)
        if chunk > 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_grads(self, fn, in_dims, chunk, args)

    monkeypatch.setattr(AffinityTracker, "_lookahead_blocks", blocks)
    monkeypatch.setattr(AffinityTracker, "_task_grad_call", grads)
    tracker = AffinityTracker(trunk, heads, lr=0.2, chunk_size=None)
    tracker.grad_chunk = K  # as on CUDA: all tasks in one vmap
    with pytest.warns(UserWarning, match="out of memory"):
        got = tracker.step(views, y)
    assert lookahead_calls == [K * K, K * K // 2, 2] and grad_calls == [K, 1]
    assert (tracker.pairs_per_call, tracker.grad_chunk) == (2, 1)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    lookahead_calls.clear(), grad_calls.clear()
    tracker.step(views, y)  # later steps start from the sizes that fitted
    assert lookahead_calls == [2] and grad_calls == [1]


def test_out_of_memory_at_the_smallest_size_is_a_clear_error(monkeypatch):
    trunk, heads, views = mlp_model()

    def blocks(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(AffinityTracker, "_lookahead_blocks", blocks)
    tracker = AffinityTracker(trunk, heads, lr=0.2, memory_budget=1)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory with 1 lookahead"):
        tracker.step(views, labels(False))


def test_other_errors_are_not_retried(monkeypatch):
    trunk, heads, views = mlp_model()
    calls = []

    def blocks(self, *args):
        calls.append(1)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(AffinityTracker, "_lookahead_blocks", blocks)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        AffinityTracker(trunk, heads, lr=0.2, chunk_size=None).step(views, labels(False))
    assert calls == [1]


def test_first_order_is_the_gradient_gram_estimate():
    trunk, heads, views = mlp_model()
    y = labels(False)
    lr = 1e-4
    got = AffinityTracker(trunk, heads, lr=lr, mode="first_order").step(views, y)
    params = [p for p in trunk.parameters()]
    losses = [F.cross_entropy(heads[j](trunk(views[j])), y) for j in range(K)]
    values = [float(loss.detach()) for loss in losses]
    flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
            for i in range(K)]
    want = torch.tensor([[lr * float(flat[i] @ flat[j]) / values[j] for j in range(K)] for i in range(K)],
                        dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-15)
    exact = AffinityTracker(trunk, heads, lr=lr).step(views, y)
    assert torch.allclose(got, exact, rtol=1e-2, atol=1e-9)  # a first-order Taylor estimate of the exact value


def test_running_mean_ema_and_every():
    trunk, heads, views = mlp_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.1, every=2)
    ema = AffinityTracker(trunk, heads, lr=0.1, decay=0.9)
    zs = []
    for step in range(4):
        v = views + 0.1 * step
        z = tracker.step(v, y)
        assert (z is None) == (step % 2 == 1)
        if z is not None:
            zs.append(z)
        ema.step(v, y)
    assert tracker.steps == 2
    assert torch.allclose(tracker.affinity, torch.stack(zs).mean(0), atol=1e-12)
    naive = torch.stack([naive_affinity(trunk, heads, views + 0.1 * step, y, lr=0.1)[0] for step in range(4)])
    weights = 0.9 ** torch.arange(3, -1, -1, dtype=torch.float64)  # step t of n weighs d^(n - t)
    expected = (weights[:, None, None] * naive).sum(0) / weights.sum()
    assert torch.allclose(ema.affinity, expected, atol=1e-9)


def test_non_finite_losses_are_skipped_and_counted():
    trunk, heads, views = mlp_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    tracker.step(views, y)
    before = tracker.affinity.clone()
    bad = views.clone()
    bad[1, 0, 0] = float("nan")
    z = tracker.step(bad, y)
    assert torch.isnan(z).all()
    assert tracker.skipped_steps == 1 and tracker.steps == 1
    assert torch.equal(tracker.affinity, before)


def test_state_dict_round_trip_and_reset():
    trunk, heads, views = mlp_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    tracker.step(views, y)
    tracker.step(views * 0.5, y)
    restored = AffinityTracker(trunk, heads, lr=0.1)
    restored.load_state_dict(tracker.state_dict())
    assert torch.equal(restored.affinity, tracker.affinity) and restored.steps == 2
    tracker.step(views, y)
    restored.step(views, y)
    assert torch.equal(restored.affinity, tracker.affinity)
    tracker.reset()
    assert tracker.steps == 0 and torch.isnan(tracker.affinity).all()
    with pytest.raises(ValueError, match="tasks"):
        AffinityTracker(trunk, list(heads)[:2], lr=0.1).load_state_dict(restored.state_dict())


def test_apply_gradients_equals_backward_of_the_weighted_sum():
    trunk, heads, views = conv_bn_model()
    y = labels(True)
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    tracker.step(views, y)
    tracker.apply_gradients(weights)
    got = [p.grad.clone() for p in list(trunk.parameters()) + list(heads.parameters())]
    for p in list(trunk.parameters()) + list(heads.parameters()):
        p.grad = None
    sum(weights[j] * F.cross_entropy(heads[j](trunk(views[j])), y[j]) for j in range(K)).backward()
    want = [p.grad for p in list(trunk.parameters()) + list(heads.parameters())]
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))


def test_heterogeneous_heads_fall_back_to_the_loop():
    trunk, heads, views = mlp_model()
    y = labels(False)
    mixed = [heads[0], nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, CLASSES)).double(), heads[2]]
    with pytest.warns(UserWarning, match="plain loop"):
        tracker = AffinityTracker(trunk, mixed, lr=0.2)
    assert torch.allclose(tracker.step(views, y), naive_affinity(trunk, mixed, views, y, lr=0.2)[0], atol=1e-12)


@pytest.mark.parametrize("pairs", [K, 2, K * K])  # whole target batches, ragged blocks, sources batched
def test_fused_cross_entropy_path_equals_generic(pairs):
    trunk, heads, views = conv_bn_model()
    trunk, heads, views = trunk.float(), heads.float(), views.float()
    y = labels(True)
    generic = AffinityTracker(trunk, heads, lr=0.2, fused_ce=False).step(views, y)
    tracker = AffinityTracker(trunk, heads, lr=0.2, fused_ce=True)
    tracker.pairs_per_call = pairs
    assert torch.allclose(generic, tracker.step(views, y), atol=1e-5, rtol=0)


def test_bad_input_is_named():
    trunk, heads, views = mlp_model()
    y = labels(False)
    with pytest.raises(ValueError, match="lr"):
        AffinityTracker(trunk, heads, lr=0.0)
    with pytest.raises(ValueError, match="lr is required"):
        AffinityTracker(trunk, heads)
    with pytest.raises(ValueError, match="mode"):
        AffinityTracker(trunk, heads, lr=0.1, mode="second_order")
    with pytest.raises(ValueError, match=r"heads\[1\]"):
        AffinityTracker(trunk, [heads[0], nn.ReLU(), heads[2]], lr=0.1)
    with pytest.raises(ValueError, match="decay"):
        AffinityTracker(trunk, heads, lr=0.1, decay=1.5)
    with pytest.raises(TypeError, match="optimizer"):
        AffinityTracker(trunk, heads, optimizer=torch.optim.RMSprop(trunk.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="chunk_size must .* got 'big'"):
        AffinityTracker(trunk, heads, lr=0.1, chunk_size="big")
    with pytest.raises(ValueError, match="memory_budget .* got 0"):
        AffinityTracker(trunk, heads, lr=0.1, memory_budget=0)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    with pytest.raises(ValueError, match="K=2"):
        tracker.step(views[:2], y)
    with pytest.raises(ValueError, match="targets"):
        tracker.step(views, y[:4])


def test_exported_from_the_package():
    assert mf.AffinityTracker is AffinityTracker


def test_heads_with_batch_norm_in_train_and_eval_mode():
    trunk, _, views = mlp_model()
    torch.manual_seed(3)
    heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, CLASSES))
                          for _ in range(K)).double()
    y = labels(False)
    for train_mode in (True, False):
        heads.train(train_mode)
        before = snapshot(trunk, heads)
        want = naive_affinity(trunk, heads, views, y, lr=0.2)[0]
        got = AffinityTracker(trunk, heads, lr=0.2).step(views, y)
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trunk, heads)))


# ---- statistics: mean, standard error, counts and history against NumPy -------------------------------


def numpy_statistics(zs: np.ndarray, decay) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, stderr, n_eff) per entry of recorded per-step Z (n, K, K), all finite: weights
    keep^(n - t), reliability-weighted unbiased variance, stderr = sqrt(var / n_eff)."""
    n = zs.shape[0]
    w = (1.0 if decay is None else decay) ** np.arange(n - 1, -1, -1, dtype=np.float64)
    mean = np.average(zs, axis=0, weights=w)
    var = (w[:, None, None] * (zs - mean) ** 2).sum(0) / (w.sum() - (w**2).sum() / w.sum())
    n_eff = w.sum() ** 2 / (w**2).sum()
    return mean, np.sqrt(var / n_eff), np.full(mean.shape, n_eff)


@pytest.mark.parametrize("decay", [None, 0.8])
def test_statistics_equal_numpy_on_recorded_steps(decay):
    trunk, heads, views = mlp_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.3, decay=decay)
    zs = [tracker.step(views + 0.2 * torch.randn_like(views), y).numpy() for _ in range(6)]
    stack = np.stack(zs)
    mean, stderr, n_eff = numpy_statistics(stack, decay)
    np.testing.assert_allclose(tracker.affinity.numpy(), mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tracker.affinity_stderr.numpy(), stderr, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(tracker.affinity_n_eff.numpy(), n_eff, rtol=1e-13)
    assert (tracker.affinity_count == 6).all() and tracker.steps == 6
    assert torch.equal(tracker.history, torch.from_numpy(stack))
    assert (stderr > 1e-4).all()  # the steps differ: the test compares something that moves
    if decay is None:
        np.testing.assert_allclose(tracker.affinity_stderr.numpy(), stack.std(0, ddof=1) / np.sqrt(6), rtol=1e-9)


def test_stderr_needs_two_steps_and_history_is_bounded():
    trunk, heads, views = mlp_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.3, history_size=3)
    with pytest.raises(ValueError, match="at least 2 tracked steps, got 0"):
        _ = tracker.affinity_stderr
    assert tracker.history.shape == (0, K, K)
    zs = [tracker.step(views * (1 + 0.1 * t), y) for t in range(5)]
    assert torch.equal(tracker.history, torch.stack(zs[2:]))  # the most recent history_size steps
    assert tracker.steps == 5 and torch.allclose(tracker.affinity, torch.stack(zs).mean(0), atol=1e-15)


def test_stderr_with_one_step_is_a_clear_error():
    trunk, heads, views = mlp_model()
    tracker = AffinityTracker(trunk, heads, lr=0.3)
    tracker.step(views, labels(False))
    with pytest.raises(ValueError, match="affinity_stderr needs at least 2 tracked steps, got 1"):
        _ = tracker.affinity_stderr


def test_skipped_steps_leave_statistics_and_history_alone():
    trunk, heads, views = mlp_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    good = [tracker.step(views, y), tracker.step(views * 0.5, y)]
    before = (tracker.affinity.clone(), tracker.affinity_stderr.clone(), tracker.affinity_count.clone())
    bad = views.clone()
    bad[0, 1, 0] = float("inf")
    assert torch.isnan(tracker.step(bad, y)).all()
    assert tracker.skipped_steps == 1 and tracker.steps == 2
    after = (tracker.affinity, tracker.affinity_stderr, tracker.affinity_count)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(tracker.history, torch.stack(good))


# ---- state: checkpoints ------------------------------------------------------------------------------


def dropout_model(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 8),
                          nn.ReLU(), nn.Dropout(0.2)).double()
    heads = nn.ModuleList([nn.Sequential(nn.Dropout(0.1), nn.Linear(8, CLASSES)) for _ in range(K)]).double()
    views = torch.randn(K, B, 3, 2, 2, dtype=torch.float64)
    return trunk, heads, views


def test_state_dict_resumes_bit_identically_with_dropout():
    trunk, heads, views = dropout_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.1, decay=0.7, seed=5)
    for t in range(3):
        tracker.step(views * (1 + 0.1 * t), y)
    state = tracker.state_dict()
    assert state["history"].shape == (3, K, K) and state["moments"].shape == (4, K, K)
    restored = AffinityTracker(trunk, heads, lr=0.1, decay=0.7, seed=99)  # the saved generator wins
    restored.load_state_dict(state)
    for _ in range(2):
        assert torch.equal(tracker.step(views, y), restored.step(views, y))
    for name in ("affinity", "affinity_stderr", "affinity_count", "affinity_n_eff", "history"):
        assert torch.equal(getattr(tracker, name), getattr(restored, name)), name


def test_old_state_dict_is_refused_clearly():
    trunk, heads, views = mlp_model()
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    old = {"num_tasks": K, "decay": None, "total": torch.zeros(K, K, dtype=torch.float64),
           "count": torch.zeros(K, K, dtype=torch.int64), "skipped": torch.zeros((), dtype=torch.int64),
           "attempted": 0, "calls": 0}
    with pytest.raises(ValueError, match="version 1.*running sums only.*start the affinity afresh"):
        tracker.load_state_dict(old)
    with pytest.raises(ValueError, match="baseline='tag'"):
        AffinityTracker(trunk, heads, lr=0.1, baseline="shared_step").load_state_dict(tracker.state_dict())


# ---- the momentum term: baseline="shared_step" --------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd_momentum", "sgd_nesterov_wd", "adam"])
@pytest.mark.parametrize("model", [mlp_model, conv_bn_model])
def test_shared_step_baseline_equals_naive(kind, model):
    trunk, heads, views = model()
    y = labels(True)
    opt = make_optimizer(kind, list(trunk.parameters()) + list(heads.parameters()))
    warm_up(opt, trunk, heads, views, y[0])
    want, base, _ = naive_affinity(trunk, heads, views, y, optimizer=opt, baseline="shared_step")
    tag, tag_base, _ = naive_affinity(trunk, heads, views, y, optimizer=opt)
    for chunk_size in ("auto", None, 2):
        got = AffinityTracker(trunk, heads, optimizer=opt, baseline="shared_step", chunk_size=chunk_size).step(views, y)
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(base, tag_base, rtol=1e-3)  # the shared step moves the denominator
    assert (want - tag).abs().max() > 1e-3


def test_shared_step_is_tag_for_plain_sgd():
    trunk, heads, views = conv_bn_model()
    y = labels(False)
    tag = AffinityTracker(trunk, heads, lr=0.2).step(views, y)
    shared = AffinityTracker(trunk, heads, lr=0.2, baseline="shared_step").step(views, y)
    assert torch.allclose(tag, shared, atol=1e-12, rtol=0)
    opt = torch.optim.SGD(list(trunk.parameters()), lr=0.2)  # no momentum, no weight decay: u(0) = 0
    shared_opt = AffinityTracker(trunk, heads, optimizer=opt, baseline="shared_step").step(views, y)
    assert torch.allclose(tag, shared_opt, atol=1e-12, rtol=0)
    naive_tag = naive_affinity(trunk, heads, views, y, lr=0.2)
    naive_shared = naive_affinity(trunk, heads, views, y, lr=0.2, baseline="shared_step")
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(naive_tag, naive_shared))


def test_shared_step_on_the_fused_cross_entropy_path():
    trunk, heads, views = conv_bn_model()
    trunk, heads, views = trunk.float(), heads.float(), views.float()
    y = labels(True)
    opt = make_optimizer("sgd_momentum", list(trunk.parameters()) + list(heads.parameters()))
    warm_up(opt, trunk, heads, views, y[0])
    generic = AffinityTracker(trunk, heads, optimizer=opt, baseline="shared_step", fused_ce=False).step(views, y)
    fused = AffinityTracker(trunk, heads, optimizer=opt, baseline="shared_step", fused_ce=True).step(views, y)
    assert torch.allclose(generic, fused, atol=1e-5, rtol=0)


def test_baseline_bad_input():
    trunk, heads, _ = mlp_model()
    with pytest.raises(ValueError, match="baseline must be one of"):
        AffinityTracker(trunk, heads, lr=0.1, baseline="momentum")
    with pytest.raises(ValueError, match="needs mode='exact'"):
        AffinityTracker(trunk, heads, lr=0.1, baseline="shared_step", mode="first_order")
    with pytest.raises(ValueError, match="baseline must be one of"):
        naive_affinity(trunk, heads, torch.zeros(K, B, 3, 2, 2), labels(False), lr=0.1, baseline="x")
    with pytest.raises(TypeError, match="seed must be an int"):
        AffinityTracker(trunk, heads, lr=0.1, seed=1.5)
    with pytest.raises(ValueError, match="history_size must be >= 1"):
        AffinityTracker(trunk, heads, lr=0.1, history_size=0)


# ---- randomness: the tracker's own generator, the same masks for base and lookahead -------------------


@pytest.mark.parametrize("chunk_size", ["auto", None])
def test_dropout_the_global_rng_does_not_move_and_equals_naive_with_the_step_seed(chunk_size):
    trunk, heads, views = dropout_model()
    y = labels(False)
    tracker = AffinityTracker(trunk, heads, lr=0.2, seed=3, chunk_size=chunk_size)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    z = tracker.step(views, y)
    assert torch.equal(torch.get_rng_state(), before)
    want, _, _ = naive_affinity(trunk, heads, views, y, lr=0.2, seed=tracker._step_seed)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.allclose(z, want, atol=1e-10, rtol=0)


def test_dropout_masks_are_shared_so_a_tiny_step_gives_a_tiny_z():
    """With the same masks in base and lookahead evaluations Z -> 0 with the step; drawing fresh
    masks (the global stream, seed=None) leaves mask noise of the size of Z itself."""
    trunk, heads, views = dropout_model()
    y = labels(False)
    z = AffinityTracker(trunk, heads, lr=1e-9).step(views, y)
    assert z.abs().max() < 1e-7
    noisy, _, _ = naive_affinity(trunk, heads, views, y, lr=1e-9)
    assert noisy.abs().max() > 1e-3


def test_same_seed_bit_identical_and_other_seed_differs():
    trunk, heads, views = dropout_model()
    y = labels(True)
    runs = []
    for seed in (7, 7, 8):
        tracker = AffinityTracker(trunk, heads, lr=0.2, seed=seed)
        zs = [tracker.step(views * (1 + 0.1 * t), y) for t in range(3)]
        runs.append((torch.stack(zs), tracker.affinity_stderr))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_determinism_affinity_and_groups():
    """Same seed, threads and device: bit-identical statistics and the same groups (and bootstrap)."""
    from mtdl_fast.grouping import bootstrap_groups, select_groups

    def run():
        trunk, heads, views = dropout_model(seed=11)
        y = labels(False, seed=12)
        opt = make_optimizer("sgd_momentum", list(trunk.parameters()) + list(heads.parameters()))
        tracker = AffinityTracker(trunk, heads, optimizer=opt, baseline="shared_step", seed=2)
        for t in range(4):
            tracker.step(views * (1 + 0.05 * t), y)
        return (tracker.affinity, tracker.affinity_stderr, select_groups(tracker.affinity, 2),
                bootstrap_groups(tracker.history, 2, n_resamples=20))

    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2] and a[3] == b[3]


# ---- task-aware trunks --------------------------------------------------------------------------------


class AlignedTrunk(nn.Module):
    """A per-task alignment matrix applied to the flattened input, then a shared MLP."""

    task_aware = True

    def __init__(self):
        super().__init__()
        self.align = nn.Parameter(torch.eye(12).repeat(K, 1, 1) + 0.2 * torch.randn(K, 12, 12))
        self.body = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU())

    def task_parameter_names(self) -> list[str]:
        return ["align"]

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        # index_select, not align[task]: a vmapped 0-dim task tensor cannot become a Python index
        align = self.align[task] if isinstance(task, int) else self.align.index_select(0, task.reshape(1))[0]
        return self.body(x.flatten(1) @ align.T)


def aligned_model(seed: int = 0):
    torch.manual_seed(seed)
    trunk = AlignedTrunk().double()
    heads = nn.ModuleList([nn.Linear(8, CLASSES) for _ in range(K)]).double()
    return trunk, heads, torch.randn(K, B, 3, 2, 2, dtype=torch.float64)


@pytest.mark.parametrize("chunk_size", ["auto", None])
def test_task_aware_trunk_equals_naive_and_holds_per_task_parameters_fixed(chunk_size):
    trunk, heads, views = aligned_model()
    y = labels(True)
    opt = make_optimizer("sgd_momentum", list(trunk.parameters()) + list(heads.parameters()))
    warm_up_aligned(opt, trunk, heads, views, y)
    want, _, lookahead = naive_affinity(trunk, heads, views, y, optimizer=opt)
    tracker = AffinityTracker(trunk, heads, optimizer=opt, chunk_size=chunk_size)
    tracker.grad_chunk = None if chunk_size == "auto" else K  # vmap over the tasks, as on CUDA
    got = tracker.step(views, y)
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and want.abs().max() > 1e-3
    # the reference: moving the alignment matrices too would give other lookahead losses
    moved = copy.deepcopy(trunk)
    moved.task_parameter_names = lambda: []
    assert not torch.allclose(naive_affinity(moved, heads, views, y, optimizer=opt)[2], lookahead, atol=1e-6)


def warm_up_aligned(optimizer, trunk, heads, views, y):
    for _ in range(2):
        optimizer.zero_grad()
        sum(F.cross_entropy(heads[j](trunk(views[j], j)), y[j]) for j in range(K)).backward()
        optimizer.step()
    optimizer.zero_grad()


def test_task_aware_trunk_apply_gradients_equals_backward():
    trunk, heads, views = aligned_model(1)
    y = labels(True)
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    tracker.step(views, y)
    assert set(tracker.last_task_grads["task"]) == {"align"} and "align" not in tracker.last_task_grads["shared"]
    tracker.apply_gradients(weights)
    params = list(trunk.parameters()) + list(heads.parameters())
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    sum(weights[j] * F.cross_entropy(heads[j](trunk(views[j], j)), y[j]) for j in range(K)).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-10) for a, p in zip(got, params))


def test_task_parameter_names_must_exist():
    trunk, heads, _ = aligned_model()
    trunk.task_parameter_names = lambda: ["align", "nope"]
    with pytest.raises(ValueError, match="nope"):
        AffinityTracker(trunk, heads, lr=0.1)


# ---- autocast, optimizers, host synchronisation ---------------------------------------------------------


def test_apply_gradients_under_autocast_writes_each_parameters_dtype():
    trunk, heads, views = conv_bn_model()
    trunk, heads, views = trunk.float(), heads.float(), views.float()
    y = labels(True)
    weights = torch.tensor([0.5, 1.0, 2.0])
    tracker = AffinityTracker(trunk, heads, lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracker.step(views, y)
        tracker.apply_gradients(weights)
    params = list(trunk.parameters()) + list(heads.parameters())
    got = [p.grad.clone() for p in params]
    assert all(g.dtype == torch.float32 for g in got)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = sum(weights[j] * F.cross_entropy(heads[j](trunk(views[j])), y[j]) for j in range(K))
    total.backward()
    for a, p in zip(got, params):
        assert torch.allclose(a, p.grad, rtol=0.05, atol=0.05 * p.grad.abs().max().item())


@pytest.mark.parametrize("optimizer", [torch.optim.RMSprop, torch.optim.Adagrad])
def test_unsupported_optimizer_names_the_ways_out(optimizer):
    trunk, heads, _ = mlp_model()
    with pytest.raises(TypeError, match=r"affinity_lr=.*AffinityTracker\(lr=.*affinity_every=None"):
        AffinityTracker(trunk, heads, optimizer=optimizer(trunk.parameters(), lr=0.1))


SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"}


def count_ops(fn) -> dict[str, int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


@pytest.mark.parametrize("baseline", ["tag", "shared_step"])
def test_an_exact_step_reads_nothing_back_from_the_device(baseline):
    """No op that returns device data to the host (a synchronisation on CUDA) in a step, Dropout
    and momentum included; skipped_steps reads its counter only when asked."""
    trunk, heads, views = dropout_model()
    y = labels(False)
    opt = make_optimizer("sgd_momentum", list(trunk.parameters()) + list(heads.parameters()))
    warm_up(opt, trunk, heads, views, y)
    tracker = AffinityTracker(trunk, heads, optimizer=opt, baseline=baseline, chunk_size=None)
    tracker.step(views, y)  # the first step also sizes the chunks
    counts = count_ops(lambda: tracker.step(views, y))
    assert not SYNC_OPS & set(counts), {op: counts[op] for op in SYNC_OPS & set(counts)}
    assert sum(counts.values()) > 50
    assert "_local_scalar_dense" in count_ops(lambda: tracker.skipped_steps)
