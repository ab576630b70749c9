"""Colour ops with torchvision.transforms.v2.functional's names and numerics, parameters per image.

Each public op validates its arguments and calls a private `_op(image, param)` that takes the
parameter already shaped (B, 1, 1, 1); `mtdl_fast.tasks` calls the private ones directly, so a
training step pays no validation (and no host synchronisation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtdl_fast.functional._utils import (
    Param,
    blend,
    cast_like,
    check_image,
    compute_dtype,
    from_float,
    grayscale,
    max_value,
    per_image,
    to_float,
)


def _brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    out = (image.to(compute_dtype(image)) * factor.to(compute_dtype(image))).clamp_(0, max_value(image.dtype))
    return cast_like(out, image, round_=False)


def adjust_brightness(image: torch.Tensor, brightness_factor: Param) -> torch.Tensor:
    """clamp(image * brightness_factor, 0, max). image (..., C, H, W) uint8/float; factor >= 0, number or (B,)."""
    check_image(image)
    return _brightness(image, per_image(brightness_factor, "brightness_factor", image, low=0.0))


def _saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 1:  # torchvision (after PIL): a gray image has no saturation to change
        return image.clone()
    gray = grayscale(image)
    if not image.is_floating_point():
        gray = gray.floor_()
    return cast_like(blend(image, gray, factor, max_value(image.dtype)), image, round_=False)


def adjust_saturation(image: torch.Tensor, saturation_factor: Param) -> torch.Tensor:
    """blend(image, gray(image), factor); 1-channel images unchanged. factor >= 0, number or (B,)."""
    check_image(image)
    return _saturation(image, per_image(saturation_factor, "saturation_factor", image, low=0.0))


def _contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(image)
    if not image.is_floating_point() and image.shape[-3] == 3:
        gray = gray.floor_()
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return cast_like(blend(image, mean, factor, max_value(image.dtype)), image, round_=False)


def adjust_contrast(image: torch.Tensor, contrast_factor: Param) -> torch.Tensor:
    """blend(image, mean of gray(image) over each whole image, factor). factor >= 0, number or (B,)."""
    check_image(image)
    return _contrast(image, per_image(contrast_factor, "contrast_factor", image, low=0.0))


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    # Pillow's conversion (as torchvision uses it); divisions guarded where max == min.
    r, g, b = rgb.unbind(dim=-3)
    minc, maxc = torch.aminmax(rgb, dim=-3)
    flat = maxc == minc
    spread = maxc - minc
    s = spread / torch.where(flat, torch.ones_like(maxc), maxc)
    divisor = torch.where(flat, torch.ones_like(spread), spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h * (1.0 / 6.0) + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.to(torch.int64).remainder(6)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * frac) * v).clamp(0.0, 1.0)
    t = ((s * frac + (1.0 - s)) * v).clamp(0.0, 1.0)
    # For hue sectors 0..5, which of (v, p, q, t) each of r, g, b takes.
    choices = torch.stack((v, p, q, t), dim=-3)
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hsv.device)
    index = table[:, sector].movedim(0, -3)
    return choices.gather(-3, index)


def _hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 1 or image.numel() == 0:
        return image.clone()
    hsv = _rgb_to_hsv(to_float(image).to(torch.float32))
    h, s, v = hsv.unbind(dim=-3)
    h = (h + factor.to(h.dtype).squeeze(-3)).remainder(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return from_float(rgb, image.dtype)


def adjust_hue(image: torch.Tensor, hue_factor: Param) -> torch.Tensor:
    """Shift the HSV hue by hue_factor in [-0.5, 0.5] (number or (B,)); 1-channel images unchanged."""
    check_image(image)
    return _hue(image, per_image(hue_factor, "hue_factor", image, low=-0.5, high=0.5))


def rgb_to_grayscale(image: torch.Tensor, num_output_channels: int = 1) -> torch.Tensor:
    """0.2989 R + 0.587 G + 0.114 B, in the image's dtype (uint8 truncated), 1 or 3 output channels."""
    check_image(image)
    if num_output_channels not in (1, 3):
        raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels}")
    gray = grayscale(image).to(image.dtype)
    return gray.expand(*image.shape[:-3], num_output_channels, *image.shape[-2:]).clone()


def _invert(image: torch.Tensor) -> torch.Tensor:
    return image.bitwise_not() if image.dtype == torch.uint8 else 1.0 - image


def invert(image: torch.Tensor) -> torch.Tensor:
    """max - image: 1 - x for float, bitwise not for uint8."""
    check_image(image)
    return _invert(image)


def _solarize(image: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(image >= threshold.to(compute_dtype(image)), _invert(image), image)


def solarize(image: torch.Tensor, threshold: Param) -> torch.Tensor:
    """Invert the pixels >= threshold (in the image's value range), number or (B,)."""
    check_image(image)
    return _solarize(image, per_image(threshold, "threshold", image, high=max_value(image.dtype)))


def _posterize(image: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    if image.is_floating_point():
        levels = torch.exp2(bits).to(image.dtype)
        return (image * levels).floor_().clamp_(min=0).minimum(levels - 1).mul_(1.0 / levels)
    bits = bits.to(torch.int64)
    mask = torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits) & 255
    return image & mask.to(torch.uint8)


def posterize(image: torch.Tensor, bits: Param) -> torch.Tensor:
    """Keep the `bits` most significant bits (0..8, int or (B,) integer tensor)."""
    check_image(image)
    return _posterize(image, per_image(bits, "bits", image, low=0, high=8, integer=True))


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


def adjust_sharpness(image: torch.Tensor, sharpness_factor: Param) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy ([[1,1,1],[1,5,1],[1,1,1]]/13); borders unchanged. factor >= 0."""
    check_image(image)
    return _sharpness(image, per_image(sharpness_factor, "sharpness_factor", image, low=0.0))
