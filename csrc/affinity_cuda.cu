// CUDA halves of the affinity accumulation and the gradient Gram reduction (see affinity.h).
//
// Affinity (the running moments): one block of kAffinityThreads threads walks the K*K entries (K is
// small: the kernel is launch-bound), updates the float64 state in place and block-reduces the
// skipped count into a 0-dim device tensor. The arithmetic uses the explicit round-to-nearest
// intrinsics so that no multiply-add is contracted: the results are bit-identical to the CPU
// implementation.
//
// Gram: out = X X^T for X (K, P), float64 products and sums. The rows are split into row blocks of
// R rows; a "pair block" (I, J), I <= J, is the R x R block of out for rows of block I against rows
// of block J. Grid: x = pair block (fastest, so the blocks that read the same columns run together
// and share them through L2), y = column chunk. Each thread owns the columns p = chunk start +
// threadIdx.x + k * blockDim.x, loads its R (or 2R) values of each column straight from global
// memory (coalesced across the warp, two columns in flight per thread), converts them to float64 and
// adds the outer product into R x R float64 registers. No shared memory in the main loop: for
// K <= 12 a single diagonal pair block covers everything, each element is read exactly once and the
// kernel is a pure stream over X. At the end the block reduces its registers (warp shuffles, then
// warps in order) and writes one partial per chunk; gram_combine_kernel adds the partials in chunk
// order. Chunk sizes depend on K and P only, so the result is deterministic and the same on every GPU.
#include "affinity.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace mtdl {
namespace {

// ---- affinity ---------------------------------------------------------------------------------------

constexpr int kAffinityThreads = 256;

// 16-bit inputs are read as raw bits and widened by hand (no dependence on the half/bfloat16
// conversion macros torch's build sets for nvcc).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <typename T>
__device__ __forceinline__ double to_f64(T v) {
  return static_cast<double>(v);
}
template <>
__device__ __forceinline__ double to_f64<Half>(Half v) {
  return static_cast<double>(__half2float(__ushort_as_half(v.bits)));
}
template <>
__device__ __forceinline__ double to_f64<BFloat16>(BFloat16 v) {
  return static_cast<double>(__uint_as_float(static_cast<unsigned>(v.bits) << 16));
}

__device__ __forceinline__ double load_f64(const void* p, int64_t i, int code) {
  switch (code) {
    case kF32: return to_f64(static_cast<const float*>(p)[i]);
    case kF64: return to_f64(static_cast<const double*>(p)[i]);
    case kF16: return to_f64(static_cast<const Half*>(p)[i]);
    default: return to_f64(static_cast<const BFloat16*>(p)[i]);
  }
}

// Z = 1 - v / l for base loss l and lookahead loss v; false when the entry is invalid.
__device__ __forceinline__ bool step_z(double l, double v, double& zz) {
  zz = __dsub_rn(1.0, __ddiv_rn(v, l));
  return isfinite(l) && l > 0.0 && isfinite(v) && isfinite(zz);
}

// Sum of every thread's `local` written to *out by thread 0: warp shuffles, then warp 0 in order.
__device__ __forceinline__ void block_sum_to(int64_t local, int64_t* out) {
  __shared__ int64_t warp_sums[kAffinityThreads / 32];
  for (int off = 16; off > 0; off /= 2) local += __shfl_down_sync(0xffffffffu, local, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (int w = 0; w < kAffinityThreads / 32; ++w) s += warp_sums[w];
    *out = s;
  }
}

// moments: [mean, m2, weight, weight_sq], each K * K (see affinity.h for the update).
__global__ void __launch_bounds__(kAffinityThreads)
affinity_moments_kernel(const void* __restrict__ base, int base_code, const void* __restrict__ lookahead,
                        int lookahead_code, int64_t K, int64_t* __restrict__ count, double* __restrict__ moments,
                        double keep, double* __restrict__ z, int64_t* __restrict__ skipped) {
  int64_t local = 0;
  const int64_t n = K * K;
  double* mean = moments;
  double* m2 = moments + n;
  double* weight = moments + 2 * n;
  double* weight_sq = moments + 3 * n;
  const double keep_sq = __dmul_rn(keep, keep);
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    double zz;
    if (!step_z(load_f64(base, e % K, base_code), load_f64(lookahead, e, lookahead_code), zz)) {
      z[e] = __longlong_as_double(0x7ff8000000000000LL);  // quiet NaN
      ++local;
      continue;
    }
    z[e] = zz;
    const double w = __dadd_rn(__dmul_rn(keep, weight[e]), 1.0);
    weight_sq[e] = __dadd_rn(__dmul_rn(keep_sq, weight_sq[e]), 1.0);
    const double delta = __dsub_rn(zz, mean[e]);
    const double m = __dadd_rn(mean[e], __ddiv_rn(delta, w));
    m2[e] = __dadd_rn(__dmul_rn(keep, m2[e]), __dmul_rn(delta, __dsub_rn(zz, m)));
    mean[e] = m;
    weight[e] = w;
    count[e] += 1;
  }
  block_sum_to(local, skipped);
}

// ---- Gram -------------------------------------------------------------------------------------------

constexpr int kGramThreads = 256;
constexpr int kGramWarps = kGramThreads / 32;
constexpr int64_t kGramMinChunk = 4096;   // columns per chunk, at least (16 per thread)
constexpr int64_t kGramMaxChunks = 1024;  // chunks, at most (partials: 1024 * K * K doubles)
constexpr int kCombineThreads = 128;
constexpr int kPrefetchIters = 2;  // L2 prefetch distance, in loop iterations (2 * kGramThreads columns)

// Loads rows [row0, row0 + rows) of column p (rows <= R) as float64; rows past the end read as 0.
template <typename scalar_t, int R>
__device__ __forceinline__ void load_column(const scalar_t* __restrict__ x, int64_t P, int64_t row0, int rows,
                                            int64_t p, double (&v)[R]) {
  const scalar_t* src = x + row0 * P + p;
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = r < rows ? to_f64(src[r * P]) : 0.0;
}

// Asks L2 for rows [row0, row0 + rows) of column p (a hint: no registers held, no fault). The lanes
// of a warp cover consecutive columns, so each warp-wide prefetch fetches whole lines.
template <typename scalar_t, int R>
__device__ __forceinline__ void prefetch_column(const scalar_t* x, int64_t P, int64_t row0, int rows, int64_t p) {
  const scalar_t* src = x + row0 * P + p;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < rows) asm volatile("prefetch.L2 [%0];" ::"l"(src + r * P));
  }
}

template <int R, bool kDiag>
__device__ __forceinline__ void add_outer(double (&acc)[R][R], const double (&va)[R], const double (&vb)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int s = kDiag ? r : 0; s < R; ++s) acc[r][s] = fma(va[r], vb[s], acc[r][s]);
  }
}

template <typename scalar_t, int R, bool kDiag>
__global__ void __launch_bounds__(kGramThreads)
gram_partial_kernel(const scalar_t* __restrict__ x, int64_t K, int64_t P, int64_t chunk_len, int nblocks,
                    double* __restrict__ partial) {
  int I = blockIdx.x, J = blockIdx.x;
  if (!kDiag) {  // blockIdx.x enumerates the pairs I < J row-major
    int t = blockIdx.x;
    I = 0;
    while (t >= nblocks - 1 - I) {
      t -= nblocks - 1 - I;
      ++I;
    }
    J = I + 1 + t;
  }
  const int64_t a0 = static_cast<int64_t>(I) * R, b0 = static_cast<int64_t>(J) * R;
  const int na = static_cast<int>(min(static_cast<int64_t>(R), K - a0));
  const int nb = static_cast<int>(min(static_cast<int64_t>(R), K - b0));
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t c1 = min(P, c0 + chunk_len);

  double acc[R][R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int s = 0; s < R; ++s) acc[r][s] = 0.0;
  }

  // Two columns per iteration (p, then p + blockDim.x: the same order as a plain strided loop), both
  // loaded before either is used so that each thread keeps 2R (or 4R) loads in flight; the columns of
  // kPrefetchIters iterations ahead are requested into L2 meanwhile, so that the bytes in flight per
  // SM are not bounded by the registers (the accumulators take most of them).
  for (int64_t p = c0 + threadIdx.x; p < c1; p += 2 * kGramThreads) {
    const int64_t q = p + kGramThreads;
    const bool has_q = q < c1;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t ahead = p + (2 * kPrefetchIters + u) * kGramThreads;
      if (ahead < c1) {
        prefetch_column<scalar_t, R>(x, P, a0, na, ahead);
        if (!kDiag) prefetch_column<scalar_t, R>(x, P, b0, nb, ahead);
      }
    }
    double va0[R], va1[R];
    load_column<scalar_t, R>(x, P, a0, na, p, va0);
    load_column<scalar_t, R>(x, P, a0, has_q ? na : 0, has_q ? q : p, va1);
    if (kDiag) {
      add_outer<R, true>(acc, va0, va0);
      if (has_q) add_outer<R, true>(acc, va1, va1);
    } else {
      double vb0[R], vb1[R];
      load_column<scalar_t, R>(x, P, b0, nb, p, vb0);
      load_column<scalar_t, R>(x, P, b0, has_q ? nb : 0, has_q ? q : p, vb1);
      add_outer<R, false>(acc, va0, vb0);
      if (has_q) add_outer<R, false>(acc, va1, vb1);
    }
  }

  // Block reduction in a fixed order: shuffle tree within each warp, then the warps in order.
  __shared__ double red[kGramWarps][R * R];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int s = kDiag ? r : 0; s < R; ++s) {
      double v = acc[r][s];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][r * R + s] = v;
    }
  }
  __syncthreads();
  double* dst = partial + static_cast<int64_t>(blockIdx.y) * K * K;
  for (int e = threadIdx.x; e < R * R; e += kGramThreads) {
    const int r = e / R, s = e % R;
    if ((kDiag && s < r) || r >= na || s >= nb) continue;
    double v = 0.0;
#pragma unroll
    for (int w = 0; w < kGramWarps; ++w) v += red[w][e];
    const int64_t a = a0 + r, b = b0 + s;
    dst[a * K + b] = v;
    dst[b * K + a] = v;
  }
}

// out[e] = sum over chunks c, in a fixed order, of partial[c][e]; one block per entry.
__global__ void __launch_bounds__(kCombineThreads)
gram_combine_kernel(const double* __restrict__ partial, int64_t nchunks, int64_t KK, double* __restrict__ out) {
  const int64_t e = blockIdx.x;
  double v = 0.0;
  for (int64_t c = threadIdx.x; c < nchunks; c += kCombineThreads) v += partial[c * KK + e];
  __shared__ double red[kCombineThreads];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int half = kCombineThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[e] = red[0];
}

template <typename scalar_t, int R, bool kDiag>
void launch_partial(const void* x, int64_t K, int64_t P, int64_t chunk_len, int64_t nchunks, int nblocks,
                    double* partial, cudaStream_t stream) {
  const int pair_blocks = kDiag ? nblocks : nblocks * (nblocks - 1) / 2;
  if (pair_blocks == 0) return;
  const dim3 grid(static_cast<unsigned>(pair_blocks), static_cast<unsigned>(nchunks));
  gram_partial_kernel<scalar_t, R, kDiag><<<grid, kGramThreads, 0, stream>>>(static_cast<const scalar_t*>(x), K, P,
                                                                            chunk_len, nblocks, partial);
}

template <typename scalar_t>
void launch_gram(const void* x, int64_t K, int64_t P, int64_t chunk_len, int64_t nchunks, double* partial,
                 cudaStream_t stream) {
  if (K <= 4) {
    launch_partial<scalar_t, 4, true>(x, K, P, chunk_len, nchunks, 1, partial, stream);
  } else if (K <= 8) {
    launch_partial<scalar_t, 8, true>(x, K, P, chunk_len, nchunks, 1, partial, stream);
  } else if (K <= 12) {
    launch_partial<scalar_t, 12, true>(x, K, P, chunk_len, nchunks, 1, partial, stream);
  } else {
    const int nblocks = static_cast<int>((K + 7) / 8);
    launch_partial<scalar_t, 8, true>(x, K, P, chunk_len, nchunks, nblocks, partial, stream);
    launch_partial<scalar_t, 8, false>(x, K, P, chunk_len, nchunks, nblocks, partial, stream);
  }
}

}  // namespace

int affinity_moments_cuda(const void* base, int base_dtype, const void* lookahead, int lookahead_dtype, int64_t K,
                          int64_t* count, double* moments, double keep, double* z, int64_t* skipped, void* stream) {
  affinity_moments_kernel<<<1, kAffinityThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      base, base_dtype, lookahead, lookahead_dtype, K, count, moments, keep, z, skipped);
  return static_cast<int>(cudaGetLastError());
}

void gram_cuda_plan(int64_t P, int64_t* nchunks, int64_t* chunk_len) {
  // At least kGramMinChunk columns per chunk, at most kGramMaxChunks chunks; the length is a multiple
  // of 2 * kGramThreads (one unrolled iteration of the whole block).
  const int64_t step = 2 * kGramThreads;
  const int64_t n = std::min(kGramMaxChunks, std::max<int64_t>(1, (P + kGramMinChunk - 1) / kGramMinChunk));
  int64_t len = std::max<int64_t>(1, (P + n - 1) / n);
  len = (len + step - 1) / step * step;
  *chunk_len = len;
  *nchunks = std::max<int64_t>(1, (P + len - 1) / len);
}

int gram_cuda(const void* x, int dtype, int64_t K, int64_t P, int64_t nchunks, int64_t chunk_len, double* partial,
              double* out, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (dtype) {
    case kF32: launch_gram<float>(x, K, P, chunk_len, nchunks, partial, stream); break;
    case kF64: launch_gram<double>(x, K, P, chunk_len, nchunks, partial, stream); break;
    case kF16: launch_gram<Half>(x, K, P, chunk_len, nchunks, partial, stream); break;
    default: launch_gram<BFloat16>(x, K, P, chunk_len, nchunks, partial, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  gram_combine_kernel<<<static_cast<unsigned>(K * K), kCombineThreads, 0, stream>>>(partial, nchunks, K * K, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace mtdl
