"""Per-call parameter program: every view's per-image parameters and the fused-view table, one launch.

A call of the distribution tasks needs, for each view v and image b, the named parameters of the
view's ops (an angle, a crop box, ...) and the row ``params[v, b, :]`` that ``kernels.fused_views``
reads. Both come from one program per view, written once on the host (it depends only on the task
list) and run here for all views and images at once, drawing its random numbers in the kernel.

ABI (the task layer in ``mtdl_fast.tasks`` writes these tables; this file owns their layout):

* ``program[v, j, :]`` (int32, ``PROGRAM_WIDTH`` wide): instruction j of view v,
  ``(code, draw offset, value offset, slot a, slot b)``. Instructions run left to right;
  ``PARAM_NONE`` pads. Draw offsets index the view's random numbers, value offsets its ``values``
  columns; slots are ``fused_views`` ``SLOT_*`` offsets (-1: none).
* ``consts[v, j, :]`` (float64, ``N_CONSTS`` wide): the instruction's constants (ranges).
* ``base[v, :]`` (float32, ``N_SLOTS`` wide): view v's table row before its instructions run (the
  slots that are the same for every image: clamp box, fill, blur size, noise clip, erase value).
* Outputs: ``values`` (K, B, n_values) float64, each instruction's parameters at its value offset;
  ``table`` (K, B, N_SLOTS) float32, ``base`` updated by the instructions, with ``SLOT_M0..M5`` the
  composition M of the view's warps (identity when it has none). Every element is written.

Random numbers: draw i of image b of view v in call ``call`` under key ``key`` is
``u = word(i mod 4) * 2^-32`` (float64 in [0, 1)), where the words are Philox4x32-10 (Random123's
philox4x32, as documented in kernels/fused_views.py) of counter ``(i div 4, b, v, call mod 2^31)``
and key ``(key mod 2^31, (key div 2^31) mod 2^31)``. Any backend can reproduce them exactly; the draws
of (v, b) do not depend on the batch size or on the other views. ``U(lo, hi) = lo + (hi - lo) * u``.

Instructions (``c0..c7`` the constants; "warp A" composes M <- M o A, A the output -> source pixel
map in pixel-index coordinates, pixel centres at integers, as ``SLOT_M*``):

* ``PARAM_HFLIP`` / ``PARAM_VFLIP``: warp x -> W - 1 - x / y -> H - 1 - y.
* ``PARAM_ROTATE`` (1 draw; values angle): angle = U(c0, c1) degrees; warp: torchvision's rotate by
  angle about the image centre (its inverse affine matrix of -(angle mod 360)).
* ``PARAM_AFFINE`` (5 draws; values angle, tx, ty, scale, shear_x, shear_y): angle U(c0, c1),
  tx U(-c2, c2) * W, ty U(-c3, c3) * H, scale U(c4, c5), shear_x U(c6, c7), shear_y 0; warp:
  torchvision's affine about the centre.
* ``PARAM_RESIZED_CROP`` (22 draws; values top, left, h, w): torchvision's RandomResizedCrop box,
  10 attempts at once: attempt t draws area H * W * U(c0, c1) (draw t) and aspect exp(U(c2, c3))
  (draw 10 + t), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)) (half to even); the
  first attempt with 0 < w <= W and 0 < h <= H wins, top = floor(u20 * (H - h + 1)), left =
  floor(u21 * (W - w + 1)); none: the centre crop with aspect clamped to [c4, c5]. Warp: the crop
  resized to H x W, sampling clamped to the box (``SLOT_CLAMP_*``).
* ``PARAM_UNIFORM`` (1 draw; one value): U(c0, c1), also written to slots a and b.
* ``PARAM_INTEGER`` (1 draw; one value): min(floor(U(c0, c1 + 1)), c1), also written to slot a.
* ``PARAM_ERASE`` (22 draws; values top, left, h, w): torchvision's RandomErasing box: as the crop
  with area H * W * U(c0, c1), aspect exp(U(c2, c3)), h = round(sqrt(area * aspect)),
  w = round(sqrt(area / aspect)), accepted when h < H and w < W; none: all zeros (nothing erased).
  Also written to ``SLOT_ERASE_TOP..W``.

Arithmetic is float64 (the table is rounded to float32 once, at the end). The plain-torch twin
``task_params_torch`` defines the meaning; kernel and twin draw identical numbers and agree to the
rounding of sin, cos, exp and log.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from . import fused_views as fv
from ._jit import rint
from ._launch import Launch, interpreting

PARAM_NONE = 0
PARAM_HFLIP = 1
PARAM_VFLIP = 2
PARAM_ROTATE = 3
PARAM_AFFINE = 4
PARAM_RESIZED_CROP = 5
PARAM_UNIFORM = 6
PARAM_INTEGER = 7
PARAM_ERASE = 8

#: Random numbers and values each instruction code consumes / writes, indexed by code.
DRAWS = (0, 0, 0, 1, 5, 22, 1, 1, 22)
VALUES = (0, 0, 0, 1, 6, 4, 1, 1, 4)

PROGRAM_WIDTH = 5
N_CONSTS = 8
BOX_ATTEMPTS = 10     # torchvision's RandomResizedCrop / RandomErasing tries per image
MAX_KEY = 1 << 62     # keys are taken modulo MAX_KEY, call indices modulo 2^31

# Triton kernels may only read globals that are constexpr: mirror the header for the jit code.
_P_HFLIP = tl.constexpr(PARAM_HFLIP)
_P_VFLIP = tl.constexpr(PARAM_VFLIP)
_P_ROTATE = tl.constexpr(PARAM_ROTATE)
_P_AFFINE = tl.constexpr(PARAM_AFFINE)
_P_RESIZED_CROP = tl.constexpr(PARAM_RESIZED_CROP)
_P_UNIFORM = tl.constexpr(PARAM_UNIFORM)
_P_INTEGER = tl.constexpr(PARAM_INTEGER)
_P_ERASE = tl.constexpr(PARAM_ERASE)
_PROGRAM_WIDTH = tl.constexpr(PROGRAM_WIDTH)
_N_CONSTS = tl.constexpr(N_CONSTS)
_N_SLOTS = tl.constexpr(fv.N_SLOTS)
_ATTEMPTS = tl.constexpr(BOX_ATTEMPTS)
_ATTEMPTS_P2 = tl.constexpr(16)
_S_M0 = tl.constexpr(fv.SLOT_M0)
_S_M1 = tl.constexpr(fv.SLOT_M1)
_S_M2 = tl.constexpr(fv.SLOT_M2)
_S_M3 = tl.constexpr(fv.SLOT_M3)
_S_M4 = tl.constexpr(fv.SLOT_M4)
_S_M5 = tl.constexpr(fv.SLOT_M5)
_S_CX0 = tl.constexpr(fv.SLOT_CLAMP_X0)
_S_CX1 = tl.constexpr(fv.SLOT_CLAMP_X1)
_S_CY0 = tl.constexpr(fv.SLOT_CLAMP_Y0)
_S_CY1 = tl.constexpr(fv.SLOT_CLAMP_Y1)
_S_ETOP = tl.constexpr(fv.SLOT_ERASE_TOP)
_S_ELEFT = tl.constexpr(fv.SLOT_ERASE_LEFT)
_S_EH = tl.constexpr(fv.SLOT_ERASE_H)
_S_EW = tl.constexpr(fv.SLOT_ERASE_W)

# Philox4x32-10 constants (Salmon et al., SC 2011; Random123).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)
_TWO_M32 = 2.0**-32
_DEG2RAD = math.pi / 180.0
# Taylor coefficients of sin (t^1 .. t^17) and cos (t^0 .. t^18) on [-pi/4, pi/4]: the first
# omitted terms are below 1e-19, under half an ulp of float64.
_SIN_TAYLOR = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(9))
_COS_TAYLOR = tuple((-1) ** n / math.factorial(2 * n) for n in range(10))
_S1, _S3, _S5, _S7, _S9, _S11, _S13, _S15, _S17 = (tl.constexpr(c) for c in _SIN_TAYLOR)
_C0, _C2, _C4, _C6, _C8, _C10, _C12, _C14, _C16, _C18 = (tl.constexpr(c) for c in _COS_TAYLOR)

# Grid: axis 0 the blocks of BLOCK_B images, axis 1 the K views (CUDA's limit of 65535 views is far
# above any task list). A lane's work is a few hundred float64 operations plus the 16-wide attempts
# of a box search; 16 images on 4 warps compile to ~110 registers per thread without spills on
# sm_80/sm_90 (32 images: ~120 on sm_90; 2 warps spill). The interpreter pays per program, so there
# one program takes a whole view.
_BLOCK_B = 16
_NUM_WARPS = 4
_MAX_REGISTERS = 128     # per thread (ptxas' maxnreg)
_INTERPRETER_MAX_BLOCK = 1024


@triton.jit
def _philox_uniform(i, b, v, call, key_lo, key_hi):
    """Draw i (int32 tensor) of image b (int32 tensor of i's shape) of view v: float64 in [0, 1)."""
    c0 = (i // 4).to(tl.uint32)
    c1 = b.to(tl.uint32)
    zero = c0 * 0
    c2 = zero + v.to(tl.uint32)
    c3 = zero + call.to(tl.uint32)
    k0 = zero + key_lo.to(tl.uint32)
    k1 = zero + key_hi.to(tl.uint32)
    for _ in tl.static_range(_ROUNDS):  # 32-bit wrap-around is the algorithm: no overflow checks
        hi0 = tl.umulhi(c0, _M0)
        lo0 = tl.mul(c0, _M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, _M1)
        lo1 = tl.mul(c2, _M1, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, _W0, sanitize_overflow=False)
        k1 = tl.add(k1, _W1, sanitize_overflow=False)
    word = i % 4
    x = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
    return x.to(tl.float64) * 2.3283064365386963e-10


@triton.jit
def _sincos_degrees(a):
    """(sin, cos) of a degrees in float64 without libdevice, whose slow path for huge arguments
    costs every program a local-memory stack frame: q = the nearest multiple of 90 degrees, t the
    rest in radians (|t| <= pi/4), Taylor polynomials, then rotation by q quarter turns (so multiples
    of 90 degrees are exact)."""
    q = tl.floor(a * (1.0 / 90.0) + 0.5)
    t = (a - q * 90.0) * 0.017453292519943295
    t2 = t * t
    s = t * (_S1 + t2 * (_S3 + t2 * (_S5 + t2 * (_S7 + t2 * (_S9 + t2 * (_S11 + t2 * (_S13 + t2 * (
        _S15 + t2 * _S17))))))))
    c = _C0 + t2 * (_C2 + t2 * (_C4 + t2 * (_C6 + t2 * (_C8 + t2 * (_C10 + t2 * (_C12 + t2 * (_C14 + t2 * (
        _C16 + t2 * _C18))))))))
    quarter = q - 4.0 * tl.floor(q * 0.25)
    sin = tl.where(quarter == 0.0, s, tl.where(quarter == 1.0, c, tl.where(quarter == 2.0, -s, -c)))
    cos = tl.where(quarter == 0.0, c, tl.where(quarter == 1.0, -s, tl.where(quarter == 2.0, -c, s)))
    return sin, cos


@triton.jit
def _compose(m0, m1, m2, m3, m4, m5, a0, a1, a2, a3, a4, a5):
    """M o A for 2 x 3 affine maps: the source of output p is M(A(p))."""
    return (m0 * a0 + m1 * a3, m0 * a1 + m1 * a4, m0 * a2 + m1 * a5 + m2,
            m3 * a0 + m4 * a3, m3 * a1 + m4 * a4, m3 * a2 + m4 * a5 + m5)


@triton.jit
def _affine_matrix(angle, tx, ty, scale, shear_x, shear_y, cx, cy):
    """torchvision's inverse affine matrix (angle, shears in degrees) about pixel (cx, cy)."""
    sin_sx, cos_sx = _sincos_degrees(shear_x)
    sin_sy, cos_sy = _sincos_degrees(shear_y)
    sin_r, cos_r = _sincos_degrees(angle)
    sin_rs, cos_rs = _sincos_degrees(angle - shear_y)
    tan_sx = sin_sx / cos_sx
    a = cos_rs / cos_sy
    b = -(a * tan_sx + sin_r)
    c = sin_rs / cos_sy
    d = cos_r - c * tan_sx
    m0 = d / scale
    m1 = -b / scale
    m3 = -c / scale
    m4 = a / scale
    m2 = -m0 * tx - m1 * ty + cx - m0 * cx - m1 * cy
    m5 = -m3 * tx - m4 * ty + cy - m3 * cx - m4 * cy
    return m0, m1, m2, m3, m4, m5


@triton.jit
def _put(ptr, rows, width, col, x, live):
    """ptr[rows, col] = x in a (rows, width) buffer for the live rows; a column outside [0, width)
    (an instruction's unused slot, -1) writes nothing."""
    tl.store(ptr + rows * width + col, x.to(ptr.dtype.element_ty), mask=live & (col >= 0) & (col < width))


@triton.jit
def _box_search(d, b, v, call, key_lo, key_hi, cst, hf, wf, ERASE: tl.constexpr):
    """(h, w, found) of the first of the attempts of a RandomResizedCrop / RandomErasing search."""
    t = tl.arange(0, _ATTEMPTS_P2)
    i = d + t[None, :] + b[:, None] * 0
    bb = b[:, None] + t[None, :] * 0
    area_lo = tl.load(cst)
    area_hi = tl.load(cst + 1)
    log_lo = tl.load(cst + 2)
    log_hi = tl.load(cst + 3)
    area = hf * wf * (area_lo + (area_hi - area_lo) * _philox_uniform(i, bb, v, call, key_lo, key_hi))
    aspect = tl.exp(log_lo + (log_hi - log_lo) * _philox_uniform(i + _ATTEMPTS, bb, v, call, key_lo, key_hi))
    long_side = rint(tl.sqrt(area * aspect))
    short_side = rint(tl.sqrt(area / aspect))
    if ERASE:
        h = long_side
        w = short_side
        ok = (h < hf) & (w < wf)
    else:
        w = long_side
        h = short_side
        ok = (w > 0.0) & (h > 0.0) & (w <= wf) & (h <= hf)
    ok = ok & (t[None, :] < _ATTEMPTS)
    first = tl.min(tl.where(ok, t[None, :], _ATTEMPTS_P2), axis=1)
    pick = t[None, :] == first[:, None]
    return tl.sum(tl.where(pick, h, 0.0), axis=1), tl.sum(tl.where(pick, w, 0.0), axis=1), first < _ATTEMPTS


# Writes of one program: the base row and zero values first, then each instruction's columns, then
# the matrix. A barrier after each step orders them: every lane's element may be held by several
# threads, and a later write of the same element (a slot two instructions of a view write, in a
# chain the fused kernel refuses anyway) must win. Nothing is carried in (images x slots) registers.
@triton.jit(do_not_specialize=["B", "H", "W", "L", "n_values", "key_lo", "key_hi", "call"])
def _task_params_kernel(program_ptr, consts_ptr, base_ptr, values_ptr, table_ptr,
                        B, H, W, L, n_values, key_lo, key_hi, call,
                        BLOCK_B: tl.constexpr, VALUES_P2: tl.constexpr):
    v = tl.program_id(1)
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = b < B
    rows = (v * B + b).to(tl.int64)
    hf = H.to(tl.float64)
    wf = W.to(tl.float64)
    cols = tl.arange(0, _N_SLOTS)
    vcols = tl.arange(0, VALUES_P2)
    base = tl.load(base_ptr + v * _N_SLOTS + cols)
    tl.store(table_ptr + rows[:, None] * _N_SLOTS + cols[None, :],
             tl.zeros([BLOCK_B, _N_SLOTS], dtype=tl.float32) + base[None, :], mask=live[:, None])
    tl.store(values_ptr + rows[:, None] * n_values + vcols[None, :], tl.zeros([BLOCK_B, VALUES_P2], dtype=tl.float64),
             mask=live[:, None] & (vcols[None, :] < n_values))
    tl.debug_barrier()
    zero = tl.zeros([BLOCK_B], dtype=tl.float64)
    zero_i = tl.zeros([BLOCK_B], dtype=tl.int32)
    m0 = zero + 1.0
    m1 = zero
    m2 = zero
    m3 = zero
    m4 = zero + 1.0
    m5 = zero
    for j in range(L):
        ins = program_ptr + (v * L + j) * _PROGRAM_WIDTH
        code = tl.load(ins)
        d = tl.load(ins + 1)
        o = tl.load(ins + 2)
        slot_a = tl.load(ins + 3)
        slot_b = tl.load(ins + 4)
        cst = consts_ptr + (v * L + j) * _N_CONSTS
        lo = tl.load(cst)
        hi = tl.load(cst + 1)
        if code == _P_HFLIP:
            m0, m1, m2, m3, m4, m5 = _compose(m0, m1, m2, m3, m4, m5, -1.0, 0.0, wf - 1.0, 0.0, 1.0, 0.0)
        elif code == _P_VFLIP:
            m0, m1, m2, m3, m4, m5 = _compose(m0, m1, m2, m3, m4, m5, 1.0, 0.0, 0.0, 0.0, -1.0, hf - 1.0)
        elif code == _P_ROTATE:
            angle = lo + (hi - lo) * _philox_uniform(zero_i + d, b, v, call, key_lo, key_hi)
            _put(values_ptr, rows, n_values, o, angle, live)
            turned = angle - 360.0 * tl.floor(angle * (1.0 / 360.0))
            a0, a1, a2, a3, a4, a5 = _affine_matrix(-turned, zero, zero, zero + 1.0, zero, zero,
                                                    (wf - 1.0) * 0.5, (hf - 1.0) * 0.5)
            m0, m1, m2, m3, m4, m5 = _compose(m0, m1, m2, m3, m4, m5, a0, a1, a2, a3, a4, a5)
        elif code == _P_AFFINE:
            angle = lo + (hi - lo) * _philox_uniform(zero_i + d, b, v, call, key_lo, key_hi)
            dx = tl.load(cst + 2)
            dy = tl.load(cst + 3)
            tx = (-dx + (dx + dx) * _philox_uniform(zero_i + d + 1, b, v, call, key_lo, key_hi)) * wf
            ty = (-dy + (dy + dy) * _philox_uniform(zero_i + d + 2, b, v, call, key_lo, key_hi)) * hf
            s_lo = tl.load(cst + 4)
            s_hi = tl.load(cst + 5)
            scale = s_lo + (s_hi - s_lo) * _philox_uniform(zero_i + d + 3, b, v, call, key_lo, key_hi)
            sh_lo = tl.load(cst + 6)
            sh_hi = tl.load(cst + 7)
            shear = sh_lo + (sh_hi - sh_lo) * _philox_uniform(zero_i + d + 4, b, v, call, key_lo, key_hi)
            _put(values_ptr, rows, n_values, o, angle, live)
            _put(values_ptr, rows, n_values, o + 1, tx, live)
            _put(values_ptr, rows, n_values, o + 2, ty, live)
            _put(values_ptr, rows, n_values, o + 3, scale, live)
            _put(values_ptr, rows, n_values, o + 4, shear, live)
            a0, a1, a2, a3, a4, a5 = _affine_matrix(angle, tx, ty, scale, shear, zero,
                                                    (wf - 1.0) * 0.5, (hf - 1.0) * 0.5)
            m0, m1, m2, m3, m4, m5 = _compose(m0, m1, m2, m3, m4, m5, a0, a1, a2, a3, a4, a5)
        elif code == _P_RESIZED_CROP:
            h, w, found = _box_search(d, b, v, call, key_lo, key_hi, cst, hf, wf, False)
            top = tl.floor(_philox_uniform(zero_i + d + 20, b, v, call, key_lo, key_hi) * (hf - h + 1.0))
            left = tl.floor(_philox_uniform(zero_i + d + 21, b, v, call, key_lo, key_hi) * (wf - w + 1.0))
            # torchvision's fallback: the centre crop with the aspect ratio clamped into [r_lo, r_hi]
            r_lo = tl.load(cst + 4)
            r_hi = tl.load(cst + 5)
            ratio = wf / hf
            fw = tl.where(ratio < r_lo, wf, tl.where(ratio > r_hi, rint(hf * r_hi), wf))
            fh = tl.where(ratio < r_lo, rint(wf / r_lo), hf)
            h = tl.where(found, h, fh)
            w = tl.where(found, w, fw)
            top = tl.where(found, top, tl.floor((hf - fh) * 0.5))
            left = tl.where(found, left, tl.floor((wf - fw) * 0.5))
            _put(values_ptr, rows, n_values, o, top, live)
            _put(values_ptr, rows, n_values, o + 1, left, live)
            _put(values_ptr, rows, n_values, o + 2, h, live)
            _put(values_ptr, rows, n_values, o + 3, w, live)
            _put(table_ptr, rows, _N_SLOTS, _S_CX0, left, live)
            _put(table_ptr, rows, _N_SLOTS, _S_CX1, left + w - 1.0, live)
            _put(table_ptr, rows, _N_SLOTS, _S_CY0, top, live)
            _put(table_ptr, rows, _N_SLOTS, _S_CY1, top + h - 1.0, live)
            sx = w / wf
            sy = h / hf
            m0, m1, m2, m3, m4, m5 = _compose(m0, m1, m2, m3, m4, m5,
                                              sx, zero, left + 0.5 * sx - 0.5, zero, sy, top + 0.5 * sy - 0.5)
        elif code == _P_UNIFORM:
            x = lo + (hi - lo) * _philox_uniform(zero_i + d, b, v, call, key_lo, key_hi)
            _put(values_ptr, rows, n_values, o, x, live)
            _put(table_ptr, rows, _N_SLOTS, slot_a, x, live)
            _put(table_ptr, rows, _N_SLOTS, slot_b, x, live)
        elif code == _P_INTEGER:
            x = tl.floor(lo + (hi + 1.0 - lo) * _philox_uniform(zero_i + d, b, v, call, key_lo, key_hi))
            x = tl.minimum(x, zero + hi)
            _put(values_ptr, rows, n_values, o, x, live)
            _put(table_ptr, rows, _N_SLOTS, slot_a, x, live)
        elif code == _P_ERASE:
            h, w, found = _box_search(d, b, v, call, key_lo, key_hi, cst, hf, wf, True)
            top = tl.floor(_philox_uniform(zero_i + d + 20, b, v, call, key_lo, key_hi) * (hf - h + 1.0))
            left = tl.floor(_philox_uniform(zero_i + d + 21, b, v, call, key_lo, key_hi) * (wf - w + 1.0))
            top = tl.where(found, top, 0.0)
            left = tl.where(found, left, 0.0)
            h = tl.where(found, h, 0.0)
            w = tl.where(found, w, 0.0)
            _put(values_ptr, rows, n_values, o, top, live)
            _put(values_ptr, rows, n_values, o + 1, left, live)
            _put(values_ptr, rows, n_values, o + 2, h, live)
            _put(values_ptr, rows, n_values, o + 3, w, live)
            _put(table_ptr, rows, _N_SLOTS, _S_ETOP, top, live)
            _put(table_ptr, rows, _N_SLOTS, _S_ELEFT, left, live)
            _put(table_ptr, rows, _N_SLOTS, _S_EH, h, live)
            _put(table_ptr, rows, _N_SLOTS, _S_EW, w, live)
        tl.debug_barrier()
    _put(table_ptr, rows, _N_SLOTS, _S_M0, m0, live)
    _put(table_ptr, rows, _N_SLOTS, _S_M1, m1, live)
    _put(table_ptr, rows, _N_SLOTS, _S_M2, m2, live)
    _put(table_ptr, rows, _N_SLOTS, _S_M3, m3, live)
    _put(table_ptr, rows, _N_SLOTS, _S_M4, m4, live)
    _put(table_ptr, rows, _N_SLOTS, _S_M5, m5, live)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def _check_tables(program: torch.Tensor, consts: torch.Tensor, base: torch.Tensor) -> tuple[int, int]:
    """(K, L) of a program; TypeError / ValueError for tables of the wrong type, dtype or shape."""
    for name, t in (("program", program), ("consts", consts), ("base", base)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if program.dtype != torch.int32 or program.dim() != 3 or program.shape[2] != PROGRAM_WIDTH:
        raise ValueError(f"program must be (K, L, {PROGRAM_WIDTH}) int32, got {tuple(program.shape)} {program.dtype}")
    k, n = int(program.shape[0]), int(program.shape[1])
    if consts.dtype != torch.float64 or tuple(consts.shape) != (k, n, N_CONSTS):
        raise ValueError(f"consts must be ({k}, {n}, {N_CONSTS}) float64, got {tuple(consts.shape)} {consts.dtype}")
    if base.dtype != torch.float32 or tuple(base.shape) != (k, fv.N_SLOTS):
        raise ValueError(f"base must be ({k}, {fv.N_SLOTS}) float32, got {tuple(base.shape)} {base.dtype}")
    return k, n


def _check_call(batch_size: int, height: int, width: int, key: int, call: int,
                n_values: int) -> tuple[int, int, int, int, int, int]:
    """The call's scalars, checked, in this order; TypeError for a non-int, ValueError for a negative size."""
    scalars = {"batch_size": batch_size, "height": height, "width": width, "key": key, "call": call,
               "n_values": n_values}
    for name, value in scalars.items():
        if type(value) is not int:  # bool (an int subclass) is refused too
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if min(batch_size, height, width, n_values) < 0:
        name = next(n for n in ("batch_size", "height", "width", "n_values") if scalars[n] < 0)
        raise ValueError(f"{name} must be >= 0, got {scalars[name]}")
    return batch_size, height, width, key, call, n_values


def new_outputs(k: int, batch_size: int, n_values: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (values (k, B, n_values) float64, table (k, B, N_SLOTS) float32) in ONE
    allocation: the table is a float32 view of the first k * B * N_SLOTS / 2 float64 elements."""
    rows = k * batch_size
    storage = torch.empty(rows * (fv.N_SLOTS // 2 + n_values), dtype=torch.float64, device=device)
    table = storage[: rows * fv.N_SLOTS // 2].view(torch.float32).view(k, batch_size, fv.N_SLOTS)
    values = storage[rows * fv.N_SLOTS // 2 :].view(k, batch_size, n_values)
    return values, table


def _next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 without its jit-function call overhead (this is per call)."""
    return 1 << max(n - 1, 0).bit_length()


def _split_key(key: int, call: int) -> tuple[int, int, int]:
    key %= MAX_KEY
    return key & 0x7FFFFFFF, key >> 31, call & 0x7FFFFFFF


def task_params(
    program: torch.Tensor,
    consts: torch.Tensor,
    base: torch.Tensor,
    *,
    batch_size: int,
    height: int,
    width: int,
    key: int,
    call: int,
    n_values: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the parameter program of K views on B images: one kernel launch, one allocation.

    Args:
        program: (K, L, PROGRAM_WIDTH) int32, consts: (K, L, N_CONSTS) float64, base: (K, N_SLOTS)
            float32, all on the device the outputs go to (CUDA, or the CPU under TRITON_INTERPRET=1).
            Their content is never read on the host: codes, offsets and slots out of range make an
            instruction a no-op or a masked-out store, never an out-of-bounds access.
        batch_size, height, width: B and the images' H x W (warps, boxes and translations use them).
        key, call: the random stream (key modulo 2^62, call modulo 2^31; see the module docstring).
        n_values: columns of ``values`` (at least every value offset + its instruction's VALUES).

    Returns:
        (values (K, B, n_values) float64, table (K, B, N_SLOTS) float32), views of one new buffer.
    """
    k, n = _check_tables(program, consts, base)
    _check_call(batch_size, height, width, key, call, n_values)
    device = program.device
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"program must be on a CUDA device (CPU tensors run only under TRITON_INTERPRET=1), "
                         f"got device {device}")
    if consts.device != device or base.device != device:
        raise ValueError(f"program, consts and base must share a device, got {device}, {consts.device}, {base.device}")
    values, table, launch = _plan(program, consts, base, batch_size, height, width, key, call, n_values)
    if k and batch_size:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            launch()
    return values, table


def _plan(program: torch.Tensor, consts: torch.Tensor, base: torch.Tensor, batch_size: int, height: int,
          width: int, key: int, call: int, n_values: int) -> tuple[torch.Tensor, torch.Tensor, Launch]:
    """The outputs and the launch of a checked call. Specialisations: BLOCK_B 32 on a GPU (the
    interpreter: one program per view), VALUES_P2 = max(16, next power of two >= n_values)."""
    k, n = (int(s) for s in program.shape[:2])
    values, table = new_outputs(k, batch_size, n_values, program.device)
    key_lo, key_hi, call = _split_key(key, call)
    block = _BLOCK_B
    if program.device.type == "cpu":  # the interpreter (task_params refuses the CPU otherwise)
        block = max(16, min(_INTERPRETER_MAX_BLOCK, _next_power_of_2(batch_size)))
    args = (program, consts, base, values, table, batch_size, height, width, n, n_values, key_lo, key_hi, call)
    constexprs = dict(BLOCK_B=block, VALUES_P2=max(16, _next_power_of_2(n_values)))
    grid = (-(-batch_size // block), k)
    return values, table, Launch(_task_params_kernel, grid, args, constexprs, _NUM_WARPS, _MAX_REGISTERS)


# --------------------------------------------------------------------------------------------------
# The plain-torch twin (the meaning; the CPU path)
# --------------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m for int64 a in [0, 2^32) and m < 2^32, exactly (no
    product exceeds 2^49, so nothing relies on int64 overflow)."""
    x = a * (m >> 16)
    y = a * (m & 0xFFFF)
    s = ((x & 0xFFFF) << 16) + y
    return (x >> 16) + (s >> 32), s & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counter words (4 int64 tensors of one shape, values in [0, 2^32)) under key
    words (k0, k1): the four output words as int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def uniforms(k: int, batch_size: int, n_draws: int, key: int, call: int, device: torch.device) -> torch.Tensor:
    """Every draw of a call, (k, B, n_draws) float64 in [0, 1): draw i of image b of view v."""
    key_lo, key_hi, call = _split_key(key, call)
    n_counters = -(-n_draws // 4)
    shape = (k, batch_size, n_counters)
    i = torch.arange(n_counters, dtype=torch.int64, device=device).expand(shape)
    b = torch.arange(batch_size, dtype=torch.int64, device=device)[None, :, None].expand(shape)
    v = torch.arange(k, dtype=torch.int64, device=device)[:, None, None].expand(shape)
    words = philox4x32((i, b, v, torch.full(shape, call, dtype=torch.int64, device=device)), (key_lo, key_hi))
    draws = torch.stack(words, dim=-1).reshape(k, batch_size, 4 * n_counters)[..., :n_draws]
    return draws.to(torch.float64) * _TWO_M32


def _sincos_degrees_torch(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's _sincos_degrees."""
    q = torch.floor(a * (1.0 / 90.0) + 0.5)
    t = (a - q * 90.0) * _DEG2RAD
    t2 = t * t
    s = torch.full_like(t, _SIN_TAYLOR[-1])
    for coeff in reversed(_SIN_TAYLOR[:-1]):
        s = coeff + t2 * s
    s = t * s
    c = torch.full_like(t, _COS_TAYLOR[-1])
    for coeff in reversed(_COS_TAYLOR[:-1]):
        c = coeff + t2 * c
    quarter = q - 4.0 * torch.floor(q * 0.25)
    sin = torch.where(quarter == 0, s, torch.where(quarter == 1, c, torch.where(quarter == 2, -s, -c)))
    cos = torch.where(quarter == 0, c, torch.where(quarter == 1, -s, torch.where(quarter == 2, -c, s)))
    return sin, cos


def _affine_matrix_torch(angle, tx, ty, scale, shear_x, shear_y, cx: float, cy: float) -> list[torch.Tensor]:
    """The kernel's _affine_matrix on tensors of one shape; the four angles' sines and cosines in one pass."""
    sin, cos = _sincos_degrees_torch(torch.stack((shear_x, shear_y, angle, angle - shear_y)))
    (sin_sx, _, sin_r, sin_rs), (cos_sx, cos_sy, cos_r, cos_rs) = sin, cos
    tan_sx = sin_sx / cos_sx
    a = cos_rs / cos_sy
    b = -(a * tan_sx + sin_r)
    c = sin_rs / cos_sy
    d = cos_r - c * tan_sx
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = -m0 * tx - m1 * ty + cx - m0 * cx - m1 * cy
    m5 = -m3 * tx - m4 * ty + cy - m3 * cx - m4 * cy
    return [m0, m1, m2, m3, m4, m5]


def _compose_torch(m: torch.Tensor, a: list) -> torch.Tensor:
    """M o A on (n, B, 6) matrices M and A given as six (n, B) (or broadcastable) entries."""
    m0, m1, m2, m3, m4, m5 = m.unbind(-1)
    a0, a1, a2, a3, a4, a5 = a
    return torch.stack((m0 * a0 + m1 * a3, m0 * a1 + m1 * a4, m0 * a2 + m1 * a5 + m2,
                        m3 * a0 + m4 * a3, m3 * a1 + m4 * a4, m3 * a2 + m4 * a5 + m5), dim=-1)


def _box_search_torch(u: torch.Tensor, c: torch.Tensor, height: int, width: int, erase: bool):
    """(h, w, found) of the box searches of n views: u (n, B, 20) draws, c (n, N_CONSTS)."""
    lo, hi, log_lo, log_hi = (c[:, j, None, None] for j in range(4))
    area = height * width * (lo + (hi - lo) * u[..., :BOX_ATTEMPTS])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., BOX_ATTEMPTS : 2 * BOX_ATTEMPTS])
    long_side = torch.round(torch.sqrt(area * aspect))
    short_side = torch.round(torch.sqrt(area / aspect))
    if erase:
        h, w = long_side, short_side
        ok = (h < height) & (w < width)
    else:
        h, w = short_side, long_side
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=-1, keepdim=True)
    return h.gather(-1, first).squeeze(-1), w.gather(-1, first).squeeze(-1), ok.any(dim=-1)


class _TwinState:
    """The twin's working tensors: values (K, B, n_values), slots (K, B, N_SLOTS), M (K, B, 6)."""

    def __init__(self, base: torch.Tensor, batch_size: int, n_values: int, device: torch.device):
        k = base.shape[0]
        self.values = torch.zeros(k, batch_size, n_values, dtype=torch.float64, device=device)
        self.slots = base.to(device=device, dtype=torch.float64)[:, None, :].repeat(1, batch_size, 1)
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64, device=device)
        self.matrix = identity.repeat(k, batch_size, 1)

    def put_values(self, views: torch.Tensor, offsets: list[int], x: torch.Tensor) -> None:
        """values[views[n], :, offsets[n] + c] = x[n, :, c]."""
        cols = torch.tensor(offsets, device=x.device)[:, None] + torch.arange(x.shape[-1], device=x.device)
        self.values[views[:, None], :, cols] = x.permute(0, 2, 1)

    def put_slots(self, views: torch.Tensor, slots: list[int], x: torch.Tensor) -> None:
        """slots[views[n], :, slots[n]] = x[n] for the views whose slot is >= 0."""
        keep = [n for n, s in enumerate(slots) if s >= 0]
        if keep:
            idx = torch.tensor(keep, device=x.device)
            self.slots[views[idx], :, torch.tensor([slots[n] for n in keep], device=x.device)] = x[idx]

    def warp(self, views: torch.Tensor, a: list) -> None:
        self.matrix[views] = _compose_torch(self.matrix[views], a)


def _run_group(state: _TwinState, code: int, views: list[int], rows: list[list[int]], consts: torch.Tensor,
               u: torch.Tensor, height: int, width: int) -> None:
    """Instruction `code` of the given views (rows: their program rows) on all images."""
    dev = u.device
    idx = torch.tensor(views, device=dev)
    c = consts[idx]
    n_draws = DRAWS[code]
    draws = None
    if n_draws:
        cols = torch.tensor([r[1] for r in rows], device=dev)[:, None] + torch.arange(n_draws, device=dev)
        draws = u[idx[:, None], :, cols].permute(0, 2, 1)  # (n, B, n_draws)
    offsets = [r[2] for r in rows]
    cx, cy = (width - 1) * 0.5, (height - 1) * 0.5
    lo, hi = c[:, 0, None], c[:, 1, None]
    if code == PARAM_HFLIP:
        state.warp(idx, [-1.0, 0.0, width - 1.0, 0.0, 1.0, 0.0])
    elif code == PARAM_VFLIP:
        state.warp(idx, [1.0, 0.0, 0.0, 0.0, -1.0, height - 1.0])
    elif code == PARAM_ROTATE:
        angle = lo + (hi - lo) * draws[..., 0]
        state.put_values(idx, offsets, angle[..., None])
        turned = angle - 360.0 * torch.floor(angle * (1.0 / 360.0))
        zero = torch.zeros_like(angle)
        state.warp(idx, _affine_matrix_torch(-turned, zero, zero, zero + 1.0, zero, zero, cx, cy))
    elif code == PARAM_AFFINE:
        angle = lo + (hi - lo) * draws[..., 0]
        dx, dy = c[:, 2, None], c[:, 3, None]
        tx = (-dx + (dx + dx) * draws[..., 1]) * width
        ty = (-dy + (dy + dy) * draws[..., 2]) * height
        scale = c[:, 4, None] + (c[:, 5, None] - c[:, 4, None]) * draws[..., 3]
        shear = c[:, 6, None] + (c[:, 7, None] - c[:, 6, None]) * draws[..., 4]
        zero = torch.zeros_like(angle)
        state.put_values(idx, offsets, torch.stack((angle, tx, ty, scale, shear, zero), dim=-1))
        state.warp(idx, _affine_matrix_torch(angle, tx, ty, scale, shear, zero, cx, cy))
    elif code in (PARAM_RESIZED_CROP, PARAM_ERASE):
        erase = code == PARAM_ERASE
        h, w, found = _box_search_torch(draws, c, height, width, erase)
        top = torch.floor(draws[..., 2 * BOX_ATTEMPTS] * (height - h + 1.0))
        left = torch.floor(draws[..., 2 * BOX_ATTEMPTS + 1] * (width - w + 1.0))
        if erase:
            box = torch.stack((top, left, h, w), dim=-1) * found[..., None]
            state.put_values(idx, offsets, box)
            for j, slot in enumerate((fv.SLOT_ERASE_TOP, fv.SLOT_ERASE_LEFT, fv.SLOT_ERASE_H, fv.SLOT_ERASE_W)):
                state.put_slots(idx, [slot] * len(views), box[..., j])
            return
        r_lo, r_hi = c[:, 4, None], c[:, 5, None]
        ratio = width / height
        fw = torch.where(ratio > r_hi, torch.round(height * r_hi), float(width))
        fw = torch.where(ratio < r_lo, float(width), fw)
        # a tensor over a tensor: `width / r_lo` would run as width * r_lo.reciprocal(), one rounding off
        # torchvision's (and the kernel's) true division
        fh = torch.where(ratio < r_lo, torch.round(torch.full_like(r_lo, float(width)) / r_lo), float(height))
        h, w = torch.where(found, h, fh), torch.where(found, w, fw)
        top = torch.where(found, top, torch.floor((height - fh) * 0.5))
        left = torch.where(found, left, torch.floor((width - fw) * 0.5))
        state.put_values(idx, offsets, torch.stack((top, left, h, w), dim=-1))
        for slot, x in ((fv.SLOT_CLAMP_X0, left), (fv.SLOT_CLAMP_X1, left + w - 1.0), (fv.SLOT_CLAMP_Y0, top),
                        (fv.SLOT_CLAMP_Y1, top + h - 1.0)):
            state.put_slots(idx, [slot] * len(views), x)
        sx, sy = w / width, h / height
        zero = torch.zeros_like(sx)
        state.warp(idx, [sx, zero, left + 0.5 * sx - 0.5, zero, sy, top + 0.5 * sy - 0.5])
    elif code in (PARAM_UNIFORM, PARAM_INTEGER):
        if code == PARAM_UNIFORM:
            x = lo + (hi - lo) * draws[..., 0]
        else:
            x = torch.minimum(torch.floor(lo + (hi + 1.0 - lo) * draws[..., 0]), hi.expand_as(draws[..., 0]))
        state.put_values(idx, offsets, x[..., None])
        state.put_slots(idx, [r[3] for r in rows], x)
        if code == PARAM_UNIFORM:
            state.put_slots(idx, [r[4] for r in rows], x)


def task_params_torch(
    program: torch.Tensor,
    consts: torch.Tensor,
    base: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    **scalars: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch twin of :func:`task_params`: the same arguments (the keyword ``scalars``
    batch_size, height, width, key, call and n_values, checked alike) and outputs, computed with
    torch ops on ``device`` (default: the CPU). The tables are read on the host (keep them on the
    CPU), the instructions run grouped by (position, code) over all views that have them at once."""
    k, n = _check_tables(program, consts, base)
    batch_size, height, width, key, call, n_values = _check_call(**scalars)
    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = program.tolist()
    n_draws = max([r[1] + DRAWS[r[0]] for view in rows for r in view if 0 <= r[0] < len(DRAWS)], default=0)
    state = _TwinState(base, batch_size, n_values, device)
    if k and batch_size:
        u = uniforms(k, batch_size, n_draws, key, call, device)
        consts = consts.to(device)
        for j in range(n):
            groups: dict[int, list[int]] = {}
            for v in range(k):
                groups.setdefault(rows[v][j][0], []).append(v)
            for code, views in groups.items():
                if code != PARAM_NONE and code in range(len(DRAWS)):
                    _run_group(state, code, views, [rows[v][j] for v in views], consts[:, j], u, height, width)
    state.slots[..., fv.SLOT_M0 : fv.SLOT_M5 + 1] = state.matrix
    return state.values, state.slots.to(torch.float32)
