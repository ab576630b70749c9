"""End-to-end MTDL training step: images/s of six ways to train K distribution tasks on one batch.

K = 10 distribution tasks (``mf.DEFAULT_TASKS``), the model the trainer builds
(``mf.research.conditioning.build_model("hard", K, 10, 3, 32, trunk="resnet", width=RunConfig().width)``: a
SmallResNet trunk and K linear heads), 32x32 uint8 images (``data.load_sample_photos``), B = 256,
float32, SGD with the trainer's learning rate and momentum, the model in train mode. Every variant
starts from the same initial parameters (deep copies) and gets the same uint8 batch on the device;
augmentation is inside the timed region for all of them. Timed side by side in one run:

* ``baseline``          -- (a) what a user writes today: torchvision.transforms.v2 random transforms
  equivalent to the K tasks (same ranges, bilinear warps), applied image by image to each of the K
  views; then one forward per view, the sum of the K cross-entropies, one backward, one SGD step.
* ``mtdl_no_affinity``  -- (b) ``MTDLEngine(..., affinity_every=None).step(x, y)``: the K views in one
  call of ``DistributionTasks`` (one fused Triton launch on CUDA), per-view forward, one backward.
* ``mtdl_first_order``  -- (c) the engine with ``affinity_mode="first_order"`` every step.
* ``mtdl_exact_every_10`` -- (d) the engine with exact TAG affinity every 10 steps (the default): timed
  over whole cycles of 10 steps, so the one affinity step in ten is paid in full.
* ``mtdl_exact_every_step`` -- (e) the engine with exact affinity every step.
* ``libmtl_k_backward`` -- (f) the baseline loop written the LibMTL way: per-task gradients of the shared
  parameters from K separate ``backward()`` calls (LibMTL's ``_compute_grad(mode="backward")``:
  backward, flatten the shared gradients into row k, zero them), summed (equal weighting) and written
  back, then the SGD step. Same torchvision augmentation as the baseline.

The engine variants use the engine's defaults otherwise (``skip_nonfinite=True``: one host read of
the loss per step, as in ``mtdl-fast run``; the affinity lookahead previews the optimizer's update).
Also timed, for reading the table: the augmentation alone, torchvision per-image (the baseline's) and
``DistributionTasks`` (the engine's).

Before timing, a guard checks that the LibMTL-style step's summed per-task gradients equal one
backward of the summed loss (same views, same parameters): (f) does the baseline's work, K times
sliced. Every variant's loss is recorded at every call (warm-up included); the run fails if one is
not finite.

Reported per variant: ms per step (median over timed calls; a call is one step, or one cycle of 10
steps for (d)), images/s = B / (s per step), views/s = K * B / (s per step), the ratio to the
baseline, the overhead over (b), and the physical floor: the FLOPs of one training step (forward and
backward of the model on the K*B views; ``torch.utils.flop_counter.FlopCounterMode``, convolutions
and matmuls) divided by the step time, as a fraction of the device's peak. CUDA: published dense
fp32 and tf32 peaks (cuDNN convolutions run in TF32 under torch's defaults) and a measured fp32
matmul rate; CPU: no published peak exists, so the reference is a ``torch.mm`` rate measured on the
spot with the same thread count (``_common.matmul_tflops``). The affinity variants do more FLOPs
than that (the exact lookahead adds K forwards of the K views): their fraction is of the training
step's useful work.

Targets of the issue (GPU): mtdl-fast without affinity >= 5x the baseline's images/s; exact
affinity every 10 steps <= 15% over no affinity. On the CPU they are reported as measured, not
judged.

Duration: the full CPU run at one thread takes of the order of 10 minutes, most of it in the exact
affinity steps of (d) and (e) (calls slower than 5 s get one warm-up call and two timed repeats);
``--batch 64`` cuts it about fourfold.

Usage::

    python benchmarks/bench_step.py                        # full run on cuda if present, else cpu
    python benchmarks/bench_step.py --device cpu --quick   # smoke sizes, printed only
    python benchmarks/bench_step.py --device cpu --batch 64 --threads 2

Results: section ``step`` of ``benchmarks/results/<device-slug>.json`` (other sections kept), the
markdown table printed and saved next to it as ``<device-slug>-step.md``, and a bar chart of images/s
per variant as ``<device-slug>-step.png``. ``--quick`` runs are printed only unless ``--json`` is given.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
_ROOT = _HERE.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import _common as C  # noqa: E402

SECTION = "step"
K_TASKS = 10
BATCH = 256                 # the batch size
IMAGE_SIZE = 32
NUM_CLASSES = 10
AFFINITY_EVERY = 10         # variant (d)
QUICK_BATCH, QUICK_TASKS = 16, 4
FLOP_COUNT_BATCH_CPU = 8    # FLOPs are counted at this batch (and half of it) on the CPU, then scaled
GUARD_RTOL = 1e-4
SLOW_CALL_S = 5.0           # calls slower than this: one warm-up call, >= 2 timed repeats

BASELINE, NO_AFF, FIRST, EXACT10, EXACT1, LIBMTL = (
    "baseline", "mtdl_no_affinity", "mtdl_first_order", "mtdl_exact_every_10", "mtdl_exact_every_step",
    "libmtl_k_backward")
VARIANTS = [BASELINE, NO_AFF, FIRST, EXACT10, EXACT1, LIBMTL]
LABELS = {
    BASELINE: "(a) baseline: torchvision v2 per-image + PyTorch step",
    NO_AFF: "(b) mtdl-fast, no affinity",
    FIRST: "(c) mtdl-fast, first_order every step",
    EXACT10: "(d) mtdl-fast, exact every 10 steps",
    EXACT1: "(e) mtdl-fast, exact every step",
    LIBMTL: "(f) LibMTL way: K backward passes",
}
AUG_TORCHVISION, AUG_MTDL = "augment_only_torchvision", "augment_only_mtdl"
COMPONENT_LABELS = {AUG_TORCHVISION: "augmentation alone: torchvision v2 per-image",
                    AUG_MTDL: "augmentation alone: mtdl-fast DistributionTasks"}

# Targets of the issue (GPU).
TARGET_GPU_SPEEDUP = 5.0             # mtdl-fast (no affinity) >= 5x the baseline's images/s
TARGET_GPU_EXACT10_OVERHEAD = 0.15   # exact every 10 steps <= 15% over no affinity


GuardError = C.GuardError  # a variant does not do the work it claims (or a loss is not finite)


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------

def task_names(k: int) -> list[str]:
    """The first k of mf.DEFAULT_TASKS (repeated cyclically when k > 10)."""
    import mtdl_fast as mf

    return [mf.DEFAULT_TASKS[i % len(mf.DEFAULT_TASKS)] for i in range(k)]


def trainer_defaults() -> dict[str, Any]:
    """The trainer's model width, learning rate and momentum (``mtdl_fast.app.trainer.RunConfig``)."""
    from mtdl_fast.app.trainer import RunConfig

    cfg = RunConfig()
    return {"width": cfg.width, "lr": cfg.lr, "momentum": cfg.momentum}


def make_model(k: int, device: torch.device, seed: int = 0):
    """The trainer's hard-sharing model for K tasks at 32x32 (trunk, heads), on `device`, train mode."""
    from mtdl_fast.research.conditioning import build_model

    torch.manual_seed(seed)
    model = build_model("hard", k, NUM_CLASSES, 3, IMAGE_SIZE, trunk="resnet",
                        width=trainer_defaults()["width"]).to(device).train()
    return model.trunk, model.heads


def make_batch(batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x uint8 (B, 3, 32, 32), y (B,)) on `device`: sample-photo tiles and fixed random labels."""
    from mtdl_fast.app.data import load_sample_photos

    x = load_sample_photos(IMAGE_SIZE, batch, seed=seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    return x, y


class _RandomGaussianNoise:
    """gaussian_noise with sigma ~ U(lo, hi) per call (v2.GaussianNoise takes one fixed sigma)."""

    def __init__(self, sigma: tuple[float, float], mean: float = 0.0, clip: bool = True):
        self.sigma, self.mean, self.clip = sigma, mean, clip

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        s = float(torch.empty(()).uniform_(*self.sigma))
        return TF.gaussian_noise(img, mean=self.mean, sigma=s, clip=self.clip)


def torchvision_transforms(names: list[str], size: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """torchvision.transforms.v2 random transforms equivalent to the mtdl-fast tasks (default ranges of
    mtdl_fast.ops; bilinear warps, fill 0), one per task; each call draws fresh parameters."""
    from torchvision.transforms import InterpolationMode, v2

    from mtdl_fast.ops import OPS

    bilinear = InterpolationMode.BILINEAR

    def d(op: str, key: str):
        return OPS[op].defaults[key]

    table: dict[str, Callable[[], Callable]] = {
        "identity": lambda: v2.Identity(),
        "horizontal_flip": lambda: v2.RandomHorizontalFlip(p=1.0),
        "vertical_flip": lambda: v2.RandomVerticalFlip(p=1.0),
        "rotate": lambda: v2.RandomRotation(max(abs(a) for a in d("rotate", "angle")), interpolation=bilinear),
        "affine": lambda: v2.RandomAffine(max(abs(a) for a in d("affine", "angle")), translate=d("affine", "translate"),
                                          scale=d("affine", "scale"), shear=d("affine", "shear"),
                                          interpolation=bilinear),
        "resized_crop": lambda: v2.RandomResizedCrop(size, scale=d("resized_crop", "scale"),
                                                     ratio=d("resized_crop", "ratio"), interpolation=bilinear,
                                                     antialias=True),
        "brightness": lambda: v2.ColorJitter(brightness=d("brightness", "brightness_factor")),
        "contrast": lambda: v2.ColorJitter(contrast=d("contrast", "contrast_factor")),
        "saturation": lambda: v2.ColorJitter(saturation=d("saturation", "saturation_factor")),
        "hue": lambda: v2.ColorJitter(hue=d("hue", "hue_factor")),
        "gaussian_blur": lambda: v2.GaussianBlur(d("gaussian_blur", "kernel_size"), sigma=d("gaussian_blur", "sigma")),
        "gaussian_noise": lambda: _RandomGaussianNoise(d("gaussian_noise", "sigma"), d("gaussian_noise", "mean"),
                                                       d("gaussian_noise", "clip")),
        "erase": lambda: v2.RandomErasing(p=1.0, scale=d("erase", "scale"), ratio=d("erase", "ratio"),
                                          value=d("erase", "value")),
    }
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"no torchvision equivalent wired up for task(s) {missing}")
    return [table[n]() for n in names]


def torchvision_views(x: torch.Tensor, transforms) -> list[torch.Tensor]:
    """The baseline's augmentation: uint8 -> float in [0, 1] (v2.ToDtype(scale=True)), then every image
    of every view through its task's random transform, one call per image."""
    xf = x.to(torch.float32).div_(255.0)
    return [torch.stack([t(xf[i]) for i in range(xf.shape[0])]) for t in transforms]


# ----------------------------------------------------------------------------------------------
# The variants: each a fn() doing one training step (or a cycle of steps) and returning its losses
# ----------------------------------------------------------------------------------------------

def _sgd(trunk, heads, hp) -> torch.optim.Optimizer:
    return torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=hp["lr"], momentum=hp["momentum"])


def baseline_step_fn(trunk, heads, x, y, names, hp) -> Callable[[], list[torch.Tensor]]:
    transforms = torchvision_transforms(names, x.shape[-1])
    opt = _sgd(trunk, heads, hp)

    def step() -> list[torch.Tensor]:
        views = torchvision_views(x, transforms)
        opt.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(heads[k](trunk(views[k])), y) for k in range(len(views)))
        loss.backward()
        opt.step()
        return [loss.detach()]

    return step


def _grad2vec(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _vec2grad(params: list[torch.nn.Parameter], vec: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vec[offset:offset + n].view_as(p).clone()
        offset += n


def libmtl_backward(trunk, heads, views, y) -> tuple[torch.Tensor, torch.Tensor]:
    """LibMTL's per-task gradients: K backward() calls, shared gradients flattened into a (K, P)
    matrix row by row and zeroed in between; heads accumulate their own. Returns the (K, P) matrix
    (the caller aggregates) and the (K,) losses. Leaves .grad of the heads set, of the trunk zeroed."""
    shared = [p for p in trunk.parameters() if p.requires_grad]
    k = len(views)
    losses = [F.cross_entropy(heads[j](trunk(views[j])), y) for j in range(k)]
    grads = torch.zeros(k, sum(p.numel() for p in shared), device=views[0].device)
    for j in range(k):
        losses[j].backward()
        grads[j] = _grad2vec(shared)
        for p in shared:
            if p.grad is not None:
                p.grad.zero_()
    return grads, torch.stack([loss.detach() for loss in losses])


def libmtl_step_fn(trunk, heads, x, y, names, hp) -> Callable[[], list[torch.Tensor]]:
    transforms = torchvision_transforms(names, x.shape[-1])
    opt = _sgd(trunk, heads, hp)
    shared = [p for p in trunk.parameters() if p.requires_grad]

    def step() -> list[torch.Tensor]:
        views = torchvision_views(x, transforms)
        opt.zero_grad(set_to_none=True)
        grads, losses = libmtl_backward(trunk, heads, views, y)
        _vec2grad(shared, grads.sum(0))        # equal weighting: the sum of the task gradients
        opt.step()
        return [losses.sum()]

    return step


def engine_step_fn(trunk, heads, x, y, names, hp, *, every: int | None, mode: str = "exact",
                   steps_per_call: int = 1, seed: int = 0):
    """An MTDLEngine as the trainer builds it (SGD with momentum, sum weighting); fn() runs
    `steps_per_call` consecutive engine steps. Returns (fn, engine)."""
    import mtdl_fast as mf
    from mtdl_fast.engine import MTDLEngine

    tasks = mf.DistributionTasks(list(names), seed=seed)
    engine = MTDLEngine(tasks, trunk, heads, _sgd(trunk, heads, hp), affinity_every=every, affinity_mode=mode)

    def step() -> list[torch.Tensor]:
        return [engine.step(x, y)[0] for _ in range(steps_per_call)]

    return step, engine


def build_variants(x, y, k: int, device: torch.device, hp: dict[str, Any], every: int = AFFINITY_EVERY,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """Variant name -> {"fn", "steps_per_call", "engine"}; every variant on its own copy of one model."""
    names = task_names(k)
    trunk0, heads0 = make_model(k, device, seed)

    def fresh():
        return copy.deepcopy(trunk0), copy.deepcopy(heads0)

    out: dict[str, dict[str, Any]] = {}
    out[BASELINE] = {"fn": baseline_step_fn(*fresh(), x, y, names, hp), "steps_per_call": 1, "engine": None}
    for name, kw in ((NO_AFF, {"every": None}), (FIRST, {"every": 1, "mode": "first_order"}),
                     (EXACT10, {"every": every, "steps_per_call": every}), (EXACT1, {"every": 1})):
        fn, engine = engine_step_fn(*fresh(), x, y, names, hp, seed=seed, **kw)
        out[name] = {"fn": fn, "steps_per_call": kw.get("steps_per_call", 1), "engine": engine,
                     "label": LABELS[name].replace("every 10 steps", f"every {every} steps")}
    out[LIBMTL] = {"fn": libmtl_step_fn(*fresh(), x, y, names, hp), "steps_per_call": 1, "engine": None}
    return out


# ----------------------------------------------------------------------------------------------
# Guard, FLOPs
# ----------------------------------------------------------------------------------------------

def libmtl_guard(k: int, device: torch.device, batch: int = 8, seed: int = 0) -> dict[str, Any]:
    """Summed per-task gradients of K backward() calls vs one backward of the summed loss, same views
    and parameters (float32): max abs difference relative to the gradient's max abs value."""
    import mtdl_fast as mf

    x, y = make_batch(batch, device, seed)
    views = mf.DistributionTasks(task_names(k), seed=seed)(x)
    trunk, heads = make_model(k, device, seed)
    t2, h2 = copy.deepcopy(trunk), copy.deepcopy(heads)
    grads, _ = libmtl_backward(trunk, heads, views, y)
    summed = grads.sum(0)
    sum(F.cross_entropy(h2[j](t2(views[j])), y) for j in range(k)).backward()
    ref = _grad2vec([p for p in t2.parameters() if p.requires_grad])
    scale = float(ref.abs().max()) or 1.0
    diff = float((summed - ref).abs().max()) / scale
    heads_diff = max(float((a.grad - b.grad).abs().max()) / (float(b.grad.abs().max()) or 1.0)
                     for a, b in zip(heads.parameters(), h2.parameters()))
    return {"batch": batch, "rel_max_abs_diff_shared": diff, "rel_max_abs_diff_heads": heads_diff,
            "rtol": GUARD_RTOL, "passed": diff <= GUARD_RTOL and heads_diff <= GUARD_RTOL}


def count_step_flops(batch: int, k: int, device: torch.device, seed: int = 0) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of the model on K views of `batch` images: the K
    per-view forwards, the sum of the cross-entropies, one backward (FlopCounterMode: convolutions
    and matmuls). The optimizer step and the elementwise ops are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    import mtdl_fast as mf

    x, y = make_batch(batch, device, seed)
    with torch.no_grad():
        views = mf.DistributionTasks(task_names(k), seed=seed)(x)
    trunk, heads = make_model(k, device, seed)
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            for j in range(k):
                heads[j](trunk(views[j]))
    with FlopCounterMode(display=False) as full:
        sum(F.cross_entropy(heads[j](trunk(views[j])), y) for j in range(k)).backward()
    return int(fwd.get_total_flops()), int(full.get_total_flops())


def step_flops(batch: int, k: int, device: torch.device) -> dict[str, Any]:
    """FLOPs of one training step at `batch`: counted at `batch` on CUDA; on the CPU counted at
    FLOP_COUNT_BATCH_CPU and half of it, checked to be linear in B, and scaled."""
    if device.type == "cuda" or batch <= FLOP_COUNT_BATCH_CPU:
        fwd, full = count_step_flops(batch, k, device)
        at, linear = batch, None
    else:
        at = FLOP_COUNT_BATCH_CPU
        f_half, t_half = count_step_flops(at // 2, k, device)
        f_at, t_at = count_step_flops(at, k, device)
        linear = f_at == 2 * f_half and t_at == 2 * t_half
        fwd, full = f_at * batch // at, t_at * batch // at
    return {"forward_flops": fwd, "step_flops": full, "step_over_forward": full / fwd if fwd else None,
            "counted_at_batch": at, "scaled_to_batch": batch, "linear_in_batch": linear,
            "method": "torch.utils.flop_counter.FlopCounterMode: convolutions and matmuls of the K per-view "
                      "forwards, the summed cross-entropy and one backward (optimizer and elementwise ops "
                      "not counted)"}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def _error(err: BaseException) -> dict[str, Any]:
    return {"status": "error", "reason": f"{type(err).__name__}: {err}".splitlines()[0][:300],
            "traceback": traceback.format_exc(limit=4)}


def _losses_summary(values: list[float]) -> dict[str, Any]:
    """First and last losses (means of up to 3 at each end) and whether training lowered the loss."""
    n = len(values)
    m = max(1, min(3, n // 2))
    first, last = sum(values[:m]) / m, sum(values[-m:]) / m
    finite = all(math.isfinite(v) for v in values)
    return {"losses": values, "loss_first": first, "loss_last": last, "loss_finite": finite,
            "loss_decreased": bool(finite and n >= 2 and last < first)}


def _time_variant(name: str, spec: dict[str, Any], batch: int, k: int, device: torch.device, *,
                  warmup: int, budget_s: float, min_repeats: int, max_repeats: int) -> dict[str, Any]:
    fn, per_call = spec["fn"], spec["steps_per_call"]
    record: list[torch.Tensor] = []

    def call() -> None:
        record.extend(fn())

    # Warm-up calls (lazy initialisation, first vmap traces, allocator growth); the last one's time
    # sizes the timed repeats. A call slower than SLOW_CALL_S (a CPU exact-affinity step at full size)
    # gets one warm-up call and at least 2 timed repeats instead.
    first_s, calls = None, 0
    while calls < max(1, warmup):
        C.synchronize(device)
        t0 = time.perf_counter()
        call()
        C.synchronize(device)
        first_s = time.perf_counter() - t0
        calls += 1
        if first_s > SLOW_CALL_S:
            min_repeats = min(min_repeats, 2)
            break
    timing = C.time_fn(call, device, budget_s=budget_s, min_repeats=min_repeats, max_repeats=max_repeats,
                       warmup=0, estimate_s=first_s)
    losses = [float(v) for v in record]
    res: dict[str, Any] = {"status": "ok", "label": spec.get("label", LABELS[name]), "steps_per_call": per_call,
                           "warmup_calls": calls, "last_warmup_call_s": first_s, **timing}
    t = timing["median_s"] / per_call
    res.update(s_per_step=t, ms_per_step=t * 1e3, images_per_s=batch / t, views_per_s=k * batch / t)
    res.update(_losses_summary(losses))
    engine = spec.get("engine")
    if engine is not None:
        res["engine_steps"] = engine.step_count
        res["skipped_steps"] = engine.skipped_steps
        tracker = engine.tracker
        if tracker is not None:
            res["affinity_steps"] = int(tracker.steps)
            res["affinity_mode"] = tracker.mode if hasattr(tracker, "mode") else None
            res["affinity_chunk_size"] = getattr(tracker, "chunk_size", None)
            aff = tracker.affinity
            res["affinity_finite"] = bool(torch.isfinite(aff).all()) if aff is not None else None
    if not res["loss_finite"]:
        raise GuardError(f"{name}: non-finite loss during the run: {losses}")
    return res


def _time_component(fn: Callable[[], Any], label: str, batch: int, device: torch.device, budget_s: float,
                    min_repeats: int) -> dict[str, Any]:
    try:
        C.synchronize(device)
        t0 = time.perf_counter()
        fn()
        C.synchronize(device)
        first = time.perf_counter() - t0
        timing = C.time_fn(fn, device, budget_s=budget_s, min_repeats=min_repeats, max_repeats=50, warmup=1,
                           estimate_s=first)
        t = timing["median_s"]
        return {"status": "ok", "label": label, **timing, "ms": t * 1e3, "images_per_s": batch / t}
    except Exception as err:  # noqa: BLE001
        return {**_error(err), "label": label}


def run(quick: bool = False, device: str = "cpu", *, batch: int | None = None, tasks: int | None = None,
        threads: int | None = None, budget_s: float | None = None, every: int = AFFINITY_EVERY,
        only: list[str] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run the end-to-end step benchmark and return its result section (not written to disk).

    Args:
        quick: B = 16, K = 4, one timed repeat: a smoke run.
        device: "cpu" or "cuda" (ValueError when unknown or unavailable).
        batch: batch size (default 256, 16 when quick).
        tasks: number of tasks K (default 10, 4 when quick).
        threads: torch CPU threads during the run (default: 1 on the CPU, torch's choice on CUDA);
            the previous setting is restored afterwards.
        budget_s: timing budget per variant in seconds.
        every: the affinity period of variant (d) (default 10).
        only: restrict to these variants (the baseline is always run: every ratio is against it).
        verbose: log progress to stderr.

    Returns:
        dict with "env", "config", "guard", "variants", "components", "flops", "peak", "ratios",
        "targets", "notes" and "table".
    """
    dev = C.resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is None and dev.type == "cpu":
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _run(quick, dev, batch=batch, tasks=tasks, budget_s=budget_s, every=every, only=only,
                    verbose=verbose)
    finally:
        torch.set_num_threads(old_threads)


def _run(quick, dev, *, batch, tasks, budget_s, every, only, verbose) -> dict[str, Any]:
    t_start = time.perf_counter()
    log = C.log if verbose else (lambda msg: None)
    k = tasks if tasks is not None else (QUICK_TASKS if quick else K_TASKS)
    batch = batch if batch is not None else (QUICK_BATCH if quick else BATCH)
    if k < 2:
        raise ValueError(f"tasks must be >= 2, got {k}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    unknown = [n for n in (only or []) if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {VARIANTS}")
    chosen = [n for n in VARIANTS if only is None or n in only or n == BASELINE]
    if budget_s is None:
        budget_s = 0.2 if quick else (3.0 if dev.type == "cuda" else 6.0)
    min_repeats = 1 if quick else 3
    warmup = 1 if quick else 2
    hp = trainer_defaults()

    env = C.environment(dev)
    env["threads"] = torch.get_num_threads()
    if dev.type == "cuda":
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    log(f"[bench_step] {env['device_name']} ({dev}), torch {env['torch']}, {env['threads']} CPU threads, "
        f"load {env['load_average_1m']}, B={batch}, K={k}")

    x, y = make_batch(batch, dev)
    names = task_names(k)
    trunk0, heads0 = make_model(k, dev)
    config = {"batch": batch, "batch_issue": BATCH, "K": k, "tasks": names, "image_size": IMAGE_SIZE,
              "channels": 3, "num_classes": NUM_CLASSES, "input": "uint8 on the device", "dtype": "float32",
              "model": f"build_model('hard', K, {NUM_CLASSES}, 3, {IMAGE_SIZE}, trunk='resnet', "
                       f"width={hp['width']}): SmallResNet (ResNet-8) + K linear heads",
              "shared_params": sum(p.numel() for p in trunk0.parameters()),
              "head_params": sum(p.numel() for p in heads0.parameters()),
              "optimizer": f"SGD(lr={hp['lr']}, momentum={hp['momentum']}) (the trainer's)",
              "affinity_every_d": every, "warmup_calls": warmup, "min_repeats": min_repeats,
              "budget_s_per_variant": budget_s, "variants": chosen}
    del trunk0, heads0

    # ---------------- guard: the LibMTL-style step does the baseline's work
    guard = libmtl_guard(k, dev)
    if not guard["passed"]:
        raise GuardError(f"LibMTL-style summed per-task gradients differ from one backward: {guard}")
    log(f"[bench_step] guard passed: K backward() summed == one backward (rel. diff "
        f"{guard['rel_max_abs_diff_shared']:.1e})")

    # ---------------- the variants
    specs = build_variants(x, y, k, dev, hp, every=every)
    variants: dict[str, dict[str, Any]] = {}
    for name in chosen:
        t0 = time.perf_counter()
        try:
            res = _time_variant(name, specs[name], batch, k, dev, warmup=warmup, budget_s=budget_s,
                                min_repeats=min_repeats, max_repeats=100)
        except GuardError:
            raise
        except Exception as err:  # noqa: BLE001
            res = {**_error(err), "label": specs[name].get("label", LABELS[name])}
        variants[name] = res
        specs[name] = None   # free the model copy
        what = (f"{res['ms_per_step']:.1f} ms/step, {res['images_per_s']:,.0f} img/s, loss "
                f"{res['loss_first']:.3f} -> {res['loss_last']:.3f} ({res['repeats']} repeats)"
                if res["status"] == "ok" else f"{res['status']}: {res['reason']}")
        log(f"[bench_step] {res['label']:<52} {what}  ({time.perf_counter() - t0:.1f} s)")
    del specs

    # ---------------- components: the augmentation alone
    import mtdl_fast as mf

    transforms = torchvision_transforms(names, IMAGE_SIZE)
    mtasks = mf.DistributionTasks(names, seed=0)
    components = {
        AUG_TORCHVISION: _time_component(lambda: torchvision_views(x, transforms), COMPONENT_LABELS[AUG_TORCHVISION],
                                         batch, dev, min(budget_s, 2.0), min_repeats),
        AUG_MTDL: _time_component(lambda: mtasks(x), COMPONENT_LABELS[AUG_MTDL], batch, dev, min(budget_s, 2.0),
                                  min_repeats),
    }
    for name, r in components.items():
        log(f"[bench_step] {r['label']:<52} " + (f"{r['ms']:.1f} ms" if r["status"] == "ok" else r["reason"]))

    # ---------------- FLOPs and the physical floor
    t0 = time.perf_counter()
    try:
        flops = step_flops(batch, k, dev)
    except Exception as err:  # noqa: BLE001
        flops = _error(err)
    peak: dict[str, Any] = {}
    try:
        peak["measured_matmul"] = C.matmul_tflops(dev, budget_s=0.3 if quick else 1.0)
    except Exception as err:  # noqa: BLE001
        peak["measured_matmul"] = _error(err)
    spec, spec_desc = C.spec_peak_tflops(env["device_name"]) if dev.type == "cuda" else (None, None)
    peak["spec_TFLOPs"], peak["spec_source"] = spec, spec_desc
    peak["note"] = ("CUDA: published dense peaks (cuDNN convolutions run in TF32 under torch's defaults, so "
                    "tf32 is the relevant one) and a measured fp32 matmul rate" if dev.type == "cuda" else
                    "CPU: no published peak; the reference is a float32 torch.mm rate measured on the spot with "
                    "the same thread count")
    mm = peak["measured_matmul"].get("TFLOPs")
    step_f = flops.get("step_flops")
    for res in variants.values():
        if res.get("status") != "ok" or not step_f:
            continue
        res["useful_TFLOPs_per_s"] = step_f / res["s_per_step"] / 1e12
        res["frac_measured_matmul"] = res["useful_TFLOPs_per_s"] / mm if mm else None
        res["frac_spec_peak"] = ({dt: res["useful_TFLOPs_per_s"] / p for dt, p in spec.items()} if spec else None)
    log(f"[bench_step] FLOPs and peak measured ({time.perf_counter() - t0:.1f} s)")

    env["load_average_1m_end"] = C.load_average()
    env["wall_s"] = time.perf_counter() - t_start
    notes = [
        "every variant starts from the same initial parameters and trains its own copy on the same uint8 "
        "batch (fixed random labels), augmentation inside the timed region; ms/step is the median over "
        "timed calls after warm-up",
        f"(d) is timed over whole cycles of {every} steps (one exact affinity step and {every - 1} plain ones), "
        "so its per-step time is the cycle's mean",
        "the baseline and (f) use torchvision.transforms.v2 random transforms image by image with the "
        "mtdl-fast tasks' default ranges (bilinear warps); gaussian_noise draws sigma per call (v2.GaussianNoise "
        "takes a fixed sigma)",
        "(f) does the baseline's FLOPs (checked: its summed per-task gradients equal one backward): in MTDL "
        "task k's loss depends on view k only, so K backward() calls cost one backward plus K gradient "
        "copies",
        "engine variants: MTDLEngine defaults (sum weighting, skip_nonfinite=True reads the loss on the host "
        "once per step, the lookahead previews the SGD-with-momentum update)",
        "useful TFLOP/s = FLOPs of one training step (forward + backward of the model on the K*B views) / "
        "step time; the affinity variants do more work than that",
    ]
    section: dict[str, Any] = {"env": env, "quick": quick, "config": config, "guard": guard,
                               "variants": variants, "components": components, "flops": flops, "peak": peak,
                               "notes": notes}
    section["ratios"] = ratios(section)
    section["targets"] = targets(section)
    section["table"] = table(section)
    return section


# ----------------------------------------------------------------------------------------------
# Ratios, targets, table
# ----------------------------------------------------------------------------------------------

def _t(section: dict[str, Any], name: str) -> float | None:
    r = section["variants"].get(name, {})
    return r["s_per_step"] if r.get("status") == "ok" else None


def ratios(section: dict[str, Any]) -> dict[str, float | None]:
    """Speed of every variant relative to the baseline (> 1: faster) and overheads over (b)."""
    base, no_aff = _t(section, BASELINE), _t(section, NO_AFF)
    out: dict[str, float | None] = {}
    for name in VARIANTS[1:]:
        t = _t(section, name)
        out[f"{name}_vs_baseline"] = base / t if base and t else None
    for name in (FIRST, EXACT10, EXACT1, LIBMTL):
        t = _t(section, name)
        out[f"{name}_overhead_over_no_affinity"] = t / no_aff - 1 if t and no_aff else None
    aug_tv = section.get("components", {}).get(AUG_TORCHVISION, {})
    aug_mf = section.get("components", {}).get(AUG_MTDL, {})
    out["augment_torchvision_share_of_baseline"] = (aug_tv["median_s"] / base if aug_tv.get("status") == "ok"
                                                    and base else None)
    out["augment_mtdl_share_of_no_affinity"] = (aug_mf["median_s"] / no_aff if aug_mf.get("status") == "ok"
                                                and no_aff else None)
    return out


def targets(section: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's targets (GPU) as booleans; None on the CPU or when a side is missing."""
    r = section["ratios"]
    on_gpu = section["env"]["device"] == "cuda"
    speed = r.get(f"{NO_AFF}_vs_baseline")
    over = r.get(f"{EXACT10}_overhead_over_no_affinity")
    return {
        "gpu_mtdl_no_affinity_ge_5x_baseline": (speed >= TARGET_GPU_SPEEDUP if on_gpu and speed is not None
                                                else None),
        "gpu_exact_every_10_le_15pct_over_no_affinity": (over <= TARGET_GPU_EXACT10_OVERHEAD
                                                         if on_gpu and over is not None else None),
    }


def _pct(v: float | None) -> str:
    return f"{100 * v:+.1f}%" if v is not None else "-"


def variant_rows(section: dict[str, Any]) -> list[list[str]]:
    """Rows of the variants table."""
    base = _t(section, BASELINE)
    no_aff = _t(section, NO_AFF)
    cuda = section["env"]["device"] == "cuda"
    rows = []
    for name in VARIANTS:
        r = section["variants"].get(name)
        if r is None:
            continue
        label = r.get("label", LABELS.get(name, name))
        if r.get("status") != "ok":
            rows.append([label, r.get("status", "?"), "", "", "", "", "", r.get("reason", "")[:90]])
            continue
        t = r["s_per_step"]
        if cuda and r.get("frac_spec_peak"):
            frac = f"{100 * r['frac_spec_peak']['tf32']:.2g}% tf32"
        elif r.get("frac_measured_matmul") is not None:
            frac = f"{100 * r['frac_measured_matmul']:.2g}% mm"
        else:
            frac = "-"
        over = "-" if name in (BASELINE, NO_AFF) or not no_aff else _pct(t / no_aff - 1)
        rows.append([label, C.fmt(r["ms_per_step"]), C.fmt(r["images_per_s"]),
                     f"{base / t:.3g}x" if base else "-", over, frac,
                     f"{r['loss_first']:.3g} -> {r['loss_last']:.3g}", f"{r['repeats']} x {r['steps_per_call']}"])
    return rows


VARIANT_HEADER = ["variant", "ms/step", "images/s", "vs baseline", "over (b)", "% of peak", "loss first -> last",
                  "timed calls x steps"]
VARIANT_ALIGN = "lrrrrrll"


def table(section: dict[str, Any]) -> str:
    """Markdown: the variants, the augmentation alone, FLOPs and peak, ratios and targets."""
    env, cfg = section["env"], section["config"]
    head = (f"End-to-end MTDL training step, K={cfg['K']} tasks, B={cfg['batch']}, "
            f"{cfg['image_size']}x{cfg['image_size']}, {cfg['model']}, {cfg['optimizer']}, float32, train mode -- "
            f"{env['device_name']} ({env['device']}, {env['threads']} CPU threads, load average "
            f"{env.get('load_average_1m')} -> {env.get('load_average_1m_end')}), torch {env['torch']}, "
            f"{env['date']}. images/s counts the B input images (each trained in K views); 'vs baseline' is "
            f"the speed relative to (a) (> 1: faster); 'over (b)' is the step time over mtdl-fast without "
            f"affinity; '% of peak' is the training step's FLOPs per second as a share of "
            + ("the published tf32 dense peak" if env["device"] == "cuda" else
               "a float32 torch.mm rate measured on the spot (no published CPU peak)") + ".\n\n")
    tbl = C.markdown_table(variant_rows(section), VARIANT_HEADER, VARIANT_ALIGN)
    comp = []
    for name, r in section.get("components", {}).items():
        comp.append([r.get("label", name), C.fmt(r["ms"]) if r.get("status") == "ok" else r.get("reason", ""),
                     C.fmt(r["images_per_s"]) if r.get("status") == "ok" else "-"])
    comp_tbl = C.markdown_table(comp, ["component", "ms/call", "images/s"], "lrr")
    fl, pk = section.get("flops", {}), section.get("peak", {})
    mm = pk.get("measured_matmul", {})
    floor = ""
    if fl.get("step_flops"):
        floor = (f"FLOPs of one training step: {fl['step_flops'] / 1e9:.4g} GFLOP (forward {fl['forward_flops'] / 1e9:.4g}"
                 f" GFLOP, ratio {fl['step_over_forward']:.3g}; counted at B={fl['counted_at_batch']}"
                 + (f", linear in B: {fl['linear_in_batch']}" if fl.get("linear_in_batch") is not None else "")
                 + "). ")
    if mm.get("TFLOPs"):
        floor += f"Measured matmul rate: {mm['TFLOPs'] * 1e3:.4g} GFLOP/s ({mm['method']}). "
    if pk.get("spec_TFLOPs"):
        floor += ("Published dense peaks (" + pk["spec_source"] + "): "
                  + ", ".join(f"{dt} {v:g} TFLOP/s" for dt, v in pk["spec_TFLOPs"].items()) + ". ")
    g = section.get("guard", {})
    guard = (f"Guard: LibMTL-style summed per-task gradients vs one backward, relative max abs diff "
             f"{g.get('rel_max_abs_diff_shared', float('nan')):.1e} (rtol {g.get('rtol')}) -> passed: {g.get('passed')}")
    rt, tg = section.get("ratios") or {}, section.get("targets") or {}
    lines = [f"- {k}: {C.fmt(v) if isinstance(v, float) else v}" for k, v in rt.items()]
    tlines = [f"- {k}: {v}" + (" (GPU target; not judged on the CPU)" if v is None and env["device"] != "cuda" else "")
              for k, v in tg.items()]
    return (head + tbl + "\n\n" + comp_tbl + "\n\n" + floor + "\n\n" + guard + "\n\nRatios:\n" + "\n".join(lines)
            + "\n\nTargets:\n" + "\n".join(tlines))


def write(section: dict[str, Any], path: Path | str | None = None, plot: bool = True) -> Path:
    """Merge ``section`` into the result file (key ``step``); save the table and the plot beside it."""
    path = C.write_section(section, SECTION, path)
    if plot:
        import render_readme

        render_readme.plot_step(section, path.with_name(path.stem + "-step.png"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help=f"B={QUICK_BATCH}, K={QUICK_TASKS}, one repeat: a smoke run")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {BATCH})")
    p.add_argument("--tasks", type=int, default=None, help=f"number of tasks K (default {K_TASKS})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on the CPU)")
    p.add_argument("--budget", type=float, default=None, help="timing budget per variant (s)")
    p.add_argument("--every", type=int, default=AFFINITY_EVERY, help="affinity period of variant (d) (default 10)")
    p.add_argument("--only", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help=f"comma-separated variants among: {', '.join(VARIANTS)} (the baseline always runs)")
    C.add_output_args(p)
    args = p.parse_args(argv)
    return C.finish("bench_step", args, lambda: run(args.quick, args.device, batch=args.batch, tasks=args.tasks,
                                                    threads=args.threads, budget_s=args.budget, every=args.every,
                                                    only=args.only), write)


if __name__ == "__main__":
    sys.exit(main())
