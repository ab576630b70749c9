"""SelectiveGroupUpdates on tiny float64 models (K = 4 tasks, batch 8), against hand-written
sequential group steps and a hand computation of the proximal affinity."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import AffinityPropagation
from torch import nn

from mtdl_fast.research.stgu import SelectiveGroupUpdates, grouping_similarity, groups_from_labels

K, B, D_IN, HIDDEN, CLASSES = 4, 8, 3, 5, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are a few units wide: intra-op threads only add synchronisation, which on a
    busy machine costs more than the work itself (seen: 40x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh()).double()
    heads = nn.ModuleList(nn.Linear(HIDDEN, CLASSES) for _ in range(K)).double()
    return trunk, heads


def make_batch(seed, per_task=False):
    g = torch.Generator().manual_seed(1000 + seed)
    views = torch.randn(K, B, D_IN, generator=g, dtype=torch.float64)
    shape = (K, B) if per_task else (B,)
    return views, torch.randint(0, CLASSES, shape, generator=g)


def make_optimizer(trunk, heads, kind="sgd"):
    params = list(trunk.parameters()) + list(heads.parameters())
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05)
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def manual_losses(trunk, heads, views, targets):
    """Task k's loss: head k on trunk(view k) alone; a list of K separate scalars."""
    out = []
    for k in range(K):
        y = targets[k] if targets.ndim == 2 else targets
        out.append(F.cross_entropy(heads[k](trunk(views[k])), y))
    return out


def values(losses):
    return torch.stack([loss.detach() for loss in losses])


def params_of(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def assert_params_close(a, b, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def hand_credit(a, group, before, after, decay):
    """The documented EMA update, written out entry by entry."""
    r = 1.0 - np.asarray(after) / np.asarray(before)
    n = len(group)
    for s in group:
        for t in range(a.shape[0]):
            if t in group and t != s and r[s] * r[t] < 0:
                value = -max(abs(r[s]), abs(r[t])) / n
            else:
                value = r[t] / n
            a[s, t] = (1 - decay) * a[s, t] + decay * value


def hand_similarity(a):
    """Column t divided by A[t, t] (or by max |A[:, t]| when A[t, t] <= 0), then symmetrised."""
    a = np.array(a, dtype=np.float64)
    n = a.shape[0]
    out = np.zeros_like(a)
    for t in range(n):
        scale = a[t, t]
        if not scale > 0:
            scale = max(abs(a[s, t]) for s in range(n)) or 1.0
        for s in range(n):
            out[s, t] = a[s, t] / scale
    return (out + out.T) / 2


# ---------------------------------------------------------------- (a) one group
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_group_equals_plain_step(kind):
    trunk, heads = make_model()
    trunk2, heads2 = copy.deepcopy(trunk), copy.deepcopy(heads)
    opt, opt2 = make_optimizer(trunk, heads, kind), make_optimizer(trunk2, heads2, kind)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, warmup=10)
    for it in range(3):
        views, y = make_batch(it)
        out = stgu.step(views, y)
        opt2.zero_grad()
        losses = manual_losses(trunk2, heads2, views, y)
        sum(losses).backward()
        opt2.step()
        torch.testing.assert_close(out["losses"], values(losses), rtol=0, atol=1e-12)
        assert out["groups"] == [[0, 1, 2, 3]] and out["order"] == [0]
        assert_params_close(params_of(trunk, heads), params_of(trunk2, heads2))
    assert stgu.iteration == 3 and stgu.skipped == 0


# ---------------------------------------------------------------- (b) forced groups, crediting
def test_forced_groups_equal_manual_sequential_steps_and_credit_the_causing_group():
    decay = 0.3
    trunk, heads = make_model(1)
    trunk2, heads2 = copy.deepcopy(trunk), copy.deepcopy(heads)
    opt, opt2 = make_optimizer(trunk, heads), make_optimizer(trunk2, heads2)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, decay=decay, warmup=0)
    expected = np.zeros((K, K))
    wrong = np.zeros((K, K))  # the public code's off-by-one: each change credited to the next group
    groups = [[0, 1], [2, 3]]
    for it, order in enumerate(([1, 0], [0, 1], [1, 0])):
        views, y = make_batch(it, per_task=True)
        out = stgu.step(views, y, groups=groups, order=order)
        assert out["groups"] == groups and out["order"] == order

        seen = [manual_losses(trunk2, heads2, views, y)]
        for index in order:
            opt2.zero_grad()
            sum(seen[-1][j] for j in groups[index]).backward()  # other heads get no gradient
            opt2.step()
            seen.append(manual_losses(trunk2, heads2, views, y))
        seen = [values(s).numpy() for s in seen]
        torch.testing.assert_close(out["losses"], torch.from_numpy(seen[0]), rtol=0, atol=1e-12)
        assert_params_close(params_of(trunk, heads), params_of(trunk2, heads2))
        for m, index in enumerate(order):  # the step of groups[index] lies between forwards m and m+1
            hand_credit(expected, groups[index], seen[m], seen[m + 1], decay)
        hand_credit(wrong, groups[order[1]], seen[0], seen[1], decay)
        np.testing.assert_allclose(stgu.affinity.numpy(), expected, rtol=0, atol=1e-13)
    assert stgu.affinity.dtype == torch.float64
    assert not np.allclose(expected, wrong, rtol=0, atol=1e-6)
    assert np.all(expected != 0)  # every row credited once per iteration, every column reached


def test_opposite_signs_within_a_group_record_negative_affinity():
    # Tasks 0 and 1: the same view, one frozen head shared by value, opposite binary targets. A
    # joint step moves the trunk toward p = 1/2 for both, so one loss falls and the other rises.
    decay = 0.5
    trunk, heads = make_model(2)
    heads[1].load_state_dict(heads[0].state_dict())
    for p in list(heads[0].parameters()) + list(heads[1].parameters()):
        p.requires_grad_(False)
    with torch.no_grad():
        heads[0].bias.copy_(torch.tensor([2.0, -2.0], dtype=torch.float64))
        heads[1].bias.copy_(heads[0].bias)
    trainable = [p for p in list(trunk.parameters()) + list(heads.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    trunk2, heads2 = copy.deepcopy(trunk), copy.deepcopy(heads)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, decay=decay, warmup=5)
    views, _ = make_batch(3)
    views[1] = views[0]
    y = torch.zeros(K, B, dtype=torch.long)
    y[1] = 1
    before = values(manual_losses(trunk2, heads2, views, y)).numpy()
    stgu.step(views, y)
    after = values(manual_losses(trunk, heads, views, y)).numpy()
    r = 1 - after / before
    assert r[0] * r[1] < 0  # the construction did produce opposite signs
    a = stgu.affinity.numpy()
    conflict = -decay * max(abs(r[0]), abs(r[1])) / K
    assert a[0, 1] == pytest.approx(conflict, abs=1e-14) and a[1, 0] == pytest.approx(conflict, abs=1e-14)
    assert a[0, 0] == pytest.approx(decay * r[0] / K, abs=1e-14)
    assert a[1, 1] == pytest.approx(decay * r[1] / K, abs=1e-14)


# ---------------------------------------------------------------- (c) grouping after warm-up
def sklearn_labels(similarity, damping=0.5):
    return AffinityPropagation(affinity="precomputed", damping=damping, random_state=0).fit(similarity).labels_


def test_groups_after_warmup_come_from_affinity_propagation():
    trunk, heads = make_model(3)
    opt = make_optimizer(trunk, heads)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, decay=0.2, warmup=3, damping=0.7)
    seen_multi = False
    for it in range(10):
        views, y = make_batch(it)
        if it < 3:
            expected = [[0, 1, 2, 3]]
        else:
            hand = hand_similarity(stgu.affinity.numpy())
            np.testing.assert_allclose(grouping_similarity(stgu.affinity), hand, rtol=1e-15, atol=0)
            expected = groups_from_labels(sklearn_labels(hand, damping=0.7))
        out = stgu.step(views, y)
        assert out["groups"] == expected == stgu.groups
        assert sorted(out["order"]) == list(range(len(expected)))
        seen_multi |= len(expected) > 1
    assert seen_multi


def test_grouping_guards_zero_and_negative_diagonals():
    a = np.array(
        [
            [0.5, -0.2, 0.0, 0.3],
            [0.1, -0.4, 0.0, -0.6],
            [-0.3, 0.2, 0.0, 0.1],
            [0.2, 0.1, 0.0, 0.0],
        ]
    )
    sim = grouping_similarity(a)
    np.testing.assert_allclose(sim, hand_similarity(a), rtol=1e-15, atol=0)
    assert np.isfinite(sim).all() and np.allclose(sim, sim.T)
    trunk, heads = make_model(4)
    stgu = SelectiveGroupUpdates(trunk, heads, make_optimizer(trunk, heads), decay=0.01, warmup=0)
    state = stgu.state_dict()
    state["affinity"] = torch.from_numpy(a)
    stgu.load_state_dict(state)
    views, y = make_batch(0)
    out = stgu.step(views, y)
    assert out["groups"] == groups_from_labels(sklearn_labels(hand_similarity(a)))


def test_groups_from_labels():
    assert groups_from_labels([1, 0, 1, 2, 0]) == [[0, 2], [1, 4], [3]]
    assert groups_from_labels(np.array([3, 3, 3])) == [[0, 1, 2]]


# ---------------------------------------------------------------- (d) behaviour: conflicting tasks split
def test_conflicting_tasks_end_up_in_different_groups():
    # A width-1 linear bottleneck can carry one direction of the input. Tasks 0 and 1 read
    # x . u (scaled differently), tasks 2 and 3 read x . v (one negated), u orthogonal to v: the
    # pairs agree within and conflict across.
    torch.manual_seed(0)
    d = 6
    trunk = nn.Linear(d, 1).double()
    heads = nn.ModuleList(nn.Linear(1, 1) for _ in range(K)).double()
    opt = torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.05)
    stgu = SelectiveGroupUpdates(
        trunk, heads, opt, decay=0.05, warmup=20,
        loss_fn=lambda out, y: F.mse_loss(out.squeeze(-1), y), generator=torch.Generator().manual_seed(0),
    )
    u, v = torch.eye(d, dtype=torch.float64)[:2]
    g = torch.Generator().manual_seed(100)
    history = []
    for _ in range(100):
        x = torch.randn(B, d, generator=g, dtype=torch.float64)
        y = torch.stack([x @ u, 2 * (x @ u), x @ v, -(x @ v)])
        history.append(stgu.step(x.expand(K, B, d), y)["groups"])
    tail = history[-50:]
    exact = np.mean([h == [[0, 1], [2, 3]] for h in tail])
    pairs = np.mean([any({0, 1} <= set(g) for g in h) and any({2, 3} <= set(g) for g in h) for h in tail])
    mixed = np.mean([any(set(g) & {0, 1} and set(g) & {2, 3} for g in h) for h in tail])
    assert exact >= 0.5 and pairs >= 0.8 and mixed <= 0.4, (exact, pairs, mixed)
    a = stgu.affinity.numpy()
    assert a[:2, 2:].mean() < 0 and a[2:, :2].mean() < 0
    assert a[0, 1] > 0 and a[1, 0] > 0 and a[2, 3] > 0 and a[3, 2] > 0


# ---------------------------------------------------------------- (e) non-finite losses
def test_non_finite_group_loss_is_not_stepped_and_affinity_unchanged():
    trunk, heads = make_model(5)
    opt = make_optimizer(trunk, heads)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, decay=0.2, warmup=5)
    views, y = make_batch(0)
    stgu.step(views, y)
    a0, p0 = stgu.affinity.clone(), params_of(trunk, heads)
    bad = views.clone()
    bad[3, 2, 1] = float("nan")
    out = stgu.step(bad, y)
    assert torch.isnan(out["losses"][3]) and torch.isfinite(out["losses"][:3]).all()
    assert stgu.skipped == 1 and stgu.iteration == 2
    assert torch.equal(stgu.affinity, a0)
    assert_params_close(params_of(trunk, heads), p0, atol=0)


def test_non_finite_task_leaves_its_entries_and_other_groups_train():
    trunk, heads = make_model(6)
    opt = make_optimizer(trunk, heads)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, decay=0.2, warmup=0)
    views, y = make_batch(1)
    stgu.step(views, y, groups=[[0, 1], [2], [3]], order=[2, 0, 1])
    a0 = stgu.affinity.numpy()
    head3 = params_of(heads[3])
    bad = views.clone()
    bad[3] = float("inf")
    stgu.step(bad, y, groups=[[0, 1], [2], [3]], order=[2, 0, 1])
    a1 = stgu.affinity.numpy()
    assert stgu.skipped == 3  # group [3] not stepped, two measurements with task 3's loss non-finite
    assert np.isfinite(a1).all()
    assert np.array_equal(a1[:, 3], a0[:, 3]) and np.array_equal(a1[3], a0[3])
    assert not np.array_equal(a1[:3, :3], a0[:3, :3])
    assert all(torch.isfinite(p).all() for p in params_of(trunk, heads))
    assert_params_close(params_of(heads[3]), head3, atol=0)


# ---------------------------------------------------------------- (f) state_dict round trip
def test_state_dict_round_trip_reproduces_next_steps_exactly():
    trunk, heads = make_model(7)
    opt = make_optimizer(trunk, heads)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, decay=0.3, warmup=2, generator=torch.Generator().manual_seed(5))
    for it in range(4):
        stgu.step(*make_batch(it))
    # Force a block structure so that several groups (and so a random order) are in play.
    state = stgu.state_dict()
    state["affinity"] = torch.tensor(
        [[1.0, 0.8, -0.5, -0.4], [0.7, 1.0, -0.6, -0.5], [-0.5, -0.4, 1.0, 0.9], [-0.3, -0.6, 0.8, 1.0]],
        dtype=torch.float64,
    )
    stgu.load_state_dict(state)
    saved = copy.deepcopy(
        {"stgu": stgu.state_dict(), "trunk": trunk.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict()}
    )
    first = [stgu.step(*make_batch(10 + it)) for it in range(4)]
    final = (params_of(trunk, heads), stgu.affinity.clone(), stgu.state_dict())
    assert any(len(o["groups"]) > 1 for o in first)

    trunk.load_state_dict(saved["trunk"])
    heads.load_state_dict(saved["heads"])
    opt.load_state_dict(saved["opt"])
    resumed = SelectiveGroupUpdates(trunk, heads, opt, decay=0.3, warmup=2, generator=torch.Generator().manual_seed(99))
    resumed.load_state_dict(saved["stgu"])
    assert resumed.iteration == 4 and resumed.groups == saved["stgu"]["groups"]
    second = [resumed.step(*make_batch(10 + it)) for it in range(4)]
    for a, b in zip(first, second):
        assert torch.equal(a["losses"], b["losses"]) and a["groups"] == b["groups"] and a["order"] == b["order"]
    assert_params_close(params_of(trunk, heads), final[0], atol=0)
    assert torch.equal(resumed.affinity, final[1])
    assert resumed.iteration == final[2]["iteration"] and resumed.skipped == final[2]["skipped"]
    assert torch.equal(resumed.state_dict()["generator"], final[2]["generator"])


def test_order_is_drawn_from_the_generator():
    orders = []
    for _ in range(2):
        trunk, heads = make_model(8)
        stgu = SelectiveGroupUpdates(
            trunk, heads, make_optimizer(trunk, heads), warmup=0, generator=torch.Generator().manual_seed(3)
        )
        orders.append([stgu.step(*make_batch(it), groups=[[0], [1], [2], [3]])["order"] for it in range(6)])
    assert orders[0] == orders[1]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders[0])
    assert len({tuple(o) for o in orders[0]}) > 1


# ---------------------------------------------------------------- (g) bad input
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(decay=0.0), "decay"),
        (dict(decay=1.0), "decay"),
        (dict(decay=-0.1), "decay"),
        (dict(decay=True), "decay"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=1.5), "warmup"),
        (dict(damping=0.3), "damping"),
        (dict(damping=1.0), "damping"),
        (dict(preference=float("nan")), "preference"),
    ],
)
def test_bad_constructor_arguments(kwargs, name):
    trunk, heads = make_model()
    with pytest.raises(ValueError, match=name):
        SelectiveGroupUpdates(trunk, heads, make_optimizer(trunk, heads), **kwargs)


@pytest.mark.parametrize("kwargs,name", [(dict(generator=3), "generator"), (dict(loss_fn=None), "loss_fn")])
def test_constructor_arguments_of_the_wrong_type(kwargs, name):
    trunk, heads = make_model()
    with pytest.raises(TypeError, match=name):
        SelectiveGroupUpdates(trunk, heads, make_optimizer(trunk, heads), **kwargs)


def test_bad_modules_and_optimizer():
    trunk, heads = make_model()
    opt = make_optimizer(trunk, heads)
    with pytest.raises(TypeError, match="trunk"):
        SelectiveGroupUpdates("trunk", heads, opt)
    with pytest.raises(ValueError, match="heads"):
        SelectiveGroupUpdates(trunk, [], opt)
    with pytest.raises(ValueError, match="heads"):
        SelectiveGroupUpdates(trunk, heads[0], opt)
    with pytest.raises(TypeError, match="optimizer"):
        SelectiveGroupUpdates(trunk, heads, object())


def test_bad_step_input():
    trunk, heads = make_model()
    stgu = SelectiveGroupUpdates(trunk, heads, make_optimizer(trunk, heads))
    views, y = make_batch(0)
    with pytest.raises(ValueError, match="views"):
        stgu.step(views[:3], y)
    with pytest.raises(ValueError, match="views"):
        stgu.step(views[0, 0], y)
    with pytest.raises(ValueError, match="targets"):
        stgu.step(views, y[:5])
    with pytest.raises(ValueError, match="targets"):
        stgu.step(views, torch.zeros(3, B, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        stgu.step(views, y, groups=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="groups"):
        stgu.step(views, y, groups=[[0, 1, 2]])
    with pytest.raises(ValueError, match="groups"):
        stgu.step(views, y, groups=[[0, 1, 2, 3], []])
    with pytest.raises(ValueError, match="order"):
        stgu.step(views, y, groups=[[0, 1], [2, 3]], order=[0, 0])
    assert stgu.iteration == 0  # nothing ran
    other = SelectiveGroupUpdates(nn.Linear(D_IN, HIDDEN).double(), heads[:3], make_optimizer(trunk, heads))
    with pytest.raises(ValueError, match="tasks"):
        other.load_state_dict(stgu.state_dict())
    with pytest.raises(ValueError, match="decay"):
        SelectiveGroupUpdates(trunk, heads, make_optimizer(trunk, heads), decay=0.5).load_state_dict(stgu.state_dict())
