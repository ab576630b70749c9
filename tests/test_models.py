"""Multi-task models: shapes, per-view BatchNorm semantics, task conditioning, tied heads, the
AffinityTracker on conditioned models against the plain TAG loop (float64), state_dict, errors, and
the trunk hooks (task-aware trunks, forward_views, regularization)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

from mtdl_fast.affinity import AffinityTracker
from mtdl_fast.lookahead import is_task_aware, naive_affinity, trunk_forward
from mtdl_fast.models import (
    MLPTrunk,
    MultiTaskModel,
    SmallResNet,
    check_trunk,
    linear_heads,
    trunk_regularization,
    view_features,
)
from mtdl_fast.research.conditioning import (
    MODEL_KINDS,
    ConditionedHead,
    ConditionedModel,
    FiLM,
    MultiplicativeGating,
    OneHotConcat,
    TaskMoE,
    build_model,
)

K, B, CLASSES = 3, 4, 5
CONDITIONED = ("onehot", "gating", "film", "moe")


def make(kind, trunk="resnet", channels=1, size=8, width=2, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_model(kind, K, CLASSES, channels, size, trunk=trunk, width=width).to(dtype)


def make_views(channels=1, size=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(K, B, channels, size, size, generator=g, dtype=dtype)
    # Views with different statistics, so per-view and stacked normalisation differ visibly.
    scale = torch.arange(1, K + 1, dtype=dtype).view(K, 1, 1, 1, 1)
    return views * scale + 0.5 * scale


@torch.no_grad()
def randomise_tables(model: ConditionedModel, seed: int = 2) -> None:
    """Give the task tables non-zero values (gating/FiLM/MoE tables start at zero)."""
    g = torch.Generator().manual_seed(seed)
    head = model.head
    for name, p in head.named_parameters():
        if name in ("gate", "gamma", "beta", "gate_logits"):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("trunk", ["resnet", "mlp"])
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 16)])
def test_output_shapes(kind, trunk, channels, size):
    model = make(kind, trunk, channels, size)
    views = make_views(channels, size)
    out = model(views)
    assert out.shape == (K, B, CLASSES)
    assert torch.isfinite(out).all()
    assert model.task_forward(views[1], 1).shape == (B, CLASSES)
    assert model.num_tasks == K
    assert isinstance(model, ConditionedModel if kind != "hard" else MultiTaskModel)


def test_builder_components():
    hard = build_model("hard", K, CLASSES, 3, 16, trunk="resnet", width=4)
    assert isinstance(hard.trunk, SmallResNet) and hard.trunk.out_features == 16
    assert all(isinstance(h, nn.Linear) and h.in_features == 16 for h in hard.heads)
    mlp = build_model("film", K, CLASSES, 3, 16, trunk="mlp", width=2)
    assert isinstance(mlp.trunk, MLPTrunk) and mlp.trunk.out_features == 16
    assert isinstance(mlp.head, FiLM) and mlp.head.in_features == 16
    moe = build_model("moe", K, CLASSES, 1, 8, trunk="mlp", width=2, num_experts=3)
    assert isinstance(moe.head, TaskMoE) and moe.head.num_experts == 3
    assert isinstance(build_model("onehot", K, CLASSES, 1, 8).head, OneHotConcat)
    assert isinstance(build_model("gating", K, CLASSES, 1, 8).head, MultiplicativeGating)


# ------------------------------------------------------------------------------- per-view semantics


@pytest.mark.parametrize("kind", ["hard", "film"])
def test_forward_is_per_view_with_batchnorm(kind):
    model = make(kind, "resnet").train()
    views = make_views()
    reference = copy.deepcopy(model)
    out = model(views)
    for k in range(K):
        assert torch.allclose(out[k], reference.task_forward(views[k], k), atol=1e-6, rtol=1e-5)
    # BatchNorm running statistics: updated once per view, as K separate trunk calls would.
    for got, want in zip(model.buffers(), reference.buffers()):
        assert torch.equal(got, want)
    # Stacking all views into one K*B batch normalises across views: a different function.
    feats = model.trunk(views.flatten(0, 1)).view(K, B, -1)
    stacked = torch.stack([model.heads[k](feats[k]) for k in range(K)])
    assert (stacked - out).abs().max() > 1e-3


def test_forward_without_batch_statistics_matches_stacked():
    for model in (make("hard", "mlp"), make("film", "resnet").eval()):
        views = make_views()
        out = model(views)
        feats = model.trunk(views.flatten(0, 1)).view(K, B, -1)
        stacked = torch.stack([model.heads[k](feats[k]) for k in range(K)])
        assert torch.allclose(out, stacked, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("kind", CONDITIONED)
def test_conditioning_conditions(kind):
    model = make(kind, "mlp")
    randomise_tables(model)
    x = make_views()[0]
    logits = [model.task_forward(x, k) for k in range(K)]
    for i in range(K):
        for j in range(i + 1, K):
            assert (logits[i] - logits[j]).abs().max() > 1e-4
    # A 0-dim task tensor is the int; a (B,) tensor gives each sample its own task.
    assert torch.allclose(model.task_forward(x, torch.tensor(2)), logits[2], atol=1e-6)
    per_sample = torch.tensor([2, 0, 1, 2])
    got = model.task_forward(x, per_sample)
    want = torch.stack([logits[t][b] for b, t in enumerate(per_sample.tolist())])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kind", ["gating", "film", "moe"])
def test_zero_tables_start_all_tasks_equal(kind):
    model = make(kind, "mlp")
    x = make_views()[0]
    logits = [model.task_forward(x, k) for k in range(K)]
    assert all(torch.allclose(logits[0], other, atol=1e-6) for other in logits[1:])


def test_film_at_init_is_the_unconditioned_classifier():
    model = make("film", "resnet").eval()
    x = make_views()[0]
    plain = model.head.classifier(model.trunk(x))
    for k in range(K):
        assert torch.equal(model.task_forward(x, k), plain)


def test_conditioners_match_their_definitions():
    torch.manual_seed(0)
    feats = torch.randn(B, 6, dtype=torch.float64)
    onehot = OneHotConcat(6, K, CLASSES).double()
    for k in range(K):
        literal = onehot.classifier(torch.cat([feats, F.one_hot(torch.full((B,), k), K).double()], dim=1))
        assert torch.allclose(onehot(feats, k), literal, atol=1e-12)

    gating = MultiplicativeGating(6, K, CLASSES).double()
    film = FiLM(6, K, CLASSES).double()
    moe = TaskMoE(6, K, CLASSES, num_experts=3, hidden=5, out_features=4).double()
    with torch.no_grad():
        for p in (gating.gate, film.gamma, film.beta, moe.gate_logits):
            p.normal_()
    for k in range(K):
        assert torch.allclose(gating(feats, k), gating.classifier(feats * torch.sigmoid(gating.gate[k])), atol=1e-12)
        assert torch.allclose(film(feats, k), film.classifier(feats * (1 + film.gamma[k]) + film.beta[k]), atol=1e-12)
        g = torch.softmax(moe.gate_logits[k], 0)
        mix = sum(
            g[e] * (torch.relu(feats @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]) for e in range(moe.num_experts)
        )
        assert torch.allclose(moe(feats, k), moe.classifier(mix), atol=1e-12)


# ---------------------------------------------------------------------------------------- tied heads


@pytest.mark.parametrize("kind", CONDITIONED)
def test_heads_are_tied(kind):
    model = make(kind, "mlp")
    assert all(h.conditioned is model.head for h in model.heads)
    for (n0, p0), (n1, p1) in zip(model.heads[0].named_parameters(), model.heads[1].named_parameters()):
        assert n0 == n1 and p0 is p1 and p0.data_ptr() == p1.data_ptr()
    with torch.no_grad():
        next(model.heads[0].parameters()).add_(1.0)
    x = make_views()[0]
    assert torch.equal(model.heads[1].conditioned(model.trunk(x), 1), model.task_forward(x, 1))
    first0, first1 = next(model.heads[0].parameters()), next(model.heads[1].parameters())
    assert torch.equal(first0, first1)
    # parameters() lists every shared tensor once (an optimizer steps it once).
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert len(ids) == len(list(model.trunk.parameters())) + len(list(model.head.parameters()))
    # stack_module_state copies the tied tensors once per task and stacks the task indices.
    params, buffers = stack_module_state(model.heads)
    for name, p in model.heads[0].named_parameters():
        assert params[name].shape == (K, *p.shape) and torch.equal(params[name][2], p.detach())
    assert torch.equal(buffers["task_code"], torch.eye(K))


def test_tied_gradients_sum_over_tasks():
    model = make("film", "resnet", dtype=torch.float64)
    randomise_tables(model)
    views, y = make_views(dtype=torch.float64), torch.arange(B) % CLASSES
    tied = list(model.head.parameters())
    losses = [F.cross_entropy(model.task_forward(views[k], k), y) for k in range(K)]
    per_task = [torch.autograd.grad(losses[k], tied, retain_graph=True) for k in range(K)]
    total = torch.autograd.grad(sum(losses), tied)
    for i, g in enumerate(total):
        assert torch.allclose(sum(pt[i] for pt in per_task), g, atol=1e-12)

    # The tracker's per-task head gradients (over stacked copies) are those per-task contributions,
    # and apply_gradients sums them into the one shared tensor.
    tracker = AffinityTracker(model.trunk, model.heads, lr=0.1)
    tracker.step(views, y)
    names = [n for n, _ in model.heads[0].named_parameters()]
    for i, name in enumerate(names):
        stacked = tracker.last_task_grads["heads"][name]
        for k in range(K):
            assert torch.allclose(stacked[k], per_task[k][i], atol=1e-10)
    model.zero_grad(set_to_none=True)
    tracker.apply_gradients()
    for p, g in zip(tied, total):
        assert torch.allclose(p.grad, g, atol=1e-10)


# ---------------------------------------------------------------------------- tracker vs plain loop


@pytest.mark.parametrize(
    "kind,trunk",
    [(kind, "mlp") for kind in CONDITIONED] + [("film", "resnet"), ("onehot", "resnet")],  # resnet: BatchNorm
)
def test_tracker_on_conditioned_model_equals_naive_loop(kind, trunk):
    model = make(kind, trunk, width=2, dtype=torch.float64).train()
    randomise_tables(model)
    views = make_views(dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    before = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    want, base, _ = naive_affinity(model.trunk, model.heads, views, y, lr=0.1)
    tracker = AffinityTracker(model.trunk, model.heads, lr=0.1)
    got = tracker.step(views, y)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert want.abs().max() > 1e-4  # the comparison is about something that moves
    after = [t.detach() for t in list(model.parameters()) + list(model.buffers())]
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # both leave the model as found
    # Each stacked head saw its own task index: the tracker's base losses are the model's.
    direct = torch.stack([F.cross_entropy(model.task_forward(views[k], k), y) for k in range(K)]).detach()
    assert torch.allclose(tracker.last_losses, direct, atol=1e-10)
    assert torch.allclose(base, direct, atol=1e-10)
    assert (direct[0] - direct[1]).abs() > 1e-6 or (direct[1] - direct[2]).abs() > 1e-6


# ----------------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_state_dict_round_trip(kind):
    source = make(kind, "resnet", seed=0)
    if kind != "hard":
        randomise_tables(source)
    source(make_views(seed=5))  # move the BatchNorm running statistics
    state = source.state_dict()
    assert not any(key.endswith("task_code") for key in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    target = make(kind, "resnet", seed=7)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    views = make_views()
    for mode in (True, False):
        source.train(mode), target.train(mode)
        assert torch.equal(source(views), target(views))
    if kind != "hard":
        assert all(h.conditioned is target.head for h in target.heads)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"kind": "bogus"}, "kind"),
        ({"trunk": "vit"}, "trunk"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_classes": -1}, "num_classes"),
        ({"in_channels": 2.0}, "in_channels"),
        ({"image_size": 0}, "image_size"),
        ({"width": True}, "width"),
        ({"kind": "moe", "num_experts": 0}, "num_experts"),
    ],
)
def test_build_model_errors(kwargs, name):
    args = {"kind": "film", "num_tasks": K, "num_classes": CLASSES, "in_channels": 1, "image_size": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        build_model(**args)


def test_bad_inputs():
    model = make("film", "mlp")
    views = make_views()
    with pytest.raises(ValueError, match="views"):
        model(views[:2])
    with pytest.raises(ValueError, match="views"):
        model(torch.zeros(K))
    with pytest.raises(ValueError, match="views"):
        model([views[k] for k in range(K)])
    with pytest.raises(ValueError, match="task"):
        model.task_forward(views[0], K)
    with pytest.raises(ValueError, match="task"):
        model.task_forward(views[0], True)
    with pytest.raises(ValueError, match="task"):
        model.task_forward(views[0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="task"):
        model.task_forward(views[0], torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        model.head(torch.zeros(B, model.head.in_features + 1), 0)
    with pytest.raises(ValueError, match="task"):
        ConditionedHead(model.head, K)
    with pytest.raises(ValueError, match="num_tasks"):
        ConditionedHead(model.head, 0, num_tasks=K + 1)
    with pytest.raises(TypeError, match="conditioned"):
        ConditionedHead(nn.Linear(3, 3), 0)
    with pytest.raises(TypeError, match="head"):
        ConditionedModel(model.trunk, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="heads"):
        MultiTaskModel(model.trunk, [])
    with pytest.raises(TypeError, match="trunk"):
        MultiTaskModel(lambda x: x, linear_heads(K, 4, CLASSES))
    with pytest.raises(ValueError, match="num_tasks"):
        FiLM(4, 0, CLASSES)
    hard = make("hard", "mlp")
    with pytest.raises(ValueError, match="task"):
        hard.task_forward(views[0], torch.tensor(0))


# ------------------------------------------------------------------------------------------ trunk hooks


class RowShiftTrunk(nn.Module):
    """Task-aware: trunk(x, task) adds the task's row of a per-task table to shared features."""

    task_aware = True

    def __init__(self, in_features=4, out_features=6):
        super().__init__()
        self.body = nn.Linear(in_features, out_features)
        self.shift = nn.Parameter(torch.randn(K, out_features))

    def forward(self, x, task):
        return self.body(x) + self.shift[task]

    def task_parameter_names(self):
        return ["shift"]


class AllViewsTrunk(nn.Module):
    """forward_views: all K views in one batched call; forward(x) refuses to run (never needed)."""

    def __init__(self, in_features=4, out_features=6):
        super().__init__()
        self.body = nn.Linear(in_features, out_features)

    def forward(self, x):
        raise AssertionError("forward_views replaces the per-view calls")

    def forward_views(self, views):
        return self.body(views)


def test_task_aware_trunk_gets_each_views_task():
    torch.manual_seed(0)
    model = MultiTaskModel(RowShiftTrunk(), linear_heads(K, 6, CLASSES))
    views = torch.randn(K, B, 4)
    want = torch.stack([model.heads[k](model.trunk.body(views[k]) + model.trunk.shift[k]) for k in range(K)])
    assert torch.equal(model(views), want)
    for k in range(K):
        assert torch.equal(model.task_forward(views[k], k), want[k])
    assert torch.equal(model.trunk(views[1], torch.tensor(1)), model.trunk(views[1], 1))  # 0-dim tensor task


def test_forward_views_is_one_call_for_all_views():
    torch.manual_seed(0)
    model = MultiTaskModel(AllViewsTrunk(), linear_heads(K, 6, CLASSES))
    views = torch.randn(K, B, 4)
    want = torch.stack([model.heads[k](model.trunk.body(views[k])) for k in range(K)])
    assert torch.allclose(model(views), want, atol=1e-6)


def test_trunk_hook_helpers():
    trunk = RowShiftTrunk()
    assert is_task_aware(trunk) and not is_task_aware(nn.Linear(4, 6))
    x = torch.randn(B, 4)
    assert torch.equal(trunk_forward(trunk, x, 2), trunk(x, 2))
    assert len(view_features(trunk, torch.randn(K, B, 4))) == K
    assert trunk_regularization(trunk) is None

    class Penalised(nn.Linear):
        def regularization(self):
            return self.weight.square().sum()

    penalised = Penalised(4, 6)
    assert torch.equal(trunk_regularization(penalised), penalised.weight.square().sum())


def test_bad_trunk_hooks_are_refused():
    class Unnamed(nn.Module):
        task_aware = True

    with pytest.raises(TypeError, match="Unnamed sets task_aware = True but has no task_parameter_names"):
        MultiTaskModel(Unnamed(), linear_heads(K, 6, CLASSES))
    trunk = nn.Linear(4, 6)
    trunk.forward_views = "all at once"
    with pytest.raises(TypeError, match="Linear.forward_views must be a method, got str"):
        check_trunk(trunk)
    bad = AllViewsTrunk()
    bad.forward_views = lambda views: views[:2]
    with pytest.raises(ValueError, match=r"forward_views must return \(K, B, \.\.\.\) = \(3, 4\)"):
        MultiTaskModel(bad, linear_heads(K, 4, CLASSES))(torch.randn(K, B, 4))
