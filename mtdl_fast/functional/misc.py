"""Filters, noise, erasing and normalisation with torchvision's names and numerics, parameters per image."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mtdl_fast.functional._utils import Param, cast_like, check_image, compute_dtype, per_image


def gaussian_kernel1d(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian taps for each sigma: (B,) -> (B, kernel_size), torchvision's formula."""
    lim = (kernel_size - 1) / (2.0 * 2.0**0.5)
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(-(x / sigma[:, None]).pow(2), dim=-1)


def _blur(image: torch.Tensor, kernel_size: tuple[int, int], sigma: torch.Tensor) -> torch.Tensor:
    """image (B, C, H, W); sigma (B, 2) or (1, 2) as (x, y) -> blurred, reflect padding."""
    if image.numel() == 0:
        return image.clone()
    batch, channels, height, width = image.shape
    dtype = compute_dtype(image)
    sigma = sigma.to(dtype).expand(batch, 2)
    kx = gaussian_kernel1d(kernel_size[0], sigma[:, 0])
    ky = gaussian_kernel1d(kernel_size[1], sigma[:, 1])
    kernel2d = ky[:, :, None] * kx[:, None, :]  # (B, ky, kx), outer product as torchvision
    weight = kernel2d.repeat_interleave(channels, dim=0).unsqueeze(1)  # one filter per (image, channel)
    pad = [kernel_size[0] // 2, kernel_size[0] // 2, kernel_size[1] // 2, kernel_size[1] // 2]
    padded = F.pad(image.to(dtype).reshape(1, batch * channels, height, width), pad, mode="reflect")
    out = F.conv2d(padded, weight, groups=batch * channels).reshape(batch, channels, height, width)
    return cast_like(out, image, round_=True)


def gaussian_blur(
    image: torch.Tensor, kernel_size: int | Sequence[int], sigma: Param | Sequence[float] | None = None
) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding.

    kernel_size: odd int or [width, height], shared by the batch; sigma: number, [sx, sy], (B,) or
    (B, 2) per image, default 0.15 * k + 0.35. image (B, C, H, W) uint8/float.
    """
    check_image(image)
    sizes = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(sizes) != 2 or any(not isinstance(k, int) or k <= 0 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_size must be odd positive integers, got {kernel_size!r}")
    if sigma is None:
        sigma = [k * 0.15 + 0.35 for k in sizes]
    batch_image = image.reshape(-1, *image.shape[-3:])
    sigmas = per_image(sigma, "sigma", batch_image, width=2, low=1e-12, repeat=True)
    # kernel_size is [width, height]; reflect padding needs each half-kernel below its own axis.
    if (sizes[0] // 2 >= batch_image.shape[-1] or sizes[1] // 2 >= batch_image.shape[-2]) and batch_image.numel() > 0:
        raise ValueError(
            f"kernel_size {list(sizes)} needs images larger than half the kernel for reflect padding, "
            f"got image size {list(batch_image.shape[-2:])}"
        )
    return _blur(batch_image, sizes, sigmas).reshape(image.shape)


def _noise(
    image: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, clip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    randn = torch.randn(image.shape, generator=generator, device=image.device, dtype=torch.float32)
    if image.is_floating_point():
        out = image + (mean.to(image.dtype) + randn.to(image.dtype) * sigma.to(image.dtype))
        return out.clamp(0, 1) if clip else out
    noise = (mean.float() * 255 + randn * (sigma.float() * 255)).to(torch.int16)
    out = image + noise
    return (out.clamp(0, 255) if clip else out).to(torch.uint8)


def gaussian_noise(
    image: torch.Tensor,
    mean: Param = 0.0,
    sigma: Param = 0.1,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """image + mean + sigma * N(0, 1), clamped to the value range when `clip`.

    mean, sigma: numbers or (B,), in [0, 1] units for both dtypes (uint8 noise is scaled by 255 and
    truncated, as torchvision). `generator` makes the draw reproducible.
    """
    check_image(image)
    return _noise(
        image, per_image(mean, "mean", image), per_image(sigma, "sigma", image, low=0.0), clip, generator
    )


def _erase(image: torch.Tensor, box: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """box (B, 4) = top, left, height, width; value broadcastable to (B, C, 1, 1)."""
    height, width = image.shape[-2:]
    top, left, h, w = (t.reshape(-1, 1, 1, 1) for t in box.unbind(-1))
    rows = torch.arange(height, device=image.device).reshape(1, 1, -1, 1)
    cols = torch.arange(width, device=image.device).reshape(1, 1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return torch.where(inside, value.to(image.dtype), image)


def erase(
    image: torch.Tensor,
    i: Param,
    j: Param,
    h: Param,
    w: Param,
    v: float | torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """Set the box rows [i, i + h), columns [j, j + w) of each image to `v`.

    i, j, h, w: ints or (B,) integer tensors; v: a number or a tensor broadcastable to (B, C, 1, 1).
    """
    check_image(image)
    batch_image = image if image.ndim == 4 else image.reshape(-1, *image.shape[-3:])
    parts = [
        per_image(p, n, batch_image, integer=True, low=low).reshape(-1)
        for p, n, low in ((i, "i", None), (j, "j", None), (h, "h", 0), (w, "w", 0))
    ]
    batch = batch_image.shape[0]
    box = torch.stack([p.expand(batch) if p.shape[0] == 1 else p for p in parts], dim=-1)
    value = torch.as_tensor(v, device=image.device)
    # torchvision's v broadcasts against one image (C, h, w); a 4-D v adds the batch dimension.
    value = value.reshape((1,) * (4 - value.ndim) + tuple(value.shape)) if value.ndim < 4 else value
    if value.ndim != 4 or value.shape[-2:] != (1, 1) or value.shape[0] not in (1, batch) or value.shape[1] not in (1, image.shape[-3]):
        raise ValueError(f"v must broadcast to (B, C, 1, 1), got shape {tuple(torch.as_tensor(v).shape)}")
    out = _erase(batch_image, box, value).reshape(image.shape)
    if inplace:
        image.copy_(out)
        return image
    return out


def normalize(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False
) -> torch.Tensor:
    """(image - mean[c]) / std[c] for a floating image (..., C, H, W)."""
    check_image(image)
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point for normalize, got dtype {image.dtype}")
    channels = image.shape[-3]
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    if mean_t.shape[0] not in (1, channels) or std_t.shape[0] not in (1, channels):
        raise ValueError(f"mean and std need 1 or {channels} values, got mean={list(mean)} std={list(std)}")
    if bool((std_t == 0).any()):
        raise ValueError(f"std must not contain zeros, got {list(std)}")
    out = image.sub_(mean_t) if inplace else image - mean_t
    return out.div_(std_t)


