"""DistributionTasks: K augmentation "distributions" that turn one batch into K task views.

A task is a chain of ops from `mtdl_fast.ops` ("rotate", "rotate+hue", or ("rotate", {"angle":
(-45, 45)})). One call is one program: `sample` runs the task list's parameter program
(kernels/task_params.py: every view's per-image parameters and the fused kernel's table, drawn in
one launch from a counter-based stream keyed by (seed, call, view, image): the Triton kernel on GPUs,
its C++ port `mtdl_fast._C.task_params_cpu` on CPUs); `apply` is
deterministic given them and runs the plain-PyTorch path (the meaning), the fused Triton kernel
(one launch for all K views) or the fused C++ CPU kernel. Views are computed on float32 images in
[0, 1]: uint8 input is scaled by 1/255 first, exactly like torchvision's
`to_dtype(x, torch.float32, scale=True)`.
"""
from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from mtdl_fast._ext import ext
from mtdl_fast.functional._utils import to_float
from mtdl_fast.kernels import fused_views as K
from mtdl_fast.kernels import task_params as P
from mtdl_fast.kernels._launch import interpreting
from mtdl_fast.ops import Op, Params, make_op

TaskLike = str | tuple[str, dict]

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
_BACKENDS = ("auto", "torch", "triton", "cpu")
_NOISE_SEED_MODULUS = 2**31 - 1

#: Where each op's named parameters sit in `TaskParams.values`: per view, per op, (name, column, width).
Layout = tuple[tuple[tuple[tuple[str, int, int], ...], ...], ...]


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


def _named(values: torch.Tensor, columns: tuple[tuple[str, int, int], ...]) -> Params:
    """One op's parameters from a view's values (B, n_values): name -> (B,) or (B, width) views."""
    return {name: values[:, col] if width == 1 else values[:, col : col + width] for name, col, width in columns}


@dataclass(frozen=True)
class ParamProgram:
    """A task list's parameter program as host tables (kernels/task_params.py ABI)."""

    program: torch.Tensor  # (K, L, PROGRAM_WIDTH) int32
    consts: torch.Tensor  # (K, L, N_CONSTS) float64
    base: torch.Tensor  # (K, N_SLOTS) float32
    n_values: int
    layout: Layout


@dataclass
class TaskParams:
    """Per-view, per-image parameters of one call, as the task list's parameter program wrote them.

    values: (K, B, n_values) float64, every op's parameters; `layout[k][i]` places op i of view k.
    table: (K, B, N_SLOTS) float32, the same parameters as the fused kernels read them
        (kernels/fused_views.py). Both live on the device they were drawn on.
    program: the host program that drew them (which tasks they belong to).
    image_size: the (H, W) the table's warps were computed for; None when sampled without one (the
        table is then computed again for the images' size when applied).
    seed: keys the noise streams. key, call: the Philox stream the parameters were drawn from
        (kernels/task_params.py); the same (key, call) draws the same parameters on any device.

    `views[k][i]` (built on first use) holds op i of task k's parameters by name, as copies:
    (B,), (B, 2) or (B, 4) tensors. Editing them does not change what `apply` does.
    """

    values: torch.Tensor
    table: torch.Tensor
    program: ParamProgram
    batch_size: int
    image_size: tuple[int, int] | None
    seed: int
    key: int
    call: int

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def layout(self) -> Layout:
        return self.program.layout

    @functools.cached_property
    def views(self) -> list[list[Params]]:
        return [[{name: t.clone() for name, t in _named(self.values[k], columns).items()} for columns in view]
                for k, view in enumerate(self.layout)]

    def to(self, device: torch.device | str) -> TaskParams:
        """A copy with the values and the table on `device`."""
        return TaskParams(self.values.to(device), self.table.to(device), self.program, self.batch_size,
                          self.image_size, self.seed, self.key, self.call)


def _table_defaults() -> dict[int, float]:
    """A view's fused-table slots before its ops: no crop clamp (+-1e30), everything else 0."""
    return {K.SLOT_CLAMP_X0: -1e30, K.SLOT_CLAMP_X1: 1e30, K.SLOT_CLAMP_Y0: -1e30, K.SLOT_CLAMP_Y1: 1e30}


def build_program(specs: Sequence[TaskSpec]) -> ParamProgram:
    """The parameter program of a task list: each op's instructions in chain order, their random
    numbers and values packed one after the other per view; where each op's values sit (layout)."""
    rows, consts, bases, layout = [], [], [], []
    for spec in specs:
        view_rows, view_consts, view_layout = [], [], []
        draw = value = 0
        slots = _table_defaults()
        for op in spec.ops:
            column = value
            for ins in op.instructions():
                view_rows.append((ins.code, draw, value, *(*ins.slots, -1, -1)[:2]))
                view_consts.append((*ins.consts, *(0.0,) * (P.N_CONSTS - len(ins.consts))))
                draw += P.DRAWS[ins.code]
                value += P.VALUES[ins.code]
            columns = []
            for name, width in type(op).values:
                columns.append((name, column, width))
                column += width
            view_layout.append(tuple(columns))
            slots.update(op.table_constants())
        rows.append(view_rows)
        consts.append(view_consts)
        bases.append([slots.get(s, 0.0) for s in range(K.N_SLOTS)])
        layout.append(tuple(view_layout))
    length = max(1, max(len(r) for r in rows))
    program = torch.tensor([r + [(P.PARAM_NONE, 0, 0, -1, -1)] * (length - len(r)) for r in rows], dtype=torch.int32)
    consts = torch.tensor([c + [(0.0,) * P.N_CONSTS] * (length - len(c)) for c in consts], dtype=torch.float64)
    n_values = max([1] + [r[2] + P.VALUES[r[0]] for view in rows for r in view])
    return ParamProgram(program, consts, torch.tensor(bases, dtype=torch.float32), n_values, tuple(layout))


def fusion_tables(specs: Sequence[TaskSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's host tables of fusable tasks: spatial (K,) and ops (K, MAX_OPS) int32."""
    spatial = torch.zeros(len(specs), dtype=torch.int32)
    codes = torch.zeros(len(specs), K.MAX_OPS, dtype=torch.int32)
    for k, spec in enumerate(specs):
        slot = 0
        for op in spec.ops:
            kind = type(op).kind
            if kind in ("flip", "warp"):
                spatial[k] = K.SPATIAL_WARP
            elif kind == "filter":
                spatial[k] = K.SPATIAL_BLUR if type(op).name == "gaussian_blur" else K.SPATIAL_SHARPEN
            elif type(op).opcode != K.OP_END:
                codes[k, slot] = type(op).opcode
                slot += 1
    return spatial, codes


@functools.cache
def _fused_cpu() -> tuple[ModuleType | None, str]:
    """(mtdl_fast.fused_cpu, "") when it imports and its compiled kernel is built, else (None, why not)."""
    try:
        module = importlib.import_module("mtdl_fast.fused_cpu")
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    if not module.available():
        return None, "the compiled extension mtdl_fast._C lacks fused_views_cpu; rebuild it"
    return module, ""


@functools.cache
def _program_cpu() -> Callable[..., None] | None:
    """The C++ parameter program `mtdl_fast._C.task_params_cpu`, or None when the extension lacks it."""
    return getattr(ext(), "task_params_cpu", None)


def _as_int(name: str, value: object) -> int:
    """value as an int (Python or numpy integers); TypeError naming the argument otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_image_size(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if not isinstance(image_size, Sequence):
        raise TypeError(f"image_size must be a pair of ints (H, W), got {type(image_size).__name__}")
    size = tuple(_as_int("image_size", s) for s in image_size)
    if len(size) != 2 or min(size) < 0:
        raise ValueError(f"image_size must be (H, W) with H, W >= 0, got {size}")
    return size


class DistributionTasks(nn.Module):
    """K data distributions of one batch: (B, C, H, W) -> (K, B, C, H, W).

    A call is one program: one launch draws every view's per-image parameters (no host
    synchronisation, nothing read back), one fused launch writes the K views.

    Args:
        tasks: task names ("rotate", composite "rotate+hue") or (name, {param: value | (low, high)}).
        seed: keys the parameter stream `sample` draws from when no generator is passed.
        backend: "triton" (fused GPU kernel), "cpu" (fused C++ CPU kernel, mtdl_fast.fused_cpu),
            "torch" (plain PyTorch, the meaning), or "auto": triton for CUDA tensors, cpu for CPU
            tensors when mtdl_fast.fused_cpu imports, whenever every task fuses; torch otherwise.
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
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype}")
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must be given together, got mean={mean!r} std={std!r}")
        if std is not None and any(float(s) == 0 for s in std):
            raise ValueError(f"std must not contain zeros, got {list(std)}")
        self.specs = [parse_task(t) for t in tasks]
        self.seed = _as_int("seed", seed)
        self.backend = backend
        self.out_dtype = out_dtype
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.validate = validate
        self._fusion_problems = {s.name: p for s in self.specs if (p := fusion_problem(s)) is not None}
        if backend in ("triton", "cpu"):
            self._check_fused_backend(backend)
        self._needs_size = [s.name for s in self.specs if any(type(op).name in _NEEDS_SIZE for op in s.ops)]
        self._program = build_program(self.specs)
        self._fused = None if self._fusion_problems else fusion_tables(self.specs)
        self._program_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._call = 0

    def _check_fused_backend(self, backend: str) -> None:
        if self.out_dtype == torch.float64:
            raise ValueError(f"out_dtype=torch.float64 is not supported by backend={backend!r}")
        if self._fusion_problems:
            raise ValueError(f"backend={backend!r} cannot fuse these tasks: {self._fusion_problems}")
        if backend == "cpu" and _fused_cpu()[0] is None:
            raise ValueError(f"backend='cpu' needs the fused C++ CPU kernel mtdl_fast.fused_cpu, which is not "
                             f"available here ({_fused_cpu()[1]})")

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
        """The sampling state (seed and call counter): part of `state_dict()`, so a checkpoint
        resumes the same parameter draws, on any device."""
        return {"seed": self.seed, "calls": self._call}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._call = int(state["calls"])

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        batch_size: int,
        image_size: tuple[int, int] | None = None,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TaskParams:
        """Draw every view's parameters, one set per image, on `device`: one launch of the
        parameter program, no host synchronisation.

        image_size (H, W) is required by tasks whose parameters depend on it (affine's translate,
        resized_crop and erase boxes). Without a generator the draws come from the tasks' own
        stream (seed, call counter); with one, its next number keys the draws (one host read of
        the generator's device: a synchronisation for a CUDA generator).
        """
        batch_size = _as_int("batch_size", batch_size)
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        size = _check_image_size(image_size)
        if size is None and self._needs_size:
            raise ValueError(f"image_size=(H, W) is required to sample tasks {self._needs_size}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key, call, seed = self._next_stream(generator)
        height, width = size if size is not None else (0, 0)
        values, table = self._run_program(batch_size, height, width, key, call, device)
        return TaskParams(values, table, self._program, batch_size, size, seed, key, call)

    def _next_stream(self, generator: torch.Generator | None) -> tuple[int, int, int]:
        """(key, call, noise seed) of the next draw."""
        if generator is None:
            call = self._call
            self._call += 1
            return self.seed % P.MAX_KEY, call, (self.seed * 1_000_003 + call) % _NOISE_SEED_MODULUS
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        key = int(torch.randint(0, P.MAX_KEY, (), generator=generator, device=generator.device))
        return key, 0, key % _NOISE_SEED_MODULUS

    def _program_path(self, device: torch.device) -> str:
        """Where the parameter program runs for `device`: "triton" (the kernel: CUDA, or backend="triton"
        under the interpreter), "cpu" (the C++ program, for CPU tensors when it is built) or "torch" (the
        plain-torch twin: backend="torch" is the all-PyTorch reference, and the fallback). Every path
        draws the same parameters."""
        if self.backend == "torch":
            return "torch"
        if device.type == "cuda" or (self.backend == "triton" and interpreting()):
            return "triton"
        return "cpu" if device.type == "cpu" and _program_cpu() is not None else "torch"

    def _program_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The program's tables on `device`, copied there once."""
        tables = self._program_on.get(device)
        if tables is None:
            prog = self._program
            tables = (prog.program.to(device), prog.consts.to(device), prog.base.to(device))
            self._program_on[device] = tables
        return tables

    def _run_program(self, batch_size: int, height: int, width: int, key: int, call: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        prog = self._program
        path = self._program_path(device)
        if path == "cpu":  # one allocation, one call without the GIL
            values, table = P.new_outputs(len(self), batch_size, prog.n_values, device)
            _program_cpu()(prog.program, prog.consts, prog.base, values, table, height, width, key, call)
            return values, table
        args = dict(batch_size=batch_size, height=height, width=width, key=key, call=call, n_values=prog.n_values)
        if path == "triton":
            return P.task_params(*self._program_tables(device), **args)
        return P.task_params_torch(prog.program, prog.consts, prog.base, device=device, **args)

    # ----------------------------------------------------------------- applying
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sample fresh parameters for `x` and apply them: (B, C, H, W) -> (K, B, C, H, W)."""
        self._check_input(x)
        return self._apply(x, self.sample(x.shape[0], tuple(x.shape[-2:]), device=x.device))

    def apply(self, x: torch.Tensor, params: TaskParams) -> torch.Tensor:
        """Deterministic K views of `x` (B, C, H, W) uint8/float for `params` from `sample`."""
        self._check_input(x)
        self._check_params(x, params)
        return self._apply(x, params)

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend `apply` uses for `x`: 'triton', 'cpu' or 'torch'."""
        if self.backend != "auto":
            return self.backend
        if self._fusion_problems or torch.float64 in (self.out_dtype, x.dtype):
            return "torch"
        if x.is_cuda:
            return "triton"
        return "cpu" if _fused_cpu()[0] is not None else "torch"

    def _apply(self, x: torch.Tensor, params: TaskParams) -> torch.Tensor:
        backend = self.resolve_backend(x)
        if backend == "torch" or x.shape[0] == 0:
            out = torch.empty((len(self), *x.shape), dtype=self.out_dtype, device=x.device)
            return out if x.shape[0] == 0 else self._apply_torch(x, params, out)
        if params.image_size is None:  # warps need the images' size: the same draws again, for it
            params = self._sized(params, x)
        spatial, ops, table = self.kernel_tables(params, x.device)
        launch = self._fused_launcher(backend, x)  # it allocates the output (the C++ path onto huge pages)
        return launch(x, spatial, ops, table, seed=params.seed, out_dtype=self.out_dtype, mean=self.mean,
                      std=self.std)

    def _sized(self, params: TaskParams, x: torch.Tensor) -> TaskParams:
        height, width = (int(s) for s in x.shape[-2:])
        values, table = self._run_program(params.batch_size, height, width, params.key, params.call, x.device)
        return TaskParams(values, table, params.program, params.batch_size, (height, width), params.seed,
                          params.key, params.call)

    def _fused_launcher(self, backend: str, x: torch.Tensor):
        if backend == "cpu":
            if x.device.type != "cpu":
                raise ValueError(f"backend='cpu' needs a CPU tensor, got x on {x.device}")
            return _fused_cpu()[0].fused_views_cpu
        if not x.is_cuda and not interpreting():
            raise ValueError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
        return K.fused_views

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
        if not self._means_the_same(params.program):
            raise ValueError(f"params were sampled for other tasks ({len(params.layout)} views), "
                             f"these have {len(self)}")
        if params.batch_size != x.shape[0]:
            raise ValueError(f"params were sampled for batch_size={params.batch_size}, x has B={x.shape[0]}")
        if params.image_size is not None and tuple(params.image_size) != tuple(x.shape[-2:]):
            raise ValueError(f"params were sampled for image_size={params.image_size}, x is {tuple(x.shape[-2:])}")

    def _means_the_same(self, program: ParamProgram) -> bool:
        """Whether parameters drawn by `program` mean the same to these tasks: the same ops in the same
        places and the same constant table slots (fill, blur size, ...); the ranges may differ."""
        mine = self._program
        return program is mine or (program.layout == mine.layout and torch.equal(program.program, mine.program)
                                   and torch.equal(program.base, mine.base))

    def _finish(self, view: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=view.dtype, device=view.device).reshape(-1, 1, 1)
            std = torch.tensor(self.std, dtype=view.dtype, device=view.device).reshape(-1, 1, 1)
            view = (view - mean) / std
        return view

    def _apply_torch(self, x: torch.Tensor, params: TaskParams, out: torch.Tensor) -> torch.Tensor:
        base = to_float(x).to(torch.float64 if self.out_dtype == torch.float64 else torch.float32)
        values = params.values.to(x.device)
        for k, (spec, columns) in enumerate(zip(self.specs, params.layout)):
            noise = torch.Generator(device=x.device).manual_seed(params.seed * 131 + k)
            view = base
            for op, op_columns in zip(spec.ops, columns):
                view = op.apply(view, _named(values[k], op_columns), noise)
            out[k] = self._finish(view)
        return out

    # ----------------------------------------------------------------- fused path
    def kernel_tables(self, params: TaskParams,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused kernel's inputs for `params`: spatial (K,) int32 and ops (K, MAX_OPS) int32 on
        the host (they depend only on the task list), the parameter table (K, B, N_SLOTS) float32 on
        `device` (see kernels/fused_views.py)."""
        if self._fused is None:
            raise ValueError(f"these tasks cannot be fused: {self._fusion_problems}")
        if params.image_size is None:
            raise ValueError("kernel_tables needs params sampled with image_size=(H, W): the warps depend on it")
        table = params.table if params.table.device == device else params.table.to(device)
        return self._fused[0], self._fused[1], table
