"""Tests of `mtdl_fast.functional` against torchvision.transforms.v2.functional.

Every op of `mtdl_fast.functional` (MF) is a batched twin of the torchvision op of the same name
(TF). A numeric parameter is either a Python number (one value for the batch: the result must be
torchvision's batch call) or a tensor with one value per image (the result must be torchvision
applied image by image, each with its own value as a Python number).

Tolerances: float32 max abs error 1e-5 (hue 1e-4); uint8 at most 1 level. NEAREST warps may differ
at rounding ties on fewer than 0.5% of the elements. Noise is compared by its statistics.

Test images are real photographs (sklearn's sample images, cropped and reduced to small odd shapes),
handwritten digits for 1-channel input (sklearn's digits, scaled to 0..255), random images from a
seeded generator and images with grey and saturated pixels (the edge cases of hue and the clamps).
"""
from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from mtdl_fast import functional as MF
from mtdl_fast.functional import geometry

NEAREST = InterpolationMode.NEAREST
BILINEAR = InterpolationMode.BILINEAR

FLOAT_ATOL = 1e-5
HUE_ATOL = 1e-4
UINT8_ATOL = 1
NEAREST_TIE_FRACTION = 0.005

DTYPES = [torch.float32, torch.uint8]
DTYPE_IDS = ["f32", "u8"]
# (height, width, memory layout): odd, non-square shapes, both layouts.
GEOMETRIES = [(24, 29, "contiguous"), (17, 16, "channels_last")]
GEOMETRY_IDS = ["24x29-contig", "17x16-chlast"]


# --------------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------------
@functools.cache
def _photos() -> tuple[torch.Tensor, ...]:
    """sklearn's two sample photographs as (3, 427, 640) float32 tensors in 0..255."""
    from sklearn.datasets import load_sample_images

    return tuple(torch.from_numpy(a.copy()).permute(2, 0, 1).float().contiguous() for a in load_sample_images().images)


@functools.cache
def _digits() -> torch.Tensor:
    """sklearn's handwritten digits as (N, 1, 8, 8) float32 in 0..255."""
    from sklearn.datasets import load_digits

    d = torch.from_numpy(load_digits().images).float() * (255.0 / 16.0)
    return d.unsqueeze(1)


def _photo_crop(src: torch.Tensor, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A random crop of a photograph reduced (antialiased) to (3, h, w), uint8."""
    _, sh, sw = src.shape
    max_scale = min(sh // h, sw // w, 12)
    scale = int(torch.randint(3, max_scale + 1, (1,), generator=g))
    ch, cw = scale * h, scale * w
    top = int(torch.randint(0, sh - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, sw - cw + 1, (1,), generator=g))
    crop = src[:, top : top + ch, left : left + cw].unsqueeze(0)
    small = F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return small[0].round().clamp(0, 255).to(torch.uint8)


def _digit(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A random handwritten digit scaled up (bilinear) to (1, h, w), uint8."""
    digits = _digits()
    k = int(torch.randint(0, digits.shape[0], (1,), generator=g))
    big = F.interpolate(digits[k : k + 1], size=(h, w), mode="bilinear", align_corners=False)
    return big[0].round().clamp(0, 255).to(torch.uint8)


def _mixed(c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A random image in which some pixels are grey (r == g == b) and some channels saturate."""
    img = torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)
    u = torch.rand(h, w, generator=g)
    grey = u < 0.3
    img[:, grey] = img[0, grey].unsqueeze(0).expand(c, -1)
    sat = torch.rand(c, h, w, generator=g)
    img[sat < 0.08] = 0
    img[sat > 0.92] = 255
    return img


def make_batch(
    c: int,
    h: int,
    w: int,
    dtype: torch.dtype,
    layout: str = "contiguous",
    b: int = 6,
    seed: int = 0,
) -> torch.Tensor:
    """A (b, c, h, w) batch of real-looking images: photographs (or digits for c == 1), a random image
    and an image with grey and saturated pixels; float images get sub-level jitter so that they are
    not quantised to 1/255."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for k in range(b):
        kind = k % 6
        if kind == 3:
            images.append(torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8))
        elif kind == 4:
            images.append(_mixed(c, h, w, g))
        elif c == 3:
            images.append(_photo_crop(_photos()[k % 2], h, w, g))
        else:
            images.append(_digit(h, w, g))
    x = torch.stack(images)
    if dtype.is_floating_point:
        jitter = torch.rand(x.shape, generator=g) - 0.5
        x = ((x.float() + jitter).clamp(0, 255) / 255.0).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        assert layout == "contiguous"
    return x


def _uniform(g: torch.Generator, b: int, lo: float, hi: float, specials=(), shape=()) -> torch.Tensor:
    """(b, *shape) float32 values in [lo, hi); the first len(specials) rows (from index 2 on)
    replaced by the given boundary values."""
    t = lo + (hi - lo) * torch.rand((b,) + tuple(shape), generator=g)
    for k, s in enumerate(specials):
        t[(2 + k) % b] = s
    return t.float()


def _ints(g: torch.Generator, b: int, lo: int, hi: int, specials=()) -> torch.Tensor:
    """(b,) int64 values in [lo, hi] with boundary values from index 2 on."""
    t = torch.randint(lo, hi + 1, (b,), generator=g)
    for k, s in enumerate(specials):
        t[(2 + k) % b] = s
    return t


# --------------------------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------------------------
def _py(t: torch.Tensor):
    """One image's parameter as Python number(s): a float32 value converts exactly."""
    return t.tolist()


def reference_per_image(fn, x: torch.Tensor, per_image: dict, **shared) -> torch.Tensor:
    """torchvision `fn` applied image by image, parameter k of image b being per_image[k][b]."""
    xs = x.contiguous()
    outs = []
    for b in range(x.shape[0]):
        kwargs = dict(shared)
        for name, value in per_image.items():
            kwargs[name] = value(b) if callable(value) else _py(value[b])
        outs.append(fn(xs[b : b + 1], **kwargs))
    return torch.cat(outs)


def assert_images_close(out, ref, *, atol=None, max_mismatch_fraction: float = 0.0) -> None:
    """out matches ref: same shape and dtype, same NaNs, |out - ref| <= atol (default 1e-5 for float,
    1 level for uint8) except on fewer than `max_mismatch_fraction` of the elements (0: none)."""
    assert isinstance(out, torch.Tensor), f"expected a tensor, got {type(out)}"
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != reference {ref.dtype}"
    if atol is None:
        atol = UINT8_ATOL if ref.dtype == torch.uint8 else FLOAT_ATOL
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    assert torch.equal(nan_o, nan_r), (
        f"NaN positions differ: {int((nan_o & ~nan_r).sum())} extra, {int((nan_r & ~nan_o).sum())} missing"
    )
    diff = (o - r).abs().masked_fill(nan_r, 0.0)
    bad = diff > atol
    n_bad = int(bad.sum())
    frac = n_bad / max(diff.numel(), 1)
    if n_bad == 0:
        return
    idx = tuple(int(i) for i in (bad.nonzero()[0]))
    per_image = diff.flatten(1).amax(1).tolist() if diff.ndim > 1 else []
    detail = (
        f"{n_bad}/{diff.numel()} elements ({100 * frac:.3f}%) differ by more than {atol}; "
        f"max diff {diff.max().item():.6g}; first at {idx}: got {o[idx].item():.6g}, "
        f"expected {r[idx].item():.6g}; per-image max diff {[round(v, 6) for v in per_image]}"
    )
    assert frac < max_mismatch_fraction, detail


# --------------------------------------------------------------------------------------------
# Flips, invert, grayscale (no numeric parameter)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("op", ["horizontal_flip", "vertical_flip", "invert"])
def test_parameterless_ops_match_torchvision(op, h, w, layout, c, dtype):
    x = make_batch(c, h, w, dtype, layout)
    ref = getattr(TF, op)(x.contiguous())
    out = getattr(MF, op)(x)
    assert_images_close(out, ref, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("num_output_channels", [1, 3])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
def test_rgb_to_grayscale_matches_torchvision(h, w, layout, num_output_channels, c, dtype):
    x = make_batch(c, h, w, dtype, layout)
    ref = TF.rgb_to_grayscale(x.contiguous(), num_output_channels=num_output_channels)
    out = MF.rgb_to_grayscale(x, num_output_channels=num_output_channels)
    assert_images_close(out, ref)


def test_rgb_to_grayscale_default_is_one_channel():
    x = make_batch(3, 17, 16, torch.float32)
    out = MF.rgb_to_grayscale(x)
    assert out.shape == (6, 1, 17, 16)
    assert_images_close(out, TF.rgb_to_grayscale(x))


# --------------------------------------------------------------------------------------------
# Pointwise colour ops with one numeric parameter
# --------------------------------------------------------------------------------------------
def _draw_brightness(g, b, dtype):
    return _uniform(g, b, 0.0, 2.0, specials=(0.0, 1.0))


def _draw_contrast(g, b, dtype):
    return _uniform(g, b, 0.0, 2.0, specials=(0.0, 1.0))


def _draw_saturation(g, b, dtype):
    return _uniform(g, b, 0.0, 2.0, specials=(0.0, 1.0))


def _draw_hue(g, b, dtype):
    return _uniform(g, b, -0.5, 0.5, specials=(-0.5, 0.5, 0.0))


def _draw_sharpness(g, b, dtype):
    return _uniform(g, b, 0.0, 3.0, specials=(0.0, 1.0))


def _draw_threshold(g, b, dtype):
    if dtype == torch.uint8:
        return _ints(g, b, 0, 255, specials=(0, 255)).float()
    return _uniform(g, b, 0.0, 1.0, specials=(0.0, 1.0))


def _draw_bits(g, b, dtype):
    return _ints(g, b, 0, 8, specials=(0, 8))


# op -> (argument name, per-image draw, scalar value for float, scalar value for uint8, float atol)
POINTWISE = {
    "adjust_brightness": ("brightness_factor", _draw_brightness, 1.37, 1.37, FLOAT_ATOL),
    "adjust_contrast": ("contrast_factor", _draw_contrast, 0.6, 0.6, FLOAT_ATOL),
    "adjust_saturation": ("saturation_factor", _draw_saturation, 1.7, 1.7, FLOAT_ATOL),
    "adjust_hue": ("hue_factor", _draw_hue, 0.23, -0.31, HUE_ATOL),
    "adjust_sharpness": ("sharpness_factor", _draw_sharpness, 2.2, 0.4, FLOAT_ATOL),
    "solarize": ("threshold", _draw_threshold, 0.55, 140, FLOAT_ATOL),
    "posterize": ("bits", _draw_bits, 3, 5, FLOAT_ATOL),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("op", list(POINTWISE))
def test_pointwise_per_image_matches_torchvision_loop(op, h, w, layout, c, dtype):
    arg, draw, _, _, float_atol = POINTWISE[op]
    x = make_batch(c, h, w, dtype, layout, seed=h)
    g = torch.Generator().manual_seed(1000 + h * c)
    param = draw(g, x.shape[0], dtype)
    ref = reference_per_image(getattr(TF, op), x, {arg: param})
    x_before = x.clone()
    out = getattr(MF, op)(x, **{arg: param})
    assert_images_close(out, ref, atol=None if dtype == torch.uint8 else float_atol)
    assert torch.equal(x, x_before), "the input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("op", list(POINTWISE))
def test_pointwise_scalar_matches_torchvision_batch(op, c, dtype):
    arg, _, scalar_f, scalar_u8, float_atol = POINTWISE[op]
    value = scalar_u8 if dtype == torch.uint8 else scalar_f
    x = make_batch(c, 24, 29, dtype, seed=3)
    ref = getattr(TF, op)(x, **{arg: value})
    out = getattr(MF, op)(x, **{arg: value})
    assert_images_close(out, ref, atol=None if dtype == torch.uint8 else float_atol)


@pytest.mark.parametrize("op", list(POINTWISE))
def test_pointwise_positional_argument(op):
    """The parameter can be passed positionally, as in torchvision."""
    arg, draw, scalar_f, _, float_atol = POINTWISE[op]
    x = make_batch(3, 17, 16, torch.float32, seed=5)
    param = draw(torch.Generator().manual_seed(5), x.shape[0], torch.float32)
    ref = reference_per_image(getattr(TF, op), x, {arg: param})
    assert_images_close(getattr(MF, op)(x, param), ref, atol=float_atol)
    assert_images_close(getattr(MF, op)(x, scalar_f), getattr(TF, op)(x, scalar_f), atol=float_atol)


def test_posterize_float_bits_tensor_of_integral_values():
    """bits given as an integral-valued tensor of another dtype (int32) works like int64."""
    x = make_batch(3, 24, 29, torch.uint8, seed=9)
    bits = torch.tensor([0, 1, 4, 7, 8, 2], dtype=torch.int32)
    ref = reference_per_image(TF.posterize, x, {"bits": bits})
    assert_images_close(MF.posterize(x, bits), ref, atol=0)


# --------------------------------------------------------------------------------------------
# rotate
# --------------------------------------------------------------------------------------------
def _fill_value(kind: str, dtype: torch.dtype, c: int):
    if kind == "none":
        return None
    if kind == "scalar":
        return 180 if dtype == torch.uint8 else 0.7
    assert kind == "list"
    if dtype == torch.uint8:
        return [10, 128, 250][:c]
    return [0.1, 0.5, 0.98][:c]


def _warp_tolerance(interpolation) -> float:
    return NEAREST_TIE_FRACTION if interpolation == NEAREST else 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("fill", ["none", "scalar"])
@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
def test_rotate_per_image_matches_torchvision_loop(h, w, layout, interpolation, fill, c, dtype):
    x = make_batch(c, h, w, dtype, layout, b=6, seed=11)
    g = torch.Generator().manual_seed(12 + h)
    angle = _uniform(g, x.shape[0], -180.0, 180.0)
    fill_v = _fill_value(fill, dtype, c)
    ref = reference_per_image(TF.rotate, x, {"angle": angle}, interpolation=interpolation, fill=fill_v)
    out = MF.rotate(x, angle, interpolation=interpolation, fill=fill_v)
    assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
def test_rotate_default_interpolation_is_nearest(interpolation, dtype):
    x = make_batch(3, 24, 29, dtype, seed=13)
    angle = _uniform(torch.Generator().manual_seed(13), x.shape[0], -180.0, 180.0)
    ref = reference_per_image(TF.rotate, x, {"angle": angle})
    assert_images_close(MF.rotate(x, angle), ref, max_mismatch_fraction=NEAREST_TIE_FRACTION)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize(
    "h,w,angles",
    [
        (17, 17, [0.0, 90.0, 180.0, 270.0, -90.0, 360.0, -180.0, 45.0]),
        (24, 29, [0.0, 180.0, -180.0, 360.0, 540.0, -360.0, 30.0, 0.0]),
    ],
    ids=["square", "non-square"],
)
def test_rotate_special_angles(h, w, angles, interpolation, dtype):
    """Multiples of 90 degrees (torchvision's rot90 fast path) and angles outside (-180, 180]."""
    x = make_batch(3, h, w, dtype, b=len(angles), seed=14)
    angle = torch.tensor(angles)
    ref = reference_per_image(TF.rotate, x, {"angle": angle}, interpolation=interpolation)
    out = MF.rotate(x, angle, interpolation=interpolation)
    assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotate_scalar_matches_torchvision_batch(dtype, interpolation):
    x = make_batch(3, 24, 29, dtype, seed=15)
    for angle in (33.3, -121.0):
        ref = TF.rotate(x, angle, interpolation=interpolation, fill=None)
        out = MF.rotate(x, angle, interpolation=interpolation)
        assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotate_center(dtype, interpolation):
    x = make_batch(3, 24, 29, dtype, seed=16)
    angle = _uniform(torch.Generator().manual_seed(16), x.shape[0], -180.0, 180.0)
    center = [4.0, 15.5]
    ref = reference_per_image(TF.rotate, x, {"angle": angle}, interpolation=interpolation, center=center)
    out = MF.rotate(x, angle, interpolation=interpolation, center=center)
    assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("op", ["rotate", "affine"])
def test_warp_per_channel_fill_list_matches_torchvision(op):
    """torchvision accepts one fill value per channel (a list of length C)."""
    for dtype in DTYPES:
        x = make_batch(3, 24, 29, dtype, seed=17)
        g = torch.Generator().manual_seed(17)
        angle = _uniform(g, x.shape[0], -180.0, 180.0)
        fill = _fill_value("list", dtype, 3)
        for interpolation in (NEAREST, BILINEAR):
            if op == "rotate":
                ref = reference_per_image(TF.rotate, x, {"angle": angle}, interpolation=interpolation, fill=fill)
                out = MF.rotate(x, angle, interpolation=interpolation, fill=fill)
            else:
                kw = dict(translate=[1.0, -2.0], scale=0.9, shear=[5.0, 0.0], interpolation=interpolation, fill=fill)
                ref = reference_per_image(TF.affine, x, {"angle": angle}, **kw)
                out = MF.affine(x, angle, **kw)
            assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


def test_rotate_expand_with_per_image_angles_raises():
    x = make_batch(3, 17, 16, torch.float32, b=3)
    with pytest.raises(ValueError, match="expand"):
        MF.rotate(x, torch.tensor([10.0, 20.0, 30.0]), expand=True)


def test_rotate_expand_with_scalar_angle_matches_torchvision_or_raises():
    x = make_batch(3, 17, 16, torch.float32, b=3)
    try:
        out = MF.rotate(x, 30.0, expand=True)
    except ValueError as err:
        assert "expand" in str(err)
        return
    assert_images_close(out, TF.rotate(x, 30.0, expand=True), max_mismatch_fraction=NEAREST_TIE_FRACTION)


# --------------------------------------------------------------------------------------------
# affine
# --------------------------------------------------------------------------------------------
def _affine_params(g: torch.Generator, b: int, shear_form: str):
    angle = _uniform(g, b, -180.0, 180.0)
    translate = _uniform(g, b, -4.0, 4.0, shape=(2,))
    scale = _uniform(g, b, 0.6, 1.5)
    if shear_form == "xy":
        shear = _uniform(g, b, -30.0, 30.0, shape=(2,))
    else:
        shear = _uniform(g, b, -30.0, 30.0)
    return angle, translate, scale, shear


def _affine_reference(x, angle, translate, scale, shear, **kwargs):
    def shear_of(b):
        s = _py(shear[b])
        return s if isinstance(s, list) else [s, 0.0]

    per = {"angle": angle, "translate": translate, "scale": scale, "shear": shear_of}
    return reference_per_image(TF.affine, x, per, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("shear_form", ["xy", "x"])
@pytest.mark.parametrize("fill", ["none", "scalar"])
@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
def test_affine_per_image_matches_torchvision_loop(h, w, layout, interpolation, fill, shear_form, c, dtype):
    x = make_batch(c, h, w, dtype, layout, seed=21)
    g = torch.Generator().manual_seed(22 + h + c)
    angle, translate, scale, shear = _affine_params(g, x.shape[0], shear_form)
    fill_v = _fill_value(fill, dtype, c)
    ref = _affine_reference(x, angle, translate, scale, shear, interpolation=interpolation, fill=fill_v)
    out = MF.affine(x, angle, translate, scale, shear, interpolation=interpolation, fill=fill_v)
    assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_affine_mixed_scalar_and_per_image_parameters(dtype, interpolation):
    """Per-image angle and shear with a shared translate list, scale number and fill number."""
    x = make_batch(3, 24, 29, dtype, seed=23)
    g = torch.Generator().manual_seed(23)
    angle = _uniform(g, x.shape[0], -180.0, 180.0)
    shear = _uniform(g, x.shape[0], -20.0, 20.0, shape=(2,))
    fill = _fill_value("scalar", dtype, 3)
    ref = reference_per_image(
        TF.affine, x, {"angle": angle, "shear": shear},
        translate=[2.5, -1.0], scale=1.2, interpolation=interpolation, fill=fill,
    )
    out = MF.affine(x, angle=angle, translate=[2.5, -1.0], scale=1.2, shear=shear,
                    interpolation=interpolation, fill=fill)
    assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_affine_center(dtype, interpolation):
    x = make_batch(3, 17, 16, dtype, seed=24)
    g = torch.Generator().manual_seed(24)
    angle, translate, scale, shear = _affine_params(g, x.shape[0], "xy")
    center = [3.0, 11.5]
    ref = _affine_reference(x, angle, translate, scale, shear, interpolation=interpolation, center=center)
    out = MF.affine(x, angle, translate, scale, shear, interpolation=interpolation, center=center)
    assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_affine_scalar_matches_torchvision_batch(dtype, interpolation):
    x = make_batch(3, 24, 29, dtype, seed=25)
    for args in [(30.0, [2.0, -1.0], 1.2, [10.0, 5.0]), (-95.5, [0.0, 3.5], 0.8, 12.0)]:
        ref = TF.affine(x, *args, interpolation=interpolation)
        out = MF.affine(x, *args, interpolation=interpolation)
        assert_images_close(out, ref, max_mismatch_fraction=_warp_tolerance(interpolation))


# --------------------------------------------------------------------------------------------
# resized_crop
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["batched", "per-image"])
def resize_path(request, monkeypatch):
    """Both CPU paths of resized_crop: the batched resampling, and torch's resize image by image
    (what the CPU uses for small batches and large images)."""
    monkeypatch.setattr(geometry, "_batched", lambda image: request.param == "batched")
    return request.param


def _boxes(g: torch.Generator, b: int, h: int, w: int, max_h: int, max_w: int, min_size: int = 2):
    """Per-image (top, left, height, width) int64 boxes inside an (h, w) image, no larger than
    (max_h, max_w); image 0 gets the largest allowed box."""
    height = torch.randint(min_size, min(h, max_h) + 1, (b,), generator=g)
    width = torch.randint(min_size, min(w, max_w) + 1, (b,), generator=g)
    height[0], width[0] = min(h, max_h), min(w, max_w)
    top = (torch.rand(b, generator=g) * (h - height + 1)).floor().long()
    left = (torch.rand(b, generator=g) * (w - width + 1)).floor().long()
    return top, left, height, width


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(
    "h,w,layout,size",
    [(24, 29, "contiguous", [31, 37]), (17, 16, "channels_last", [17, 23]), (24, 29, "contiguous", [20, 22])],
    ids=["24x29-to-31x37", "17x16-to-17x23-chlast", "24x29-to-20x22"],
)
def test_resized_crop_per_image_upsampling_matches_torchvision_loop(
    h, w, layout, size, antialias, c, dtype, resize_path
):
    x = make_batch(c, h, w, dtype, layout, seed=31)
    g = torch.Generator().manual_seed(32 + size[0])
    top, left, height, width = _boxes(g, x.shape[0], h, w, size[0], size[1])
    per = {"top": top, "left": left, "height": height, "width": width}
    ref = reference_per_image(TF.resized_crop, x, per, size=size, antialias=antialias)
    out = MF.resized_crop(x, top, left, height, width, size, antialias=antialias)
    assert_images_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_resized_crop_downsampling_without_antialias_matches_torchvision_loop(dtype, resize_path):
    x = make_batch(3, 24, 29, dtype, seed=33)
    g = torch.Generator().manual_seed(33)
    size = [9, 11]
    top, left, height, width = _boxes(g, x.shape[0], 24, 29, 24, 29, min_size=12)
    per = {"top": top, "left": left, "height": height, "width": width}
    ref = reference_per_image(TF.resized_crop, x, per, size=size, antialias=False)
    out = MF.resized_crop(x, top, left, height, width, size, antialias=False)
    assert_images_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_resized_crop_nearest_matches_torchvision_loop(dtype, resize_path):
    """NEAREST (accepted, as in torchvision), for upsampling and downsampling crops."""
    x = make_batch(3, 24, 29, dtype, seed=36)
    g = torch.Generator().manual_seed(36)
    for size, min_size in (([31, 37], 2), ([9, 11], 12)):
        top, left, height, width = _boxes(g, x.shape[0], 24, 29, 24, 29, min_size=min_size)
        if size[0] > 24:
            top, left, height, width = _boxes(g, x.shape[0], 24, 29, size[0], size[1])
        per = {"top": top, "left": left, "height": height, "width": width}
        ref = reference_per_image(TF.resized_crop, x, per, size=size, interpolation=NEAREST)
        out = MF.resized_crop(x, top, left, height, width, size, interpolation=NEAREST)
        assert_images_close(out, ref, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_resized_crop_box_beyond_the_border_pads_zeros_like_torchvision(dtype, resize_path):
    """torchvision's crop pads a box that leaves the image with zeros before resizing."""
    x = make_batch(3, 17, 16, dtype, b=4, seed=37)
    top = torch.tensor([-3, 10, 0, -2])
    left = torch.tensor([0, 12, -4, 13])
    height = torch.tensor([8, 9, 17, 20])
    width = torch.tensor([6, 7, 10, 5])
    per = {"top": top, "left": left, "height": height, "width": width}
    ref = reference_per_image(TF.resized_crop, x, per, size=[21, 19])
    out = MF.resized_crop(x, top, left, height, width, [21, 19])
    assert_images_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_resized_crop_downsampling_with_antialias_on_cpu_matches_torchvision(dtype, resize_path):
    x = make_batch(3, 24, 29, dtype, b=3)
    top, left = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 1])
    height, width = torch.tensor([5, 20, 6]), torch.tensor([5, 6, 27])  # image 1 and 2 downsample
    out = MF.resized_crop(x, top, left, height, width, [10, 10], antialias=True)
    ref = torch.stack(
        [TF.resized_crop(x[i], int(top[i]), int(left[i]), int(height[i]), int(width[i]), [10, 10]) for i in range(3)]
    )
    assert (out.float() - ref.float()).abs().max().item() <= (1 if dtype == torch.uint8 else 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU twin: the test above")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_resized_crop_downsampling_with_antialias_on_gpu_matches_torchvision(dtype):
    x = make_batch(3, 24, 29, dtype, b=3)
    top, left = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 1])
    height, width = torch.tensor([5, 20, 6]), torch.tensor([5, 6, 27])  # image 1 and 2 downsample
    out = MF.resized_crop(x.cuda(), top.cuda(), left.cuda(), height.cuda(), width.cuda(), [10, 10]).cpu()
    ref = torch.stack(
        [TF.resized_crop(x[i], int(top[i]), int(left[i]), int(height[i]), int(width[i]), [10, 10]) for i in range(3)]
    )
    assert (out.float() - ref.float()).abs().max().item() <= (1 if dtype == torch.uint8 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_resized_crop_scalar_matches_torchvision_batch(dtype, resize_path):
    x = make_batch(3, 24, 29, dtype, seed=34)
    ref = TF.resized_crop(x, 3, 4, 10, 12, [20, 25])
    out = MF.resized_crop(x, 3, 4, 10, 12, [20, 25])
    assert_images_close(out, ref)


def test_resized_crop_default_is_bilinear_antialiased(resize_path):
    x = make_batch(3, 17, 16, torch.float32, seed=35)
    g = torch.Generator().manual_seed(35)
    top, left, height, width = _boxes(g, x.shape[0], 17, 16, 19, 21)
    per = {"top": top, "left": left, "height": height, "width": width}
    ref = reference_per_image(TF.resized_crop, x, per, size=[19, 21])
    assert_images_close(MF.resized_crop(x, top, left, height, width, [19, 21]), ref)


# --------------------------------------------------------------------------------------------
# gaussian_blur
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("sigma_form", ["per-image", "per-image-xy"])
@pytest.mark.parametrize("kernel_size", [3, 5, [5, 3]], ids=["k3", "k5", "k5x3"])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
def test_gaussian_blur_per_image_matches_torchvision_loop(h, w, layout, kernel_size, sigma_form, c, dtype):
    x = make_batch(c, h, w, dtype, layout, seed=41)
    g = torch.Generator().manual_seed(42 + h)
    if sigma_form == "per-image":
        sigma = _uniform(g, x.shape[0], 0.1, 2.5, specials=(0.1, 2.5))
    else:
        sigma = _uniform(g, x.shape[0], 0.1, 2.5, shape=(2,))
    ref = reference_per_image(TF.gaussian_blur, x, {"sigma": sigma}, kernel_size=kernel_size)
    out = MF.gaussian_blur(x, kernel_size, sigma)
    assert_images_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sigma", [None, 0.8, [1.3, 0.4]], ids=["default", "scalar", "pair"])
@pytest.mark.parametrize("kernel_size", [3, 5, [5, 3], (3, 5)], ids=["k3", "k5", "k5x3", "k3x5"])
def test_gaussian_blur_shared_sigma_matches_torchvision_batch(kernel_size, sigma, dtype):
    x = make_batch(3, 24, 29, dtype, seed=43)
    ref = TF.gaussian_blur(x, kernel_size=kernel_size, sigma=sigma)
    out = MF.gaussian_blur(x, kernel_size=kernel_size, sigma=sigma)
    assert_images_close(out, ref)


# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
def test_normalize_matches_torchvision_batch(h, w, layout, c):
    x = make_batch(c, h, w, torch.float32, layout, seed=51)
    mean = [0.485, 0.456, 0.406][:c]
    std = [0.229, 0.224, 0.225][:c]
    ref = TF.normalize(x.contiguous(), mean, std)
    x_before = x.clone()
    out = MF.normalize(x, mean, std)
    assert_images_close(out, ref)
    assert torch.equal(x, x_before), "normalize(inplace=False) modified its input"


def test_normalize_inplace():
    x = make_batch(3, 17, 16, torch.float32, seed=52)
    ref = TF.normalize(x.clone(), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    out = MF.normalize(x, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], inplace=True)
    assert_images_close(out, ref)
    assert_images_close(x, ref)


# --------------------------------------------------------------------------------------------
# erase
# --------------------------------------------------------------------------------------------
def _erase_boxes(g, b, h, w):
    """Per-image boxes inside the image, including an empty box, a one-pixel box and a box touching
    the bottom-right corner."""
    hh = torch.randint(1, h + 1, (b,), generator=g)
    ww = torch.randint(1, w + 1, (b,), generator=g)
    i = (torch.rand(b, generator=g) * (h - hh + 1)).floor().long()
    j = (torch.rand(b, generator=g) * (w - ww + 1)).floor().long()
    hh[1], ww[1] = 0, 3  # empty box
    i[2], j[2], hh[2], ww[2] = 5, 7, 1, 1  # one pixel
    i[3], j[3], hh[3], ww[3] = h - 4, w - 6, 4, 6  # bottom-right corner
    return i, j, hh, ww


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("v_form", ["number", "per-image", "per-image-one-value", "shared-tensor"])
@pytest.mark.parametrize("h,w,layout", GEOMETRIES, ids=GEOMETRY_IDS)
def test_erase_per_image_boxes_match_torchvision_loop(h, w, layout, v_form, c, dtype):
    x = make_batch(c, h, w, dtype, layout, seed=61)
    b = x.shape[0]
    g = torch.Generator().manual_seed(62 + h)
    i, j, hh, ww = _erase_boxes(g, b, h, w)
    if dtype == torch.uint8:
        values = torch.randint(0, 256, (b, c, 1, 1), generator=g).to(torch.uint8)
        number = 77
    else:
        values = torch.rand((b, c, 1, 1), generator=g)
        number = 0.3
    if v_form == "number":
        v, v_of = number, (lambda k: torch.tensor(number, dtype=dtype))
    elif v_form == "per-image":
        v, v_of = values, (lambda k: values[k])
    elif v_form == "per-image-one-value":  # (B, 1, 1, 1): one value for all channels of an image
        v, v_of = values[:, :1], (lambda k: values[k, :1])
    else:
        v, v_of = values[:1], (lambda k: values[0])
    ref = reference_per_image(TF.erase, x, {"i": i, "j": j, "h": hh, "w": ww, "v": v_of})
    x_before = x.clone()
    out = MF.erase(x, i, j, hh, ww, v)
    assert_images_close(out, ref, atol=0)
    assert torch.equal(x, x_before), "erase(inplace=False) modified its input"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_erase_inplace(dtype):
    x = make_batch(3, 24, 29, dtype, seed=63)
    g = torch.Generator().manual_seed(63)
    i, j, hh, ww = _erase_boxes(g, x.shape[0], 24, 29)
    v = 200 if dtype == torch.uint8 else 0.8
    ref = reference_per_image(TF.erase, x, {"i": i, "j": j, "h": hh, "w": ww},
                              v=torch.tensor(v, dtype=dtype))
    out = MF.erase(x, i, j, hh, ww, v, inplace=True)
    assert_images_close(out, ref, atol=0)
    assert_images_close(x, ref, atol=0)


def test_erase_scalar_box_matches_torchvision_batch():
    x = make_batch(3, 24, 29, torch.float32, seed=64)
    v = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    ref = TF.erase(x, 3, 4, 10, 7, v)
    assert_images_close(MF.erase(x, 3, 4, 10, 7, v), ref, atol=0)


def test_erase_per_image_value_with_batch_equal_to_channels():
    """v of shape (B, 1, 1, 1) with B == C == 3 must stay one value per image, not per channel."""
    x = make_batch(3, 17, 16, torch.float32, b=3, seed=66)
    i, j, hh, ww = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([5, 6, 7]), torch.tensor([3, 4, 5])
    v = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1)
    ref = reference_per_image(TF.erase, x, {"i": i, "j": j, "h": hh, "w": ww, "v": lambda k: v[k]})
    assert_images_close(MF.erase(x, i, j, hh, ww, v), ref, atol=0)


def test_erase_box_beyond_the_border_is_clipped_like_torchvision():
    x = make_batch(3, 17, 16, torch.float32, b=3, seed=65)
    i, j = torch.tensor([10, 0, 15]), torch.tensor([12, 14, 3])
    hh, ww = torch.tensor([20, 5, 9]), torch.tensor([8, 9, 40])
    ref = reference_per_image(TF.erase, x, {"i": i, "j": j, "h": hh, "w": ww}, v=torch.tensor(0.0))
    assert_images_close(MF.erase(x, i, j, hh, ww, 0.0), ref, atol=0)


# --------------------------------------------------------------------------------------------
# gaussian_noise (statistics: a kernel's random stream cannot be bit-identical to torch's)
# --------------------------------------------------------------------------------------------
def _grey(b, c=3, h=48, w=53, dtype=torch.float32):
    if dtype == torch.uint8:
        return torch.full((b, c, h, w), 128, dtype=torch.uint8)
    return torch.full((b, c, h, w), 0.5, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gaussian_noise_per_image_statistics(layout):
    b = 6
    x = _grey(b)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(71)
    mean = _uniform(g, b, -0.1, 0.1, specials=(0.0,))
    sigma = _uniform(g, b, 0.02, 0.2, specials=(0.2,))
    sigma[5] = 0.0
    out = MF.gaussian_noise(x, mean=mean, sigma=sigma, clip=False, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    noise = (out - x).double().flatten(1)
    n = noise.shape[1]
    for k in range(b):
        m, s = mean[k].item(), sigma[k].item()
        got_m, got_s = noise[k].mean().item(), noise[k].std().item()
        assert abs(got_m - m) <= 5 * s / math.sqrt(n) + 1e-6, f"image {k}: mean {got_m} vs {m}"
        assert abs(got_s - s) <= 5 * s / math.sqrt(2 * n) + 1e-6, f"image {k}: std {got_s} vs {s}"
    # sigma == 0: exactly x + mean
    assert torch.allclose(noise[5], torch.full_like(noise[5], mean[5].item()), atol=1e-6)


def test_gaussian_noise_is_independent_across_images_channels_and_pixels():
    b = 4
    x = _grey(b)
    out = MF.gaussian_noise(x, mean=0.0, sigma=torch.full((b,), 0.1), clip=False,
                            generator=torch.Generator().manual_seed(2))
    noise = (out - x).double()
    flat = noise.flatten(1)
    n = flat.shape[1]
    bound = 5 / math.sqrt(n)

    def corr(a, c):
        a, c = a.flatten() - a.mean(), c.flatten() - c.mean()
        return (a @ c / (a.norm() * c.norm())).item()

    assert abs(corr(flat[0], flat[1])) < bound, "images 0 and 1 got correlated noise"
    assert abs(corr(flat[0], flat[3])) < bound, "images 0 and 3 got correlated noise"
    m = noise[0, 0].numel()
    assert abs(corr(noise[:, 0], noise[:, 1])) < 5 / math.sqrt(b * m), "channels got correlated noise"
    assert abs(corr(noise[..., :, 1:], noise[..., :, :-1])) < 5 / math.sqrt(noise[..., 1:].numel()), (
        "horizontally adjacent pixels got correlated noise"
    )
    assert abs(corr(noise[..., 1:, :], noise[..., :-1, :])) < 5 / math.sqrt(noise[..., 1:, :].numel()), (
        "vertically adjacent pixels got correlated noise"
    )


def test_gaussian_noise_scalar_parameters_statistics():
    b = 3
    x = _grey(b)
    out = MF.gaussian_noise(x, mean=0.05, sigma=0.15, clip=False, generator=torch.Generator().manual_seed(3))
    noise = (out - x).double().flatten(1)
    n = noise.shape[1]
    for k in range(b):
        assert abs(noise[k].mean().item() - 0.05) <= 5 * 0.15 / math.sqrt(n)
        assert abs(noise[k].std().item() - 0.15) <= 5 * 0.15 / math.sqrt(2 * n)


def test_gaussian_noise_default_parameters():
    """mean=0, sigma=0.1, clip=True by default, as in torchvision."""
    x = _grey(2)
    out = MF.gaussian_noise(x, generator=torch.Generator().manual_seed(4))
    noise = (out - x).double().flatten(1)
    n = noise.shape[1]
    assert abs(noise.mean().item()) <= 5 * 0.1 / math.sqrt(2 * n)
    # clip at 0.5 +- 5 sigma essentially never bites at sigma 0.1
    assert abs(noise.std().item() - 0.1) <= 5 * 0.1 / math.sqrt(4 * n)


def test_gaussian_noise_clip_keeps_unit_range():
    b = 4
    x = make_batch(3, 24, 29, torch.float32, b=b, seed=72)
    sigma = torch.tensor([0.5, 1.0, 0.05, 2.0])
    mean = torch.tensor([0.0, 0.3, -0.2, 0.0])
    out = MF.gaussian_noise(x, mean=mean, sigma=sigma, clip=True, generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert (out == 0.0).any() and (out == 1.0).any(), "large noise should saturate some pixels"
    unclipped = MF.gaussian_noise(x, mean=mean, sigma=sigma, clip=False,
                                  generator=torch.Generator().manual_seed(5))
    assert unclipped.min().item() < 0.0 and unclipped.max().item() > 1.0
    # Same stream: clipping is the only difference.
    assert_images_close(out, unclipped.clamp(0, 1))


def test_gaussian_noise_generator_is_reproducible():
    x = make_batch(3, 17, 16, torch.float32, seed=73)
    sigma = torch.linspace(0.05, 0.3, x.shape[0])
    a = MF.gaussian_noise(x, sigma=sigma, generator=torch.Generator().manual_seed(123))
    b = MF.gaussian_noise(x, sigma=sigma, generator=torch.Generator().manual_seed(123))
    c = MF.gaussian_noise(x, sigma=sigma, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b), "the same generator seed must give the same noise"
    assert not torch.equal(a, c), "different generator seeds must give different noise"


def test_gaussian_noise_uint8():
    b = 4
    x = _grey(b, dtype=torch.uint8)
    mean = torch.tensor([0.0, 0.05, -0.1, 0.02])
    sigma = torch.tensor([0.05, 0.1, 0.08, 0.0])
    out = MF.gaussian_noise(x, mean=mean, sigma=sigma, clip=True, generator=torch.Generator().manual_seed(6))
    assert out.shape == x.shape and out.dtype == torch.uint8
    noise = (out.double() - 128.0).flatten(1)
    n = noise.shape[1]
    for k in range(b):
        m, s = 255 * mean[k].item(), 255 * sigma[k].item()
        assert abs(noise[k].mean().item() - m) <= 1.0 + 5 * s / math.sqrt(n), f"image {k}"
        assert abs(noise[k].std().item() - s) <= 0.05 * s + 1.0, f"image {k}"
    # uint8 clipping keeps [0, 255] without wrapping around
    big = MF.gaussian_noise(x, mean=0.0, sigma=1.0, clip=True, generator=torch.Generator().manual_seed(7))
    assert ((big == 0).float().mean() > 0.2) and ((big == 255).float().mean() > 0.2)


# --------------------------------------------------------------------------------------------
# Empty batches and NaN propagation
# --------------------------------------------------------------------------------------------
EMPTY_CASES = {
    "horizontal_flip": (lambda x, e: MF.horizontal_flip(x), None),
    "vertical_flip": (lambda x, e: MF.vertical_flip(x), None),
    "invert": (lambda x, e: MF.invert(x), None),
    "rgb_to_grayscale": (lambda x, e: MF.rgb_to_grayscale(x), (0, 1, 9, 11)),
    "adjust_brightness": (lambda x, e: MF.adjust_brightness(x, e), None),
    "adjust_contrast": (lambda x, e: MF.adjust_contrast(x, e), None),
    "adjust_saturation": (lambda x, e: MF.adjust_saturation(x, e), None),
    "adjust_hue": (lambda x, e: MF.adjust_hue(x, e), None),
    "adjust_sharpness": (lambda x, e: MF.adjust_sharpness(x, e), None),
    "solarize": (lambda x, e: MF.solarize(x, e), None),
    "posterize": (lambda x, e: MF.posterize(x, e.long()), None),
    "rotate": (lambda x, e: MF.rotate(x, e), None),
    "rotate-bilinear-fill": (lambda x, e: MF.rotate(x, e, interpolation=BILINEAR, fill=0.5), None),
    "affine": (lambda x, e: MF.affine(x, e, e.view(0, 2).expand(0, 2), e + 1.0, e), None),
    "resized_crop": (lambda x, e: MF.resized_crop(x, e.long(), e.long(), e.long() + 2, e.long() + 2, [5, 7]),
                     (0, 3, 5, 7)),
    "gaussian_blur": (lambda x, e: MF.gaussian_blur(x, 3, e + 1.0), None),
    "gaussian_noise": (lambda x, e: MF.gaussian_noise(x, mean=e, sigma=e + 0.1), None),
    "erase": (lambda x, e: MF.erase(x, e.long(), e.long(), e.long() + 2, e.long() + 2, 0.0), None),
    "normalize": (lambda x, e: MF.normalize(x, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]), None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", list(EMPTY_CASES))
def test_empty_batch_returns_empty_tensor(op, dtype):
    fn, shape = EMPTY_CASES[op]
    if op == "normalize" and dtype == torch.uint8:
        pytest.skip("normalize is defined for float images only")
    x = torch.zeros(0, 3, 9, 11, dtype=dtype)
    out = fn(x, torch.empty(0))
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == (shape or (0, 3, 9, 11))
    assert out.dtype == x.dtype


def _with_nans(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 5, 7] = float("nan")
    x[2, :, 11, 3] = float("nan")
    x[3, 1, 0, 0] = float("nan")
    return x


@pytest.mark.parametrize(
    "op",
    ["adjust_brightness", "rotate-bilinear", "rotate-bilinear-fill", "gaussian_blur", "gaussian_blur-xy"],
)
def test_nan_pixels_propagate_like_torchvision(op):
    x = _with_nans(make_batch(3, 24, 29, torch.float32, seed=81))
    g = torch.Generator().manual_seed(81)
    b = x.shape[0]
    if op == "adjust_brightness":
        f = _uniform(g, b, 0.0, 2.0, specials=(0.0,))
        f[0] = 0.5
        ref = reference_per_image(TF.adjust_brightness, x, {"brightness_factor": f})
        out = MF.adjust_brightness(x, f)
    elif op.startswith("rotate"):
        angle = _uniform(g, b, -180.0, 180.0)
        fill = 0.25 if op.endswith("fill") else None
        ref = reference_per_image(TF.rotate, x, {"angle": angle}, interpolation=BILINEAR, fill=fill)
        out = MF.rotate(x, angle, interpolation=BILINEAR, fill=fill)
    else:
        sigma = _uniform(g, b, 0.3, 2.0, shape=(2,) if op.endswith("xy") else ())
        ref = reference_per_image(TF.gaussian_blur, x, {"sigma": sigma}, kernel_size=[5, 3])
        out = MF.gaussian_blur(x, [5, 3], sigma)
    assert torch.isnan(out).any(), "NaN input pixels vanished"
    assert_images_close(out, ref)


NON_CONTIGUOUS_OPS = {
    "adjust_brightness": lambda m, x, p: m.adjust_brightness(x, p["f"]),
    "adjust_contrast": lambda m, x, p: m.adjust_contrast(x, p["f"]),
    "adjust_hue": lambda m, x, p: m.adjust_hue(x, p["hue"]),
    "adjust_sharpness": lambda m, x, p: m.adjust_sharpness(x, p["f"]),
    "rotate": lambda m, x, p: m.rotate(x, p["angle"], interpolation=BILINEAR, fill=0.3),
    "affine": lambda m, x, p: m.affine(x, p["angle"], [1.5, -2.0], p["f"] * 0.5 + 0.6, p["angle"] / 10,
                                       interpolation=BILINEAR),
    "resized_crop": lambda m, x, p: m.resized_crop(x, p["i"], p["j"], p["i"] + 3, p["j"] + 4, [19, 21]),
    "gaussian_blur": lambda m, x, p: m.gaussian_blur(x, [5, 3], p["f"] + 0.2),
    "erase": lambda m, x, p: m.erase(x, p["i"], p["j"], p["i"] + 2, p["j"] + 3, 0.25),
}


@pytest.mark.parametrize("op", list(NON_CONTIGUOUS_OPS))
def test_non_contiguous_views(op):
    """A strided view (every other column, a batch slice) gives the result of its contiguous copy."""
    big = make_batch(3, 17, 33, torch.float32, b=8, seed=85)
    x = big[1::2, :, 1:, ::2]
    assert not x.is_contiguous()
    g = torch.Generator().manual_seed(85)
    b = x.shape[0]
    p = {
        "f": _uniform(g, b, 0.0, 2.0),
        "hue": _uniform(g, b, -0.5, 0.5),
        "angle": _uniform(g, b, -180.0, 180.0),
        "i": torch.randint(0, 6, (b,), generator=g),
        "j": torch.randint(0, 6, (b,), generator=g),
    }
    fn = NON_CONTIGUOUS_OPS[op]
    assert_images_close(fn(MF, x, p), fn(MF, x.contiguous(), p), atol=0)


# --------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument (and the offending value)
# --------------------------------------------------------------------------------------------
def _x(b=3, c=3, h=9, w=11):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(91))


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# id -> (call, argument name, substring of the offending value that must appear, or None)
BAD_INPUTS = {
    # negative factors, scalar and per-image
    "brightness-neg-scalar": (lambda: MF.adjust_brightness(_x(), -0.25), "brightness_factor", "-0.25"),
    "brightness-neg-tensor": (lambda: MF.adjust_brightness(_x(), _t(0.5, -0.25, 1.0)), "brightness_factor", "-0.25"),
    "contrast-neg-scalar": (lambda: MF.adjust_contrast(_x(), -1.5), "contrast_factor", "-1.5"),
    "contrast-neg-tensor": (lambda: MF.adjust_contrast(_x(), _t(0.5, 1.0, -1.5)), "contrast_factor", "-1.5"),
    "saturation-neg-scalar": (lambda: MF.adjust_saturation(_x(), -0.125), "saturation_factor", "-0.125"),
    "saturation-neg-tensor": (lambda: MF.adjust_saturation(_x(), _t(-0.125, 1.0, 1.0)), "saturation_factor",
                              "-0.125"),
    "sharpness-neg-scalar": (lambda: MF.adjust_sharpness(_x(), -2.0), "sharpness_factor", "-2"),
    "sharpness-neg-tensor": (lambda: MF.adjust_sharpness(_x(), _t(1.0, -2.0, 0.0)), "sharpness_factor", "-2"),
    # hue outside [-0.5, 0.5]
    "hue-high-scalar": (lambda: MF.adjust_hue(_x(), 0.75), "hue_factor", "0.75"),
    "hue-low-scalar": (lambda: MF.adjust_hue(_x(), -0.625), "hue_factor", "-0.625"),
    "hue-tensor": (lambda: MF.adjust_hue(_x(), _t(0.1, -0.625, 0.2)), "hue_factor", "-0.625"),
    # gaussian_blur
    "blur-even-kernel": (lambda: MF.gaussian_blur(_x(), 4, _t(1.0, 1.0, 1.0)), "kernel_size", "4"),
    "blur-even-kernel-pair": (lambda: MF.gaussian_blur(_x(), [5, 6], 1.0), "kernel_size", "6"),
    "blur-zero-sigma-scalar": (lambda: MF.gaussian_blur(_x(), 3, 0.0), "sigma", "0"),
    "blur-neg-sigma-tensor": (lambda: MF.gaussian_blur(_x(), 3, _t(1.0, -0.5, 1.0)), "sigma", "-0.5"),
    "blur-zero-sigma-xy": (lambda: MF.gaussian_blur(_x(), 3, torch.tensor([[1.0, 1.0], [1.0, 0.0], [2.0, 2.0]])),
                           "sigma", "0"),
    # posterize bits outside [0, 8]
    "bits-9-scalar": (lambda: MF.posterize(_x(), 9), "bits", "9"),
    "bits-neg-scalar": (lambda: MF.posterize(_x(), -1), "bits", "-1"),
    "bits-9-tensor": (lambda: MF.posterize(_x(), torch.tensor([1, 9, 2])), "bits", "9"),
    # noise sigma
    "noise-neg-sigma": (lambda: MF.gaussian_noise(_x(), sigma=_t(0.1, -0.5, 0.1)), "sigma", "-0.5"),
    # per-image length != B
    "length-brightness": (lambda: MF.adjust_brightness(_x(), _t(1.0, 1.0, 1.0, 1.0)), "brightness_factor", None),
    "length-hue": (lambda: MF.adjust_hue(_x(), _t(0.1, 0.2)), "hue_factor", None),
    "length-rotate": (lambda: MF.rotate(_x(), _t(10.0, 20.0)), "angle", None),
    "length-affine-translate": (lambda: MF.affine(_x(), _t(1.0, 2.0, 3.0), torch.zeros(2, 2), 1.0, 0.0),
                                "translate", None),
    "length-affine-scale": (lambda: MF.affine(_x(), 0.0, [0.0, 0.0], _t(1.0, 1.0), 0.0), "scale", None),
    "length-blur-sigma": (lambda: MF.gaussian_blur(_x(), 3, _t(1.0, 1.0, 1.0, 1.0, 1.0)), "sigma", None),
    "length-crop-top": (lambda: MF.resized_crop(_x(), torch.tensor([0, 1]), 0, 4, 4, [8, 8]), "top", None),
    "length-solarize": (lambda: MF.solarize(_x(), _t(0.5, 0.5)), "threshold", None),
    "length-noise-mean": (lambda: MF.gaussian_noise(_x(), mean=_t(0.0, 0.0)), "mean", None),
    # per-image tensors count the images of the flattened leading dims: 1 for (C, H, W), 6 for (2, 3, C, H, W)
    "rank3-brightness": (lambda: MF.adjust_brightness(_x()[0], _t(1.0, 1.0, 1.0)), "image", None),
    "rank5-rotate": (lambda: MF.rotate(torch.stack([_x(), _x()]), _t(1.0, 2.0, 3.0)), "image", None),
    "rank3-blur": (lambda: MF.gaussian_blur(_x()[0], 3, _t(1.0, 1.0, 1.0)), "image", None),
    # channels not in {1, 3} for the colour ops (the geometric ops and filters take any channels)
    "channels-4-brightness": (lambda: MF.adjust_brightness(_x(c=4), _t(1.0, 1.0, 1.0)), "image", "4"),
    "channels-2-hue": (lambda: MF.adjust_hue(_x(c=2), _t(0.1, 0.1, 0.1)), "image", "2"),
    "channels-4-contrast": (lambda: MF.adjust_contrast(_x(c=4), _t(1.0, 2.0, 3.0)), "image", "4"),
    "channels-2-sharpness": (lambda: MF.adjust_sharpness(_x(c=2), _t(1.0, 1.0, 1.0)), "image", "2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    call, name, value = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        call()
    if value is not None:
        assert value in str(info.value), f"the message {str(info.value)!r} does not show the value {value}"


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_boundary_values_are_accepted(factor):
    """The rules are inclusive: factor 0, hue +-0.5, bits 0 and 8 are valid."""
    x = _x()
    MF.adjust_brightness(x, factor)
    MF.adjust_contrast(x, _t(factor, 1.0, 2.0))
    MF.adjust_hue(x, _t(-0.5, 0.5, factor))
    MF.posterize(x, torch.tensor([0, 8, 4]))
