// Affinity accumulation (TAG, Eq. 1) and the gradient Gram reduction: declarations shared by the
// CPU sources (affinity.cpp), the CUDA sources (affinity_cuda.cu) and the bindings (module.cpp).
//
// Both reductions write into buffers the caller allocated (Python does it in
// mtdl_fast/reductions.py), so tests can poison them and check that every entry is written.
//
// The torch-facing half is hidden from nvcc: affinity_cuda.cu sees only the raw-pointer launchers,
// so it compiles without parsing the torch headers.
#pragma once

#include <cstdint>

#ifndef __CUDACC__
#include <ATen/core/Tensor.h>

#include <optional>
#endif

namespace mtdl {

#ifndef __CUDACC__

// Z[i, j] = 1 - lookahead[i, j] / base[j], computed in float64, written to `z` (K, K) float64 with
// NaN where the entry is invalid. An entry is valid when base[j] is finite and > 0, lookahead[i, j]
// is finite, and the resulting Z is finite (the last only fails for float64 inputs near overflow).
// Valid entries are folded into per-entry running moments in place: moments (4, K, K) float64 holds
// [mean, m2, weight, weight_sq] of the valid Z observations of each entry, count (K, K) int64 their
// number. With keep = decay (or 1 when unset), a valid observation z makes, in this order of float64
// operations:
//   weight' = keep * weight + 1,  weight_sq' = (keep * keep) * weight_sq + 1,
//   delta = z - mean,  mean' = mean + delta / weight',  m2' = keep * m2 + delta * (z - mean')
// i.e. West's weighted update with the past observations' weights scaled by keep (Welford when
// decay is unset): weights proportional to keep^(n - t), mean the weighted mean, m2 the weighted
// sum of squared deviations. Invalid entries leave the state unchanged. Returns the number of
// invalid entries as a 0-dim int64 tensor on the inputs' device (no host synchronisation on CUDA).
at::Tensor affinity_moments(const at::Tensor& base, const at::Tensor& lookahead, const at::Tensor& count,
                            const at::Tensor& moments, std::optional<double> decay, const at::Tensor& z);

// out (K, K) float64 = grads @ grads.T for grads (K, P), products and sums in float64. The result is
// exactly symmetric and deterministic (the summation order depends on K and P only, never on the
// thread count or the GPU model).
void gram(const at::Tensor& grads, const at::Tensor& out);
#endif  // __CUDACC__

#ifdef MTDL_WITH_CUDA
// CUDA launchers (affinity_cuda.cu), on raw device pointers: affinity.cpp checks the tensors,
// allocates, picks the device and stream and checks the returned cudaError_t (as int).
enum DtypeCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// moments: 4 * K * K float64 ([mean, m2, weight, weight_sq]); keep = decay, or 1 without decay.
int affinity_moments_cuda(const void* base, int base_dtype, const void* lookahead, int lookahead_dtype, int64_t K,
                          int64_t* count, double* moments, double keep, double* z, int64_t* skipped, void* stream);

// Column chunks of the CUDA Gram reduction for P columns (a function of P only).
void gram_cuda_plan(int64_t P, int64_t* nchunks, int64_t* chunk_len);

// partial: nchunks * K * K float64 scratch; out: K * K float64. Requires K >= 1, P >= 1.
int gram_cuda(const void* x, int dtype, int64_t K, int64_t P, int64_t nchunks, int64_t chunk_len, double* partial,
              double* out, void* stream);
#endif

}  // namespace mtdl
