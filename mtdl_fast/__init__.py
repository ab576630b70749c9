"""mtdl-fast: a kernel-backed engine for Multi-Task Distribution Learning.

    import mtdl_fast as mf
    tasks = mf.DistributionTasks(["identity", "horizontal_flip", "rotate"], seed=0)
    views = tasks(x)   # (K, B, C, H, W)
"""
from mtdl_fast import _ext, functional, tasks
from mtdl_fast.tasks import DEFAULT_TASKS, DistributionTasks, TaskParams, TaskSpec

__all__ = ["DEFAULT_TASKS", "DistributionTasks", "TaskParams", "TaskSpec", "functional", "tasks"]
__version__ = "0.1.0"
