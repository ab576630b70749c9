"""torch.distributed glue: one process per device, launched by torchrun.

    torchrun --nproc_per_node=N -m mtdl_fast run ...

Each rank trains on its slice of every global batch. The model's gradients are averaged by
DistributedDataParallel; an affinity step averages the K per-task gradients and the K x K
lookahead losses over ranks (`all_reduce_mean_`), so every rank folds the same Z -- the Z of the
global batch -- into identical running sums. Augmentation parameters come from each rank's own
stream (`rank_seed`); rank 0 selects the groups (broadcast to the others) and writes every file.

Every function here is a no-op, or the identity, in a single process.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and prints progress (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device) -> torch.device:
    """Join torchrun's process group (when launched by it) and return this rank's device.

    `device` is what the user asked for: "cpu" joins with the gloo backend, "cuda" with nccl and
    this rank's GPU, cuda:LOCAL_RANK. Outside torchrun the device is returned as given.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown(completed: bool = True) -> None:
    """Leave the process group joined by `init_from_env` (nothing in a single process).

    After `completed` work the ranks meet at a barrier first (a rank leaving on an error does not
    wait for peers that may never come), so none tears down its backend while a peer still has a
    collective in flight, and the garbage of the run (DistributedDataParallel's reducer holds the
    group) is collected while the interpreter is whole: a gloo group left to interpreter teardown
    can abort the process after the work is done.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if completed and dist.get_world_size() > 1:
            dist.barrier()
    except RuntimeError as err:  # a peer left on an error: leave all the same, and say so
        warnings.warn(f"leaving the process group without a peer: {err}", RuntimeWarning, stacklevel=2)
    finally:
        gc.collect()
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> NoReturn:
    """End this rank now, after `shutdown`: logging shut down, output flushed, then ``os._exit(code)``
    without interpreter teardown. There torch's gloo backend can abort a rank whose work is done
    ("terminate called without an active exception"), which a launcher reports as a failed rank."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """The seed of `rank_`'s own random stream: `seed` itself on rank 0 (a single process is
    unchanged), an independent SeedSequence child of it on every other rank."""
    rank_ = rank() if rank_ is None else rank_
    if rank_ == 0:
        return int(seed)
    return int(np.random.SeedSequence(int(seed), spawn_key=(int(rank_),)).generate_state(1)[0] % (2**31 - 1))


@torch.no_grad()
def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place; one collective per dtype."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    scale = 1.0 / dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.mul_(scale)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """rank `src`'s `obj` on every rank (pickled)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_divisible(batch_size: int) -> int:
    """Each rank's share of a global batch of `batch_size`; ValueError when it does not split evenly."""
    n = world_size()
    if batch_size % n != 0:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the world size {n}")
    return batch_size // n
