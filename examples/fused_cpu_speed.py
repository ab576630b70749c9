"""How fast the fused CPU path makes K views on this machine, against the torch path and the copy floor.

For the default ten tasks and uint8 -> float32 views (torch.utils.benchmark, wall time, median):
  fused C++  mtdl_fast.fused_cpu.fused_views_cpu on the tables of one sampled parameter set;
  torch      DistributionTasks(backend="torch").apply with the same parameters;
  floor      out.copy_(views): reading and writing the K outputs once, the least any path can do.

    python examples/fused_cpu_speed.py --threads 1 2
"""
from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as benchmark

import mtdl_fast as mf
from mtdl_fast.fused_cpu import fused_views_cpu

SHAPES = {"256x32": (256, 32), "32x224": (32, 224), "128x224": (128, 224)}


def median_ms(stmt: str, env: dict, threads: int, seconds: float) -> float:
    timer = benchmark.Timer(stmt, globals=env, num_threads=threads)
    return timer.blocked_autorange(min_run_time=seconds).median * 1e3


def measure(batch: int, side: int, threads: int, seconds: float, with_torch: bool) -> dict[str, float]:
    x = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tasks = mf.DistributionTasks(mf.DEFAULT_TASKS, seed=0, backend="torch")
    params = tasks.sample(batch, (side, side))
    spatial, ops, table = tasks.kernel_tables(params, torch.device("cpu"))
    out = torch.empty((len(tasks), *x.shape))
    views = fused_views_cpu(x, spatial, ops, table, seed=params.seed)
    env = dict(fused_views_cpu=fused_views_cpu, x=x, spatial=spatial, ops=ops, table=table, seed=params.seed,
               out=out, views=views, tasks=tasks, params=params)
    times = {"fused": median_ms("fused_views_cpu(x, spatial, ops, table, seed=seed, out=out)", env, threads, seconds),
             "floor": median_ms("out.copy_(views)", env, threads, seconds)}
    if with_torch:
        times["torch"] = median_ms("tasks.apply(x, params)", env, threads, seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum run time per measurement")
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) torch path")
    args = parser.parse_args()
    print(f"{'batch':>8} {'threads':>7} {'fused ms':>9} {'floor ms':>9} {'/floor':>7} {'torch ms':>9} {'speedup':>8}")
    for name in args.shapes:
        for threads in args.threads:
            t = measure(*SHAPES[name], threads, args.seconds, not args.no_torch)
            torch_ms = t.get("torch", float("nan"))
            print(f"{name:>8} {threads:>7} {t['fused']:9.2f} {t['floor']:9.2f} {t['fused'] / t['floor']:7.2f} "
                  f"{torch_ms:9.1f} {torch_ms / t['fused']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
