// The per-call parameter program of kernels/task_params.py on the CPU. That file's docstring is the
// ABI (instruction codes, draw layout, Philox stream, outputs); its plain-torch twin
// task_params_torch defines the meaning.
//
// Structure (why it is what it is):
// * Work items are (view, image) pairs in the outputs' row order. An item runs its view's
//   instructions left to right on a float64 copy of the view's base row and writes its values row
//   and its table row once. Items share nothing, so the bits do not depend on the thread count.
// * Every formula is the twin's, operation for operation, in float64 and without contraction into
//   FMAs. The one function computed differently is exp (torch's vectorised exp and the C library's
//   may differ by an ulp); it feeds only the box searches' sides, which are rounded to integers.
// * A box search stops at its first accepted attempt (attempts are independent draws); with none
//   accepted it keeps attempt 0's sides, as the twin's argmax does.
// * Draws come from a small direct-mapped cache of Philox blocks (four draws each): a box search
//   alternates between its area and aspect draws, BOX_ATTEMPTS apart.
#include "task_params_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>

#include "fused_views_abi.h"

// The twin rounds every operation: no contraction of a * b + c into an FMA.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "inline_math.h"  // after the pragmas: its helpers inline into this file's functions

namespace mtdl {
namespace {

#define MTDL_TASK_PARAMS_CONSTANT(name, value) constexpr int name = value;
MTDL_TASK_PARAMS_ABI(MTDL_TASK_PARAMS_CONSTANT)
#undef MTDL_TASK_PARAMS_CONSTANT

using fv::N_SLOTS;

constexpr int kNumCodes = PARAM_ERASE + 1;
constexpr int kBoxDraws = 2 * BOX_ATTEMPTS + 2;  // areas, aspects, top, left
// Random numbers each instruction code consumes and values columns it writes (DRAWS, VALUES).
constexpr int kDraws[kNumCodes] = {0, 0, 0, 1, 5, kBoxDraws, 1, 1, kBoxDraws};
constexpr int kValues[kNumCodes] = {0, 0, 0, 1, 6, 4, 1, 1, 4};

constexpr int64_t kKeyModulus = int64_t{1} << 62;
constexpr int64_t kCallModulus = int64_t{1} << 31;
constexpr int64_t kSideLimit = int64_t{1} << 31;
constexpr int64_t kGrain = 64;  // (view, image) items per parallel chunk: each costs well under a microsecond

constexpr double kTwoM32 = 1.0 / 4294967296.0;
constexpr double kDegToRad = 3.141592653589793 / 180.0;  // math.pi / 180.0

// n! as a double: exact for n <= 18 (below 2^53), so sign / n! is the twin's correctly rounded
// (-1)^n / math.factorial(...).
constexpr double factorial(int n) {
  double f = 1.0;
  for (int i = 2; i <= n; ++i) f *= i;
  return f;
}

// Taylor coefficients of sin (t^1 .. t^17) and cos (t^0 .. t^18) on [-pi/4, pi/4].
constexpr int kSinTerms = 9, kCosTerms = 10;
constexpr std::array<double, kSinTerms> sin_taylor() {
  std::array<double, kSinTerms> c{};
  for (int n = 0; n < kSinTerms; ++n) c[n] = (n % 2 ? -1.0 : 1.0) / factorial(2 * n + 1);
  return c;
}
constexpr std::array<double, kCosTerms> cos_taylor() {
  std::array<double, kCosTerms> c{};
  for (int n = 0; n < kCosTerms; ++n) c[n] = (n % 2 ? -1.0 : 1.0) / factorial(2 * n);
  return c;
}
constexpr std::array<double, kSinTerms> kSinTaylor = sin_taylor();
constexpr std::array<double, kCosTerms> kCosTaylor = cos_taylor();

using Affine = std::array<double, 6>;  // a 2 x 3 map, row major (the SLOT_M0..M5 order)
constexpr Affine kIdentity = {1.0, 0.0, 0.0, 0.0, 1.0, 0.0};

// ---- the call's read-only description -------------------------------------------------------------

struct Call {
  const int32_t* program = nullptr;  // (K, L, PROGRAM_WIDTH)
  const double* consts = nullptr;    // (K, L, N_CONSTS)
  const float* base = nullptr;       // (K, N_SLOTS)
  double* values = nullptr;          // (K, B, n_values)
  float* table = nullptr;            // (K, B, N_SLOTS)
  int64_t K = 0, L = 0, B = 0, n_values = 0;
  double hf = 0.0, wf = 0.0;  // H and W
  double area = 0.0;          // H * W, rounded once (the twin's Python int product, then a float)
  uint32_t key_lo = 0, key_hi = 0, call = 0;
};

// ---- numerics: the twin's formulas -------------------------------------------------------------------

// Draw i of one (view, image): word i mod 4 of Philox4x32-10 at counter (i div 4, b, v, call) under
// the call's key, times 2^-32 (float64 in [0, 1)).
class Draws {
 public:
  Draws(const Call& c, int64_t v, int64_t b)
      : b_(static_cast<uint32_t>(b)), v_(static_cast<uint32_t>(v)), call_(c.call), k0_(c.key_lo), k1_(c.key_hi) {
    tags_.fill(-1);
  }

  double operator()(int64_t i) {
    const int64_t block = i >> 2;
    const int64_t slot = block & (kSlots - 1);
    if (tags_[slot] != block) {
      uint32_t w0 = static_cast<uint32_t>(block), w1 = b_, w2 = v_, w3 = call_;
      philox4x32_10(&w0, &w1, &w2, &w3, k0_, k1_);
      words_[slot] = {w0, w1, w2, w3};
      tags_[slot] = block;
    }
    return static_cast<double>(words_[slot][i & 3]) * kTwoM32;
  }

 private:
  static constexpr int64_t kSlots = 8;  // a box search touches at most 7 blocks
  uint32_t b_, v_, call_, k0_, k1_;
  std::array<int64_t, kSlots> tags_;
  std::array<std::array<uint32_t, 4>, kSlots> words_;
};

// (sin, cos) of a degrees without a library call: q = the nearest multiple of 90 degrees, t the rest
// in radians (|t| <= pi/4), Taylor polynomials, then rotation by q quarter turns (so multiples of 90
// degrees are exact). The quarter is the twin's float formula, whose non-{0, 1, 2} values (huge or
// NaN angles) all take the last branch.
void sincos_degrees(double a, double* sn, double* cs) {
  const double q = std::floor(a * (1.0 / 90.0) + 0.5);
  const double t = (a - q * 90.0) * kDegToRad;
  const double t2 = t * t;
  double s = kSinTaylor[kSinTerms - 1];
  for (int n = kSinTerms - 2; n >= 0; --n) s = kSinTaylor[n] + t2 * s;
  s = t * s;
  double c = kCosTaylor[kCosTerms - 1];
  for (int n = kCosTerms - 2; n >= 0; --n) c = kCosTaylor[n] + t2 * c;
  const double quarter = q - 4.0 * std::floor(q * 0.25);
  const int k = quarter == 0.0 ? 0 : quarter == 1.0 ? 1 : quarter == 2.0 ? 2 : 3;
  rotate_by_quarter_turns(k, s, c, sn, cs);
}

// M o A: the source of output p is M(A(p)).
Affine compose(const Affine& m, const Affine& a) {
  return {m[0] * a[0] + m[1] * a[3], m[0] * a[1] + m[1] * a[4], m[0] * a[2] + m[1] * a[5] + m[2],
          m[3] * a[0] + m[4] * a[3], m[3] * a[1] + m[4] * a[4], m[3] * a[2] + m[4] * a[5] + m[5]};
}

// torchvision's inverse affine matrix (angle, shears in degrees) about pixel (cx, cy).
Affine affine_matrix(double angle, double tx, double ty, double scale, double shear_x, double shear_y, double cx,
                     double cy) {
  double sin_sx, cos_sx, sin_sy, cos_sy, sin_r, cos_r, sin_rs, cos_rs;
  sincos_degrees(shear_x, &sin_sx, &cos_sx);
  sincos_degrees(shear_y, &sin_sy, &cos_sy);
  sincos_degrees(angle, &sin_r, &cos_r);
  sincos_degrees(angle - shear_y, &sin_rs, &cos_rs);
  const double tan_sx = sin_sx / cos_sx;
  const double a = cos_rs / cos_sy;
  const double b = -(a * tan_sx + sin_r);
  const double c = sin_rs / cos_sy;
  const double d = cos_r - c * tan_sx;
  const double m0 = d / scale, m1 = -b / scale, m3 = -c / scale, m4 = a / scale;
  const double m2 = -m0 * tx - m1 * ty + cx - m0 * cx - m1 * cy;
  const double m5 = -m3 * tx - m4 * ty + cy - m3 * cx - m4 * cy;
  return {m0, m1, m2, m3, m4, m5};
}

// torch.minimum: NaN when either is.
double minimum(double a, double b) { return std::isnan(a) ? a : std::isnan(b) ? b : std::min(a, b); }

// ---- one (view, image) ----------------------------------------------------------------------------

// The state of one (view, image) while its instructions run.
struct Item {
  Item(const Call& call, int64_t v, int64_t b) : c(call), draw(call, v, b) {}

  const Call& c;
  Draws draw;
  double* values = nullptr;  // the item's row of the output values
  double slots[N_SLOTS];     // its table row, float64 until the end
  Affine warp = kIdentity;   // the composition of its warps

  double cx() const { return (c.wf - 1.0) * 0.5; }
  double cy() const { return (c.hf - 1.0) * 0.5; }
  double uniform(int64_t i, double lo, double hi) { return lo + (hi - lo) * draw(i); }
  void put_values(int64_t o, std::initializer_list<double> xs) { std::copy(xs.begin(), xs.end(), values + o); }
  void put_slot(int32_t slot, double x) {  // negative: none (the checks refused slots >= N_SLOTS)
    if (slot >= 0) slots[slot] = x;
  }
};

struct Box {
  double h, w;
  bool found;
};

// (h, w, found) of a RandomResizedCrop (or, erase, RandomErasing) box search: the first accepted of
// BOX_ATTEMPTS attempts, attempt 0's sides when none is.
Box box_search(Item& it, int64_t d, const double* k, bool erase) {
  Box first{0.0, 0.0, false};
  for (int t = 0; t < BOX_ATTEMPTS; ++t) {
    const double area = it.c.area * it.uniform(d + t, k[0], k[1]);
    const double aspect = std::exp(it.uniform(d + BOX_ATTEMPTS + t, k[2], k[3]));
    const double long_side = std::nearbyint(std::sqrt(area * aspect));
    const double short_side = std::nearbyint(std::sqrt(area / aspect));
    const double h = erase ? long_side : short_side, w = erase ? short_side : long_side;
    const bool ok = erase ? (h < it.c.hf && w < it.c.wf) : (w > 0.0 && h > 0.0 && w <= it.c.wf && h <= it.c.hf);
    if (ok) return {h, w, true};
    if (t == 0) first = {h, w, false};
  }
  return first;
}

void rotate(Item& it, int64_t d, int64_t o, const double* k) {
  const double angle = it.uniform(d, k[0], k[1]);
  it.put_values(o, {angle});
  const double turned = angle - 360.0 * std::floor(angle * (1.0 / 360.0));
  it.warp = compose(it.warp, affine_matrix(-turned, 0.0, 0.0, 1.0, 0.0, 0.0, it.cx(), it.cy()));
}

void affine(Item& it, int64_t d, int64_t o, const double* k) {
  const double angle = it.uniform(d, k[0], k[1]);
  const double tx = (-k[2] + (k[2] + k[2]) * it.draw(d + 1)) * it.c.wf;
  const double ty = (-k[3] + (k[3] + k[3]) * it.draw(d + 2)) * it.c.hf;
  const double scale = it.uniform(d + 3, k[4], k[5]);
  const double shear = it.uniform(d + 4, k[6], k[7]);
  it.put_values(o, {angle, tx, ty, scale, shear, 0.0});
  it.warp = compose(it.warp, affine_matrix(angle, tx, ty, scale, shear, 0.0, it.cx(), it.cy()));
}

void resized_crop(Item& it, int64_t d, int64_t o, const double* k) {
  const double hf = it.c.hf, wf = it.c.wf;
  const Box box = box_search(it, d, k, /*erase=*/false);
  double top, left, h, w;
  if (box.found) {
    h = box.h;
    w = box.w;
    top = std::floor(it.draw(d + 2 * BOX_ATTEMPTS) * (hf - h + 1.0));
    left = std::floor(it.draw(d + 2 * BOX_ATTEMPTS + 1) * (wf - w + 1.0));
  } else {  // torchvision's fallback: the centre crop with the aspect ratio clamped into [k4, k5]
    const double ratio = wf / hf;
    w = ratio < k[4] ? wf : ratio > k[5] ? std::nearbyint(hf * k[5]) : wf;
    h = ratio < k[4] ? std::nearbyint(wf / k[4]) : hf;
    top = std::floor((hf - h) * 0.5);
    left = std::floor((wf - w) * 0.5);
  }
  it.put_values(o, {top, left, h, w});
  it.slots[fv::SLOT_CLAMP_X0] = left;
  it.slots[fv::SLOT_CLAMP_X1] = left + w - 1.0;
  it.slots[fv::SLOT_CLAMP_Y0] = top;
  it.slots[fv::SLOT_CLAMP_Y1] = top + h - 1.0;
  const double sx = w / wf, sy = h / hf;
  it.warp = compose(it.warp, {sx, 0.0, left + 0.5 * sx - 0.5, 0.0, sy, top + 0.5 * sy - 0.5});
}

void erase_box(Item& it, int64_t d, int64_t o, const double* k) {
  const Box box = box_search(it, d, k, /*erase=*/true);
  const double top = std::floor(it.draw(d + 2 * BOX_ATTEMPTS) * (it.c.hf - box.h + 1.0));
  const double left = std::floor(it.draw(d + 2 * BOX_ATTEMPTS + 1) * (it.c.wf - box.w + 1.0));
  // The twin multiplies by found: no box is all zeros (NaN only where attempt 0's sides are not finite).
  const double found = box.found ? 1.0 : 0.0;
  const double xs[4] = {top * found, left * found, box.h * found, box.w * found};
  it.put_values(o, {xs[0], xs[1], xs[2], xs[3]});
  it.slots[fv::SLOT_ERASE_TOP] = xs[0];
  it.slots[fv::SLOT_ERASE_LEFT] = xs[1];
  it.slots[fv::SLOT_ERASE_H] = xs[2];
  it.slots[fv::SLOT_ERASE_W] = xs[3];
}

void run_instruction(Item& it, const int32_t* ins, const double* k) {
  const int64_t d = ins[1], o = ins[2];
  switch (ins[0]) {
    case PARAM_HFLIP: it.warp = compose(it.warp, {-1.0, 0.0, it.c.wf - 1.0, 0.0, 1.0, 0.0}); break;
    case PARAM_VFLIP: it.warp = compose(it.warp, {1.0, 0.0, 0.0, 0.0, -1.0, it.c.hf - 1.0}); break;
    case PARAM_ROTATE: rotate(it, d, o, k); break;
    case PARAM_AFFINE: affine(it, d, o, k); break;
    case PARAM_RESIZED_CROP: resized_crop(it, d, o, k); break;
    case PARAM_ERASE: erase_box(it, d, o, k); break;
    case PARAM_UNIFORM: {
      const double x = it.uniform(d, k[0], k[1]);
      it.put_values(o, {x});
      it.put_slot(ins[3], x);
      it.put_slot(ins[4], x);
      break;
    }
    case PARAM_INTEGER: {
      const double x = minimum(std::floor(k[0] + (k[1] + 1.0 - k[0]) * it.draw(d)), k[1]);
      it.put_values(o, {x});
      it.put_slot(ins[3], x);
      break;
    }
    default: break;  // PARAM_NONE pads
  }
}

void run_item(const Call& c, int64_t v, int64_t b) {
  Item it(c, v, b);
  const int64_t row = v * c.B + b;
  it.values = c.values + row * c.n_values;
  std::fill(it.values, it.values + c.n_values, 0.0);
  const float* base = c.base + v * N_SLOTS;
  std::copy(base, base + N_SLOTS, it.slots);
  for (int64_t j = 0; j < c.L; ++j) {
    run_instruction(it, c.program + (v * c.L + j) * PROGRAM_WIDTH, c.consts + (v * c.L + j) * N_CONSTS);
  }
  std::copy(it.warp.begin(), it.warp.end(), it.slots + fv::SLOT_M0);
  float* out = c.table + row * N_SLOTS;
  for (int s = 0; s < N_SLOTS; ++s) out[s] = static_cast<float>(it.slots[s]);
}

// ---- argument checks ---------------------------------------------------------------------------------

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                 const char* shape_text) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == shape, name, " must be ", shape_text, " = ", shape, " ",
                    dtype, ", got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// Every instruction's code, and the offsets and slots it uses, in range.
void check_program(const int32_t* program, int64_t K, int64_t L, int64_t n_values) {
  for (int64_t v = 0; v < K; ++v) {
    for (int64_t j = 0; j < L; ++j) {
      const int32_t* ins = program + (v * L + j) * PROGRAM_WIDTH;
      const int32_t code = ins[0];
      TORCH_CHECK_VALUE(code >= 0 && code < kNumCodes, "program[", v, ", ", j, ", 0] = ", code,
                        " is not a PARAM_* code (0..", kNumCodes - 1, ")");
      const int64_t draws = kDraws[code], width = kValues[code];
      TORCH_CHECK_VALUE(draws == 0 || (ins[1] >= 0 && ins[1] <= std::numeric_limits<int32_t>::max() - draws),
                        "program[", v, ", ", j, ", 1] = ", ins[1], ": the draw offset of code ", code,
                        " must be in [0, 2^31 - ", draws, "]");
      TORCH_CHECK_VALUE(width == 0 || (ins[2] >= 0 && ins[2] + width <= n_values), "program[", v, ", ", j,
                        ", 2] = ", ins[2], ": code ", code, " writes values columns [", ins[2], ", ",
                        int64_t{ins[2]} + width, "), outside [0, n_values = ", n_values, ")");
      const int n_slots = code == PARAM_UNIFORM ? 2 : code == PARAM_INTEGER ? 1 : 0;
      for (int s = 0; s < n_slots; ++s) {
        TORCH_CHECK_VALUE(ins[3 + s] < N_SLOTS, "program[", v, ", ", j, ", ", 3 + s, "] = ", ins[3 + s],
                          ": a slot must be < N_SLOTS = ", N_SLOTS, " (negative: none)");
      }
    }
  }
}

int64_t floor_mod(int64_t x, int64_t m) { return ((x % m) + m) % m; }

Call make_call(const at::Tensor& program, const at::Tensor& consts, const at::Tensor& base, const at::Tensor& values,
               const at::Tensor& table, int64_t height, int64_t width, int64_t key, int64_t call) {
  TORCH_CHECK_VALUE(program.dim() == 3 && program.size(2) == PROGRAM_WIDTH && program.scalar_type() == at::kInt,
                    "program must be (K, L, ", PROGRAM_WIDTH, ") int32, got ", program.sizes(), " ",
                    program.scalar_type());
  const int64_t K = program.size(0), L = program.size(1);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == K, "values must be (K, B, n_values) with K = ", K,
                    ", got ", values.sizes());
  const int64_t B = values.size(1), n_values = values.size(2);
  check_table(program, "program", at::kInt, {K, L, PROGRAM_WIDTH}, "(K, L, PROGRAM_WIDTH)");
  check_table(consts, "consts", at::kDouble, {K, L, N_CONSTS}, "(K, L, N_CONSTS)");
  check_table(base, "base", at::kFloat, {K, N_SLOTS}, "(K, N_SLOTS)");
  check_table(values, "values", at::kDouble, {K, B, n_values}, "(K, B, n_values)");
  check_table(table, "table", at::kFloat, {K, B, N_SLOTS}, "(K, B, N_SLOTS)");
  TORCH_CHECK_VALUE(height >= 0 && height < kSideLimit, "height must be in [0, 2^31), got ", height);
  TORCH_CHECK_VALUE(width >= 0 && width < kSideLimit, "width must be in [0, 2^31), got ", width);
  check_program(program.const_data_ptr<int32_t>(), K, L, n_values);
  Call c;
  c.program = program.const_data_ptr<int32_t>();
  c.consts = consts.const_data_ptr<double>();
  c.base = base.const_data_ptr<float>();
  c.values = values.data_ptr<double>();
  c.table = table.data_ptr<float>();
  c.K = K;
  c.L = L;
  c.B = B;
  c.n_values = n_values;
  c.hf = static_cast<double>(height);
  c.wf = static_cast<double>(width);
  c.area = static_cast<double>(height * width);
  const int64_t k = floor_mod(key, kKeyModulus);
  c.key_lo = static_cast<uint32_t>(k & 0x7FFFFFFF);
  c.key_hi = static_cast<uint32_t>(k >> 31);
  c.call = static_cast<uint32_t>(floor_mod(call, kCallModulus));
  return c;
}

}  // namespace

std::map<std::string, int64_t> task_params_abi() {
  std::map<std::string, int64_t> abi;
  MTDL_TASK_PARAMS_ABI(MTDL_ABI_MAP_ENTRY)
  return abi;
}

void task_params_cpu(const at::Tensor& program, const at::Tensor& consts, const at::Tensor& base,
                     const at::Tensor& values, const at::Tensor& table, int64_t height, int64_t width, int64_t key,
                     int64_t call) {
  const Call c = make_call(program, consts, base, values, table, height, width, key, call);
  at::parallel_for(0, c.K * c.B, kGrain, [&c](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) run_item(c, item / c.B, item % c.B);
  });
}

}  // namespace mtdl
