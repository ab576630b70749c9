"""kernels/lookahead_ce.py against an independent float64 reference.

The reference is torch.nn.functional.cross_entropy applied per (i, j) in a plain Python loop on
float64 CPU copies of the inputs. Both the Triton kernel and its plain-PyTorch twin are held to it.
Runs natively on the GPU when one is present, else on the CPU under the Triton interpreter (small
shapes: the interpreter is slow).

Measured max errors vs the float64 reference (interpreter, the shapes below, mean):
  relative: float32 2.9e-7, float16 2.4e-7, bfloat16 4.1e-7 (products of half-precision values
  are exact in float32 and the kernel accumulates in float32, so half inputs err no more than
  float32 ones); absolute (mean and per-row): <= 7e-7.
  features x 50 (logits of several hundred): absolute <= 3.2e-5 for every dtype, i.e. float32
  rounding of the logits themselves (torch's own float32 cross_entropy errs 7e-5 there).
Tolerances below are the project's per-dtype budgets (float32 1e-5, half 2e-3), not these errors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, requires_cuda

try:
    from mtdl_fast.kernels import lookahead_ce as lce
except Exception:  # the package may be mid-edit; the kernel file itself is all these tests need
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from kernels import lookahead_ce as lce

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
POISON = 7.7e5   # every preallocated buffer starts as this: an unwritten element shows up


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    def poisoned(shape, device):
        return torch.full(shape, POISON, dtype=torch.float32, device=device)
    monkeypatch.setattr(lce, "_new_buffer", poisoned)


def reference(f, w, b, t, reduction="mean", ignore_index=-100):
    """float64, one torch cross_entropy per (i, j)."""
    f, w, t = f.detach().cpu().double(), w.detach().cpu().double(), t.cpu()
    b = None if b is None else b.detach().cpu().double()
    I, J, B = f.shape[:3]
    out = torch.empty((I, J, B) if reduction == "none" else (I, J), dtype=torch.float64)
    for i in range(I):
        for j in range(J):
            logits = f[i, j] @ w[j].T
            if b is not None:
                logits = logits + b[j]
            out[i, j] = F.cross_entropy(logits, t[j], reduction=reduction, ignore_index=ignore_index)
    return out


def make(shape, dtype, device, *, bias=True, seed=0, scale=1.0, ignore_frac=0.2, bias_dtype=None):
    I, J, B, D, C = shape
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(I, J, B, D, generator=g) * scale).to(dtype).to(device)
    w = (torch.randn(J, C, D, generator=g) / max(1, D) ** 0.5).to(dtype).to(device)
    b = (torch.randn(J, C, generator=g).to(bias_dtype or dtype).to(device)) if bias else None
    t = torch.randint(0, C, (J, B), generator=g)
    if B > 1:  # some ignored rows (but never all of a task's rows here)
        drop = torch.rand(J, B, generator=g) < ignore_frac
        drop[:, 0] = False
        t[drop] = -100
    return f, w, b, t.to(device)


def check(got, ref, dtype, atol=None):
    tol = TOL[dtype]
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(ref.shape)
    torch.testing.assert_close(got.detach().cpu().double(), ref, rtol=tol, atol=tol if atol is None else atol,
                               equal_nan=True)


SHAPES = [(1, 1, 1, 1, 2), (2, 3, 5, 7, 11), (3, 2, 17, 33, 10), (2, 2, 9, 20, 130)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(shape, dtype, bias, device):
    f, w, b, t = make(shape, dtype, device, bias=bias, seed=hash((shape, bias)) % 1000)
    for red in ("mean", "sum", "none"):
        ref = reference(f, w, b, t, red)
        check(lce.lookahead_cross_entropy(f, w, b, t, reduction=red), ref, dtype)
        check(lce.lookahead_cross_entropy_torch(f, w, b, t, reduction=red), ref, dtype)


def test_default_is_mean_and_ignored_rows_are_zero(device):
    f, w, b, t = make((2, 2, 12, 9, 7), torch.float32, device, ignore_frac=0.5)
    assert (t == -100).any()
    torch.testing.assert_close(lce.lookahead_cross_entropy(f, w, b, t),
                               lce.lookahead_cross_entropy(f, w, b, t, reduction="mean"))
    rows = lce.lookahead_cross_entropy(f, w, b, t, reduction="none")
    assert (rows[:, t == -100] == 0).all() and (rows[:, t != -100] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_logits_are_stable(dtype, device):
    # features scaled by 50: logits of several hundred; a naive exp would overflow
    f, w, b, t = make((2, 2, 9, 20, 130), dtype, device, scale=50.0, seed=3)
    logits = torch.einsum("ijbd,jcd->ijbc", f.double().cpu(), w.double().cpu())
    big = logits.abs().max().item()
    assert big > 100
    for red in ("mean", "sum", "none"):
        got = lce.lookahead_cross_entropy(f, w, b, t, reduction=red)
        assert torch.isfinite(got).all()
        # a loss is a difference of float32 numbers of size |logit|: absolute error scales with it
        check(got, reference(f, w, b, t, red), dtype, atol=TOL[dtype] * big * 0.1)


def test_all_ignored_task_gives_nan_like_torch(device):
    f, w, b, t = make((2, 3, 6, 5, 4), torch.float32, device)
    t[1] = -100
    mean = lce.lookahead_cross_entropy(f, w, b, t)
    assert torch.isnan(mean[:, 1]).all() and torch.isfinite(mean[:, [0, 2]]).all()
    check(mean, reference(f, w, b, t), torch.float32)
    check(lce.lookahead_cross_entropy(f, w, b, t, reduction="sum"), reference(f, w, b, t, "sum"), torch.float32)
    check(lce.lookahead_cross_entropy(f, w, b, t, reduction="none"), reference(f, w, b, t, "none"),
          torch.float32)


def test_custom_ignore_index(device):
    f, w, b, t = make((1, 2, 8, 6, 5), torch.float32, device, ignore_frac=0.0)
    t[0, 3] = 2
    t[1, :4] = 2
    for red in ("mean", "none"):
        ref = reference(f, w, b, t, red, ignore_index=2)
        check(lce.lookahead_cross_entropy(f, w, b, t, reduction=red, ignore_index=2), ref, torch.float32)
        check(lce.lookahead_cross_entropy_torch(f, w, b, t, reduction=red, ignore_index=2), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_small_tiles_loop_over_b_c_and_d(dtype, device, monkeypatch):
    # force 16-wide tiles: 3 row blocks, 4 class tiles, 3 feature tiles (the non-hoisted D loop)
    monkeypatch.setattr(lce, "_pick_config", lambda *a: (16, 16, 16, 4))
    f, w, b, t = make((2, 2, 35, 40, 50), dtype, device, seed=5)
    for red in ("mean", "none"):
        check(lce.lookahead_cross_entropy(f, w, b, t, reduction=red), reference(f, w, b, t, red), dtype)


def test_multi_tile_defaults(device):
    # default config: D > 128 takes the D loop, B = 70 spans several row blocks
    f, w, b, t = make((1, 2, 70, 150, 40), torch.float32, device, seed=6)
    check(lce.lookahead_cross_entropy(f, w, b, t), reference(f, w, b, t), torch.float32)


def test_strided_inputs(device):
    g = torch.Generator().manual_seed(7)
    I, J, B, D, C = 2, 3, 10, 12, 9
    f = torch.randn(B, J, D, 2 * I, generator=g).to(device).permute(3, 1, 0, 2)[::2]  # last dim strided
    w = torch.randn(J, D, C, generator=g).to(device).transpose(1, 2)                   # (J, C, D), stride_d = C
    b = torch.randn(C, J, generator=g).to(device).T
    t = torch.randint(0, C, (B, J), generator=g).to(device).T
    assert not f.is_contiguous() and not w.is_contiguous() and not t.is_contiguous()
    for red in ("mean", "none"):
        ref = reference(f, w, b, t, red)
        check(lce.lookahead_cross_entropy(f, w, b, t, reduction=red), ref, torch.float32)
        check(lce.lookahead_cross_entropy_torch(f, w, b, t, reduction=red), ref, torch.float32)


def test_bfloat16_and_mixed_bias_dtype(device):
    # on the CPU the interpreter upcasts bf16 (exact); on a GPU the bf16 tl.dot path runs
    f, w, b, t = make((2, 2, 9, 20, 37), torch.bfloat16, device, seed=8)
    check(lce.lookahead_cross_entropy(f, w, b, t), reference(f, w, b, t), torch.bfloat16)
    f, w, b, t = make((2, 2, 9, 20, 37), torch.float16, device, seed=9, bias_dtype=torch.float32)
    check(lce.lookahead_cross_entropy(f, w, b, t), reference(f, w, b, t), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_config_heuristic(dtype):
    for D in (1, 20, 64, 100, 128, 129, 2048):
        for C in (2, 10, 130, 1000):
            for B in (1, 7, 256):
                bb, bc, bd, nw = lce._pick_config(9, B, C, D, dtype, torch.device("cpu"))
                for v in (bb, bc, bd):
                    assert v >= 16 and v & (v - 1) == 0
                assert bc <= max(16, 2 * C) and bb <= max(16, 2 * B) and nw in (4, 8)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 4, 256, 512, 1000), (3, 3, 100, 96, 37), (5, 5, 64, 64, 10)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_realistic_shapes(shape, dtype):
    f, w, b, t = make(shape, dtype, torch.device("cuda"), seed=11)
    logits = torch.einsum("ijbd,jcd->ijbc", f.double(), w.double()) + b.double()[None, :, None, :]
    I, J, B, C = logits.shape
    rows = F.cross_entropy(logits.reshape(-1, C), t.expand(I, J, B).reshape(-1), reduction="none")
    ref = rows.reshape(I, J, B).sum(-1) / (t != -100).sum(-1)
    torch.testing.assert_close(lce.lookahead_cross_entropy(f, w, b, t).double(), ref,
                               rtol=TOL[dtype], atol=TOL[dtype])


def test_deterministic(device):
    f, w, b, t = make((2, 2, 40, 24, 70), torch.float32, device, seed=10)
    a = lce.lookahead_cross_entropy(f, w, b, t)
    assert torch.equal(a, lce.lookahead_cross_entropy(f, w, b, t))


def test_empty_batch(device):
    f, w, b, t = make((2, 3, 0, 4, 5), torch.float32, device)
    assert torch.isnan(lce.lookahead_cross_entropy(f, w, b, t)).all()
    assert (lce.lookahead_cross_entropy(f, w, b, t, reduction="sum") == 0).all()
    assert lce.lookahead_cross_entropy(f, w, b, t, reduction="none").shape == (2, 3, 0)
    assert torch.isnan(lce.lookahead_cross_entropy_torch(f, w, b, t)).all()


def test_forward_only_no_graph(device):
    f, w, b, t = make((1, 2, 4, 5, 3), torch.float32, device)
    f.requires_grad_(True)
    assert not lce.lookahead_cross_entropy(f, w, b, t).requires_grad


def test_out_of_range_targets(device):
    f, w, b, t = make((1, 2, 6, 5, 4), torch.float32, device, ignore_frac=0.0)
    t[1, 2] = 4
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"targets.*\[1, 2\] = 4"):
            lce.lookahead_cross_entropy(f, w, b, t)
    else:  # not checked on the host (no sync): the kernel poisons the row's loss instead
        out = lce.lookahead_cross_entropy(f, w, b, t)
        assert torch.isnan(out[0, 1]) and torch.isfinite(out[0, 0])
    t[1, 2] = -1
    with pytest.raises(ValueError, match="targets"):
        lce.lookahead_cross_entropy_torch(f.cpu(), w.cpu(), b.cpu(), t.cpu())


def _good(device):
    return make((2, 3, 4, 5, 6), torch.float32, device)


@pytest.mark.parametrize("case,match", [
    (lambda f, w, b, t: (f[0], w, b, t), r"features must have rank 4"),
    (lambda f, w, b, t: (f.long(), w.long(), b, t), r"features must have dtype.*int64"),
    (lambda f, w, b, t: (f, w[:2], b, t), r"weight must have shape \(J=3, C, D=5\).*\(2, 6, 5\)"),
    (lambda f, w, b, t: (f, w[..., :4], b, t), r"weight must have shape .*\(3, 6, 4\)"),
    (lambda f, w, b, t: (f, w[0], b, t), r"weight must have rank 3"),
    (lambda f, w, b, t: (f, w.half(), b, t), r"weight must have features' dtype"),
    (lambda f, w, b, t: (f, w[:, :0], b[:, :0], t), r"weight must have C >= 1"),
    (lambda f, w, b, t: (f, w, b[:, :5], t), r"bias must have shape \(J=3, C=6\), got \(3, 5\)"),
    (lambda f, w, b, t: (f, w, b.long(), t), r"bias must have dtype"),
    (lambda f, w, b, t: (f, w, b, t[:, :3]), r"targets must have shape \(J=3, B=4\), got \(3, 3\)"),
    (lambda f, w, b, t: (f, w, b, t.int()), r"targets must have dtype torch.int64, got torch.int32"),
    (lambda f, w, b, t: (f, w, b, t.float()), r"targets must have dtype"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs(case, match, device):
    args = case(*_good(device))
    for fn in (lce.lookahead_cross_entropy, lce.lookahead_cross_entropy_torch):
        with pytest.raises(ValueError, match=match):
            fn(*args)


def test_non_tensor_features_are_a_type_error(device):
    f, w, b, t = _good(device)
    for fn in (lce.lookahead_cross_entropy, lce.lookahead_cross_entropy_torch):
        with pytest.raises(TypeError, match="features must be a torch.Tensor"):
            fn(f.cpu().numpy(), w, b, t)


def test_kernel_rejects_float64_twin_accepts_it(device):
    f, w, b, t = (x.double() if x.is_floating_point() else x for x in _good(device))
    with pytest.raises(ValueError, match=r"features must have dtype in \(torch.float32, .*got torch.float64"):
        lce.lookahead_cross_entropy(f, w, b, t)
    got = lce.lookahead_cross_entropy_torch(f, w, b, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference(f, w, b, t).to(got.device), rtol=1e-12, atol=1e-12)


def test_bad_reduction_and_ignore_index(device):
    f, w, b, t = _good(device)
    with pytest.raises(ValueError, match=r"reduction must be one of .*'avg'"):
        lce.lookahead_cross_entropy(f, w, b, t, reduction="avg")
    with pytest.raises(ValueError, match=r"ignore_index must be an int"):
        lce.lookahead_cross_entropy(f, w, b, t, ignore_index=1.5)


@requires_cuda
def test_device_mismatch():
    f, w, b, t = _good(torch.device("cuda"))
    with pytest.raises(ValueError, match=r"weight must be on features' device"):
        lce.lookahead_cross_entropy(f, w.cpu(), b, t)
    with pytest.raises(ValueError, match=r"bias must be on features' device"):
        lce.lookahead_cross_entropy(f, w, b.cpu(), t)
    with pytest.raises(ValueError, match=r"targets must be on features' device"):
        lce.lookahead_cross_entropy(f, w, b, t.cpu())


@pytest.mark.skipif(HAS_CUDA, reason="CPU launcher check")
def test_cpu_needs_interpreter(monkeypatch):
    f, w, b, t = _good(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lce.lookahead_cross_entropy(f, w, b, t)
