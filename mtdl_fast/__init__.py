"""mtdl-fast: a kernel-backed engine for Multi-Task Distribution Learning.

    import mtdl_fast as mf
    tasks = mf.DistributionTasks(["identity", "horizontal_flip", "rotate"], seed=0)
    views = tasks(x)                                  # (K, B, C, H, W)
    tracker = mf.AffinityTracker(shared=trunk, heads=heads, lr=0.1)
    z = tracker.step(views, y)                        # this step's K x K TAG affinity
"""
from mtdl_fast import _ext, functional, models, tasks
from mtdl_fast.affinity import AffinityTracker
from mtdl_fast.research.affinity_propagation import affinity_propagation
from mtdl_fast.grouping import GroupingResult, select_groups
from mtdl_fast.research.stgu import SelectiveGroupUpdates
from mtdl_fast.tasks import DEFAULT_TASKS, DistributionTasks, TaskParams, TaskSpec

__all__ = [
    "AffinityTracker",
    "DEFAULT_TASKS",
    "DistributionTasks",
    "GroupingResult",
    "SelectiveGroupUpdates",
    "TaskParams",
    "TaskSpec",
    "affinity_propagation",
    "functional",
    "models",
    "select_groups",
    "tasks",
]
__version__ = "0.1.0"
