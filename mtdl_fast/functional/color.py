"""Colour ops with torchvision.transforms.v2.functional's names and numerics, parameters per image.

Each public op validates its arguments and calls a private `_op(image, param)` on the (N, C, H, W)
batch with the parameter already shaped (N, 1, 1, 1); `mtdl_fast.ops` calls the private ones
directly, so a training step pays no validation (and no host synchronisation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtdl_fast.functional._utils import (
    BIT_DTYPES,
    Param,
    TypeOrValueError,
    blend,
    cast_like,
    compute_dtype,
    from_float,
    grayscale,
    image_op,
    max_value,
    per_image,
    to_float,
    value_bits,
)


def _brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    out = (image.to(compute_dtype(image)) * factor.to(compute_dtype(image))).clamp_(0, max_value(image.dtype))
    return cast_like(out, image, round_=False)


@image_op()
def adjust_brightness(image: torch.Tensor, brightness_factor: Param) -> torch.Tensor:
    """clamp(image * brightness_factor, 0, max). image (..., C, H, W), C in {1, 3}, uint8/float;
    factor >= 0, a number or one per image (N,)."""
    return _brightness(image, per_image(brightness_factor, "brightness_factor", image, low=0.0))


def _saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 1:  # torchvision (after PIL): a gray image has no saturation to change
        return image.clone()
    gray = grayscale(image)
    if not image.is_floating_point():
        gray = gray.floor_()
    return cast_like(blend(image, gray, factor, max_value(image.dtype)), image, round_=False)


@image_op()
def adjust_saturation(image: torch.Tensor, saturation_factor: Param) -> torch.Tensor:
    """blend(image, gray(image), factor); 1-channel images unchanged. factor >= 0, number or (N,)."""
    return _saturation(image, per_image(saturation_factor, "saturation_factor", image, low=0.0))


def _contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(image)
    if not image.is_floating_point() and image.shape[-3] == 3:
        gray = gray.floor_()
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return cast_like(blend(image, mean, factor, max_value(image.dtype)), image, round_=False)


@image_op()
def adjust_contrast(image: torch.Tensor, contrast_factor: Param) -> torch.Tensor:
    """blend(image, mean of gray(image) over each whole image, factor). factor >= 0, number or (N,)."""
    return _contrast(image, per_image(contrast_factor, "contrast_factor", image, low=0.0))


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    # Pillow's conversion (as torchvision uses it); divisions guarded where max == min.
    r, g, b = rgb.unbind(dim=-3)
    minc, maxc = torch.aminmax(rgb, dim=-3)
    flat = maxc == minc
    spread = maxc - minc
    s = spread / torch.where(flat, 1.0, maxc)
    divisor = torch.where(flat, 1.0, spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h * (1.0 / 6.0) + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    # Sector by sector as Pillow/torchvision: with sector i = floor(6h) mod 6, f = 6h - floor(6h),
    # p = v(1 - s), q = v(1 - sf), t = v(1 - s + sf), each clamped to [0, 1]:
    #   r = v, q, p, p, t, v    g = t, v, v, q, p, p    b = p, p, t, v, v, q   (i = 0..5)
    # chosen with comparisons instead of an int64 index table (a third of the memory traffic).
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    floor = torch.floor(h6)
    frac = h6 - floor
    sector = floor.remainder(6.0)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * frac) * v).clamp(0.0, 1.0)
    t = ((s * frac + (1.0 - s)) * v).clamp(0.0, 1.0)
    lt1, lt2, lt3, lt4, lt5 = (sector < k for k in (1.0, 2.0, 3.0, 4.0, 5.0))
    r = torch.where(lt1, v, torch.where(lt2, q, torch.where(lt4, p, torch.where(lt5, t, v))))
    g = torch.where(lt1, t, torch.where(lt3, v, torch.where(lt4, q, p)))
    b = torch.where(lt2, p, torch.where(lt3, t, torch.where(lt5, v, q)))
    return torch.stack((r, g, b), dim=-3)


def _hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 1 or image.numel() == 0:
        return image.clone()
    hsv = _rgb_to_hsv(to_float(image).to(torch.float32))
    h, s, v = hsv.unbind(dim=-3)
    h = (h + factor.to(h.dtype).squeeze(-3)).remainder(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return from_float(rgb, image.dtype)


@image_op()
def adjust_hue(image: torch.Tensor, hue_factor: Param) -> torch.Tensor:
    """Shift the HSV hue by hue_factor in [-0.5, 0.5] (number or (N,)); 1-channel images unchanged."""
    return _hue(image, per_image(hue_factor, "hue_factor", image, low=-0.5, high=0.5))


@image_op()
def rgb_to_grayscale(image: torch.Tensor, num_output_channels: int = 1) -> torch.Tensor:
    """0.2989 R + 0.587 G + 0.114 B, in the image's dtype (uint8 truncated), 1 or 3 output channels."""
    if num_output_channels not in (1, 3):
        raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels!r}")
    gray = grayscale(image).to(image.dtype)
    return gray.expand(*image.shape[:-3], num_output_channels, *image.shape[-2:]).clone()


def _invert(image: torch.Tensor) -> torch.Tensor:
    if image.is_floating_point():
        return 1.0 - image
    if image.dtype == torch.uint8:
        return image.bitwise_not()
    # signed (and uint16) integers: flip the value bits only, as torchvision (the sign bit stays)
    return image.bitwise_xor((1 << value_bits(image.dtype)) - 1)


@image_op(channels=None, dtypes=BIT_DTYPES)
def invert(image: torch.Tensor) -> torch.Tensor:
    """max - image: 1 - x for float, bitwise not for uint8, the value bits flipped for int8/16/32/64 and
    uint16. Any number of channels."""
    return _invert(image)


def _solarize(image: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(image >= threshold.to(compute_dtype(image)), _invert(image), image)


# torch implements no comparison for uint16 (torchvision's solarize fails there too)
_SOLARIZE_DTYPES = BIT_DTYPES - {torch.uint16}


@image_op(channels=None, dtypes=_SOLARIZE_DTYPES)
def solarize(image: torch.Tensor, threshold: Param) -> torch.Tensor:
    """Invert the pixels >= threshold (in the image's value range, at most its maximum), number or (N,)."""
    limit = max_value(image.dtype)
    return _solarize(image, per_image(threshold, "threshold", image, high=limit, range_error=TypeOrValueError))


def _posterize(image: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    if image.is_floating_point():
        levels = torch.exp2(bits).to(image.dtype)
        return (image * levels).floor_().clamp_(min=0).minimum(levels - 1).mul_(1.0 / levels)
    bits = bits.to(torch.int64)
    total = value_bits(image.dtype)
    kept = torch.bitwise_left_shift(torch.bitwise_left_shift(torch.ones_like(bits), bits) - 1, total - bits)
    # bits >= the value bits keeps the image as it is (torchvision returns it unchanged)
    mask = torch.where(bits >= total, torch.full_like(bits, -1), kept)
    return image & mask.to(image.dtype)


@image_op(channels=None, dtypes=BIT_DTYPES)
def posterize(image: torch.Tensor, bits: Param) -> torch.Tensor:
    """Keep the `bits` most significant value bits (an integer in 0..8, or an (N,) integer tensor)."""
    return _posterize(image, per_image(bits, "bits", image, low=0, high=8, integer=True, range_error=TypeOrValueError))


_SHARPEN = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def _sharpness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    height, width = image.shape[-2:]
    if image.numel() == 0 or height <= 2 or width <= 2:
        return image.clone()
    dtype = compute_dtype(image)
    channels = image.shape[-3]
    flat = image.reshape(-1, channels, height, width).to(dtype)
    kernel = _SHARPEN.to(device=image.device, dtype=dtype).expand(channels, 1, 3, 3)
    blurred = F.conv2d(flat, kernel, groups=channels)
    if not image.is_floating_point():
        blurred = blurred.round_()
    out = flat.clone()
    interior = out[..., 1:-1, 1:-1]
    factor = factor.to(dtype).reshape(-1, 1, 1, 1)
    interior.add_((blurred - interior) * (1.0 - factor))
    out = out.clamp_(0, max_value(image.dtype)).reshape(image.shape)
    return cast_like(out, image, round_=False)


@image_op()
def adjust_sharpness(image: torch.Tensor, sharpness_factor: Param) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy ([[1,1,1],[1,5,1],[1,1,1]]/13); borders unchanged. factor >= 0,
    number or (N,)."""
    return _sharpness(image, per_image(sharpness_factor, "sharpness_factor", image, low=0.0))
