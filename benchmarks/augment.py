"""The augmentation contenders: K views of a uint8 batch (B, 3, H, W), float32 out, each view's random
parameters drawn from the same ranges (mtdl_fast.ops' defaults of the ten default tasks).

* ``mtdl-fast <backend>``: ``DistributionTasks(TASKS, backend=...)(x)``, per-image parameters, one per
  backend that runs on the device; ``mtdl-fast triton (apply)``: the fused kernel alone.
* ``torchvision per-image``: torchvision.transforms.v2 image by image (the fair baseline);
  ``torchvision batch``: one parameter set per call (less work).
* ``kornia per-sample``: kornia.augmentation, ``same_on_batch=False``, p = 1.
* ``triton-augment`` (CUDA): on the subset of the tasks it has. ``copy floor`` (CPU): the K outputs copied.

``build`` returns ``fn() -> (K', B, 3, H, W)`` float32 or raises ``Unavailable``. ``guard`` runs before
timing: shape, dtype, finite values, the exact views (identity, flip), and a fused backend's views
against the torch path's for the same parameters (noise excluded).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import default_collate

import mtdl_fast as mf
from mtdl_fast.ops import OPS

TASKS = list(mf.DEFAULT_TASKS)
TRITON_AUGMENT_TASKS = ["identity", "horizontal_flip", "rotate", "brightness", "contrast"]  # the ops it has
PEERS = ["torchvision per-image", "torchvision batch", "kornia per-sample", "triton-augment", "copy floor"]
WARP_ATOL = 5e-5  # the fused kernel against the torch path (bilinear warps; the rest is closer)


class Unavailable(Exception):
    """The contender cannot run here; the message says why."""


def mtdl_backends(device: torch.device) -> list[str]:
    """DistributionTasks backends that run on ``device`` (probed on a tiny batch): the fused kernel where
    it is built, the torch path always."""
    probe, ok = torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=device), []
    for backend in ["triton", "torch"] if device.type == "cuda" else ["cpu", "torch"]:
        try:
            mf.DistributionTasks(TASKS, backend=backend)(probe)
            ok.append(backend)
        except (ValueError, RuntimeError):
            continue
    return ok


def contenders(device: torch.device) -> list[str]:
    """Every contender for ``device``, mtdl-fast first (the first is the reference). A GPU row's floor is
    its own bytes at the measured copy bandwidth, the CPU's a measured copy."""
    ours = [f"mtdl-fast {b}" for b in mtdl_backends(device)]
    ours += ["mtdl-fast triton (apply)"] if "mtdl-fast triton" in ours else []
    return ours + [p for p in PEERS if p != ("copy floor" if device.type == "cuda" else "triton-augment")]


def work_bytes(name: str, x: torch.Tensor, k: int = len(TASKS)) -> int:
    """Bytes the contender moves at least: the uint8 batch read once and its k float32 views written;
    for the copy floor, the K float32 views read and written."""
    if name == "copy floor":
        return 8 * len(TASKS) * x.numel()
    return x.numel() * (1 + 4 * (len(TRITON_AUGMENT_TASKS) if name == "triton-augment" else k))


def build(name: str, x: torch.Tensor, tasks: list[str] = TASKS) -> Callable[[], torch.Tensor]:
    """The contender's call on ``x`` (uint8 (B, 3, H, W) on its device); ``tasks`` may be a subset for the
    mtdl-fast contenders (triton-augment has its own)."""
    if name.startswith("mtdl-fast"):
        ours = mf.DistributionTasks(tasks, seed=0, backend=name.split()[1])
        if not name.endswith("(apply)"):
            return lambda: ours(x)
        params = ours.sample(x.shape[0], tuple(x.shape[-2:]), device=x.device)
        return lambda: ours.apply(x, params)
    if name == "copy floor":
        src = torch.rand((len(TASKS), *x.shape), device=x.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    transforms = {"kornia per-sample": kornia_transforms, "triton-augment": triton_augment_transforms}.get(
        name, torchvision_transforms)(x.shape[-1], x.device)
    if name == "torchvision per-image":
        return lambda: per_image(transforms, x)
    return lambda: torch.stack([t(_float(x)) for t in transforms])


def per_image(transforms: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """(K, B, C, H, W) float32: each transform called image by image on uint8 ``x`` (B, C, H, W)."""
    return torch.stack([torch.stack([t(img) for img in _float(x)]) for t in transforms])


class ViewsCollate:
    """A peer of `mtdl_fast.loader.KViewCollate` in DataLoader workers: the batch stacked, then
    ``make(images)`` (e.g. ``partial(per_image, transforms)``); without ``make`` the K float32 views are
    left uncomputed (``torch.empty``): what sending them out of a worker costs. Returns (views, targets)."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.make = make

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = default_collate(samples)
        return self.make(images) if self.make else torch.empty((len(TASKS), *images.shape)), targets


def guard(name: str, fn: Callable[[], torch.Tensor] | None, x: torch.Tensor, made: tuple | None = None) -> str:
    """AssertionError when the contender does not make the views it claims; else what was checked.
    ``made``: (views, their TaskParams or None) made elsewhere (DataLoader workers), checked instead."""
    if name == "copy floor":
        fn()
        return "measured copy"
    views, params = made if made is not None else (None, None)
    if made is None and name.startswith("mtdl-fast") and name.split()[1] != "torch":
        ours = mf.DistributionTasks(TASKS, seed=0, backend=name.split()[1])
        params = ours.sample(x.shape[0], tuple(x.shape[-2:]), device=x.device)
        views = ours.apply(x, params)
    elif made is None:
        views = fn()
    reference = None if params is None else mf.DistributionTasks(TASKS, seed=0, backend="torch").apply(x, params)
    names = TRITON_AUGMENT_TASKS if name == "triton-augment" else TASKS
    assert views.shape == (len(names), *x.shape) and views.dtype == torch.float32, (name, views.shape, views.dtype)
    assert bool(torch.isfinite(views).all()), f"{name}: non-finite views"
    xf, identity, flip = _float(x), views[names.index("identity")], views[names.index("horizontal_flip")]
    assert torch.equal(identity, xf) and torch.equal(flip, xf.flip(-1)), f"{name}: the identity or flip view is wrong"
    if reference is None:
        return "identity and flip views exact"
    same = [i for i, task in enumerate(TASKS) if task != "gaussian_noise"]  # noise: other random numbers
    err = float((views[same] - reference[same]).abs().max())
    assert err <= WARP_ATOL, f"{name}: views differ from the torch path's by {err:.2e} > {WARP_ATOL}"
    return f"views equal the torch path's (max abs diff {err:.1e}, noise view excluded)"


def _float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]: torchvision's ``to_dtype(scale=True)``, which mtdl-fast matches."""
    from torchvision.transforms.v2.functional import to_dtype

    return to_dtype(x, torch.float32, scale=True)


def _default(op: str, key: str):
    return OPS[op].defaults[key]


class _RandomGaussianNoise:
    """gaussian_noise with sigma ~ U(range) per call (v2.GaussianNoise takes one fixed sigma)."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        d = _default
        sigma = float(torch.empty(()).uniform_(*d("gaussian_noise", "sigma")))
        return TF.gaussian_noise(img, mean=d("gaussian_noise", "mean"), sigma=sigma, clip=d("gaussian_noise", "clip"))


def torchvision_transforms(size: int, device: torch.device) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """torchvision.transforms.v2 random transforms equivalent to TASKS (bilinear warps, fill 0)."""
    from torchvision.transforms import InterpolationMode, v2

    bilinear, d = InterpolationMode.BILINEAR, _default
    table = {
        "identity": v2.Identity(), "horizontal_flip": v2.RandomHorizontalFlip(p=1.0),
        "vertical_flip": v2.RandomVerticalFlip(p=1.0),
        "rotate": v2.RandomRotation(d("rotate", "angle")[1], interpolation=bilinear),
        "affine": v2.RandomAffine(d("affine", "angle")[1], translate=d("affine", "translate"),
                                  scale=d("affine", "scale"), shear=d("affine", "shear"), interpolation=bilinear),
        "resized_crop": v2.RandomResizedCrop(size, scale=d("resized_crop", "scale"), ratio=d("resized_crop", "ratio"),
                                             interpolation=bilinear),
        "brightness": v2.ColorJitter(brightness=d("brightness", "brightness_factor")),
        "contrast": v2.ColorJitter(contrast=d("contrast", "contrast_factor")),
        "gaussian_blur": v2.GaussianBlur(d("gaussian_blur", "kernel_size"), sigma=d("gaussian_blur", "sigma")),
        "gaussian_noise": _RandomGaussianNoise(),
    }
    return [table[name] for name in TASKS]


def kornia_transforms(size: int, device: torch.device) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """kornia.augmentation modules equivalent to TASKS, per-sample parameters, p = 1."""
    try:
        import kornia.augmentation as KA
    except ImportError as err:
        raise Unavailable(f"kornia is not installed ({err})") from err
    d = _default
    table = {
        "identity": torch.nn.Identity(), "horizontal_flip": KA.RandomHorizontalFlip(p=1.0),
        "vertical_flip": KA.RandomVerticalFlip(p=1.0), "rotate": KA.RandomRotation(d("rotate", "angle")[1], p=1.0),
        "affine": KA.RandomAffine(d("affine", "angle")[1], translate=d("affine", "translate"),
                                  scale=d("affine", "scale"), shear=d("affine", "shear"), p=1.0),
        "resized_crop": KA.RandomResizedCrop((size, size), scale=d("resized_crop", "scale"),
                                             ratio=d("resized_crop", "ratio"), p=1.0),
        "brightness": KA.ColorJitter(brightness=d("brightness", "brightness_factor"), p=1.0),
        "contrast": KA.ColorJitter(contrast=d("contrast", "contrast_factor"), p=1.0),
        "gaussian_blur": KA.RandomGaussianBlur((d("gaussian_blur", "kernel_size"),) * 2,
                                               sigma=d("gaussian_blur", "sigma"), p=1.0),
        # kornia's noise has one fixed std: the middle of the task's sigma range.
        "gaussian_noise": KA.RandomGaussianNoise(std=sum(d("gaussian_noise", "sigma")) / 2, p=1.0),
    }
    return [table[name].to(device) for name in TASKS]


def triton_augment_transforms(size: int, device: torch.device) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """triton-augment's modules for TRITON_AUGMENT_TASKS, per-image parameters (CUDA only)."""
    if device.type != "cuda":
        raise Unavailable("triton-augment runs on CUDA only")
    try:
        import triton_augment as ta
    except ImportError as err:
        raise Unavailable(f"triton-augment is not installed ({err})") from err
    d, per_image = _default, {"same_on_batch": False}
    table = {"identity": torch.nn.Identity(), "horizontal_flip": ta.TritonRandomHorizontalFlip(p=1.0, **per_image),
             "rotate": ta.TritonRandomRotation(degrees=d("rotate", "angle")[1], **per_image),
             "brightness": ta.TritonColorJitter(brightness=d("brightness", "brightness_factor"), **per_image),
             "contrast": ta.TritonColorJitter(contrast=d("contrast", "contrast_factor"), **per_image)}
    return [table[name] for name in TRITON_AUGMENT_TASKS]
