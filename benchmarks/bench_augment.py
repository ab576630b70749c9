"""Augmentation throughput: K = 10 per-image-random views of a uint8 batch, bf16 out.

Every contender maps the same uint8 batch (B, 3, H, W) on the device to K = 10 views in bfloat16
(K, B, 3, H, W) -- the conversion to bf16 is inside the timed region for all of them, and so is the
drawing of random parameters:

* ``mtdl-fast triton``   -- ``DistributionTasks(BENCH_TASKS, backend="triton")``: one fused launch (GPU only).
* ``mtdl-fast triton (apply)`` -- the fused kernel alone (``tasks.apply`` with parameters drawn once,
  outside the timed region): the row the bandwidth-floor target is checked on.
* ``mtdl-fast torch``    -- the same tasks on the plain-PyTorch backend.
* ``torchvision per-image`` -- torchvision.transforms.v2.functional, one call per view per image, each
  image with its own parameters drawn from the task's ranges: the fair per-image baseline.
* ``torchvision batch``  -- torchvision v2 transforms on the whole batch, one parameter set per view
  per call (less randomness than the work above: a lower bound for torchvision).
* ``kornia per-sample``  -- kornia.augmentation modules, ``same_on_batch=False``, p = 1, one per view.
* ``triton-augment``     -- the ``triton_augment`` package on CUDA, for the ops it has (recorded);
  mtdl-fast triton is timed on that same subset for the comparison.

Reported per contender: seconds per call (median), input images/s (B / t), views/s (K B / t), achieved
GB/s = (B*3*H*W bytes of uint8 read once + K*B*3*H*W*2 bytes of bf16 written) / t, that rate as a
fraction of the measured device copy bandwidth (and of the published peak on known GPUs), and the
speed relative to the reference (mtdl-fast triton on GPU, mtdl-fast torch on CPU).

Usage::

    python benchmarks/bench_augment.py                    # full run on cuda if present, else cpu
    python benchmarks/bench_augment.py --device cpu --quick
    python benchmarks/bench_augment.py --sizes 224 --only "mtdl-fast torch,kornia per-sample"

Results: section ``augment`` of ``benchmarks/results/<device-slug>.json`` (other sections kept) and a
markdown table printed (and saved next to it as ``<device-slug>-augment.md``). ``--quick`` runs are
printed only unless ``--json`` is given.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
_ROOT = _HERE.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import _common as C  # noqa: E402

SECTION = "augment"
K_VIEWS = 10
BENCH_TASKS = ["identity", "horizontal_flip", "rotate", "resized_crop", "brightness", "contrast",
               "saturation", "hue", "gaussian_blur", "erase"]
assert len(BENCH_TASKS) == K_VIEWS

# The configurations: image side -> batch size.
FULL_CONFIGS = {32: 256, 224: 128}
QUICK_CONFIGS = {32: 32}
DEFAULT_BATCH_SMALL, DEFAULT_BATCH_LARGE = 256, 128   # for --sizes outside FULL_CONFIGS

# Parameter ranges of the tasks (the torchvision and kornia baselines draw from these).
ROTATE_DEG = 30.0
CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)
BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.6, 1.4), (0.6, 1.4), (0.0, 2.0), (-0.25, 0.25)
BLUR_KSIZE, BLUR_SIGMA = 5, (0.1, 2.0)
ERASE_SCALE, ERASE_RATIO, ERASE_VALUE = (0.02, 0.33), (0.3, 3.3), 0.0

REF_GPU, REF_CPU = "mtdl-fast triton", "mtdl-fast torch"
CONTENDERS = ["mtdl-fast triton", "mtdl-fast triton (apply)", "mtdl-fast torch", "torchvision per-image",
              "torchvision batch", "kornia per-sample", "triton-augment"]

# Targets of the issue.
TARGET_FLOOR_FRACTION = 0.70      # GPU, 224x224: fused kernel >= 70% of the bandwidth floor
TARGET_VS_KORNIA = 20.0           # GPU: fused kernel >= 20x kornia
TARGET_VS_TRITON_AUGMENT = 5.0    # GPU: fused kernel >= 5x triton-augment on the same work
TARGET_CPU_VS_TV_LOOP = 3.0       # CPU: torch path >= 3x the torchvision per-image loop


class Unavailable(Exception):
    """The contender cannot run here (missing package, no GPU); the message is the reason."""


@dataclass
class Contender:
    """A prepared contender: ``fn()`` returns the (K', B, C, H, W) bf16 views of the batch."""
    fn: Callable[[], torch.Tensor]
    tasks: list[str]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Per-image parameter draws (Python's random: cheap; the baselines are not charged for tensor RNG)
# ----------------------------------------------------------------------------------------------

def _box(rng: random.Random, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """(top, left, height, width) of a box with area fraction ~ U(scale), log-uniform aspect ratio;
    10 tries, None when none fits."""
    area = h * w
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(lo, hi))
        bw = int(round(math.sqrt(target * aspect)))
        bh = int(round(math.sqrt(target / aspect)))
        if 0 < bw <= w and 0 < bh <= h:
            return rng.randint(0, h - bh), rng.randint(0, w - bw), bh, bw
    return None


def _torchvision_per_image_ops(h: int, w: int, rng: random.Random) -> dict[str, Callable]:
    """Task name -> f(image (C,H,W) float) with fresh per-call parameters, torchvision v2 functional."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    bilinear = InterpolationMode.BILINEAR

    def resized_crop(img):
        box = _box(rng, h, w, CROP_SCALE, CROP_RATIO) or (0, 0, h, w)
        return TF.resized_crop(img, *box, size=[h, w], interpolation=bilinear, antialias=True)

    def blur(img):
        s = rng.uniform(*BLUR_SIGMA)
        return TF.gaussian_blur(img, kernel_size=[BLUR_KSIZE, BLUR_KSIZE], sigma=[s, s])

    def erase(img):
        box = _box(rng, h, w, ERASE_SCALE, ERASE_RATIO)
        if box is None:
            return img
        return TF.erase(img, *box, v=torch.tensor(ERASE_VALUE, device=img.device))

    return {
        "identity": lambda img: img,
        "horizontal_flip": TF.horizontal_flip,
        "vertical_flip": TF.vertical_flip,
        "rotate": lambda img: TF.rotate(img, rng.uniform(-ROTATE_DEG, ROTATE_DEG), interpolation=bilinear),
        "resized_crop": resized_crop,
        "brightness": lambda img: TF.adjust_brightness(img, rng.uniform(*BRIGHTNESS)),
        "contrast": lambda img: TF.adjust_contrast(img, rng.uniform(*CONTRAST)),
        "saturation": lambda img: TF.adjust_saturation(img, rng.uniform(*SATURATION)),
        "hue": lambda img: TF.adjust_hue(img, rng.uniform(*HUE)),
        "gaussian_blur": blur,
        "erase": erase,
    }


# ----------------------------------------------------------------------------------------------
# Contenders: each builder returns a Contender or raises Unavailable
# ----------------------------------------------------------------------------------------------

def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).mul_(1.0 / 255.0)


def _mtdl_tasks(names: list[str], backend: str):
    try:
        import mtdl_fast as mf
        cls = mf.DistributionTasks
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"mtdl_fast.DistributionTasks not importable: {type(err).__name__}: {err}") from err
    return cls(names, seed=0, backend=backend, out_dtype=torch.bfloat16)


def build_mtdl_triton(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    if x.device.type != "cuda":
        raise Unavailable("skipped on CPU: the fused Triton kernel needs a CUDA GPU")
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"triton not importable: {err}") from err
    tasks = _mtdl_tasks(list(names), "triton")
    return Contender(fn=lambda: tasks(x), tasks=list(names), notes="one fused launch, per-image params")


def build_mtdl_triton_apply(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    """The fused kernel alone: parameters drawn once, outside the timed region (the floor target)."""
    if x.device.type != "cuda":
        raise Unavailable("skipped on CPU: the fused Triton kernel needs a CUDA GPU")
    tasks = _mtdl_tasks(list(names), "triton")
    b, _, h, w = x.shape
    try:
        params = tasks.sample(b, (h, w), device=x.device)
    except TypeError:  # an API without image_size
        params = tasks.sample(b, device=x.device)
    return Contender(fn=lambda: tasks.apply(x, params), tasks=list(names),
                     notes="tasks.apply only: parameters drawn outside the timed region")


def build_mtdl_torch(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    tasks = _mtdl_tasks(list(names), "torch")
    return Contender(fn=lambda: tasks(x), tasks=list(names), notes="plain-PyTorch backend, per-image params")


def build_torchvision_per_image(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"torchvision not importable: {err}") from err
    b, c, h, w = x.shape
    ops = _torchvision_per_image_ops(h, w, random.Random(0))
    fns = [ops[n] for n in names]
    k = len(fns)

    def run() -> torch.Tensor:
        xf = _to_float(x)
        out = torch.empty((k, b, c, h, w), dtype=torch.bfloat16, device=x.device)
        for v, f in enumerate(fns):
            for i in range(b):
                out[v, i] = f(xf[i])
        return out

    return Contender(fn=run, tasks=list(names),
                     notes="v2.functional per image, per-image params (bilinear rotate/crop)")


def build_torchvision_batch(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    try:
        from torchvision.transforms import InterpolationMode, v2
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"torchvision.transforms.v2 not importable: {err}") from err
    b, c, h, w = x.shape
    bilinear = InterpolationMode.BILINEAR
    table = {
        "identity": v2.Identity(),
        "horizontal_flip": v2.RandomHorizontalFlip(p=1.0),
        "vertical_flip": v2.RandomVerticalFlip(p=1.0),
        "rotate": v2.RandomRotation(ROTATE_DEG, interpolation=bilinear),
        "resized_crop": v2.RandomResizedCrop((h, w), scale=CROP_SCALE, ratio=CROP_RATIO,
                                             interpolation=bilinear, antialias=True),
        "brightness": v2.ColorJitter(brightness=BRIGHTNESS),
        "contrast": v2.ColorJitter(contrast=CONTRAST),
        "saturation": v2.ColorJitter(saturation=SATURATION),
        "hue": v2.ColorJitter(hue=HUE),
        "gaussian_blur": v2.GaussianBlur(BLUR_KSIZE, sigma=BLUR_SIGMA),
        "erase": v2.RandomErasing(p=1.0, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=ERASE_VALUE),
    }
    mods = [table[n] for n in names]
    k = len(mods)

    def run() -> torch.Tensor:
        xf = _to_float(x)
        out = torch.empty((k, b, c, h, w), dtype=torch.bfloat16, device=x.device)
        for v, m in enumerate(mods):
            out[v] = m(xf)
        return out

    return Contender(fn=run, tasks=list(names),
                     notes="v2 transforms on the batch: ONE param set per view per call (less work)")


def build_kornia(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    try:
        import kornia.augmentation as KA
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"kornia not importable: {type(err).__name__}: {err}") from err
    b, c, h, w = x.shape
    table = {
        "identity": lambda: torch.nn.Identity(),
        "horizontal_flip": lambda: KA.RandomHorizontalFlip(p=1.0),
        "vertical_flip": lambda: KA.RandomVerticalFlip(p=1.0),
        "rotate": lambda: KA.RandomRotation(degrees=ROTATE_DEG, p=1.0),
        "resized_crop": lambda: KA.RandomResizedCrop((h, w), scale=CROP_SCALE, ratio=CROP_RATIO, p=1.0),
        "brightness": lambda: KA.ColorJitter(brightness=BRIGHTNESS, p=1.0),
        "contrast": lambda: KA.ColorJitter(contrast=CONTRAST, p=1.0),
        "saturation": lambda: KA.ColorJitter(saturation=SATURATION, p=1.0),
        "hue": lambda: KA.ColorJitter(hue=HUE, p=1.0),
        "gaussian_blur": lambda: KA.RandomGaussianBlur((BLUR_KSIZE, BLUR_KSIZE), sigma=BLUR_SIGMA, p=1.0),
        "erase": lambda: KA.RandomErasing(scale=ERASE_SCALE, ratio=ERASE_RATIO, value=ERASE_VALUE, p=1.0),
    }
    mods = [table[n]().to(x.device) for n in names]
    k = len(mods)

    def run() -> torch.Tensor:
        xf = _to_float(x)
        out = torch.empty((k, b, c, h, w), dtype=torch.bfloat16, device=x.device)
        for v, m in enumerate(mods):
            out[v] = m(xf)
        return out

    return Contender(fn=run, tasks=list(names), notes="kornia.augmentation, same_on_batch=False, p=1")


def build_triton_augment(x: torch.Tensor, names: list[str] = BENCH_TASKS) -> Contender:
    if x.device.type != "cuda":
        raise Unavailable("skipped on CPU: triton-augment runs on CUDA only")
    try:
        import os
        os.environ.setdefault("TRITON_AUGMENT_SUPPRESS_FIRST_RUN_MESSAGE", "1")
        import triton_augment as ta
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"package triton_augment not importable: {type(err).__name__}: {err}") from err

    def make(name: str):
        if name == "identity":
            return lambda t: t
        if name == "horizontal_flip":
            return ta.TritonRandomHorizontalFlip(p=1.0, same_on_batch=False)
        if name == "rotate":
            kwargs = {}
            interp = getattr(getattr(ta, "InterpolationMode", None), "BILINEAR", None)
            if interp is not None:
                kwargs["interpolation"] = interp
            return ta.TritonRandomRotation(degrees=ROTATE_DEG, same_on_batch=False, **kwargs)
        if name == "brightness":
            return ta.TritonColorJitter(brightness=BRIGHTNESS, same_on_batch=False)
        if name == "contrast":
            return ta.TritonColorJitter(contrast=CONTRAST, same_on_batch=False)
        if name == "saturation":
            return ta.TritonColorJitter(saturation=SATURATION, same_on_batch=False)
        raise AttributeError(f"no triton-augment op for {name}")

    mods, used, missing = [], [], []
    for n in names:
        try:
            mods.append(make(n))
            used.append(n)
        except Exception as err:  # noqa: BLE001 - an op the installed version lacks
            missing.append(f"{n} ({type(err).__name__})")
    if len(used) <= 1:
        raise Unavailable(f"triton_augment has none of the benchmark ops (missing: {', '.join(missing)})")
    b, c, h, w = x.shape
    k = len(mods)

    def run() -> torch.Tensor:
        xf = _to_float(x)
        out = torch.empty((k, b, c, h, w), dtype=torch.bfloat16, device=x.device)
        for v, m in enumerate(mods):
            out[v] = m(xf)
        return out

    return Contender(fn=run, tasks=used,
                     notes=f"ops it has: {', '.join(used)}; contrast is its fast (centred) mode",
                     extra={"missing_ops": missing, "version": getattr(ta, "__version__", "unknown")})


BUILDERS: dict[str, Callable[[torch.Tensor, list[str]], Contender]] = {
    "mtdl-fast triton": build_mtdl_triton,
    "mtdl-fast triton (apply)": build_mtdl_triton_apply,
    "mtdl-fast torch": build_mtdl_torch,
    "torchvision per-image": build_torchvision_per_image,
    "torchvision batch": build_torchvision_batch,
    "kornia per-sample": build_kornia,
    "triton-augment": build_triton_augment,
}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def _check_output(out: Any, k: int, x: torch.Tensor) -> None:
    b, c, h, w = x.shape
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"returned {type(out).__name__}, expected a tensor")
    if tuple(out.shape) != (k, b, c, h, w):
        raise ValueError(f"output shape {tuple(out.shape)} != {(k, b, c, h, w)}")
    if out.dtype != torch.bfloat16:
        raise ValueError(f"output dtype {out.dtype} != torch.bfloat16")
    if out.device != x.device:
        raise ValueError(f"output on {out.device}, input on {x.device}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("output has non-finite values")


def _bytes_moved(b: int, c: int, h: int, w: int, k: int) -> tuple[int, int]:
    """(bytes read: the uint8 input once, bytes written: K bf16 outputs)."""
    return b * c * h * w, k * b * c * h * w * 2


def _time_contender(name: str, x: torch.Tensor, names: list[str], device: torch.device,
                    budget_s: float, min_repeats: int) -> dict[str, Any]:
    b, c, h, w = x.shape
    try:
        con = BUILDERS[name](x, names)
    except Unavailable as why:
        status = "skipped" if str(why).startswith("skipped") else "unavailable"
        return {"status": status, "reason": str(why)}
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "reason": f"setup: {type(err).__name__}: {err}".splitlines()[0],
                "traceback": traceback.format_exc(limit=3)}
    k = len(con.tasks)
    try:
        t0 = time.perf_counter()
        out = con.fn()
        C.synchronize(device)
        first_s = time.perf_counter() - t0
        _check_output(out, k, x)
        del out
        timing = C.time_fn(con.fn, device, budget_s=budget_s, min_repeats=min_repeats, warmup=1,
                           estimate_s=first_s)
        timing["first_call_s"] = first_s
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "reason": f"{type(err).__name__}: {err}".splitlines()[0],
                "traceback": traceback.format_exc(limit=3), "tasks": con.tasks}
    t = timing["median_s"]
    rd, wr = _bytes_moved(b, c, h, w, k)
    res: dict[str, Any] = {
        "status": "ok",
        "tasks": con.tasks,
        "K": k,
        "notes": con.notes,
        **timing,
        "ms": t * 1e3,
        "images_per_s": b / t,
        "views_per_s": k * b / t,
        "bytes_read": rd,
        "bytes_written": wr,
        "GBps": (rd + wr) / t / 1e9,
    }
    res.update(con.extra)
    return res


def run(quick: bool = False, device: str = "cpu", *, sizes: list[int] | None = None,
        batch: int | None = None, budget_s: float | None = None, only: list[str] | None = None,
        verbose: bool = True) -> dict[str, Any]:
    """Run the augmentation benchmark and return its result section (not written to disk).

    Args:
        quick: small batch (32), 32x32 only, short time budget: for the demo and smoke tests.
        device: "cpu" or "cuda" (ValueError when unknown or unavailable).
        sizes: image sides to run (default: 32 and 224, or 32 when quick).
        batch: batch size for every size (default: the issue's 256 at 32x32 and 128 at 224x224).
        budget_s: timing budget per contender and configuration in seconds.
        only: restrict to these contender names.
        verbose: log progress to stderr.

    Returns:
        dict with "env", "configs" (one per size, each with "contenders"), "targets" and "table".
    """
    dev = C.resolve_device(device)
    from mtdl_fast.app import data

    if sizes is None:
        sizes = list(QUICK_CONFIGS if quick else FULL_CONFIGS)
    if budget_s is None:
        budget_s = 1.0 if quick else (3.0 if dev.type == "cuda" else 8.0)
    min_repeats = 2 if quick else 3
    names = [n for n in CONTENDERS if only is None or n in only]
    unknown = [n for n in (only or []) if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; known: {CONTENDERS}")
    ref = REF_GPU if dev.type == "cuda" else REF_CPU

    env = C.environment(dev)
    if verbose:
        C.log(f"[bench_augment] {env['device_name']} ({dev}), torch {env['torch']}, "
              f"{env['cpu_threads']} CPU threads")
    copy_bw = C.copy_bandwidth_gbps(dev, budget_s=0.5 if quick else 2.0)
    env["copy_GBps"] = copy_bw
    peak = env.get("spec_peak_GBps")

    configs = []
    for size in sizes:
        b = batch or (QUICK_CONFIGS.get(size, 32) if quick else
                      FULL_CONFIGS.get(size, DEFAULT_BATCH_SMALL if size <= 64 else DEFAULT_BATCH_LARGE))
        x = data.load_sample_photos(size, b, seed=0).to(dev)
        rd, wr = _bytes_moved(b, 3, size, size, K_VIEWS)
        cfg: dict[str, Any] = {"batch": b, "size": size, "channels": 3, "K": K_VIEWS, "tasks": BENCH_TASKS,
                               "bytes_read": rd, "bytes_written": wr, "contenders": {}}
        floor_s = (rd + wr) / (copy_bw * 1e9)
        cfg["floor_ms_copy_bw"] = floor_s * 1e3
        if peak:
            cfg["floor_ms_spec_peak"] = (rd + wr) / (peak * 1e9) * 1e3
        for name in names:
            t0 = time.perf_counter()
            res = _time_contender(name, x, BENCH_TASKS, dev, budget_s, min_repeats)
            if res["status"] == "ok":
                res["frac_copy_bw"] = res["GBps"] / copy_bw
                res["frac_spec_peak"] = res["GBps"] / peak if peak else None
            cfg["contenders"][name] = res
            if verbose:
                what = (f"{res['ms']:.3f} ms, {res['images_per_s']:.0f} img/s, {res['GBps']:.3g} GB/s"
                        if res["status"] == "ok" else f"{res['status']}: {res['reason']}")
                C.log(f"[bench_augment] B={b} {size}x{size} {name:<22} {what}  "
                      f"({time.perf_counter() - t0:.1f} s)")
        # triton-augment runs a subset of the tasks: time mtdl-fast triton on that same subset.
        ta = cfg["contenders"].get("triton-augment", {})
        if ta.get("status") == "ok" and ta["tasks"] != BENCH_TASKS:
            same = _time_contender("mtdl-fast triton", x, ta["tasks"], dev, budget_s, min_repeats)
            ta["mtdl_fast_triton_same_work_ms"] = same.get("ms")
            ta["mtdl_fast_triton_same_work_status"] = same["status"]
            if same["status"] == "ok":
                ta["speedup_of_mtdl_fast_triton"] = ta["median_s"] / same["median_s"]
        # Relative speeds against the reference.
        ref_res = cfg["contenders"].get(ref, {})
        for name, res in cfg["contenders"].items():
            if res.get("status") == "ok" and ref_res.get("status") == "ok" and res.get("K") == ref_res.get("K"):
                res["speed_vs_ref"] = ref_res["median_s"] / res["median_s"]
                res["ref_speedup"] = res["median_s"] / ref_res["median_s"]
        if ta.get("status") == "ok" and "speedup_of_mtdl_fast_triton" in ta:
            ta["ref_speedup"] = ta["speedup_of_mtdl_fast_triton"]
            ta["speed_vs_ref"] = 1.0 / ta["speedup_of_mtdl_fast_triton"]
        configs.append(cfg)
        del x

    env["load_average_1m_end"] = C.load_average()
    section = {"env": env, "quick": quick, "reference": ref, "K": K_VIEWS, "tasks": BENCH_TASKS,
               "configs": configs}
    section["targets"] = targets(section)
    section["table"] = table(section)
    return section


def targets(section: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as booleans (None when not measurable in this run)."""
    env = section["env"]
    on_gpu = env["device"] == "cuda"
    out: dict[str, Any] = {}

    def ok(cfg, name):
        r = cfg["contenders"].get(name, {})
        return r if r.get("status") == "ok" else None

    for cfg in section["configs"]:
        tag = f"B{cfg['batch']}_{cfg['size']}x{cfg['size']}"
        tri, tor = ok(cfg, REF_GPU), ok(cfg, REF_CPU)
        kernel = ok(cfg, "mtdl-fast triton (apply)") or tri   # the floor is about the kernel
        if on_gpu:
            if cfg["size"] >= 224:
                out[f"gpu_triton_ge_70pct_copy_bw_floor_{tag}"] = (
                    kernel["frac_copy_bw"] >= TARGET_FLOOR_FRACTION if kernel else None)
                out[f"gpu_triton_ge_70pct_spec_peak_floor_{tag}"] = (
                    kernel["frac_spec_peak"] >= TARGET_FLOOR_FRACTION
                    if kernel and kernel.get("frac_spec_peak") else None)
            ko = ok(cfg, "kornia per-sample")
            out[f"gpu_triton_ge_20x_kornia_{tag}"] = (
                ko["median_s"] / tri["median_s"] >= TARGET_VS_KORNIA if tri and ko else None)
            ta = ok(cfg, "triton-augment")
            sp = ta.get("speedup_of_mtdl_fast_triton") if ta else None
            if ta and sp is None and tri and ta.get("K") == tri.get("K"):
                sp = ta["median_s"] / tri["median_s"]
            out[f"gpu_triton_ge_5x_triton_augment_{tag}"] = sp >= TARGET_VS_TRITON_AUGMENT if sp else None
        else:
            tv = ok(cfg, "torchvision per-image")
            out[f"cpu_torch_ge_3x_torchvision_loop_{tag}"] = (
                tv["median_s"] / tor["median_s"] >= TARGET_CPU_VS_TV_LOOP if tv and tor else None)
    return out


def table(section: dict[str, Any]) -> str:
    """Markdown table of a result section (one row per configuration and contender)."""
    env = section["env"]
    ref = section["reference"]
    rows = []
    for cfg in section["configs"]:
        conf = f"B={cfg['batch']} {cfg['size']}x{cfg['size']}"
        for name, r in cfg["contenders"].items():
            if r.get("status") == "ok":
                k = r.get("K", section["K"])
                label = name if k == section["K"] else f"{name} (K={k})"
                vs = r.get("speed_vs_ref")
                rows.append([conf, label, C.fmt(r["ms"]), C.fmt(r["images_per_s"]), C.fmt(r["views_per_s"]),
                             C.fmt(r["GBps"]), f"{100 * r['frac_copy_bw']:.1f}%",
                             f"{100 * r['frac_spec_peak']:.1f}%" if r.get("frac_spec_peak") else "-",
                             f"{vs:.3g}x" if vs is not None else "-"])
            else:
                rows.append([conf, name, r["status"], "", "", "", "", "", r.get("reason", "")[:90]])
    head = (f"Augmentation, K={section['K']} views, uint8 in, bf16 out -- {env['device_name']} "
            f"({env['device']}, {env['cpu_threads']} CPU threads, load average "
            f"{env.get('load_average_1m')} -> {env.get('load_average_1m_end')}), torch {env['torch']}, "
            f"{env['date']}; measured copy bandwidth {env['copy_GBps']:.3g} GB/s"
            + (f", spec peak {env['spec_peak_GBps']:.0f} GB/s" if env.get("spec_peak_GBps") else "")
            + f". GB/s counts the uint8 input read once and the K bf16 outputs written; "
            f"'vs ref' is the contender's speed relative to `{ref}` (> 1: faster).\n\n")
    tbl = C.markdown_table(rows, ["config", "contender", "ms/call", "images/s", "views/s", "GB/s",
                                  "% copy BW", "% spec peak", "vs ref"], align="llrrrrrrr")
    tg = section.get("targets") or {}
    lines = [f"- {k}: {v}" for k, v in tg.items()]
    return head + tbl + ("\n\nTargets:\n" + "\n".join(lines) if lines else "")


def write(section: dict[str, Any], path: Path | str | None = None) -> Path:
    """Merge ``section`` into the result file (key ``augment``) and save the table beside it."""
    return C.write_section(section, SECTION, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="B=32, 32x32 only, short budget")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",") if v], default=None,
                   help="comma-separated image sides, e.g. 32,224")
    p.add_argument("--batch", type=int, default=None, help="batch size for every size")
    p.add_argument("--budget", type=float, default=None, help="timing budget per contender (s)")
    p.add_argument("--only", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help=f"comma-separated contenders among: {', '.join(CONTENDERS)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    C.add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return C.finish("bench_augment", args, lambda: run(args.quick, args.device, sizes=args.sizes, batch=args.batch,
                                                       budget_s=args.budget, only=args.only), write)


if __name__ == "__main__":
    sys.exit(main())
