"""mtdl-fast: a kernel-backed engine for Multi-Task Distribution Learning.

    import mtdl_fast as mf
    tasks = mf.DistributionTasks(["identity", "horizontal_flip", "rotate"], seed=0)
    views = tasks(x)                                  # (K, B, C, H, W)
    tracker = mf.AffinityTracker(trunk, heads, lr=0.1)
    z = tracker.step(views, y)                        # this step's K x K TAG affinity

Names are imported on first use, so `import mtdl_fast` costs little more than `import torch`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (None: the name is itself a submodule)
_EXPORTS: dict[str, str | None] = {
    "AffinityTracker": "mtdl_fast.affinity",
    "BootstrapResult": "mtdl_fast.grouping",
    "DEFAULT_TASKS": "mtdl_fast.tasks",
    "DistributionTasks": "mtdl_fast.tasks",
    "GroupingResult": "mtdl_fast.grouping",
    "MTDLEngine": "mtdl_fast.engine",
    "SelectiveGroupUpdates": "mtdl_fast.research.stgu",
    "TaskParams": "mtdl_fast.tasks",
    "TaskSpec": "mtdl_fast.tasks",
    "bootstrap_groups": "mtdl_fast.grouping",
    "make_weighting": "mtdl_fast.research.weighting",
    "select_groups": "mtdl_fast.grouping",
    "engine": None,
    "functional": None,
    "grouping": None,
    "loader": None,
    "models": None,
    "research": None,
    "tasks": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtdl_fast' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f"mtdl_fast.{name}") if module is None else getattr(
        importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
