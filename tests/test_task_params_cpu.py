"""The parameter program in C++ (mtdl_fast._C.task_params_cpu) against its plain-torch twin
(kernels/task_params.py task_params_torch, the meaning).

* Every instruction, composite warps, box fallbacks (both clamp branches) and no-box erases, odd
  sizes (1x1, 3x7, 225x223), B = 0, 1, 2, 257, K = 1, 10, 32, several keys and calls, raw programs
  (slots, chained writes, padding, K = 0, L = 0) and, by hypothesis, random task lists and random
  raw programs. The bar is the Triton kernel's: integer-valued columns (boxes, integers) exactly,
  the rest within 1e-12; the float32 table exactly on every (view, image) whose values agree.
  Outputs are poisoned with NaN first, so every element must be written.
* The same bits for 1 and 2 threads.
* The binding's checks: wrong shapes, dtypes, devices, contiguity, codes, offsets, slots and sizes
  raise ValueError naming the argument; garbage programs either raise or stay inside their buffers.
* DistributionTasks draws CPU parameters with it (one aten op per sample), backend="torch" and a
  build without it with the twin, and all of them draw the same parameters.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_launch_budget import DeviceOps
from test_properties import SEEDS, _settings
from test_task_params import TASKS as TWIN_TASKS

import mtdl_fast as mf
import mtdl_fast.tasks as tasks_module
from mtdl_fast._ext import ext
from mtdl_fast.kernels import fused_views as fv
from mtdl_fast.kernels import task_params as tp
from mtdl_fast.ops import OPS
from mtdl_fast.tasks import build_program, parse_task

needs_cpp = pytest.mark.skipif(not hasattr(ext(), "task_params_cpu"), reason="mtdl_fast._C lacks task_params_cpu")

# test_task_params.py's list (every instruction, fills, integers, fallbacks) plus composite warps.
TASKS = [*TWIN_TASKS, "horizontal_flip+rotate+vertical_flip", "resized_crop+affine+horizontal_flip",
         ("affine+rotate", {"angle": (-180.0, 180.0)}), "vertical_flip+erase+erase+posterize"]
INTEGER_CODES = (tp.PARAM_RESIZED_CROP, tp.PARAM_ERASE, tp.PARAM_INTEGER)
KEYS_AND_CALLS = [(0, 0), (2**61 + 12345, 77), (987654321, 2**31 + 5), (tp.MAX_KEY - 1, 2**31 - 1)]


def run_cpp(program, consts, base, batch, height, width, key, call, n_values):
    """(values, table) of the C++ program, written into outputs poisoned with NaN."""
    values, table = tp.new_outputs(program.shape[0], batch, n_values, torch.device("cpu"))
    values.fill_(math.nan)
    table.fill_(math.nan)
    ext().task_params_cpu(program, consts, base, values, table, height, width, key, call)
    return values, table


def run_twin(program, consts, base, batch, height, width, key, call, n_values):
    return tp.task_params_torch(program, consts, base, batch_size=batch, height=height, width=width, key=key,
                                call=call, n_values=n_values)


def integer_columns(program: torch.Tensor, n_values: int) -> torch.Tensor:
    """(K, n_values) bool: the values columns whose last writer draws integers (boxes, INTEGER)."""
    mask = torch.zeros(program.shape[0], n_values, dtype=torch.bool)
    for v, view in enumerate(program.tolist()):
        for code, _, offset, _, _ in view:
            if 0 < code < len(tp.VALUES) and tp.VALUES[code]:
                mask[v, offset : offset + tp.VALUES[code]] = code in INTEGER_CODES
    return mask


def assert_matches_twin(got, want, program: torch.Tensor, *, finite: bool = True) -> None:
    """The Triton kernel's bar against the twin (module docstring); finite: no NaN anywhere (every
    poisoned element was written with a number)."""
    values, table = got
    want_values, want_table = want
    if finite:
        assert not values.isnan().any() and not table.isnan().any()
    exact = integer_columns(program, values.shape[-1])[:, None, :].expand_as(values)
    torch.testing.assert_close(values[exact], want_values[exact], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(values, want_values, rtol=1e-12, atol=1e-12, equal_nan=True)
    same_rows = ((values == want_values) | (values.isnan() & want_values.isnan())).all(dim=-1)
    torch.testing.assert_close(table[same_rows], want_table[same_rows], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(table, want_table, rtol=2e-7, atol=1e-6, equal_nan=True)


def compare_tasks(names, batch, height, width, key, call):
    """The C++ program of a task list against the twin; returns the C++ values."""
    prog = build_program([parse_task(t) for t in names])
    args = (prog.program, prog.consts, prog.base, batch, height, width, key, call, prog.n_values)
    got = run_cpp(*args)
    assert_matches_twin(got, run_twin(*args), prog.program)
    return got[0]


# ------------------------------------------------------------------------------------------------
# Against the twin
# ------------------------------------------------------------------------------------------------
@needs_cpp
def test_abi_matches_the_python_constants():
    abi = ext().task_params_abi()
    assert abi == {name: getattr(tp, name) for name in abi}
    assert {n for n in vars(tp) if n.startswith("PARAM_")} <= set(abi)


@needs_cpp
@pytest.mark.parametrize("batch, height, width", [(37, 7, 13), (5, 31, 6), (2, 1, 1), (257, 3, 7), (1, 225, 223),
                                                  (0, 5, 5)])
@pytest.mark.parametrize("key, call", KEYS_AND_CALLS)
def test_every_instruction_equals_the_twin(batch, height, width, key, call):
    compare_tasks(TASKS, batch, height, width, key, call)


@needs_cpp
def test_both_box_branches_are_compared():
    """At 37 x 7 x 13 the crop search falls back for some images (not all) and the erase search
    finds no box for some (not all): both branches of each are held to the twin above."""
    values = compare_tasks(TASKS, 37, 7, 13, 2**61 + 12345, 77)
    crop_h = round(13 / 2)  # the fallback crop at ratio 2, the lower end (W / H < 2)
    fallback = torch.tensor([(7 - crop_h) // 2, 0, crop_h, 13], dtype=torch.float64)
    n_fallback = int((values[4, :, :4] == fallback).all(dim=1).sum())
    n_no_box = int((values[5, :, :4] == 0).all(dim=1).sum())
    assert 0 < n_fallback < 37 and 0 < n_no_box < 37, (n_fallback, n_no_box)


@needs_cpp
@pytest.mark.parametrize("height, width, scale, ratio, box", [
    (16, 16, (0.99, 1.0), (5.0, 6.0), (6, 0, 3, 16)),    # W / H below the ratios: full width, h = round(W / 5)
    (4, 16, (0.99, 1.0), (0.2, 0.5), (0, 7, 4, 2)),      # W / H above them: full height, w = round(H * 0.5)
    (16, 4, (2.0, 3.0), (0.2, 0.3), (0, 0, 16, 4)),      # W / H within them: the whole image
    # W / r_lo = 6.5 in true division, 6.500000000000001 as W * (1 / r_lo): true division, as torchvision
    (10, 3, (2.0, 3.0), (0.4615384615384615, 1.0), (2, 0, 6, 3)),
])
def test_every_image_falls_back(height, width, scale, ratio, box):
    """Ranges no attempt can meet (the last one's areas exceed the image: raw constants, as no task
    validates them): every image takes torchvision's centre-crop fallback; an erase that never fits
    gives no box (all zeros) for every image."""
    specs = [parse_task(("resized_crop", {"ratio": ratio})), parse_task(("erase", {"scale": (0.99, 1.0)}))]
    prog = build_program(specs)
    prog.consts[0, 0, :2] = torch.tensor(scale)
    args = (prog.program, prog.consts, prog.base, 9, height, width, 5, 6, prog.n_values)
    values, table = run_cpp(*args)
    assert_matches_twin((values, table), run_twin(*args), prog.program)
    assert torch.equal(values[0, :, :4], torch.tensor(box, dtype=torch.float64).expand(9, 4))
    assert torch.equal(values[1, :, :4], torch.zeros(9, 4, dtype=torch.float64))


@needs_cpp
@pytest.mark.parametrize("k", [1, 10, 32])
def test_view_counts(k):
    names = (TASKS * 3)[:k] if k != 10 else list(mf.DEFAULT_TASKS)
    for key, call in KEYS_AND_CALLS[:2]:
        compare_tasks(names, 3, 9, 11, key, call)


def raw_program(rows: list[list[tuple]], consts: list[list[tuple]] | None = None):
    """(program, consts, base) tables of raw instructions; consts default to (lo, hi) = (-2, 3), ..."""
    k, n = len(rows), max([len(r) for r in rows], default=0)
    program = torch.zeros(k, n, tp.PROGRAM_WIDTH, dtype=torch.int32)
    program[..., 3:] = -1
    default = torch.tensor([(-2.0, 3.0, 0.1, 0.2, 0.5, 2.0, -5.0, 5.0)], dtype=torch.float64)
    const = default.expand(k, n, tp.N_CONSTS).clone() if consts is None else torch.tensor(consts, dtype=torch.float64)
    for v, view in enumerate(rows):
        for j, ins in enumerate(view):
            program[v, j] = torch.tensor(ins, dtype=torch.int32)
    g = torch.Generator().manual_seed(k * 31 + n)
    return program, const.reshape(k, n, tp.N_CONSTS), torch.rand(k, fv.N_SLOTS, generator=g)


@needs_cpp
def test_raw_programs_slots_chains_and_padding():
    """Slots a and b, a slot two instructions write (the later wins), padding between instructions,
    flips composed with warps, an instruction on the matrix slots (the matrix wins), K = 0, L = 0."""
    u, i, none = tp.PARAM_UNIFORM, tp.PARAM_INTEGER, tp.PARAM_NONE
    rows = [
        [(u, 0, 0, fv.SLOT_BRIGHTNESS, fv.SLOT_HUE), (none, 0, 0, -1, -1), (i, 1, 1, fv.SLOT_BRIGHTNESS, -1)],
        [(tp.PARAM_HFLIP, 0, 0, -1, -1), (tp.PARAM_ROTATE, 3, 2, -1, -1), (tp.PARAM_VFLIP, 0, 0, -1, -1)],
        [(u, 7, 0, fv.SLOT_M2, -7), (tp.PARAM_AFFINE, 0, 1, -1, -1), (i, 9, 7, fv.SLOT_M0, -1)],
        [(tp.PARAM_RESIZED_CROP, 2, 4, -1, -1), (tp.PARAM_ERASE, 30, 0, -1, -1), (u, 60, 8, fv.SLOT_ERASE_H, -1)],
    ]
    program, consts, base = raw_program(rows)
    consts[3, 0, :6] = torch.tensor([0.1, 0.9, -1.0, 1.0, 0.5, 2.0])   # crop: scale, log ratio, fallback ratio
    consts[3, 1, :4] = torch.tensor([0.02, 0.5, -1.0, 1.0])            # erase
    for batch, height, width in ((6, 5, 8), (1, 1, 1), (0, 3, 3)):
        args = (program, consts, base, batch, height, width, 11, 12, 9)
        got = run_cpp(*args)
        assert_matches_twin(got, run_twin(*args), program)
        if batch:
            assert torch.equal(got[1][0, :, fv.SLOT_BRIGHTNESS], got[0][0, :, 1].float())   # the later write
            assert torch.equal(got[1][0, :, fv.SLOT_HUE], got[0][0, :, 0].float())
            assert torch.equal(got[1][0, :, fv.SLOT_FILL], base[0, fv.SLOT_FILL].expand(batch))
    for program, consts, base in (raw_program([]), raw_program([[], []])):  # K = 0; L = 0 (only the base)
        got = run_cpp(program, consts, base, 4, 3, 3, 0, 0, 2)
        assert_matches_twin(got, run_twin(program, consts, base, 4, 3, 3, 0, 0, 2), program)


@needs_cpp
def test_thread_count_does_not_change_the_bits():
    prog = build_program([parse_task(t) for t in (TASKS * 3)[:32]])
    args = (prog.program, prog.consts, prog.base, 257, 29, 31, 2**40 + 3, 9, prog.n_values)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_cpp(*args)
        torch.set_num_threads(2)
        two = run_cpp(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_cpp
def test_the_comparison_can_fail():
    """assert_matches_twin catches a box off by one, a float value off by 1e-10 relative and a table entry
    off by one float32 ulp on a row whose values agree."""
    prog = build_program([parse_task(t) for t in TASKS])
    args = (prog.program, prog.consts, prog.base, 6, 9, 11, 3, 4, prog.n_values)
    values, table = run_cpp(*args)
    want = run_twin(*args)
    for edit in (lambda v, t: v[4, 2, 2].add_(1.0), lambda v, t: v[2, 1, 0].mul_(1 + 1e-10),
                 lambda v, t: t[0, 3, fv.SLOT_M1].copy_(torch.nextafter(t[0, 3, fv.SLOT_M1], torch.tensor(1.0)))):
        v, t = values.clone(), table.clone()
        edit(v, t)
        with pytest.raises(AssertionError):
            assert_matches_twin((v, t), want, prog.program)


# ------------------------------------------------------------------------------------------------
# Hypothesis: random task lists and random raw programs
# ------------------------------------------------------------------------------------------------
OP_NAMES = sorted({cls.name for cls in OPS.values()})
RANGES = st.tuples(st.floats(-720.0, 720.0), st.floats(0.0, 720.0)).map(lambda p: (p[0], p[0] + p[1]))


@st.composite
def task_lists(draw):
    """1..6 tasks: chains of 1..3 ops, or a rotate / resized_crop / erase with random ranges."""
    tasks = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["chain", "rotate", "resized_crop", "erase"]))
        if kind == "chain":
            tasks.append("+".join(draw(st.lists(st.sampled_from(OP_NAMES), min_size=1, max_size=3))))
        elif kind == "rotate":
            tasks.append(("rotate", {"angle": draw(RANGES)}))
        else:
            lo, r_lo = draw(st.floats(0.01, 1.0)), draw(st.floats(0.1, 5.0))
            scale, ratio = (lo, draw(st.floats(lo, 1.0))), (r_lo, r_lo * draw(st.floats(1.0, 4.0)))
            tasks.append((kind, {"scale": scale, "ratio": ratio}))
    return tasks


@needs_cpp
@_settings(40)
@given(tasks=task_lists(), batch=st.integers(0, 40), height=st.integers(1, 40), width=st.integers(1, 40),
       key=st.integers(0, tp.MAX_KEY - 1), call=SEEDS)
def test_random_task_lists_equal_the_twin(tasks, batch, height, width, key, call):
    compare_tasks(tasks, batch, height, width, key, call)


CONSTS = st.one_of(st.floats(-1e3, 1e3),
                   st.sampled_from([0.0, -0.0, 1.0, 1e300, -1e300, math.inf, -math.inf, math.nan]))


@st.composite
def raw_programs(draw):
    """(program, consts, base, n_values): 1..4 views of 0..4 instructions with any code, in-range
    offsets and slots (overlapping allowed), any constants (huge, infinite and NaN included)."""
    k, n, n_values = draw(st.integers(1, 4)), draw(st.integers(0, 4)), draw(st.integers(6, 12))
    rows = []
    for _ in range(k):
        view = []
        for _ in range(n):
            code = draw(st.integers(0, len(tp.DRAWS) - 1))
            offset = draw(st.integers(0, n_values - max(tp.VALUES[code], 1)))
            view.append((code, draw(st.integers(0, 100)), offset, draw(st.integers(-2, fv.N_SLOTS - 1)),
                         draw(st.integers(-2, fv.N_SLOTS - 1))))
        rows.append(view)
    consts = [[[draw(CONSTS) for _ in range(tp.N_CONSTS)] for _ in range(n)] for _ in range(k)]
    program, consts, base = raw_program(rows, consts if n else None)
    return program, consts, base, n_values


@needs_cpp
@_settings(60)
@given(case=raw_programs(), batch=st.integers(0, 9), height=st.integers(0, 12), width=st.integers(0, 12),
       key=st.integers(0, tp.MAX_KEY - 1), call=SEEDS)
def test_random_raw_programs_equal_the_twin(case, batch, height, width, key, call):
    program, consts, base, n_values = case
    args = (program, consts, base, batch, height, width, key, call, n_values)
    try:
        want = run_twin(*args)
    except ZeroDivisionError:  # the twin's crop fallback divides Python ints: W / 0; C++ gives IEEE inf / NaN
        want = None
    got = run_cpp(*args)
    if want is not None:
        assert_matches_twin(got, want, program, finite=False)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def good_args():
    prog = build_program([parse_task(t) for t in ("rotate", "resized_crop+hue", "posterize")])
    values, table = tp.new_outputs(3, 4, prog.n_values, torch.device("cpu"))
    values.fill_(math.nan)
    table.fill_(math.nan)
    return dict(program=prog.program.clone(), consts=prog.consts.clone(), base=prog.base.clone(), values=values,
                table=table, height=8, width=8, key=1, call=2)


def _set(name, value):
    return lambda a: {**a, name: value}


def _entry(index, value):
    def edit(a):
        program = a["program"].clone()
        program[index] = value
        return {**a, "program": program}
    return edit


BAD = [
    ("program", _set("program", torch.zeros(3, 2, 4, dtype=torch.int32)), "program must be"),
    ("program", _set("program", torch.zeros(3, 2, 5, dtype=torch.int64)), "program must be"),
    ("consts", lambda a: {**a, "consts": a["consts"].float()}, "consts must be"),
    ("consts", lambda a: {**a, "consts": a["consts"][:, :1]}, "consts must be"),
    ("base", lambda a: {**a, "base": a["base"][:2]}, "base must be"),
    ("base", lambda a: {**a, "base": a["base"].t().contiguous().t()}, "base must be contiguous"),
    ("values", lambda a: {**a, "values": a["values"][:2]}, "values must be"),
    ("values", lambda a: {**a, "values": a["values"].float()}, "values must be"),
    ("values", lambda a: {**a, "values": a["values"].transpose(0, 1).contiguous().transpose(0, 1)},
     "values must be contiguous"),
    ("table", lambda a: {**a, "table": a["table"][:, :3]}, "table must be"),
    ("table", lambda a: {**a, "table": a["table"].double()}, "table must be"),
    ("table", lambda a: {**a, "table": torch.empty(a["table"].shape, device="meta")}, "table must be a CPU tensor"),
    ("height", _set("height", -1), "height must be in"),
    ("width", _set("width", 2**31), "width must be in"),
    ("code", _entry((0, 0, 0), 9), r"program\[0, 0, 0\] = 9 is not a PARAM_\* code"),
    ("code", _entry((1, 1, 0), -1), r"program\[1, 1, 0\] = -1 is not a PARAM_\* code"),
    ("draw offset", _entry((0, 0, 1), -1), r"program\[0, 0, 1\] = -1: the draw offset"),
    ("draw offset", _entry((1, 0, 1), 2**31 - 22), r"program\[1, 0, 1\] = 2147483626: the draw offset"),
    ("value offset", _entry((1, 0, 2), -1), r"program\[1, 0, 2\] = -1: code 5 writes values columns"),
    ("value offset", _entry((2, 0, 2), 99), r"program\[2, 0, 2\] = 99: code 7 writes values columns \[99, 100\)"),
    ("slot", _entry((1, 1, 3), fv.N_SLOTS), r"program\[1, 1, 3\] = 32: a slot must be < N_SLOTS"),
    ("slot", _entry((2, 0, 3), 1000), r"program\[2, 0, 3\] = 1000: a slot must be"),
]


@needs_cpp
@pytest.mark.parametrize("what, edit, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_value_errors(what, edit, message):
    args = edit(good_args())
    with pytest.raises(ValueError, match=message):
        ext().task_params_cpu(**args)
    assert args["values"].isnan().all()  # checked before anything ran


@needs_cpp
def test_wrong_argument_types_raise_type_errors():
    args = good_args()
    for name, value in (("program", args["program"].tolist()), ("height", 8.0), ("key", "1"), ("values", None)):
        with pytest.raises(TypeError):
            ext().task_params_cpu(**{**args, name: value})


@needs_cpp
def test_unused_entries_are_not_checked():
    """Padding rows and the fields an instruction does not use (a flip's offsets, a rotate's slots)
    may hold anything, as in the kernel and the twin."""
    program, consts, base = raw_program([[(tp.PARAM_HFLIP, -5, 99, 77, -9), (tp.PARAM_NONE, -1, -1, 99, 99),
                                          (tp.PARAM_ROTATE, 0, 0, 99, 1000)]])
    got = run_cpp(program, consts, base, 3, 4, 5, 0, 0, 1)
    assert_matches_twin(got, run_twin(program, consts, base, 3, 4, 5, 0, 0, 1), program)


def random_program(g: torch.Generator, k: int, n: int, n_values: int) -> torch.Tensor:
    """A valid random program: any code, draw offsets in [0, 50], values offsets in range, slots in
    [-3, N_SLOTS)."""
    program = torch.empty(k, n, tp.PROGRAM_WIDTH, dtype=torch.int32)
    program[..., 0] = torch.randint(0, len(tp.DRAWS), (k, n), generator=g)
    program[..., 1] = torch.randint(0, 51, (k, n), generator=g)
    widths = torch.tensor(tp.VALUES)[program[..., 0].long()]
    program[..., 2] = (torch.rand(k, n, generator=g) * (n_values - widths + 1)).int()
    program[..., 3:] = torch.randint(-3, fv.N_SLOTS, (k, n, 2), generator=g)
    return program


@needs_cpp
def test_garbage_programs_stay_inside_their_buffers():
    """Valid random programs with one entry overwritten by a random int32 in every other trial, and
    constants of any magnitude: each call either raises ValueError or writes its outputs and never
    the guard bands around them."""
    g = torch.Generator().manual_seed(0)
    guard, k, n, batch, n_values = 64, 3, 4, 5, 6
    ran = 0
    for trial in range(300):
        program = random_program(g, k, n, n_values)
        if trial % 2:
            index = tuple(int(torch.randint(0, size, (), generator=g)) for size in program.shape)
            program[index] = int(torch.randint(-2**31, 2**31, (), generator=g, dtype=torch.int64))
        scale = 10.0 ** torch.randint(-3, 300, (k, n, tp.N_CONSTS), generator=g)
        consts = torch.randn(k, n, tp.N_CONSTS, generator=g, dtype=torch.float64) * scale
        values_buf = torch.full((2 * guard + k * batch * n_values,), -7.0, dtype=torch.float64)
        table_buf = torch.full((2 * guard + k * batch * fv.N_SLOTS,), -7.0)
        values = values_buf[guard:-guard].view(k, batch, n_values)
        table = table_buf[guard:-guard].view(k, batch, fv.N_SLOTS)
        try:
            ext().task_params_cpu(program, consts, torch.zeros(k, fv.N_SLOTS), values, table, 6, 7, 1, 2)
            ran += 1
        except ValueError:
            assert trial % 2, "a valid program was refused"
        for buf in (values_buf, table_buf):
            assert (buf[:guard] == -7.0).all() and (buf[-guard:] == -7.0).all()
    assert 150 < ran < 300, ran  # both outcomes were exercised


# ------------------------------------------------------------------------------------------------
# DistributionTasks: dispatch and aten ops
# ------------------------------------------------------------------------------------------------
@needs_cpp
def test_cpu_parameters_come_from_the_cpp_program(monkeypatch):
    twin = mf.DistributionTasks(TASKS, seed=5, backend="torch").sample(33, (12, 10))

    def no_twin(*args, **kwargs):
        raise AssertionError("the twin ran")

    default_twin = mf.DistributionTasks(list(mf.DEFAULT_TASKS), seed=5, backend="torch").sample(33, (12, 10))
    monkeypatch.setattr(tp, "task_params_torch", no_twin)
    got = mf.DistributionTasks(TASKS, seed=5).sample(33, (12, 10))
    assert torch.equal(got.values, twin.values) and torch.equal(got.table, twin.table)
    got = mf.DistributionTasks(list(mf.DEFAULT_TASKS), seed=5, backend="cpu").sample(33, (12, 10))
    assert torch.equal(got.values, default_twin.values) and torch.equal(got.table, default_twin.table)


def test_torch_backend_and_a_build_without_the_program_use_the_twin(monkeypatch):
    """backend="torch" is the all-PyTorch reference; without the compiled program "auto" falls back
    to the twin; the parameters are the same bits whichever path drew them."""
    calls = []
    real_twin = tp.task_params_torch

    def spy(*args, **kwargs):
        calls.append(1)
        return real_twin(*args, **kwargs)

    monkeypatch.setattr(tp, "task_params_torch", spy)
    auto = mf.DistributionTasks(list(mf.DEFAULT_TASKS), seed=9).sample(17, (9, 14))
    n_auto = len(calls)
    torch_backend = mf.DistributionTasks(list(mf.DEFAULT_TASKS), seed=9, backend="torch").sample(17, (9, 14))
    assert len(calls) == n_auto + 1
    monkeypatch.setattr(tasks_module, "_program_cpu", lambda: None)
    fallback = mf.DistributionTasks(list(mf.DEFAULT_TASKS), seed=9).sample(17, (9, 14))
    assert len(calls) == n_auto + 2
    for params in (torch_backend, fallback):
        assert torch.equal(params.values, auto.values) and torch.equal(params.table, auto.table)


@needs_cpp
def test_a_cpu_sample_is_one_aten_op():
    """The sample: one allocation (values and table in one buffer), then the C++ call (no aten op).
    tasks(x) on the fused CPU path adds the views' allocation: two in all, no host reads or copies."""
    tasks = mf.DistributionTasks(list(mf.DEFAULT_TASKS), seed=1, backend="cpu")
    x = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tasks(x)
    with DeviceOps(x) as counter:
        tasks.sample(4, (10, 12))
    assert counter.ops == ["aten.empty.memory_format"]
    with DeviceOps(x) as counter:
        tasks(x)
    assert counter.ops == ["aten.empty.memory_format"] * 2
    assert counter.host_reads == [] and counter.copies == []
