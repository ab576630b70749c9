"""Batched crop-and-resize with torch's CPU interpolation numerics, one set of boxes per call.

`torch.nn.functional.interpolate` (what torchvision's resize runs) is separable: the width is
resampled first, then the height, each output sample a short weighted sum of input samples. Here
the indices and weights of every output sample are computed for all images at once, with the
arithmetic of torch's CPU kernels (float32 weights from float64 intermediates where the C++ code
promotes, fused multiply-adds where its compiled code has them), and each pass is one
`embedding_bag`, whose per-sample-weighted sums are the same chain of fused multiply-adds: a batch
of crops of different sizes is resized without a loop over images.

Modes and dtypes follow torch's CPU paths:
- nearest, nearest-exact: an index per output sample.
- bilinear, bicubic with antialias (torchvision's default): the antialiased separable kernel,
  float weights for floating images; uint8 images use torch's native uint8 arithmetic (weights
  in 15-bit fixed point, exact integer sums, a rounding shift) that torchvision selects on CPUs.
- bilinear, bicubic without antialias: torch's two-tap (bilinear) and four-tap Keys cubic
  (a = -0.75, borders clamped) weights; uint8 again in fixed point.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
CHUNK_BYTES = 1 << 20  # images resampled together: about this much input (measured; see resample_crops)
_TAPS = {"bilinear": 2, "bicubic": 4}  # torch's interp_size


def _linear_filter(x: torch.Tensor) -> torch.Tensor:
    """Triangle filter 1 - |x| on (-1, 1), evaluated as torch's float kernels do (1.0 - x in double)."""
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x.double(), 0.0).to(x.dtype)


def _cubic_filter(a: float):
    """Keys cubic convolution kernel with parameter `a` (support 2), as torch's antialiasing filter."""
    near, far = _cubic_pieces(a, fused_last=True)

    def filter_(x: torch.Tensor) -> torch.Tensor:
        x = x.abs()
        return torch.where(x < 1.0, near(x), torch.where(x < 2.0, far(x), torch.zeros_like(x)))

    return filter_


def _keys_coefficients(t: torch.Tensor, a: float) -> torch.Tensor:
    """The four cubic weights (..., 4) at fraction t, evaluated at 1 + t, t, 1 - t, (1 - t) + 1 as torch does."""
    near, far = _cubic_pieces(a, fused_last=False)
    rest = 1.0 - t
    return torch.stack((far(t + 1.0), near(t), near(rest), far(rest + 1.0)), -1)


def _fma(x: torch.Tensor, y: torch.Tensor | float, z: torch.Tensor | float) -> torch.Tensor:
    """x * y + z rounded once (addcmul is a fused multiply-add), as the compiled C++ contracts it."""
    y, z = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (y, z))
    return torch.addcmul(z, x, y)


def _cubic_pieces(a: float, fused_last: bool):
    """Keys' polynomials on [0, 1) and [1, 2) in torch's evaluation order and with the fused
    multiply-adds of its compiled kernels: all of them in the antialiasing filter (`fused_last`),
    all but the last in the four-tap coefficients (both measured against torch's weights)."""

    def near(x: torch.Tensor) -> torch.Tensor:  # ((a + 2) x - (a + 3)) x x + 1
        head = _fma(x, a + 2, -(a + 3)) * x
        return _fma(head, x, 1.0) if fused_last else head * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # ((a x - 5 a) x + 8 a) x - 4 a
        head = _fma(_fma(x, a, -5 * a), x, 8 * a)
        return _fma(head, x, -4 * a) if fused_last else head * x - 4 * a

    return near, far


def _filter(mode: str, antialias: bool):
    # Antialiased bicubic uses a = -0.5 (Pillow's), plain bicubic a = -0.75 (OpenCV's), as torch.
    if mode == "bilinear":
        return _linear_filter
    return _cubic_filter(-0.5 if antialias else -0.75)


def _antialias_taps(length: torch.Tensor, out: int, mode: str, dtype: torch.dtype, longest: int):
    """Source index (N, O, T) and weights (N, O, T) of torch's antialiased kernel.

    length: (N,) int64 input lengths (crop sizes), none above `longest`. Weights are computed in
    `dtype` (float32 for float images, float64 for uint8 images, as torch), with the intermediates
    torch promotes to float64 (C++ arithmetic with the double literal 0.5) promoted here too.
    """
    interp = _TAPS[mode]
    scale = (length.to(dtype) / out).to(dtype)
    upsampling = scale < 1.0
    support = torch.where(upsampling, interp * 0.5, (interp * 0.5) * scale.double()).to(dtype)
    invscale = torch.where(upsampling, 1.0, 1.0 / scale.double()).to(dtype)
    most = torch.ceil(support).long() * 2 + 1  # torch's max_interp_size, per image
    position = torch.arange(out, dtype=torch.float64, device=length.device) + 0.5
    center = (scale.double()[:, None] * position).to(dtype)
    first = ((center - support[:, None]).double() + 0.5).trunc().long().clamp(min=0)
    stop = ((center + support[:, None]).double() + 0.5).trunc().long().minimum(length[:, None])
    count = (stop - first).clamp(min=0).minimum(most[:, None])
    taps = _tap_count(count, out, interp, longest)
    offset = torch.arange(taps, device=length.device)
    index = first[..., None] + offset
    distance = ((index.to(dtype) - center[..., None]).double() + 0.5) * invscale.double()[:, None, None]
    weight = _filter(mode, True)(distance.to(dtype))
    weight = torch.where(offset < count[..., None], weight, 0.0).to(dtype)
    total = weight[..., 0]
    for k in range(1, taps):  # summed in order, as the C++ loop does
        total = total + weight[..., k]
    weight = torch.where(total[..., None] != 0, weight / total[..., None], weight)
    return index.minimum(length[:, None, None] - 1).clamp(min=0), weight


def _tap_count(count: torch.Tensor, out: int, interp: int, longest: int) -> int:
    """Taps per output sample: on the CPU the most any sample uses (read from `count`); elsewhere
    the bound `tap_bound`, so that nothing is read back to the host."""
    if count.device.type == "cpu":
        return max(int(count.max()), 1) if count.numel() else 1
    return tap_bound(out, interp, longest)


def tap_bound(out: int, interp: int, longest: int) -> int:
    """The most taps an antialiased output sample can use for crops no longer than `longest`:
    torch's max_interp_size, 2 * ceil(support) + 1, with one tap to spare for the float rounding of
    the scale when downsampling."""
    if longest <= out:
        return interp + 1
    return 2 * math.ceil(interp * 0.5 * longest / out) + 3


def _source_position(length: torch.Tensor, out: int, dtype: torch.dtype, cubic: bool) -> torch.Tensor:
    """torch's area_pixel_compute_source_index: scale * (i + 0.5) - 0.5 (fused), not below 0 unless cubic."""
    scale = (length.to(dtype) / out).to(dtype)
    position = torch.arange(out, dtype=dtype, device=length.device) + 0.5
    real = torch.addcmul(torch.full_like(position, -0.5), scale[:, None], position)
    return real if cubic else real.clamp(min=0.0)


def _plain_taps(length: torch.Tensor, out: int, mode: str, dtype: torch.dtype):
    """Source index (N, O, T) and weights (N, O, T) of torch's kernels without antialiasing.

    Bilinear: two taps (the second clamped to the last sample), weights 1 - l, l; bicubic: four
    taps around floor(x), indices clamped into the input, Keys weights with a = -0.75. A length
    equal to `out` is the identity (torch copies).
    """
    interp = _TAPS[mode]
    real = _source_position(length, out, dtype, cubic=mode == "bicubic")
    floor = real.floor().long().minimum(length[:, None] - 1)
    frac = (real - floor.to(dtype)).clamp(0.0, 1.0)
    offset = torch.arange(interp, device=length.device)
    if mode == "bilinear":
        index = floor[..., None] + offset
        weight = torch.stack((1.0 - frac, frac), -1)
    else:
        index = floor[..., None] + offset - 1
        weight = _keys_coefficients(frac, -0.75)
        # torch's unrolled four-tap sum fuses its first two products as fma(x0, w0, x1 * w1): as a
        # chain of multiply-adds in tap order that is taps 1, 0, 2, 3 (measured)
        order = torch.tensor([1, 0, 2, 3], device=length.device)
        index, weight = index[..., order], weight[..., order]
    same = (length == out)[:, None, None]
    identity_index = torch.arange(out, device=length.device)[None, :, None].expand_as(index)
    identity_weight = (offset == 0).to(dtype).expand_as(weight)
    index = torch.where(same, identity_index, index)
    weight = torch.where(same, identity_weight, weight)
    return index.clamp(min=0).minimum(length[:, None, None] - 1), weight


def _nearest_index(length: torch.Tensor, out: int, exact: bool) -> torch.Tensor:
    """(N, O, 1) source index of torch's nearest (floor(i * s)) or nearest-exact (floor((i + 0.5) * s))."""
    scale = (length.to(torch.float32) / out).to(torch.float32)
    position = torch.arange(out, dtype=torch.float32, device=length.device) + (0.5 if exact else 0.0)
    index = (scale[:, None] * position).floor().long()
    return index.minimum(length[:, None] - 1)[..., None]


def _fixed_point(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 weights (N, O, T) -> integer weights scaled by 2**precision (held in float64) and the
    precision (N,), torch's uint8 rule: the largest precision <= 22 whose largest weight still fits
    in 15 bits, weights rounded half away from zero."""
    largest = weight.flatten(1).amax(1) if weight.numel() else weight.new_zeros(weight.shape[0])
    precision = torch.zeros_like(largest, dtype=torch.int64)
    for bits in range(22):
        fits = (0.5 + largest * float(1 << (bits + 1))).trunc() < (1 << 15)
        precision = torch.where(fits, torch.full_like(precision, bits + 1), precision)
    scaled = weight * torch.exp2(precision.double())[:, None, None]
    return torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc(), precision


def axis_taps(
    length: torch.Tensor,
    out: int,
    mode: str,
    antialias: bool,
    fixed_point: bool,
    dtype: torch.dtype = torch.float32,
    longest: int | None = None,
):
    """Indices (N, O, T) into each crop axis of `length` (N,) samples, weights (N, O, T) in `dtype`
    (torch computes float32 images' weights in float32, float64 images' in float64) and, for uint8
    images (`fixed_point`), the precision (N,) of their integer weights (held in float64);
    (index, None, None) for the nearest modes. `longest`: no length exceeds it (default: read from
    `length`)."""
    if mode in ("nearest", "nearest-exact"):
        return _nearest_index(length, out, exact=mode == "nearest-exact"), None, None
    dtype = torch.float64 if fixed_point else dtype
    if antialias:
        if longest is None:
            longest = int(length.max()) if length.numel() else 1
        index, weight = _antialias_taps(length, out, mode, dtype, longest)
    elif fixed_point:
        index, weight = _plain_taps_fixed(length, out, mode)
    else:
        index, weight = _plain_taps(length, out, mode, dtype)
    if not fixed_point:
        return index, weight, None
    weight, precision = _fixed_point(weight)
    return index, weight, precision


def _plain_taps_fixed(length: torch.Tensor, out: int, mode: str):
    """torch's uint8 weights without antialiasing (float64): the taps of `_plain_taps`, but the
    weights of taps clamped onto the same border sample are merged before rounding to fixed point."""
    interp = _TAPS[mode]
    real = _source_position(length, out, torch.float64, cubic=mode == "bicubic")
    # torch floors the float64 position through floorf, i.e. after rounding it to float32
    floor = real.float().floor().long().minimum(length[:, None] - 1)
    frac = (real - floor.double()).clamp(0.0, 1.0)
    support = interp // 2
    offset = torch.arange(interp, device=length.device)
    unbounded = floor[..., None] - support + 1 + offset
    first = unbounded[..., :1].clamp(min=0)
    weight = _filter(mode, False)((offset + 1 - support).double() - frac[..., None])
    slot = unbounded.clamp(min=0).minimum(length[:, None, None] - 1) - first
    merged = torch.zeros_like(weight).scatter_add_(-1, slot, weight)
    same = (length == out)[:, None, None]
    identity_first = torch.arange(out, device=length.device)[None, :, None]
    merged = torch.where(same, (offset == 0).double().expand_as(merged), merged)
    index = torch.where(same, identity_first, first) + offset
    return index.minimum(length[:, None, None] - 1), merged


def _resample_rows(image: torch.Tensor, start: torch.Tensor, index: torch.Tensor, weight, precision) -> torch.Tensor:
    """Resample dim -2 of an (N, C, L, M) batch: output row o of image n is the weighted sum over
    taps t of rows start[n] + index[n, o, t] (zero rows outside the image).

    One `embedding_bag` gathers and sums every output row: its per-sample-weighted sum is a chain
    of fused multiply-adds in tap order, the arithmetic of torch's resampling kernels. uint8 images
    (`precision` given) go through float64 with their fixed-point weights (every sum exact) and are
    rounded by the shift and clamped to 0..255, as torch's uint8 kernel; `weight` None: one tap.
    """
    batch, channels, length, width = image.shape
    out_len, taps = index.shape[1:]
    source = start[:, None, None] + index
    inside = (source >= 0) & (source < length)
    first_row = torch.arange(batch * channels, device=image.device).reshape(batch, channels, 1, 1) * length
    rows = first_row + source.clamp(0, max(length - 1, 0))[:, None]
    dtype = torch.float64 if precision is not None else image.dtype
    taps_weight = inside.to(dtype) if weight is None else torch.where(inside, weight.to(dtype), 0.0)
    # flattened first: embedding_bag's fused kernel needs the standard strides, which a size-1 dim may lack
    table = image.to(dtype).reshape(-1).view(batch * channels * length, width)
    per_row = taps_weight[:, None].expand(batch, channels, out_len, taps).reshape(-1, taps)
    out = F.embedding_bag(rows.reshape(-1, taps), table, per_sample_weights=per_row, mode="sum")
    out = out.reshape(batch, channels, out_len, width)
    if precision is None:
        return out
    scale = torch.exp2(precision.double()).reshape(batch, 1, 1, 1)
    return torch.floor((out + scale / 2) / scale).clamp_(0, 255)


def resample_crops(
    image: torch.Tensor,
    box: torch.Tensor,
    size: tuple[int, int],
    mode: str,
    antialias: bool,
    max_box: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Crop box (N, 4) = top, left, height, width (integers, height and width >= 1; parts outside
    the image read as 0) of each image of the (N, C, H, W) batch and resize it to `size`: the width
    first, then the height, as torch.

    max_box: (height, width) no box exceeds; None: the image's (boxes inside the image). It bounds
    the taps without reading the boxes back to the host (CPU boxes are read; a box exceeding it
    there is a ValueError).

    Float32/float64 images are resampled in their dtype, float16/bfloat16 through float32 (as
    torchvision); uint8 images with torch's uint8 arithmetic. Returns (N, C, *size) in the image's dtype.
    """
    batch, channels = image.shape[:2]
    out = image.new_zeros((batch, channels, *size))
    if image.numel() == 0:
        return out
    top, left, height, width = box.to(device=image.device, dtype=torch.int64).unbind(-1)
    longest = max_box or tuple(image.shape[-2:])
    if image.device.type == "cpu" and (bool((height > longest[0]).any()) or bool((width > longest[1]).any())):
        raise ValueError(f"crop boxes larger than max_box={tuple(longest)}: {box[:, 2:].max(0).values.tolist()}")
    fixed_point = not image.is_floating_point() and mode in _TAPS
    work_dtype = image.dtype if image.dtype in (torch.float32, torch.float64) or fixed_point else torch.float32
    columns = axis_taps(width, size[1], mode, antialias, fixed_point, work_dtype, longest[1])
    rows = axis_taps(height, size[0], mode, antialias, fixed_point, work_dtype, longest[0])
    # On the CPU a few images at a time: the temporaries stay in cache and in the allocator's reused
    # memory (whole-batch temporaries of large images cost more in page faults than the arithmetic).
    per_chunk = max(1, CHUNK_BYTES // max(1, image[0].numel() * image.element_size()))
    if image.device.type != "cpu":
        per_chunk = batch  # a device runs the whole batch in one launch per step
    for first in range(0, batch, per_chunk):
        part = slice(first, first + per_chunk)
        work = image[part].to(work_dtype)
        across = _resample_rows(work.transpose(-1, -2), left[part], *_select(columns, part)).transpose(-1, -2)
        out[part] = _resample_rows(across, top[part], *_select(rows, part))
    return out


def _select(taps: tuple, part: slice) -> tuple:
    """The images `part` of (index, weight, precision) taps (None entries stay None)."""
    return tuple(None if t is None else t[part] for t in taps)
