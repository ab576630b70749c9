"""Filters, noise, erasing and normalisation with torchvision's names and numerics, parameters per image."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mtdl_fast.functional._utils import (
    FLOAT_DTYPES,
    Param,
    as_batch,
    cast_like,
    check_image,
    compute_dtype,
    image_op,
    per_image,
    rewrap,
    unwrap,
)


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


def _kernel_sizes(kernel_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
        if len(kernel_size) != 2:
            raise ValueError(f"kernel_size must be one int or [width, height], got {kernel_size!r}")
        sizes = tuple(kernel_size)
    else:
        sizes = (kernel_size, kernel_size)
    if not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in sizes):
        raise TypeError(f"kernel_size must hold integers, got {kernel_size!r}")
    if any(k <= 0 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_size must be odd positive integers, got {kernel_size!r}")
    return int(sizes[0]), int(sizes[1])


@image_op(channels=None)
def gaussian_blur(
    image: torch.Tensor, kernel_size: int | Sequence[int], sigma: Param | Sequence[float] | None = None
) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding.

    kernel_size: odd int or [width, height], shared by the batch; sigma: number, [sx, sy], (N,) or
    (N, 2) per image, default 0.15 * k + 0.35, every value > 0. image (..., C, H, W) uint8/float,
    any number of channels.
    """
    sizes = _kernel_sizes(kernel_size)
    if sigma is None:
        sigma = [k * 0.15 + 0.35 for k in sizes]
    sigmas = per_image(sigma, "sigma", image, width=2, repeat=True)
    if bool((sigmas <= 0).any()):
        raise ValueError(f"sigma must be positive, got {sigmas[sigmas <= 0].flatten()[0].item()}")
    # kernel_size is [width, height]; reflect padding needs each half-kernel below its own axis.
    if (sizes[0] // 2 >= image.shape[-1] or sizes[1] // 2 >= image.shape[-2]) and image.numel() > 0:
        raise ValueError(
            f"kernel_size {list(sizes)} needs images larger than half the kernel for reflect padding, "
            f"got image size {list(image.shape[-2:])}"
        )
    return _blur(image, sizes, sigmas)


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


@image_op(channels=None)
def gaussian_noise(
    image: torch.Tensor,
    mean: Param = 0.0,
    sigma: Param = 0.1,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """image + mean + sigma * N(0, 1), clamped to the value range when `clip`.

    mean, sigma: numbers or (N,), in [0, 1] units for both dtypes (uint8 noise is scaled by 255 and
    truncated, as torchvision). `generator` makes the draw reproducible.
    """
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


def _slice_bounds(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[first, stop) that Python slicing selects for [start : start + length] on an axis of `size`
    (a negative bound counts from the end), as torchvision's `image[..., i:i + h, j:j + w]`."""
    stop = start + length

    def resolve(bound: torch.Tensor) -> torch.Tensor:
        return torch.where(bound < 0, bound + size, bound).clamp(0, size)

    first = resolve(start)
    return first, torch.maximum(resolve(stop), first)


def _erase_value(v: float | torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """`v` as a tensor on the image's device that broadcasts against the erased region (..., C, h, w)."""
    if isinstance(v, torch.Tensor):
        return v.to(image.device)
    if isinstance(v, numbers.Real):
        return torch.tensor(v, device=image.device)
    raise TypeError(f"v must be a number or a tensor, got {type(v)}")


def _broadcast_value(value: torch.Tensor, region: tuple[int, ...]) -> torch.Tensor:
    """`value` broadcast against the erased region (..., C, h, w) (torchvision's assignment rule),
    flattened to (N, C, h, w)."""
    try:
        return as_batch(value.expand(region))
    except RuntimeError:
        raise ValueError(
            f"v must broadcast against the erased region {region} (..., C, h, w), got shape {tuple(value.shape)}"
        ) from None


def _erase_pixels(image: torch.Tensor, first: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Erase the boxes starting at `first` ((N, 2): row, column) of the (N, C, H, W) batch with
    per-pixel values (N, C, h, w)."""
    batch, channels, height, width = image.shape
    box_h, box_w = value.shape[-2:]
    rows = torch.arange(height, device=image.device).reshape(1, 1, -1, 1) - first[:, 0].reshape(-1, 1, 1, 1)
    cols = torch.arange(width, device=image.device).reshape(1, 1, 1, -1) - first[:, 1].reshape(-1, 1, 1, 1)
    by_row = value.gather(2, rows.clamp(0, box_h - 1).expand(batch, channels, height, box_w))
    placed = by_row.gather(3, cols.clamp(0, box_w - 1).expand(batch, channels, height, width))
    inside = (rows >= 0) & (rows < box_h) & (cols >= 0) & (cols < box_w)
    return torch.where(inside, placed.to(image.dtype), image)


def erase(
    image: torch.Tensor,
    i: Param,
    j: Param,
    h: Param,
    w: Param,
    v: float | torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """Set rows [i, i + h), columns [j, j + w) of each image to `v`, torchvision's
    `image[..., i:i + h, j:j + w] = v` (Python slicing: a negative i or j counts from the end).

    image: (..., C, H, W) of any dtype and channel count. i, j, h, w: ints or (N,) integer tensors
    (h, w >= 0). v: a number or a tensor that broadcasts against the erased region (..., C, h, w),
    e.g. (C, 1, 1), one value per image (N, C, 1, 1), or per pixel (C, h, w) (RandomErasing's
    value="random"; needs every box to have that size inside the image).
    """
    plain = unwrap(image)
    check_image(plain, channels=None, dtypes=None)
    batch_image = as_batch(plain)
    batch, height, width = batch_image.shape[0], batch_image.shape[-2], batch_image.shape[-1]
    i_, j_ = (per_image(p, n, plain, integer=True).reshape(-1).long() for p, n in ((i, "i"), (j, "j")))
    h_, w_ = (per_image(p, n, plain, integer=True, low=0).reshape(-1).long() for p, n in ((h, "h"), (w, "w")))
    row_first, row_stop = _slice_bounds(i_, h_, height)
    col_first, col_stop = _slice_bounds(j_, w_, width)
    first = torch.stack(torch.broadcast_tensors(row_first, col_first), -1).expand(batch, 2)
    stop = torch.stack(torch.broadcast_tensors(row_stop, col_stop), -1).expand(batch, 2)
    value = _erase_value(v, plain)
    sizes = stop - first
    if all(s == 1 for s in value.shape[-2:]) or batch == 0:
        out = _erase(batch_image, torch.cat((first, sizes), -1), _broadcast_value(value, (*plain.shape[:-2], 1, 1)))
    else:  # values per pixel: every box must have one size for v to broadcast against it
        box_size = sizes[0].tolist()
        if not bool((sizes == sizes[0]).all()):
            raise ValueError(f"a per-pixel v needs every erased box of one size, got sizes {sizes.tolist()}")
        out = _erase_pixels(batch_image, first, _broadcast_value(value, (*plain.shape[:-2], *box_size)))
    out = out.reshape(plain.shape)
    if inplace:
        plain.copy_(out)
        return image
    return rewrap(out, image)


def _channel_statistic(value: float | Sequence[float] | torch.Tensor, name: str, image: torch.Tensor) -> torch.Tensor:
    """mean / std as a tensor that broadcasts against (..., C, H, W): one value or one per channel."""
    try:
        t = torch.as_tensor(value, dtype=image.dtype, device=image.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
    t = t.reshape(-1, 1, 1) if t.ndim == 1 else t
    try:
        torch.broadcast_shapes(t.shape, image.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} must hold one value or one per channel ({image.shape[-3]}), got {value!r}"
        ) from None
    return t


def normalize(
    image: torch.Tensor,
    mean: float | Sequence[float] | torch.Tensor,
    std: float | Sequence[float] | torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """(image - mean[c]) / std[c] for a floating image (..., C, H, W); mean and std one number or one
    per channel, std without zeros. `inplace` writes into `image`."""
    plain = unwrap(image)
    check_image(plain, channels=None, dtypes=FLOAT_DTYPES)
    mean_t = _channel_statistic(mean, "mean", plain)
    std_t = _channel_statistic(std, "std", plain)
    if bool((std_t == 0).any()):
        raise ValueError(f"std must not contain zeros (division by zero), got {std!r}")
    out = plain.sub_(mean_t) if inplace else plain - mean_t
    out = out.div_(std_t)
    return image if inplace else rewrap(out, image)
