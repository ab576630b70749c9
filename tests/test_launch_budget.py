"""The launch budget of one DistributionTasks call on the fused path, counted rather than hoped for.

`tasks(x)` on the Triton path (under the interpreter on the CPU, natively on a GPU) must issue a
handful of device operations, the same number at K=10 and K=32 whatever ops the tasks use, and
never read device data back to the host. What is counted (DeviceOps below):

* device data: x, every tensor a factory op creates on x's device, every output of an op that
  reads device data (views included);
* one device operation per aten op (as a TorchDispatchMode sees them, below autograd) that reads
  device data or creates a tensor on x's device, except view and metadata ops (`is_view`, detach,
  alias): allocations count, kernels count;
* one per Triton kernel launch (the `*_kernel` objects of mtdl_fast.kernels are wrapped; the tensor
  traffic of the interpreter inside a launch is not the call's and is not counted). On the CPU the
  launches are counted but not executed: everything around them runs, while what the kernels
  compute is tested elsewhere (tests/test_task_params.py, tests/test_kernel_fused_views.py) at
  shapes the interpreter can afford;
* not counted: ops reading only tensors that existed before the call and are not x (the host tables
  the launchers validate; on a GPU they are CPU tensors, on the CPU they are indistinguishable).

Host reads of device data (aten._local_scalar_dense) and copies of it (aten._to_copy, aten.copy_)
are recorded apart and must not happen. On a GPU the same call also runs under
torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising operation.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import mtdl_fast as mf
from mtdl_fast.kernels import fused_views, task_params

# The budget: the parameter program's buffer and launch, the output buffer, the fused launch, plus
# the contrast pre-pass (its partial-sums buffer and launch) when a view has OP_CONTRAST.
BUDGET = 6
_NOT_COUNTED = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)
_HOST_READS = (torch.ops.aten._local_scalar_dense.default,)
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class DeviceOps(TorchDispatchMode):
    """Counts the device operations of the code run under it (see the module docstring)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.device = x.device
        self.device_data = WeakIdKeyDictionary()
        self.device_data[x] = True
        self.ops: list[str] = []
        self.host_reads: list[str] = []
        self.copies: list[str] = []
        self.paused = False

    def launch(self, name: str) -> None:
        self.ops.append(f"triton {name}")

    @contextlib.contextmanager
    def pause(self):
        self.paused, before = True, self.paused
        try:
            yield
        finally:
            self.paused = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        reads_device = any(t in self.device_data for t in inputs)
        creates_device = not inputs and any(t.device == self.device for t in outputs)
        if reads_device or creates_device:
            for t in outputs:
                self.device_data[t] = True
            if func in _HOST_READS:
                self.host_reads.append(str(func))
            if func in _COPIES:
                self.copies.append(str(func))
            if not func.is_view and func not in _NOT_COUNTED:
                self.ops.append(str(func))
        return out


class _CountedKernel:
    """A Triton kernel whose launches are counted (and run only on a GPU), the counter paused inside."""

    def __init__(self, kernel, name: str, counter: DeviceOps):
        self.kernel, self.name, self.counter = kernel, name, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counter.launch(self.name)
            if self.counter.device.type == "cuda":
                with self.counter.pause():
                    launch(*args, **kwargs)

        return run


def count_call(monkeypatch, tasks: mf.DistributionTasks, x: torch.Tensor) -> tuple[DeviceOps, dict]:
    """tasks(x) twice (the first compiles the kernels and fills the caches), the second under
    DeviceOps; also captures what the fused launcher received and what the parameter program returned."""
    counter = DeviceOps(x)
    for module in (fused_views, task_params):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _CountedKernel(getattr(module, name), name, counter))
    tasks(x)
    counter.ops.clear()
    seen: dict = {}
    real_fused, real_program = fused_views.fused_views, task_params.task_params

    def fused(x, spatial, ops, params, **kwargs):
        seen.update(spatial=spatial, ops=ops, table=params)
        return real_fused(x, spatial, ops, params, **kwargs)

    def program(*args, **kwargs):
        seen["program_out"] = real_program(*args, **kwargs)
        return seen["program_out"]

    monkeypatch.setattr(fused_views, "fused_views", fused)
    monkeypatch.setattr(task_params, "task_params", program)
    sync_debug = (lambda: _sync_debug_error()) if x.is_cuda else contextlib.nullcontext
    with sync_debug(), counter:
        tasks(x)
    return counter, seen


@contextlib.contextmanager
def _sync_debug_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


TASK_LISTS = {
    "default K=10": list(mf.DEFAULT_TASKS),
    "default K=32": (list(mf.DEFAULT_TASKS) * 4)[:32],
    "every fusable op K=10": ["horizontal_flip+rotate+contrast+erase", "resized_crop+vertical_flip+posterize",
                              "gaussian_blur+saturation+solarize", "sharpness+hue+grayscale", "affine+invert",
                              "brightness+gaussian_noise", "identity", "vertical_flip", "rotate", "erase"],
    "every fusable op K=32": (["horizontal_flip+rotate+contrast+erase", "resized_crop+vertical_flip+posterize",
                               "gaussian_blur+saturation+solarize", "sharpness+hue+grayscale", "affine+invert",
                               "brightness+gaussian_noise", "identity", "vertical_flip", "rotate", "erase"] * 4)[:32],
    "no contrast K=32": (["rotate+hue", "resized_crop+erase", "gaussian_blur", "horizontal_flip+solarize"] * 8),
}


@pytest.mark.parametrize("case", list(TASK_LISTS))
def test_fused_call_stays_within_the_launch_budget(monkeypatch, device, case):
    names = TASK_LISTS[case]
    tasks = mf.DistributionTasks(names, seed=3, backend="triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8, generator=g).to(device)
    counter, seen = count_call(monkeypatch, tasks, x)
    has_contrast = any("contrast" in name for name in names)
    expected = ["aten.empty.memory_format", "triton _task_params_kernel", "aten.empty.memory_format"]
    expected += ["aten.empty.memory_format", "triton _contrast_prepass_kernel"] if has_contrast else []
    expected += ["triton _fused_views_kernel"]
    assert sorted(counter.ops) == sorted(expected), counter.ops
    assert len(counter.ops) <= BUDGET
    assert counter.host_reads == [] and counter.copies == []
    # The fused launcher gets host tables and the program's own table, not a copy of it.
    assert seen["spatial"].device.type == "cpu" and seen["ops"].device.type == "cpu"
    table = seen["program_out"][1]
    assert seen["table"].data_ptr() == table.data_ptr() and seen["table"].device == x.device


def test_the_counter_sees_device_work_and_host_reads(device):
    """The counter can fail: a host read, a copy and a few kernels on device data are all seen."""
    x = torch.rand(4, 4, device=device)
    with DeviceOps(x) as counter:
        y = (x * 2).sum()
        y.item()
        x.to(torch.float64)
    assert counter.ops == ["aten.mul.Tensor", "aten.sum.default", "aten._local_scalar_dense.default",
                           "aten._to_copy.default"]
    assert counter.host_reads and counter.copies
