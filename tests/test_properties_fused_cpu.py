"""Property-based tests of the fused K-view program in C++ (mtdl_fast.fused_cpu), over random shapes,
dtypes, layouts, thread counts, tasks and raw program tables drawn by hypothesis.

1. fused_views_cpu == DistributionTasks(backend="torch") for the same sampled params: 1..3 random
   fusable tasks (tests/test_properties.py's strategy), B in 0..3, C in {1, 3}, H and W in 1..13,
   uint8 / float16 / bfloat16 / float32 input, contiguous / channels_last / strided, float32 /
   float16 / bfloat16 output, optional normalisation, 1 or 2 threads. Budgets: the fused kernel's
   against the torch path, plus one rounding of the output dtype.
2. fused_views_cpu == the Triton kernel (its interpreter without a GPU) on random raw programs:
   any spatial code, any op row (at most one OP_CONTRAST, OP_END padding), parameters anywhere in
   their valid ranges (exact flips and pixel-centre coordinates included, clamp boxes, fills, blur
   sizes, noise with and without sigma). Identical bits except after the stages each backend
   evaluates its own way (blur taps, contrast means: 1e-6; noise: 1e-5 after up to three gains),
   where a later posterize / solarize may also flip a level on a few elements.
3. The same bits for 1 and 2 threads on random programs over images of many row tiles.

Generated cases per run: 60 + 30 + 15 (derandomized). Runtime: ~1 min on 2 shared CPU cores.
"""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_properties import (
    FUSED_FLIP_FRACTION,
    SEEDS,
    _fused_view_tolerance,
    _settings,
    assert_close,
    fusable_tasks,
    make_images,
)

import mtdl_fast as mf
from mtdl_fast.fused_cpu import fused_views_cpu
from mtdl_fast.kernels import fused_views as fv
from mtdl_fast.kernels._launch import interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REDUCED = 1e-6          # after blur taps or a contrast mean (each backend's own exp / summation order)
NOISY = 1e-5            # after noise: 4 float32 ulps of the noise, times later gains <= 8
KERNEL_TOL = 5e-5       # on a GPU the kernel may contract into FMAs: the warp budget
LEVEL_FLIPS = ("posterize", "solarize")
OP_NAMES = {getattr(fv, name): name[3:].lower() for name in vars(fv) if name.startswith("OP_")}


def _with_threads(n: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider buffer: no dimension dense
        wide = torch.repeat_interleave(x, 2, dim=-1)
        return wide[..., ::2]
    return x


# ==============================================================================================
# 1. Against the torch path of DistributionTasks
# ==============================================================================================
@_settings(60)
@given(
    b=st.integers(0, 3), c=st.sampled_from([1, 3]), h=st.integers(1, 13), w=st.integers(1, 13),
    in_dtype=st.sampled_from([torch.uint8, torch.float16, torch.bfloat16, torch.float32]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), normalise=st.booleans(),
    threads=st.sampled_from([1, 2]), seed=SEEDS, data=st.data(),
)
def test_fused_cpu_equals_torch_path(b, c, h, w, in_dtype, layout, out_dtype, normalise, threads, seed, data):
    drawn = data.draw(st.lists(fusable_tasks(h, w), min_size=1, max_size=3))
    tasks, chains = [t for t, _ in drawn], [ch for _, ch in drawn]
    norm = {}
    if normalise:
        norm = dict(mean=data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5]), min_size=c, max_size=c)),
                    std=data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=c, max_size=c)))
    x = _layout(make_images(seed, b, c, h, w, in_dtype, "contiguous"), layout)
    reference = mf.DistributionTasks(tasks, backend="torch", out_dtype=out_dtype, **norm)
    params = reference.sample(b, (h, w), generator=torch.Generator().manual_seed(seed))
    want = reference.apply(x, params)
    spatial, ops, table = reference.kernel_tables(params, torch.device("cpu"))
    got = _with_threads(threads, lambda: fused_views_cpu(x, spatial, ops, table, seed=params.seed,
                                                         out_dtype=out_dtype, **norm))
    assert got.shape == (len(tasks), b, c, h, w) and got.dtype == out_dtype
    scale = 1.0 / min(norm["std"]) if norm else 1.0
    for k, chain in enumerate(chains):
        atol, flips = _fused_view_tolerance(chain)
        atol = atol * scale
        if out_dtype != torch.float32:  # each side rounds to out_dtype once
            atol += torch.finfo(out_dtype).eps * max(1.0, want[k].float().abs().max().item() if b else 1.0)
        n = max(1, want[k].numel())
        allowed = max(2.0 / n, FUSED_FLIP_FRACTION) if flips else 0.0
        assert_close(got[k], want[k], atol, mismatch_fraction=allowed, what=f"view {k} {tasks[k]}")


# ==============================================================================================
# 2. Against the Triton kernel on random raw programs
# ==============================================================================================
@st.composite
def programs(draw, max_views: int = 4):
    """(spatial codes, op rows): any spatial code, rows of 0..MAX_OPS ops with at most one contrast."""
    k = draw(st.integers(1, max_views))
    spatial = [draw(st.integers(0, fv.N_SPATIAL - 1)) for _ in range(k)]
    rows = []
    for _ in range(k):
        row = draw(st.lists(st.integers(1, fv.N_OPS - 1), max_size=fv.MAX_OPS))
        while row.count(fv.OP_CONTRAST) > 1:
            row.remove(fv.OP_CONTRAST)
        rows.append(row + [fv.OP_END] * (fv.MAX_OPS - len(row)))
    return torch.tensor(spatial, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32)


def random_params(seed: int, k: int, b: int, h: int, w: int, noise_sigma: bool) -> torch.Tensor:
    """(k, b, N_SLOTS) parameters anywhere in their valid ranges: random affine maps, a third of them
    exact flips (pixel-centre coordinates, the flip fast path), clamp boxes, fills, odd blur sizes
    up to 7, integral posterize bits, erase boxes sticking out of the image."""
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (k, b)), generator=g)

    def coin(*shape):
        return (torch.rand(*(shape or (k, b)), generator=g) < 0.5).float()

    p = torch.zeros(k, b, fv.N_SLOTS)
    p[..., fv.SLOT_M0], p[..., fv.SLOT_M1] = u(-1.5, 1.5), u(-1.0, 1.0)
    p[..., fv.SLOT_M3], p[..., fv.SLOT_M4] = u(-1.0, 1.0), u(-1.5, 1.5)
    p[..., fv.SLOT_M2], p[..., fv.SLOT_M5] = u(-w, 2 * w), u(-h, 2 * h)
    flip = torch.rand(k, b, generator=g) < 0.35
    hmirror, vmirror = coin(), coin()
    flips = torch.stack([1 - 2 * hmirror, torch.zeros(k, b), hmirror * (w - 1),
                         torch.zeros(k, b), 1 - 2 * vmirror, vmirror * (h - 1)], dim=-1)
    p[..., fv.SLOT_M0:fv.SLOT_M5 + 1] = torch.where(flip[..., None], flips, p[..., fv.SLOT_M0:fv.SLOT_M5 + 1])
    p[..., fv.SLOT_NEAREST] = coin()
    boxed = torch.rand(k, b, generator=g) < 0.3
    x0, y0 = u(0, w - 1).floor(), u(0, h - 1).floor()
    box = torch.stack([x0, x0 + u(0, w - 1).floor(), y0, y0 + u(0, h - 1).floor()], dim=-1)
    open_box = torch.tensor([-1e30, 1e30, -1e30, 1e30]).expand(k, b, 4)
    p[..., fv.SLOT_CLAMP_X0:fv.SLOT_CLAMP_Y1 + 1] = torch.where(boxed[..., None], box, open_box)
    p[..., fv.SLOT_FILL], p[..., fv.SLOT_HAS_FILL] = u(0, 1), coin()
    p[..., fv.SLOT_BLUR_KX] = 2 * torch.randint(0, 4, (k, b), generator=g) + 1
    p[..., fv.SLOT_BLUR_KY] = 2 * torch.randint(0, 4, (k, b), generator=g) + 1
    p[..., fv.SLOT_BLUR_SX], p[..., fv.SLOT_BLUR_SY] = u(0.2, 3.0), u(0.2, 3.0)
    p[..., fv.SLOT_SHARPNESS], p[..., fv.SLOT_BRIGHTNESS] = u(0, 3), u(0, 2)
    p[..., fv.SLOT_CONTRAST], p[..., fv.SLOT_SATURATION] = u(0, 2), u(0, 2)
    p[..., fv.SLOT_HUE], p[..., fv.SLOT_SOLARIZE] = u(-0.5, 0.5), u(0, 1)
    p[..., fv.SLOT_POSTERIZE_BITS] = torch.randint(0, 9, (k, b), generator=g).float()
    p[..., fv.SLOT_NOISE_MEAN] = u(-0.3, 0.3)
    p[..., fv.SLOT_NOISE_SIGMA] = u(0, 0.3) if noise_sigma else 0.0
    p[..., fv.SLOT_NOISE_CLIP] = coin()
    p[..., fv.SLOT_ERASE_TOP], p[..., fv.SLOT_ERASE_LEFT] = u(-2, h).floor(), u(-2, w).floor()
    p[..., fv.SLOT_ERASE_H], p[..., fv.SLOT_ERASE_W] = u(0, h + 2).floor(), u(0, w + 2).floor()
    p[..., fv.SLOT_ERASE_VALUE] = u(0, 1)
    return p


def _budget(spatial: int, row: list[int], noisy: bool) -> tuple[float, bool]:
    """(atol, whether a level may flip) of the C++ path against the kernel for one view."""
    names = [OP_NAMES[op] for op in row if op != fv.OP_END]
    reduced_at = [i for i, name in enumerate(names) if name == "contrast" or (name == "noise" and noisy)]
    if spatial == fv.SPATIAL_BLUR:
        reduced_at.insert(0, -1)
    if not interpreting():
        return KERNEL_TOL, True
    if not reduced_at:
        return 0.0, False
    atol = NOISY if noisy and "noise" in names else REDUCED
    return atol, any(name in LEVEL_FLIPS for name in names[reduced_at[0] + 1:])


@_settings(30)
@given(
    prog=programs(), b=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(1, 12), w=st.integers(1, 12),
    in_dtype=st.sampled_from([torch.uint8, torch.float32]), layout=st.sampled_from(["contiguous", "channels_last"]),
    noisy=st.booleans(), seed=SEEDS,
)
def test_fused_cpu_equals_triton_kernel_on_random_programs(prog, b, c, h, w, in_dtype, layout, noisy, seed):
    spatial, ops = prog
    params = random_params(seed, len(spatial), b, h, w, noisy)
    x = make_images(seed, b, c, h, w, in_dtype, layout)
    got = fused_views_cpu(x, spatial, ops, params, seed=seed)
    want = fv.fused_views(x.to(DEVICE), spatial, ops, params.to(DEVICE), seed=seed).cpu()
    for v in range(len(spatial)):
        atol, flips = _budget(int(spatial[v]), ops[v].tolist(), noisy)
        n = want[v].numel()
        allowed = max(2.0 / n, 0.02) if flips else 0.0
        assert_close(got[v], want[v], atol, mismatch_fraction=allowed,
                     what=f"view {v}: spatial {int(spatial[v])}, ops {ops[v].tolist()}")


# ==============================================================================================
# 3. The thread count never changes a bit
# ==============================================================================================
@_settings(15)
@given(prog=programs(max_views=6), b=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(20, 90),
       w=st.integers(20, 90), seed=SEEDS)
def test_fused_cpu_is_the_same_for_any_thread_count(prog, b, c, h, w, seed):
    spatial, ops = prog
    params = random_params(seed, len(spatial), b, h, w, noise_sigma=True)
    x = make_images(seed, b, c, h, w, torch.uint8, "contiguous")
    one = _with_threads(1, lambda: fused_views_cpu(x, spatial, ops, params, seed=seed))
    two = _with_threads(2, lambda: fused_views_cpu(x, spatial, ops, params, seed=seed))
    assert torch.equal(one.isnan(), two.isnan())
    assert torch.equal(one.nan_to_num(), two.nan_to_num())
