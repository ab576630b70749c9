"""End-to-end MTDL training step: six ways to train the ten default tasks on one batch, side by side.

The trainer's model (SmallResNet + K linear heads) and SGD, B = 256 uint8 32x32 images, each variant on
its own copy of one model, augmentation timed: (a) torchvision.transforms.v2 image by image per view,
per-view forwards, summed loss, one backward (what a user writes today); (b) ``MTDLEngine`` without
affinity; (c) first-order affinity every step; (d) exact affinity every 10 steps, timed over whole
cycles; (e) exact every step; (f) (a) the LibMTL way: per-task gradients from K ``backward()`` calls.
Guard: (f)'s summed gradients equal one backward; every timed loss is finite. Floor: the step's FLOPs
(FlopCounterMode) at the published TF32 peak (GPU) or a measured ``torch.mm`` rate (CPU).
GPU targets: (b) >= 5x the images/s of (a), (d) <= 15% over (b).

    python -m benchmarks.step                      # cuda when present, else cpu (one core: ~5 min)
    python -m benchmarks.step --device cpu --quick # B=4, a smoke run, not written
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import mtdl_fast as mf
from benchmarks import augment, common
from mtdl_fast.app.data import load_sample_photos
from mtdl_fast.app.trainer import RunConfig
from mtdl_fast.engine import MTDLEngine

CLASSES, SIZE, GUARD_RTOL = 10, 32, 1e-4
LABELS = {"a": "(a) torchvision v2 per-image + PyTorch step", "b": "(b) mtdl-fast, no affinity",
          "c": "(c) mtdl-fast, first_order every step", "d": "(d) mtdl-fast, exact every {every} steps",
          "e": "(e) mtdl-fast, exact every step", "f": "(f) LibMTL way: K backward passes"}
GPU_TARGETS = {"a": ">= 5x ref", "d": "<= 1.15x ref"}


def make_model(device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The trainer's hard-sharing model for the ten tasks: (trunk, heads), train mode."""
    torch.manual_seed(seed)
    trunk = mf.models.SmallResNet(3, width=RunConfig().width).to(device).train()
    return trunk, mf.models.linear_heads(len(augment.TASKS), trunk.out_features, CLASSES).to(device).train()


def _sgd(trunk, heads) -> torch.optim.Optimizer:
    return torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=RunConfig().lr, momentum=RunConfig().momentum)


def _shared_grad(trunk) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])


def libmtl_grads(trunk, heads, views, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """LibMTL's per-task gradients of the shared parameters: K ``backward()`` calls, each task's
    gradient flattened into a row and zeroed in between (the heads accumulate their own).
    Returns the (K, P) gradients and the summed loss."""
    losses, rows = [F.cross_entropy(heads[j](trunk(views[j])), labels) for j in range(len(views))], []
    for loss in losses:
        loss.backward()
        rows.append(_shared_grad(trunk))
        trunk.zero_grad(set_to_none=False)
    return torch.stack(rows), sum(loss.detach() for loss in losses)


def torch_step(trunk, heads, x, labels, libmtl: bool) -> Callable[[], torch.Tensor]:
    """Variant (a), or (f) with ``libmtl``: torchvision views image by image, then one SGD step."""
    make_views, opt = augment.build("torchvision per-image", x), _sgd(trunk, heads)
    bounds = torch.tensor([0] + [p.numel() for p in trunk.parameters()]).cumsum(0).tolist()

    def step() -> torch.Tensor:
        views = make_views()
        opt.zero_grad(set_to_none=True)
        if libmtl:
            grads, loss = libmtl_grads(trunk, heads, views, labels)
            for p, lo, hi in zip(trunk.parameters(), bounds, bounds[1:]):
                p.grad = grads[:, lo:hi].sum(0).view_as(p)
        else:
            loss = sum(F.cross_entropy(heads[j](trunk(views[j])), labels) for j in range(len(views)))
            loss.backward()
        opt.step()
        return loss.detach()

    return step


def variants(x, labels, device: torch.device, every: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """Variant letter -> (fn, training steps per call); each on its own copy of one model."""
    model = make_model(device)
    out = {"a": (torch_step(*copy.deepcopy(model), x, labels, libmtl=False), 1)}
    for letter, kwargs, steps in (("b", {"affinity_every": None}, 1),
                                  ("c", {"affinity_every": 1, "affinity_mode": "first_order"}, 1),
                                  ("d", {"affinity_every": every}, every), ("e", {"affinity_every": 1}, 1)):
        trunk, heads = copy.deepcopy(model)
        engine = MTDLEngine(mf.DistributionTasks(augment.TASKS, seed=0), trunk, heads, _sgd(trunk, heads), **kwargs)
        out[letter] = (lambda e=engine, n=steps: torch.stack([e.step(x, labels)[0] for _ in range(n)]), steps)
    out["f"] = (torch_step(*copy.deepcopy(model), x, labels, libmtl=True), 1)
    return out


def libmtl_guard(device: torch.device) -> float:
    """Relative max difference of (f)'s summed per-task gradients from one backward (same views, model)."""
    x = load_sample_photos(SIZE, 8, seed=0).to(device)
    labels = torch.arange(8, device=device) % CLASSES
    views = mf.DistributionTasks(augment.TASKS, seed=0, backend="torch")(x)
    (trunk, heads), (trunk2, heads2) = make_model(device), make_model(device)
    summed = libmtl_grads(trunk, heads, views, labels)[0].sum(0)
    sum(F.cross_entropy(heads2[j](trunk2(views[j])), labels) for j in range(len(views))).backward()
    reference = _shared_grad(trunk2)
    return float((summed - reference).abs().max() / reference.abs().max())


def step_flops(batch: int, device: torch.device) -> int:
    """FLOPs of one training step: per-view forwards, summed cross-entropy, one backward."""
    def count(b: int) -> dict[str, int]:
        trunk, heads = make_model(device)
        x = load_sample_photos(SIZE, b, seed=0).to(device)
        views = mf.DistributionTasks(augment.TASKS, seed=0, backend="torch")(x)
        labels = torch.zeros(b, dtype=torch.long, device=device)
        return {"step": common.count_flops(lambda: sum(F.cross_entropy(heads[j](trunk(views[j])), labels)
                                                       for j in range(len(views))).backward())}

    return common.flops_at(batch, device, count)["step"]


def run(device: torch.device, batch: int, every: int, budget_s: float) -> list[dict[str, Any]]:
    """The guard, then the six variants, timed; the results file's records."""
    load = common.load_average()
    with common.strict_fp32():
        rel = libmtl_guard(device)
    assert rel <= GUARD_RTOL, f"LibMTL-style summed gradients differ from one backward by {rel:.1e} (relative)"
    x = load_sample_photos(SIZE, batch, seed=0).to(device)
    labels = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    peak, peak_what = common.peak_flops_per_s(device)
    floor_s = step_flops(batch, device) / peak
    group = f"training step, K={len(augment.TASKS)}, B={batch}, 3x{SIZE}x{SIZE}"
    case = f"one step (floor: its FLOPs at the {peak_what})"
    records = [common.record(group, case, "floor: FLOPs of the step", [floor_s], role="floor", items=batch,
                             **common.conditions(load))]
    for letter, (fn, steps) in variants(x, labels, device, every).items():
        losses: list[torch.Tensor] = []
        times = [t / steps for t in common.time_call(lambda f=fn, out=losses: out.append(f()), budget_s)]
        flat = torch.cat([loss.reshape(-1) for loss in losses]).cpu()
        assert bool(torch.isfinite(flat).all()), f"variant ({letter}): a loss is not finite"
        note = f"loss {float(flat[0]):.3g} -> {float(flat[-1]):.3g}" + (
            f"; summed per-task gradients == one backward (rel. diff {rel:.0e})" if letter == "f" else "")
        info: dict[str, Any] = {"items": batch, "note": note, "role": "reference" if letter == "b" else None,
                                "target": GPU_TARGETS.get(letter) if device.type == "cuda" else None,
                                **common.conditions(load)}
        records.append(common.record(group, case, LABELS[letter].format(every=every), times, **info))
    return records


def main(argv: list[str] | None = None) -> None:
    args = common.script_args(argv, __doc__, "default 256 (4 when quick)")
    records = run(args.device, args.batch or (4 if args.quick else 256), 2 if args.quick else 10,
                  args.budget or (0.05 if args.quick else 6.0))
    common.report(records, args)


if __name__ == "__main__":
    main()
