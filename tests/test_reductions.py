"""mtdl_fast.reductions: the compiled affinity accumulation (running moments) and Gram reduction
against their pure-PyTorch twins and against independent float64 references (a plain-Python loop
for the affinity step's Z, NumPy's weighted statistics of the recorded per-step Z and a hand-worked
two-step example for the moments, NumPy and exact `math.fsum` sums for the Gram matrix). CUDA
variants compare the CUDA path with the CPU path and skip themselves without a GPU."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import requires_cuda

from mtdl_fast import reductions as R
from mtdl_fast._ext import ext

HAS_EXT = ext() is not None
HAS_CUDA_EXT = HAS_EXT and torch.cuda.is_available() and ext().built_with_cuda()
requires_ext = pytest.mark.skipif(not HAS_EXT, reason="mtdl_fast._C is not built")
requires_cuda_ext = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a CUDA GPU and _C built with CUDA")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BACKENDS = ["extension", "torch"]
POISON = 1.2345e300  # a finite value no reduction produces here: every entry must be overwritten


def backend_params():
    return [pytest.param("extension", marks=requires_ext), "torch"]


# ---- affinity: inputs and the independent references -----------------------------------------------


def make_losses(k: int, dtype: torch.dtype, seed: int, specials: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random base (K,) and lookahead (K, K) losses; with `specials`, some base losses are
    zero, negative, NaN or inf and some lookahead losses NaN, +inf or -inf (and, for float64, a
    pair whose ratio overflows)."""
    g = torch.Generator().manual_seed(seed)
    base = 0.2 + 2.0 * torch.rand(k, generator=g, dtype=torch.float64)
    look = base[None, :] * (1.0 + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64))
    if specials:
        idx = torch.randperm(k, generator=g)
        base[idx[0]] = 0.0
        base[idx[1]] = -0.7
        base[idx[2]] = float("nan")
        base[idx[3]] = float("inf")
        flat = torch.randperm(k * k, generator=g)
        look.view(-1)[flat[0]] = float("nan")
        look.view(-1)[flat[1]] = float("inf")
        look.view(-1)[flat[2]] = float("-inf")
        look.view(-1)[flat[3]] = -0.25  # a finite negative lookahead loss is valid (Z > 1)
        if dtype == torch.float64:  # Z = 1 - 1e300 / 1e-300 overflows: invalid
            j = int(idx[4])
            base[j] = 1e-300
            look[int(flat[4]) // k, j] = 1e300
    return base.to(dtype), look.to(dtype)


def loop_z(base, look) -> tuple[np.ndarray, int]:
    """One step's Z on Python floats, entry by entry: (Z with NaN where invalid, invalid count)."""
    b = base.double().tolist()
    la = look.double().tolist()
    k = len(b)
    z = np.full((k, k), np.nan)
    skipped = 0
    for i in range(k):
        for j in range(k):
            lj, v = b[j], la[i][j]
            zij = 1.0 - v / lj if math.isfinite(lj) and lj > 0 and math.isfinite(v) else math.nan
            if math.isfinite(zij):
                z[i, j] = zij
            else:
                skipped += 1
    return z, skipped


def zero_moments(k: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(k, k, dtype=torch.int64, device=device),
            torch.zeros(4, k, k, dtype=torch.float64, device=device))


def fresh_moments(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A mid-run state, not all zeros: counts 0..3 and Welford moments that go with them (weights =
    counts, random means and m2 where observed, zeros where not)."""
    g = torch.Generator().manual_seed(1000 + seed)
    count = torch.randint(0, 4, (k, k), generator=g, dtype=torch.int64)
    seen = count > 0
    n = count.to(torch.float64)
    mean = torch.where(seen, torch.randn(k, k, generator=g, dtype=torch.float64), 0.0)
    m2 = torch.where(count > 1, (n - 1) * torch.rand(k, k, generator=g, dtype=torch.float64), 0.0)
    return count, torch.stack([mean, m2, n, n])


def numpy_moments(zs: np.ndarray, decay) -> dict[str, np.ndarray]:
    """Per entry, from the recorded per-step Z (n, K, K) with NaN where invalid: the weighted
    statistics of the valid observations, weights keep^(n_e - t) (keep = decay or 1)."""
    keep = 1.0 if decay is None else decay
    k = zs.shape[1]
    out = {name: np.full((k, k), np.nan) for name in ("mean", "m2", "weight", "weight_sq", "var", "n_eff", "stderr")}
    out["count"] = np.isfinite(zs).sum(0)
    for i in range(k):
        for j in range(k):
            z = zs[:, i, j][np.isfinite(zs[:, i, j])]
            if z.size == 0:
                continue
            w = keep ** np.arange(z.size - 1, -1, -1, dtype=np.float64)
            mean = np.average(z, weights=w)
            m2 = float(np.sum(w * (z - mean) ** 2))
            out["mean"][i, j], out["m2"][i, j] = mean, m2
            out["weight"][i, j], out["weight_sq"][i, j] = w.sum(), (w**2).sum()
            out["n_eff"][i, j] = w.sum() ** 2 / (w**2).sum()
            if z.size >= 2:
                out["var"][i, j] = m2 / (w.sum() - (w**2).sum() / w.sum())
                out["stderr"][i, j] = math.sqrt(out["var"][i, j] / out["n_eff"][i, j])
    return out


def assert_same(actual: torch.Tensor, expected, exact: bool = True) -> None:
    expected = torch.as_tensor(np.asarray(expected))
    actual = actual.cpu()
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-14, atol=1e-15, equal_nan=True)


def assert_states_equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    """(z, skipped, count, moments) of two runs: the same bits (NaN where NaN)."""
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0, equal_nan=True)


# ---- affinity moments: Z and validity, the moments against NumPy and by hand ---------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("decay", [None, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_step_z_and_count_match_loop(dtype, decay, backend):
    """From a mid-run state: Z and the skipped count equal the Python-float loop exactly (float64's
    overflowing ratio included), count grows by one where Z is valid, invalid entries leave the
    moments untouched and valid ones change them."""
    k = 9
    count, moments = fresh_moments(k, seed=DTYPES.index(dtype))
    for step in range(4):
        base, look = make_losses(k, dtype, seed=17 * step + DTYPES.index(dtype))
        before_count, before = count.clone(), moments.clone()
        z, skipped = R.affinity_moments(base, look, count, moments, decay, backend=backend)
        ref_z, ref_skipped = loop_z(base, look)
        assert z.dtype == torch.float64 and z.shape == (k, k)
        assert skipped.dtype == torch.int64 and skipped.dim() == 0 and skipped.device == base.device
        assert int(skipped) == ref_skipped >= 7  # the specials above make at least 7 entries invalid
        assert_same(z, ref_z)  # one division, one subtraction: exact
        valid = torch.from_numpy(np.isfinite(ref_z))
        assert_same(count, (before_count + valid.to(torch.int64)).numpy())
        assert torch.equal(moments[:, ~valid], before[:, ~valid])
        keep = 1.0 if decay is None else decay
        assert torch.equal(moments[2][valid], before[2][valid] * keep + 1.0)  # the weight: one observation more


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("decay", [None, 0.9, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # float64 specials overflow Z^2
def test_moments_equal_numpy_on_recorded_steps(dtype, decay, backend):
    """Mean, m2, the weight sums and the count of each entry equal NumPy's weighted statistics of
    the Z the same calls returned; NaN (invalid) entries are skipped, counted and change nothing."""
    k, steps = 7, 9
    count, moments = zero_moments(k)
    zs, skipped_total = [], 0
    for step in range(steps):
        base, look = make_losses(k, dtype, seed=40 + step, specials=step % 3 == 1)
        z, skipped = R.affinity_moments(base, look, count, moments, decay, backend=backend)
        assert z.dtype == torch.float64 and skipped.dim() == 0 and skipped.dtype == torch.int64
        assert int(skipped) == int(torch.isnan(z).sum())
        assert_same(z, loop_z(base, look)[0])
        zs.append(z.numpy())
        skipped_total += int(skipped)
    stack = np.stack(zs)
    assert 0 < skipped_total < stack.size and (np.isnan(stack).any(0) & np.isfinite(stack).any(0)).any()
    ref = numpy_moments(stack, decay)
    np.testing.assert_array_equal(count.numpy(), ref["count"])
    seen = ref["count"] > 0
    got = dict(zip(("mean", "m2", "weight", "weight_sq"), moments.numpy()))
    for name in ("mean", "weight", "weight_sq"):
        np.testing.assert_allclose(got[name][seen], ref[name][seen], rtol=1e-13, atol=1e-15, err_msg=name)
    np.testing.assert_allclose(got["m2"][seen], ref["m2"][seen], rtol=1e-10, atol=1e-15)
    assert (moments.numpy()[:, ~seen] == 0).all()  # never observed: untouched
    if decay is None:  # Welford: the weights are the counts exactly
        np.testing.assert_array_equal(got["weight"], count.numpy())
        two = ref["count"] >= 2
        np.testing.assert_allclose(got["m2"][two] / (ref["count"][two] - 1), np.nanvar(stack, 0, ddof=1)[two],
                                   rtol=1e-10)


def test_moments_by_hand_over_two_steps():
    """Two steps worked by hand with decay 0.8: an entry's first valid observation becomes its mean
    with weight 1 and m2 0; a second one gives weight 1.8, weight_sq 1.64, the weighted mean and
    m2; invalid entries wait. Mixed dtypes between steps."""
    d = 0.8
    f64 = dict(dtype=torch.float64)
    base1 = torch.tensor([1.0, float("nan"), 2.0], **f64)
    look1 = torch.tensor([[0.5, 1.0, 1.0], [0.75, 1.0, 3.0], [float("inf"), 1.0, 1.5]], **f64)
    z1 = np.array([[0.5, np.nan, 0.5], [0.25, np.nan, -0.5], [np.nan, np.nan, 0.25]])  # exact in float64
    base2 = torch.tensor([2.0, 4.0, 1.0], dtype=torch.bfloat16)
    look2 = torch.ones(3, 3, dtype=torch.float16)
    z2 = np.array([[0.5, 0.75, 0.0]] * 3)
    twice = np.isfinite(z1)
    mean = np.where(twice, (d * np.nan_to_num(z1) + z2) / (d + 1.0), z2)
    m2 = np.where(twice, d * (np.nan_to_num(z1) - mean) ** 2 + (z2 - mean) ** 2, 0.0)
    for backend in BACKENDS if HAS_EXT else ["torch"]:
        count, moments = zero_moments(3)
        _, skipped = R.affinity_moments(base1, look1, count, moments, d, backend=backend)
        assert int(skipped) == 4  # column 1 (base NaN) and look1[2, 0] (inf)
        np.testing.assert_array_equal(moments[0].numpy(), np.nan_to_num(z1))
        np.testing.assert_array_equal(moments[2].numpy(), twice.astype(float))
        _, skipped = R.affinity_moments(base2, look2, count, moments, d, backend=backend)
        assert int(skipped) == 0
        np.testing.assert_array_equal(count.numpy(), 1 + twice)
        np.testing.assert_allclose(moments[0].numpy(), mean, rtol=1e-14)
        np.testing.assert_allclose(moments[1].numpy(), m2, rtol=1e-14, atol=1e-17)
        np.testing.assert_allclose(moments[2].numpy(), np.where(twice, 1.8, 1.0), rtol=1e-15)
        np.testing.assert_allclose(moments[3].numpy(), np.where(twice, 1.64, 1.0), rtol=1e-15)


@requires_ext
@pytest.mark.parametrize("decay", [None, 0.75])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float16), (torch.float64, torch.float64),
                                    (torch.float16, torch.bfloat16)])
def test_moments_extension_equals_torch(dtypes, decay):
    """The compiled CPU path and the PyTorch twin agree to the last bit over many steps, from a
    mid-run state, mixed dtypes included."""
    k = 13
    states = [fresh_moments(k, seed=3), fresh_moments(k, seed=3)]
    for step in range(12):
        base, _ = make_losses(k, dtypes[0], seed=500 + step, specials=step % 4 == 0)
        _, look = make_losses(k, dtypes[1], seed=600 + step, specials=step % 4 == 0)
        out_ext = R.affinity_moments(base, look, *states[0], decay, backend="extension")
        out_torch = R.affinity_moments(base, look, *states[1], decay, backend="torch")
        assert_states_equal(out_ext + states[0], out_torch + states[1])


@requires_ext
def test_moments_extension_writes_every_z():
    k = 11
    base, look = make_losses(k, torch.float32, seed=8)
    count, moments = fresh_moments(k, seed=8)
    z = torch.full((k, k), POISON, dtype=torch.float64)
    skipped = ext().affinity_moments(base, look, count, moments, 0.5, z)
    ref_z, ref_skipped = loop_z(base, look)
    assert not (z == POISON).any()
    assert_same(z, ref_z)
    assert int(skipped) == ref_skipped


@pytest.mark.parametrize("backend", backend_params())
def test_moments_accept_views_and_graph_outputs(backend):
    """A non-contiguous lookahead and a base that needs grad give what their contiguous, detached
    copies give; z never requires grad."""
    k = 6
    base, look = make_losses(k, torch.float32, seed=9)
    base = base.clone().requires_grad_(True)
    look_t = look.T.contiguous().T  # non-contiguous view with the same values
    assert not look_t.is_contiguous()
    state, ref_state = fresh_moments(k, seed=9), fresh_moments(k, seed=9)
    out = R.affinity_moments(base * 1.0, look_t, *state, 0.7, backend=backend)
    ref = R.affinity_moments(base.detach(), look, *ref_state, 0.7, backend=backend)
    assert not out[0].requires_grad
    assert_same(out[0], loop_z(base.detach(), look)[0])
    assert_states_equal(out + state, ref + ref_state)


def test_moments_bad_inputs():
    k = 4
    base, look = make_losses(k, torch.float32, seed=1, specials=False)
    count, moments = fresh_moments(k, seed=1)
    ok = dict(base=base, lookahead=look, count=count, moments=moments)
    cases = [
        (dict(base=base[None]), "base must be a 1-D"),
        (dict(base=base.to(torch.int64)), "base must be float32"),
        (dict(lookahead=look[:3]), r"lookahead must have shape \(4, 4\).*\(3, 4\)"),
        (dict(lookahead=look.to(torch.int32)), "lookahead must be float32"),
        (dict(lookahead=look.to("meta")), "lookahead must be on cpu.*meta"),
        (dict(moments=moments[:3]), r"moments must have shape \(4, 4, 4\).*\(3, 4, 4\)"),
        (dict(moments=moments.float()), "moments must have dtype torch.float64.*float32"),
        (dict(moments=moments.to("meta")), "moments must be on cpu.*meta"),
        (dict(moments=moments.transpose(1, 2)), "moments must be contiguous"),
        (dict(count=count.to(torch.int32)), "count must have dtype torch.int64"),
        (dict(count=count[:2]), r"count must have shape \(4, 4\).*\(2, 4\)"),
        (dict(count=count.to("meta")), "count must be on cpu.*meta"),
        (dict(count=count.T), "count must be contiguous"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            R.affinity_moments(**{**ok, **override})
    for decay in (0.0, 1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="decay must"):
            R.affinity_moments(**ok, decay=decay)
    for decay in (True, "0.9"):
        with pytest.raises(TypeError, match="decay must"):
            R.affinity_moments(**ok, decay=decay)
    with pytest.raises(TypeError, match="moments must be a torch.Tensor"):
        R.affinity_moments(**{**ok, "moments": [0.0]})
    with pytest.raises(TypeError, match="base must be a torch.Tensor"):
        R.affinity_moments(**{**ok, "base": [1.0, 2.0]})
    with pytest.raises(ValueError, match="backend must be one of"):
        R.affinity_moments(**ok, backend="numpy")
    # nothing was modified by the rejected calls
    assert_states_equal((count, moments), fresh_moments(k, seed=1))


@requires_ext
def test_moments_extension_checks_its_arguments():
    """The binding checks for itself (callers may skip the Python layer)."""
    k = 3
    base, look = make_losses(k, torch.float32, seed=2, specials=False)
    count, moments = zero_moments(k)
    z = torch.empty(k, k, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="decay must be in"):
        ext().affinity_moments(base, look, count, moments, 1.0, z)
    with pytest.raises(RuntimeError, match=r"moments must have shape \(4, 3, 3\)"):
        ext().affinity_moments(base, look, count, moments[:2], None, z)
    with pytest.raises(RuntimeError, match="moments must be Double"):
        ext().affinity_moments(base, look, count, moments.float(), None, z)
    with pytest.raises(RuntimeError, match="count must be Long"):
        ext().affinity_moments(base, look, count.int(), moments, None, z)
    with pytest.raises(RuntimeError, match="lookahead must have shape"):
        ext().affinity_moments(base, look[:, :2], count, moments, None, z)
    with pytest.raises(RuntimeError, match=r"z must have shape \(3, 3\)"):
        ext().affinity_moments(base, look, count, moments, None, z[:2])


# ---- Gram -------------------------------------------------------------------------------------------


def make_grads(k: int, p: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random per-task gradients with shared structure (so off-diagonal entries are not ~0), rows of
    different scales."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(1, p, generator=g)
    own = torch.randn(k, p, generator=g)
    mix = torch.rand(k, 1, generator=g)
    scale = torch.logspace(-2, 2, k)[:, None] if k > 1 else torch.ones(1, 1)
    return ((mix * common + own) * scale).to(dtype)


def assert_gram_close(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    """|G - ref| <= rtol * sqrt(G_aa G_bb): relative to the Cauchy-Schwarz bound of each entry."""
    actual = actual.cpu().numpy()
    assert actual.dtype == np.float64 and actual.shape == expected.shape
    d = np.sqrt(np.abs(np.diag(expected)))
    bound = rtol * np.outer(d, d) + 1e-300
    err = np.abs(actual - expected)
    assert (err <= bound).all(), f"max scaled error {np.max(err / bound) * rtol:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 7, 100003])
@pytest.mark.parametrize("k", [1, 3, 10, 33])
def test_gram_matches_numpy(k, p, dtype, backend):
    x = make_grads(k, p, dtype, seed=k * 1000 + p % 997)
    x64 = x.double().numpy()
    ref = x64 @ x64.T
    g = R.gram(x, backend=backend)
    assert g.dtype == torch.float64 and g.shape == (k, k)
    assert torch.equal(g, g.T)
    assert_gram_close(g, ref, rtol=1e-12)


def test_gram_float32_against_exact_sums():
    """float32 inputs: every product is exact in float64, so math.fsum gives the exact reference."""
    k, p = 3, 1_000_000
    x = make_grads(k, p, torch.float32, seed=5)
    rows = x.double().numpy()
    results = [R.gram(x, backend=b).numpy() for b in (["extension"] if HAS_EXT else []) + ["torch"]]
    for a in range(k):
        for b in range(a + 1):
            exact = math.fsum((rows[a] * rows[b]).tolist())
            scale = math.sqrt(float(np.dot(rows[a], rows[a])) * float(np.dot(rows[b], rows[b])))
            for g in results:
                assert abs(g[a, b] - exact) <= 1e-13 * scale, (a, b, g[a, b], exact)
                assert abs(g[a, b] - exact) <= 1e-6 * abs(exact)


@pytest.mark.parametrize("backend", backend_params())
def test_gram_float64_large_p(backend):
    k, p = 4, 1_000_000
    x = make_grads(k, p, torch.float64, seed=6)
    ref = x.numpy() @ x.numpy().T
    g = R.gram(x, backend=backend)
    assert_gram_close(g, ref, rtol=1e-12)
    np.testing.assert_allclose(np.diag(g.numpy()), np.diag(ref), rtol=1e-10)


@requires_ext
def test_gram_extension_deterministic_across_threads():
    x = make_grads(10, 300_001, torch.float32, seed=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = R.gram(x, backend="extension")
        torch.set_num_threads(max(2, before))
        many = R.gram(x, backend="extension")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@requires_ext
@pytest.mark.parametrize("p", [0, 5, 70001])
def test_gram_extension_writes_every_entry(p):
    k = 6
    x = make_grads(k, max(p, 1), torch.float32, seed=p)[:, :p]
    out = torch.full((k, k), POISON, dtype=torch.float64)
    ext().gram(x.contiguous(), out)
    assert not (out == POISON).any()
    ref = x.double().numpy() @ x.double().numpy().T
    assert_gram_close(out, ref, rtol=1e-12)


@pytest.mark.parametrize("backend", backend_params())
def test_gram_non_contiguous_and_empty(backend):
    x = make_grads(5, 1001, torch.float32, seed=4)
    strided = torch.empty(1001, 5).T  # (5, 1001) column-major view
    strided.copy_(x)
    assert not strided.is_contiguous()
    assert torch.equal(R.gram(strided, backend=backend), R.gram(x, backend=backend))
    assert torch.equal(R.gram(x[:, :0], backend=backend), torch.zeros(5, 5, dtype=torch.float64))
    assert R.gram(x[:0], backend=backend).shape == (0, 0)


@requires_ext
def test_gram_extension_equals_torch_closely():
    x = make_grads(17, 50_000, torch.bfloat16, seed=12)
    assert_gram_close(R.gram(x, backend="extension"), R.gram(x, backend="torch").numpy(), rtol=1e-13)


def test_gram_bad_inputs():
    with pytest.raises(ValueError, match=r"grads must be a 2-D tensor \(K, P\), got shape \(5,\)"):
        R.gram(torch.zeros(5))
    with pytest.raises(ValueError, match="grads must be a 2-D tensor"):
        R.gram(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="grads must be float32.*torch.int64"):
        R.gram(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="grads must be a torch.Tensor, got ndarray"):
        R.gram(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="backend must be one of"):
        R.gram(torch.zeros(2, 3), backend="cuda")
    if HAS_EXT:
        with pytest.raises(RuntimeError, match="out must have shape"):
            ext().gram(torch.zeros(2, 3), torch.empty(3, 3, dtype=torch.float64))


# ---- CUDA: the CUDA path against the CPU path ---------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend", [pytest.param("extension", marks=requires_cuda_ext), "torch"])
@pytest.mark.parametrize("decay", [None, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_moments_equal_cpu(dtype, decay, backend):
    """The moments on CUDA and on the CPU, from a mid-run state: the same bits, no host
    synchronisation inside the call (the kernel uses non-fusing float64 intrinsics)."""
    k = 13
    cpu_state = fresh_moments(k, seed=21)
    gpu_state = tuple(t.cuda() for t in cpu_state)
    for step in range(5):
        base, look = make_losses(k, dtype, seed=700 + step, specials=step == 2)
        cpu = R.affinity_moments(base, look, *cpu_state, decay, backend="extension" if HAS_EXT else "torch")
        base_d, look_d = base.cuda(), look.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = R.affinity_moments(base_d, look_d, *gpu_state, decay, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert gpu[0].device.type == "cuda" and gpu[1].device.type == "cuda" and gpu[1].dim() == 0
        assert_states_equal(gpu + gpu_state, cpu + cpu_state)


@requires_cuda_ext
@pytest.mark.parametrize("k", [1, 5, 64, 100])
def test_cuda_moments_write_every_z(k):
    base, look = make_losses(k, torch.float32, seed=k, specials=k >= 5)
    count, moments = zero_moments(k, "cuda")
    z = torch.full((k, k), POISON, dtype=torch.float64, device="cuda")
    skipped = ext().affinity_moments(base.cuda(), look.cuda(), count, moments, 0.3, z)
    ref_z, ref_skipped = loop_z(base, look)
    assert not (z == POISON).any()
    assert_same(z, ref_z)
    assert int(skipped) == ref_skipped


# K covers every CUDA configuration: one diagonal block of 4, 8 or 12 rows, and 8-row blocks with
# off-diagonal pairs (13, 33, 64); P covers one partial chunk, a ragged one, and many chunks.
CUDA_GRAM_K = [1, 3, 4, 5, 8, 9, 10, 12, 13, 33, 64]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 7, 100003, 3_000_017])
@pytest.mark.parametrize("k", CUDA_GRAM_K)
def test_cuda_gram_equals_cpu(k, p, dtype):
    """The CUDA kernel (and the PyTorch twin on CUDA) against the CPU path."""
    if p > 1_000_000 and (k > 12 or dtype != torch.float32):
        pytest.skip("large P is checked for float32 and K <= 12")
    x = make_grads(k, p, dtype, seed=k + p)
    cpu = R.gram(x, backend="extension" if HAS_EXT else "torch").numpy()
    xd = x.cuda()
    for backend in (["extension"] if HAS_CUDA_EXT else []) + ["torch"]:
        g = R.gram(xd, backend=backend)
        assert g.device.type == "cuda" and g.dtype == torch.float64
        assert torch.equal(g, g.T)
        assert_gram_close(g, cpu, rtol=1e-12)


@requires_cuda_ext
@pytest.mark.parametrize("k", [3, 10, 33])
def test_cuda_gram_deterministic_and_writes_every_entry(k):
    x = make_grads(k, 1_000_003, torch.float32, seed=k).cuda()
    outs = []
    for _ in range(2):
        out = torch.full((k, k), POISON, dtype=torch.float64, device="cuda")
        ext().gram(x, out)
        outs.append(out)
    assert not (outs[0] == POISON).any()
    assert torch.equal(outs[0], outs[1])
    empty = torch.full((k, k), POISON, dtype=torch.float64, device="cuda")
    ext().gram(x[:, :0].contiguous(), empty)
    assert torch.equal(empty, torch.zeros_like(empty))


@requires_cuda
def test_cuda_bad_inputs():
    k = 3
    base, look = make_losses(k, torch.float32, seed=1, specials=False)
    count, moments = (t.cuda() for t in zero_moments(k))
    with pytest.raises(ValueError, match="lookahead must be on cuda"):
        R.affinity_moments(base.cuda(), look, count, moments)
    with pytest.raises(ValueError, match="count must be on cuda"):
        R.affinity_moments(base.cuda(), look.cuda(), count.cpu(), moments)
    with pytest.raises(ValueError, match="moments must be on cuda"):
        R.affinity_moments(base.cuda(), look.cuda(), count, moments.cpu())


def test_auto_falls_back_without_extension(monkeypatch):
    """With no compiled module, "auto" runs the PyTorch twin and "extension" says why it cannot."""
    monkeypatch.setattr(R, "ext", lambda: None)
    k = 4
    base, look = make_losses(k, torch.float32, seed=3)
    state, twin_state = fresh_moments(k, seed=3), fresh_moments(k, seed=3)
    z, skipped = R.affinity_moments(base, look, *state, 0.6)
    ref_z, ref_skipped = loop_z(base, look)
    assert_same(z, ref_z)
    assert int(skipped) == ref_skipped
    R._affinity_moments_torch(base, look, *twin_state, 0.6)
    assert_states_equal(state, twin_state)  # "auto" ran the twin
    with pytest.raises(RuntimeError, match="not available"):
        R.affinity_moments(base, look, *state, backend="extension")
    x = make_grads(3, 50, torch.float32, seed=3)
    assert_gram_close(R.gram(x), x.double().numpy() @ x.double().numpy().T, rtol=1e-13)
    with pytest.raises(RuntimeError, match="not available"):
        R.gram(x, backend="extension")
