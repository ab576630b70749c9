"""Geometric ops with torchvision.transforms.v2.functional's names and numerics, parameters per image.

Rotate and affine follow torchvision's own route (inverse affine matrix in float64, an affine grid
normalised by the image size, grid_sample with align_corners=False and zero padding, the ones-mask
for a fill), batched with one matrix per image, so results agree to float32 rounding; rotate
copies or uses rot90 for quarter turns about the centre, as torchvision does. resized_crop crops
and resizes all images at once with torch's interpolation numerics (`_resample`), or calls torch's
resize per image where that is as fast (large images, few images, on the CPU).
"""
from __future__ import annotations

import enum
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mtdl_fast.functional._resample import MODES as RESIZE_MODES
from mtdl_fast.functional._resample import resample_crops
from mtdl_fast.functional._utils import (
    Param,
    TypeOrValueError,
    cast_like,
    compute_dtype,
    image_op,
    per_image,
)

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode

_MODE_NAMES = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_PILLOW_MODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WARP_MODES = ("nearest", "bilinear")


@image_op(channels=None, dtypes=None)
def horizontal_flip(image: torch.Tensor) -> torch.Tensor:
    """Mirror left-right: image.flip(-1). Any (..., C, H, W) tensor."""
    return image.flip(-1)


@image_op(channels=None, dtypes=None)
def vertical_flip(image: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom: image.flip(-2). Any (..., C, H, W) tensor."""
    return image.flip(-2)


def interpolation_name(interpolation: InterpolationMode | str | int, allowed: Sequence[str]) -> str:
    """The mode name of an InterpolationMode, its string value or a Pillow integer constant, as
    torchvision accepts them; ValueError for a mode `allowed` does not hold."""
    if isinstance(interpolation, enum.Enum):
        name = interpolation.value
    elif isinstance(interpolation, str):
        name = interpolation
    elif isinstance(interpolation, numbers.Integral) and not isinstance(interpolation, bool):
        name = _PILLOW_MODES.get(int(interpolation), str(interpolation))
    else:
        raise TypeOrValueError(
            f"interpolation must be an InterpolationMode, its name or a Pillow integer constant, got {interpolation!r}"
        )
    if name not in _MODE_NAMES:
        raise ValueError(f"interpolation must be one of {list(_MODE_NAMES)}, got {interpolation!r}")
    if name not in allowed:
        raise ValueError(f"interpolation {name!r} is not supported here; use one of {list(allowed)}")
    return name


def inverse_affine_matrix(
    angle: torch.Tensor,
    translate: torch.Tensor,
    scale: torch.Tensor,
    shear: torch.Tensor,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image inverse affine matrices, torchvision's `_get_inverse_affine_matrix` batched.

    Args:
        angle: (B,) degrees, clockwise as in torchvision.affine.
        translate: (B, 2) pixels; scale: (B,) > 0; shear: (B, 2) degrees (x, y).
        center: (B, 2) pixel offsets of the centre from the image centre, or None for (0, 0).

    Returns:
        float64 (B, 2, 3): output coordinates (centred) -> input coordinates (centred).
    """
    rot = torch.deg2rad(angle.double())
    sx, sy = torch.deg2rad(shear.double()).unbind(-1)
    tx, ty = translate.double().unbind(-1)
    cx, cy = (torch.zeros_like(tx), torch.zeros_like(ty)) if center is None else center.double().unbind(-1)
    scale = scale.double()
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack((m0, m1, m2, m3, m4, m5), dim=-1).reshape(-1, 2, 3)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 2) normalised sampling grid, built exactly as torchvision builds it."""
    dtype, device = theta.dtype, theta.device
    base = torch.empty(1, height, width, 3, dtype=dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(
        torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device).unsqueeze(-1)
    )
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device)
    batch = theta.shape[0]
    return base.view(1, height * width, 3).expand(batch, -1, -1).bmm(rescaled).view(batch, height, width, 2)


def warp(
    image: torch.Tensor, theta: torch.Tensor, interpolation: str, fill: float | Sequence[float] | None
) -> torch.Tensor:
    """Sample each image through its own inverse affine matrix.

    Args:
        image: (B, C, H, W) uint8 or float.
        theta: (B, 2, 3) or (1, 2, 3) inverse matrices from `inverse_affine_matrix`.
        interpolation: "nearest" or "bilinear".
        fill: value (or one per channel) for pixels sampled outside the image, or None for zeros
            without a mask.

    Returns:
        (B, C, H, W) in image's dtype (uint8 results rounded).
    """
    batch, channels, height, width = image.shape
    if image.numel() == 0:
        return image.clone()
    dtype = compute_dtype(image)
    grid = _affine_grid(theta.to(dtype).expand(batch, -1, -1), height, width)
    src = image.to(dtype)
    if fill is not None:
        src = torch.cat((src, torch.ones_like(src[:, :1])), dim=1)
    out = F.grid_sample(src, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    if fill is not None:
        out, mask = out[:, :channels], out[:, channels:].expand(-1, channels, -1, -1)
        fill_img = torch.tensor(fill, dtype=dtype, device=image.device).reshape(1, -1, 1, 1)
        if interpolation == "nearest":
            out = torch.where(mask < 0.5, fill_img.expand_as(out), out)
        else:
            out = (out - fill_img) * mask + fill_img
    return cast_like(out, image, round_=True)


def _fill_value(fill: float | Sequence[float] | None, channels: int) -> list[float] | None:
    """fill as torchvision takes it: None, a number, or a sequence of 1 or C numbers."""
    if fill is None:
        return None
    if isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        return [float(fill)]
    if not isinstance(fill, (list, tuple)) or not all(isinstance(f, numbers.Real) for f in fill):
        raise TypeOrValueError(f"fill must be a number or a list or tuple of numbers, got {fill!r}")
    if len(fill) not in (1, channels):
        raise ValueError(f"fill must be one number or one per channel ({channels}), got {fill!r}")
    return [float(f) for f in fill]


def _center(center: Sequence[float] | None, image: torch.Tensor) -> torch.Tensor | None:
    """The centre [x, y] in pixels as its (1, 2) float64 offset from the image centre, or None."""
    if center is None:
        return None
    if not isinstance(center, (list, tuple)) or not all(isinstance(c, numbers.Real) for c in center):
        raise TypeError(f"center must be a list or tuple [x, y] of numbers, got {center!r}")
    if len(center) != 2:
        raise ValueError(f"center must be [x, y], got {center!r}")
    height, width = image.shape[-2:]
    offset = [center[0] - width * 0.5, center[1] - height * 0.5]
    return torch.tensor([offset], dtype=torch.float64, device=image.device)


def _quarter_turns(image: torch.Tensor, angles: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """torchvision rotates about the centre by a copy at 0 degrees and by torch.rot90 at 180 (and at
    90 and 270 on square images) instead of resampling; the same, image by image.

    image, warped: (N, C, H, W); angles: (N,) or (1,) in [0, 360).
    """
    square = image.shape[-1] == image.shape[-2]
    out = warped
    for turns in range(4):
        chosen = angles == 90.0 * turns
        if (turns % 2 and not square) or not bool(chosen.any()):
            continue
        out = torch.where(chosen.reshape(-1, 1, 1, 1), torch.rot90(image, turns, dims=(-2, -1)), out)
    return out


@image_op(channels=None)
def rotate(
    image: torch.Tensor,
    angle: Param,
    interpolation: InterpolationMode | str | int = "nearest",
    expand: bool = False,
    center: Sequence[float] | None = None,
    fill: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Rotate counter-clockwise by `angle` degrees (number or (N,)) about the centre; size kept.

    image (..., C, H, W) uint8/float, any number of channels; interpolation nearest (default) or
    bilinear. `expand=True` needs one angle for the batch (it changes the output size) and is
    delegated to torchvision.
    """
    mode = interpolation_name(interpolation, _WARP_MODES)
    offset = _center(center, image)
    fill_values = _fill_value(fill, image.shape[-3])
    if expand:
        if isinstance(angle, torch.Tensor):
            raise ValueError("expand=True changes the output size, so angle must be one number, not a per-image tensor")
        if not isinstance(angle, numbers.Real) or isinstance(angle, bool):
            raise TypeError(f"angle must be a number, got {angle!r}")
        from torchvision.transforms.v2 import functional as TF

        return TF.rotate(image, float(angle), mode, expand=True, center=center, fill=fill)
    angles = per_image(angle, "angle", image).reshape(-1).remainder(360.0)
    batch = angles.shape[0]
    zeros = torch.zeros(batch, 2, dtype=torch.float64, device=angles.device)
    ones = torch.ones(batch, dtype=torch.float64, device=angles.device)
    theta = inverse_affine_matrix(-angles, zeros, ones, zeros, offset)
    out = warp(image, theta, mode, fill_values)
    return out if offset is not None else _quarter_turns(image, angles, out)


def _translation(translate: Sequence[float] | torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """translate [tx, ty] (a sequence or a (2,) tensor) or one pair per image (N, 2), as (N or 1, 2)."""
    if isinstance(translate, torch.Tensor) and translate.ndim == 1:
        if translate.shape != (2,):
            raise ValueError(
                f"translate must be [tx, ty] or one pair per image (N, 2), got shape {tuple(translate.shape)}"
            )
        translate = translate.reshape(1, 2)
    elif not isinstance(translate, (torch.Tensor, list, tuple)):
        raise TypeError(f"translate must be a sequence [tx, ty] or a per-image tensor, got {translate!r}")
    elif isinstance(translate, (list, tuple)) and len(translate) != 2:
        raise ValueError(f"translate must be a sequence of length 2, got {translate!r}")
    return per_image(translate, "translate", image, width=2)


@image_op(channels=None)
def affine(
    image: torch.Tensor,
    angle: Param,
    translate: Sequence[float] | torch.Tensor,
    scale: Param,
    shear: Param | Sequence[float],
    interpolation: InterpolationMode | str | int = "nearest",
    fill: float | Sequence[float] | None = None,
    center: Sequence[float] | None = None,
) -> torch.Tensor:
    """Affine warp (rotation `angle`, `translate` [tx, ty] pixels, `scale` > 0, `shear` [sx, sy] degrees).

    Each parameter is one value for the batch or per image: angle/scale (N,), translate (N, 2),
    shear (N,) (x only) or (N, 2); a shear number is [s, 0], a one-element shear list [s, s], as
    torchvision. image (..., C, H, W) uint8/float, any number of channels.
    """
    mode = interpolation_name(interpolation, _WARP_MODES)
    angles = per_image(angle, "angle", image).reshape(-1)
    shifts = _translation(translate, image)
    scales = per_image(scale, "scale", image).reshape(-1)
    if bool((scales <= 0).any()):
        raise ValueError(f"scale must be positive, got {scales[scales <= 0][0].item()}")
    shears = per_image(shear, "shear", image, width=2)
    offset = _center(center, image)
    batch = max(t.shape[0] for t in (angles, shifts, scales, shears))
    theta = inverse_affine_matrix(
        angles.expand(batch),
        shifts.expand(batch, 2),
        scales.expand(batch),
        shears.expand(batch, 2),
        None if offset is None else offset.expand(batch, 2),
    )
    return warp(image, theta, mode, _fill_value(fill, image.shape[-3]))


# Where the CPU resamples all crops at once (measured, one thread; see the README): from 32 images
# of at most 64 x 64 pixels. Fewer images do not amortise the tap tables; for larger images torch's
# resize kernel per image is as fast (its per-call overhead no longer dominates).
_BATCHED_MIN_IMAGES = 32
_BATCHED_MAX_PIXELS = 64 * 64


def _batched(image: torch.Tensor) -> bool:
    """Whether to resize the (B, C, H, W) batch's crops all at once: always off the CPU (one call
    of torch's resize per image costs a launch each), on the CPU where that measured faster."""
    if image.device.type != "cpu":
        return True
    return image.shape[0] >= _BATCHED_MIN_IMAGES and image.shape[-2] * image.shape[-1] <= _BATCHED_MAX_PIXELS


def _resized_crop(
    image: torch.Tensor,
    box: torch.Tensor,
    size: tuple[int, int],
    nearest: bool,
    antialias: bool = True,
    mode: str | None = None,
    max_box: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Crop box (B, 4) = top, left, height, width (integers, sizes >= 1; outside the image reads 0)
    of each image (B, C, H, W) and resize it to `size` with torchvision's resize numerics.

    mode: nearest, nearest-exact, bilinear or bicubic (default: nearest or bilinear by `nearest`).
    max_box: (height, width) no box exceeds; None: boxes no larger than the image (the
    augmentation case), so that the boxes need not be read back from the device. All images at
    once (`resample_crops`) or one call of torch's resize per image (`_batched` decides). Returns
    (B, C, *size) in the image's dtype.
    """
    mode = mode or ("nearest" if nearest else "bilinear")
    if _batched(image):
        return resample_crops(image, box, size, mode, antialias, max_box)
    return _resized_crop_each(image, box, size, mode, antialias)


def _resized_crop_each(
    image: torch.Tensor, box: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool
) -> torch.Tensor:
    """Crop by crop through torch's resize kernel, the way torchvision's resize calls it."""
    height, width = image.shape[-2:]
    out = image.new_empty((image.shape[0], image.shape[1], *size))
    smooth = mode in ("bilinear", "bicubic")
    # torchvision resizes float16/bfloat16 through float32; uint8 natively on the CPU
    native = image.dtype in (torch.float32, torch.float64, torch.uint8)
    for i, (top, left, h, w) in enumerate(box.long().tolist()):
        # The part of the box inside the image (possibly empty), then zeros for the rest of it.
        r0, c0 = min(max(top, 0), height), min(max(left, 0), width)
        r1, c1 = max(min(max(top + h, 0), height), r0), max(min(max(left + w, 0), width), c0)
        crop = image[i : i + 1, :, r0:r1, c0:c1]
        pad_top, pad_left = min(max(-top, 0), h), min(max(-left, 0), w)
        pad = [pad_left, w - pad_left - (c1 - c0), pad_top, h - pad_top - (r1 - r0)]
        if any(pad):
            crop = F.pad(crop, pad)
        if (h, w) == tuple(size):
            out[i] = crop[0]
            continue
        resized = F.interpolate(
            crop if native else crop.float(),
            size=list(size),
            mode=mode,
            align_corners=False if smooth else None,
            antialias=antialias and smooth,
        )
        out[i] = resized[0]
    return out


def _output_size(size: Sequence[int] | int, box: torch.Tensor) -> tuple[int, int]:
    """[height, width], or torchvision's rule for one int (or [s]): the crop's shorter side becomes s
    and the longer keeps the aspect ratio, int(s * long / short). box: (N, 4) float64."""
    sizes = [size] if isinstance(size, numbers.Integral) else size
    if not isinstance(sizes, Sequence) or not all(isinstance(s, numbers.Integral) for s in sizes):
        raise TypeError(f"size must be an int or a sequence of ints, got {size!r}")
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ValueError(f"size must be a positive int or [height, width], got {size!r}")
    if len(sizes) == 2:
        return int(sizes[0]), int(sizes[1])
    outputs = {_shorter_side_size(int(h), int(w), int(sizes[0])) for h, w in box[:, 2:].tolist()}
    if len(outputs) > 1:
        raise ValueError(
            f"size={size!r} keeps each crop's aspect ratio, so these boxes give different output sizes "
            f"{sorted(outputs)}; pass [height, width] for per-image boxes"
        )
    return outputs.pop() if outputs else (int(sizes[0]), int(sizes[0]))


def _shorter_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    long_side = int(short * max(height, width) / min(height, width))
    return (long_side, short) if width <= height else (short, long_side)


@image_op(channels=None)
def resized_crop(
    image: torch.Tensor,
    top: Param,
    left: Param,
    height: Param,
    width: Param,
    size: Sequence[int] | int,
    interpolation: InterpolationMode | str | int = "bilinear",
    antialias: bool | None = True,
) -> torch.Tensor:
    """Crop [top, top + height) x [left, left + width) of each image and resize it to `size`.

    Boxes are integers (height, width >= 1), one for the batch or (N,) each; parts outside the image
    read as 0. size: [height, width], or one int s (or [s]): the crop's shorter side becomes s,
    torchvision's rule (per-image boxes must then agree on the output size). interpolation:
    nearest, nearest-exact, bilinear (default) or bicubic; antialias None means False, as
    torchvision. image (..., C, H, W) uint8/float, any number of channels.
    """
    mode = interpolation_name(interpolation, RESIZE_MODES)
    parts = [
        per_image(value, name, image, integer=True, low=low).reshape(-1)
        for value, name, low in ((top, "top", None), (left, "left", None), (height, "height", 1), (width, "width", 1))
    ]
    box = torch.stack(torch.broadcast_tensors(*parts), dim=-1).expand(image.shape[0], 4)
    out_size = _output_size(size, box)
    largest = box[:, 2:].amax(0).long().tolist() if box.numel() else [1, 1]
    return _resized_crop(
        image, box, out_size, nearest=mode == "nearest", antialias=bool(antialias), mode=mode, max_box=tuple(largest)
    )
