"""One gloo rank of a test that spawns processes (torch.multiprocessing.spawn) on the CPU."""
from __future__ import annotations

import faulthandler
from collections.abc import Callable

import torch
import torch.distributed as dist

from mtdl_fast import distributed as dist_utils


def run_rank(rank: int, world: int, init_file: str, work: Callable[[], None]) -> None:
    """Join the group, run ``work`` (which saves what the test checks), leave as the CLI does
    (`mtdl_fast.distributed.shutdown`: barrier, garbage collected, group destroyed), then end the
    process as the CLI's torchrun ranks do (`mtdl_fast.distributed.exit_rank`): a gloo rank can abort
    in interpreter teardown after its work is saved and its group destroyed, failing a test whose
    results are complete. An error in ``work`` propagates as usual, and faulthandler prints every
    thread's stack should a rank abort earlier."""
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    completed = False
    try:
        work()
        completed = True
    finally:
        dist_utils.shutdown(completed)
    dist_utils.exit_rank(0)
