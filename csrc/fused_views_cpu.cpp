// The fused K-view augmentation on the CPU: the program ABI of kernels/fused_views.py run by C++.
//
// Structure (why it is what it is):
// * Work items are (image, row tile): a tile is `tile_rows` whole rows of one image, about kTilePixels
//   pixels, so a view's state (three float planes of the tile) stays in L1. at::parallel_for hands
//   each thread a contiguous range of items, so one thread usually owns whole images.
// * Each source row is converted to float32 (x 1/255 for uint8) once per thread and image, on first
//   use, into a planar buffer that all K views read; float32 rows with unit x-stride are read in
//   place.
// * A view runs its spatial stage into the tile's state, then its ops, each a loop over the tile's
//   pixels: dispatch is per (view, tile, op), never per pixel, and every inner loop is branch-free
//   over contiguous arrays so the compiler vectorises it.
// * Warps read a padded, interleaved copy of the image (4 floats per pixel, a border of zero pixels),
//   built once per thread and image for the rows the tiles can reach (an affine map's extremes over a
//   rectangle lie at its corners): a bilinear tap pair is one contiguous load, all channels at once,
//   and an out-of-bounds tap reads 0, as grid_sample's zero padding. Flips run on contiguous rows.
// * Every formula is the Triton kernel's, in the same order and in float32 without contraction into
//   FMAs, so most views agree with it bit for bit; blur taps (exp), the contrast mean (summed in
//   float64 here) and the noise's log (a polynomial here) agree to float rounding.
// * OP_CONTRAST needs the mean gray of the state just before it over the whole image: a pre-pass
//   runs those views up to the op and writes one float64 partial sum per (view, image, tile); the
//   means sum the partials in tile order (deterministic, independent of the thread count). When
//   every image is one tile the main pass sums its own state there instead, the same way.
// * Each stage is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
//   (MTDL_FV_STAGE); the noise's Philox rounds and the bilinear gather use intrinsics where the CPU
//   has them, and float32 views are stored non-temporally.
#include "fused_views_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MTDL_FV_X86 1
#include <immintrin.h>
#endif

#include "fused_views_abi.h"

// Everything below: trapping math off (lets GCC vectorise floor, rint and float -> int conversions;
// results do not change) and no contraction of a * b + c into an FMA (the kernel's interpreter and
// both clones round every operation, so they agree bit for bit).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "inline_math.h"  // after the pragmas: its helpers inline into this file's stages

// A stage: one spatial stage or op over a tile, or a tile's store. Stages are compiled for AVX2
// (x86-64-v3) and for baseline x86-64 and picked at load time; everything they call is inlined
// into them, so each is one loop nest with its own register allocation.
#if defined(MTDL_FV_X86) && !defined(_WIN32)
#define MTDL_FV_STAGE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#elif defined(__GNUC__) || defined(__clang__)
#define MTDL_FV_STAGE __attribute__((noinline))
#else
#define MTDL_FV_STAGE
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MTDL_FV_INLINE inline __attribute__((always_inline))
#define MTDL_FV_RESTRICT __restrict__
#else
#define MTDL_FV_INLINE inline
#define MTDL_FV_RESTRICT
#endif

namespace mtdl {
namespace {

using namespace fv;

constexpr int64_t kTilePixels = 2048;       // pixels per work item (state: 3 * 8 KiB)
constexpr int64_t kWarpBlock = 256;          // pixels per block of a bilinear warp (taps: 7 KiB)
constexpr int64_t kMinItemPixels = 1 << 15;  // pixel-views per thread before another thread helps
constexpr int64_t kNoiseBlock = 256;         // pixels per noise block (a multiple of 16, on the stack)
constexpr int kMaxBlurRadius = MAX_BLUR_KSIZE / 2;
constexpr int kOutFloat = 0, kOutHalf = 1, kOutBFloat16 = 2;

// The kernel's constants are Python floats rounded to float32 where they meet float32 tensors.
constexpr float kInv255 = static_cast<float>(1.0 / 255.0);
constexpr float kGrayR = static_cast<float>(0.2989), kGrayG = static_cast<float>(0.587),
                kGrayB = static_cast<float>(0.114);
constexpr float kSharpSide = static_cast<float>(1.0 / 13.0), kSharpMid = static_cast<float>(5.0 / 13.0);
constexpr float kSixth = static_cast<float>(1.0 / 6.0);

// ---- the call's read-only description ------------------------------------------------------------

struct Plan {
  int64_t B = 0, C = 0, H = 0, W = 0, HW = 0, K = 0;
  const int32_t* spatial = nullptr;  // (K,)
  const int32_t* ops = nullptr;      // (K, MAX_OPS)
  const float* params = nullptr;     // (K, B, N_SLOTS)
  uint32_t seed_lo = 0, seed_hi = 0;
  bool normalize = false;
  float mean[3] = {0.f, 0.f, 0.f}, stdv[3] = {1.f, 1.f, 1.f};
  // input
  const char* x = nullptr;
  at::ScalarType in_dtype = at::kFloat;
  int64_t sxb = 0, sxc = 0, sxh = 0, sxw = 0;  // element strides
  bool direct = false;                         // float32 rows with unit x-stride: read in place
  // output
  char* out = nullptr;
  int out_kind = kOutFloat;
  int64_t out_elem = 4;
  // tiles
  int64_t tile_rows = 1, n_tiles = 1, tile_px = 1;
  bool has_warp = false;  // some view samples through ws.pixels
  bool avx2 = false;      // the CPU runs AVX2 (the noise's Philox rounds use it)
  bool avx512 = false;    // ... and AVX-512F (16 counters per step)
  // contrast: position of OP_CONTRAST in each view's row (MAX_OPS: none)
  std::vector<int> contrast_pos;
  double* partials = nullptr;             // (K, B, n_tiles), written by the pre-pass
  const float* contrast_mean = nullptr;   // (K, B), read by the main pass
};

// ---- per-thread scratch ----------------------------------------------------------------------

template <typename T>
std::unique_ptr<T[]> uninitialised(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

struct Workspace {
  explicit Workspace(const Plan& p)
      : image(p.direct ? nullptr : uninitialised<float>(p.C * p.HW)),
        converted(new uint8_t[static_cast<size_t>(p.H)]()),
        state(uninitialised<float>(3 * p.tile_px)),
        rows(uninitialised<float>(3 * (p.tile_rows + 2 * kMaxBlurRadius) * (p.W + 2 * kMaxBlurRadius))),
        pixels(p.has_warp ? uninitialised<float>(4 * pixel_count(p)) : nullptr),
        pixel_row_ready(new uint8_t[static_cast<size_t>(p.H)]()),
        weights(uninitialised<float>(5 * warp_block_rows(p) * p.W)),
        taps(uninitialised<int32_t>(2 * warp_block_rows(p) * p.W)),
        zeros(new float[static_cast<size_t>(p.W)]()) {}
  // Padded width of `pixels`, and its size in pixels: H + 2 rows of W + 2, then a zero tail that
  // out-of-bounds taps read (two rows, so that a tap pair and the pair below it both lie in it).
  static int64_t padded_width(const Plan& p) { return p.W + 2; }
  static int64_t pixel_count(const Plan& p) { return (p.H + 4) * padded_width(p); }
  static int64_t zero_pixel(const Plan& p) { return (p.H + 2) * padded_width(p); }
  // Rows per block of a bilinear warp: about kWarpBlock pixels, at least one row.
  static int64_t warp_block_rows(const Plan& p) { return std::max<int64_t>(1, kWarpBlock / std::max<int64_t>(1, p.W)); }
  std::unique_ptr<float[]> image;        // C planes of H x W: source rows converted to float32
  std::unique_ptr<uint8_t[]> converted;  // per row of `image`: converted for image `image_b`?
  int64_t image_b = -1;
  std::unique_ptr<float[]> state;        // 3 planes of tile_px: the view's state on the tile
  std::unique_ptr<float[]> rows;         // blur: padded rows, then both passes
  // Warps: image `pixels_b` as 4 floats per pixel (channels, then 0), with a border of zero pixels
  // around it: pixel (y, x) at pixels + 4 * ((y + 1) * (W + 2) + x + 1). A bilinear tap pair (x0, x0 + 1)
  // is 32 contiguous bytes and an out-of-bounds tap reads 0, which is what grid_sample's zero
  // padding adds: no gathers, no masks.
  std::unique_ptr<float[]> pixels;
  std::unique_ptr<uint8_t[]> pixel_row_ready;
  int64_t pixels_b = -1;
  std::unique_ptr<float[]> weights;      // warp: per-block tap weights (and the fill mask)
  std::unique_ptr<int32_t[]> taps;       // warp: per-block float offsets into `pixels` (and in-bounds flags)
  std::unique_ptr<float[]> zeros;        // a row of W zeros: the row below the image
};

// Row r of channel c of the source image: plane[c] + r * stride (floats).
struct Source {
  const float* plane[3];
  int64_t stride;
};

// ---- small float helpers (the kernel's formulas) ----------------------------------------------

MTDL_FV_INLINE float clamp01(float v) {
  // torch.clamp(v, 0, 1) propagates NaN; so does this (comparisons with NaN are false).
  v = v < 0.f ? 0.f : v;
  return v > 1.f ? 1.f : v;
}

MTDL_FV_INLINE float gray(float r, float g, float b) { return r * kGrayR + g * kGrayG + b * kGrayB; }

MTDL_FV_INLINE uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

MTDL_FV_INLINE float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// ---- input: source rows as float32 -----------------------------------------------------------

template <typename T>
MTDL_FV_INLINE float load_scaled(const T* p);

template <>
MTDL_FV_INLINE float load_scaled<uint8_t>(const uint8_t* p) {
  return static_cast<float>(*p) * kInv255;  // torchvision's to_dtype(scale=True): x * (1/255)
}

template <>
MTDL_FV_INLINE float load_scaled<float>(const float* p) {
  return *p;
}

template <>
MTDL_FV_INLINE float load_scaled<c10::BFloat16>(const c10::BFloat16* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return bits_float(static_cast<uint32_t>(h) << 16);
}

template <>
MTDL_FV_INLINE float load_scaled<c10::Half>(const c10::Half* p) {
#ifdef __FLT16_MAX__
  _Float16 h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
#else
  return static_cast<float>(*p);
#endif
}

template <typename T>
MTDL_FV_INLINE void convert_row(const T* MTDL_FV_RESTRICT src, int64_t sxw, float* MTDL_FV_RESTRICT dst, int64_t W) {
  if (sxw == 1) {
    for (int64_t x = 0; x < W; ++x) dst[x] = load_scaled(src + x);
  } else {
    for (int64_t x = 0; x < W; ++x) dst[x] = load_scaled(src + x * sxw);
  }
}

// Each run of rows not yet converted: per channel one loop over the run when its rows are contiguous
// in x (a 32-pixel row alone is too short a loop), else row by row.
template <typename T>
MTDL_FV_INLINE void convert_rows_as(const Plan& p, Workspace& ws, int64_t b, int64_t r0, int64_t r1) {
  const T* img = reinterpret_cast<const T*>(p.x) + b * p.sxb;
  const bool flat = p.sxw == 1 && p.sxh == p.W;
  for (int64_t r = r0; r < r1; ++r) {
    if (ws.converted[r]) continue;
    int64_t end = r + 1;
    while (end < r1 && !ws.converted[end]) ++end;
    for (int64_t c = 0; c < p.C; ++c) {
      float* dst = ws.image.get() + c * p.HW;
      if (flat) {
        convert_row(img + c * p.sxc + r * p.sxh, 1, dst + r * p.W, (end - r) * p.W);
      } else {
        for (int64_t q = r; q < end; ++q) convert_row(img + c * p.sxc + q * p.sxh, p.sxw, dst + q * p.W, p.W);
      }
    }
    std::memset(ws.converted.get() + r, 1, static_cast<size_t>(end - r));
    r = end;
  }
}

// The source of image b with rows [r0, r1) (clamped to the image) ready to read.
MTDL_FV_STAGE Source source_rows(const Plan& p, Workspace& ws, int64_t b, int64_t r0, int64_t r1) {
  Source s;
  if (p.direct) {
    const float* img = reinterpret_cast<const float*>(p.x) + b * p.sxb;
    for (int64_t c = 0; c < 3; ++c) s.plane[c] = img + std::min<int64_t>(c, p.C - 1) * p.sxc;
    s.stride = p.sxh;
    return s;
  }
  if (ws.image_b != b) {
    std::memset(ws.converted.get(), 0, static_cast<size_t>(p.H));
    ws.image_b = b;
  }
  r0 = std::max<int64_t>(r0, 0);
  r1 = std::min<int64_t>(r1, p.H);
  switch (p.in_dtype) {
    case at::kByte: convert_rows_as<uint8_t>(p, ws, b, r0, r1); break;
    case at::kHalf: convert_rows_as<c10::Half>(p, ws, b, r0, r1); break;
    case at::kBFloat16: convert_rows_as<c10::BFloat16>(p, ws, b, r0, r1); break;
    default: convert_rows_as<float>(p, ws, b, r0, r1); break;
  }
  for (int64_t c = 0; c < 3; ++c) s.plane[c] = ws.image.get() + std::min<int64_t>(c, p.C - 1) * p.HW;
  s.stride = p.W;
  return s;
}

// ---- spatial stages --------------------------------------------------------------------------

// One view's state on one tile: rows [y0, y1) of image b, n = (y1 - y0) * W pixels per channel.
struct Tile {
  int64_t v, b, y0, y1, n;
  const float* prm;  // params[v, b, :]
  float contrast_mu;  // OP_CONTRAST's mean gray of this view on image b
  float* s[3];       // state planes (s[1], s[2] unused when C == 1)
};

MTDL_FV_STAGE void copy_rows(const Plan& p, Workspace& ws, const Tile& t) {
  const Source src = source_rows(p, ws, t.b, t.y0, t.y1);
  for (int64_t c = 0; c < p.C; ++c) {
    for (int64_t y = t.y0; y < t.y1; ++y) {
      std::memcpy(t.s[c] + (y - t.y0) * p.W, src.plane[c] + y * src.stride, static_cast<size_t>(p.W) * 4);
    }
  }
}

// Rows a warp of rows [y0, y1) can read: sy is affine in (x, y), so its extremes over the tile are at
// the corners; a margin covers float rounding. Non-finite coordinates: every row (never read out of
// bounds either way, the bounds tests below work on floats).
MTDL_FV_INLINE void warp_rows(const Plan& p, const Tile& t, int64_t* r0, int64_t* r1) {
  const double m3 = t.prm[SLOT_M3], m4 = t.prm[SLOT_M4], m5 = t.prm[SLOT_M5];
  const double cy0 = t.prm[SLOT_CLAMP_Y0], cy1 = t.prm[SLOT_CLAMP_Y1];
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int corner = 0; corner < 4; ++corner) {
    const double x = (corner & 1) ? static_cast<double>(p.W - 1) : 0.0;
    const double y = (corner & 2) ? static_cast<double>(t.y1 - 1) : static_cast<double>(t.y0);
    double sy = m3 * x + m4 * y + m5;
    sy = std::min(std::max(sy, cy0), cy1);
    lo = std::min(lo, sy);
    hi = std::max(hi, sy);
  }
  const double slack = 1e-5 * (std::fabs(m3) * p.W + std::fabs(m4) * p.H + std::fabs(m5)) + 1e-3;
  if (!std::isfinite(lo) || !std::isfinite(hi) || !std::isfinite(slack)) {
    *r0 = 0;
    *r1 = p.H;
    return;
  }
  *r0 = static_cast<int64_t>(std::max(std::floor(lo - slack) - 1.0, 0.0));
  *r1 = static_cast<int64_t>(std::min(std::floor(hi + slack) + 2.0, static_cast<double>(p.H)));
}

// One padded row of ws.pixels: (0, 0, 0, 0), then (r, g, b, 0) per pixel, then (0, 0, 0, 0). For C == 1
// the planes alias (the extra lanes are never stored).
MTDL_FV_INLINE void interleave_row(const float* MTDL_FV_RESTRICT r, const float* MTDL_FV_RESTRICT g,
                                   const float* MTDL_FV_RESTRICT b, float* MTDL_FV_RESTRICT row, int64_t W) {
  for (int l = 0; l < 4; ++l) row[l] = 0.f;
  for (int64_t x = 0; x < W; ++x) {
    float* MTDL_FV_RESTRICT q = row + 4 * (x + 1);
    q[0] = r[x];
    q[1] = g[x];
    q[2] = b[x];
    q[3] = 0.f;
  }
  for (int l = 0; l < 4; ++l) row[4 * (W + 1) + l] = 0.f;
}

// Rows [r0, r1) of image b in ws.pixels (built on first use per thread and image).
MTDL_FV_INLINE const float* pixel_rows(const Plan& p, Workspace& ws, int64_t b, int64_t r0, int64_t r1) {
  const int64_t Wp = Workspace::padded_width(p);
  float* px = ws.pixels.get();
  if (ws.pixels_b != b) {  // zero the border rows and the tail once per image
    std::memset(px, 0, static_cast<size_t>(4 * Wp) * sizeof(float));
    std::memset(px + 4 * (p.H + 1) * Wp, 0, static_cast<size_t>(4 * 3 * Wp) * sizeof(float));
    std::memset(ws.pixel_row_ready.get(), 0, static_cast<size_t>(p.H));
    ws.pixels_b = b;
  }
  r0 = std::max<int64_t>(r0, 0);
  r1 = std::min<int64_t>(r1, p.H);
  for (int64_t r = r0; r < r1; ++r) {
    if (ws.pixel_row_ready[r]) continue;
    const Source src = source_rows(p, ws, b, r, r + 1);
    interleave_row(src.plane[0] + r * src.stride, src.plane[1] + r * src.stride, src.plane[2] + r * src.stride,
                   px + 4 * (r + 1) * Wp, p.W);
    ws.pixel_row_ready[r] = 1;
  }
  return px;
}

// Source coordinates of one output row: sx = M0 x + M1 y + M2, sy = M3 x + M4 y + M5, clamped to the
// box (resized_crop's edge replication; +-1e30 disables it).
struct RowMap {
  float m0, m1, m2, m3, m4, m5, cx0, cx1, cy0, cy1;
  float yf, wmax, hmax;    // this row's y; the last column and row as floats
  int32_t wp, zero_pixel;  // padded width and the zero tail's first pixel in ws.pixels
};

MTDL_FV_INLINE RowMap row_map(const Plan& p, const Tile& t, int64_t y) {
  const float* prm = t.prm;
  return RowMap{prm[SLOT_M0],
                prm[SLOT_M1],
                prm[SLOT_M2],
                prm[SLOT_M3],
                prm[SLOT_M4],
                prm[SLOT_M5],
                prm[SLOT_CLAMP_X0],
                prm[SLOT_CLAMP_X1],
                prm[SLOT_CLAMP_Y0],
                prm[SLOT_CLAMP_Y1],
                static_cast<float>(y),
                static_cast<float>(p.W) - 1.f,
                static_cast<float>(p.H) - 1.f,
                static_cast<int32_t>(Workspace::padded_width(p)),
                static_cast<int32_t>(Workspace::zero_pixel(p))};
}

MTDL_FV_INLINE void source_xy(const RowMap& r, int32_t x, float* sx, float* sy) {
  const float xf = static_cast<float>(x);
  float u = r.m0 * xf + r.m1 * r.yf + r.m2;
  float v = r.m3 * xf + r.m4 * r.yf + r.m5;
  u = u < r.cx0 ? r.cx0 : u;
  u = u > r.cx1 ? r.cx1 : u;
  v = v < r.cy0 ? r.cy0 : v;
  *sx = u;
  *sy = v > r.cy1 ? r.cy1 : v;
}

// Bilinear taps of `rows` rows from r's row on, row after row: grid_sample's weights
// nw = (x1 - sx) (y1 - sy), ne, sw, se, and the float offset of the top-left tap in ws.pixels (a tap
// pair and the pair below it; when no tap is in the image, the zero tail). With a fill, msk = the
// same sampling of an all-ones image.
MTDL_FV_INLINE void bilinear_taps(RowMap r, int64_t rows, int64_t W, bool fill, float* MTDL_FV_RESTRICT nw,
                                  float* MTDL_FV_RESTRICT ne, float* MTDL_FV_RESTRICT sw, float* MTDL_FV_RESTRICT se,
                                  float* MTDL_FV_RESTRICT msk, int32_t* MTDL_FV_RESTRICT offset) {
  // int32 columns: AVX2 converts int32, not int64, to float (W < 2^31 is checked)
  for (int64_t row = 0; row < rows; ++row, r.yf += 1.f, nw += W, ne += W, sw += W, se += W, msk += W, offset += W) {
  for (int32_t x = 0; x < static_cast<int32_t>(W); ++x) {
    float sx, sy;
    source_xy(r, x, &sx, &sy);
    const float x0 = __builtin_floorf(sx), y0 = __builtin_floorf(sy);
    const float x1 = x0 + 1.f, y1 = y0 + 1.f;
    const float a = (x1 - sx) * (y1 - sy), b = (sx - x0) * (y1 - sy), c = (x1 - sx) * (sy - y0),
                d = (sx - x0) * (sy - y0);
    nw[x] = a;
    ne[x] = b;
    sw[x] = c;
    se[x] = d;
    // Tests on floats: NaN or huge coordinates are out, never cast to int.
    const bool near = (x0 >= -1.f) & (x0 <= r.wmax) & (y0 >= -1.f) & (y0 <= r.hmax);
    const int32_t px = near ? static_cast<int32_t>(y0 + 1.f) * r.wp + static_cast<int32_t>(x0 + 1.f) : r.zero_pixel;
    offset[x] = 4 * px;
    if (fill) {
      const bool in_x0 = (x0 >= 0.f) & (x0 <= r.wmax), in_x1 = (x1 >= 0.f) & (x1 <= r.wmax);
      const bool in_y0 = (y0 >= 0.f) & (y0 <= r.hmax), in_y1 = (y1 >= 0.f) & (y1 <= r.hmax);
      msk[x] = ((in_y0 & in_x0) ? a : 0.f) + ((in_y0 & in_x1) ? b : 0.f) + ((in_y1 & in_x0) ? c : 0.f) +
               ((in_y1 & in_x1) ? d : 0.f);
    }
  }
  }
}

// Four channel lanes of a pixel: one 16-byte load (GCC and clang vector extensions; SSE on x86-64).
typedef float Lanes __attribute__((vector_size(16)));

MTDL_FV_INLINE Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

MTDL_FV_INLINE void store_lanes(Lanes v, int64_t C, float* const* dst, int64_t x) {
  dst[0][x] = v[0];
  if (C == 3) {
    dst[1][x] = v[1];
    dst[2][x] = v[2];
  }
}

#ifdef MTDL_FV_X86
// Pixels [0, n8) of warp_rows_bilinear's sum (n8 a multiple of 8) with AVX2: two pixels per register
// (a tap's four channels in each half, the weights spread to match), the same products and sums in
// the same order, then eight (r, g, b, 0) pixels transposed into three planar stores.
__attribute__((target("avx2"), noinline)) void bilinear_gather_avx2(const float* px, const int32_t* offset,
                                                                     const float* nw, const float* ne,
                                                                     const float* sw, const float* se,
                                                                     int64_t below, int64_t n8, int64_t C,
                                                                     float* const* dst) {
  const __m256i pair[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                           _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t x = 0; x < n8; x += 8) {
    const __m256 w0 = _mm256_loadu_ps(nw + x), w1 = _mm256_loadu_ps(ne + x), w2 = _mm256_loadu_ps(sw + x),
                 w3 = _mm256_loadu_ps(se + x);
    __m256 two[4];  // pixels (x + 2k, x + 2k + 1)
    for (int k = 0; k < 4; ++k) {
      const float* a = px + offset[x + 2 * k];
      const float* b = px + offset[x + 2 * k + 1];
      const __m256 t0 = _mm256_loadu2_m128(b, a), t1 = _mm256_loadu2_m128(b + 4, a + 4);
      const __m256 t2 = _mm256_loadu2_m128(b + below, a + below), t3 = _mm256_loadu2_m128(b + below + 4, a + below + 4);
      __m256 v = _mm256_add_ps(_mm256_mul_ps(t0, _mm256_permutevar8x32_ps(w0, pair[k])),
                               _mm256_mul_ps(t1, _mm256_permutevar8x32_ps(w1, pair[k])));
      v = _mm256_add_ps(v, _mm256_mul_ps(t2, _mm256_permutevar8x32_ps(w2, pair[k])));
      two[k] = _mm256_add_ps(v, _mm256_mul_ps(t3, _mm256_permutevar8x32_ps(w3, pair[k])));
    }
    // per 128-bit half: pixels (0, 2, 4, 6) and (1, 3, 5, 7) as rows of a 4 x 4 transpose
    const __m256 lo01 = _mm256_unpacklo_ps(two[0], two[1]), lo23 = _mm256_unpacklo_ps(two[2], two[3]);
    const __m256 r = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(lo01, lo23, 0x44), order);
    _mm256_storeu_ps(dst[0] + x, r);
    if (C == 3) {
      const __m256 hi01 = _mm256_unpackhi_ps(two[0], two[1]), hi23 = _mm256_unpackhi_ps(two[2], two[3]);
      _mm256_storeu_ps(dst[1] + x, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(lo01, lo23, 0xEE), order));
      _mm256_storeu_ps(dst[2] + x, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(hi01, hi23, 0x44), order));
    }
  }
}
#endif

// Bilinear sampling of output rows [y, y + rows) (rows * W <= kWarpBlock, or one row), grid_sample(
// align_corners=False, padding_mode="zeros") in pixel indices: out = a nw + b ne + d sw + e se (in this
// order), all channels at once. The block's rows are contiguous in the state, so taps, sums and fill
// each run as one loop over rows * W pixels: at 32 pixels a row, per-row set-up would cost as much.
MTDL_FV_INLINE void warp_rows_bilinear(const Plan& p, Workspace& ws, const Tile& t, const float* px, int64_t y,
                                       int64_t rows, float* const* dst) {
  const int64_t n = rows * p.W, C = p.C;
  const bool has_fill = t.prm[SLOT_HAS_FILL] > 0.5f;
  float* nw = ws.weights.get();
  float *ne = nw + n, *sw = nw + 2 * n, *se = nw + 3 * n, *msk = nw + 4 * n;
  int32_t* offset = ws.taps.get();
  const RowMap r = row_map(p, t, y);
  bilinear_taps(r, rows, p.W, has_fill, nw, ne, sw, se, msk, offset);
  const int64_t below = 4 * static_cast<int64_t>(r.wp);
  int64_t x = 0;
#ifdef MTDL_FV_X86
  if (p.avx2) {
    x = n - n % 8;
    bilinear_gather_avx2(px, offset, nw, ne, sw, se, below, x, C, dst);
  }
#endif
  for (; x < n; ++x) {
    const float* q = px + offset[x];
    const Lanes v = load_lanes(q) * nw[x] + load_lanes(q + 4) * ne[x] + load_lanes(q + below) * sw[x] +
                    load_lanes(q + below + 4) * se[x];
    store_lanes(v, C, dst, x);
  }
  if (has_fill) {  // out = (img - fill) * mask + fill
    const float fill = t.prm[SLOT_FILL];
    for (int64_t c = 0; c < C; ++c) {
      float* MTDL_FV_RESTRICT o = dst[c];
      for (int64_t x = 0; x < n; ++x) o[x] = (o[x] - fill) * msk[x] + fill;
    }
  }
}

// Nearest taps of one row: rint (half to even, as grid_sample); the pixel's float offset in
// ws.pixels (the zero tail when out of bounds) and whether it is in bounds.
MTDL_FV_INLINE void nearest_taps(const RowMap& r, int64_t W, int32_t* MTDL_FV_RESTRICT offset,
                                 int32_t* MTDL_FV_RESTRICT inb) {
  for (int32_t x = 0; x < static_cast<int32_t>(W); ++x) {
    float sx, sy;
    source_xy(r, x, &sx, &sy);
    const float xn = __builtin_rintf(sx), yn = __builtin_rintf(sy);
    const bool in = (xn >= 0.f) & (xn <= r.wmax) & (yn >= 0.f) & (yn <= r.hmax);
    offset[x] = 4 * (in ? static_cast<int32_t>(yn + 1.f) * r.wp + static_cast<int32_t>(xn + 1.f) : r.zero_pixel);
    inb[x] = in;
  }
}

// Nearest sampling; where the pixel is out of bounds: 0, or the fill (the warped ones mask < 0.5).
MTDL_FV_INLINE void warp_row_nearest(const Plan& p, Workspace& ws, const Tile& t, const float* px, int64_t y,
                                     float* const* dst) {
  const int64_t W = p.W;
  int32_t* offset = ws.taps.get();
  int32_t* inb = offset + W;
  nearest_taps(row_map(p, t, y), W, offset, inb);
  for (int64_t x = 0; x < W; ++x) store_lanes(load_lanes(px + offset[x]), p.C, dst, x);
  if (t.prm[SLOT_HAS_FILL] > 0.5f) {
    const float fill = t.prm[SLOT_FILL];
    for (int64_t c = 0; c < p.C; ++c) {
      float* MTDL_FV_RESTRICT o = dst[c];
      for (int64_t x = 0; x < W; ++x) o[x] = inb[x] ? o[x] : fill;
    }
  }
}

// True when every source coordinate of the warp is a pixel centre inside the image with one source
// row per output row: sx = M0 x + M2, sy = M4 y + M5, M0 and M4 = +-1, integral offsets, the clamp box
// inactive. Over the image's columns that leaves the identity (M0 = 1, M2 = 0) and the mirror
// (M0 = -1, M2 = W - 1): flips. The bilinear weights are then exactly (1, 0, 0, 0).
MTDL_FV_INLINE bool is_flip(const Plan& p, const float* prm) {
  const float m0 = prm[SLOT_M0], m2 = prm[SLOT_M2], m4 = prm[SLOT_M4], m5 = prm[SLOT_M5];
  if (!(prm[SLOT_M1] == 0.f && prm[SLOT_M3] == 0.f && (m0 == 1.f || m0 == -1.f) && (m4 == 1.f || m4 == -1.f))) {
    return false;
  }
  const float wmax = static_cast<float>(p.W - 1), hmax = static_cast<float>(p.H - 1);
  const float x_first = m2, x_last = m0 * wmax + m2, y_first = m5, y_last = m4 * hmax + m5;
  const float x_lo = std::min(x_first, x_last), x_hi = std::max(x_first, x_last);
  const float y_lo = std::min(y_first, y_last), y_hi = std::max(y_first, y_last);
  return m2 == std::floor(m2) && m5 == std::floor(m5) && x_lo >= 0.f && x_hi <= wmax && y_lo >= 0.f &&
         y_hi <= hmax && prm[SLOT_CLAMP_X0] <= x_lo && prm[SLOT_CLAMP_X1] >= x_hi && prm[SLOT_CLAMP_Y0] <= y_lo &&
         prm[SLOT_CLAMP_Y1] >= y_hi;
}

// The kernel's bilinear sum ((a nw + b ne) + d sw) + e se with (nw, ne, sw, se) = (1, 0, 0, 0) over a
// row: a, b = up[x], up[x + 1] and d, e = down[x], down[x + 1] (mirrored: up[W - 1 - x], up[W - x], ...),
// taps past the row's end 0. Same bits as the general path, NaN and signed zeros included.
MTDL_FV_INLINE void unit_taps_row(const float* MTDL_FV_RESTRICT up, const float* MTDL_FV_RESTRICT down,
                                  float* MTDL_FV_RESTRICT o, int64_t W, bool mirror) {
  const float one = 1.f, zero = 0.f;
  if (mirror) {
    const float* MTDL_FV_RESTRICT u = up + (W - 1);
    const float* MTDL_FV_RESTRICT d = down + (W - 1);
    o[0] = ((u[0] * one + zero * zero) + d[0] * zero) + zero * zero;
    for (int64_t x = 1; x < W; ++x) o[x] = ((u[-x] * one + u[1 - x] * zero) + d[-x] * zero) + d[1 - x] * zero;
  } else {
    for (int64_t x = 0; x + 1 < W; ++x) o[x] = ((up[x] * one + up[x + 1] * zero) + down[x] * zero) + down[x + 1] * zero;
    o[W - 1] = ((up[W - 1] * one + zero * zero) + down[W - 1] * zero) + zero * zero;
  }
}

// A flip (is_flip) on contiguous rows. Nearest: the source pixel; bilinear: unit_taps_row, then with a
// fill (the ones mask is exactly 1) (img - fill) * 1 + fill, as the kernel computes it. From uint8
// every source value is finite and >= +0, so unit_taps_row's a * 1 + (+0) + (+0) + (+0) is a itself:
// the bilinear flip is the plain copy too.
MTDL_FV_INLINE void flip(const Plan& p, Workspace& ws, const Tile& t) {
  const float* prm = t.prm;
  const bool mirror = prm[SLOT_M0] < 0.f, nearest = prm[SLOT_NEAREST] > 0.5f;
  const bool has_fill = prm[SLOT_HAS_FILL] > 0.5f;
  const float fill = prm[SLOT_FILL], m4 = prm[SLOT_M4], m5 = prm[SLOT_M5];
  const int64_t W = p.W;
  int64_t first = static_cast<int64_t>(m4 * static_cast<float>(t.y0) + m5);
  int64_t last = static_cast<int64_t>(m4 * static_cast<float>(t.y1 - 1) + m5);
  const Source src = source_rows(p, ws, t.b, std::min(first, last), std::max(first, last) + 2);
  for (int64_t y = t.y0; y < t.y1; ++y) {
    const int64_t sy = static_cast<int64_t>(m4 * static_cast<float>(y) + m5);
    for (int64_t c = 0; c < p.C; ++c) {
      const float* up = src.plane[c] + sy * src.stride;
      const float* down = sy + 1 < p.H ? up + src.stride : ws.zeros.get();
      float* MTDL_FV_RESTRICT o = t.s[c] + (y - t.y0) * W;
      if (nearest || p.in_dtype == at::kByte) {
        if (mirror) {
          for (int64_t x = 0; x < W; ++x) o[x] = up[W - 1 - x];
        } else {
          std::memcpy(o, up, static_cast<size_t>(W) * sizeof(float));
        }
      } else {
        unit_taps_row(up, down, o, W, mirror);
      }
      if (has_fill && !nearest) {
        for (int64_t x = 0; x < W; ++x) o[x] = (o[x] - fill) * 1.f + fill;
      }
    }
  }
}

MTDL_FV_STAGE void warp(const Plan& p, Workspace& ws, const Tile& t) {
  if (is_flip(p, t.prm)) {
    flip(p, ws, t);
    return;
  }
  int64_t r0, r1;
  warp_rows(p, t, &r0, &r1);
  const float* px = pixel_rows(p, ws, t.b, r0, r1);
  const bool nearest = t.prm[SLOT_NEAREST] > 0.5f;
  const int64_t block = nearest ? 1 : Workspace::warp_block_rows(p);
  for (int64_t y = t.y0; y < t.y1; y += block) {
    const int64_t off = (y - t.y0) * p.W;
    float* dst[3] = {t.s[0] + off, t.s[1] + off, t.s[2] + off};
    if (nearest) {
      warp_row_nearest(p, ws, t, px, y, dst);
    } else {
      warp_rows_bilinear(p, ws, t, px, y, std::min(block, t.y1 - y), dst);
    }
  }
}

// torch.nn.functional.pad(mode="reflect"), then clamped so that a kernel wider than the image
// (torchvision raises there) can never read out of bounds.
MTDL_FV_INLINE int64_t reflect(int64_t i, int64_t n) {
  i = i < 0 ? -i : i;
  i = i > n - 1 ? 2 * (n - 1) - i : i;
  i = i < 0 ? 0 : i;
  return i > n - 1 ? n - 1 : i;
}

MTDL_FV_INLINE int blur_radius(float k) {
  float r = std::floor((k - 1.f) * 0.5f);
  r = r > 0.f ? r : 0.f;  // NaN -> 0
  r = r < static_cast<float>(kMaxBlurRadius) ? r : static_cast<float>(kMaxBlurRadius);
  return static_cast<int>(r);
}

// taps[d + r] = exp(-d^2 / (2 sigma^2)) / sum, d in [-r, r], computed as the kernel does.
MTDL_FV_INLINE void blur_taps(int r, float sigma, float* taps) {
  const float e = -0.5f / (sigma * sigma);
  float sum = e * 0.f;
  for (int d = -r; d <= r; ++d) sum += std::exp(static_cast<float>(d * d) * e);
  const float inv = 1.f / sum;
  for (int d = -r; d <= r; ++d) taps[d + r] = std::exp(static_cast<float>(d * d) * e) * inv;
}

// Eight lanes of float32 (GCC and clang vector extensions: one AVX register, or two SSE ones).
typedef float Lanes8 __attribute__((vector_size(32)));

// out[k] = sum over d in [0, kTaps) of w[d] * in[k + d * step], k in [0, n), summed in order of d
// (from 0). Eight outputs at a time accumulate every tap in a register: one store per eight outputs
// whatever the tap count; the tap count is a template argument, so the tap loop unrolls.
template <int kTaps>
MTDL_FV_INLINE void filter_flat(const float* MTDL_FV_RESTRICT in, float* MTDL_FV_RESTRICT out, int64_t n,
                                const float* w, int64_t step) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    Lanes8 acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int d = 0; d < kTaps; ++d) {
      Lanes8 v;
      std::memcpy(&v, in + k + d * step, sizeof(v));
      acc += w[d] * v;
    }
    std::memcpy(out + k, &acc, sizeof(acc));
  }
  for (; k < n; ++k) {
    float acc = 0.f;
    for (int d = 0; d < kTaps; ++d) acc += w[d] * in[k + d * step];
    out[k] = acc;
  }
}

// filter_flat for a radius r in [0, kMaxBlurRadius] (2 r + 1 taps).
MTDL_FV_INLINE void filter_radius(int r, const float* MTDL_FV_RESTRICT in, float* MTDL_FV_RESTRICT out, int64_t n,
                                  const float* w, int64_t step) {
  static_assert(kMaxBlurRadius == 7, "one case per radius");
  switch (r) {
    case 0: filter_flat<1>(in, out, n, w, step); break;
    case 1: filter_flat<3>(in, out, n, w, step); break;
    case 2: filter_flat<5>(in, out, n, w, step); break;
    case 3: filter_flat<7>(in, out, n, w, step); break;
    case 4: filter_flat<9>(in, out, n, w, step); break;
    case 5: filter_flat<11>(in, out, n, w, step); break;
    case 6: filter_flat<13>(in, out, n, w, step); break;
    default: filter_flat<15>(in, out, n, w, step); break;
  }
}

// torchvision gaussian_blur on a float image: separable odd kernels, reflect padding, the kernel's
// order (each row summed over dx, then the rows over dy). The rows the tile needs, reflected and
// padded to a common stride S = W + 2 rx, are filtered as one flat array per pass: long loops even
// for narrow images (the padding columns are computed and dropped).
MTDL_FV_STAGE void blur(const Plan& p, Workspace& ws, const Tile& t) {
  const int rx = blur_radius(t.prm[SLOT_BLUR_KX]), ry = blur_radius(t.prm[SLOT_BLUR_KY]);
  float tx[2 * kMaxBlurRadius + 1], ty[2 * kMaxBlurRadius + 1];
  blur_taps(rx, t.prm[SLOT_BLUR_SX], tx);
  blur_taps(ry, t.prm[SLOT_BLUR_SY], ty);
  const int64_t W = p.W, H = p.H, S = W + 2 * rx, R = t.y1 - t.y0;
  const int64_t v0 = t.y0 - ry, nv = R + 2 * ry;  // virtual rows v0 .., reflected into the image
  int64_t lo = H, hi = 0;
  for (int64_t v = v0; v < v0 + nv; ++v) {
    lo = std::min(lo, reflect(v, H));
    hi = std::max(hi, reflect(v, H) + 1);
  }
  const Source src = source_rows(p, ws, t.b, lo, hi);
  float* padded = ws.rows.get();           // nv rows of S
  float* across = padded + nv * S;         // horizontal pass: nv rows of S (the last 2 rx unused)
  float* down = across + nv * S;           // vertical pass: R rows of S
  for (int64_t c = 0; c < p.C; ++c) {
    for (int64_t v = 0; v < nv; ++v) {
      const float* row = src.plane[c] + reflect(v0 + v, H) * src.stride;
      float* dst = padded + v * S;
      for (int64_t x = -rx; x < 0; ++x) dst[x + rx] = row[reflect(x, W)];
      std::memcpy(dst + rx, row, static_cast<size_t>(W) * sizeof(float));
      for (int64_t x = W; x < W + rx; ++x) dst[x + rx] = row[reflect(x, W)];
    }
    filter_radius(rx, padded, across, nv * S - 2 * rx, tx, 1);
    for (int64_t k = nv * S - 2 * rx; k < nv * S; ++k) across[k] = 0.f;  // read by dropped columns only
    filter_radius(ry, across, down, R * S, ty, S);
    for (int64_t y = 0; y < R; ++y) {
      std::memcpy(t.s[c] + y * W, down + y * S, static_cast<size_t>(W) * sizeof(float));
    }
  }
}

// torchvision adjust_sharpness on float: interior blend with the 3x3 smoothing, then clamp; images
// with H <= 2 or W <= 2 are returned unchanged (not even clamped).
MTDL_FV_STAGE void sharpen(const Plan& p, Workspace& ws, const Tile& t) {
  const int64_t W = p.W, H = p.H;
  if (H <= 2 || W <= 2) {
    copy_rows(p, ws, t);
    return;
  }
  const Source src = source_rows(p, ws, t.b, t.y0 - 1, t.y1 + 1);
  const float g = 1.f - t.prm[SLOT_SHARPNESS];
  for (int64_t c = 0; c < p.C; ++c) {
    for (int64_t y = t.y0; y < t.y1; ++y) {
      const float* MTDL_FV_RESTRICT mid = src.plane[c] + y * src.stride;
      float* MTDL_FV_RESTRICT o = t.s[c] + (y - t.y0) * W;
      if (y == 0 || y == H - 1) {
        for (int64_t x = 0; x < W; ++x) o[x] = clamp01(mid[x]);
        continue;
      }
      const float* MTDL_FV_RESTRICT up = mid - src.stride;
      const float* MTDL_FV_RESTRICT dn = mid + src.stride;
      o[0] = clamp01(mid[0]);
      for (int64_t x = 1; x < W - 1; ++x) {
        float s = 0.f;
        s += up[x - 1];
        s += up[x];
        s += up[x + 1];
        s += mid[x - 1];
        s += mid[x + 1];
        s += dn[x - 1];
        s += dn[x];
        s += dn[x + 1];
        const float cv = mid[x];
        o[x] = clamp01(cv + g * ((s * kSharpSide + cv * kSharpMid) - cv));
      }
      o[W - 1] = clamp01(mid[W - 1]);
    }
  }
}

// ---- pointwise ops on the tile's n pixels --------------------------------------------------------

MTDL_FV_STAGE void op_scale_clamp(float* MTDL_FV_RESTRICT s, int64_t n, float f) {
  for (int64_t i = 0; i < n; ++i) s[i] = clamp01(s[i] * f);
}

MTDL_FV_STAGE void op_blend_const(float* MTDL_FV_RESTRICT s, int64_t n, float f, float mu) {
  const float g = 1.f - f;
  for (int64_t i = 0; i < n; ++i) s[i] = clamp01(s[i] * f + g * mu);
}

MTDL_FV_STAGE void op_saturation(float* MTDL_FV_RESTRICT r, float* MTDL_FV_RESTRICT g, float* MTDL_FV_RESTRICT b,
                                  int64_t n, float f) {
  const float k = 1.f - f;
  for (int64_t i = 0; i < n; ++i) {
    const float gr = gray(r[i], g[i], b[i]);
    r[i] = clamp01(r[i] * f + k * gr);
    g[i] = clamp01(g[i] * f + k * gr);
    b[i] = clamp01(b[i] * f + k * gr);
  }
}

MTDL_FV_STAGE void op_grayscale(float* MTDL_FV_RESTRICT r, float* MTDL_FV_RESTRICT g, float* MTDL_FV_RESTRICT b,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gr = gray(r[i], g[i], b[i]);
    r[i] = gr;
    g[i] = gr;
    b[i] = gr;
  }
}

// torchvision adjust_hue on float RGB: _rgb_to_hsv, h = (h + f) mod 1, _hsv_to_rgb.
MTDL_FV_STAGE void op_hue(float* MTDL_FV_RESTRICT r, float* MTDL_FV_RESTRICT g, float* MTDL_FV_RESTRICT b, int64_t n,
                           float hf) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    const float c0 = r[i], c1 = g[i], c2 = b[i];
    float maxc = c0 > c1 ? c0 : c1;
    maxc = maxc > c2 ? maxc : c2;
    float minc = c0 < c1 ? c0 : c1;
    minc = minc < c2 ? minc : c2;
    const bool eqc = maxc == minc;
    const float cr = maxc - minc;
    const float s = cr / (eqc ? 1.f : maxc);
    const float div = eqc ? 1.f : cr;
    const float rc = (maxc - c0) / div, gc = (maxc - c1) / div, bc = (maxc - c2) / div;
    const bool neq_r = maxc != c0, eq_g = maxc == c1;
    const float hr = neq_r ? 0.f : bc - gc;
    const float hg = (eq_g & neq_r) ? (rc + 2.f) - bc : 0.f;
    const float hb = (neq_r & !eq_g) ? (gc + 4.f) - rc : 0.f;
    float h = (hr + hg) + hb;
    h = h * kSixth + 1.f;
    h = h - __builtin_floorf(h);  // fmod(h, 1) for h >= 0
    h = h + hf;
    h = h - __builtin_floorf(h);  // remainder(h, 1)
    const float v = maxc;
    const float h6 = h * 6.f;
    float k = __builtin_floorf(h6);
    const float f = h6 - k;
    k = k >= 6.f ? k - 6.f : k;
    const float sxf = s * f, one_minus_s = 1.f - s;
    const float q = clamp01((1.f - sxf) * v);
    const float tt = clamp01((sxf + one_minus_s) * v);
    const float pp = clamp01(one_minus_s * v);
    // (r, g, b) per sector k: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q). The kernel's nested
    // choices as a chain of single selects (the sectors are exclusive): GCC vectorises these.
    float o0 = k == 4.f ? tt : v;
    o0 = k == 3.f ? pp : o0;
    o0 = k == 2.f ? pp : o0;
    o0 = k == 1.f ? q : o0;
    float o1 = k == 3.f ? q : pp;
    o1 = k == 2.f ? v : o1;
    o1 = k == 1.f ? v : o1;
    o1 = k == 0.f ? tt : o1;
    float o2 = k == 5.f ? q : v;
    o2 = k == 2.f ? tt : o2;
    o2 = k <= 1.f ? pp : o2;
    // torch's aminmax propagates NaN, so any NaN channel makes the whole pixel NaN.
    const bool isnan = (c0 != c0) | (c1 != c1) | (c2 != c2);
    r[i] = isnan ? nan : o0;
    g[i] = isnan ? nan : o1;
    b[i] = isnan ? nan : o2;
  }
}

MTDL_FV_STAGE void op_invert(float* MTDL_FV_RESTRICT s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = 1.f - s[i];
}

MTDL_FV_STAGE void op_solarize(float* MTDL_FV_RESTRICT s, int64_t n, float thr) {
  for (int64_t i = 0; i < n; ++i) s[i] = s[i] >= thr ? 1.f - s[i] : s[i];
}

MTDL_FV_STAGE void op_posterize(float* MTDL_FV_RESTRICT s, int64_t n, float bits) {
  bits = bits > 0.f ? bits : 0.f;  // NaN -> 0; never shifts out of range
  bits = bits < 8.f ? bits : 8.f;
  const float levels = static_cast<float>(1 << static_cast<int>(bits));
  const float inv = 1.f / levels, top = levels - 1.f;
  for (int64_t i = 0; i < n; ++i) {
    const float l = __builtin_floorf(s[i] * levels);
    s[i] = (l < 0.f ? 0.f : (l > top ? top : l)) * inv;
  }
}

// OP_ERASE: pixels in [top, top + h) x [left, left + w) (float comparisons, as the kernel) = value.
MTDL_FV_STAGE void op_erase(const Plan& p, const Tile& t) {
  const float top = t.prm[SLOT_ERASE_TOP], left = t.prm[SLOT_ERASE_LEFT];
  const float bottom = top + t.prm[SLOT_ERASE_H], right = left + t.prm[SLOT_ERASE_W];
  const float val = t.prm[SLOT_ERASE_VALUE];
  for (int64_t y = t.y0; y < t.y1; ++y) {
    const float yf = static_cast<float>(y);
    if (!((yf >= top) & (yf < bottom))) continue;
    for (int64_t c = 0; c < p.C; ++c) {
      float* MTDL_FV_RESTRICT s = t.s[c] + (y - t.y0) * p.W;
      for (int32_t x = 0; x < static_cast<int32_t>(p.W); ++x) {
        const float xf = static_cast<float>(x);
        s[x] = ((xf >= left) & (xf < right)) ? val : s[x];
      }
    }
  }
}

// ---- noise: Triton's Philox4x32-10 counter stream and Box-Muller ------------------------------

MTDL_FV_INLINE float uint_to_uniform(uint32_t u) {
  // triton.language.random.uint_to_uniform_float: int32 x, ~x when negative, times 4.6566127342e-10.
  int32_t x = static_cast<int32_t>(u);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// ln(u) for finite u > 0 in the normal range: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716, by its series to s^11 (error < 1e-9).
MTDL_FV_INLINE float log_positive(float u) {
  const uint32_t bits = float_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.f : e;
  const float s = (m - 1.f) / (m + 1.f);
  const float s2 = s * s;
  const float series = ((((s2 * static_cast<float>(1.0 / 11) + static_cast<float>(1.0 / 9)) * s2 +
                          static_cast<float>(1.0 / 7)) * s2 + 0.2f) * s2 + static_cast<float>(1.0 / 3)) * s2;
  const float ln_m = 2.f * s + 2.f * s * series;
  // ln 2 split so that e * kLn2Hi is exact: 0.693359375 has 9 significant bits, |e| < 2^8.
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  return e * kLn2Hi + (ln_m + e * kLn2Lo);
}

// (sin(2 pi u), cos(2 pi u)) for u in [0, 1), the kernel's float32 recipe step for step: q = the
// nearest quarter turn, t = 2 pi (u - q / 4) in [-pi/4, pi/4] (the subtraction is exact), Taylor
// polynomials of degree 9 and 10, then rotation by q quarter turns.
MTDL_FV_INLINE void sincos_turns(float u, float* sn, float* cs) {
  const float q = __builtin_floorf(u * 4.f + 0.5f);
  const float t = (u - q * 0.25f) * static_cast<float>(6.283185307179586);
  const float t2 = t * t;
  const float s = t + t * t2 * (static_cast<float>(-0.16666666666666666) +
                                t2 * (static_cast<float>(0.008333333333333333) +
                                      t2 * (static_cast<float>(-0.0001984126984126984) +
                                            t2 * static_cast<float>(2.7557319223985893e-06))));
  const float c = 1.f + t2 * (-0.5f + t2 * (static_cast<float>(0.041666666666666664) +
                                            t2 * (static_cast<float>(-0.001388888888888889) +
                                                  t2 * (static_cast<float>(2.48015873015873e-05) -
                                                        t2 * static_cast<float>(2.755731922398589e-07)))));
  rotate_by_quarter_turns(static_cast<int>(q) & 3, s, c, sn, cs);
}

#ifdef MTDL_FV_X86
// uniforms() for 8 counters per step with AVX2 intrinsics: the same bits. GCC vectorises the
// portable Philox round with a shuffle per 64-bit product; here each 32 x 32 -> 64 product pair of
// even and odd lanes is two vpmuludq and two blends. Writes round_up(m, 16) entries: the callers'
// arrays hold kNoiseBlock, a multiple of 16.
__attribute__((target("avx2"))) inline void mul_hi_lo(__m256i x, __m256i k, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, k);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) inline __m256 to_uniform(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // ~x where x < 0 (as int32)
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
}

__attribute__((target("avx2"), noinline)) void uniforms_avx2(uint32_t base_lo, uint32_t base_hi, int64_t i0, int64_t m,
                                                             uint32_t k0, uint32_t k1, float* u0, float* u1, float* u2,
                                                             float* u3) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxM0));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxM1));
  const __m256i base_lo_biased = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int32_t>(base_lo)), sign);
  for (int64_t i = 0; i < m; i += 8) {
    __m256i a = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base_lo + static_cast<uint32_t>(i0 + i))), lane);
    // carry into the high word where the low word wrapped (unsigned a < base_lo, via biased compare)
    const __m256i carry = _mm256_cmpgt_epi32(base_lo_biased, _mm256_xor_si256(a, sign));
    __m256i b = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(base_hi)), carry);
    __m256i c = _mm256_setzero_si256(), d = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hb, lb, ha, la;
      mul_hi_lo(c, mul_b, &hb, &lb);
      mul_hi_lo(a, mul_a, &ha, &la);
      a = _mm256_xor_si256(_mm256_xor_si256(hb, b), _mm256_set1_epi32(static_cast<int32_t>(key0)));
      c = _mm256_xor_si256(_mm256_xor_si256(ha, d), _mm256_set1_epi32(static_cast<int32_t>(key1)));
      b = lb;
      d = la;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    _mm256_storeu_ps(u0 + i, to_uniform(a));
    _mm256_storeu_ps(u1 + i, to_uniform(b));
    _mm256_storeu_ps(u2 + i, to_uniform(c));
    _mm256_storeu_ps(u3 + i, to_uniform(d));
  }
}

// The same for 16 counters per step with AVX-512: half the instructions per counter.
__attribute__((target("avx512f"))) inline void mul_hi_lo16(__m512i x, __m512i k, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, k);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), k);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) inline __m512 to_uniform16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
}

__attribute__((target("avx512f"), noinline)) void uniforms_avx512(uint32_t base_lo, uint32_t base_hi, int64_t i0,
                                                                  int64_t m, uint32_t k0, uint32_t k1, float* u0,
                                                                  float* u1, float* u2, float* u3) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM0));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM1));
  const __m512i base_lo_v = _mm512_set1_epi32(static_cast<int32_t>(base_lo));
  for (int64_t i = 0; i < m; i += 16) {
    __m512i a = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base_lo + static_cast<uint32_t>(i0 + i))), lane);
    // carry into the high word where the low word wrapped (unsigned a < base_lo)
    const __mmask16 carry = _mm512_cmplt_epu32_mask(a, base_lo_v);
    __m512i b = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base_hi)), carry,
                                      _mm512_set1_epi32(static_cast<int32_t>(base_hi)), _mm512_set1_epi32(1));
    __m512i c = _mm512_setzero_si512(), d = _mm512_setzero_si512();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m512i hb, lb, ha, la;
      mul_hi_lo16(c, mul_b, &hb, &lb);
      mul_hi_lo16(a, mul_a, &ha, &la);
      a = _mm512_xor_si512(_mm512_xor_si512(hb, b), _mm512_set1_epi32(static_cast<int32_t>(key0)));
      c = _mm512_xor_si512(_mm512_xor_si512(ha, d), _mm512_set1_epi32(static_cast<int32_t>(key1)));
      b = lb;
      d = la;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    _mm512_storeu_ps(u0 + i, to_uniform16(a));
    _mm512_storeu_ps(u1 + i, to_uniform16(b));
    _mm512_storeu_ps(u2 + i, to_uniform16(c));
    _mm512_storeu_ps(u3 + i, to_uniform16(d));
  }
}

__attribute__((target("avx"), noinline)) void sqrt_avx(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, _mm256_sqrt_ps(_mm256_loadu_ps(v + i)));
  for (; i < n; ++i) _mm_store_ss(v + i, _mm_sqrt_ss(_mm_load_ss(v + i)));
}
#endif

// IEEE square roots in place. GCC only vectorises sqrt under -fno-math-errno, which a function
// cannot switch on for itself (the builtin's errno side effect is fixed at startup): SSE's sqrtps
// (every x86-64 CPU) or AVX's, exactly rounded like std::sqrt.
MTDL_FV_INLINE void sqrt_in_place(const Plan& p, float* MTDL_FV_RESTRICT v, int64_t n) {
  int64_t i = 0;
#ifdef MTDL_FV_X86
  if (p.avx2) {
    sqrt_avx(v, n);
    return;
  }
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(v + i, _mm_sqrt_ps(_mm_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = std::sqrt(v[i]);
}


// Uniforms u0..u3 of the counters base + i0 + i, i in [0, m): Philox4x32-10, converted as
// tl.rand4x. (The noise stages are separate loops: GCC vectorises each, not their sum.)
MTDL_FV_INLINE void uniforms(const Plan& p, uint32_t base_lo, uint32_t base_hi, int64_t i0, int64_t m,
                             float* MTDL_FV_RESTRICT u0, float* MTDL_FV_RESTRICT u1, float* MTDL_FV_RESTRICT u2,
                             float* MTDL_FV_RESTRICT u3) {
#ifdef MTDL_FV_X86
  if (p.avx512) {
    uniforms_avx512(base_lo, base_hi, i0, m, p.seed_lo, p.seed_hi, u0, u1, u2, u3);
    return;
  }
  if (p.avx2) {
    uniforms_avx2(base_lo, base_hi, i0, m, p.seed_lo, p.seed_hi, u0, u1, u2, u3);
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i) {
    uint32_t x0 = base_lo + static_cast<uint32_t>(i0 + i);
    uint32_t x1 = base_hi + (x0 < base_lo ? 1u : 0u);  // carry into the counter's high word
    uint32_t x2 = 0, x3 = 0;
    philox4x32_10(&x0, &x1, &x2, &x3, p.seed_lo, p.seed_hi);
    u0[i] = uint_to_uniform(x0);
    u1[i] = uint_to_uniform(x1);
    u2[i] = uint_to_uniform(x2);
    u3[i] = uint_to_uniform(x3);
  }
}

// u -> sqrt(-2 ln max(u, 1e-7)) in place: Box-Muller's radius.
MTDL_FV_INLINE void radii(const Plan& p, float* MTDL_FV_RESTRICT u, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const float v = u[i] > 1.0e-7f ? u[i] : 1.0e-7f;
    u[i] = -2.f * log_positive(v);
  }
  sqrt_in_place(p, u, m);
}

// u -> cos(2 pi u) in place, and sin(2 pi u) into sn unless it is null: Box-Muller's angle.
MTDL_FV_INLINE void angles(float* MTDL_FV_RESTRICT u, float* MTDL_FV_RESTRICT sn, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    float s, c;
    sincos_turns(u[i], &s, &c);
    u[i] = c;
    if (sn != nullptr) sn[i] = s;  // loop-invariant: unswitched
  }
}

// s + (mean + n * sigma) with n = radius * angle, clamped when clip.
MTDL_FV_INLINE void add_noise(float* MTDL_FV_RESTRICT s, const float* MTDL_FV_RESTRICT radius,
                              const float* MTDL_FV_RESTRICT angle, int64_t m, float nmean, float nsig, bool clip) {
  if (clip) {
    for (int64_t i = 0; i < m; ++i) s[i] = clamp01(s[i] + (nmean + (radius[i] * angle[i]) * nsig));
  } else {
    for (int64_t i = 0; i < m; ++i) s[i] = s[i] + (nmean + (radius[i] * angle[i]) * nsig);
  }
}

// x + (mean + n * sigma), n ~ N(0, 1) from tl.randn4x(seed, key) with key = (vb * MAX_OPS + j) * HW +
// pixel: its outputs n0, n1, n2 go to channels 0, 1, 2; then clamped to [0, 1] when clip.
MTDL_FV_STAGE void op_noise(const Plan& p, const Tile& t, int j) {
  const float nmean = t.prm[SLOT_NOISE_MEAN], nsig = t.prm[SLOT_NOISE_SIGMA];
  const bool clip = t.prm[SLOT_NOISE_CLIP] > 0.5f;
  const uint64_t base = (static_cast<uint64_t>(t.v * p.B + t.b) * MAX_OPS + static_cast<uint64_t>(j)) *
                            static_cast<uint64_t>(p.HW) + static_cast<uint64_t>(t.y0 * p.W);
  const uint32_t base_lo = static_cast<uint32_t>(base), base_hi = static_cast<uint32_t>(base >> 32);
  const bool rgb = p.C == 3;
  // Per block, in place: (u0, u1, u2, u3) -> (r0, cos 2 pi u1, r2, cos 2 pi u3), sin 2 pi u1 aside;
  // normals n0 = r0 cos1, n1 = r0 sin1, n2 = r2 cos3.
  float r0[kNoiseBlock], cos1[kNoiseBlock], r2[kNoiseBlock], cos3[kNoiseBlock], sin1[kNoiseBlock];
  for (int64_t i0 = 0; i0 < t.n; i0 += kNoiseBlock) {
    const int64_t m = std::min(kNoiseBlock, t.n - i0);
    uniforms(p, base_lo, base_hi, i0, m, r0, cos1, r2, cos3);
    radii(p, r0, m);
    angles(cos1, sin1, m);
    add_noise(t.s[0] + i0, r0, cos1, m, nmean, nsig, clip);
    if (rgb) {
      radii(p, r2, m);
      angles(cos3, nullptr, m);  // the kernel leaves u3's sine unused
      add_noise(t.s[1] + i0, r0, sin1, m, nmean, nsig, clip);
      add_noise(t.s[2] + i0, r2, cos3, m, nmean, nsig, clip);
    }
  }
}

// ---- a view's program on a tile ---------------------------------------------------------------

MTDL_FV_INLINE void run_op(const Plan& p, const Tile& t, int op, int j) {
  const float* prm = t.prm;
  const int64_t n = t.n, C = p.C;
  switch (op) {
    case OP_BRIGHTNESS:
      for (int64_t c = 0; c < C; ++c) op_scale_clamp(t.s[c], n, prm[SLOT_BRIGHTNESS]);
      break;
    case OP_CONTRAST: {
      const float mu = t.contrast_mu;
      for (int64_t c = 0; c < C; ++c) op_blend_const(t.s[c], n, prm[SLOT_CONTRAST], mu);
      break;
    }
    case OP_SATURATION:
      if (C == 3) op_saturation(t.s[0], t.s[1], t.s[2], n, prm[SLOT_SATURATION]);
      break;
    case OP_HUE:
      if (C == 3) op_hue(t.s[0], t.s[1], t.s[2], n, prm[SLOT_HUE]);
      break;
    case OP_GRAYSCALE:
      if (C == 3) op_grayscale(t.s[0], t.s[1], t.s[2], n);
      break;
    case OP_INVERT:
      for (int64_t c = 0; c < C; ++c) op_invert(t.s[c], n);
      break;
    case OP_SOLARIZE:
      for (int64_t c = 0; c < C; ++c) op_solarize(t.s[c], n, prm[SLOT_SOLARIZE]);
      break;
    case OP_POSTERIZE:
      for (int64_t c = 0; c < C; ++c) op_posterize(t.s[c], n, prm[SLOT_POSTERIZE_BITS]);
      break;
    case OP_NOISE:
      op_noise(p, t, j);
      break;
    case OP_ERASE:
      op_erase(p, t);
      break;
    default:  // OP_END: nothing
      break;
  }
}

// Spatial stage, then ops[v, :n_ops].
MTDL_FV_INLINE void run_ops(const Plan& p, const Tile& t, int from, int to) {
  const int32_t* row = p.ops + t.v * MAX_OPS;
  for (int j = from; j < to; ++j) run_op(p, t, row[j], j);
}

MTDL_FV_INLINE void run_view(const Plan& p, Workspace& ws, const Tile& t, int n_ops) {
  switch (p.spatial[t.v]) {
    case SPATIAL_WARP: warp(p, ws, t); break;
    case SPATIAL_BLUR: blur(p, ws, t); break;
    case SPATIAL_SHARPEN: sharpen(p, ws, t); break;
    default: copy_rows(p, ws, t); break;
  }
  run_ops(p, t, 0, n_ops);
}

// Sum of gray over the tile in float64, 8 fixed lanes (vectorisable, and the same order on every ISA).
MTDL_FV_STAGE double gray_sum(const Plan& p, const Tile& t) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const float* MTDL_FV_RESTRICT r = t.s[0];
  const float* MTDL_FV_RESTRICT g = t.s[1];
  const float* MTDL_FV_RESTRICT b = t.s[2];
  const int64_t n = t.n, full = n - n % 8;
  if (p.C == 3) {
    for (int64_t i = 0; i < full; i += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(gray(r[i + l], g[i + l], b[i + l]));
    }
    for (int64_t i = full; i < n; ++i) lanes[i - full] += static_cast<double>(gray(r[i], g[i], b[i]));
  } else {
    for (int64_t i = 0; i < full; i += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(r[i + l]);
    }
    for (int64_t i = full; i < n; ++i) lanes[i - full] += static_cast<double>(r[i]);
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// ---- output: normalise and cast ----------------------------------------------------------------

// float -> float16 bits, round to nearest even like torch's .to(torch.float16), on integers (GCC
// vectorises no float -> _Float16 conversion without AVX512-FP16).
MTDL_FV_INLINE uint16_t half_bits(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  // normal: exponent rebiased (127 -> 15), the 13 dropped bits rounded to nearest even (a carry
  // moves into the exponent, overflow saturates to infinity)
  uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  normal = normal < 0x7C00u ? normal : 0x7C00u;
  // |v| < 2^-14: subnormal, the value in units of 2^-24 rounded to nearest even (exact scaling;
  // clamped first so that no large value reaches the int conversion)
  float scaled = bits_float(a) * 16777216.f;
  scaled = scaled < 2048.f ? scaled : 2048.f;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(__builtin_rintf(scaled)));
  uint32_t h = a < 0x38800000u ? sub : normal;
  h = a > 0x7F800000u ? 0x7E00u : h;  // NaN
  return static_cast<uint16_t>(sign | h);
}

MTDL_FV_INLINE uint16_t bfloat16_bits(float v) {
  // round to nearest even like torch's .to(torch.bfloat16); NaN stays NaN
  const uint32_t u = float_bits(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

#ifdef MTDL_FV_X86
// d[0, n) = s[0, n) with non-temporal stores (d 32-byte aligned): the K views are written once and
// not read back by this call, so they skip the read-for-ownership a cached store costs.
__attribute__((target("avx"), noinline)) void stream_copy_avx(const float* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(d + i, _mm256_loadu_ps(s + i));
  for (; i < n; ++i) d[i] = s[i];
}
#endif

template <int kOut>
MTDL_FV_INLINE void store_plane(const float* MTDL_FV_RESTRICT s, int64_t n, bool normalize, float mean, float stdv,
                                char* dst_bytes, bool stream) {
  if (kOut == kOutFloat) {
    float* MTDL_FV_RESTRICT d = reinterpret_cast<float*>(dst_bytes);
    if (normalize) {
      for (int64_t i = 0; i < n; ++i) d[i] = (s[i] - mean) / stdv;
    } else {
#ifdef MTDL_FV_X86
      if (stream && reinterpret_cast<uintptr_t>(d) % 32 == 0) {
        stream_copy_avx(s, d, n);
        return;
      }
#endif
      std::memcpy(d, s, static_cast<size_t>(n) * 4);
    }
  } else if (kOut == kOutBFloat16) {
    uint16_t* MTDL_FV_RESTRICT d = reinterpret_cast<uint16_t*>(dst_bytes);
    if (normalize) {
      for (int64_t i = 0; i < n; ++i) d[i] = bfloat16_bits((s[i] - mean) / stdv);
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] = bfloat16_bits(s[i]);
    }
  } else {
    uint16_t* MTDL_FV_RESTRICT d = reinterpret_cast<uint16_t*>(dst_bytes);
    if (normalize) {
      for (int64_t i = 0; i < n; ++i) d[i] = half_bits((s[i] - mean) / stdv);
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] = half_bits(s[i]);
    }
  }
}

MTDL_FV_STAGE void store_tile(const Plan& p, const Tile& t) {
  for (int64_t c = 0; c < p.C; ++c) {
    char* dst = p.out + (((t.v * p.B + t.b) * p.C + c) * p.HW + t.y0 * p.W) * p.out_elem;
    switch (p.out_kind) {
      case kOutHalf: store_plane<kOutHalf>(t.s[c], t.n, p.normalize, p.mean[c], p.stdv[c], dst, p.avx2); break;
      case kOutBFloat16:
        store_plane<kOutBFloat16>(t.s[c], t.n, p.normalize, p.mean[c], p.stdv[c], dst, p.avx2);
        break;
      default: store_plane<kOutFloat>(t.s[c], t.n, p.normalize, p.mean[c], p.stdv[c], dst, p.avx2); break;
    }
  }
}

// ---- the two passes over work items [begin, end) -----------------------------------------------

// The mean gray of a view on one image from its tiles' partial sums, in tile order.
MTDL_FV_INLINE float contrast_mean_of(const double* partials, int64_t n_tiles, int64_t HW) {
  double sum = 0.0;
  for (int64_t tile = 0; tile < n_tiles; ++tile) sum += partials[tile];
  return static_cast<float>(sum / static_cast<double>(HW));
}

// prepass: the views with OP_CONTRAST, up to it, into partials (unless every image is one tile: the
// main pass then takes the mean itself); else: every view, stored to out.
void run_items(const Plan& p, bool prepass, int64_t begin, int64_t end) {
  Workspace ws(p);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.n_tiles, tile = item % p.n_tiles;
    Tile t;
    t.b = b;
    t.y0 = tile * p.tile_rows;
    t.y1 = std::min(p.H, t.y0 + p.tile_rows);
    t.n = (t.y1 - t.y0) * p.W;
    for (int64_t c = 0; c < 3; ++c) t.s[c] = ws.state.get() + c * p.tile_px;
    for (int64_t v = 0; v < p.K; ++v) {
      t.v = v;
      t.prm = p.params + (v * p.B + b) * N_SLOTS;
      const int cpos = p.contrast_pos[v];
      if (prepass) {
        if (cpos == MAX_OPS) continue;
        run_view(p, ws, t, cpos);
        p.partials[(v * p.B + b) * p.n_tiles + tile] = gray_sum(p, t);
      } else if (cpos < MAX_OPS && p.n_tiles == 1) {
        // The image is this one tile: its mean is the state's own, summed as the pre-pass would.
        run_view(p, ws, t, cpos);
        const double partial = gray_sum(p, t);
        t.contrast_mu = contrast_mean_of(&partial, 1, p.HW);
        run_ops(p, t, cpos, MAX_OPS);
        store_tile(p, t);
      } else {
        if (cpos < MAX_OPS) t.contrast_mu = p.contrast_mean[v * p.B + b];
        run_view(p, ws, t, MAX_OPS);
        store_tile(p, t);
      }
    }
  }
}

void run_pass(const Plan& p, bool prepass) {
  const int64_t items = p.B * p.n_tiles;
  const int64_t grain = std::max<int64_t>(1, kMinItemPixels / std::max<int64_t>(1, p.tile_px * p.K));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    run_items(p, prepass, begin, end);
#ifdef MTDL_FV_X86
    _mm_sfence();  // this thread's non-temporal stores are visible before the call returns
#endif
  });
}

// ---- argument checks (the Python launcher gives the friendly messages; these keep memory safe) --

void check_inputs(const at::Tensor& x, const at::Tensor& spatial, const at::Tensor& ops, const at::Tensor& params,
                  const std::vector<double>& mean, const std::vector<double>& std, const at::Tensor& out) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must have rank 4 (B, C, H, W), got shape ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(C == 1 || C == 3, "x must have C in (1, 3) channels, got C=", C);
  const auto in = x.scalar_type();
  TORCH_CHECK_VALUE(in == at::kByte || in == at::kHalf || in == at::kBFloat16 || in == at::kFloat,
                    "x must have dtype uint8, float16, bfloat16 or float32, got ", in);
  // warps address 4 floats per pixel of a padded copy with int32 offsets
  TORCH_CHECK_VALUE(4 * (H + 4) * (W + 2) <= std::numeric_limits<int32_t>::max(),
                    "x must have 4 (H + 4) (W + 2) < 2^31 (H, W = ", H, ", ", W, ")");
  for (int64_t d = 0; d < 4; ++d) TORCH_CHECK_VALUE(x.stride(d) >= 0, "x must have non-negative strides");
  TORCH_CHECK_VALUE(spatial.device().is_cpu() && spatial.dim() == 1 && spatial.scalar_type() == at::kInt &&
                        spatial.is_contiguous(),
                    "spatial must be a contiguous (K,) int32 CPU tensor, got ", spatial.sizes(), " ",
                    spatial.scalar_type());
  const int64_t K = spatial.size(0);
  TORCH_CHECK_VALUE(ops.device().is_cpu() && ops.dim() == 2 && ops.size(0) == K && ops.size(1) == MAX_OPS &&
                        ops.scalar_type() == at::kInt && ops.is_contiguous(),
                    "ops must be a contiguous (", K, ", ", MAX_OPS, ") int32 CPU tensor, got ", ops.sizes(), " ",
                    ops.scalar_type());
  TORCH_CHECK_VALUE(params.device().is_cpu() && params.dim() == 3 && params.size(0) == K && params.size(1) == B &&
                        params.size(2) == N_SLOTS && params.scalar_type() == at::kFloat && params.is_contiguous(),
                    "params must be a contiguous (", K, ", ", B, ", ", N_SLOTS, ") float32 CPU tensor, got ",
                    params.sizes(), " ", params.scalar_type());
  const auto od = out.scalar_type();
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.is_contiguous() && out.sizes() == at::IntArrayRef({K, B, C, H, W}) &&
                        (od == at::kFloat || od == at::kHalf || od == at::kBFloat16),
                    "out must be a contiguous (K, B, C, H, W) = (", K, ", ", B, ", ", C, ", ", H, ", ", W,
                    ") float32/float16/bfloat16 CPU tensor, got ", out.sizes(), " ", od);
  TORCH_CHECK_VALUE(mean.size() == 3 && std.size() == 3, "mean and std must have 3 values each");
  const int32_t* sp = spatial.const_data_ptr<int32_t>();
  for (int64_t v = 0; v < K; ++v) {
    TORCH_CHECK_VALUE(sp[v] >= 0 && sp[v] < N_SPATIAL, "spatial[", v, "] = ", sp[v], " is not a SPATIAL_* code");
  }
  const int32_t* op = ops.const_data_ptr<int32_t>();
  for (int64_t v = 0; v < K; ++v) {
    int n_contrast = 0;
    for (int j = 0; j < MAX_OPS; ++j) {
      const int32_t code = op[v * MAX_OPS + j];
      TORCH_CHECK_VALUE(code >= 0 && code < N_OPS, "ops[", v, ", ", j, "] = ", code, " is not an OP_* code");
      n_contrast += code == OP_CONTRAST;
    }
    TORCH_CHECK_VALUE(n_contrast <= 1, "ops[", v, "] has ", n_contrast, " OP_CONTRAST entries; at most one per view");
  }
}

Plan make_plan(const at::Tensor& x, const at::Tensor& spatial, const at::Tensor& ops, const at::Tensor& params,
               int64_t seed, const std::vector<double>& mean, const std::vector<double>& std, bool normalize,
               const at::Tensor& out) {
  Plan p;
  p.B = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.HW = p.H * p.W;
  p.K = spatial.size(0);
  p.spatial = spatial.const_data_ptr<int32_t>();
  p.ops = ops.const_data_ptr<int32_t>();
  p.params = params.const_data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed);
  p.seed_lo = static_cast<uint32_t>(useed);
  p.seed_hi = static_cast<uint32_t>(useed >> 32);
  p.normalize = normalize;
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = static_cast<float>(mean[c]);
    p.stdv[c] = static_cast<float>(std[c]);
  }
  p.x = static_cast<const char*>(x.const_data_ptr());
  p.in_dtype = x.scalar_type();
  p.sxb = x.stride(0);
  p.sxc = x.stride(1);
  p.sxh = x.stride(2);
  p.sxw = x.stride(3);
  p.direct = p.in_dtype == at::kFloat && p.sxw == 1;
  p.out = static_cast<char*>(out.data_ptr());
  p.out_kind = out.scalar_type() == at::kHalf ? kOutHalf : out.scalar_type() == at::kBFloat16 ? kOutBFloat16 : kOutFloat;
  p.out_elem = out.element_size();
  p.tile_rows = std::min(p.H, std::max<int64_t>(1, (kTilePixels + p.W - 1) / p.W));
  p.n_tiles = (p.H + p.tile_rows - 1) / p.tile_rows;
  p.tile_px = p.tile_rows * p.W;
#ifdef MTDL_FV_X86
  p.avx2 = __builtin_cpu_supports("avx2");
  p.avx512 = __builtin_cpu_supports("avx512f");
#endif
  p.has_warp = std::any_of(p.spatial, p.spatial + p.K, [](int32_t code) { return code == SPATIAL_WARP; });
  p.contrast_pos.assign(static_cast<size_t>(p.K), MAX_OPS);
  for (int64_t v = 0; v < p.K; ++v) {
    for (int j = 0; j < MAX_OPS; ++j) {
      if (p.ops[v * MAX_OPS + j] == OP_CONTRAST) p.contrast_pos[v] = j;
    }
  }
  return p;
}

}  // namespace

std::map<std::string, int64_t> fused_views_abi() {
  std::map<std::string, int64_t> abi;
  MTDL_FUSED_VIEWS_ABI(MTDL_ABI_MAP_ENTRY)
  return abi;
}

void fused_views_cpu(const at::Tensor& x, const at::Tensor& spatial, const at::Tensor& ops, const at::Tensor& params,
                     int64_t seed, const std::vector<double>& mean, const std::vector<double>& std, bool normalize,
                     const at::Tensor& out) {
  check_inputs(x, spatial, ops, params, mean, std, out);
  Plan p = make_plan(x, spatial, ops, params, seed, mean, std, normalize, out);
  if (p.K == 0 || p.B == 0 || p.HW == 0) return;
  const bool has_contrast = std::any_of(p.contrast_pos.begin(), p.contrast_pos.end(), [](int j) { return j < MAX_OPS; });
  std::vector<float> means;
  if (has_contrast && p.n_tiles > 1) {
    std::vector<double> partials(static_cast<size_t>(p.K * p.B * p.n_tiles), 0.0);
    p.partials = partials.data();
    run_pass(p, /*prepass=*/true);
    means.assign(static_cast<size_t>(p.K * p.B), 0.f);
    for (int64_t vb = 0; vb < p.K * p.B; ++vb) means[vb] = contrast_mean_of(&partials[vb * p.n_tiles], p.n_tiles, p.HW);
    p.partials = nullptr;
    p.contrast_mean = means.data();
  }
  run_pass(p, /*prepass=*/false);
}

}  // namespace mtdl
