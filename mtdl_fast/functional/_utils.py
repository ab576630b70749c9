"""Helpers shared by the functional ops: input types, argument checks, per-image parameters, dtype rules.

Every public op takes an image of shape (..., C, H, W) (a plain tensor, a `tv_tensors.Image` or a
`tv_tensors.Video`), runs on the flattened (N, C, H, W) batch and returns the input's leading dims
and type (`image_op`). A numeric parameter is a Python number (one value for every image, exactly
torchvision's call) or a tensor with one value per image of that flattened batch; `per_image`
turns both into one tensor that broadcasts against (N, C, H, W), so each op has one code path.
"""
from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable, Collection, Sequence

import torch

Param = float | int | torch.Tensor

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
IMAGE_DTYPES = FLOAT_DTYPES | {torch.uint8}
# The integer dtypes torchvision's invert, solarize and posterize define (through their value bits).
BIT_DTYPES = IMAGE_DTYPES | {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16}
_VALUE_BITS = {torch.uint8: 8, torch.int8: 7, torch.int16: 15, torch.uint16: 16, torch.int32: 31, torch.int64: 63}


class TypeOrValueError(TypeError, ValueError):
    """A bad argument that torchvision reports as one exception type and this project's rule
    (TypeError for types, ValueError for values) as the other: a channel count, a dtype, a
    non-integral or out-of-range integer argument. Caught by `except TypeError` and by
    `except ValueError` alike, so code written for either keeps working."""


def _tv_tensors():
    # A TVTensor instance implies torchvision.tv_tensors is loaded; looking it up instead of
    # importing it keeps `import mtdl_fast` free of torchvision's import time.
    return sys.modules.get("torchvision.tv_tensors")


def unwrap(image: object, name: str = "image") -> torch.Tensor:
    """The plain tensor behind `image`: a torch.Tensor, or the data of a tv_tensors.Image / Video.

    Raises TypeError for anything else, including the tv_tensors these ops do not transform
    (BoundingBoxes, Mask, KeyPoints).
    """
    if type(image) is torch.Tensor:
        return image
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, tv_tensors.Image or tv_tensors.Video, got {type(image)}")
    tv_tensors = _tv_tensors()
    if tv_tensors is None or not isinstance(image, tv_tensors.TVTensor):
        return image
    if isinstance(image, (tv_tensors.Image, tv_tensors.Video)):
        return image.as_subclass(torch.Tensor)
    raise TypeError(f"{name}: mtdl_fast.functional transforms images and videos only, got {type(image)}")


def rewrap(output: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`output` as the same tv_tensor type as the input `like` (torchvision's own wrapping), else as is."""
    tv_tensors = _tv_tensors()
    if tv_tensors is not None and isinstance(like, tv_tensors.TVTensor):
        return tv_tensors.wrap(output, like=like)
    return output


def check_image(
    image: torch.Tensor,
    name: str = "image",
    *,
    channels: Collection[int] | None = (1, 3),
    dtypes: Collection[torch.dtype] | None = IMAGE_DTYPES,
) -> None:
    """Raise unless `image` is a (..., C, H, W) tensor with C in `channels` and a dtype in `dtypes`.

    TypeError for a non-tensor, ValueError for fewer than 3 dims, TypeOrValueError for the channel
    count and the dtype (None: any).
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image)}")
    if image.ndim < 3:
        raise ValueError(f"{name} must have shape (..., C, H, W), got shape {tuple(image.shape)}")
    if channels is not None and image.shape[-3] not in channels:
        allowed = " or ".join(str(c) for c in sorted(channels))
        raise TypeOrValueError(f"{name} must have {allowed} channels (dim -3), got C={image.shape[-3]}")
    if dtypes is not None and image.dtype not in dtypes:
        allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise TypeOrValueError(f"{name} must have one of the dtypes [{allowed}], got {image.dtype}")


def image_op(
    *, channels: Collection[int] | None = (1, 3), dtypes: Collection[torch.dtype] | None = IMAGE_DTYPES
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorate an op written for an (N, C, H, W) batch so that it takes torchvision's inputs.

    The wrapper unwraps a tv_tensor, checks the image (`check_image`), flattens the leading dims
    into N, calls the op and gives its (N, C', H', W') result the input's leading dims and type.
    """

    def decorate(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(op)
        def wrapper(image, *args, **kwargs):
            plain = unwrap(image)
            check_image(plain, channels=channels, dtypes=dtypes)
            out = op(as_batch(plain), *args, **kwargs)
            return rewrap(out.reshape(*plain.shape[:-3], *out.shape[-3:]), image)

        return wrapper

    return decorate


def as_batch(image: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> (N, C, H, W), N the product of the leading dims (1 for a single image)."""
    return image.reshape(-1, *image.shape[-3:])


def max_value(dtype: torch.dtype) -> float:
    """The value of a fully saturated pixel: 1.0 for floating images, the dtype's maximum otherwise."""
    return 1.0 if dtype.is_floating_point else float(torch.iinfo(dtype).max)


def value_bits(dtype: torch.dtype) -> int:
    """Bits that carry the value of an integer pixel (torchvision's rule: the sign bit excluded)."""
    return _VALUE_BITS[dtype]


def compute_dtype(image: torch.Tensor) -> torch.dtype:
    """The dtype the arithmetic of an op runs in: the image's own float dtype, else float32."""
    return image.dtype if image.is_floating_point() else torch.float32


def per_image(
    value: Param | Sequence[float],
    name: str,
    image: torch.Tensor,
    *,
    width: int = 1,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    repeat: bool = False,
    range_error: type[Exception] = ValueError,
) -> torch.Tensor:
    """A parameter as a float64 tensor on `image`'s device that broadcasts against the (N, C, H, W) batch.

    Args:
        value: a number (shared by every image), a sequence of `width` numbers (width > 1), or a
            tensor with one value per image of the flattened leading dims: shape (N,), (1,) or ()
            for width 1; (N, width), (1, width), or (N,) / a number that fills the first
            component and zeros the rest (shear: x only), or every component when `repeat` (sigma).
        name: the argument's name, for error messages.
        image: the (..., C, H, W) image the parameter belongs to; N is the product of its leading dims.
        width: number of components (2 for translate, shear, sigma).
        low, high: inclusive bounds every value must satisfy (`range_error` otherwise).
        integer: require integral values (TypeOrValueError otherwise).

    Returns:
        float64 tensor of shape (N or 1, 1, 1, 1) for width 1, or (N or 1, width) otherwise.

    Raises:
        TypeError for a value of the wrong type, ValueError for a tensor of the wrong shape.
    """
    if isinstance(value, torch.Tensor):
        t = _tensor_parameter(value, name, math.prod(image.shape[:-3]), width, repeat).to(image.device)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        comps = [float(value)] + [float(value) if repeat else 0.0] * (width - 1)
        t = torch.tensor([comps] if width > 1 else comps, dtype=torch.float64, device=image.device)
    elif isinstance(value, Sequence) and not isinstance(value, str) and width > 1:
        t = _sequence_parameter(value, name, width, image.device)
    else:
        expected = "a number" + (f", a sequence of {width} numbers" if width > 1 else "") + " or a per-image tensor"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    _check_range(t, name, low, high, integer, range_error)
    return t.reshape(-1, 1, 1, 1) if width == 1 else t


def _tensor_parameter(value: torch.Tensor, name: str, batch: int, width: int, repeat: bool) -> torch.Tensor:
    t = value.detach().to(dtype=torch.float64)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim == 1 and width > 1:
        rest = t if repeat else torch.zeros_like(t)
        t = torch.stack([t] + [rest] * (width - 1), dim=1)
    expected = (batch,) if width == 1 else (batch, width)
    if tuple(t.shape) not in (expected, (1,) + expected[1:]):
        raise ValueError(
            f"{name} must hold one value per image of the flattened leading dims, shape {expected}; "
            f"got shape {tuple(value.shape)}"
        )
    return t


def _sequence_parameter(value: Sequence, name: str, width: int, device: torch.device) -> torch.Tensor:
    if len(value) not in (1, width):
        raise ValueError(f"{name} must be a sequence of 1 or {width} numbers, got {value!r}")
    if not all(isinstance(v, (numbers.Real, torch.Tensor)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be a sequence of numbers, got {value!r}")
    comps = [float(v) for v in value] * (width if len(value) == 1 else 1)
    return torch.tensor([comps], dtype=torch.float64, device=device)


def _check_range(
    t: torch.Tensor, name: str, low: float | None, high: float | None, integer: bool, range_error: type[Exception]
) -> None:
    if t.numel() == 0:
        return
    if integer and bool((t != torch.round(t)).any()):
        offending = t[t != torch.round(t)].flatten()[0].item()
        raise TypeOrValueError(f"{name} must be an integer, got {offending}")
    bad = torch.isnan(t)
    if low is not None:
        bad |= t < low
    if high is not None:
        bad |= t > high
    if bool(bad.any()):
        offending = t[bad].flatten()[0].item()
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        kind = "an integer in " if integer else "in "
        raise range_error(f"{name} must be {kind}{bounds}, got {offending}")


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 as torchvision scales it (x * (1/255)); floating images are returned as is."""
    if image.is_floating_point():
        return image
    return image.to(torch.float32).mul_(1.0 / 255.0)


def from_float(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float in [0, 1] -> `dtype`; uint8 as torchvision: (x * (256 - 1e-3)) truncated."""
    if dtype == torch.uint8:
        return image.mul(255.0 + 1.0 - 1e-3).to(torch.uint8)
    return image.to(dtype)


def cast_like(output: torch.Tensor, image: torch.Tensor, *, round_: bool) -> torch.Tensor:
    """Return a float result in `image`'s dtype: blends truncate uint8 results, warps and filters round."""
    if image.is_floating_point():
        return output
    if round_:
        output = output.round()
    return output.to(image.dtype)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """Luma (..., 1, H, W) of an RGB image in the compute dtype; a 1-channel image is its own gray."""
    image = image.to(compute_dtype(image))
    if image.shape[-3] == 1:
        return image
    r, g, b = image.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def blend(image1: torch.Tensor, image2: torch.Tensor, ratio: torch.Tensor, bound: float) -> torch.Tensor:
    """clamp(ratio * image1 + (1 - ratio) * image2, 0, bound) in the compute dtype."""
    dtype = compute_dtype(image1)
    ratio = ratio.to(dtype)
    return (image1.to(dtype) * ratio + image2.to(dtype) * (1.0 - ratio)).clamp_(0, bound)
