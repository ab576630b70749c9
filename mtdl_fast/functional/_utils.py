"""Helpers shared by the functional ops: argument checks, per-image parameters, dtype rules.

Every op accepts a parameter either as a Python number (one value for the batch, exactly
torchvision's call) or as a tensor with one value per image. `per_image` turns both into a tensor
that broadcasts against (B, C, H, W), so each op has one code path.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Union

import torch

Param = Union[float, int, torch.Tensor]


def check_image(image: torch.Tensor, name: str = "image") -> None:
    """Raise ValueError unless `image` is a (..., C, H, W) uint8 or floating tensor with C in {1, 3}."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim < 3:
        raise ValueError(f"{name} must have shape (..., C, H, W), got shape {tuple(image.shape)}")
    if image.shape[-3] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (dim -3), got C={image.shape[-3]}")
    if not (image.dtype == torch.uint8 or image.is_floating_point()):
        raise ValueError(f"{name} must be uint8 or floating point, got dtype {image.dtype}")


def max_value(dtype: torch.dtype) -> float:
    """The value of a fully saturated pixel: 255 for uint8, 1.0 for floating images."""
    return 255.0 if dtype == torch.uint8 else 1.0


def compute_dtype(image: torch.Tensor) -> torch.dtype:
    """The dtype the arithmetic of an op runs in: the image's own float dtype, else float32."""
    return image.dtype if image.is_floating_point() else torch.float32


def per_image(
    value: Param,
    name: str,
    image: torch.Tensor,
    *,
    width: int = 1,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    repeat: bool = False,
) -> torch.Tensor:
    """A parameter as a tensor on `image`'s device that broadcasts against (B, C, H, W).

    Args:
        value: a number (shared by the batch) or a tensor of shape (B,) or, when `width` > 1,
            (B, width); with `width` > 1 a (B,) tensor or a number fills the first component and
            zeros the rest (shear: x only), or every component when `repeat` (sigma).
        name: the argument's name, for error messages.
        image: the (B, C, H, W) batch the parameter belongs to.
        width: number of components (2 for translate, shear, sigma).
        low, high: inclusive bounds every value must satisfy.
        integer: require integral values (posterize bits, crop boxes).

    Returns:
        float64 tensor of shape (B, 1, 1, 1) for width 1, or (B, width) otherwise; for a number,
        a tensor of shape (1, 1, 1, 1) / (1, width) so it broadcasts over any batch.
    """
    if isinstance(value, torch.Tensor):
        if image.ndim != 4:
            raise ValueError(
                f"{name} is a per-image tensor, so image must be 4-D (B, C, H, W); got shape {tuple(image.shape)}"
            )
        batch = image.shape[0]
        t = value.detach().to(device=image.device, dtype=torch.float64)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim == 1 and width > 1:
            rest = t if repeat else torch.zeros_like(t)
            t = torch.stack([t] + [rest] * (width - 1), dim=1)
        expected = (batch,) if width == 1 else (batch, width)
        if tuple(t.shape) not in (expected, (1,) + expected[1:]):
            raise ValueError(f"{name} must hold one value per image, shape {expected}; got shape {tuple(value.shape)}")
    elif isinstance(value, numbers.Number) and not isinstance(value, bool):
        comps = [float(value)] + [float(value) if repeat else 0.0] * (width - 1)
        t = torch.tensor([comps] if width > 1 else comps, dtype=torch.float64, device=image.device)
    elif isinstance(value, Sequence) and width > 1 and len(value) in (1, width):
        comps = [float(v) for v in value] * (width if len(value) == 1 else 1)
        t = torch.tensor([comps], dtype=torch.float64, device=image.device)
    else:
        raise ValueError(f"{name} must be a number or a per-image tensor, got {value!r}")
    _check_range(t, name, low, high, integer)
    return t.reshape(-1, 1, 1, 1) if width == 1 else t


def _check_range(t: torch.Tensor, name: str, low: float | None, high: float | None, integer: bool) -> None:
    if t.numel() == 0:
        return
    bad = torch.isnan(t)
    if low is not None:
        bad |= t < low
    if high is not None:
        bad |= t > high
    if integer:
        bad |= t != torch.round(t)
    if bool(bad.any()):
        offending = t[bad].flatten()[0].item()
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        kind = "an integer in " if integer else "in "
        raise ValueError(f"{name} must be {kind}{bounds}, got {offending}")


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
