"""Inter-task affinity: the naive TAG loop vs the batched AffinityTracker vs a plain training step.

K = 10 distribution tasks of one batch (``mf.DistributionTasks(mf.DEFAULT_TASKS)``, views computed
once, outside the timed regions), a ResNet-8 trunk (``mf.models.SmallResNet(3)``: 64 features) with
K linear heads (10 classes), 32x32 images, B = 128, float32, the model in train mode (BatchNorm
active). Timed side by side in one run:

* ``naive loop``            -- ``mtdl_fast.lookahead.naive_affinity``: K autograd.grad calls and K x K
  forwards (TAG's reference loop; the definition the batched path is tested against).
* ``batched exact``         -- ``AffinityTracker(trunk, heads, lr=0.1).step(views, y)`` (defaults: all K
  lookahead sources at once, the fused head + cross-entropy Triton kernel on CUDA).
* ``batched exact, fused_ce=False`` -- CUDA only: the same without the Triton head + CE kernel.
* ``first_order``           -- ``AffinityTracker(..., mode="first_order")``: Gram-matrix estimate.
* ``plain step``            -- what a user pays anyway: zero_grad, sum_k CE(head_k(trunk(view_k)), y),
  backward, SGD step (on a copy of the model, so the other contenders see the same parameters).
* ``plain step (stacked)``  -- the same with the trunk run once on all K*B images (what an engine
  would do); BatchNorm statistics then span the K views (a different normalisation, noted).
* ``reduction``             -- ``mtdl_fast.reductions.affinity_update`` on (K,) and (K, K) tensors of
  the device (the C++/CUDA path when built), and ``reduction (gram)``: ``reductions.gram`` on the
  flattened per-task gradients of the shared parameters (K x P of this model), timed separately.

Before anything is timed, a correctness guard asserts that the batched exact Z (every exact variant
run here, chunk sizes included) equals the naive loop's Z within 1e-4 in float32 (TF32 switched off
for the guard on CUDA), so a broken fast path cannot produce a flattering number.

Also reported: peak memory of every contender and of the batched exact step for chunk_size in
(None, 5, 2, 1) -- on CUDA ``torch.cuda.max_memory_allocated`` (reset before each call; reported
as the peak above what was allocated before the call); on the CPU the peak of the bytes that the
CPU allocator hands out during one call, from ``torch.profiler(profile_memory=True)`` allocation
events (the CPU allocator keeps no statistics of its own; tensors allocated before the call are not
counted) -- FLOPs of one call of each contender (``torch.utils.flop_counter.FlopCounterMode``:
convolutions and matmuls only) and the achieved FLOP/s, on known GPUs as a fraction of the
published peak.

Usage::

    python benchmarks/bench_affinity.py                    # full run on cuda if present, else cpu
    python benchmarks/bench_affinity.py --device cpu --quick
    python benchmarks/bench_affinity.py --device cpu --batch 128 --threads 2

Results: section ``affinity`` of ``benchmarks/results/<device-slug>.json`` (other sections kept) and
a markdown table printed (and saved next to it as ``<device-slug>-affinity.md``). ``--quick`` runs
are printed only unless ``--json`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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

SECTION = "affinity"
LR = 0.1
NUM_CLASSES = 10
IMAGE_SIZE = 32
K_TASKS = 10
BATCH = 128                 # the batch size
# On the CPU the full run at B = 128 does not fit the 10-minute budget of one run on one core (one
# batched exact step alone takes ~1.5 min there, and the run needs the correctness guard, >= 2 timed
# repeats of every contender and a memory sweep over four chunk sizes), so the CPU default is 64;
# ``--batch 128`` runs the size anyway. The reduction is recorded in the result.
CPU_DEFAULT_BATCH = 64
QUICK_BATCH, QUICK_TASKS = 16, 4
CHUNK_SIZES = (None, 5, 2, 1)
GUARD_ATOL = 1e-4
FLOP_COUNT_BATCH_CPU = 8    # FLOPs are counted at this batch on the CPU and scaled (linear in B)

NAIVE, EXACT, EXACT_NOFUSE, FIRST_ORDER = "naive loop", "batched exact", "batched exact, fused_ce=False", "first_order"
PLAIN, PLAIN_STACKED, REDUCTION, GRAM = "plain step", "plain step (stacked)", "reduction", "reduction (gram)"
CONTENDERS = [NAIVE, EXACT, EXACT_NOFUSE, FIRST_ORDER, PLAIN, PLAIN_STACKED, REDUCTION, GRAM]
STEP_CONTENDERS = [NAIVE, EXACT, EXACT_NOFUSE, FIRST_ORDER, PLAIN, PLAIN_STACKED]

# Targets of the issue.
TARGET_GPU_EXACT_VS_NAIVE = 4.0       # GPU: batched exact >= 4x faster than the naive loop
TARGET_GPU_FO_VS_PLAIN = 1.3          # GPU: first_order <= 1.3x the plain step
TARGET_CPU_EXACT_VS_NAIVE = 1.5       # CPU: batched exact >= 1.5x faster than the naive loop
TARGET_REDUCTION_FRACTION = 0.01      # the reduction < 1% of a (batched exact) step

GuardError = C.GuardError  # a batched path disagrees with the naive loop: nothing is timed


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------

def task_names(k: int) -> list[str]:
    """The first k of mf.DEFAULT_TASKS (repeated cyclically when k > 10)."""
    import mtdl_fast as mf

    return [mf.DEFAULT_TASKS[i % len(mf.DEFAULT_TASKS)] for i in range(k)]


def make_problem(batch: int, k: int, device: torch.device, seed: int = 0):
    """(trunk, heads, views (K, B, 3, 32, 32) float32 in [0, 1], labels (B,)), all on `device`."""
    import mtdl_fast as mf
    from mtdl_fast.app.data import load_sample_photos

    torch.manual_seed(seed)
    trunk = mf.models.SmallResNet(3).to(device).train()
    heads = mf.models.linear_heads(k, trunk.out_features, NUM_CLASSES).to(device).train()
    x = load_sample_photos(IMAGE_SIZE, batch, seed=seed)
    tasks = mf.DistributionTasks(task_names(k), seed=seed)
    # The views are made on the CPU (same values on every device) and moved; float rounding in a few
    # ops can land a hair outside [0, 1] (1.0000002), hence the clamp.
    views = tasks(x).clamp_(0.0, 1.0).to(device).contiguous()
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    return trunk, heads, views, y


def _plain_step_fn(trunk, heads, views, y, stacked: bool) -> Callable[[], torch.Tensor]:
    """A plain multi-task SGD step on a copy of the model (the originals are left untouched)."""
    trunk, heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=LR)
    k = views.shape[0]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if stacked:
            feats = trunk(views.flatten(0, 1)).unflatten(0, (k, views.shape[1]))
            loss = sum(F.cross_entropy(heads[j](feats[j]), y) for j in range(k))
        else:
            loss = sum(F.cross_entropy(heads[j](trunk(views[j])), y) for j in range(k))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_step_fns(trunk, heads, views, y, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Contender name -> fn() for the step contenders available on `device`."""
    import mtdl_fast as mf
    from mtdl_fast.lookahead import naive_affinity

    fns: dict[str, Callable[[], Any]] = {}
    fns[NAIVE] = lambda: naive_affinity(trunk, heads, views, y, lr=LR)[0]
    exact = mf.AffinityTracker(trunk, heads, lr=LR)
    fns[EXACT] = lambda: exact.step(views, y)
    if device.type == "cuda":
        nofuse = mf.AffinityTracker(trunk, heads, lr=LR, fused_ce=False)
        fns[EXACT_NOFUSE] = lambda: nofuse.step(views, y)
    first = mf.AffinityTracker(trunk, heads, lr=LR, mode="first_order")
    fns[FIRST_ORDER] = lambda: first.step(views, y)
    fns[PLAIN] = _plain_step_fn(trunk, heads, views, y, stacked=False)
    fns[PLAIN_STACKED] = _plain_step_fn(trunk, heads, views, y, stacked=True)
    return fns


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def strict_fp32(device: torch.device):
    """TF32 off (cuDNN convolutions and matmuls) for the guard: float32 means float32 there."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _rusage() -> tuple[float, float, int] | None:
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt
    except (ImportError, OSError):
        return None


_LAST_CALL_CPU: dict[str, Any] = {}


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """fn() and its wall time; the process's user/system CPU time and minor page faults during the
    call are left in _LAST_CALL_CPU (on a CPU run, system time is mostly the kernel zeroing the pages
    of fresh large allocations)."""
    C.synchronize(device)
    r0 = _rusage()
    t0 = time.perf_counter()
    out = fn()
    C.synchronize(device)
    wall = time.perf_counter() - t0
    r1 = _rusage()
    _LAST_CALL_CPU.clear()
    if r0 and r1:
        _LAST_CALL_CPU.update(user_s=r1[0] - r0[0], sys_s=r1[1] - r0[1], minor_page_faults=r1[2] - r0[2])
    return out, wall


def _z_diff(z: torch.Tensor, z_ref: torch.Tensor) -> float:
    if z is None or not isinstance(z, torch.Tensor) or z.shape != z_ref.shape:
        return float("inf")
    if not bool(torch.isfinite(z).all()):
        return float("inf")
    return float((z.double() - z_ref.double()).abs().max())


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """(fn's output, peak bytes allocated during the call, wall seconds under the profiler).

    The CPU allocator keeps no statistics; torch.profiler(profile_memory=True) records every
    allocation and free of it with its size. Their running sum, in time order, is the memory the
    call holds at each moment; its maximum is the peak. Tensors allocated before the call are not
    counted (nor are their frees), and memory that bypasses torch's allocator (e.g. oneDNN's own
    scratch buffers, if any) is not seen.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    allocs = [e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation]
    allocs.sort(key=lambda e: e.start_time_ns)
    cur = peak = 0
    for e in allocs:
        cur += int(e.extra_fields.alloc_size)
        peak = max(peak, cur)
    return out, peak, wall


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, int, float]:
    """(fn's output, peak bytes above those allocated before the call, absolute peak, wall s)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    return out, peak - base, peak, wall


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of fn, with the method; {"peak_status": ...} when it cannot be measured."""
    try:
        if device.type == "cuda":
            out, extra, absolute, wall = cuda_peak_bytes(fn, device)
            return {"out": out, "peak_bytes": extra, "peak_bytes_absolute": absolute, "call_s": wall,
                    "peak_method": "torch.cuda.max_memory_allocated (reset before the call) minus "
                                   "memory_allocated before it"}
        out, peak, wall = cpu_peak_bytes(fn)
        return {"out": out, "peak_bytes": peak, "call_s": wall,
                "peak_method": "torch.profiler(profile_memory=True): max running sum of CPU allocator "
                               "allocations/frees during the call"}
    except Exception as err:  # noqa: BLE001 - e.g. a private profiler API that moved
        return {"out": None, "peak_bytes": None,
                "peak_status": f"unavailable: {type(err).__name__}: {err}".splitlines()[0][:200]}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch.utils.flop_counter's convolution_backward formula with the weight gradient divided by
    `groups`. torch's formula (2.14) ignores groups there and so counts a grouped convolution's
    weight gradient `groups` times over -- exactly the convolutions vmap turns the per-task
    gradients into (groups = K), which would show the batched paths doing (K + 1) / 2 times the
    loop's backward work when they do the same."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], transposed=not transposed)
    if output_mask[1]:
        gw = out_shape[1]
        if transposed:
            f = conv_flop_count(t(grad_out_shape), t(x_shape), t(gw), transposed=False)
        else:
            f = conv_flop_count(t(x_shape), t(grad_out_shape), t(gw), transposed=False)
        flops += f // max(1, int(groups))
    return flops


def count_flops(fn: Callable[[], Any]) -> int:
    """Convolution and matmul FLOPs of one call (torch.utils.flop_counter with grouped convolution
    weight gradients counted once, see _conv_backward_flop; elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flop}) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_call(batch: int, k: int, device: torch.device) -> dict[str, Any]:
    """FLOPs of one call of each step contender at `batch`.

    On CUDA they are counted at the benchmark's batch. On the CPU counting one slow step would add
    minutes, so they are counted at FLOP_COUNT_BATCH_CPU and at half of it, checked to be exactly
    linear in B (convolutions and matmuls of a conv net are) and scaled to `batch`.
    """
    if device.type == "cuda" or batch <= FLOP_COUNT_BATCH_CPU:
        counted = {batch: _count_all(batch, k, device)}
        at = batch
    else:
        at = FLOP_COUNT_BATCH_CPU
        counted = {b: _count_all(b, k, device) for b in (at // 2, at)}
    per = counted[at]
    out: dict[str, Any] = {"counted_at_batch": at, "scaled_to_batch": batch, "flops": {}, "linear_in_batch": None}
    if len(counted) == 2:
        half = counted[at // 2]
        out["linear_in_batch"] = all(per[n] == 2 * half[n] for n in per)
    for name, f in per.items():
        out["flops"][name] = f * batch // at if at != batch else f
    return out


def _count_all(batch: int, k: int, device: torch.device) -> dict[str, int]:
    trunk, heads, views, y = make_problem(batch, k, device)
    fns = build_step_fns(trunk, heads, views, y, device)
    return {name: count_flops(fn) for name, fn in fns.items()}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def _error(err: BaseException) -> dict[str, Any]:
    return {"status": "error", "reason": f"{type(err).__name__}: {err}".splitlines()[0][:300],
            "traceback": traceback.format_exc(limit=3)}


def _time(fn, device, first_s, *, budget_s, quick, max_repeats=100) -> dict[str, Any]:
    """Timing with the house rules; slow calls (> 5 s) get 2 repeats minimum, quick runs one."""
    min_repeats = 1 if quick else (2 if first_s > 5.0 else 3)
    res = C.time_fn(fn, device, budget_s=budget_s, min_repeats=min_repeats, max_repeats=max_repeats,
                    warmup=1, estimate_s=first_s)
    res["first_call_s"] = first_s
    return res


def run(quick: bool = False, device: str = "cpu", *, batch: int | None = None, tasks: int | None = None,
        threads: int | None = None, budget_s: float | None = None, chunk_sizes=None,
        verbose: bool = True) -> dict[str, Any]:
    """Run the affinity benchmark and return its result section (not written to disk).

    Args:
        quick: B = 16, K = 4, one repeat: a smoke run.
        device: "cpu" or "cuda" (ValueError when unknown or unavailable).
        batch: batch size (default: 128 on CUDA, CPU_DEFAULT_BATCH = 64 on the CPU, 16 when quick).
        tasks: number of tasks K (default 10, 4 when quick).
        threads: torch CPU threads during the run (default: 1 on the CPU, torch's choice on CUDA);
            the previous setting is restored afterwards.
        budget_s: timing budget per contender in seconds.
        chunk_sizes: chunk sizes of the memory sweep (default (None, 5, 2, 1); sizes >= K dropped).
        verbose: log progress to stderr.

    Returns:
        dict with "env", "config", "guard", "contenders", "chunk_sweep", "flops", "ratios",
        "targets", "notes" and "table".

    Raises:
        GuardError: a batched exact Z differs from the naive loop's by more than 1e-4.
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
        return _run(quick, dev, batch=batch, tasks=tasks, budget_s=budget_s, chunk_sizes=chunk_sizes,
                    verbose=verbose)
    finally:
        torch.set_num_threads(old_threads)


def _run(quick, dev, *, batch, tasks, budget_s, chunk_sizes, verbose) -> dict[str, Any]:
    from mtdl_fast import reductions

    t_start = time.perf_counter()
    log = C.log if verbose else (lambda msg: None)
    k = tasks if tasks is not None else (QUICK_TASKS if quick else K_TASKS)
    if k < 2:
        raise ValueError(f"tasks must be >= 2, got {k}")
    notes: list[str] = []
    batch_note = None
    if batch is None:
        if quick:
            batch = QUICK_BATCH
        elif dev.type == "cpu":
            batch = CPU_DEFAULT_BATCH
            batch_note = (f"CPU run at B={CPU_DEFAULT_BATCH} instead of the issue's B={BATCH}: on one core "
                          f"of this CPU one batched exact step at B={BATCH} takes ~1.5 min, and the full run "
                          f"(guard, >= 2 repeats of each contender, memory sweep of 4 chunk sizes) would "
                          f"exceed the 10-minute budget; pass --batch {BATCH} for the issue's size")
            notes.append(batch_note)
        else:
            batch = BATCH
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if budget_s is None:
        budget_s = 0.2 if quick else (3.0 if dev.type == "cuda" else 4.0)
    if chunk_sizes is None:
        chunk_sizes = CHUNK_SIZES
    sweep = [c for c in chunk_sizes if c is None or c < k]
    dropped = [c for c in chunk_sizes if c is not None and c >= k]
    if dropped:
        notes.append(f"chunk sizes {dropped} >= K={k} are the same as None and were not run")

    env = C.environment(dev)
    env["threads"] = torch.get_num_threads()
    if dev.type == "cuda":
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        peaks, peak_desc = C.spec_peak_tflops(env["device_name"])
    else:
        peaks, peak_desc = None, None
    env["spec_peak_TFLOPs"] = peaks
    env["spec_peak_TFLOPs_source"] = peak_desc
    env["reduction_backend"] = "extension (mtdl_fast._C)" if reductions._compiled_for(dev) is not None else "torch twin"
    log(f"[bench_affinity] {env['device_name']} ({dev}), torch {env['torch']}, {env['threads']} CPU threads, "
        f"load {env['load_average_1m']}, B={batch}, K={k}")

    trunk, heads, views, y = make_problem(batch, k, dev)
    n_shared = sum(p.numel() for p in trunk.parameters() if p.requires_grad)
    config = {"batch": batch, "batch_issue": BATCH, "batch_note": batch_note, "K": k, "tasks": task_names(k),
              "image_size": IMAGE_SIZE, "channels": 3, "num_classes": NUM_CLASSES, "lr": LR,
              "dtype": "float32", "model": "SmallResNet(3) (ResNet-8, width 16, 64 features) + K linear heads",
              "train_mode": True, "shared_params": n_shared,
              "head_params": sum(p.numel() for p in heads.parameters()), "chunk_sweep": sweep}
    fns = build_step_fns(trunk, heads, views, y, dev)

    # ---------------- correctness guard (before anything is timed)
    guard: dict[str, Any] = {"atol": GUARD_ATOL, "reference": NAIVE, "precision": "float32, TF32 off"}
    first_calls: dict[str, float] = {}
    first_cpu: dict[str, dict[str, Any]] = {}
    with strict_fp32(dev):
        z_ref, first_calls[NAIVE] = _timed_call(fns[NAIVE], dev)
        first_cpu[NAIVE] = dict(_LAST_CALL_CPU)
        z_ref = z_ref.detach().double()
        for name in (EXACT, EXACT_NOFUSE):
            if name not in fns:
                continue
            z, first_calls[name] = _timed_call(fns[name], dev)
            first_cpu[name] = dict(_LAST_CALL_CPU)
            guard[f"max_abs_diff_{name}"] = _z_diff(z, z_ref)
        z_fo, first_calls[FIRST_ORDER] = _timed_call(fns[FIRST_ORDER], dev)
        first_cpu[FIRST_ORDER] = dict(_LAST_CALL_CPU)
    guard["first_order_max_abs_diff_from_exact (approximation, not checked)"] = _z_diff(z_fo, z_ref)
    bad = {n: guard[f"max_abs_diff_{n}"] for n in (EXACT, EXACT_NOFUSE)
           if f"max_abs_diff_{n}" in guard and not guard[f"max_abs_diff_{n}"] <= GUARD_ATOL}
    guard["passed"] = not bad
    if bad:
        raise GuardError(f"batched exact Z differs from the naive loop's by {bad} > {GUARD_ATOL}: not timing it")
    guard["z_naive"] = z_ref.cpu().tolist()
    log("[bench_affinity] guard passed: " + ", ".join(
        f"{n} max|dZ| {guard[f'max_abs_diff_{n}']:.2e}" for n in (EXACT, EXACT_NOFUSE) if f"max_abs_diff_{n}" in guard))

    # ---------------- step contenders
    contenders: dict[str, dict[str, Any]] = {}
    for name in STEP_CONTENDERS:
        if name not in fns:
            contenders[name] = {"status": "skipped", "reason": "CUDA only: the fused Triton head + CE kernel "
                                                               "is never used on the CPU"}
            continue
        t0 = time.perf_counter()
        try:
            fn = fns[name]
            if name not in first_calls:
                out, first_calls[name] = _timed_call(fn, dev)
                first_cpu[name] = dict(_LAST_CALL_CPU)
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"non-finite output {out}")
            res = {"status": "ok", **_time(fn, dev, first_calls[name], budget_s=budget_s, quick=quick)}
            if first_cpu.get(name):
                res["first_call_process_cpu"] = first_cpu[name]
            res["ms"] = res["median_s"] * 1e3
            res["images_per_s"] = batch / res["median_s"]
            if name != EXACT:   # the exact step's memory comes from the chunk sweep (chunk_size None)
                mem = peak_memory(fn, dev)
                mem.pop("out", None)
                mem.pop("call_s", None)
                res.update(mem)
        except Exception as err:  # noqa: BLE001
            res = _error(err)
        if name == PLAIN_STACKED:
            res["note"] = ("trunk run once on all K*B images: BatchNorm statistics span the K views "
                           "(not the per-view semantics of the affinity step)")
            res["note_short"] = "trunk once on K*B images: BN stats span views"
        contenders[name] = res
        what = f"{res['ms']:.1f} ms ({res['repeats']} repeats)" if res["status"] == "ok" else res["reason"]
        log(f"[bench_affinity] {name:<30} {what}  ({time.perf_counter() - t0:.1f} s)")

    # ---------------- reductions
    contenders[REDUCTION] = _bench_reduction(k, dev, budget_s, quick)
    contenders[GRAM] = _bench_gram(trunk, heads, views, y, dev, budget_s, quick)
    for name in (REDUCTION, GRAM):
        r = contenders[name]
        log(f"[bench_affinity] {name:<30} " + (f"{r['ms'] * 1e3:.1f} us" if r["status"] == "ok" else r["reason"]))

    # ---------------- chunk sweep: peak memory (and time) of the batched exact step
    chunk_rows = []
    for cs in sweep:
        t0 = time.perf_counter()
        row = _sweep_row(trunk, heads, views, y, z_ref, cs, dev, budget_s, quick, contenders.get(EXACT))
        chunk_rows.append(row)
        pk = row.get("peak_bytes")
        log(f"[bench_affinity] chunk_size={cs}: " + (
            f"{row['ms']:.1f} ms, peak {pk / 2**20:.0f} MiB" if row["status"] == "ok" and pk is not None
            else row.get("reason") or row.get("peak_status", "")) + f"  ({time.perf_counter() - t0:.1f} s)")
    if contenders.get(EXACT, {}).get("status") == "ok" and chunk_rows and chunk_rows[0]["chunk_size"] is None:
        for key in ("peak_bytes", "peak_bytes_absolute", "peak_method", "peak_status"):
            if key in chunk_rows[0]:
                contenders[EXACT][key] = chunk_rows[0][key]
    for res in [*contenders.values(), *chunk_rows]:
        if res.get("peak_bytes") is not None:
            res["peak_MiB"] = res["peak_bytes"] / 2**20

    # ---------------- FLOPs and the physical floor
    t0 = time.perf_counter()
    try:
        flops = flops_per_call(batch, k, dev)
    except Exception as err:  # noqa: BLE001
        flops = {"status": "error", **_error(err), "flops": {}}
    log(f"[bench_affinity] FLOPs counted ({time.perf_counter() - t0:.1f} s)")
    ref_flops = flops["flops"].get(NAIVE)
    for name, f in flops["flops"].items():
        res = contenders.get(name, {})
        if res.get("status") != "ok":
            continue
        res["flops"] = f
        res["GFLOPs_per_s"] = f / res["median_s"] / 1e9
        if ref_flops:
            res["flops_vs_naive"] = f / ref_flops
        if peaks:
            res["frac_peak"] = {dt: res["GFLOPs_per_s"] / 1e3 / p for dt, p in peaks.items()}

    env["load_average_1m_end"] = C.load_average()
    env["wall_s"] = time.perf_counter() - t_start
    notes += [
        "views and labels are made once, outside every timed region; the model is in train mode",
        "plain steps run on deep copies of the model, so every contender sees the same parameters",
        "reduction = reductions.affinity_update on (K,) float64 losses and a (K, K) lookahead matrix, "
        "Python-side argument checks included; gram = reductions.gram on the (K, P) float32 per-task "
        "gradients of the shared parameters",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls only; elementwise ops, "
        "the C++/CUDA reductions and the fused Triton head+CE kernel are not counted: the kernel's "
        f"K*K*B*64*{NUM_CLASSES}*2 FLOPs are negligible), with a local fix: torch's convolution_backward "
        "formula counts a grouped convolution's weight gradient `groups` times over, and vmap turns the "
        "per-task gradients into grouped convolutions (groups = K); counted correctly, the batched exact "
        "step does the naive loop's FLOPs and first_order the plain step's",
    ]
    if dev.type == "cpu":
        notes.append("CPU memory: the CPU allocator has no statistics, so the peak is the maximum running "
                     "sum of the allocations and frees that torch.profiler(profile_memory=True) records "
                     "during one call (tensors that existed before the call are not counted; memory that "
                     "bypasses torch's allocator is not seen). On the CPU the chunk sweep's time is that "
                     "one profiled call; the batched exact row's time is the median of its timed repeats")
        notes.append("CPU: no published FLOP/s peak is used; GFLOP/s is reported as measured")
    else:
        notes.append("CUDA: timings with cuDNN TF32 at torch's default (allow_tf32 recorded in env); the "
                     "guard ran with TF32 off. frac_peak compares with dense fp32/tf32/bf16 peaks")
    section: dict[str, Any] = {"env": env, "quick": quick, "config": config, "guard": guard,
                               "contenders": contenders, "chunk_sweep": chunk_rows, "flops": flops,
                               "notes": notes}
    section["ratios"] = ratios(section)
    section["targets"] = targets(section)
    section["table"] = table(section)
    return section


def _bench_reduction(k: int, dev: torch.device, budget_s: float, quick: bool) -> dict[str, Any]:
    from mtdl_fast import reductions

    try:
        gen = torch.Generator().manual_seed(2)
        base = (torch.rand(k, generator=gen, dtype=torch.float64) + 1.5).to(dev)
        la = (torch.rand(k, k, generator=gen, dtype=torch.float64) + 1.4).to(dev)
        total = torch.zeros(k, k, dtype=torch.float64, device=dev)
        count = torch.zeros(k, k, dtype=torch.int64, device=dev)
        res: dict[str, Any] = {"status": "ok", "shapes": f"base ({k},), lookahead ({k}, {k}) float64"}
        res.update(_time_backends(lambda b: reductions.affinity_update(base, la, total, count, backend=b),
                                  dev, budget_s, quick))
        res["ms"] = res["median_s"] * 1e3
        res["backend"] = "extension" if reductions._compiled_for(dev) is not None else "torch twin"
        res["note_short"] = f"{res['backend']}; torch twin {res['torch_twin_median_s'] * 1e6:.3g} us"
        return res
    except Exception as err:  # noqa: BLE001
        return _error(err)


def _time_backends(call: Callable[[str], Any], dev, budget_s, quick) -> dict[str, Any]:
    """Timing of call("auto") (the extension where built), plus the median of call("torch") (its
    twin) as ``torch_twin_median_s``."""
    out: dict[str, Any] = {}
    for backend in ("auto", "torch"):
        fn = lambda b=backend: call(b)  # noqa: E731
        _, first = _timed_call(fn, dev)
        t = _time(fn, dev, first, budget_s=min(budget_s, 1.0), quick=quick, max_repeats=1000)
        if backend == "auto":
            out.update(t)
        else:
            out["torch_twin_median_s"] = t["median_s"]
    return out


def _bench_gram(trunk, heads, views, y, dev, budget_s, quick) -> dict[str, Any]:
    import mtdl_fast as mf
    from mtdl_fast import reductions

    try:
        tr = mf.AffinityTracker(trunk, heads, lr=LR, mode="first_order")
        tr.step(views, y)
        k = views.shape[0]
        flat = torch.cat([g.reshape(k, -1) for g in tr.last_task_grads["shared"].values()], dim=1).contiguous()
        del tr
        res: dict[str, Any] = {"status": "ok", "shape": list(flat.shape), "dtype": str(flat.dtype)}
        res.update(_time_backends(lambda b: reductions.gram(flat, backend=b), dev, budget_s, quick))
        res["ms"] = res["median_s"] * 1e3
        res["GBps"] = flat.numel() * flat.element_size() / res["median_s"] / 1e9
        res["backend"] = "extension" if reductions._compiled_for(dev) is not None else "torch twin"
        res["note_short"] = (f"{res['backend']}, K x P = {k} x {flat.shape[1]}; "
                             f"torch twin {res['torch_twin_median_s'] * 1e6:.3g} us")
        return res
    except Exception as err:  # noqa: BLE001
        return _error(err)


def _sweep_row(trunk, heads, views, y, z_ref, cs, dev, budget_s, quick, exact_res) -> dict[str, Any]:
    """Peak memory (and time) of the batched exact step at chunk_size=cs, its Z checked too."""
    import mtdl_fast as mf

    row: dict[str, Any] = {"chunk_size": cs}
    try:
        tr = mf.AffinityTracker(trunk, heads, lr=LR, chunk_size=cs)
        if dev.type == "cuda":
            with strict_fp32(dev):
                z, first = _timed_call(lambda: tr.step(views, y), dev)
            row["max_abs_diff_vs_naive"] = _z_diff(z, z_ref)
            if not row["max_abs_diff_vs_naive"] <= GUARD_ATOL:
                raise GuardError(f"chunk_size={cs}: Z differs from the naive loop's by "
                                 f"{row['max_abs_diff_vs_naive']:.3g} > {GUARD_ATOL}")
            timing = _time(lambda: tr.step(views, y), dev, first, budget_s=budget_s, quick=quick)
            mem = peak_memory(lambda: tr.step(views, y), dev)
            mem.pop("out", None)
            mem.pop("call_s", None)
            row.update(status="ok", **timing, **mem)
        else:
            # One call under the memory profiler gives Z, the peak and the time (the slow CPU step is
            # not repeated); with profile_memory only, the profiler adds well under 1% to these calls.
            mem = peak_memory(lambda: tr.step(views, y), dev)
            z = mem.pop("out", None)
            if z is None:   # the profiler failed: time one plain call instead
                z, call_s = _timed_call(lambda: tr.step(views, y), dev)
                mem["call_s"] = call_s
            row["max_abs_diff_vs_naive"] = _z_diff(z, z_ref)
            if not row["max_abs_diff_vs_naive"] <= GUARD_ATOL:
                raise GuardError(f"chunk_size={cs}: Z differs from the naive loop's by "
                                 f"{row['max_abs_diff_vs_naive']:.3g} > {GUARD_ATOL}")
            call_s = mem.pop("call_s")
            row.update(status="ok", median_s=call_s, repeats=1,
                       method="perf_counter, 1 call under torch.profiler(profile_memory=True)", **mem)
        row["ms"] = row["median_s"] * 1e3
        return row
    except GuardError:
        raise
    except Exception as err:  # noqa: BLE001
        row.update(_error(err))
        return row


# ----------------------------------------------------------------------------------------------
# Ratios, targets, table
# ----------------------------------------------------------------------------------------------

def _t(section, name) -> float | None:
    r = section["contenders"].get(name, {})
    return r["median_s"] if r.get("status") == "ok" else None


def ratios(section: dict[str, Any]) -> dict[str, float | None]:
    """The issue's ratios (None where a side is missing)."""
    def div(a, b):
        return a / b if a is not None and b else None

    naive, exact, nofuse = _t(section, NAIVE), _t(section, EXACT), _t(section, EXACT_NOFUSE)
    fo, plain, stacked = _t(section, FIRST_ORDER), _t(section, PLAIN), _t(section, PLAIN_STACKED)
    red, gram = _t(section, REDUCTION), _t(section, GRAM)
    out = {
        "naive_over_batched_exact": div(naive, exact),
        "naive_over_batched_exact_no_fused_ce": div(naive, nofuse),
        "no_fused_ce_over_fused_ce": div(nofuse, exact),
        "first_order_over_plain_step": div(fo, plain),
        "first_order_over_plain_step_stacked": div(fo, stacked),
        "batched_exact_over_plain_step": div(exact, plain),
        "naive_over_plain_step": div(naive, plain),
        "plain_step_over_plain_step_stacked": div(plain, stacked),
        "reduction_over_batched_exact": div(red, exact),
        "reduction_over_plain_step": div(red, plain),
        "gram_over_first_order": div(gram, fo),
        "gram_over_batched_exact": div(gram, exact),
    }
    rows = [r for r in section.get("chunk_sweep", []) if r.get("status") == "ok"]
    if rows:
        best = min(rows, key=lambda r: r["median_s"])
        out["best_chunk_size_by_time"] = best["chunk_size"]
        out["naive_over_batched_exact_best_chunk"] = div(naive, best["median_s"])
    return out


def targets(section: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's targets as booleans (None when not measurable in this run)."""
    r = section["ratios"]
    on_gpu = section["env"]["device"] == "cuda"
    ge = lambda v, t: None if v is None else v >= t  # noqa: E731
    le = lambda v, t: None if v is None else v <= t  # noqa: E731
    out: dict[str, bool | None] = {}
    if on_gpu:
        out["gpu_batched_exact_ge_4x_naive"] = ge(r["naive_over_batched_exact"], TARGET_GPU_EXACT_VS_NAIVE)
        out["gpu_first_order_le_1.3x_plain_step"] = le(r["first_order_over_plain_step"], TARGET_GPU_FO_VS_PLAIN)
    else:
        out["cpu_batched_exact_ge_1.5x_naive"] = ge(r["naive_over_batched_exact"], TARGET_CPU_EXACT_VS_NAIVE)
    red = r["reduction_over_batched_exact"]
    out["reduction_lt_1pct_of_step"] = None if red is None else red < TARGET_REDUCTION_FRACTION
    out["guard_passed"] = bool(section["guard"].get("passed"))
    return out


def _mib(res: dict[str, Any]) -> str:
    v = res.get("peak_MiB")
    return C.fmt(v) if v is not None else "-"


def table(section: dict[str, Any]) -> str:
    """Markdown: the contenders, the chunk sweep, ratios and targets."""
    env, cfg = section["env"], section["config"]
    exact = _t(section, EXACT)
    naive = _t(section, NAIVE)
    rows = []
    for name in CONTENDERS:
        r = section["contenders"].get(name)
        if r is None:
            continue
        if r.get("status") != "ok":
            rows.append([name, r["status"], "", "", "", "", "", "", "", r.get("reason", "")[:90]])
            continue
        ms = r["ms"]
        t = r["median_s"]
        frac = r.get("frac_peak")
        pc = r.get("first_call_process_cpu") or {}
        busy = (pc.get("user_s") or 0) + (pc.get("sys_s") or 0)
        sys_share = f"{100 * pc['sys_s'] / busy:.0f}%" if busy > 0 else "-"
        rows.append([name, C.fmt(ms) if ms >= 0.1 else f"{ms:.3g}", r["repeats"],
                     f"{naive / t:.3g}x" if naive and name in STEP_CONTENDERS else "-",
                     f"{100 * t / exact:.3g}%" if exact else "-",
                     _mib(r), sys_share,
                     C.fmt(r["GFLOPs_per_s"]) if r.get("GFLOPs_per_s") is not None else "-",
                     (f"{100 * frac['fp32']:.1f}% / {100 * frac['tf32']:.1f}% / {100 * frac['bf16']:.1f}%"
                      if frac else "-"),
                     r.get("note_short", r.get("backend", ""))])
    head = (f"Inter-task affinity, K={cfg['K']} tasks, B={cfg['batch']}, {cfg['image_size']}x{cfg['image_size']}, "
            f"ResNet-8 (64 features) + linear heads, float32, train mode -- {env['device_name']} ({env['device']}, "
            f"{env['threads']} CPU threads, load average {env.get('load_average_1m')} -> "
            f"{env.get('load_average_1m_end')}), torch {env['torch']}, {env['date']}. "
            f"'vs naive' is the speed relative to the naive loop (> 1: faster); '% of exact' is the time as a "
            f"share of one batched exact step; 'sys CPU' is the share of the process's CPU time spent in the "
            f"kernel during the first call (page faults of fresh allocations); GFLOP/s counts convolutions and matmuls "
            f"(FlopCounterMode); peak columns are fp32 / tf32 / bf16 dense peaks"
            + (f" of {env['spec_peak_TFLOPs_source']}" if env.get("spec_peak_TFLOPs_source") else " (unknown here)")
            + ".\n\n")
    if cfg.get("batch_note"):
        head += f"Note: {cfg['batch_note']}.\n\n"
    tbl = C.markdown_table(rows, ["contender", "ms/call", "repeats", "vs naive", "% of exact", "peak MiB",
                                  "sys CPU", "GFLOP/s", "% of peak (fp32/tf32/bf16)", "note"], align="lrrrrrrrrl")
    srows = []
    for r in section.get("chunk_sweep", []):
        if r.get("status") != "ok":
            srows.append([str(r["chunk_size"]), r.get("status"), "", "", "", r.get("reason", "")[:80]])
            continue
        srows.append([str(r["chunk_size"]), C.fmt(r["ms"]), r["repeats"], _mib(r),
                      f"{r['max_abs_diff_vs_naive']:.1e}",
                      f"{naive / r['median_s']:.3g}x" if naive else "-"])
    sweep = C.markdown_table(srows, ["chunk_size", "ms/call", "repeats", "peak MiB", "max abs dZ vs naive",
                                     "vs naive"], align="lrrrrr")
    method = next((r.get("peak_method") for r in section.get("chunk_sweep", []) if r.get("peak_method")), None)
    rt = section.get("ratios") or {}
    tg = section.get("targets") or {}
    lines = [f"- {k}: {C.fmt(v) if isinstance(v, float) else v}" for k, v in rt.items()]
    tlines = [f"- {k}: {v}" for k, v in tg.items()]
    g = section["guard"]
    guard = (f"Correctness guard (naive Z vs batched exact Z, atol {g['atol']}, {g['precision']}): "
             + ", ".join(f"{k[len('max_abs_diff_'):]} {v:.1e}" for k, v in g.items() if k.startswith("max_abs_diff_"))
             + f" -> passed: {g['passed']}")
    return (head + tbl + "\n\nBatched exact step by chunk_size (peak memory: " + (method or "unavailable")
            + (", the time is one profiled call" if env["device"] == "cpu" else "") + "):\n\n" + sweep
            + "\n\n" + guard + "\n\nRatios:\n" + "\n".join(lines) + "\n\nTargets:\n" + "\n".join(tlines))


def write(section: dict[str, Any], path: Path | str | None = None) -> Path:
    """Merge ``section`` into the result file (key ``affinity``) and save the table beside it."""
    return C.write_section(section, SECTION, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help=f"B={QUICK_BATCH}, K={QUICK_TASKS}, one repeat: a smoke run")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size (default {BATCH} on CUDA, {CPU_DEFAULT_BATCH} on the CPU)")
    p.add_argument("--tasks", type=int, default=None, help=f"number of tasks K (default {K_TASKS})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on the CPU)")
    p.add_argument("--budget", type=float, default=None, help="timing budget per contender (s)")
    C.add_output_args(p)
    args = p.parse_args(argv)
    return C.finish("bench_affinity", args, lambda: run(args.quick, args.device, batch=args.batch, tasks=args.tasks,
                                                        threads=args.threads, budget_s=args.budget), write)


if __name__ == "__main__":
    sys.exit(main())
