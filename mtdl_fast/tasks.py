"""DistributionTasks: K augmentation "distributions" that turn one batch into K task views.

A task is a chain of ops from `mtdl_fast.ops` ("rotate", "rotate+hue", or ("rotate", {"angle":
(-45, 45)})). `sample` draws every view's parameters per image on the device; `apply` is
deterministic given them and runs either the plain-PyTorch path (the meaning) or the fused Triton
kernel (one launch for all K views). Views are computed on float32 images in [0, 1]: uint8 input is
scaled by 1/255 first, exactly like torchvision's `to_dtype(x, torch.float32, scale=True)`.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from mtdl_fast.functional._utils import to_float
from mtdl_fast.kernels import fused_views as K
from mtdl_fast.kernels._launch import interpreting
from mtdl_fast.ops import Draw, Op, make_op

TaskLike = Union[str, tuple[str, dict]]

#: The default ten distribution tasks; every one is defined for 1- and 3-channel images.
DEFAULT_TASKS: tuple[str, ...] = (
    "identity",
    "horizontal_flip",
    "vertical_flip",
    "rotate",
    "affine",
    "resized_crop",
    "brightness",
    "contrast",
    "gaussian_blur",
    "gaussian_noise",
)

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NEEDS_SIZE = ("affine", "resized_crop", "erase")


@dataclass(frozen=True)
class TaskSpec:
    """One distribution task: a display name and its chain of ops, applied left to right."""

    name: str
    ops: tuple[Op, ...]


def parse_task(task: TaskLike) -> TaskSpec:
    """"a+b" or ("a+b", {param: value or (low, high)}) -> TaskSpec; ValueError for unknown names."""
    if isinstance(task, str):
        name, overrides = task, {}
    elif isinstance(task, tuple) and len(task) == 2 and isinstance(task[0], str) and isinstance(task[1], dict):
        name, overrides = task
    else:
        raise ValueError(f"a task must be a name like 'rotate+hue' or (name, {{param: range}}), got {task!r}")
    op_names = [part.strip() for part in name.split("+")]
    if not all(op_names):
        raise ValueError(f"task name {name!r} has an empty op")
    ops = tuple(make_op(op, overrides) for op in op_names)
    known = set().union(*(type(op).defaults for op in ops))
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"task {name!r}: unknown parameter(s) {sorted(unknown)}; it takes {sorted(known)}")
    return TaskSpec(name=name, ops=ops)


def fusion_problem(spec: TaskSpec) -> str | None:
    """Why the fused kernel cannot run this task, or None when it can.

    The kernel runs one spatial stage (flips with at most one rotate/affine/resized_crop folded into
    one warp, resized_crop first; or one blur/sharpness alone) followed by distinct pointwise ops.
    """
    ops = [op for op in spec.ops if type(op).name != "identity"]
    spatial = [op for op in ops if type(op).kind != "pointwise"]
    pointwise = [op for op in ops if type(op).kind == "pointwise"]
    if ops[: len(spatial)] != spatial:
        return "geometric ops and filters must come before colour ops"
    if sum(type(op).kind == "warp" for op in spatial) > 1:
        return "at most one of rotate/affine/resized_crop per task"
    if any(type(op).kind == "filter" for op in spatial) and len(spatial) > 1:
        return "a blur or sharpness filter cannot be combined with another geometric op"
    if any(type(op).name == "resized_crop" for op in spatial[1:]):
        return "resized_crop must be the first geometric op"
    names = [type(op).name for op in pointwise]
    if len(set(names)) != len(names):
        return "each colour op at most once per task"
    if len(pointwise) > K.MAX_OPS:
        return f"at most {K.MAX_OPS} colour ops per task"
    for op in spatial:
        if type(op).name == "gaussian_blur" and int(op.config["kernel_size"]) > K.MAX_BLUR_KSIZE:
            return f"gaussian_blur kernel_size above {K.MAX_BLUR_KSIZE}"
    return None


@dataclass
class TaskParams:
    """Per-view, per-image parameters of one call.

    views[k][i] holds the parameters of op i of task k: tensors with a leading batch dimension B
    ((B,), (B, 2) or (B, 4)), on the device they were drawn on. `seed` keys the noise streams.
    """

    views: list[list[dict[str, torch.Tensor]]]
    batch_size: int
    image_size: tuple[int, int] | None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: torch.device | str) -> TaskParams:
        """A copy with every tensor on `device`."""
        views = [[{k: v.to(device) for k, v in p.items()} for p in view] for view in self.views]
        return TaskParams(views, self.batch_size, self.image_size, self.seed, torch.device(device))


class DistributionTasks(nn.Module):
    """K data distributions of one batch: (B, C, H, W) -> (K, B, C, H, W).

    Args:
        tasks: task names ("rotate", composite "rotate+hue") or (name, {param: value | (low, high)}).
        seed: seeds the per-device generators `sample` draws from when none is passed.
        backend: "triton" (fused kernel), "torch" (plain PyTorch), or "auto" (Triton for CUDA
            tensors when every task fuses, torch otherwise).
        out_dtype: float32, float16 or bfloat16 (float64 on the torch backend, for exact tests).
        mean, std: optional per-channel normalisation fused into the output.
        validate: check float inputs lie in [0, 1] (a host synchronisation). Default: on for CPU
            tensors, off for GPU tensors.
    """

    def __init__(
        self,
        tasks: Sequence[TaskLike],
        seed: int = 0,
        backend: str = "auto",
        out_dtype: torch.dtype = torch.float32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        validate: bool | None = None,
    ):
        super().__init__()
        if isinstance(tasks, str):
            tasks = [tasks]
        if len(tasks) == 0:
            raise ValueError("tasks must name at least one task")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype}")
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must be given together, got mean={mean!r} std={std!r}")
        if std is not None and any(float(s) == 0 for s in std):
            raise ValueError(f"std must not contain zeros, got {list(std)}")
        self.specs = [parse_task(t) for t in tasks]
        self.seed = int(seed)
        self.backend = backend
        self.out_dtype = out_dtype
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.validate = validate
        self._fusion_problems = {s.name: p for s in self.specs if (p := fusion_problem(s)) is not None}
        if backend == "triton" and out_dtype == torch.float64:
            raise ValueError("out_dtype=torch.float64 is not supported by backend='triton'")
        if backend == "triton" and self._fusion_problems:
            raise ValueError(f"backend='triton' cannot fuse these tasks: {self._fusion_problems}")
        self._generators: dict[torch.device, torch.Generator] = {}
        self._calls = itertools.count()

    @property
    def names(self) -> list[str]:
        """The task names, in view order."""
        return [s.name for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    def extra_repr(self) -> str:
        return f"tasks={self.names}, backend={self.backend!r}, out_dtype={self.out_dtype}"

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        """The sampling state (generators per device, call counter): part of `state_dict()`, so a
        checkpoint resumes the same parameter draws."""
        generators = {str(device): gen.get_state() for device, gen in self._generators.items()}
        calls = next(self._calls)
        self._calls = itertools.count(calls)
        return {"seed": self.seed, "generators": generators, "calls": calls}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for device, gen_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(gen_state)
        self._calls = itertools.count(int(state["calls"]))

    # ----------------------------------------------------------------- sampling
    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def sample(
        self,
        batch_size: int,
        image_size: tuple[int, int] | None = None,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TaskParams:
        """Draw every view's parameters, one set per image, on `device` (no host synchronisation).

        image_size (H, W) is required by tasks whose parameters depend on it (affine's translate,
        resized_crop and erase boxes).
        """
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        needs = [s.name for s in self.specs if any(type(op).name in _NEEDS_SIZE for op in s.ops)]
        if image_size is None and needs:
            raise ValueError(f"image_size=(H, W) is required to sample tasks {needs}")
        height, width = image_size if image_size is not None else (0, 0)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = generator if generator is not None else self._generator(device)
        draw = Draw(batch_size, device, gen)
        views = [[op.sample(draw, height, width) for op in spec.ops] for spec in self.specs]
        base_seed = generator.initial_seed() if generator is not None else self.seed
        seed = (base_seed * 1_000_003 + next(self._calls)) % (2**31 - 1)
        return TaskParams(views, batch_size, None if image_size is None else tuple(image_size), seed, device)

    # ----------------------------------------------------------------- applying
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sample fresh parameters for `x` and apply them: (B, C, H, W) -> (K, B, C, H, W)."""
        self._check_input(x)
        return self.apply(x, self.sample(x.shape[0], tuple(x.shape[-2:]), device=x.device))

    def apply(self, x: torch.Tensor, params: TaskParams) -> torch.Tensor:
        """Deterministic K views of `x` (B, C, H, W) uint8/float for `params` from `sample`."""
        self._check_input(x)
        self._check_params(x, params)
        out = torch.empty((len(self), *x.shape), dtype=self.out_dtype, device=x.device)
        if x.shape[0] == 0:
            return out
        if self.resolve_backend(x) == "triton":
            return self._apply_triton(x, params, out)
        return self._apply_torch(x, params, out)

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend `apply` uses for `x`: 'triton' or 'torch'."""
        if self.backend != "auto":
            return self.backend
        fusable = not self._fusion_problems and self.out_dtype != torch.float64
        return "triton" if x.is_cuda and fusable else "torch"

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"x must have 1 or 3 channels, got C={x.shape[1]}")
        if x.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"x must be uint8 or floating point, got dtype {x.dtype}")
        if self.mean is not None and len(self.mean) not in (1, x.shape[1]):
            raise ValueError(f"mean/std need 1 or {x.shape[1]} values, got mean={self.mean}")
        validate = self.validate if self.validate is not None else not x.is_cuda
        if validate and x.is_floating_point() and x.numel() > 0:
            low, high = torch.aminmax(torch.nan_to_num(x, nan=0.5))
            if low.item() < 0 or high.item() > 1:
                bad = low.item() if low.item() < 0 else high.item()
                raise ValueError(f"x must hold float images in [0, 1], found value {bad}")

    def _check_params(self, x: torch.Tensor, params: TaskParams) -> None:
        if not isinstance(params, TaskParams):
            raise TypeError(f"params must be a TaskParams from sample(), got {type(params).__name__}")
        if len(params.views) != len(self) or any(len(v) != len(s.ops) for v, s in zip(params.views, self.specs)):
            raise ValueError(f"params were sampled for other tasks ({len(params.views)} views), these have {len(self)}")
        if params.batch_size != x.shape[0]:
            raise ValueError(f"params were sampled for batch_size={params.batch_size}, x has B={x.shape[0]}")
        if params.image_size is not None and tuple(params.image_size) != tuple(x.shape[-2:]):
            raise ValueError(f"params were sampled for image_size={params.image_size}, x is {tuple(x.shape[-2:])}")

    def _finish(self, view: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=view.dtype, device=view.device).reshape(-1, 1, 1)
            std = torch.tensor(self.std, dtype=view.dtype, device=view.device).reshape(-1, 1, 1)
            view = (view - mean) / std
        return view

    def _apply_torch(self, x: torch.Tensor, params: TaskParams, out: torch.Tensor) -> torch.Tensor:
        base = to_float(x).to(torch.float64 if self.out_dtype == torch.float64 else torch.float32)
        for k, (spec, view_params) in enumerate(zip(self.specs, params.views)):
            noise = torch.Generator(device=x.device).manual_seed(params.seed * 131 + k)
            view = base
            for op, p in zip(spec.ops, view_params):
                view = op.apply(view, p, noise)
            out[k] = self._finish(view)
        return out

    # ----------------------------------------------------------------- fused path
    def kernel_tables(self, params: TaskParams, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused kernel's inputs for `params`: spatial (K,) int32, ops (K, MAX_OPS) int32 and
        the parameter table (K, B, N_SLOTS) float32 (see kernels/fused_views.py)."""
        if self._fusion_problems:
            raise ValueError(f"these tasks cannot be fused: {self._fusion_problems}")
        height, width = params.image_size if params.image_size is not None else (1, 1)
        n = params.batch_size
        spatial = torch.zeros(len(self), dtype=torch.int32)
        codes = torch.zeros(len(self), K.MAX_OPS, dtype=torch.int32)
        table = torch.zeros(len(self), n, K.N_SLOTS, dtype=torch.float32, device=device)
        table[:, :, [K.SLOT_CLAMP_X0, K.SLOT_CLAMP_Y0]] = -1e30
        table[:, :, [K.SLOT_CLAMP_X1, K.SLOT_CLAMP_Y1]] = 1e30
        for k, (spec, view_params) in enumerate(zip(self.specs, params.views)):
            view_table = table[k]
            matrix = None
            slot = 0
            for op, p in zip(spec.ops, view_params):
                p = {key: v.to(device) for key, v in p.items()}
                kind = type(op).kind
                if kind in ("flip", "warp"):
                    a = op.matrix(p, n, height, width).to(device=device, dtype=torch.float64)
                    matrix = a if matrix is None else _compose(matrix, a)
                    if type(op).name == "resized_crop":
                        view_table[:, K.SLOT_CLAMP_X0 : K.SLOT_CLAMP_Y1 + 1] = op.clamp_box(p).to(view_table)
                    if kind == "warp" and op.fill() is not None:
                        view_table[:, K.SLOT_FILL] = op.fill()
                        view_table[:, K.SLOT_HAS_FILL] = 1.0
                elif kind == "filter":
                    spatial[k] = K.SPATIAL_BLUR if type(op).name == "gaussian_blur" else K.SPATIAL_SHARPEN
                    op.encode(p, view_table, height, width)
                elif type(op).opcode != K.OP_END:
                    codes[k, slot] = type(op).opcode
                    slot += 1
                    op.encode(p, view_table, height, width)
            if matrix is not None:
                spatial[k] = K.SPATIAL_WARP
                view_table[:, K.SLOT_M0 : K.SLOT_M5 + 1] = matrix.reshape(n, 6).to(view_table)
        return spatial.to(device), codes.to(device), table

    def _apply_triton(self, x: torch.Tensor, params: TaskParams, out: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda and not interpreting():
            raise ValueError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
        spatial, codes, table = self.kernel_tables(params, x.device)
        return K.fused_views(
            x, spatial, codes, table, seed=params.seed, out_dtype=self.out_dtype, mean=self.mean, std=self.std, out=out
        )


def _compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Source coordinates of `outer` then `inner` (B, 2, 3) affine maps: outer(inner(p))."""
    linear = outer[:, :, :2] @ inner[:, :, :2]
    shift = (outer[:, :, :2] @ inner[:, :, 2:]).squeeze(-1) + outer[:, :, 2]
    return torch.cat((linear, shift[:, :, None]), dim=-1)
