"""MTDLEngine mixed precision: amp="bf16" (autocast, no scaler) and amp="fp16" (autocast + GradScaler)
steps equal hand-written autocast steps, parameters and optimizer state stay float32, a GradScaler
skips (and the engine counts) a step with overflowing gradients, and the scale resumes exactly.
CPU tests run everywhere; their CUDA twins skip themselves without a GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch import nn

import mtdl_fast as mf
from mtdl_fast.engine import MTDLEngine
from mtdl_fast.research.stgu import SelectiveGroupUpdates
from mtdl_fast.research.weighting import Static

K, B = 3, 8
WEIGHTS = (0.5, 1.0, 2.0)


def make_model(seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(24, 12), nn.ReLU()).to(device)
    heads = nn.ModuleList(nn.Linear(12, 5) for _ in range(K)).to(device)
    return trunk, heads


def make_engine(amp, affinity_every=None, seed=0, device="cpu", loss_fn=F.cross_entropy, **kwargs):
    trunk, heads = make_model(seed, device)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=0.9)
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=seed, backend="torch")
    return MTDLEngine(tasks, trunk, heads, opt, weighting=Static(list(WEIGHTS)).to(device), amp=amp,
                      affinity_every=affinity_every, affinity_lr=0.1, loss_fn=loss_fn, **kwargs)


def batch(seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(B, 1, 10, 10, generator=g), torch.randint(0, 5, (B,), generator=g)
    return x.to(device), y.to(device)


def views_of(engine, seed):
    x, y = batch(seed, next(engine.trunk.parameters()).device.type)
    return engine.tasks.apply(x, engine.tasks.sample(B, (10, 10))), y


def state(*modules):
    return [t.detach().clone() for m in modules for t in [*m.parameters(), *m.buffers()]]


def params(engine):
    return [p.detach().clone() for p in [*engine.trunk.parameters(), *engine.heads.parameters()]]


def buffers(engine):
    return [b.clone() for b in [*engine.trunk.buffers(), *engine.heads.buffers()]]


def reference(engine):
    """A copy of the engine's model with its own optimizer: the hand-written loop's state."""
    trunk, heads = copy.deepcopy(engine.trunk), copy.deepcopy(engine.heads)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=0.9)
    return trunk, heads, opt


def autocast_losses(trunk, heads, views, y, device_type, dtype, tasks=range(K)):
    """The weighted task losses of `tasks`, each view its own trunk call, in ONE autocast region."""
    with torch.autocast(device_type, dtype=dtype):
        return sum(WEIGHTS[k] * F.cross_entropy(heads[k](trunk(views[k])), y) for k in tasks)


def assert_close(got, want, atol):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()


# ------------------------------------------------------------------------------------------- bf16


def _bf16_plain_step_matches(device: str):
    engine = make_engine("bf16", device=device)
    ref_trunk, ref_heads, ref_opt = reference(engine)
    fp32 = make_engine(None, device=device)
    for step in range(3):
        views, y = views_of(engine, step)
        loss, info = engine.step_views(views, y)
        fp32.step_views(views, y)
        ref_opt.zero_grad()
        total = autocast_losses(ref_trunk, ref_heads, views, y, device, torch.bfloat16)
        total.backward()
        ref_opt.step()
        assert info["losses"].dtype == torch.float32 and torch.isfinite(info["losses"]).all()
        assert torch.allclose(loss, total.detach(), atol=1e-6, rtol=0)
    got, want = state(engine.trunk, engine.heads), state(ref_trunk, ref_heads)
    assert_close(got, want, atol=1e-6)
    assert all(p.dtype == torch.float32 for p in [*engine.trunk.parameters(), *engine.heads.parameters()])
    # autocast really ran: full precision takes measurably different steps
    assert max((a - b).abs().max() for a, b in zip(got, state(fp32.trunk, fp32.heads))) > 1e-4


def test_bf16_plain_step_equals_a_hand_written_autocast_step():
    _bf16_plain_step_matches("cpu")


@requires_cuda
def test_bf16_plain_step_equals_a_hand_written_autocast_step_cuda():
    _bf16_plain_step_matches("cuda")


def test_bf16_affinity_step_equals_per_task_autocast_backwards():
    """An affinity step trains with the tracker's per-task gradients, each from its own autocast
    forward; the hand-written twin backpropagates each task in its own autocast region (one region
    over all tasks would sum the tasks' gradients of the bf16 weight copy in bf16)."""
    engine = make_engine("bf16", affinity_every=1)
    ref_trunk, ref_heads, ref_opt = reference(engine)
    for step in range(3):
        views, y = views_of(engine, step)
        loss, info = engine.step_views(views, y)
        assert info["affinity"] is not None and torch.isfinite(info["affinity"]).all()
        assert info["skipped"] is False and info["losses"].dtype == torch.float32
        ref_opt.zero_grad()
        for k in range(K):
            autocast_losses(ref_trunk, ref_heads, views, y, "cpu", torch.bfloat16, tasks=[k]).backward()
        ref_opt.step()
    assert_close(state(engine.trunk, engine.heads), state(ref_trunk, ref_heads), atol=1e-5)
    for p in [*engine.trunk.parameters(), *engine.heads.parameters()]:
        assert p.dtype == torch.float32 and engine.optimizer.state[p]["momentum_buffer"].dtype == torch.float32
    assert engine.tracker.steps == 3


def test_a_callers_autocast_around_the_step_trains_like_amp_bf16():
    """torch.autocast around engine.step (no amp=): affinity steps run, and take amp="bf16"'s steps."""
    outer, amp = make_engine(None, affinity_every=2), make_engine("bf16", affinity_every=2)
    for step in range(4):
        views, y = views_of(outer, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, info = outer.step_views(views, y)
        want, _ = amp.step_views(views, y)
        assert torch.isfinite(loss) and info["skipped"] is False
        assert torch.allclose(loss, want, atol=1e-6, rtol=0)
    assert_close(state(outer.trunk, outer.heads), state(amp.trunk, amp.heads), atol=1e-6)
    assert all(p.grad.dtype == torch.float32 for p in outer.trunk.parameters())


def test_bf16_non_finite_step_is_skipped_with_batchnorm_untouched():
    engine = make_engine("bf16", affinity_every=2)
    engine.step(*batch(0))
    before = state(engine.trunk, engine.heads)
    x, y = batch(1)
    x[2, 0, 3, 3] = float("nan")
    loss, info = engine.step(x, y)  # step 2: plain
    assert info["skipped"] is True and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(state(engine.trunk, engine.heads), before, strict=True))


def test_bf16_group_update_strategy_trains_under_autocast():
    trunk, heads = make_model()
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    stgu = SelectiveGroupUpdates(trunk, heads, opt, warmup=1, generator=torch.Generator().manual_seed(0))
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=0, backend="torch")
    engine = MTDLEngine(tasks, trunk, heads, opt, strategy=stgu, affinity_every=2, amp="bf16")
    before = state(trunk)
    for step in range(3):
        loss, info = engine.step(*batch(step))
        assert torch.isfinite(loss) and info["losses"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trunk.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, state(trunk)))


# ------------------------------------------------------------------------------------------- fp16


def _fp16_steps_match_grad_scaler(device: str, affinity_every):
    engine = make_engine("fp16", affinity_every=affinity_every, device=device)
    assert isinstance(engine.scaler, torch.amp.GradScaler)
    ref_trunk, ref_heads, ref_opt = reference(engine)
    scaler = torch.amp.GradScaler(device)
    for step in range(3):
        views, y = views_of(engine, step)
        loss, info = engine.step_views(views, y)
        assert info["skipped"] is False and torch.isfinite(info["losses"]).all()
        assert (info["affinity"] is not None) == (affinity_every is not None)
        ref_opt.zero_grad()
        total = autocast_losses(ref_trunk, ref_heads, views, y, device, torch.float16)
        scaler.scale(total).backward()
        scaler.step(ref_opt)
        scaler.update()
        assert torch.allclose(loss, total.detach(), atol=1e-6, rtol=0)
    assert_close(state(engine.trunk, engine.heads), state(ref_trunk, ref_heads), atol=1e-6)
    assert engine.scaler.state_dict() == scaler.state_dict()
    assert all(p.dtype == torch.float32 for p in [*engine.trunk.parameters(), *engine.heads.parameters()])


@pytest.mark.parametrize("affinity_every", [None, 1])
def test_fp16_steps_equal_hand_written_grad_scaler_steps(affinity_every):
    _fp16_steps_match_grad_scaler("cpu", affinity_every)


@requires_cuda
@pytest.mark.parametrize("affinity_every", [None, 1])
def test_fp16_steps_equal_hand_written_grad_scaler_steps_cuda(affinity_every):
    _fp16_steps_match_grad_scaler("cuda", affinity_every)


class _Overflow(torch.autograd.Function):
    """Identity forward; the backward overflows (what fp16 gradients without enough headroom do)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_fp16_overflowing_gradients_skip_the_step_like_grad_scaler(skip_nonfinite):
    overflow = {"on": False}

    def loss_fn(output, target):
        return F.cross_entropy(_Overflow.apply(output) if overflow["on"] else output, target)

    engine = make_engine("fp16", loss_fn=loss_fn, skip_nonfinite=skip_nonfinite)
    engine.step(*batch(0))
    before_params, before_buffers = params(engine), buffers(engine)
    momentum = [s["momentum_buffer"].clone() for s in engine.optimizer.state.values()]
    scale = engine.scaler.get_scale()
    overflow["on"] = True
    loss, info = engine.step(*batch(1))
    overflow["on"] = False
    assert torch.isfinite(loss), "the loss is finite: the scaler, not the loss check, skips"
    assert info["skipped"] is True and engine.skipped_steps == 1
    assert engine.scaler.get_scale() == scale * 0.5
    assert all(torch.equal(a, b) for a, b in zip(params(engine), before_params, strict=True))
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, engine.optimizer.state.values()))
    # BatchNorm's running statistics are restored too (the forward was finite, the step is not taken)
    assert all(torch.equal(a, b) for a, b in zip(buffers(engine), before_buffers, strict=True))
    loss, info = engine.step(*batch(2))
    assert info["skipped"] is False and engine.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(params(engine), before_params))


def test_fp16_state_dict_resumes_the_loss_scale_exactly():
    engine = make_engine("fp16", affinity_every=2)
    start = engine.state_dict()
    start["scaler"].update(scale=1024.0, growth_interval=1)  # a scale that moves every step
    engine.load_state_dict(start)
    for step in range(2):
        engine.step(*batch(step))
    saved = copy.deepcopy(engine.state_dict())
    assert saved["scaler"]["scale"] == 4096.0
    expected = [engine.step(*batch(step))[0] for step in range(2, 5)]
    resumed = make_engine("fp16", affinity_every=2, seed=7)
    resumed.load_state_dict(saved)
    assert [resumed.step(*batch(step))[0] for step in range(2, 5)] == expected
    assert resumed.scaler.state_dict() == engine.scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(state(resumed.trunk, resumed.heads),
                                                 state(engine.trunk, engine.heads), strict=True))


# ------------------------------------------------------------------------------------------- errors


def test_amp_argument_errors():
    with pytest.raises(ValueError, match="amp must be None or one of .*'fp32'"):
        make_engine("fp32")
    with pytest.raises(TypeError, match="amp must be None or one of .*got dtype"):
        make_engine(torch.float16)
    trunk, heads = make_model()
    opt = torch.optim.SGD(trunk.parameters(), lr=0.1)
    tasks = mf.DistributionTasks(["identity"] * K)
    with pytest.raises(ValueError, match="amp='fp16' needs loss scaling"):
        MTDLEngine(tasks, trunk, heads, opt, amp="fp16", strategy=SelectiveGroupUpdates(trunk, heads, opt))
    assert make_engine(None).scaler is None and make_engine("bf16").scaler is None
