"""mtdl_fast.fused_cpu (the fused K-view program in C++) against the Triton kernel, torchvision and
the torch path.

* ABI: the C++ header's codes and slots are kernels/fused_views.py's.
* Against the Triton kernel for the same tables (tests/conftest.py runs it under its interpreter
  without a GPU): every op alone, every spatial stage, chains, odd sizes, all input dtypes and
  layouts, all output dtypes with and without normalisation. Under the interpreter the bits are
  identical (the same float32 formulas in the same order, no FMA contraction) except where the two
  evaluate a transcendental or a reduction each their own way: blur taps (exp) and contrast means
  (float64 partial sums here), measured <= 1.8e-7, held to 1e-6; noise (log) <= 4 float32 ulps of
  max(1, |out|). On a GPU the kernel may contract into FMAs: TOL there.
* Against torchvision image by image (tests/test_kernel_fused_views.py's steps and budgets).
* Against DistributionTasks(backend="torch") for the same sampled params, within the budgets the
  README states for the fused kernel against the torch path.
* float16 / bfloat16 outputs round like torch's .to(); the same bits for any thread count; `out`
  fully overwritten; outputs from 1 MiB on advised onto huge pages and reused once freed (at most
  two kept, through shared memory too); every ISA clone gives the same bits (valgrind hides AVX-512);
  empty inputs; the launcher's checks and messages; garbage parameters stay in
  bounds; the GIL is released during the call.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from test_kernel_fused_views import (
    POINTWISE,
    TOL,
    TOL_HUE,
    TOL_WARP,
    affine,
    blur,
    brightness,
    build,
    chain_views,
    contrast,
    erase,
    grayscale,
    hflip,
    hue,
    invert,
    posterize,
    rand_images,
    reference,
    resized_crop,
    rotate,
    saturation,
    sharpen,
    shift_noiseless,
    vflip,
)

import mtdl_fast as mf
from mtdl_fast._ext import ext
from mtdl_fast.fused_cpu import available, fused_views_cpu
from mtdl_fast.kernels import fused_views as fv
from mtdl_fast.kernels._launch import interpreting
from mtdl_fast.ops import OPS

pytestmark = pytest.mark.skipif(not available(), reason="mtdl_fast._C is not built with fused_views_cpu")

REDUCED = 1e-6  # blur taps and contrast means: each side's own exp / summation order (measured <= 1.8e-7)
NOISE_ULPS = 4  # noise: each side's own log; measured <= 1.9 ulps of max(1, |out|)
STAGES = [rotate, lambda: rotate(fill=True), affine, lambda: affine(fill=True), resized_crop,
          lambda: resized_crop(True), hflip, vflip, lambda: hflip(nearest=True), lambda: rotate(nearest=True),
          lambda: affine(nearest=True, fill=True), blur, sharpen]


def _reduced(steps) -> bool:
    """Whether a view evaluates blur taps or a contrast mean (not bit-identical across backends)."""
    return any(s.name.startswith(("blur", "contrast")) for s in steps)


def run_both(x, spatial, ops, params, device, **kw):
    """(C++ views, Triton views) for the same program, both on the CPU."""
    got = fused_views_cpu(x, spatial, ops, params, **kw)
    want = fv.fused_views(x.to(device), spatial, ops, params.to(device), **kw).cpu()
    return got, want


def assert_matches_kernel(got, want, views, device):
    """Per view: the same bits under the interpreter (REDUCED where blur taps or contrast means are
    evaluated); within the Triton-vs-reference budgets on a GPU."""
    assert got.shape == want.shape and got.dtype == want.dtype
    for v, steps in enumerate(views):
        if device.type == "cpu":
            tol = REDUCED if _reduced(steps) else 0.0
        else:
            tol = TOL_WARP if any(s.spatial for s in steps) else TOL_HUE
        diff = (got[v].float() - want[v].float()).abs().nan_to_num(0.0)
        assert torch.equal(got[v].isnan(), want[v].isnan()), steps
        assert diff.max().item() <= tol, (steps, diff.max().item())


def test_abi_equals_the_triton_kernels():
    abi = ext().fused_views_abi()
    ours = {name: value for name, value in vars(fv).items()
            if name.startswith(("SPATIAL_", "OP_", "SLOT_")) or name in ("MAX_OPS", "MAX_BLUR_KSIZE", "N_SLOTS",
                                                                         "N_SPATIAL", "N_OPS")}
    assert len(ours) == 11 + 4 + 32 + 5
    assert abi == ours


@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (2, 1, 11, 13), (1, 3, 16, 5)])
def test_every_op_and_stage_equals_the_kernel_and_torchvision(shape, device):
    B, C, H, W = shape
    views = [[op()] for op in POINTWISE] + [[]] + [[stage()] for stage in STAGES]
    x = rand_images(B, C, H, W, seed=30)
    spatial, ops, params, refs = build(views, B, C, H, W, seed=31)
    got, want = run_both(x, spatial, ops, params, device)
    assert_matches_kernel(got, want, views, device)
    ref = reference(x, refs)
    for v, steps in enumerate(views):
        name = steps[0].name if steps else "identity"
        tol = TOL_HUE if name == "hue" else TOL_WARP if name.startswith(("rotate", "affine", "resized")) else TOL
        if "nearest=True" in name:  # rounding ties of grid_sample's nearest: a few pixels may differ
            assert ((got[v] - ref[v]).abs() > 1e-6).float().mean().item() <= 0.01, name
        else:
            assert (got[v] - ref[v]).abs().max().item() <= tol, name


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 1, 1, 1), (2, 3, 3, 7), (1, 3, 7, 3), (1, 1, 2, 5)])
def test_tiny_and_odd_images_equal_the_kernel(shape, device):
    B, C, H, W = shape
    views = [[op()] for op in POINTWISE] + [[stage()] for stage in STAGES]
    x = rand_images(B, C, H, W, seed=32)
    spatial, ops, params, _ = build(views, B, C, H, W, seed=33)
    got, want = run_both(x, spatial, ops, params, device)
    assert_matches_kernel(got, want, views, device)


def test_a_large_odd_image_equals_the_kernel(device):
    """225 x 223: many row tiles per image, partial tiles, contrast means over tiles."""
    views = [[rotate(fill=True), hue()], [resized_crop(), contrast()], [blur(kmax=7), saturation()],
             [sharpen(), posterize()], [hflip(), erase()], [vflip(), grayscale(), invert()]]
    x = rand_images(1, 3, 225, 223, seed=34, dtype=torch.uint8)
    spatial, ops, params, refs = build(views, 1, 3, 225, 223, seed=35)
    got, want = run_both(x, spatial, ops, params, device)
    assert_matches_kernel(got, want, views, device)
    ref = reference(x.float() / 255, refs)
    # Warp coordinates of order 200 carry float32 rounding of ~1e-5 pixels (measured 5.4e-5 here,
    # bit-identical to the kernel); the views after the first three end in discontinuous ops.
    for v, tol in enumerate([4 * TOL_WARP, 4 * TOL_WARP, TOL]):
        assert (got[v] - ref[v]).abs().max().item() <= tol, views[v]


@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (2, 1, 11, 13)])
def test_chains_equal_the_kernel(shape, device):
    views = [*chain_views(), [vflip(), hue(), shift_noiseless()]]
    B, C, H, W = shape
    x = rand_images(B, C, H, W, seed=36)
    spatial, ops, params, _ = build(views, B, C, H, W, seed=37)
    got, want = run_both(x, spatial, ops, params, device)
    assert_matches_kernel(got, want, views, device)


@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_input_dtypes_and_layouts_equal_the_kernel(in_dtype, layout, device):
    views = [[], [rotate()], [blur(kmax=5), contrast()], [sharpen(), hue()], [vflip(), posterize()],
             [hflip(), brightness()], [affine(nearest=True, fill=True)]]
    base = rand_images(2, 3, 9, 19, seed=38, dtype=in_dtype)
    x = {"contiguous": base[:, :, :7, :9].contiguous(),
         "channels_last": base[:, :, :7, :9].contiguous(memory_format=torch.channels_last),
         "strided": base[:, :, 1:8, ::2]}[layout]
    B, C, H, W = x.shape
    spatial, ops, params, refs = build(views, B, C, H, W, seed=39)
    got, want = run_both(x, spatial, ops, params, device)
    assert_matches_kernel(got, want, views, device)
    assert torch.equal(got[0], TF.to_dtype(x, torch.float32, scale=True))  # torchvision's scaling, exactly


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalise", [False, True])
def test_out_dtypes_and_normalisation_equal_the_kernel(out_dtype, normalise, device):
    views = [[], [hflip(), brightness()], [saturation()], [rotate(), contrast()]]
    kw = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]) if normalise else {}
    x = rand_images(2, 3, 7, 9, seed=40)
    spatial, ops, params, refs = build(views, 2, 3, 7, 9, seed=41)
    got, want = run_both(x, spatial, ops, params, device, out_dtype=out_dtype, **kw)
    assert got.dtype == out_dtype and got.shape == (4, 2, 3, 7, 9)
    for v in range(3):  # no contrast mean: the same float32 values, the same rounding
        if device.type == "cpu":
            assert torch.equal(got[v], want[v]), views[v]
    ref = reference(x, refs)
    if normalise:
        ref = TF.normalize(ref.flatten(0, 1), kw["mean"], kw["std"]).view_as(ref)
    # the fused path's budget (in normalised units), plus one rounding of out_dtype
    atol = TOL_WARP / (min(kw["std"]) if normalise else 1.0)
    assert ((got.float() - ref).abs() <= atol + torch.finfo(out_dtype).eps * ref.abs().clamp_min(1.0)).all()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_round_like_torch(out_dtype):
    """The identity view of float32 input is x.to(out_dtype) bit for bit: random bit patterns
    (subnormals, infinities, NaN, huge values) and every rounding boundary of out_dtype."""
    g = torch.Generator().manual_seed(42)
    bits = torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 6.1e-5, 5.96e-8, 2.98e-8,
                             2.99e-8, 1e-10, float("inf"), -float("inf"), float("nan"), 3.3895e38, 1.0 + 2**-11,
                             1.0 + 2**-8, 1.0 + 3 * 2**-11, 1.0 + 3 * 2**-9])
    ulp = torch.arange(-2**20, 2**20, 2**10, dtype=torch.int32)  # around the halfway points of 1.0
    values = torch.cat([bits.view(torch.float32), specials, (torch.tensor([1.0]).view(torch.int32) + ulp).view(
        torch.float32)])
    n = values.numel()
    x = torch.cat([values, torch.zeros(-n % 64)]).view(1, 1, -1, 64)
    spatial = torch.zeros(1, dtype=torch.int32)
    ops = torch.zeros(1, fv.MAX_OPS, dtype=torch.int32)
    params = torch.zeros(1, 1, fv.N_SLOTS)
    got = fused_views_cpu(x, spatial, ops, params, out_dtype=out_dtype)[0]
    want = x.to(out_dtype)
    assert torch.equal(got.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16))


@pytest.mark.parametrize("channels", [3, 1])
def test_noise_is_the_kernels_stream(channels, device):
    """Same Philox counters and Box-Muller: within NOISE_ULPS of the kernel for any seed (Python
    ints modulo 2**63), two noise ops in one view, with and without clipping."""
    B, H, W, K = 2, 13, 17, 2
    x = rand_images(B, channels, H, W, seed=43)
    spatial = torch.zeros(K, dtype=torch.int32)
    ops = torch.zeros(K, fv.MAX_OPS, dtype=torch.int32)
    ops[:, 0] = fv.OP_NOISE
    ops[1, 1:4] = torch.tensor([fv.OP_INVERT, fv.OP_BRIGHTNESS, fv.OP_NOISE])
    params = torch.zeros(K, B, fv.N_SLOTS)
    params[:, :, fv.SLOT_NOISE_MEAN] = 0.05
    params[:, :, fv.SLOT_NOISE_SIGMA] = 0.3
    params[:, :, fv.SLOT_BRIGHTNESS] = 0.9
    params[1, :, fv.SLOT_NOISE_CLIP] = 1.0
    previous = None
    for seed in (0, 123, 2**40 + 7, 2**63 - 1, -5, 2**70 + 3):
        got, want = run_both(x, spatial, ops, params, device, seed=seed)
        ulps = (got - want).abs() / (torch.finfo(torch.float32).eps * want.abs().clamp_min(1.0))
        assert ulps.max().item() <= NOISE_ULPS, (seed, ulps.max().item())
        assert (got[0] - x).std().item() > 0.2  # sigma 0.3 before clipping: real noise
        if previous is not None:
            assert not torch.equal(got, previous)
        previous = got
    assert torch.equal(fused_views_cpu(x, spatial, ops, params, seed=-5),
                       fused_views_cpu(x, spatial, ops, params, seed=2**63 - 5))


def test_the_same_bits_for_any_thread_count():
    """Work splits by (image, row tile) whatever the thread count; contrast means sum fixed tiles."""
    views = [[rotate(), contrast()], [blur(kmax=9), contrast(), hue()], [sharpen(), brightness()], [hflip()]]
    B, C, H, W = 3, 3, 97, 61
    x = rand_images(B, C, H, W, seed=44, dtype=torch.uint8)
    spatial, ops, params, _ = build(views, B, C, H, W, seed=45)
    ops[3, 0] = fv.OP_NOISE
    params[3, :, fv.SLOT_NOISE_SIGMA] = 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_views_cpu(x, spatial, ops, params, seed=9)
        torch.set_num_threads(max(2, threads))
        many = fused_views_cpu(x, spatial, ops, params, seed=9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(one, fused_views_cpu(x, spatial, ops, params, seed=9))


ISA_SCRIPT = """
import sys, torch
from mtdl_fast.fused_cpu import fused_views_cpu
x, spatial, ops, params = torch.load(sys.argv[1])
torch.save((torch.backends.cpu.get_cpu_capability(), fused_views_cpu(x, spatial, ops, params, seed=11)), sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind to present a CPU without AVX-512")
def test_every_isa_clone_gives_the_same_bits(tmp_path):
    """The stages are compiled per ISA and picked at load time, so a machine tests only its own clone.
    Valgrind presents this CPU without AVX-512: the same program there must give the same bits."""
    own = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in own:
        pytest.skip(f"this CPU ({own}) runs the clone valgrind would")
    views = [[make()] for make in STAGES] + chain_views() + [[affine(), invert()], [brightness()]]
    B, C, H, W = 2, 3, 13, 37
    x = rand_images(B, C, H, W, seed=47, dtype=torch.uint8)
    spatial, ops, params, _ = build(views, B, C, H, W, seed=48)
    ops[-1, 1] = fv.OP_NOISE
    params[-1, :, fv.SLOT_NOISE_SIGMA] = 0.2
    torch.save((x, spatial, ops, params), tmp_path / "in.pt")
    cmd = ["valgrind", "-q", "--tool=none", sys.executable, "-c", ISA_SCRIPT, str(tmp_path / "in.pt"),
           str(tmp_path / "out.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs, views_there = torch.load(tmp_path / "out.pt")
    assert "AVX512" not in theirs, theirs
    here = fused_views_cpu(x, spatial, ops, params, seed=11)
    assert torch.equal(views_there.view(torch.int32), here.view(torch.int32))


def test_out_is_fully_overwritten_and_returned():
    views = [[], [rotate(fill=True)], [blur(kmax=5)], [sharpen(), contrast()], [erase()], [hflip()]]
    B, C, H, W = 2, 3, 7, 9
    x = rand_images(B, C, H, W, seed=46)
    spatial, ops, params, refs = build(views, B, C, H, W, seed=47)
    want = fused_views_cpu(x, spatial, ops, params)
    for dtype, poison in [(torch.float32, float("nan")), (torch.float16, 1234.0), (torch.bfloat16, -7.0)]:
        out = torch.full((len(views), B, C, H, W), poison, dtype=dtype)
        assert fused_views_cpu(x, spatial, ops, params, out_dtype=dtype, out=out) is out
        assert torch.equal(out, want.to(dtype))


def test_empty_inputs_give_empty_outputs():
    spatial, ops, params, _ = build([[], [rotate()], [contrast()]], 0, 3, 8, 8)
    out = fused_views_cpu(torch.empty(0, 3, 8, 8), spatial, ops, params, out_dtype=torch.float16)
    assert out.shape == (3, 0, 3, 8, 8) and out.dtype == torch.float16
    spatial, ops, params, _ = build([[], [rotate()]], 2, 3, 0, 5)
    assert fused_views_cpu(torch.empty(2, 3, 0, 5), spatial, ops, params).shape == (2, 2, 3, 0, 5)
    spatial, ops, params, _ = build([], 2, 3, 8, 8)  # no views at all
    assert fused_views_cpu(torch.rand(2, 3, 8, 8), spatial, ops, params).shape == (0, 2, 3, 8, 8)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise huge pages are Linux's")
def test_an_output_it_allocates_is_advised_onto_huge_pages():
    spatial, ops, params, _ = build([[], [rotate()], [contrast()], [hflip()]], 16, 3, 224, 224, seed=48)
    x = rand_images(16, 3, 224, 224, seed=49)
    got = fused_views_cpu(x, spatial, ops, params)  # 38.5 MB: its own mapping, advised before the first write
    assert "hg" in _vm_flags(got.data_ptr() + got.nbytes // 2)
    small_program = build([[], [rotate()]], 1, 3, 64, 64, seed=48)[:3]
    small = fused_views_cpu(rand_images(1, 3, 64, 64, seed=49), *small_program)  # 98 KB: torch's, left alone
    assert "hg" not in _vm_flags(small.data_ptr() + small.nbytes // 2)
    given = torch.full_like(got, float("nan"))
    assert fused_views_cpu(x, spatial, ops, params, out=given) is given and torch.equal(given, got)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output pool maps memory on Linux")
def test_a_freed_output_is_reused_and_fully_overwritten():
    """Outputs from 1 MiB on come from the pool: a freed one is handed to the next call of its size
    with the last views still in it, and every byte is written again; never to two calls at once,
    never to another size."""
    from mtdl_fast.fused_cpu import empty_cache

    empty_cache()
    views = [[], [rotate()], [contrast()], [hflip()], [blur()]]
    spatial, ops, params, _ = build(views, 16, 3, 224, 224, seed=50)
    x, other = rand_images(16, 3, 224, 224, seed=51), rand_images(16, 3, 224, 224, seed=52)
    first = fused_views_cpu(other, spatial, ops, params)  # 48 MB
    address = first.data_ptr()
    del first
    assert ext().cached_output_bytes() >= 5 * 16 * 3 * 224 * 224 * 4
    larger = fused_views_cpu(torch.cat([x, x[:4]]), spatial, ops, torch.cat([params, params[:, :4]], 1))
    assert larger.data_ptr() != address, "a kept mapping serves its own size only"
    reused = fused_views_cpu(x, spatial, ops, params)
    again = fused_views_cpu(x, spatial, ops, params)
    assert reused.data_ptr() == address and again.data_ptr() != address, "taken once, then it is in use"
    assert ext().cached_output_bytes() == 0
    want = fused_views_cpu(x, spatial, ops, params, out=torch.full_like(reused, float("nan")))
    assert torch.equal(reused, want) and torch.equal(again, want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output pool maps memory on Linux")
@pytest.mark.parametrize("floats", [9 << 20, 1 << 18], ids=["36MiB", "1MiB"])
def test_the_pool_keeps_at_most_two_and_empties(floats):
    from mtdl_fast.fused_cpu import empty_cache

    empty_cache()
    nbytes = 4 * floats
    outs = [ext().empty_output([floats], torch.float32) for _ in range(3)]
    for i in range(3):
        outs[i].fill_(1.5)
    outs.pop()
    assert ext().cached_output_bytes() == nbytes
    del outs  # three freed, two kept
    assert ext().cached_output_bytes() == 2 * nbytes
    assert empty_cache() == 2 * nbytes and ext().cached_output_bytes() == 0
    small = ext().empty_output([(1 << 19) - 1], torch.bfloat16)  # a byte pair under 1 MiB: torch's, never pooled
    assert small.shape == ((1 << 19) - 1,) and small.dtype == torch.bfloat16
    del small
    assert ext().cached_output_bytes() == 0
    with pytest.raises(RuntimeError, match="negative size"):
        ext().empty_output([-1, 9 << 20], torch.float32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output pool maps memory on Linux")
def test_a_pooled_output_moves_to_shared_memory_and_back_to_the_pool():
    """What a DataLoader worker does with the views it returns: the storage moves to shared memory
    (the data copied), and the pool's mapping is freed into the pool, from whichever thread."""
    from mtdl_fast.fused_cpu import empty_cache

    empty_cache()
    spatial, ops, params, _ = build([[rotate()], [hflip()]], 32, 3, 224, 224, seed=53)
    x = rand_images(32, 3, 224, 224, seed=54)
    views = fused_views_cpu(x, spatial, ops, params)  # 38.5 MB
    want = views.clone()
    views.share_memory_()
    assert views.is_shared() and torch.equal(views, want)
    assert ext().cached_output_bytes() >= views.nbytes
    freed = threading.Thread(target=lambda: fused_views_cpu(x, spatial, ops, params))
    freed.start()
    freed.join()
    assert ext().cached_output_bytes() >= views.nbytes


def _call(fn, x, spatial, ops, params, **kw):
    try:
        fn(x, spatial, ops, params, **kw)
    except (TypeError, ValueError) as err:
        return type(err), str(err)
    return None


def test_bad_inputs_raise_the_kernels_errors():
    B, C, H, W = 2, 3, 6, 6
    x = rand_images(B, C, H, W, seed=48)
    spatial, ops, params, _ = build([[], [contrast()]], B, C, H, W)
    two_contrast = ops.clone()
    two_contrast[1, 1] = fv.OP_CONTRAST
    gap = ops.clone()
    gap[1, 2] = fv.OP_INVERT
    bad_op = ops.clone()
    bad_op[0, 0] = 99
    cases = [  # (arguments, the argument the message names)
        (dict(x=x[0]), "x"), (dict(x=torch.zeros(B, 2, H, W)), "x"), (dict(x=x.double()), "x"),
        (dict(x=x.to(torch.int32)), "x"), (dict(x=x.tolist()), "x"), (dict(spatial=spatial.long()), "spatial"),
        (dict(spatial=torch.tensor([0, 7], dtype=torch.int32)), "spatial"), (dict(spatial=[0, 0]), "spatial"),
        (dict(ops=ops[:, :4]), "ops"), (dict(ops=bad_op), "ops"), (dict(ops=two_contrast), "OP_CONTRAST"),
        (dict(ops=gap), "OP_END"), (dict(params=params[:, :1]), "params"), (dict(params=params.double()), "params"),
        (dict(params=params[:1]), "params"), (dict(out_dtype=torch.int8), "out_dtype"),
        (dict(out=torch.empty(2, B, C, H, W + 1)), "out"),
        (dict(out=torch.empty(2, B, C, H, W), out_dtype=torch.float16), "out"),
        (dict(out=torch.empty(2, B, C, H, W * 2)[..., ::2]), "out"), (dict(mean=[0.5, 0.5]), "mean"),
        (dict(std=[0.5, 0.0, 0.5]), "std"), (dict(std=[0.5, float("inf"), 0.5]), "std"), (dict(seed=1.5), "seed"),
    ]
    for case, name in cases:
        args = {**dict(x=x, spatial=spatial, ops=ops, params=params), **case}
        call = [args.pop(k) for k in ("x", "spatial", "ops", "params")]
        ours = _call(fused_views_cpu, *call, **args)
        assert ours is not None and name in ours[1], (case, ours)
        if interpreting():  # the Triton launcher takes CPU tensors too: the very same error
            assert ours == _call(fv.fused_views, *call, **args), case
    meta = torch.empty(B, C, H, W, device="meta")
    with pytest.raises(ValueError, match="x must be a CPU tensor, got device meta"):
        fused_views_cpu(meta, spatial, ops, params)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_garbage_parameters_stay_in_bounds():
    """NaN, infinities, huge and negative values in every slot, every spatial code and op: no
    crash and no out-of-bounds access (blur radii, reflections, coordinates and bits clamped)."""
    B, C, H, W, K = 2, 3, 5, 6, 8
    x = rand_images(B, C, H, W, seed=49)
    spatial = torch.tensor([0, 1, 1, 2, 3, 1, 2, 0], dtype=torch.int32)
    codes = [c for c in range(1, fv.N_OPS) if c != fv.OP_CONTRAST]
    ops = torch.tensor([[codes[(v + j) % len(codes)] for j in range(fv.MAX_OPS - 1)] + [fv.OP_CONTRAST]
                        for v in range(K)], dtype=torch.int32)
    g = torch.Generator().manual_seed(50)
    choices = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -3.0, 0.0, 0.5, 2.0, 17.0])
    for _ in range(5):
        params = choices[torch.randint(0, len(choices), (K, B, fv.N_SLOTS), generator=g)]
        params[2, :, fv.SLOT_NEAREST] = 1.0
        assert fused_views_cpu(x, spatial, ops, params).shape == (K, B, C, H, W)
    # a blur radius beyond MAX_BLUR_KSIZE is clamped to it
    spatial, ops, params, _ = build([[blur()], [blur()]], B, C, 16, 16, seed=51)
    x = rand_images(B, C, 16, 16, seed=52)
    params[0, :, fv.SLOT_BLUR_KX:fv.SLOT_BLUR_KY + 1] = 99.0
    params[1, :, fv.SLOT_BLUR_KX:fv.SLOT_BLUR_KY + 1] = float(fv.MAX_BLUR_KSIZE)
    params[1, :, fv.SLOT_BLUR_SX:fv.SLOT_BLUR_SY + 1] = params[0, :, fv.SLOT_BLUR_SX:fv.SLOT_BLUR_SY + 1]
    out = fused_views_cpu(x, spatial, ops, params)
    assert torch.equal(out[0], out[1])


def test_the_call_releases_the_gil():
    """A Python thread keeps running while the views are computed (DataLoader threads, servers)."""
    spatial, ops, params, _ = build([[rotate()], [blur(kmax=9)], [hue()]] * 4, 96, 3, 96, 96, seed=53)
    x = rand_images(96, 3, 96, 96, seed=54, dtype=torch.uint8)
    fused_views_cpu(x, spatial, ops, params)  # warm up
    ticks = 0
    worker = threading.Thread(target=fused_views_cpu, args=(x, spatial, ops, params))
    worker.start()
    while worker.is_alive():
        ticks += 1
    worker.join()
    # Holding the GIL, the C++ call would stop this loop for its whole duration (> 0.1 s).
    assert ticks > 10_000, ticks


# ------------------------------------------------------------------------------------------------
# Against the torch path of DistributionTasks (the meaning of every task), same sampled params
# ------------------------------------------------------------------------------------------------
FUSABLE = [name for name in sorted({cls.name for cls in OPS.values()}) if name != "gaussian_noise"] + [
    "horizontal_flip+rotate+contrast+erase",
    "resized_crop+vertical_flip+posterize",
    "gaussian_blur+saturation+solarize",
    "sharpness+hue+grayscale",
    ("rotate+brightness", {"fill": 0.25}),
    ("gaussian_noise", {"sigma": 0.0, "mean": (-0.2, 0.2)}),
]
WARPS = ("rotate", "affine", "resized_crop")


def _budget(task) -> tuple[float, float]:
    """(atol, share of elements allowed beyond it) of the fused path against the torch path (README)."""
    name = task if isinstance(task, str) else task[0]
    atol = TOL_HUE if "hue" in name else TOL_WARP if any(w in name for w in WARPS) else TOL
    discontinuous = any(op in name for op in ("posterize", "solarize")) and "+" in name
    return atol, 0.01 if discontinuous else 0.0


@pytest.mark.parametrize("shape", [(3, 3, 11, 13), (2, 1, 3, 7), (1, 3, 225, 223)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_the_torch_path_for_the_same_params(shape, layout):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(55)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    tasks = mf.DistributionTasks(FUSABLE, seed=3, backend="torch")
    params = tasks.sample(B, (H, W))
    want = tasks.apply(x, params)
    spatial, ops, table = tasks.kernel_tables(params, torch.device("cpu"))
    got = fused_views_cpu(x, spatial, ops, table, seed=params.seed)
    for k, task in enumerate(FUSABLE):
        atol, share = _budget(task)
        bad = ((got[k] - want[k]).abs() > atol).float().mean().item()
        assert bad <= share, (task, (got[k] - want[k]).abs().max().item())


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_equal_the_torch_path(in_dtype, out_dtype):
    B, C, H, W = 2, 3, 9, 10
    x = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(56)).to(in_dtype)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.5, 1.0]
    tasks = mf.DistributionTasks(FUSABLE, seed=4, backend="torch", out_dtype=out_dtype, mean=mean, std=std)
    params = tasks.sample(B, (H, W))
    want = tasks.apply(x, params).float()
    spatial, ops, table = tasks.kernel_tables(params, torch.device("cpu"))
    got = fused_views_cpu(x, spatial, ops, table, seed=params.seed, out_dtype=out_dtype, mean=mean, std=std)
    assert got.dtype == out_dtype
    got = got.float()
    eps = torch.finfo(out_dtype).eps if out_dtype != torch.float32 else 0.0
    for k, task in enumerate(FUSABLE):
        atol, share = _budget(task)
        limit = atol / min(std) + eps * want[k].abs().clamp_min(1.0)  # plus one rounding of out_dtype
        bad = ((got[k] - want[k]).abs() > limit).float().mean().item()
        assert bad <= share, (task, (got[k] - want[k]).abs().max().item())


def test_cpu_backend_of_distribution_tasks_runs_this_path():
    x = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    tasks = mf.DistributionTasks(FUSABLE, seed=5, backend="cpu")
    params = tasks.sample(3, (12, 12))
    spatial, ops, table = tasks.kernel_tables(params, torch.device("cpu"))
    assert torch.equal(tasks.apply(x, params), fused_views_cpu(x, spatial, ops, table, seed=params.seed))
    assert mf.DistributionTasks(FUSABLE, backend="auto").resolve_backend(x) == "cpu"
    assert not math.isnan(tasks(x).sum().item())
