"""`mtdl-fast profile`: a few MTDL training steps under torch.profiler.

The engine marks its phases with `record_function` (augment, affinity > lookahead / reduction,
forward, backward, optimizer); on CUDA `emit_nvtx` turns them into NVTX ranges for Nsight too.
Writes a Chrome trace and returns a table of the time spent in each phase.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PHASES = ("augment", "affinity", "lookahead", "reduction", "forward", "backward", "optimizer")


def profile_steps(
    out_dir: Path, device: torch.device, steps: int = 4, tasks: Sequence[str] | None = None, batch_size: int = 64
) -> tuple[Path, str]:
    """Profile `steps` engine steps (the first one tracks affinity) on sample photos at 32x32.

    Returns (trace path, markdown table of per-phase wall time in ms).
    """
    import mtdl_fast as mf
    from mtdl_fast.app import data
    from mtdl_fast.engine import MTDLEngine

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    names = list(tasks) if tasks else list(mf.DEFAULT_TASKS)
    tasks_module = mf.DistributionTasks(names, seed=0)
    torch.manual_seed(0)
    trunk = mf.models.SmallResNet(3).to(device)
    heads = mf.models.linear_heads(len(names), trunk.out_features, 10).to(device)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=0.9)
    engine = MTDLEngine(tasks_module, trunk, heads, optimizer, affinity_every=steps)
    x = data.load_sample_photos(32, batch_size, seed=0).to(device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    engine.step(x, y)  # warm-up (kernels compiled, allocator primed); then the profiled steps
    engine.step_count = 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type != "cuda":
        # On a CUDA build without a GPU, kineto logs "gpuGetDeviceCount failed" as an ERROR while
        # exporting a CPU-only trace: nothing is wrong, so keep its log to fatal messages.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    nvtx = torch.autograd.profiler.emit_nvtx() if device.type == "cuda" else nullcontext()
    with nvtx, profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            engine.step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    totals = {name: 0.0 for name in PHASES}
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key] += event.cpu_time_total / 1e3
    rows = [f"| {name} | {ms:.1f} | {ms / steps:.1f} |" for name, ms in totals.items()]
    header = f"Phases over {steps} steps ({len(names)} tasks, B={batch_size}, 32x32, {device}; affinity on step 1)"
    table = "\n".join([header, "", "| phase | total ms | ms/step |", "|---|---:|---:|", *rows])
    return trace, table

