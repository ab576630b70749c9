"""kernels/fused_views.py against torchvision.transforms.v2.functional applied image by image.

The reference maps every (spatial, ops, params row) of a view back to the torchvision calls that
define it: each test "step" below draws its random per-image parameters, writes them into the
kernel's parameter slots and returns the torchvision call they stand for. Runs on the GPU when one
is present, else on the CPU under the Triton interpreter (small shapes: the interpreter is slow).

Measured max abs errors (float32, interpreter, shapes of SHAPES and 12x12, 3 seeds):
  brightness, hue, invert, solarize, posterize, erase, noise(sigma=0): 0 (bit-identical);
  contrast 7e-8, saturation 1.2e-7, grayscale 1.2e-7, sharpen 1.8e-7, blur (k <= 15) 4.8e-7;
  bilinear rotate/affine (with and without fill) 1.7e-6, resized_crop 9e-7 (coordinates are
  M @ (x, y, 1) in pixel units while torchvision normalises and un-normalises a grid: different
  rounding); flips and nearest warps: 0 (no rounding tie met). Tolerances: TOL* below.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from mtdl_fast.kernels import fused_views as fv

TOL = 1e-5          # float32 pointwise ops, blur, sharpen, contrast
TOL_HUE = 1e-4
TOL_WARP = 5e-5     # bilinear warps; measured <= 1.7e-6 at these sizes
NEAREST_TIE_FRACTION = 0.01

NOCLAMP = {fv.SLOT_CLAMP_X0: -1e30, fv.SLOT_CLAMP_X1: 1e30, fv.SLOT_CLAMP_Y0: -1e30, fv.SLOT_CLAMP_Y1: 1e30}


# ------------------------------------------------------------------------------------------------
# Steps: code + sampler(gen, C, H, W) -> (slots dict, reference fn on one (C, H, W) float image)
# ------------------------------------------------------------------------------------------------
def _u(gen, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _ri(gen, lo, hi):  # integer in [lo, hi]
    return int(torch.randint(lo, hi + 1, (), generator=gen).item())


class Step:
    def __init__(self, code, sample, name, spatial=False):
        self.code, self.sample, self.name, self.spatial = code, sample, name, spatial

    def __repr__(self):
        return self.name


def _theta_to_pixels(theta, W, H):
    t0, t1, t2, t3, t4, t5 = theta
    cx, cy = (W - 1) / 2, (H - 1) / 2
    return {fv.SLOT_M0: t0, fv.SLOT_M1: t1, fv.SLOT_M2: t2 + cx - t0 * cx - t1 * cy,
            fv.SLOT_M3: t3, fv.SLOT_M4: t4, fv.SLOT_M5: t5 + cy - t3 * cx - t4 * cy}


def _interp(nearest):
    return InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR


def _fill_slots(fill):
    return {fv.SLOT_FILL: 0.0 if fill is None else fill, fv.SLOT_HAS_FILL: 0.0 if fill is None else 1.0}


def rotate(nearest=False, fill=False):
    def sample(gen, C, H, W):
        angle = _u(gen, -75, 75)
        f = _u(gen, 0, 1) if fill else None
        theta = _get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
        slots = {**_theta_to_pixels(theta, W, H), **NOCLAMP, **_fill_slots(f), fv.SLOT_NEAREST: float(nearest)}
        return slots, lambda im: F.rotate(im, angle, interpolation=_interp(nearest), fill=f)
    return Step(fv.SPATIAL_WARP, sample, f"rotate(nearest={nearest}, fill={fill})", spatial=True)


def affine(nearest=False, fill=False):
    def sample(gen, C, H, W):
        angle = _u(gen, -40, 40)
        translate = [_u(gen, -0.2, 0.2) * W, _u(gen, -0.2, 0.2) * H]
        scale = _u(gen, 0.7, 1.3)
        shear = [_u(gen, -15, 15), _u(gen, -15, 15)]
        f = _u(gen, 0, 1) if fill else None
        theta = _get_inverse_affine_matrix([0.0, 0.0], angle, translate, scale, shear)
        slots = {**_theta_to_pixels(theta, W, H), **NOCLAMP, **_fill_slots(f), fv.SLOT_NEAREST: float(nearest)}
        return slots, lambda im: F.affine(im, angle, translate, scale, shear,
                                          interpolation=_interp(nearest), fill=f)
    return Step(fv.SPATIAL_WARP, sample, f"affine(nearest={nearest}, fill={fill})", spatial=True)


def resized_crop(antialias=False):
    def sample(gen, C, H, W):
        h, w = _ri(gen, (H + 1) // 2, H), _ri(gen, (W + 1) // 2, W)  # upsampling crops
        top, left = _ri(gen, 0, H - h), _ri(gen, 0, W - w)
        slots = {fv.SLOT_M0: w / W, fv.SLOT_M1: 0.0, fv.SLOT_M2: left + 0.5 * w / W - 0.5,
                 fv.SLOT_M3: 0.0, fv.SLOT_M4: h / H, fv.SLOT_M5: top + 0.5 * h / H - 0.5,
                 fv.SLOT_CLAMP_X0: left, fv.SLOT_CLAMP_X1: left + w - 1,
                 fv.SLOT_CLAMP_Y0: top, fv.SLOT_CLAMP_Y1: top + h - 1,
                 fv.SLOT_NEAREST: 0.0, **_fill_slots(None)}
        return slots, lambda im: F.resized_crop(im, top, left, h, w, [H, W],
                                                interpolation=InterpolationMode.BILINEAR, antialias=antialias)
    return Step(fv.SPATIAL_WARP, sample, f"resized_crop(antialias={antialias})", spatial=True)


def hflip(nearest=False):
    # Exact either way on finite images. With NaN input only nearest is NaN-exact: bilinear follows
    # grid_sample, where a NaN neighbour of weight 0 still makes the sample NaN.
    def sample(gen, C, H, W):
        slots = {fv.SLOT_M0: -1.0, fv.SLOT_M2: W - 1.0, fv.SLOT_M4: 1.0, **NOCLAMP, fv.SLOT_NEAREST: float(nearest)}
        return slots, F.horizontal_flip
    return Step(fv.SPATIAL_WARP, sample, "hflip", spatial=True)


def vflip():
    def sample(gen, C, H, W):
        slots = {fv.SLOT_M0: 1.0, fv.SLOT_M4: -1.0, fv.SLOT_M5: H - 1.0, **NOCLAMP, fv.SLOT_NEAREST: 1.0}
        return slots, F.vertical_flip
    return Step(fv.SPATIAL_WARP, sample, "vflip", spatial=True)


def blur(kmax=fv.MAX_BLUR_KSIZE):
    def sample(gen, C, H, W):
        # odd sizes whose reflect padding (k // 2) stays below the image size, as torch requires
        kx = 2 * _ri(gen, 0, min(kmax // 2, W - 1)) + 1
        ky = 2 * _ri(gen, 0, min(kmax // 2, H - 1)) + 1
        sx, sy = _u(gen, 0.3, 3.0), _u(gen, 0.3, 3.0)
        slots = {fv.SLOT_BLUR_KX: kx, fv.SLOT_BLUR_KY: ky, fv.SLOT_BLUR_SX: sx, fv.SLOT_BLUR_SY: sy}
        return slots, lambda im: F.gaussian_blur(im, [kx, ky], [sx, sy])
    return Step(fv.SPATIAL_BLUR, sample, f"blur(kmax={kmax})", spatial=True)


def sharpen():
    def sample(gen, C, H, W):
        f = _u(gen, 0.0, 3.0)
        return {fv.SLOT_SHARPNESS: f}, lambda im: F.adjust_sharpness(im, f)
    return Step(fv.SPATIAL_SHARPEN, sample, "sharpen", spatial=True)


def _factor_op(code, slot, lo, hi, fn, name):
    def sample(gen, C, H, W):
        f = _u(gen, lo, hi)
        return {slot: f}, lambda im: fn(im, f)
    return Step(code, sample, name)


def brightness():
    return _factor_op(fv.OP_BRIGHTNESS, fv.SLOT_BRIGHTNESS, 0.3, 1.8, F.adjust_brightness, "brightness")


def contrast():
    return _factor_op(fv.OP_CONTRAST, fv.SLOT_CONTRAST, 0.2, 1.8, F.adjust_contrast, "contrast")


def saturation():
    return _factor_op(fv.OP_SATURATION, fv.SLOT_SATURATION, 0.0, 2.0, F.adjust_saturation, "saturation")


def hue():
    return _factor_op(fv.OP_HUE, fv.SLOT_HUE, -0.5, 0.5, F.adjust_hue, "hue")


def solarize():
    return _factor_op(fv.OP_SOLARIZE, fv.SLOT_SOLARIZE, 0.1, 0.9, F.solarize, "solarize")


def grayscale():
    def sample(gen, C, H, W):
        return {}, lambda im: F.rgb_to_grayscale(im, num_output_channels=im.shape[-3])
    return Step(fv.OP_GRAYSCALE, sample, "grayscale")


def invert():
    return Step(fv.OP_INVERT, lambda gen, C, H, W: ({}, F.invert), "invert")


def posterize():
    def sample(gen, C, H, W):
        bits = _ri(gen, 0, 8)
        return {fv.SLOT_POSTERIZE_BITS: bits}, lambda im: F.posterize(im, bits)
    return Step(fv.OP_POSTERIZE, sample, "posterize")


def erase():
    def sample(gen, C, H, W):
        h, w = _ri(gen, 1, H), _ri(gen, 1, W)
        top, left = _ri(gen, -1, H - 1), _ri(gen, -1, W - 1)  # may stick out of the image
        val = _u(gen, 0, 1)
        slots = {fv.SLOT_ERASE_TOP: top, fv.SLOT_ERASE_LEFT: left, fv.SLOT_ERASE_H: h,
                 fv.SLOT_ERASE_W: w, fv.SLOT_ERASE_VALUE: val}

        def ref(im):
            t, lft = max(top, 0), max(left, 0)
            hh, ww = top + h - t, left + w - lft
            return F.erase(im, t, lft, hh, ww, torch.tensor(val, dtype=im.dtype))
        return slots, ref
    return Step(fv.OP_ERASE, sample, "erase")


def shift_noiseless():
    """OP_NOISE with sigma = 0: a deterministic shift (+ clip), exactly torchvision's formula."""
    def sample(gen, C, H, W):
        mean, clip = _u(gen, -0.3, 0.3), bool(_ri(gen, 0, 1))
        slots = {fv.SLOT_NOISE_MEAN: mean, fv.SLOT_NOISE_SIGMA: 0.0, fv.SLOT_NOISE_CLIP: float(clip)}
        return slots, lambda im: F.gaussian_noise(im, mean=mean, sigma=0.0, clip=clip)
    return Step(fv.OP_NOISE, sample, "noise(sigma=0)")


POINTWISE = [brightness, contrast, saturation, hue, grayscale, invert, solarize, posterize, erase,
             shift_noiseless]


# ------------------------------------------------------------------------------------------------
# Building the tables and the reference
# ------------------------------------------------------------------------------------------------
def build(views, B, C, H, W, seed=0, device="cpu"):
    """views: list of lists of Steps (a spatial Step first, optionally). Returns the kernel tables
    and refs[v][b] = list of torchvision callables."""
    gen = torch.Generator().manual_seed(seed)
    K = len(views)
    spatial = torch.zeros(K, dtype=torch.int32)
    ops = torch.zeros(K, fv.MAX_OPS, dtype=torch.int32)
    params = torch.zeros(K, B, fv.N_SLOTS, dtype=torch.float32)
    refs = [[None] * B for _ in range(K)]
    for v, steps in enumerate(views):
        j = 0
        for i, s in enumerate(steps):
            assert not s.spatial or i == 0, "the spatial stage comes first"
            if s.spatial:
                spatial[v] = s.code
            else:
                ops[v, j] = s.code
                j += 1
        for b in range(B):
            fns = []
            for s in steps:
                slots, fn = s.sample(gen, C, H, W)
                for k, val in slots.items():
                    params[v, b, k] = float(val)
                fns.append(fn)
            refs[v][b] = fns
    return spatial, ops, params.to(device), refs


def reference(xf, refs):
    """xf: (B, C, H, W) float32 on the CPU. Returns (K, B, C, H, W) float32."""
    out = []
    for per_view in refs:
        imgs = []
        for b, fns in enumerate(per_view):
            im = xf[b].clone()
            for fn in fns:
                im = fn(im)
            imgs.append(im)
        out.append(torch.stack(imgs))
    return torch.stack(out)


def rand_images(B, C, H, W, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (B, C, H, W), generator=gen, dtype=torch.uint8)
    return torch.rand(B, C, H, W, generator=gen).to(dtype)


def as_float(x):
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def run_and_ref(views, shape, device, seed=0, in_dtype=torch.float32, channels_last=False, **kw):
    B, C, H, W = shape
    x = rand_images(B, C, H, W, seed + 1000, in_dtype)
    spatial, ops, params, refs = build(views, B, C, H, W, seed, device)
    xd = x.to(device)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    out = fv.fused_views(xd, spatial, ops, params, **kw)
    return out.cpu(), reference(as_float(x), refs)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
SHAPES = [(3, 3, 7, 9), (2, 1, 11, 13), (1, 3, 16, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_each_pointwise_op_alone(shape, device):
    views = [[op()] for op in POINTWISE] + [[]]  # the last view is the identity
    out, ref = run_and_ref(views, shape, device, seed=1)
    for v, steps in enumerate(views):
        tol = TOL_HUE if steps and steps[0].name == "hue" else TOL
        err = max_err(out[v], ref[v])
        assert err <= tol, (steps, err)
    assert torch.equal(out[-1], ref[-1])


@pytest.mark.parametrize("shape", SHAPES)
def test_spatial_stages_alone(shape, device):
    views = [[rotate()], [rotate(fill=True)], [affine()], [affine(fill=True)],
             [resized_crop(False)], [resized_crop(True)], [hflip()], [vflip()],
             [blur()], [sharpen()]]
    out, ref = run_and_ref(views, shape, device, seed=2)
    for v, steps in enumerate(views):
        name = steps[0].name
        tol = TOL_WARP if name.startswith(("rotate", "affine", "resized")) else TOL
        if name in ("hflip", "vflip"):
            tol = 0.0
        assert max_err(out[v], ref[v]) <= tol, (name, max_err(out[v], ref[v]))


@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (2, 1, 11, 13)])
def test_nearest_warps(shape, device):
    views = [[rotate(nearest=True)], [rotate(nearest=True, fill=True)],
             [affine(nearest=True)], [affine(nearest=True, fill=True)]]
    out, ref = run_and_ref(views, shape, device, seed=3)
    for v in range(len(views)):
        # a pixel may differ only where a source coordinate is (within rounding) a .5 tie
        differ = (out[v] - ref[v]).abs() > 1e-6
        assert differ.float().mean().item() <= NEAREST_TIE_FRACTION, (views[v], differ.float().mean())


def test_blur_kernel_sizes(device):
    # every odd size up to MAX_BLUR_KSIZE in both directions, anisotropic sigmas, both C
    B, H, W = 2, 16, 11
    for C in (3, 1):
        views = [[blur()] for _ in range(4)]
        gen = torch.Generator().manual_seed(5 + C)
        spatial, ops, params, refs = build(views, B, C, H, W, seed=5 + C, device=device)
        for i, (kx, ky) in enumerate([(1, 15), (15, 1), (3, 9), (fv.MAX_BLUR_KSIZE, 13)]):
            for b in range(B):
                sx, sy = _u(gen, 0.3, 4.0), _u(gen, 0.3, 4.0)
                params[i, b, fv.SLOT_BLUR_KX:fv.SLOT_BLUR_SY + 1] = torch.tensor([kx, ky, sx, sy])
                refs[i][b] = [lambda im, kx=kx, ky=ky, sx=sx, sy=sy: F.gaussian_blur(im, [kx, ky], [sx, sy])]
        x = rand_images(B, C, H, W, 77)
        out = fv.fused_views(x.to(device), spatial, ops, params).cpu()
        assert max_err(out, reference(x, refs)) <= TOL


def test_sharpen_small_images_unchanged(device):
    x = rand_images(2, 3, 2, 5, 8) * 1.5 - 0.2  # out of range values: returned as is, not clamped
    views = [[sharpen()]]
    spatial, ops, params, refs = build(views, 2, 3, 2, 5, device=device)
    out = fv.fused_views(x.to(device), spatial, ops, params).cpu()
    assert torch.equal(out[0], x)
    assert torch.equal(out, reference(x, refs))


def chain_views() -> list:
    """Long op chains behind each spatial stage (fresh step objects on every call)."""
    return [
        [rotate(fill=True), hue(), contrast(), erase()],
        [blur(), saturation(), posterize()],
        [sharpen(), brightness(), contrast(), solarize()],
        [resized_crop(), grayscale(), invert(), contrast(), shift_noiseless()],
        [brightness(), saturation(), hue(), contrast(), solarize(), posterize(), invert(), erase()],
        [hflip(), contrast()],
    ]


@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (2, 1, 11, 13)])
def test_chains(shape, device):
    views = chain_views()
    out, ref = run_and_ref(views, shape, device, seed=9)
    for v, steps in enumerate(views):
        tol = TOL_WARP if steps[0].name.startswith(("rotate", "resized")) else TOL_HUE
        # posterize/solarize are discontinuous: a last-bit difference upstream may flip a level
        diff = (out[v] - ref[v]).abs()
        bad = (diff > tol).float().mean().item()
        assert bad <= 0.01, (steps, diff.max().item())


def test_contrast_many_tiles_deterministic(device):
    """Contrast's mean is reduced over many tiles (tiny block_size); the result is bit-stable."""
    views = [[affine(), contrast()], [contrast(), hue()], [blur(kmax=5), brightness(), contrast()], [invert()]]
    shape = (2, 3, 11, 13)
    out, ref = run_and_ref(views, shape, device, seed=11, block_size=16)
    for v in range(len(views)):
        tol = TOL_WARP if v == 0 else TOL_HUE
        assert max_err(out[v], ref[v]) <= tol, (views[v], max_err(out[v], ref[v]))
    again, _ = run_and_ref(views, shape, device, seed=11, block_size=16)
    assert torch.equal(out, again)
    default_block, _ = run_and_ref(views, shape, device, seed=11)
    assert max_err(out, default_block) <= 1e-6


@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_input_dtypes_and_layouts(in_dtype, channels_last, device):
    views = [[], [rotate()], [blur(kmax=5), contrast()], [sharpen(), hue()], [vflip(), posterize()]]
    out, ref = run_and_ref(views, (2, 3, 7, 9), device, seed=13, in_dtype=in_dtype,
                           channels_last=channels_last)
    assert max_err(out[0], ref[0]) <= 1e-7
    for v in range(1, len(views)):
        tol = TOL_WARP if v == 1 else TOL_HUE
        assert max_err(out[v], ref[v]) <= tol, (views[v], max_err(out[v], ref[v]))


def test_arbitrary_strides(device):
    base = rand_images(2, 3, 8, 19, 14)
    x = base[:, :, 1:, ::2].to(device)  # a strided view, not contiguous in any format
    views = [[], [affine()], [blur(kmax=7)], [sharpen()]]
    spatial, ops, params, refs = build(views, 2, 3, 7, 10, seed=14, device=device)
    out = fv.fused_views(x, spatial, ops, params).cpu()
    ref = reference(x.cpu().float(), refs)
    assert torch.equal(out[0], ref[0])
    assert max_err(out, ref) <= TOL_WARP


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_out_dtype_and_normalisation(out_dtype, device):
    views = [[], [hflip(), brightness()], [saturation()]]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for norm in (False, True):
        kw = dict(mean=mean, std=std) if norm else {}
        out, ref = run_and_ref(views, (2, 3, 7, 9), device, seed=15, out_dtype=out_dtype, **kw)
        assert out.dtype == out_dtype and out.shape == (3, 2, 3, 7, 9)
        if norm:
            ref = F.normalize(ref.flatten(0, 1), mean, std).view_as(ref)
        ref_cast = ref.to(out_dtype)
        if out_dtype == torch.float32:
            assert max_err(out, ref) <= TOL
        else:
            # at most one unit in the last place of out_dtype, and almost all exactly equal
            eps = torch.finfo(out_dtype).eps
            diff = (out.float() - ref_cast.float()).abs()
            assert (diff <= eps * ref.abs().clamp_min(2 ** -14)).all()
            assert (diff > 0).float().mean().item() <= 0.02


def test_out_is_fully_overwritten(device):
    views = [[], [rotate(fill=True)], [blur(kmax=5)], [sharpen(), contrast()], [erase()]]
    B, C, H, W = 2, 3, 7, 9
    x = rand_images(B, C, H, W, 16).to(device)
    spatial, ops, params, refs = build(views, B, C, H, W, seed=16, device=device)
    for dtype, poison in [(torch.float32, float("nan")), (torch.float16, 1234.0), (torch.bfloat16, -7.0)]:
        out = torch.full((len(views), B, C, H, W), poison, dtype=dtype, device=device)
        res = fv.fused_views(x, spatial, ops, params, out_dtype=dtype, out=out)
        assert res is out
        o = out.float()
        assert torch.isfinite(o).all() and (o != poison).all() and (o >= 0).all() and (o <= 1).all()
    # and for a view count / shape where the grid has a partial last tile
    out = torch.full((len(views), B, C, H, W), float("nan"), device=device)
    fv.fused_views(x, spatial, ops, params, out=out, block_size=16)
    assert torch.isfinite(out).all()


def test_nan_propagates(device):
    B, C, H, W = 2, 3, 7, 9
    x = rand_images(B, C, H, W, 17)
    x[0, 1, 3, 4] = float("nan")
    x[1, :, 0, 0] = float("nan")
    views = [[], [brightness(), saturation()], [hue()], [posterize(), solarize(), invert()],
             [contrast()], [hflip(nearest=True)], [rotate()], [rotate(nearest=True, fill=True)],
             [blur(kmax=3)], [sharpen()], [shift_noiseless()], [grayscale()]]
    spatial, ops, params, refs = build(views, B, C, H, W, seed=17, device=device)
    out = fv.fused_views(x.to(device), spatial, ops, params).cpu()
    ref = reference(x, refs)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), [
        (views[v], torch.isnan(out[v]).sum().item(), torch.isnan(ref[v]).sum().item()) for v in range(len(views))]
    assert torch.isnan(out).any(dim=(1, 2, 3, 4)).all()  # every view saw the NaN
    torch.testing.assert_close(out, ref, atol=TOL_WARP, rtol=0, equal_nan=True)


def test_noise_statistics(device):
    B, C, H, W = 4, 3, 16, 16
    K = 3
    x = torch.full((B, C, H, W), 0.5, device=device)
    spatial = torch.zeros(K, dtype=torch.int32)
    ops = torch.zeros(K, fv.MAX_OPS, dtype=torch.int32)
    ops[:, 0] = fv.OP_NOISE
    ops[2, 1] = fv.OP_NOISE  # two noise ops in one view draw independent numbers
    params = torch.zeros(K, B, fv.N_SLOTS)
    params[:, :, fv.SLOT_NOISE_MEAN] = 0.05
    params[:, :, fv.SLOT_NOISE_SIGMA] = 0.1
    params[:, :, fv.SLOT_NOISE_CLIP] = 0.0
    params = params.to(device)
    out = fv.fused_views(x, spatial, ops, params, seed=123)
    d = (out - 0.5).cpu()
    n = d[:2].numel()
    assert abs(d[:2].mean().item() - 0.05) < 5 * 0.1 / math.sqrt(n)
    assert abs(d[:2].std().item() - 0.1) < 0.005
    # two independent noise ops: mean 0.1, std 0.1 * sqrt(2)
    assert abs(d[2].mean().item() - 0.1) < 5 * 0.14 / math.sqrt(d[2].numel())
    assert abs(d[2].std().item() - 0.1 * math.sqrt(2)) < 0.008
    # views, images and channels get different noise (uncorrelated)
    flat = d[:2].reshape(2, B, C, H * W)
    pairs = [(flat[0, 0, 0], flat[1, 0, 0]), (flat[0, 0, 0], flat[0, 1, 0]), (flat[0, 0, 0], flat[0, 0, 1]),
             (flat[0, 0, 0], flat[0, 0, 0].roll(1))]
    for a, b in pairs:
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.25
    # reproducible with the same seed, different with another
    assert torch.equal(out, fv.fused_views(x, spatial, ops, params, seed=123))
    assert not torch.equal(out, fv.fused_views(x, spatial, ops, params, seed=124))
    # clip keeps [0, 1]
    params[:, :, fv.SLOT_NOISE_SIGMA] = 1.0
    params[:, :, fv.SLOT_NOISE_CLIP] = 1.0
    clipped = fv.fused_views(x, spatial, ops, params, seed=5)
    assert clipped.min().item() == 0.0 and clipped.max().item() == 1.0


def test_empty_batch(device):
    views = [[], [rotate()], [contrast()]]
    spatial, ops, params, _ = build(views, 0, 3, 8, 8, device=device)
    x = torch.empty(0, 3, 8, 8, device=device)
    out = fv.fused_views(x, spatial, ops, params, out_dtype=torch.float16)
    assert out.shape == (3, 0, 3, 8, 8) and out.dtype == torch.float16
    spatial, ops, params, _ = build([], 2, 3, 8, 8, device=device)  # no views at all
    out = fv.fused_views(torch.rand(2, 3, 8, 8, device=device), spatial, ops, params)
    assert out.shape == (0, 2, 3, 8, 8)


def test_batch_chunking_matches(device, monkeypatch):
    """Batches beyond the grid's axis-1 limit are launched in chunks; results must not change."""
    views = [[rotate(), contrast()], [shift_noiseless()], [brightness()]]
    B, C, H, W = 3, 3, 5, 6
    x = rand_images(B, C, H, W, 19).to(device)
    spatial, ops, params, refs = build(views, B, C, H, W, seed=19, device=device)
    ops[2, 1] = fv.OP_NOISE  # a real noise op: keyed by the global image index
    params[2, :, fv.SLOT_NOISE_SIGMA] = 0.1
    whole = fv.fused_views(x, spatial, ops, params, seed=3)
    monkeypatch.setattr(fv, "MAX_GRID_Y", 1)
    chunked = fv.fused_views(x, spatial, ops, params, seed=3)
    assert torch.equal(whole, chunked)


def test_degenerate_shapes(device):
    """1-pixel-wide/high images: valid views match torchvision, the rest must merely not crash."""
    for shape in [(2, 3, 1, 5), (1, 1, 4, 1), (1, 3, 1, 1)]:
        B, C, H, W = shape
        views = [[rotate()], [affine(nearest=True, fill=True)], [sharpen()], [contrast(), hue()], [erase()],
                 [hflip(), posterize()]]
        out, ref = run_and_ref(views, shape, device, seed=20)
        assert max_err(out, ref) <= TOL_WARP, shape
        # blur wider than the image: torchvision raises (reflect pad >= size); the kernel clamps
        x = rand_images(B, C, H, W, 21).to(device)
        spatial, ops, params, _ = build([[blur()]], B, C, H, W, seed=21, device=device)
        params[0, :, fv.SLOT_BLUR_KX] = 5.0
        params[0, :, fv.SLOT_BLUR_KY] = 99.0  # beyond MAX_BLUR_KSIZE: clamped, never out of bounds
        out = fv.fused_views(x, spatial, ops, params)
        assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1 + 1e-6).all()


def test_bad_inputs_raise(device):
    B, C, H, W = 2, 3, 6, 6
    x = rand_images(B, C, H, W, 18).to(device)
    spatial, ops, params, _ = build([[], [contrast()]], B, C, H, W, device=device)

    def call(**kw):
        args = dict(x=x, spatial=spatial, ops=ops, params=params)
        args.update(kw)
        return fv.fused_views(args.pop("x"), args.pop("spatial"), args.pop("ops"), args.pop("params"), **args)

    two_contrast = ops.clone()
    two_contrast[1, 1] = fv.OP_CONTRAST
    gap = ops.clone()
    gap[1, 2] = fv.OP_INVERT
    bad_op = ops.clone()
    bad_op[0, 0] = 99
    cases = [
        (dict(x=x[0]), "x"),
        (dict(x=torch.zeros(B, 2, H, W, device=device)), "x"),
        (dict(x=x.double()), "x"),
        (dict(x=x.to(torch.int32)), "x"),
        (dict(spatial=spatial.long()), "spatial"),
        (dict(spatial=torch.tensor([0, 7], dtype=torch.int32)), "spatial"),
        (dict(ops=ops[:, :4]), "ops"),
        (dict(ops=bad_op), "ops"),
        (dict(ops=two_contrast), "OP_CONTRAST"),
        (dict(ops=gap), "OP_END"),
        (dict(params=params[:, :1]), "params"),
        (dict(params=params.double()), "params"),
        (dict(params=params[:1]), "params"),
        (dict(out_dtype=torch.int8), "out_dtype"),
        (dict(out=torch.empty(2, B, C, H, W + 1, device=device)), "out"),
        (dict(out=torch.empty(2, B, C, H, W, device=device), out_dtype=torch.float16), "out"),
        (dict(mean=[0.5, 0.5]), "mean"),
        (dict(std=[0.5, 0.0, 0.5]), "std"),
        (dict(block_size=24), "block_size"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            call(**kw)
    with pytest.raises(TypeError, match="seed"):
        call(seed=1.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf etc. in the interpreter
def test_garbage_params_do_not_crash(device):
    """NaN, inf, huge and negative parameters in every slot: the kernel must stay in bounds."""
    B, C, H, W = 2, 3, 5, 6
    K = 8
    x = rand_images(B, C, H, W, 22).to(device)
    spatial = torch.tensor([0, 1, 1, 2, 3, 1, 2, 0], dtype=torch.int32)
    ops = torch.zeros(K, fv.MAX_OPS, dtype=torch.int32)
    for v in range(K):
        codes = [c for c in range(1, fv.N_OPS) if c != fv.OP_CONTRAST]
        row = [codes[(v + j) % len(codes)] for j in range(fv.MAX_OPS - 1)] + [fv.OP_CONTRAST]
        ops[v] = torch.tensor(row[v % 2:] + row[:v % 2], dtype=torch.int32)
    gen = torch.Generator().manual_seed(22)
    choices = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -3.0, 0.0, 0.5, 2.0, 17.0])
    params = choices[torch.randint(0, len(choices), (K, B, fv.N_SLOTS), generator=gen)]
    params[2, :, fv.SLOT_NEAREST] = 1.0
    out = fv.fused_views(x, spatial, ops, params.to(device), block_size=16)
    assert out.shape == (K, B, C, H, W)


# ------------------------------------------------------------------------------------------------
# The noise stream, exactly as documented in kernels/fused_views.py ("Noise")
# ------------------------------------------------------------------------------------------------
def philox4x32_10(counter: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Random123's Philox4x32-10 on counters (n mod 2^32, n >> 32, 0, 0) and key (seed mod 2^32,
    seed >> 32), in uint64 numpy arithmetic (32 x 32-bit products are exact there)."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = counter & mask, counter >> np.uint64(32)
    c2 = c3 = np.zeros_like(counter)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def reference_normals(counter: np.ndarray, seed: int) -> np.ndarray:
    """(3, N) float64 normals n0, n1, n2 of the documented Box-Muller on the float32 uniforms."""
    u = []
    for x in philox4x32_10(counter, seed):
        i = x.astype(np.uint32).view(np.int32)
        u.append(np.where(i < 0, ~i, i).astype(np.float32) * np.float32(4.6566127342e-10))
    r01 = np.sqrt(-2 * np.log(np.maximum(u[0].astype(np.float64), 1e-7)))
    r23 = np.sqrt(-2 * np.log(np.maximum(u[2].astype(np.float64), 1e-7)))
    turn1, turn3 = 2 * np.pi * u[1].astype(np.float64), 2 * np.pi * u[3].astype(np.float64)
    return np.stack([r01 * np.cos(turn1), r01 * np.sin(turn1), r23 * np.cos(turn3)])


@pytest.mark.parametrize("C", [3, 1])
def test_noise_matches_the_documented_stream(C, device):
    """Counter ((v * B + b) * MAX_OPS + j) * H * W + p, key = seed mod 2^63, channel c <- n_c: the
    kernel's noise equals a float64 evaluation of the same recipe up to float32 rounding."""
    K, B, H, W = 2, 3, 5, 7
    seed = (1 << 40) + 12345 + (1 << 63)  # the key uses both words; taken modulo 2^63
    spatial = torch.zeros(K, dtype=torch.int32)
    ops = torch.zeros(K, fv.MAX_OPS, dtype=torch.int32)
    ops[0, 0] = fv.OP_NOISE
    ops[1, :2] = torch.tensor([fv.OP_INVERT, fv.OP_NOISE])  # noise in slot j = 1
    params = torch.zeros(K, B, fv.N_SLOTS)
    params[:, :, fv.SLOT_NOISE_SIGMA] = 1.0
    x = torch.full((B, C, H, W), 0.5)
    out = fv.fused_views(x.to(device), spatial, ops, params.to(device), seed=seed).cpu().double()
    v, b, j, p = np.meshgrid(np.arange(K), np.arange(B), np.zeros(1), np.arange(H * W), indexing="ij")
    j = j + (v == 1)
    counter = (((v * B + b) * fv.MAX_OPS + j) * H * W + p).astype(np.uint64).reshape(K, B, H * W)
    ref = reference_normals(counter.reshape(-1), seed % (1 << 63)).reshape(3, K, B, H * W)
    ref = torch.from_numpy(ref[:C]).permute(1, 2, 0, 3).reshape(K, B, C, H, W)
    torch.testing.assert_close(out - 0.5, ref, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# check_program and the launch plan: host-only checks, cached, no device work besides allocations
# ------------------------------------------------------------------------------------------------
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _program_args(device, with_contrast=True, B=2, C=3, H=6, W=5):
    views = [[rotate()], [contrast()] if with_contrast else [brightness()]]
    spatial, ops, params, _ = build(views, B, C, H, W, seed=30, device=device)
    return rand_images(B, C, H, W, 30).to(device), spatial, ops, params


def test_check_program_caches_its_verdict_per_content(device):
    x, spatial, ops, params = _program_args(device)
    prog = fv.check_program(x, spatial, ops, params, seed=-1, mean=[0.1, 0.2, 0.3], devices=(device.type,))
    assert (prog.B, prog.C, prog.H, prog.W, prog.K) == (2, 3, 6, 5, 2)
    assert prog.has_contrast and prog.normalize and prog.out is None
    assert prog.mean == (0.1, 0.2, 0.3) and prog.std == (1.0, 1.0, 1.0) and prog.seed == (1 << 63) - 1
    assert prog.codes == (tuple(spatial.tolist()), tuple(ops.reshape(-1).tolist()))
    spatial_copy, ops_copy = spatial.clone(), ops.clone()
    with CountOps() as counter:  # seen content (in other tensors): no torch op at all
        again = fv.check_program(x, spatial_copy, ops_copy, params, seed=-1, mean=[0.1, 0.2, 0.3],
                                 devices=(device.type,))
    assert counter.ops == [] and again.has_contrast
    # the cache is keyed by content, not by tensor: an in-place edit is validated again
    spatial[0] = 9
    with pytest.raises(ValueError, match=r"spatial\[0\] = 9"):
        fv.check_program(x, spatial, ops, params, devices=(device.type,))


def test_plan_allocates_and_launches_only(device):
    for with_contrast, out, expected in [(True, None, 2), (False, None, 1), (False, "given", 0)]:
        x, spatial, ops, params = _program_args(device, with_contrast)
        given = torch.empty(2, 2, 3, 6, 5, device=device) if out else None
        prog = fv.check_program(x, spatial, ops, params, out=given, devices=(device.type,))
        fv._plan(x, params, prog, 64, 2)  # the device tables are copied once, here
        with CountOps() as counter:
            res, launches = fv._plan(x, params, prog, 64, 2)
        assert counter.ops == ["aten.empty.memory_format"] * expected, counter.ops
        assert [launch.kernel for launch in launches] == (
            [fv._contrast_prepass_kernel] * with_contrast + [fv._fused_views_kernel])
        assert given is None or res is given


def test_tables_must_live_on_the_host(device):
    """Device tables would need a synchronising read: they are refused (meta stands in for a GPU)."""
    x, spatial, ops, params = _program_args(device)
    for kw, name in [(dict(spatial=spatial.to("meta")), "spatial"), (dict(ops=ops.to("meta")), "ops")]:
        args = dict(dict(spatial=spatial, ops=ops), **kw)
        with pytest.raises(ValueError, match=f"{name} must be a CPU tensor"):
            fv.fused_views(x, args["spatial"], args["ops"], params)
    with pytest.raises(ValueError, match="mean must be floats or a CPU tensor"):
        fv.fused_views(x, spatial, ops, params, mean=torch.zeros(3, device="meta"))
    out = fv.fused_views(x, spatial, ops, params, mean=torch.tensor([0.5, 0.5, 0.5]), std=(0.2, 0.2, 0.2))
    assert torch.isfinite(out).all()


def test_check_program_device_kinds():
    """The same checks serve the C++ CPU launcher (devices=("cpu",)) and the Triton one."""
    x, spatial, ops, params = _program_args(torch.device("cpu"))
    assert fv.check_program(x, spatial, ops, params, devices=("cpu",)).K == 2
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor \(CPU tensors run only under TRITON_INTERPRET=1\)"):
        fv.check_program(x, spatial, ops, params)
    with pytest.raises(ValueError, match="x must be a CPU tensor, got device meta"):
        fv.check_program(x.to("meta"), spatial, ops, params.to("meta"), devices=("cpu",))
    with pytest.raises(TypeError, match="spatial must be a 1-D"):
        fv.check_program(x, [0, 1], ops, params, devices=("cpu",))
    with pytest.raises(TypeError, match="ops must be a torch.Tensor"):
        fv.check_program(x, spatial, ops.tolist(), params, devices=("cpu",))
