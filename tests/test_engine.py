"""MTDLEngine: a step equals the hand-written multi-task step, the affinity step's reused gradients
equal a real backward (BatchNorm running statistics included), non-finite steps are skipped, and
state_dict resumes exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtdl_fast as mf
from mtdl_fast.engine import MTDLEngine
from mtdl_fast.research.stgu import SelectiveGroupUpdates
from mtdl_fast.research.weighting import Static

K, B = 3, 8


def setup(seed: int = 0, affinity_every=None, weighting=None, momentum=0.9):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten()).double()
    heads = nn.ModuleList(nn.Linear(16, 5) for _ in range(K)).double()
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=momentum)
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=seed, backend="torch",
                                 out_dtype=torch.float64)
    engine = MTDLEngine(tasks, trunk, heads, opt, affinity_every=affinity_every, weighting=weighting)
    return engine


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 5, (B,), generator=g)


def manual_step(trunk, heads, opt, views, y, weights=(1.0, 1.0, 1.0)):
    opt.zero_grad()
    sum(w * F.cross_entropy(heads[k](trunk(views[k])), y) for k, w in enumerate(weights)).backward()
    opt.step()


def state(module):
    return [t.detach().clone() for t in list(module.parameters()) + list(module.buffers())]


@pytest.mark.parametrize("affinity_every", [None, 1])
def test_step_equals_the_hand_written_multitask_step(affinity_every):
    engine = setup(affinity_every=affinity_every, weighting=Static([0.5, 1.0, 2.0]))
    ref_trunk, ref_heads = copy.deepcopy(engine.trunk), copy.deepcopy(engine.heads)
    ref_opt = torch.optim.SGD([*ref_trunk.parameters(), *ref_heads.parameters()], lr=0.05, momentum=0.9)
    for step in range(3):
        x, y = batch(step)
        views = engine.tasks.apply(x, engine.tasks.sample(B, (9, 9)))
        loss, info = engine.step_views(views, y)
        manual_step(ref_trunk, ref_heads, ref_opt, views, y, weights=(0.5, 1.0, 2.0))
        assert (info["affinity"] is not None) == (affinity_every is not None)
    for got, want in zip(state(engine.trunk) + state(engine.heads), state(ref_trunk) + state(ref_heads)):
        assert torch.allclose(got, want, atol=1e-10), "parameters and BatchNorm running statistics"
    assert engine.tracker is None or engine.tracker.steps == 3


def test_non_finite_step_is_skipped_and_counted():
    engine = setup(affinity_every=None)
    x, y = batch()
    before = state(engine.trunk) + state(engine.heads)
    x[0, 0, 0, 0] = float("nan")
    loss, info = engine.step(x, y)
    assert info["skipped"] and engine.skipped_steps == 1
    after = state(engine.trunk) + state(engine.heads)
    params = len(list(engine.trunk.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[:params], after[:params]))
    loss, info = engine.step(*batch(2))
    assert info["skipped"] is False and torch.isfinite(loss)


def test_state_dict_resumes_exactly():
    engine = setup(affinity_every=2)
    for step in range(2):
        engine.step(*batch(step))
    saved = copy.deepcopy(engine.state_dict())
    for step in range(2, 5):
        engine.step(*batch(step))
    resumed = setup(seed=7, affinity_every=2)  # different initialisation and augmentation seed
    resumed.load_state_dict(saved)
    for step in range(2, 5):
        resumed.step(*batch(step))
    for got, want in zip(state(resumed.trunk) + state(resumed.heads), state(engine.trunk) + state(engine.heads)):
        assert torch.equal(got, want)
    assert torch.equal(resumed.tracker.affinity, engine.tracker.affinity)


def test_bad_construction():
    engine = setup()
    with pytest.raises(ValueError, match="heads has 2"):
        MTDLEngine(engine.tasks, engine.trunk, list(engine.heads)[:2], engine.optimizer)
    with pytest.raises(ValueError, match="affinity_every"):
        MTDLEngine(engine.tasks, engine.trunk, engine.heads, engine.optimizer, affinity_every=0)


def test_stgu_strategy_trains_regroups_and_resumes_exactly():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(81, 6), nn.Tanh()).double()
    heads = nn.ModuleList(nn.Linear(6, 5) for _ in range(K)).double()
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=0, backend="torch", out_dtype=torch.float64)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, warmup=2, generator=torch.Generator().manual_seed(0))
    engine = MTDLEngine(tasks, trunk, heads, opt, affinity_every=2, strategy=stgu)
    before = state(engine.trunk)
    for step in range(3):
        loss, info = engine.step(*batch(step))
        assert sorted(t for g in info["groups"] for t in g) == [0, 1, 2]
    assert not all(torch.equal(a, b) for a, b in zip(before, state(engine.trunk)))
    saved = copy.deepcopy(engine.state_dict())
    expected = [engine.step(*batch(step))[0] for step in range(3, 6)]
    engine.load_state_dict(saved)
    assert [engine.step(*batch(step))[0] for step in range(3, 6)] == expected
    with pytest.raises(ValueError, match="strategy"):
        MTDLEngine(tasks, trunk, heads, opt, strategy="alternating")
