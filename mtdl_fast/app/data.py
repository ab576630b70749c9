"""Small built-in image sources: offline, no downloads.

* :func:`load_digits` -- scikit-learn's bundled handwritten digits, upsampled, with labels.
* :func:`load_sample_photos` -- tiles cut from scikit-learn's two bundled photographs
  (``china.jpg``, ``flower.jpg``): real natural-image statistics for augmentation tests and
  benchmarks.
* :func:`load_cifar10` -- CIFAR-10 from a local torchvision copy (never downloaded here).

Every loader returns uint8 images in [0, 255], shaped (N, C, H, W), on the CPU.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_digits", "load_sample_photos", "load_cifar10"]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float tensor in [0, 255] -> uint8, rounded to nearest and clamped."""
    return x.round().clamp_(0, 255).to(torch.uint8)


def load_digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1797 greyscale 8x8 images of 0..9).

    The 17 grey levels (0..16) are rescaled to [0, 255] and bilinearly resized
    (``align_corners=False``) to ``size`` x ``size``.

    Args:
        size: output side length in pixels (>= 1). 8 returns the original pixels rescaled.

    Returns:
        images: uint8 tensor (1797, 1, size, size), values in [0, 255].
        labels: int64 tensor (1797,), values in 0..9, in scikit-learn's order.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) * (255.0 / 16.0)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return _to_uint8(x), labels


@functools.lru_cache(maxsize=1)
def _sample_images() -> tuple[torch.Tensor, ...]:
    """scikit-learn's sample photographs as uint8 (3, H, W) tensors (cached)."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return tuple(torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
                 for im in bunch.images)


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (3, H, W) image (aspect kept) so its shorter side is at least ``size``."""
    h, w = img.shape[-2:]
    short = min(h, w)
    if short >= size:
        return img
    scale = size / short
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    return _to_uint8(out)


def load_sample_photos(size: int, n: int, seed: int = 0) -> torch.Tensor:
    """Square tiles cut at random positions from scikit-learn's two sample photographs.

    Each tile picks one of the photos (china.jpg, flower.jpg; both 427x640) and a top-left corner
    uniformly at random from a ``torch.Generator`` seeded with ``seed``, so the result depends on
    (size, n, seed) only. When ``size`` exceeds the photo's shorter side the photo is first
    upscaled bilinearly (aspect kept) until the tile fits.

    Args:
        size: tile side length in pixels (>= 1).
        n: number of tiles (>= 0).
        seed: seed of the tile positions.

    Returns:
        uint8 tensor (n, 3, size, size), values in [0, 255], contiguous, on the CPU.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    photos = [_fit(p, size) for p in _sample_images()]
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(n):
        src = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        h, w = src.shape[-2:]
        top = int(torch.randint(h - size + 1, (1,), generator=gen))
        left = int(torch.randint(w - size + 1, (1,), generator=gen))
        out[i] = src[:, top:top + size, left:left + size]
    return out


def load_cifar10(data_dir: str | os.PathLike, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from a local copy (torchvision's layout, ``cifar-10-batches-py`` under ``data_dir``).

    Nothing is downloaded: a missing or corrupt copy raises ``ValueError`` naming ``data_dir``.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py/`` (torchvision's ``root``).
        train: the 50000-image training split if True, else the 10000-image test split.

    Returns:
        images: uint8 tensor (N, 3, 32, 32), values in [0, 255].
        labels: int64 tensor (N,), values in 0..9.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"CIFAR-10 not found: data_dir {str(data_dir)!r} is not a directory "
                         "(expected it to contain cifar-10-batches-py/; nothing is downloaded)")
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=str(root), train=train, download=False)
    except RuntimeError as err:
        # torchvision's own message suggests download=True, which this offline loader never does
        raise ValueError(f"CIFAR-10 not found or corrupt in data_dir {str(data_dir)!r} "
                         "(expected torchvision's cifar-10-batches-py/ there; nothing is downloaded)") from err
    images = torch.from_numpy(np.array(ds.data, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images, labels
