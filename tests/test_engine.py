"""MTDLEngine: a step equals the hand-written multi-task step, the affinity step's reused gradients
equal a real backward (BatchNorm running statistics included), non-finite steps are skipped,
state_dict resumes exactly, the trunk hooks (task-aware, forward_views, regularization) are honoured,
a step reads nothing back from the device unless it checks the loss, and an optimizer the affinity
preview cannot follow is refused with the ways out. Mixed precision: test_engine_amp.py."""
import collections
import copy
import os
import traceback

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


# ------------------------------------------------------------------------------------------ trunk hooks


class TaskShiftTrunk(nn.Module):
    """Task-aware: a shared body plus a per-task shift row, called as trunk(x, task)."""

    task_aware = True

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(81, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.shift = nn.Parameter(torch.randn(K, 6))
        self.tasks_seen = []

    def forward(self, x, task):
        if isinstance(task, int):  # the engine's calls (the tracker may pass a 0-dim tensor)
            self.tasks_seen.append(task)
        return self.body(x) + self.shift[task]

    def task_parameter_names(self):
        return ["shift"]


class ViewsTrunk(nn.Module):
    """Has forward_views: one call for all K views (per-view BatchNorm statistics kept)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(81, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.calls = {"forward": 0, "forward_views": 0}

    def forward(self, x):
        self.calls["forward"] += 1
        return self.body(x)

    def forward_views(self, views):
        self.calls["forward_views"] += 1
        return torch.stack([self.body(v) for v in views])


class PenaltyTrunk(nn.Module):
    """Has regularization(): an L2 penalty on its weights that the engine adds to the training loss."""

    def __init__(self, lam=0.3):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(81, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.lam = lam

    def forward(self, x):
        return self.body(x)

    def regularization(self):
        return self.lam * self.body[1].weight.square().sum()


def hook_engine(trunk, affinity_every=None, **kwargs):
    torch.manual_seed(1)
    trunk = trunk.double()
    heads = nn.ModuleList(nn.Linear(6, 5) for _ in range(K)).double()
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=0.9)
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=0, backend="torch", out_dtype=torch.float64)
    return MTDLEngine(tasks, trunk, heads, opt, affinity_every=affinity_every, **kwargs)


def hand_written_hook_steps(engine, features, penalty=lambda trunk: 0.0, steps=3):
    """Run `steps` engine steps and the same steps by hand; features(trunk, views) -> K (B, D)."""
    ref_trunk, ref_heads = copy.deepcopy(engine.trunk), copy.deepcopy(engine.heads)
    ref_opt = torch.optim.SGD([*ref_trunk.parameters(), *ref_heads.parameters()], lr=0.05, momentum=0.9)
    infos = []
    for step in range(steps):
        x, y = batch(step)
        views = engine.tasks.apply(x, engine.tasks.sample(B, (9, 9)))
        loss, info = engine.step_views(views, y)
        ref_opt.zero_grad()
        feats = features(ref_trunk, views)
        losses = torch.stack([F.cross_entropy(ref_heads[k](feats[k]), y) for k in range(K)])
        total = losses.sum() + penalty(ref_trunk)
        total.backward()
        ref_opt.step()
        assert torch.allclose(loss, total.detach(), atol=1e-12) and torch.allclose(info["losses"], losses.detach())
        infos.append(info)
    for got, want in zip(state(engine.trunk) + state(engine.heads), state(ref_trunk) + state(ref_heads), strict=True):
        assert torch.allclose(got, want, atol=1e-10), "parameters and BatchNorm running statistics"
    return infos


@pytest.mark.parametrize("affinity_every", [None, 1])
def test_task_aware_trunk_is_called_with_each_task(affinity_every):
    """Training forwards and (affinity steps) the BatchNorm refresh call trunk(view_k, k)."""
    engine = hook_engine(TaskShiftTrunk(), affinity_every=affinity_every)
    hand_written_hook_steps(engine, lambda trunk, views: [trunk(views[k], k) for k in range(K)])
    if affinity_every is None:
        assert engine.trunk.tasks_seen == [0, 1, 2] * 3
    x, y = batch(5)
    losses, features = engine.task_losses(engine.augment(x), y)
    assert losses.shape == (K,) and features.shape == (K, B, 6) and not features.requires_grad


@pytest.mark.parametrize("affinity_every", [None, 1])
def test_forward_views_replaces_the_per_view_trunk_calls(affinity_every):
    engine = hook_engine(ViewsTrunk(), affinity_every=affinity_every)
    hand_written_hook_steps(engine, lambda trunk, views: [trunk.body(views[k]) for k in range(K)])
    # one call per step: the training forward, or (affinity steps) the BatchNorm refresh
    assert engine.trunk.calls == {"forward": 0, "forward_views": 3}


def test_forward_views_of_the_wrong_shape_is_refused():
    engine = hook_engine(ViewsTrunk())
    engine.trunk.forward_views = lambda views: views.flatten(2)[:, :, :6].transpose(0, 1)
    with pytest.raises(ValueError, match=r"forward_views must return \(K, B, \.\.\.\) = \(3, 8\)"):
        engine.step(*batch())


@pytest.mark.parametrize("affinity_every", [None, 1])
def test_regularization_joins_the_training_loss_only(affinity_every):
    engine = hook_engine(PenaltyTrunk(), affinity_every=affinity_every)
    infos = hand_written_hook_steps(engine, lambda trunk, views: [trunk(views[k]) for k in range(K)],
                                    penalty=PenaltyTrunk.regularization)
    if affinity_every:  # the affinity is the tasks' alone: a penalty-free twin measures the same Z
        twin = hook_engine(PenaltyTrunk(lam=0.0), affinity_every=1)
        x, y = batch(0)
        views = twin.tasks.apply(x, twin.tasks.sample(B, (9, 9)))
        assert torch.allclose(twin.step_views(views, y)[1]["affinity"], infos[0]["affinity"], atol=1e-12)


def test_bad_hooks_are_refused_by_name():
    class NoNames(nn.Module):
        task_aware = True

        def forward(self, x, task):
            return x

    with pytest.raises(TypeError, match="NoNames sets task_aware = True but has no task_parameter_names"):
        hook_engine(NoNames())
    trunk = PenaltyTrunk()
    trunk.regularization = lambda: torch.ones(2)
    with pytest.raises(ValueError, match=r"regularization\(\) must return a scalar tensor, got \(2,\)"):
        hook_engine(trunk).step(*batch())
    trunk = PenaltyTrunk().double()
    heads = nn.ModuleList(nn.Linear(6, 5) for _ in range(K)).double()
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="group-update strategy trains without the trunk's regularization"):
        MTDLEngine(mf.DistributionTasks(["identity"] * K), trunk, heads, opt,
                   strategy=SelectiveGroupUpdates(trunk, heads, opt))


# ------------------------------------------------------------------------------------------ host syncs


_TRACKER_FILES = {"affinity.py", "lookahead.py", "reductions.py"}  # audited in the tracker's own tests


class _HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense (what .item(), bool(t), float(t) run) by the innermost
    project file on the stack."""

    def __init__(self):
        super().__init__()
        self.by_file = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f.filename for f in traceback.extract_stack() if f"{os.sep}mtdl_fast{os.sep}" in f.filename]
            self.by_file[os.path.basename(frames[-1]) if frames else "outside"] += 1
        return func(*args, **(kwargs or {}))


def _engine_reads_per_step(engine, steps=3):
    """Host reads per step on given views (the augmentation is audited in the tasks' tests),
    outside the tracker's files."""
    reads = []
    for step in range(steps):
        x, y = batch(step)
        views = engine.augment(x.to(next(engine.trunk.parameters()).dtype))
        counter = _HostReads()
        with counter:
            engine.step_views(views, y)
        reads.append({f: n for f, n in counter.by_file.items() if f not in _TRACKER_FILES})
    return reads


def sync_audit_engine(skip, amp=None, mode="exact", weighting="sum", device="cpu"):
    from mtdl_fast.research.weighting import make_weighting

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten()).to(device)
    heads = nn.ModuleList(nn.Linear(16, 5) for _ in range(K)).to(device)
    w = make_weighting(weighting, K).to(device)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters(), *w.parameters()], lr=0.05, momentum=0.9)
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=0, backend="torch")
    return MTDLEngine(tasks, trunk, heads, opt, weighting=w, affinity_every=2, affinity_mode=mode,
                      skip_nonfinite=skip, amp=amp)


@pytest.mark.parametrize("amp, mode, weighting", [(None, "exact", "dwa"), (None, "first_order", "uncertainty"),
                                                  ("bf16", "exact", "uncertainty"), ("bf16", "first_order", "dwa")])
def test_skip_nonfinite_false_steps_never_read_the_device(amp, mode, weighting):
    """Affinity steps (0, 2) and a plain step (1), tracked with a linear weighting (the tracker's
    gradients train) or a learned one (a second, ordinary backward)."""
    assert _engine_reads_per_step(sync_audit_engine(False, amp, mode, weighting)) == [{}, {}, {}]
    want = [{"engine.py": 1}] * 3  # the documented read: whether the step's loss is finite
    assert _engine_reads_per_step(sync_audit_engine(True, amp, mode, weighting)) == want


@requires_cuda
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_skip_nonfinite_false_steps_never_synchronise_cuda(amp):
    engine = sync_audit_engine(False, amp, device="cuda")
    x, y = batch(0)
    engine.step(x.float().cuda(), y.cuda())  # the first affinity step sizes its chunks
    steps = [(engine.augment(x.float().cuda()), y.cuda()) for x, y in map(batch, range(1, 4))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for views, y in steps:  # plain, affinity, plain
            engine.step_views(views, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("optimizer", [torch.optim.RMSprop, torch.optim.Adagrad])
def test_unsupported_optimizer_for_the_preview_names_the_ways_out(optimizer):
    from mtdl_fast.lookahead import check_optimizer

    engine = setup()
    opt = optimizer([*engine.trunk.parameters(), *engine.heads.parameters()], lr=0.01)
    with pytest.raises(TypeError) as direct:
        check_optimizer(opt)
    with pytest.raises(TypeError) as raised:
        MTDLEngine(engine.tasks, engine.trunk, engine.heads, opt, affinity_every=5)
    assert str(raised.value) == str(direct.value), "the engine surfaces the preview's message unchanged"
    assert "affinity_lr" in str(raised.value) and "affinity_every=None" in str(raised.value)
    for ways_out in ({"affinity_lr": 0.1}, {"affinity_every": None}):  # both work
        engine = MTDLEngine(engine.tasks, engine.trunk, engine.heads, opt, **{"affinity_every": 1, **ways_out})
        loss, info = engine.step(*batch())
        assert info["skipped"] is False and (info["affinity"] is None) == (ways_out.get("affinity_every", 1) is None)
