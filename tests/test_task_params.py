"""The parameter program (kernels/task_params.py): its Philox stream against Random123's known
answers, the Triton kernel against its torch twin (same draws, every instruction, every element
written), and the crop / erase boxes against torchvision's own RandomResizedCrop.get_params and
RandomErasing.get_params by two-sample Kolmogorov-Smirnov tests that a wrong sampler fails."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision import transforms as T

import mtdl_fast as mf
from mtdl_fast.kernels import fused_views as fv
from mtdl_fast.kernels import task_params as tp
from mtdl_fast.ops import OPS
from mtdl_fast.tasks import build_program, parse_task

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter words, key words) -> output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_twin_matches_random123(counter, key, expected):
    words = tp.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


# Every instruction, composites, chains the fused kernel refuses (their values are still drawn),
# ranges that make the box searches fail and fall back, fills, integer parameters.
TASKS = [
    "identity", "horizontal_flip+vertical_flip", ("rotate", {"angle": (-400.0, 400.0), "fill": 0.5}),
    ("affine", {"angle": (-90.0, 90.0), "translate": (0.3, 0.1), "scale": (0.5, 1.5), "shear": (-30.0, 30.0)}),
    ("resized_crop+horizontal_flip", {"scale": (0.6, 1.0), "ratio": (2.0, 4.0)}),
    ("erase", {"scale": (0.3, 0.9), "ratio": (0.2, 5.0), "value": 0.75}),
    "gaussian_blur+posterize", "sharpness+brightness+contrast+saturation+hue+solarize+gaussian_noise+invert",
    "hue+rotate", "rotate+rotate+brightness+brightness", ("posterize", {"bits": (0, 8)}),
]


def _program_and_twin(tasks, batch, height, width, key, call, device):
    kwargs = dict(batch_size=batch, height=height, width=width, key=key, call=call,
                  n_values=tasks._program.n_values)
    prog = tasks._program
    twin = tp.task_params_torch(prog.program, prog.consts, prog.base, **kwargs)
    values, table, launch = tp._plan(*tasks._program_tables(device), batch, height, width, key, call,
                                     tasks._program.n_values)
    values.fill_(float("nan"))  # poison: every element must be written
    table.fill_(float("nan"))
    launch()
    return (values.cpu(), table.cpu()), twin


def _integer_columns(tasks) -> torch.Tensor:
    """Which values columns of each view hold integers (boxes, bits): compared exactly."""
    mask = torch.zeros(len(tasks), tasks._program.n_values, dtype=torch.bool)
    for k, view in enumerate(tasks._program.layout):
        for columns in view:
            for name, col, width in columns:
                if name in ("box", "bits"):
                    mask[k, col : col + width] = True
    return mask


@pytest.mark.parametrize("batch, height, width, mixed", [(37, 7, 13, True), (5, 31, 6, False)])
def test_kernel_equals_twin_on_every_instruction(device, batch, height, width, mixed):
    """mixed: the crop search falls back for some images (not all) and the erase search finds no
    box for some (not all): both branches are compared."""
    tasks = mf.DistributionTasks(TASKS, seed=0)
    (values, table), (want_values, want_table) = _program_and_twin(tasks, batch, height, width, 2**61 + 12345,
                                                                   77, device)
    assert torch.isfinite(values).all() and torch.isfinite(table).all()
    exact = _integer_columns(tasks)[:, None, :].expand_as(values)
    assert torch.equal(values[exact], want_values[exact])
    torch.testing.assert_close(values, want_values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(table, want_table, rtol=2e-7, atol=1e-6)
    crop_h = round(width / 2)  # the fallback crop at ratio 2, the lower end (W / H < 2 in both cases)
    fallback = torch.tensor([(height - crop_h) // 2, 0, crop_h, width], dtype=torch.float64)
    n_fallback = int((values[4, :, :4] == fallback).all(dim=1).sum())
    n_no_box = int((values[5, :, :4] == 0).all(dim=1).sum())
    if mixed:
        assert 0 < n_fallback < batch and 0 < n_no_box < batch, (n_fallback, n_no_box)


def test_kernel_draws_are_the_twins_uniforms(device):
    """UNIFORM(0, 1) writes the raw draw: the kernel's stream is the twin's, bit for bit, and the
    draws of (view, image) do not depend on the batch size."""
    k, n = 3, 4
    program = torch.tensor([[(tp.PARAM_UNIFORM, j, j, -1, -1) for j in range(n)]] * k, dtype=torch.int32)
    consts = torch.zeros(k, n, tp.N_CONSTS, dtype=torch.float64)
    consts[..., 1] = 1.0
    base = torch.zeros(k, fv.N_SLOTS)
    for batch in (5, 9):
        args = dict(batch_size=batch, height=1, width=1, key=987654321, call=3, n_values=n)
        values, _ = tp.task_params(program.to(device), consts.to(device), base.to(device), **args)
        assert torch.equal(values.cpu(), tp.uniforms(k, batch, n, 987654321, 3, torch.device("cpu")))
    u = tp.uniforms(k, 9, n, 987654321, 3, torch.device("cpu"))
    assert torch.equal(u[:, :5], tp.uniforms(k, 5, n, 987654321, 3, torch.device("cpu")))
    assert len(set(u.flatten().tolist())) == u.numel()  # distinct across views, images and draws
    assert not torch.equal(u, tp.uniforms(k, 9, n, 987654321, 4, torch.device("cpu")))


def test_every_op_declares_what_its_program_writes():
    for cls in {c for c in OPS.values()}:
        op = parse_task(cls.name).ops[0]
        written = sum(tp.VALUES[ins.code] for ins in op.instructions())
        assert written == sum(width for _, width in type(op).values), cls.name
        for ins in op.instructions():
            assert len(ins.consts) <= tp.N_CONSTS and len(ins.slots) <= 2
    program = build_program([parse_task("rotate+hue"), parse_task("identity")])
    assert program.layout == ((((("angle", 0, 1),), (("hue_factor", 1, 1),))), ((),))
    assert program.program[1, 0].tolist() == [tp.PARAM_NONE, 0, 0, -1, -1]


def test_launcher_rejects_bad_tables():
    program = torch.zeros(2, 1, tp.PROGRAM_WIDTH, dtype=torch.int32)
    consts = torch.zeros(2, 1, tp.N_CONSTS, dtype=torch.float64)
    base = torch.zeros(2, fv.N_SLOTS)
    args = dict(batch_size=3, height=4, width=4, key=0, call=0, n_values=1)
    for launcher in (tp.task_params, tp.task_params_torch):
        with pytest.raises(TypeError, match="program"):
            launcher(program.tolist(), consts, base, **args)
        with pytest.raises(ValueError, match="consts"):
            launcher(program, consts.float(), base, **args)
        with pytest.raises(ValueError, match="base"):
            launcher(program, consts, base[:1], **args)
        with pytest.raises(TypeError, match="batch_size"):
            launcher(program, consts, base, **{**args, "batch_size": 3.0})
        with pytest.raises(ValueError, match="height"):
            launcher(program, consts, base, **{**args, "height": -1})


# ------------------------------------------------------------------------------------------------
# Box distributions against torchvision
# ------------------------------------------------------------------------------------------------
N_BOXES = 4000
P_MIN = 1e-4  # a statistic fails when the two-sample KS p-value is below this


@functools.cache
def torchvision_boxes(kind: str, height: int, width: int, scale, ratio, seed: int) -> torch.Tensor:
    """(N_BOXES, 4) top, left, h, w from torchvision's own get_params; RandomErasing's "no box" as
    zeros (it returns the image unchanged, as our sampler's zero box)."""
    img = torch.zeros(1, height, width)
    boxes = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(N_BOXES):
            if kind == "crop":
                boxes.append(T.RandomResizedCrop.get_params(img, list(scale), list(ratio)))
            else:
                i, j, h, w, v = T.RandomErasing.get_params(img, scale=scale, ratio=ratio, value=[0.0])
                boxes.append((i, j, h, w) if v is not img else (0, 0, 0, 0))
    return torch.tensor(boxes, dtype=torch.float64)


def our_boxes(kind: str, height: int, width: int, scale, ratio, seed: int, device, program: str) -> torch.Tensor:
    op = "resized_crop" if kind == "crop" else "erase"
    backend = "torch" if program == "twin" else ("triton" if device.type == "cpu" else "auto")
    tasks = mf.DistributionTasks([(op, {"scale": scale, "ratio": ratio})], seed=seed, backend=backend)
    return tasks.sample(N_BOXES, (height, width), device=device).views[0][0]["box"].cpu()


def flawed_boxes(kind: str, height: int, width: int, scale, ratio, seed: int, flaw: str) -> torch.Tensor:
    """The box search with one deliberate flaw, to show the comparison catches it."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(N_BOXES, 2 * tp.BOX_ATTEMPTS + 2, generator=g, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, : tp.BOX_ATTEMPTS])
    r = u[:, tp.BOX_ATTEMPTS : 2 * tp.BOX_ATTEMPTS]
    if flaw == "uniform aspect":
        aspect = ratio[0] + (ratio[1] - ratio[0]) * r
    else:
        aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r)
    long_side, short_side = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    h, w = (long_side, short_side) if (kind == "erase") != (flaw == "swapped sides") else (short_side, long_side)
    if kind == "erase":
        ok = (h < height) & (w < width)
    else:
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    if flaw == "first attempt, clamped":
        ok[:, 0] = True
        h, w = h.clamp(1, height), w.clamp(1, width)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.any(dim=1)
    h, w = h.gather(1, first).squeeze(1) * found, w.gather(1, first).squeeze(1) * found
    top = torch.floor(u[:, -2] * (height - h + 1)) * found
    left = torch.floor(u[:, -1] * (width - w + 1)) * found
    if kind == "crop":  # torchvision's fallback: the centre crop, aspect clamped into the ratio range
        fw, fh = width, height
        if width / height < ratio[0]:
            fh = round(width / ratio[0])
        elif width / height > ratio[1]:
            fw = round(height * ratio[1])
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
        return torch.where(found[:, None], torch.stack((top, left, h, w), dim=1), fallback)
    return torch.stack((top, left, h, w), dim=1)


def box_mismatches(ours: torch.Tensor, theirs: torch.Tensor, height: int, width: int) -> dict[str, float]:
    """Statistics whose two-sample KS test says the samples differ: name -> p-value. Area fraction
    (no box: 0), then over the boxes of both: log aspect w / h and the box's relative position."""
    def stats(b: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, h, w = b.unbind(1)
        some = (h > 0) & (w > 0)
        return {"area": (h * w / (height * width)),
                "log aspect": torch.log(w[some] / h[some]),
                "top": (top / (height - h + 1))[some],
                "left": (left / (width - w + 1))[some]}

    a, b = stats(ours), stats(theirs)
    p = {name: float(ks_2samp(a[name].numpy(), b[name].numpy()).pvalue) for name in a}
    return {name: value for name, value in p.items() if value < P_MIN}


CROPS = [(32, 40, (0.08, 1.0), (3 / 4, 4 / 3)),   # torchvision's defaults
         (24, 24, (0.5, 1.0), (1.5, 3.0))]        # asymmetric ratio: many rejections, fallbacks
ERASES = [(32, 32, (0.02, 0.33), (0.3, 3.3)),    # RandomErasing's defaults
          (20, 30, (0.3, 0.9), (0.5, 4.0))]       # asymmetric ratio, boxes often too big: no box


@pytest.mark.parametrize("program", ["twin", "kernel"])
@pytest.mark.parametrize("kind, height, width, scale, ratio",
                         [("crop", *c) for c in CROPS] + [("erase", *e) for e in ERASES])
def test_boxes_match_torchvision(device, program, kind, height, width, scale, ratio):
    theirs = torchvision_boxes(kind, height, width, scale, ratio, seed=1)
    ours = our_boxes(kind, height, width, scale, ratio, seed=2, device=device, program=program)
    assert box_mismatches(ours, theirs, height, width) == {}
    if kind == "erase":  # the share of images that get no box at all, within 4 standard errors
        share = [float((b[:, 2] == 0).double().mean()) for b in (ours, theirs)]
        assert abs(share[0] - share[1]) <= 4 * math.sqrt(max(share[1] * (1 - share[1]), 1e-4) * 2 / N_BOXES)


@pytest.mark.parametrize("flaw, kind, config", [
    ("uniform aspect", "crop", CROPS[1]),
    ("uniform aspect", "erase", ERASES[0]),
    ("swapped sides", "erase", ERASES[1]),
    ("swapped sides", "crop", CROPS[1]),
    ("first attempt, clamped", "crop", CROPS[1]),
])
def test_box_comparison_rejects_a_wrong_sampler(flaw, kind, config):
    height, width, scale, ratio = config
    theirs = torchvision_boxes(kind, height, width, scale, ratio, seed=1)
    # the flawless version of the same sampler passes, so a failure below is the flaw's
    assert box_mismatches(flawed_boxes(kind, height, width, scale, ratio, 3, "none"), theirs, height, width) == {}
    assert box_mismatches(flawed_boxes(kind, height, width, scale, ratio, 3, flaw), theirs, height, width)
