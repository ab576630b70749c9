"""torchvision's conventions for `mtdl_fast.functional`, beyond its numbers.

These tests check what torchvision's own v2 test classes check for each of the 18 ops (written for
this project, with our function in place of torchvision's kernel), each against torchvision itself:

1. Kernel conventions: the input is not modified, the output keeps dtype and device; a batch with
   leading dims (2,) or (2, 1) equals the single image's result repeated; degenerate leading dims
   (0,), (5, 0), (0, 5) keep their shape.
2. Functional conventions: a tv_tensors.Image (Video) comes back as an Image (Video); a non-tensor,
   or a tv_tensor these ops do not transform (Mask, BoundingBoxes), raises TypeError naming its type.
3. Signatures: every torchvision parameter, in torchvision's order, with the same default.
4. Leading dims with per-image parameters: an (N1, N2, C, H, W) batch with one value per image of
   the flattened leading dims equals torchvision image by image; a single (C, H, W) image keeps its shape.
5. Error types: every bad call raises the exception type torchvision raises for it (found by calling
   torchvision) and the project's type (TypeError for types, ValueError for values).
6. Interpolation: every mode of resized_crop (nearest, nearest-exact, bilinear, bicubic; antialias
   on and off; up- and downsampling; uint8 and float32) against torchvision; the mode given as an
   InterpolationMode, its name or a Pillow integer constant.
7. Special cases: quarter-turn rotations (torchvision's copy / rot90), invert, solarize and
   posterize on integer dtypes, erase with per-pixel values (RandomErasing(value="random")) and
   negative indices, normalize with scalar statistics, resized_crop with an int size.

Images are random (seeded), 17 x 11 as torchvision's tests use, uint8 and float32.
"""
from __future__ import annotations

import inspect
import re

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from mtdl_fast import functional as MF
from mtdl_fast.functional import _resample, geometry

SIZE = (17, 11)
DTYPES = [torch.uint8, torch.float32]
DTYPE_IDS = ["u8", "f32"]
ALL_OPS = list(MF.__all__)


def make_image(dtype=torch.float32, channels: int = 3, size=SIZE, batch=(), seed: int = 0) -> torch.Tensor:
    """A random (*batch, C, H, W) image: uint8 in 0..255 or float in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (*batch, channels, *size)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.rand(shape, generator=g).to(dtype)


def _threshold(x: torch.Tensor) -> float:
    return 128 if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else 0.5


# op -> its minimal call (torchvision's test kwargs where they exist), the same for MF and TF. Noise
# runs with sigma = 0: the draw is random, the conventions are not.
CALLS = {
    "horizontal_flip": lambda m, x: m.horizontal_flip(x),
    "vertical_flip": lambda m, x: m.vertical_flip(x),
    "rotate": lambda m, x: m.rotate(x, -10.9, interpolation=InterpolationMode.BILINEAR, fill=[0.2]),
    "affine": lambda m, x: m.affine(x, -10.9, [6.3, -0.6], 0.5, [-37.7], center=[1.2, 4.9]),
    "resized_crop": lambda m, x: m.resized_crop(x, 2, 2, 5, 7, size=(19, 32), antialias=True),
    "adjust_brightness": lambda m, x: m.adjust_brightness(x, 0.5),
    "adjust_contrast": lambda m, x: m.adjust_contrast(x, 0.5),
    "adjust_saturation": lambda m, x: m.adjust_saturation(x, 0.5),
    "adjust_hue": lambda m, x: m.adjust_hue(x, 0.25),
    "adjust_sharpness": lambda m, x: m.adjust_sharpness(x, 0.5),
    "rgb_to_grayscale": lambda m, x: m.rgb_to_grayscale(x, num_output_channels=3),
    "gaussian_blur": lambda m, x: m.gaussian_blur(x, (3, 5), [0.9, 0.2]),
    "gaussian_noise": lambda m, x: m.gaussian_noise(x, 0.1, 0.0),
    "erase": lambda m, x: m.erase(x, 2, 2, 10, 8, torch.tensor(0.7).reshape(-1, 1, 1)),
    "invert": lambda m, x: m.invert(x),
    "solarize": lambda m, x: m.solarize(x, _threshold(x)),
    "posterize": lambda m, x: m.posterize(x, 3),
    "normalize": lambda m, x: m.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
FLOAT_ONLY = {"normalize"}


def test_the_table_covers_every_op():
    assert sorted(CALLS) == sorted(ALL_OPS)


def _dtypes(op: str):
    return [torch.float32] if op in FLOAT_ONLY else DTYPES


def _cases(ops=ALL_OPS):
    return [pytest.param(op, dtype, id=f"{op}-{'f32' if dtype == torch.float32 else 'u8'}")
            for op in ops for dtype in _dtypes(op)]


# ----------------------------------------------------------------------------------------------
# 1. Kernel conventions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,dtype", _cases())
def test_matches_torchvision_on_a_single_image(op, dtype):
    x = make_image(dtype)
    out, ref = CALLS[op](MF, x), CALLS[op](TF, x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # hue's HSV round trip and sharpness's blend differ in the last bits; uint8 by at most a level
    torch.testing.assert_close(out, ref, rtol=0, atol=1 if dtype == torch.uint8 else 1e-4)


@pytest.mark.parametrize("op,dtype", _cases())
def test_input_untouched_dtype_and_device_kept(op, dtype):
    x = make_image(dtype)
    before, version = x.clone(), x._version
    out = CALLS[op](MF, x)
    assert x._version == version and torch.equal(x, before), "the input was modified"
    assert out.dtype == x.dtype and out.device == x.device


@pytest.mark.parametrize("batch_dims", [(2,), (2, 1)], ids=["2", "2x1"])
@pytest.mark.parametrize("op,dtype", _cases())
def test_batched_equals_unbatched(op, dtype, batch_dims):
    x = make_image(dtype)
    single = CALLS[op](MF, x)
    batched = CALLS[op](MF, x.repeat(*batch_dims, 1, 1, 1))
    torch.testing.assert_close(batched, single.repeat(*batch_dims, 1, 1, 1))


@pytest.mark.parametrize("batch_dims", [(0,), (5, 0), (0, 5)], ids=["0", "5x0", "0x5"])
@pytest.mark.parametrize("op,dtype", _cases())
def test_degenerate_leading_dims_keep_their_shape(op, dtype, batch_dims):
    x = torch.empty(*batch_dims, 3, *SIZE, dtype=dtype)
    out = CALLS[op](MF, x)
    assert out.shape[: len(batch_dims)] == batch_dims
    assert out.shape[len(batch_dims):] == CALLS[op](MF, make_image(dtype)).shape


# ----------------------------------------------------------------------------------------------
# 2. Functional conventions: input types
# ----------------------------------------------------------------------------------------------
MAKERS = {
    "tensor": lambda x: x,
    "image": lambda x: tv_tensors.Image(x),
    "video": lambda x: tv_tensors.Video(x.unsqueeze(0).repeat(2, 1, 1, 1)),
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("op", ALL_OPS)
def test_output_type_is_the_input_type(op, kind):
    x = MAKERS[kind](make_image(torch.float32))
    out = CALLS[op](MF, x)
    assert type(out) is type(x)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), CALLS[op](MF, x.as_subclass(torch.Tensor)))


@pytest.mark.parametrize("op", ALL_OPS)
def test_unknown_input_type_raises_type_error_naming_it(op):
    unknown = object()
    with pytest.raises(TypeError, match=re.escape(str(type(unknown)))):
        CALLS[op](MF, unknown)


@pytest.mark.parametrize("make", [
    lambda: tv_tensors.Mask(torch.zeros(1, *SIZE, dtype=torch.uint8)),
    lambda: tv_tensors.BoundingBoxes([[0, 0, 5, 5]], format="XYXY", canvas_size=SIZE),
], ids=["mask", "boxes"])
@pytest.mark.parametrize("op", ["adjust_brightness", "rotate", "resized_crop", "horizontal_flip"])
def test_other_tv_tensors_raise_type_error(op, make):
    x = make()
    with pytest.raises(TypeError, match=type(x).__name__):
        CALLS[op](MF, x)


@pytest.mark.parametrize("op", ["erase", "normalize"])
def test_inplace_writes_into_the_tv_tensor(op):
    x = tv_tensors.Image(make_image(torch.float32))
    expected = CALLS[op](TF, x.clone())
    if op == "erase":
        out = MF.erase(x, 2, 2, 10, 8, torch.tensor(0.7).reshape(-1, 1, 1), inplace=True)
    else:
        out = MF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], inplace=True)
    assert out is x
    torch.testing.assert_close(x.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor), rtol=0, atol=0)


def test_rotate_expand_keeps_the_tv_tensor():
    x = tv_tensors.Image(make_image(torch.float32))
    out = MF.rotate(x, 30.0, expand=True)
    assert type(out) is tv_tensors.Image
    torch.testing.assert_close(out, TF.rotate(x, 30.0, expand=True))


# ----------------------------------------------------------------------------------------------
# 3. Signatures
# ----------------------------------------------------------------------------------------------
def _default(value):
    return value.value if isinstance(value, InterpolationMode) else value


@pytest.mark.parametrize("op", ALL_OPS)
def test_signature_holds_torchvision_parameters_in_order_with_their_defaults(op):
    ours = inspect.signature(getattr(MF, op)).parameters
    theirs = list(inspect.signature(getattr(TF, op)).parameters.values())[1:]
    names = list(ours)
    positions = [names.index(p.name) for p in theirs if p.name in ours]
    assert len(positions) == len(theirs), f"missing {[p.name for p in theirs if p.name not in ours]}"
    assert positions == sorted(positions), f"order differs: {names} vs {[p.name for p in theirs]}"
    for p in theirs:
        assert _default(ours[p.name].default) == _default(p.default), p.name


# ----------------------------------------------------------------------------------------------
# 4. Leading dims with per-image parameters
# ----------------------------------------------------------------------------------------------
def _draw(g, n, lo, hi):
    return (lo + (hi - lo) * torch.rand(n, generator=g)).tolist()


# op -> (per-image parameters drawn for n images, shared kwargs, float atol)
PER_IMAGE = {
    "adjust_brightness": (lambda g, n: {"brightness_factor": _draw(g, n, 0, 2)}, {}, 1e-6),
    "adjust_contrast": (lambda g, n: {"contrast_factor": _draw(g, n, 0, 2)}, {}, 1e-6),
    "adjust_saturation": (lambda g, n: {"saturation_factor": _draw(g, n, 0, 2)}, {}, 1e-6),
    "adjust_hue": (lambda g, n: {"hue_factor": _draw(g, n, -0.5, 0.5)}, {}, 1e-4),
    "adjust_sharpness": (lambda g, n: {"sharpness_factor": _draw(g, n, 0, 3)}, {}, 1e-6),
    "solarize": (lambda g, n: {"threshold": _draw(g, n, 0, 1)}, {}, 0),
    "posterize": (lambda g, n: {"bits": torch.randint(0, 9, (n,), generator=g).tolist()}, {}, 0),
    "rotate": (lambda g, n: {"angle": _draw(g, n, -180, 180)}, {"interpolation": InterpolationMode.BILINEAR}, 0),
    "affine": (lambda g, n: {"angle": _draw(g, n, -180, 180), "scale": _draw(g, n, 0.6, 1.4)},
               {"translate": [1.0, -2.0], "shear": [3.0, 0.0], "interpolation": InterpolationMode.BILINEAR}, 0),
    "gaussian_blur": (lambda g, n: {"sigma": _draw(g, n, 0.2, 2)}, {"kernel_size": 5}, 0),
    "resized_crop": (lambda g, n: {"top": torch.randint(-2, 8, (n,), generator=g).tolist(),
                                   "left": torch.randint(-2, 5, (n,), generator=g).tolist(),
                                   "height": torch.randint(3, 12, (n,), generator=g).tolist(),
                                   "width": torch.randint(3, 9, (n,), generator=g).tolist()},
                     {"size": [13, 15]}, 0),
    "erase": (lambda g, n: {"i": torch.randint(0, 12, (n,), generator=g).tolist(),
                            "j": torch.randint(0, 8, (n,), generator=g).tolist(),
                            "h": torch.randint(0, 6, (n,), generator=g).tolist(),
                            "w": torch.randint(0, 6, (n,), generator=g).tolist()},
              {"v": torch.tensor(0.25).reshape(1, 1, 1)}, 0),
    "gaussian_noise": (lambda g, n: {"mean": _draw(g, n, -0.2, 0.2)}, {"sigma": 0.0}, 0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", list(PER_IMAGE))
def test_per_image_parameters_over_flattened_leading_dims(op, dtype):
    draw, shared, float_atol = PER_IMAGE[op]
    x = make_image(dtype, batch=(2, 3), seed=7)
    params = draw(torch.Generator().manual_seed(11), 6)
    if dtype == torch.uint8 and op == "solarize":
        params = {"threshold": [round(255 * t) for t in params["threshold"]]}
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    out = getattr(MF, op)(x, **tensors, **shared)
    flat = x.reshape(6, *x.shape[-3:])
    ref = torch.stack([getattr(TF, op)(flat[k], **{n: v[k] for n, v in params.items()}, **shared) for k in range(6)])
    assert out.shape == (2, 3, *ref.shape[1:])
    atol = 1 if dtype == torch.uint8 and float_atol else (0 if dtype == torch.uint8 else float_atol)
    torch.testing.assert_close(out.reshape(ref.shape), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("op", list(PER_IMAGE))
def test_single_image_takes_a_one_element_tensor(op):
    draw, shared, _ = PER_IMAGE[op]
    x = make_image(torch.float32, seed=3)
    params = draw(torch.Generator().manual_seed(5), 1)
    out = getattr(MF, op)(x, **{k: torch.tensor(v) for k, v in params.items()}, **shared)
    ref = getattr(TF, op)(x, **{k: v[0] for k, v in params.items()}, **shared)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_per_image_tensor_of_the_wrong_length_names_the_image_count():
    x = make_image(torch.float32, batch=(2, 3))
    with pytest.raises(ValueError, match=r"brightness_factor.*\(6,\)"):
        MF.adjust_brightness(x, torch.ones(2))


# ----------------------------------------------------------------------------------------------
# 5. Error types: torchvision's, and the project's rule
# ----------------------------------------------------------------------------------------------
def _rgba():
    return make_image(torch.float32, channels=4)


# id -> (call on a module, the project's exception type: TypeError for types, ValueError for values)
BAD_CALLS = {
    "rgba-brightness": (lambda m: m.adjust_brightness(_rgba(), 0.5), ValueError),
    "rgba-contrast": (lambda m: m.adjust_contrast(_rgba(), 0.5), ValueError),
    "rgba-saturation": (lambda m: m.adjust_saturation(_rgba(), 0.5), ValueError),
    "rgba-hue": (lambda m: m.adjust_hue(_rgba(), 0.25), ValueError),
    "rgba-sharpness": (lambda m: m.adjust_sharpness(_rgba(), 0.5), ValueError),
    "rgba-grayscale": (lambda m: m.rgb_to_grayscale(_rgba()), ValueError),
    "2-channel-hue": (lambda m: m.adjust_hue(make_image(channels=2), 0.1), ValueError),
    "grayscale-2-outputs": (lambda m: m.rgb_to_grayscale(make_image(), num_output_channels=2), ValueError),
    "solarize-u8-256": (lambda m: m.solarize(make_image(torch.uint8), 256), ValueError),
    "solarize-f32-1.5": (lambda m: m.solarize(make_image(), 1.5), ValueError),
    "posterize-9": (lambda m: m.posterize(make_image(torch.uint8), 9), ValueError),
    "posterize-negative": (lambda m: m.posterize(make_image(torch.uint8), -1), ValueError),
    "posterize-2.5": (lambda m: m.posterize(make_image(torch.uint8), 2.5), TypeError),
    "normalize-uint8": (lambda m: m.normalize(make_image(torch.uint8), [0.5] * 3, [0.2] * 3), TypeError),
    "normalize-2d": (lambda m: m.normalize(torch.rand(16, 16), [0.5] * 3, [0.2] * 3), ValueError),
    "normalize-std-0": (lambda m: m.normalize(make_image(), [0.5] * 3, 0), ValueError),
    "normalize-std-list-0": (lambda m: m.normalize(make_image(), [0.5] * 3, [0, 1, 1]), ValueError),
    "blur-sigma-object": (lambda m: m.gaussian_blur(make_image(), 3, sigma=object()), TypeError),
    "blur-sigma-negative": (lambda m: m.gaussian_blur(make_image(), 3, sigma=-1), ValueError),
    "blur-sigma-3": (lambda m: m.gaussian_blur(make_image(), 3, sigma=[1, 2, 3]), ValueError),
    "blur-kernel-3": (lambda m: m.gaussian_blur(make_image(), [1, 2, 3]), ValueError),
    "blur-kernel-even": (lambda m: m.gaussian_blur(make_image(), 2), ValueError),
    "blur-kernel-negative": (lambda m: m.gaussian_blur(make_image(), -1), ValueError),
    "noise-sigma-negative": (lambda m: m.gaussian_noise(make_image(), sigma=-1.0), ValueError),
    "noise-int16": (lambda m: m.gaussian_noise(make_image(torch.uint8).to(torch.int16)), TypeError),
    "brightness-negative": (lambda m: m.adjust_brightness(make_image(), -1), ValueError),
    "contrast-negative": (lambda m: m.adjust_contrast(make_image(), -1), ValueError),
    "saturation-negative": (lambda m: m.adjust_saturation(make_image(), -1), ValueError),
    "sharpness-negative": (lambda m: m.adjust_sharpness(make_image(), -1), ValueError),
    "hue-1": (lambda m: m.adjust_hue(make_image(), 1), ValueError),
    "hue-minus-1": (lambda m: m.adjust_hue(make_image(), -1), ValueError),
    "rotate-bicubic": (lambda m: m.rotate(make_image(), 10.0, InterpolationMode.BICUBIC), ValueError),
    "rotate-interpolation-object": (lambda m: m.rotate(make_image(), 10.0, object()), TypeError),
    "rotate-interpolation-name": (lambda m: m.rotate(make_image(), 10.0, "linear"), ValueError),
    "rotate-fill-string": (lambda m: m.rotate(make_image(), 10.0, fill="abc"), TypeError),
    "rotate-fill-2-of-3": (lambda m: m.rotate(make_image(), 10.0, fill=[1.0, 2.0]), ValueError),
    "affine-angle-string": (lambda m: m.affine(make_image(), "a", [0, 0], 1.0, 0.0), TypeError),
    "affine-translate-number": (lambda m: m.affine(make_image(), 0.0, 5, 1.0, 0.0), TypeError),
    "affine-translate-3": (lambda m: m.affine(make_image(), 0.0, [1, 2, 3], 1.0, 0.0), ValueError),
    "affine-scale-0": (lambda m: m.affine(make_image(), 0.0, [0, 0], 0.0, 0.0), ValueError),
    "affine-scale-negative": (lambda m: m.affine(make_image(), 0.0, [0, 0], -1.0, 0.0), ValueError),
    "affine-shear-3": (lambda m: m.affine(make_image(), 0.0, [0, 0], 1.0, [1, 2, 3]), ValueError),
    "affine-shear-string": (lambda m: m.affine(make_image(), 0.0, [0, 0], 1.0, "a"), TypeError),
    "affine-center-number": (lambda m: m.affine(make_image(), 0.0, [0, 0], 1.0, 0.0, center=5), TypeError),
    "unknown-input": (lambda m: m.invert("not an image"), TypeError),
}


def _torchvision_error(call) -> type[Exception]:
    try:
        call(TF)
    except Exception as error:  # noqa: BLE001 - the type is what is asked for
        return type(error)
    raise AssertionError("torchvision accepts this call")


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_raises_torchvisions_exception_type_and_the_projects(case):
    call, project_type = BAD_CALLS[case]
    theirs = _torchvision_error(call)
    with pytest.raises(Exception) as info:  # noqa: PT011 - checked below against two types
        call(MF)
    assert isinstance(info.value, theirs), f"torchvision raises {theirs.__name__}, we {type(info.value).__name__}"
    assert isinstance(info.value, project_type), f"the project's rule wants {project_type.__name__}"


@pytest.mark.parametrize("mode", ["box", "hamming", "lanczos"])
def test_resized_crop_modes_torch_cannot_resize_tensors_with_raise_value_error(mode):
    with pytest.raises(ValueError, match=mode):
        MF.resized_crop(make_image(), 2, 2, 5, 7, [9, 9], interpolation=mode)


def test_erase_value_of_the_wrong_shape_raises_value_error():
    with pytest.raises(ValueError, match="v must broadcast"):
        MF.erase(make_image(), 1, 1, 3, 3, torch.zeros(2, 1, 1))


# ----------------------------------------------------------------------------------------------
# 6. Interpolation modes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["batched", "per-image"])
def resize_path(request, monkeypatch):
    """Both CPU paths of resized_crop: the batched resampling, and torch's resize image by image
    (what the CPU uses for small batches and large images)."""
    monkeypatch.setattr(geometry, "_batched", lambda image: request.param == "batched")
    return request.param


def _exact_resize(mode: str, antialias: bool, upsampling: bool, dtype: torch.dtype, path: str) -> bool:
    """Where resized_crop reproduces torchvision bit for bit (measured; see the README): the
    per-image path always (it is torch's kernel), the batched path but for float bilinear without
    antialiasing and float antialiased downsampling."""
    if path == "per-image" or dtype == torch.uint8 or mode.startswith("nearest") or mode == "bicubic" and not antialias:
        return True
    return antialias and upsampling


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("antialias", [True, False], ids=["aa", "no-aa"])
@pytest.mark.parametrize("upsampling", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic"])
def test_resized_crop_every_mode_matches_torchvision_per_image(mode, upsampling, antialias, dtype, resize_path):
    b = 5
    x = make_image(dtype, batch=(b,), size=(21, 19), seed=13)
    g = torch.Generator().manual_seed(17)
    size = [24, 26] if upsampling else [6, 5]
    height = torch.randint(4, 18, (b,), generator=g) if upsampling else torch.randint(8, 22, (b,), generator=g)
    width = torch.randint(4, 20, (b,), generator=g) if upsampling else torch.randint(7, 21, (b,), generator=g)
    top, left = torch.randint(-2, 6, (b,), generator=g), torch.randint(-2, 6, (b,), generator=g)
    out = MF.resized_crop(x, top, left, height, width, size, interpolation=mode, antialias=antialias)
    ref = torch.stack([TF.resized_crop(x[k], int(top[k]), int(left[k]), int(height[k]), int(width[k]), size,
                                       interpolation=InterpolationMode(mode), antialias=antialias) for k in range(b)])
    exact = _exact_resize(mode, antialias, upsampling, dtype, resize_path)
    # otherwise the last float32 bit: torch's 2-D bilinear kernel sums in an order that depends on
    # its thread count and channels, and its antialiased downsampling differs by one rounding
    torch.testing.assert_close(out, ref, rtol=0, atol=0 if exact else 2.4e-7)


@pytest.mark.parametrize("form", ["enum", "name", "pillow-int"])
@pytest.mark.parametrize("op", ["rotate", "affine", "resized_crop"])
def test_interpolation_given_as_enum_name_or_pillow_constant(op, form, resize_path):
    x = make_image(torch.float32)
    mode = InterpolationMode.BILINEAR
    value = {"enum": mode, "name": "bilinear", "pillow-int": 2}[form]
    calls = {
        "rotate": lambda i: MF.rotate(x, 33.0, interpolation=i),
        "affine": lambda i: MF.affine(x, 33.0, [1, 2], 1.1, 5.0, interpolation=i),
        "resized_crop": lambda i: MF.resized_crop(x, 1, 2, 9, 7, [12, 12], interpolation=i),
    }
    torch.testing.assert_close(calls[op](value), calls[op](mode), rtol=0, atol=0)


def test_resized_crop_antialias_none_means_false(resize_path):
    x = make_image(torch.float32)
    torch.testing.assert_close(MF.resized_crop(x, 0, 0, 17, 11, [6, 5], antialias=None),
                               TF.resized_crop(x, 0, 0, 17, 11, [6, 5], antialias=False), rtol=0, atol=2.4e-7)


@pytest.mark.parametrize("size", [9, [9], (13,)], ids=["int", "list", "tuple"])
def test_resized_crop_one_size_keeps_the_crops_aspect_ratio(size, resize_path):
    x = make_image(torch.float32)
    out = MF.resized_crop(x, 1, 2, 12, 7, size)
    ref = TF.resized_crop(x, 1, 2, 12, 7, size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_resized_crop_one_size_with_boxes_of_different_aspect_raises():
    x = make_image(torch.float32, batch=(2,))
    with pytest.raises(ValueError, match="different output sizes"):
        MF.resized_crop(x, 0, 0, torch.tensor([12, 6]), torch.tensor([7, 7]), 9)


# ----------------------------------------------------------------------------------------------
# 7. Special cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interpolation", [InterpolationMode.NEAREST, InterpolationMode.BILINEAR],
                         ids=["nearest", "bilinear"])
@pytest.mark.parametrize("size", [(15, 15), SIZE], ids=["square", "non-square"])
def test_rotate_quarter_turns_are_torchvisions_copies(size, interpolation, dtype):
    angles = [0.0, 90.0, 180.0, 270.0, -90.0, 360.0, 450.0, -180.0]
    x = make_image(dtype, batch=(len(angles),), size=size, seed=19)
    out = MF.rotate(x, torch.tensor(angles), interpolation=interpolation, fill=[0.3] if dtype != torch.uint8 else 9)
    ref = torch.stack([TF.rotate(x[k], a, interpolation=interpolation, fill=[0.3] if dtype != torch.uint8 else 9)
                       for k, a in enumerate(angles)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(MF.rotate(x, 180.0, interpolation), TF.rotate(x, 180.0, interpolation), rtol=0, atol=0)


INTEGER_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint8]


def _integer_image(dtype):
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**20)), min(info.max, 2**20)
    return torch.randint(lo, hi + 1, (2, 3, *SIZE), generator=torch.Generator().manual_seed(23)).to(dtype)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_invert_solarize_posterize_on_integer_dtypes_match_torchvision(dtype):
    x = _integer_image(dtype)
    torch.testing.assert_close(MF.invert(x), TF.invert(x), rtol=0, atol=0)
    for bits in range(9):
        torch.testing.assert_close(MF.posterize(x, bits), TF.posterize(x, bits), rtol=0, atol=0)
    if dtype == torch.uint16:  # torch has no comparison for uint16: refused up front
        with pytest.raises(TypeError, match="uint16"):
            MF.solarize(x, 1000)
        return
    threshold = int(torch.iinfo(dtype).max * 0.3)
    torch.testing.assert_close(MF.solarize(x, threshold), TF.solarize(x, threshold), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_erase_with_random_erasing_per_pixel_values(dtype):
    x = make_image(dtype, batch=(2,), seed=29)
    params = T.RandomErasing(p=1.0, value="random").make_params([x])
    out = MF.erase(x, **params)
    ref = TF.erase(x, **params)
    assert params["v"].shape[-2:] != (1, 1), "value='random' draws one value per pixel"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_erase_per_pixel_values_with_per_image_positions():
    x = make_image(torch.float32, batch=(3,), seed=31)
    v = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1))
    i, j = torch.tensor([0, 5, 12]), torch.tensor([1, 6, 3])
    out = MF.erase(x, i, j, 4, 5, v)
    ref = torch.stack([TF.erase(x[k], int(i[k]), int(j[k]), 4, 5, v) for k in range(3)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_erase_per_pixel_values_need_one_box_size():
    x = make_image(torch.float32, batch=(2,))
    with pytest.raises(ValueError, match="one size"):
        MF.erase(x, 0, 0, torch.tensor([3, 4]), 5, torch.rand(3, 3, 5))
    with pytest.raises(ValueError, match="v must broadcast"):  # the box is clipped to 2 rows
        MF.erase(x, 15, 0, 4, 5, torch.rand(3, 4, 5))


@pytest.mark.parametrize("i,j,h,w", [(-3, 2, 2, 4), (-5, -4, 3, 2), (2, -3, 4, 9), (-3, 1, 5, 3)])
def test_erase_negative_start_counts_from_the_end_like_python_slicing(i, j, h, w):
    x = make_image(torch.float32, seed=37)
    out = MF.erase(x, i, j, h, w, torch.tensor(0.5))
    torch.testing.assert_close(out, TF.erase(x, i, j, h, w, torch.tensor(0.5)), rtol=0, atol=0)


@pytest.mark.parametrize("mean,std", [(0.5, 2.0), ([0.5], [0.25]), ((0.1, 0.2, 0.3), 0.5)],
                         ids=["scalars", "one", "mixed"])
def test_normalize_scalar_statistics_match_torchvision(mean, std):
    x = make_image(torch.float32, batch=(2,))
    torch.testing.assert_close(MF.normalize(x, mean, std), TF.normalize(x, mean, std), rtol=0, atol=0)


def test_normalize_with_zero_std_number_is_a_value_error_showing_the_value():
    with pytest.raises(ValueError, match="std .* got 0"):
        MF.normalize(make_image(), [0.5, 0.5, 0.5], 0)


# ----------------------------------------------------------------------------------------------
# The batched resampling's own guarantees
# ----------------------------------------------------------------------------------------------
def test_tap_bound_covers_every_crop_length():
    """Off the CPU the number of taps is a bound from the longest crop, not read from the boxes: it
    must cover what torch's antialiased kernel uses for every length up to that crop."""
    for interp, mode in ((2, "bilinear"), (4, "bicubic")):
        for out in (1, 2, 3, 7, 16, 31):
            lengths = torch.arange(1, 70)
            index, weight, _ = _resample.axis_taps(lengths, out, mode, True, False)
            used = int((weight != 0).sum(-1).max())
            assert used <= _resample.tap_bound(out, interp, 69), (mode, out)


def test_bounded_taps_give_the_same_result(monkeypatch):
    """The spare taps of the bound carry zero weight: results equal those with the taps read back."""
    x = make_image(torch.float32, batch=(6,), size=(21, 19), seed=41)
    box = torch.tensor([[0, 0, 21, 19], [2, 3, 9, 11], [-2, 1, 15, 4], [5, 5, 3, 3], [1, -1, 20, 18], [0, 0, 1, 1]])
    for size, mode in (((24, 26), "bilinear"), ((6, 5), "bilinear"), ((24, 26), "bicubic"), ((7, 9), "bicubic")):
        read = _resample.resample_crops(x, box, size, mode, True)
        monkeypatch.setattr(_resample, "_tap_count", lambda count, out, interp, longest: _resample.tap_bound(
            out, interp, longest))
        bounded = _resample.resample_crops(x, box, size, mode, True)
        monkeypatch.undo()
        torch.testing.assert_close(bounded, read, rtol=0, atol=0)


def test_batched_resampling_in_chunks_equals_one_chunk(monkeypatch):
    x = make_image(torch.float32, batch=(7,), seed=43)
    box = torch.tensor([[1, 2, 9, 7]] * 7) + torch.arange(7)[:, None] % 3
    whole = _resample.resample_crops(x, box, (20, 14), "bilinear", True)
    monkeypatch.setattr(_resample, "CHUNK_BYTES", 1)  # one image at a time
    torch.testing.assert_close(_resample.resample_crops(x, box, (20, 14), "bilinear", True), whole, rtol=0, atol=0)


def test_boxes_beyond_max_box_are_refused_on_the_cpu():
    with pytest.raises(ValueError, match="max_box"):
        _resample.resample_crops(make_image(batch=(2,)), torch.tensor([[0, 0, 30, 5], [0, 0, 3, 3]]), (8, 8),
                                 "bilinear", True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_other_float_dtypes_resize_like_torchvision(dtype, resize_path):
    """torchvision resizes float16 / bfloat16 through float32 and float64 natively (the batched
    float64 weights may differ in their last bit)."""
    x = make_image(torch.float32, batch=(3,), seed=47).to(dtype)
    out = MF.resized_crop(x, 1, 2, 9, 7, [15, 13])
    ref = TF.resized_crop(x, 1, 2, 9, 7, [15, 13])
    assert out.dtype == dtype
    last_bit = dtype == torch.float64 and resize_path == "batched"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15 if last_bit else 0)
